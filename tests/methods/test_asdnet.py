"""Tests of jaxseg.methods.asdnet (ASDNet, `paper` preset; docs/methods/asdnet.md).

The losses themselves (generalized Dice, sample attention, the masked pseudo-label GDL, their
stop-gradients) are tested against golden values and by hand in tests/test_asdnet_losses.py; here:
the two networks' shapes and parameter counts, which step changes which network, that D gets no
gradient from the S step, `predict`, the config errors, and one train step at step 3000 equal to
the step recomputed below from the written-out losses and Adam:

    S in train mode on concat(x_𝓛, x_𝓤), dropout key rng -> s, P̂ = softmax(s)
    D step: D (train mode) on one-hot y, then on sg P̂_𝓛, its BN statistics threaded;
      L_D = mean_v −log softmax(D(P))[1] + mean_v −log softmax(D(sg P̂_𝓛))[0];
      Adam, coupled weight decay 1e-4, lr 1e-4 × 0.1 (t = 3000 is past the boundary 2500)
    S step: the updated D (parameters constant, train mode, statistics continued) on P̂;
      L_S = mean_n (1 − dsc_n)^β·GDL_n(P̂_n, P_n) + λ₁·mean_v −log softmax(D(P̂))[1]
            + λ₂·GDL(P̂_𝓤 against one-hot argmax P̂_𝓤 on {M > γ}), M = softmax(sg D(P̂)_𝓤)[1];
      Adam, coupled weight decay 1e-4, lr 1e-3 × 0.1

with non-default β, λ₁, λ₂ and a γ that splits the unlabeled voxels, C = 3 classes (one absent
from one labeled sample), on 2D networks (both are dimension-agnostic; XLA:CPU compiles 2D
convolutions in seconds), in float64 (`written_out`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import written_out as wo
from conftest import (CONFIGS_DIR, jit_init, load_config_file, predict_probs, small_config,
                      two_stream_batch)
from jaxseg import optim
from jaxseg.data.base import DataError
from jaxseg.methods import adversarial, asdnet

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH = (16, 16)
C = 3
FEATURES = (4, 8, 8, 8)  # the confidence net's widths, small
HP = dict(beta=1.5, lambda_adv=0.2, lambda_semi=0.7)
S_LR, D_LR, WEIGHT_DECAY, BOUNDARIES = 1e-3, 1e-4, 1e-4, (2500, 5000)
BETAS, EPS = (0.9, 0.999), 1e-8


def _config(**method) -> ml_collections.ConfigDict:
  c = small_config(asdnet, num_classes=C, **{**HP, **method})
  c.data.patch_size = PATCH
  c.method.confidence.features = FEATURES
  return c


def _arrays(seed: int = 0):
  """3 labeled (classes 0, 1, 2; class 2 absent from the last) + 2 unlabeled, float64."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(5, *PATCH, 1))
  label = ((image[:3, ..., 0] > -0.2).astype(np.int32) + (image[:3, ..., 0] > 0.8))
  label[2] = np.minimum(label[2], 1)
  return image[:3], label.astype(np.int32), image[3:]


def _batch(dtype=np.float32):
  image_l, label_l, image_u = _arrays()
  return two_stream_batch(image_l.astype(dtype), label_l, image_u.astype(dtype))


# ------------------------------------------------------------------------------------------------
# Written-out losses (no jaxseg loss function used).


def _ce_to(logits, cls):
  """mean over batch and voxels of −log softmax(logits)[cls]."""
  return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[..., cls])


def _gdl(p, t, axes):
  """Eq. 1 with sums over `axes`: 1 − 2 Σ_c w_c Σ p t / Σ_c [w_c (Σ p + Σ t) + 2e-6],
  w_c = 1 / ((Σ t_c)² + 1e-6), 0 for a class absent from t."""
  t_sum = jnp.sum(t, axes)
  w = jnp.where(t_sum > 0, 1.0 / (t_sum ** 2 + 1e-6), 0.0)
  numerator = 2.0 * jnp.sum(w * jnp.sum(p * t, axes), -1)
  denominator = jnp.sum(w * (jnp.sum(p, axes) + t_sum) + 2e-6, -1)
  return 1.0 - numerator / denominator


def _hard_dice(predicted, labels):
  """Per sample, the mean over classes 1..C-1 of the Dice of integer maps (1 if absent in both)."""
  axes = tuple(range(1, labels.ndim))
  dice = []
  for c in range(1, C):
    a, b = predicted == c, labels == c
    size = jnp.sum(a, axes) + jnp.sum(b, axes)
    dice.append(jnp.where(size > 0, 2.0 * jnp.sum(a & b, axes) / jnp.maximum(size, 1), 1.0))
  return jnp.mean(jnp.stack(dice, -1), -1)


def _lr(base_lr, t):
  return base_lr * 0.1 ** sum(t >= b for b in BOUNDARIES)


def _expected_step(state, s_mu, s_nu, d_mu, d_nu, image_l, label_l, image_u, rng, gamma):
  seg, conf = state.seg, state.confidence
  images = jnp.concatenate([image_l, image_u])
  nl = label_l.shape[0]
  y = jax.nn.one_hot(label_l, C, dtype=images.dtype)

  def s_forward(params):
    out, updates = seg.apply_fn({"params": params, "batch_stats": seg.batch_stats}, images,
                                train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    return out, updates["batch_stats"]

  def d_forward(params, stats, maps):
    out, updates = conf.apply_fn({"params": params, "batch_stats": stats}, maps, train=True,
                                 mutable=["batch_stats"])
    return out, updates["batch_stats"]

  # D step.
  fakes = jax.nn.softmax(s_forward(seg.params)[0][:nl], axis=-1)

  def d_loss(params):
    d_real, stats = d_forward(params, conf.batch_stats, y)
    d_fake, stats = d_forward(params, stats, fakes)
    real, fake = _ce_to(d_real, 1), _ce_to(d_fake, 0)
    return real + fake, (real, fake, d_real, d_fake, stats)

  d_grads, (real, fake, d_real, d_fake, d_stats) = jax.grad(d_loss, has_aux=True)(conf.params)
  d_lr = _lr(D_LR, wo.LATE_STEP)
  d_params, _, _ = wo.adam(conf.params, d_grads, d_mu, d_nu, wo.LATE_STEP, d_lr, *BETAS, EPS,
                           weight_decay=WEIGHT_DECAY)

  # S step against the updated D.
  def s_loss(params):
    s, stats = s_forward(params)
    p = jax.nn.softmax(s, axis=-1)
    d, d_stats_after = d_forward(d_params, d_stats, p)
    dsc = _hard_dice(jnp.argmax(s[:nl], -1), label_l)
    att = jnp.mean((1.0 - dsc) ** HP["beta"] * _gdl(p[:nl], y, (1, 2)))
    adv = _ce_to(d, 1)
    m = jax.nn.softmax(jax.lax.stop_gradient(d[nl:]), axis=-1)[..., 1]
    selected = (m > gamma).astype(p.dtype)[..., None]
    p_u = p[nl:]
    pseudo = jax.lax.stop_gradient(jax.nn.one_hot(jnp.argmax(p_u, -1), C, dtype=p.dtype))
    semi = _gdl(selected * p_u, selected * pseudo, (0, 1, 2))
    loss = att + HP["lambda_adv"] * adv + HP["lambda_semi"] * semi
    terms = dict(loss=loss, loss_att_dice=att, loss_adversarial=adv, loss_semi=semi,
                 sample_dice=jnp.mean(dsc), mask_fraction=jnp.mean(selected))
    return loss, (terms, stats, d_stats_after, m)

  grads, (terms, s_stats, d_stats_after, m) = jax.grad(s_loss, has_aux=True)(seg.params)
  s_lr = _lr(S_LR, wo.LATE_STEP)
  params, _, _ = wo.adam(seg.params, grads, s_mu, s_nu, wo.LATE_STEP, s_lr, *BETAS, EPS,
                         weight_decay=WEIGHT_DECAY)
  metrics = dict(terms, loss_confidence=real + fake, loss_confidence_real=real,
                 loss_confidence_fake=fake,
                 d_real=jnp.mean(jax.nn.softmax(d_real, -1)[..., 1]),
                 d_fake=jnp.mean(jax.nn.softmax(d_fake, -1)[..., 1]),
                 learning_rate=s_lr, learning_rate_confidence=d_lr)
  return params, s_stats, d_params, d_stats_after, metrics, m


@pytest.fixture(scope="module")
def late_run():
  with jax.enable_x64(True):
    image_l, label_l, image_u = _arrays()
    batch = two_stream_batch(image_l, label_l, image_u)
    config = _config()
    state = wo.to_float64(jit_init(asdnet, config, batch))
    seg, seg_buffers = wo.at_step(state.seg, wo.LATE_STEP, seed=1)
    seg = seg.replace(batch_stats=jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 if path[-1].key == "mean" else a * 2.0, seg.batch_stats))
    conf, conf_buffers = wo.at_step(state.confidence, wo.LATE_STEP, seed=2, scale=1e-3)
    state = state.replace(seg=seg, confidence=conf)
    rng = jax.random.key(5)
    expected_fn = jax.jit(_expected_step)
    args = (seg_buffers["mu"], seg_buffers["nu"], conf_buffers["mu"], conf_buffers["nu"],
            image_l, label_l, image_u, rng)
    # γ between two quantiles of M (M does not depend on γ): part of the unlabeled voxels selected.
    m = np.sort(np.asarray(expected_fn(state, *args, 0.5)[-1]).ravel())
    k = int(0.4 * m.size)
    gamma = float(0.5 * (m[k] + m[k + 1]))
    expected = expected_fn(state, *args, gamma)  # the same compilation: state has the same tree
    config.method.gamma = gamma
    state = state.replace(hparams=asdnet.apply_preset(config.method))
    new, metrics = jax.jit(asdnet.train_step)(state, batch, rng)
    probs = predict_probs(asdnet, new, image_u)
    logits = new.seg.apply_fn({"params": new.seg.params, "batch_stats": new.seg.batch_stats},
                              image_u, train=False)
    softmax = np.asarray(jax.nn.softmax(logits, axis=-1))  # under x64, in float64
  return state, new, metrics, expected, probs, softmax, gamma


def test_train_step_at_step_3000_equals_the_written_out_step(late_run):
  state, new, metrics, (params, s_stats, d_params, d_stats, expected_metrics, _), _, _, gamma = (
      late_run)
  assert int(new.seg.step) == int(new.confidence.step) == wo.LATE_STEP + 1
  assert 0 < gamma < 1 and gamma != 0.5
  wo.assert_updates_close(state.seg.params, new.seg.params, params, rtol=1e-10,
                          what="segmenter params")
  wo.assert_trees_close(new.seg.batch_stats, s_stats, rtol=1e-10, what="segmenter batch_stats")
  wo.assert_updates_close(state.confidence.params, new.confidence.params, d_params, rtol=1e-10,
                          what="confidence params")
  wo.assert_trees_close(new.confidence.batch_stats, d_stats, rtol=1e-10,
                        what="confidence batch_stats")
  wo.assert_metrics_equal(metrics, expected_metrics, rtol=1e-6)
  # Non-trivial: the rates decayed once, part of the voxels selected, every term weighs.
  assert float(metrics["learning_rate"]) == pytest.approx(1e-4)
  assert float(metrics["learning_rate_confidence"]) == pytest.approx(1e-5)
  assert 0.3 < float(metrics["mask_fraction"]) < 0.9
  for key in ("loss_att_dice", "loss_adversarial", "loss_semi"):
    assert float(metrics[key]) > 1e-3, key
  assert 0 < float(metrics["sample_dice"]) < 1


def test_predict_is_the_softmax_of_the_eval_mode_segmenter(late_run):
  _, _, _, _, probs, softmax, _ = late_run
  assert set(probs) == {"model"} and probs["model"].shape == (2, *PATCH, C)
  assert probs["model"].dtype == np.float64
  np.testing.assert_allclose(probs["model"], softmax, rtol=1e-12)
  np.testing.assert_allclose(np.sum(np.asarray(probs["model"]), -1), 1.0, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Networks, the two steps, gradients (float32, step 0).


def _svnet_params(d, n, c_in, classes):
  """svnet's parameters from its layer table (docs/networks.md): k^d·i·o + o (+ 2o BatchNorm)."""
  def conv(k, i, o, bn=True):
    return k ** d * i * o + o + (2 * o if bn else 0)
  return (conv(3, c_in, n) + conv(2, n, 2 * n) + 2 * conv(3, 2 * n, 2 * n)  # block one, two
          + conv(2, 2 * n, 4 * n) + 3 * conv(3, 4 * n, 4 * n)  # block three
          + conv(2, 4 * n, 8 * n) + 3 * conv(3, 8 * n, 8 * n)  # block four (the bottleneck)
          + 3 * conv(3, 8 * n, 8 * n)  # block six
          + conv(2, 8 * n, 4 * n) + 3 * conv(3, 4 * n, 4 * n)  # Up, block seven
          + conv(2, 4 * n, 2 * n) + 2 * conv(3, 2 * n, 2 * n)  # Up, block eight
          + conv(2, 2 * n, n) + conv(3, n, n)  # Up, block nine
          + conv(1, n, classes, bn=False))  # head


def _confidence_params(d, c_in, f):
  """The confidence net's parameters (docs/networks.md): conv1 3^d, conv2-4 4^d stride 2, three
  up units (4^d transposed conv + BatchNorm), convX 1^d."""
  conv = lambda k, i, o, bn=False: k ** d * i * o + o + (2 * o if bn else 0)
  return (conv(3, c_in, f[0]) + conv(4, f[0], f[1]) + conv(4, f[1], f[2]) + conv(4, f[2], f[3])
          + conv(4, f[3], f[2], True) + conv(4, f[2], f[1], True) + conv(4, f[1], f[0], True)
          + conv(1, f[0], 2))


def _count(tree) -> int:
  return sum(int(np.size(a)) for a in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def batch():
  return _batch()


@pytest.fixture(scope="module")
def state(batch):
  return jit_init(asdnet, _config(gamma=0.45), batch)


@pytest.fixture(scope="module")
def rng():
  return jax.random.key(7)


@pytest.fixture(scope="module")
def d_step(state, batch, rng):
  return jax.jit(asdnet.confidence_step)(state.confidence, state.seg, batch, rng)


@pytest.fixture(scope="module")
def train_result(state, batch, rng):
  return jax.jit(asdnet.train_step)(state, batch, rng)


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                  strict=True))


def test_init_shapes_and_parameter_counts(state):
  # The arithmetic reproduces the full-size counts of docs/networks.md ...
  assert _svnet_params(3, 16, 1, 2) == 3_612_706
  assert _confidence_params(3, 2, (32, 64, 128, 256)) == 5_507_970
  # ... and the tiny 2D networks built here.
  assert _count(state.seg.params) == _svnet_params(2, 4, 1, C)
  assert _count(state.confidence.params) == _confidence_params(2, C, FEATURES)
  assert state.seg.params["head_seg"]["kernel"].shape == (1, 1, 4, C)
  assert state.confidence.params["conv1"]["kernel"].shape == (3, 3, C, FEATURES[0])
  assert state.seg.batch_stats and state.confidence.batch_stats
  assert int(state.seg.step) == int(state.confidence.step) == 0
  assert float(optim.learning_rate(state.seg)) == pytest.approx(1e-3)
  assert float(optim.learning_rate(state.confidence)) == pytest.approx(1e-4)
  assert state.hparams.to_dict() == dict(
      preset="paper", gamma=0.45, **HP, sub_batches=3, labeled_probability=0.5,
      aux_weights=(0.4, 0.2), fix_dice_backward=False)
  assert float(state.validation_dice) == 0.0


def test_the_d_step_leaves_s_unchanged(state, batch, rng, d_step, train_result):
  """The train step's S is exactly the S step from the ORIGINAL S (parameters, Adam state, BN
  statistics) against the D step's D: nothing in the D step moved S."""
  new, _ = train_result
  conf, _ = d_step
  seg, _, _ = jax.jit(asdnet.segmenter_step, static_argnums=4)(state.seg, conf, batch, rng,
                                                               state.hparams)
  assert _leaves_equal((new.seg.params, new.seg.opt_state, new.seg.batch_stats),
                       (seg.params, seg.opt_state, seg.batch_stats))
  assert not _leaves_equal(new.seg.params, state.seg.params)
  assert not _leaves_equal(new.seg.batch_stats, state.seg.batch_stats)


def test_the_s_step_leaves_d_parameters_unchanged(state, batch, rng, d_step, train_result):
  """D's parameters and Adam state after the train step are the D step's; only its BN running
  statistics move again in the S step (its train-mode call)."""
  new, metrics = train_result
  conf, d_metrics = d_step
  assert not _leaves_equal(conf.params, state.confidence.params)
  assert _leaves_equal((new.confidence.params, new.confidence.opt_state),
                       (conf.params, conf.opt_state))
  assert int(new.confidence.step) == 1
  assert not _leaves_equal(new.confidence.batch_stats, conf.batch_stats)
  for key, value in d_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6, err_msg=key)


def test_d_gets_no_gradient_from_the_s_objective(state, batch, rng, d_step):
  """The S objective against the frozen D (as `adversarial.segmenter_step` builds it) has zero
  gradient with respect to D's parameters; unfrozen, it would have one."""
  conf, _ = d_step

  def s_objective(d_params, freeze):
    d = conf.replace(params=d_params)
    d = adversarial.frozen(d) if freeze else d
    return asdnet.segmenter_objective(state.seg.params, state.seg, d, batch, rng,
                                      state.hparams)[0]

  grad = jax.jit(jax.grad(s_objective), static_argnums=1)
  frozen = grad(conf.params, True)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(frozen))
  free = grad(conf.params, False)
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(free))


def test_a_few_train_steps(state, batch, train_result):
  step = jax.jit(asdnet.train_step)
  current, metrics = train_result
  history = [{k: float(v) for k, v in metrics.items()}]
  for t in range(1, 3):
    current, metrics = step(current, batch, jax.random.key(t))
    history.append({k: float(v) for k, v in metrics.items()})
  assert set(history[0]) == {
      "loss", "loss_att_dice", "loss_adversarial", "loss_semi", "sample_dice", "mask_fraction",
      "loss_confidence", "loss_confidence_real", "loss_confidence_fake", "d_real", "d_fake",
      "learning_rate", "learning_rate_confidence"}
  assert all(np.isfinite(v) for m in history for v in m.values())
  assert len({m["loss"] for m in history}) == 3 and len({m["loss_confidence"] for m in history}) == 3
  assert int(current.seg.step) == int(current.confidence.step) == 3


# ------------------------------------------------------------------------------------------------
# Loss pieces without networks.


def test_confidence_and_adversarial_terms_on_known_logits():
  d = jnp.zeros((2, 8, 8, 2))  # M = 0.5 everywhere: every CE is log 2
  loss, terms = asdnet.confidence_loss(d, d)
  assert float(loss) == pytest.approx(2 * np.log(2), rel=1e-5) and float(terms["d_real"]) == 0.5
  d = jnp.stack([jnp.zeros((8, 8)), jnp.full((8, 8), 3.0)], -1)[None]  # M = σ(3)
  assert float(asdnet.real_loss(d)) == pytest.approx(np.log1p(np.exp(-3.0)), rel=1e-6)
  assert float(asdnet.fake_loss(d)) == pytest.approx(np.log1p(np.exp(3.0)), rel=1e-6)
  np.testing.assert_allclose(asdnet.confidence_map(d), 1 / (1 + np.exp(-3.0)), rtol=1e-6)


def test_semi_term_is_zero_when_d_trusts_no_voxel():
  hp = asdnet.apply_preset(_config().method)
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 8, 8, C)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, C, size=(1, 8, 8)), jnp.int32)
  d = jnp.stack([jnp.ones((3, 8, 8)), jnp.zeros((3, 8, 8))], -1)  # M = σ(−1) < 0.5 = γ
  total, terms = asdnet.segmenter_loss(logits, labels, d, hp)
  assert float(terms["loss_semi"]) == 0.0 and float(terms["mask_fraction"]) == 0.0
  assert float(total) == pytest.approx(float(terms["loss_att_dice"])
                                       + HP["lambda_adv"] * float(terms["loss_adversarial"]))


# ------------------------------------------------------------------------------------------------
# Configuration.


def test_default_config_is_the_paper():
  c = asdnet.default_config()
  assert (c.preset, c.beta, c.lambda_adv, c.lambda_semi, c.gamma) == ("paper", 2.0, 0.03, 0.3, 0.5)
  # The released preset's own keys (read only by it).
  assert (c.sub_batches, c.labeled_probability, tuple(c.aux_weights),
          c.released_fix_dice_backward) == (3, 0.5, (0.4, 0.2), False)
  assert c.model.to_dict() == dict(name="svnet", n_filters=16, dtype="float32")
  assert c.confidence.to_dict() == dict(name="asdnet_confidence", features=(32, 64, 128, 256),
                                        decoder="repaired", dtype="float32")
  for key, lr in (("optimizer", 1e-3), ("confidence_optimizer", 1e-4)):
    o = c[key]
    assert (o.name, o.learning_rate, o.weight_decay, o.beta1, o.beta2, o.eps) == (
        "adam", lr, 1e-4, 0.9, 0.999, 1e-8)
    assert (o.schedule, tuple(o.decay_boundaries), o.decay_factor) == ("step", (2500, 5000), 0.1)


@pytest.mark.parametrize("changes, key", [
    (dict(preset="both"), "method.preset"),
    (dict(sub_batches=0), "method.sub_batches"),
    (dict(labeled_probability=1.5), "method.labeled_probability"),
    (dict(aux_weights=(0.4,)), "method.aux_weights"),
    (dict(aux_weights=(0.4, -0.2)), "method.aux_weights"),
    (dict(beta=-1.0), "method.beta"),
    (dict(lambda_adv=-0.1), "method.lambda_adv"),
    (dict(lambda_semi=-0.3), "method.lambda_semi"),
    (dict(gamma=1.5), "method.gamma"),
    (dict(gamma=-0.1), "method.gamma"),
])
def test_config_errors_name_the_key(changes, key):
  with pytest.raises(DataError, match=key):
    asdnet.check_config(_config(**changes))


def test_config_errors_of_the_data_and_networks(batch):
  for change, key in ((("num_classes", 1), "data.num_classes"),
                      (("batch_unlabeled", 0), "data.batch_unlabeled"),
                      (("patch_size", (16, 20)), "data.patch_size")):
    config = _config()
    config.data[change[0]] = change[1]
    with pytest.raises(DataError, match=key):
      asdnet.check_config(config)
  config = _config()
  config.method.confidence.decoder = "rewired"
  with pytest.raises(DataError, match="method.confidence.decoder"):
    asdnet.check_config(config)
  # Any number of classes; only the sizes and the unlabeled stream are required.
  config = _config()
  config.data.num_classes = 6
  asdnet.check_config(config)
  config = _config()
  config.method.model.name = "vnet_sdf"  # two heads: not one C-class output
  with pytest.raises(DataError, match="method.model.name"):
    asdnet.init(jax.random.key(0), config, batch)


@pytest.mark.parametrize("preset", ["", "la8", "la16"])
def test_the_shipped_presets_pass_the_method_checks(preset):
  config = load_config_file(CONFIGS_DIR / "asdnet.py").get_config(preset)
  asdnet.check_config(config)
  assert config.method.preset == "paper"
