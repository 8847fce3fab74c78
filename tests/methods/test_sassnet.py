"""Tests of jaxseg.methods.sassnet (SASSNet, docs/methods/sassnet.md): every loss term against NumPy and the
reference's golden loss block, the modes and the order of the two steps, and a few training steps
on tiny 16^3 batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage
from skimage import segmentation

from conftest import learnable_batch, prediction_inputs
from jaxseg.data.batches import Batch
from jaxseg.config_blocks import data_block
from jaxseg.methods import base, sassnet

PATCH = (16, 16, 16)


pytestmark = pytest.mark.usefixtures("fast_compile")


def _config(**method) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = data_block()
  c.method = sassnet.default_config()
  c.method.model.n_filters = 4
  c.method.discriminator.ndf = 4
  c.method.update(method)
  return c


def _batch(b_l: int = 2, b_u: int = 2, seed: int = 0) -> Batch:
  return learnable_batch(PATCH, b_l, b_u, seed)


def _init(config, batch, seed: int = 0) -> sassnet.State:
  return jax.jit(lambda key: sassnet.init(key, config, batch))(jax.random.key(seed))


@pytest.fixture(scope="module")
def batch():
  return _batch()


@pytest.fixture(scope="module")
def state(batch):
  state = _init(_config(), batch)
  # Give the segmenter non-trivial BN running statistics (as after some training), so that eval
  # mode (running statistics) and train mode (batch statistics) differ clearly.
  stats = jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.3 if path[-1].key == "mean" else a * 2.0, state.seg.batch_stats)
  # A discriminator that reads the SDM (at init its logits hardly depend on it): a stronger stem.
  disc_params = dict(state.disc.params)
  disc_params["conv0"] = {k: 20.0 * v for k, v in disc_params["conv0"].items()}
  return state.replace(seg=state.seg.replace(batch_stats=stats),
                       disc=state.disc.replace(params=disc_params))


@pytest.fixture(scope="module")
def step_keys():
  rng = jax.random.key(7)
  return rng, *jax.random.split(rng)  # train_step's (rng, segmenter key, discriminator key)


@pytest.fixture(scope="module")
def generator_result(state, batch, step_keys):
  return jax.jit(sassnet.generator_step, static_argnums=4)(state.seg, state.disc, batch,
                                                           step_keys[1], state.hparams)


@pytest.fixture(scope="module")
def jit_train_step():
  return jax.jit(sassnet.train_step)


@pytest.fixture(scope="module")
def train_result(state, batch, step_keys, jit_train_step):
  return jit_train_step(state, batch, step_keys[0])


# ------------------------------------------------------------------------------------------------
# NumPy transcriptions (docs/methods/sassnet.md; the SDF: docs/methods/dtc.md).


def _ce(logits, targets):
  """PyTorch F.cross_entropy(logits (B, 2), targets (B,)), mean."""
  logits = np.asarray(logits, np.float64)
  log_softmax = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
  return -np.mean(log_softmax[np.arange(len(targets)), targets])


def _compute_sdf(labels):
  """`compute_sdf` of DTC / SASSnet code/utils/util.py (scipy EDT, skimage inner boundary)."""
  out = np.zeros(labels.shape)
  for b, mask in enumerate(labels.astype(bool)):
    if mask.any():
      pos, neg = ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask)
      sdf = ((neg - neg.min()) / (neg.max() - neg.min())
             - (pos - pos.min()) / (pos.max() - pos.min()))
      sdf[segmentation.find_boundaries(mask, mode="inner")] = 0
      out[b] = sdf
  return out


def _dice_sq(p, y):
  return 1 - (2 * np.sum(p * y) + 1e-5) / (np.sum(p * p) + np.sum(y * y) + 1e-5)


def _sigmoid(x):
  return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def _weight(step, beta_max=0.01, rampup=40, block=150):
  return beta_max * np.exp(-5 * (1 - min(step // block, rampup) / rampup) ** 2)


def test_discriminator_losses_equal_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 2)).astype(np.float32)
  targets = sassnet.discriminator_targets(2, 3)
  np.testing.assert_array_equal(targets, [1, 1, 0, 0, 0])
  # D: labeled = class 1, unlabeled = class 0; the segmenter's surrogate: class 1 for unlabeled.
  np.testing.assert_allclose(sassnet.discriminator_loss(jnp.asarray(logits), targets),
                             _ce(logits, [1, 1, 0, 0, 0]), rtol=1e-6)
  np.testing.assert_allclose(sassnet.adversarial_loss(jnp.asarray(logits[2:])),
                             _ce(logits[2:], [1, 1, 1]), rtol=1e-6)
  assert _ce(logits[2:], [1, 1, 1]) != pytest.approx(_ce(logits[2:], [0, 0, 0]))
  # Accuracy: argmax per sample; a tie is class 0.
  d = jnp.array([[0.0, 1.0], [2.0, 1.0], [1.0, 0.0], [0.0, 3.0], [0.5, 0.5]])
  assert float(sassnet.discriminator_accuracy(d, targets)) == pytest.approx(3 / 5)


def test_adversarial_weight_is_the_reference_ramp():
  hp = sassnet.apply_preset(sassnet.default_config())
  assert (hp.beta, hp.beta_max, hp.consistency_rampup, hp.rampup_block) == (0.3, 0.01, 40, 150)
  weights = jax.jit(jax.vmap(lambda t: sassnet.adversarial_weight(t, hp)))(
      jnp.array([0, 149, 150, 1234, 5999, 6000, 9000]))
  np.testing.assert_allclose(weights, [_weight(t) for t in (0, 149, 150, 1234, 5999, 6000, 9000)],
                             rtol=1e-6)
  assert float(weights[0]) == pytest.approx(0.01 * np.exp(-5), rel=1e-6)  # float32
  assert float(weights[-1]) == pytest.approx(0.01, rel=1e-6)


def test_generator_loss_equals_reference_loss_block(golden):
  """The supervised part is the released loss block (lines shared by DTC's train_la_dtc.py and
  SASSnet's train_gan_sdfloss.py: dice_sq + 0.3·mse(z, compute_sdf(y))); w(t) = 0.01·ramp."""
  g = golden("dtc_train_loss_block__default")
  hp = sassnet.apply_preset(sassnet.default_config())
  d_logits = np.random.default_rng(1).normal(size=(2, 2))
  with jax.enable_x64(True):
    outputs = {"sdf": jnp.asarray(g["in_outputs_tanh"]), "seg": jnp.asarray(g["in_outputs_logit"])}
    labels = jnp.asarray(g["in_label"][:2].astype(np.int32))
    for i, step in enumerate(g["in_iter_num"]):
      total, terms = sassnet.generator_loss(outputs, labels, jnp.asarray(d_logits),
                                            jnp.asarray(step), hp)
      weight = 0.01 * g["out_consistency_weight"][i]
      np.testing.assert_allclose(terms["adversarial_weight"], weight, rtol=1e-10)
      np.testing.assert_allclose(terms["loss_adversarial"], _ce(d_logits, [1, 1]), rtol=1e-10)
      np.testing.assert_allclose(terms["loss_dice"], g["out_loss_seg_dice"], rtol=1e-10)
      # T(y) is computed on the device; the reference's gt_dis is float32.
      np.testing.assert_allclose(terms["loss_lsf"], g["out_loss_sdf"], rtol=1e-6)
      np.testing.assert_allclose(total, g["out_supervised_loss"] + weight * _ce(d_logits, [1, 1]),
                                 rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# The two steps: which network each changes, and in which mode each network runs.


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                  strict=True))


def _all_changed(a, b) -> bool:
  return all(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                      strict=True))


def test_generator_objective_equals_written_out_loss(state, batch, step_keys, generator_result):
  """L_G from the segmenter's train-mode outputs (one forward of the whole batch, the same dropout
  key) and D in eval mode on the unlabeled (z, x), transcribed in NumPy."""
  _, metrics = generator_result
  images = jnp.concatenate([batch.labeled["image"], batch.unlabeled["image"]])
  outputs, _ = jax.jit(base.forward_train)(state.seg, state.seg.params, images, step_keys[1])
  z, s = np.asarray(outputs["sdf"][..., 0]), np.asarray(outputs["seg"][..., 0])
  d_eval = state.disc.apply_fn({"params": state.disc.params}, outputs["sdf"][2:], batch.unlabeled["image"],
                               train=False)
  y = batch.labeled["label"]
  loss_dice = _dice_sq(_sigmoid(s[:2]), y)
  loss_lsf = np.mean((z[:2] - _compute_sdf(y)) ** 2)
  adversarial = _ce(d_eval, [1, 1])
  weight = _weight(0)  # step 0
  tol = dict(rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["loss_dice"], loss_dice, **tol)
  np.testing.assert_allclose(metrics["loss_lsf"], loss_lsf, **tol)
  np.testing.assert_allclose(metrics["loss_adversarial"], adversarial, **tol)
  np.testing.assert_allclose(metrics["adversarial_weight"], weight, **tol)
  np.testing.assert_allclose(metrics["loss"], loss_dice + 0.3 * loss_lsf + weight * adversarial,
                             **tol)
  # D in train mode (dropout) would have given another adversarial loss.
  d_train = state.disc.apply_fn({"params": state.disc.params}, outputs["sdf"][2:], batch.unlabeled["image"],
                                train=True, rngs={"dropout": step_keys[2]})
  assert abs(_ce(d_train, [1, 1]) - adversarial) > 1e-4


def test_generator_step_changes_only_the_segmenter(state, generator_result, train_result):
  seg, _ = generator_result
  new, _ = train_result
  kernels = lambda t: [x for p, x in jax.tree_util.tree_leaves_with_path(t)
                       if p[-1].key == "kernel"]
  assert _all_changed(kernels(seg.params), kernels(state.seg.params))
  assert _all_changed(seg.batch_stats, state.seg.batch_stats)
  assert int(seg.step) == 1
  # The train step's segmenter is exactly the segmenter step's: the D step does not touch it.
  assert _leaves_equal((new.seg.params, new.seg.batch_stats, new.seg.opt_state),
                       (seg.params, seg.batch_stats, seg.opt_state))


def test_discriminator_step_changes_only_d_and_sees_the_updated_eval_segmenter(
    state, batch, step_keys, generator_result, train_result):
  seg, _ = generator_result
  new, metrics = train_result
  # D changes in the train step, and exactly by the D step on the updated segmenter: the segmenter
  # step's gradient never reaches D's parameters or Adam moments.
  disc, disc_metrics = jax.jit(sassnet.discriminator_step)(state.disc, seg, batch, step_keys[2])
  assert _all_changed(new.disc.params, state.disc.params)
  assert _leaves_equal((new.disc.params, new.disc.opt_state), (disc.params, disc.opt_state))
  assert int(new.disc.step) == 1
  np.testing.assert_allclose(metrics["loss_discriminator"], disc_metrics["loss_discriminator"])

  # L_D recomputed by hand: z of the UPDATED segmenter in EVAL mode, D in train mode (the key of
  # the D step), targets [1, 1, 0, 0].
  images = jnp.concatenate([batch.labeled["image"], batch.unlabeled["image"]])
  apply_d = lambda z, train: state.disc.apply_fn(
      {"params": state.disc.params}, z, images, train=train, rngs={"dropout": step_keys[2]})
  z_updated = jax.jit(base.forward_eval)(seg, images)["sdf"]
  logits = apply_d(z_updated, True)
  expected = _ce(logits, [1, 1, 0, 0])
  np.testing.assert_allclose(metrics["loss_discriminator"], expected, rtol=1e-5)
  accuracy = np.mean(np.argmax(np.asarray(logits), axis=1) == [1, 1, 0, 0])
  assert float(metrics["d_accuracy"]) == pytest.approx(accuracy)
  # Any other choice gives another loss: the pre-update segmenter, the train-mode segmenter (batch
  # statistics and dropout), D in eval mode.
  z_before = jax.jit(base.forward_eval)(state.seg, images)["sdf"]
  z_train, _ = jax.jit(base.forward_train)(seg, seg.params, images, step_keys[2])
  for other in (_ce(apply_d(z_before, True), [1, 1, 0, 0]),
                _ce(apply_d(z_train["sdf"], True), [1, 1, 0, 0]),
                _ce(apply_d(z_updated, False), [1, 1, 0, 0])):
    assert abs(other - expected) > 1e-5 * expected


# ------------------------------------------------------------------------------------------------
# Training, prediction, configuration.


def test_a_few_train_steps(state, batch, train_result, jit_train_step):
  step = jit_train_step
  current, metrics = train_result
  history = [{k: float(v) for k, v in metrics.items()}]
  for t in range(1, 4):
    current, metrics = step(current, batch, jax.random.key(t))
    history.append({k: float(v) for k, v in metrics.items()})
  assert set(history[0]) == {"loss", "loss_dice", "loss_lsf", "loss_adversarial",
                             "adversarial_weight", "loss_discriminator", "d_accuracy",
                             "learning_rate", "learning_rate_discriminator", "sdf_full_masks"}
  assert all(np.isfinite(v) for m in history for v in m.values())
  assert history[0]["learning_rate"] == pytest.approx(0.01)  # SGD 0.01, the LA schedule
  assert history[0]["learning_rate_discriminator"] == pytest.approx(1e-4)  # Adam, §8.5
  assert all(m["d_accuracy"] in (0, 0.25, 0.5, 0.75, 1) for m in history)
  assert all(m["sdf_full_masks"] == 0 for m in history)
  for key in ("loss", "loss_discriminator"):
    assert len({m[key] for m in history}) == 4, key
  assert int(current.seg.step) == int(current.disc.step) == 4
  assert _all_changed(current.disc.params, state.disc.params)


def test_predict_is_the_eval_mode_segmentation_head(state, batch):
  out = jax.jit(sassnet.predict)(state, prediction_inputs(batch.unlabeled["image"]))
  assert set(out) == {"model"} and out["model"].shape == (2, *PATCH, 1)
  probs = np.asarray(out["model"])
  assert probs.min() >= 0 and probs.max() <= 1
  logits = jax.jit(base.forward_eval)(state.seg, batch.unlabeled["image"])["seg"]
  np.testing.assert_allclose(probs, _sigmoid(logits), rtol=1e-5, atol=1e-7)


def test_default_config_and_optimisers(state):
  c = sassnet.default_config()
  assert c.model.to_dict() == dict(name="vnet_sdf", n_filters=16, dtype="float32")
  assert c.discriminator.to_dict() == dict(name="sassnet_discriminator", ndf=64, dtype="float32")
  d = c.discriminator_optimizer
  assert (d.name, d.learning_rate, d.beta1, d.beta2, d.eps, d.weight_decay, d.decay_every) == (
      "adam", 1e-4, 0.9, 0.99, 1e-8, 0.0, 0)
  o = c.optimizer
  assert (o.name, o.learning_rate, o.momentum, o.weight_decay, o.decay_every) == (
      "sgd", 0.01, 0.9, 1e-4, 2500)
  # D reads the SDM and a 1-channel image; no BN statistics.
  assert state.disc.params["conv0"]["kernel"].shape == (4, 4, 4, 1, 4)
  assert state.disc.params["conv1"]["kernel"].shape == (4, 4, 4, 1, 4)
  assert not state.disc.batch_stats


def test_config_errors(batch):
  key = jax.random.key(0)
  config = _config()
  config.data.num_classes = 3
  with pytest.raises(ValueError, match="data.num_classes"):
    sassnet.init(key, config, batch)
  with pytest.raises(ValueError, match="data.batch_unlabeled"):
    sassnet.init(key, _config(), _batch(b_u=0))
  with pytest.raises(ValueError, match="method.preset"):
    sassnet.init(key, _config(preset="both"), batch)
  with pytest.raises(ValueError, match="method.rampup_block"):
    sassnet.init(key, _config(rampup_block=0), batch)
  config = _config()
  config.method.model.name = "vnet"  # one head: no level set for D
  with pytest.raises(ValueError, match="method.model.name"):
    sassnet.init(key, config, batch)
