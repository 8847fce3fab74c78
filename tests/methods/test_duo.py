"""Tests of jaxseg.methods.duo (Duo-SegNet, docs/methods/duo.md) on tiny 2D and 3D batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import learnable_batch, prediction_inputs
from jaxseg.data.batches import Batch
from jaxseg.config_blocks import data_block
from jaxseg.methods import duo

PATCH_2D = (32, 32)


def _config(preset: str = "paper", **method) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = data_block()
  c.data.labeled_groups = 2
  c.method = duo.default_config()
  c.method.preset = preset
  c.method.model.features = (4, 8)
  c.method.critic.ndf = 8
  c.method.update(method)
  return c


def _batch(patch=PATCH_2D, b_l: int = 2, b_u: int = 2, seed: int = 0) -> Batch:
  return learnable_batch(patch, b_l, b_u, seed)


def _init(config, batch, seed: int = 0) -> duo.State:
  return jax.jit(lambda key: duo.init(key, config, batch))(jax.random.key(seed))


@pytest.fixture(scope="module")
def batch2d():
  return _batch()


@pytest.fixture(scope="module")
def state2d(batch2d):
  return _init(_config(), batch2d)


@pytest.fixture(scope="module")
def jit_train_step():
  return jax.jit(duo.train_step)


# ------------------------------------------------------------------------------------------------
# Losses against NumPy transcriptions of docs/methods/duo.md (one step, presets).


def _bce(p, y):
  """PyTorch BCELoss (mean) with its log clamp at -100."""
  with np.errstate(divide="ignore"):
    return -np.mean(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log(1 - p), -100))


def _dice_lin(p, y):
  return 1 - (2 * np.sum(p * y) + 1e-5) / (np.sum(p) + np.sum(y) + 1e-5)


def test_losses_equal_numpy_formulas():
  rng = np.random.default_rng(0)
  p = [rng.uniform(0.01, 0.99, (2, 3, 3, 1)) for _ in range(2)]
  p[0][0, 0, 0, 0] = 0.0  # clamp: log 0 -> -100
  y = [(rng.uniform(size=(2, 3, 3, 1)) > 0.5).astype(np.float64) for _ in range(2)]
  y[0][0, 0, 0, 0] = 1.0
  u = [rng.uniform(0.01, 0.99, (3, 3, 3, 1)) for _ in range(2)]
  d_l, d_u, d_r = ([rng.uniform(0.01, 0.99, (2, 3, 3, 1)) for _ in range(2)] for _ in range(3))
  f32 = lambda xs: [jnp.asarray(x, jnp.float32) for x in xs]
  tol = dict(rtol=1e-5, atol=1e-5)

  # L_s, with and without the linear Dice.
  expected = _bce(p[0], y[0]) + _bce(p[1], y[1])
  assert expected > 100 / p[0].size  # the clamped pixel alone contributes 100 / n
  np.testing.assert_allclose(duo.supervised_loss(f32(p), f32(y)), expected, **tol)
  np.testing.assert_allclose(duo.supervised_loss(f32(p), f32(y), w_dice=0.7),
                             expected + 0.7 * (_dice_lin(p[0], y[0]) + _dice_lin(p[1], y[1])),
                             **tol)
  # L_u, and its gradient flows into each argument only as the prediction (the target is sg).
  np.testing.assert_allclose(duo.unlabeled_loss(*f32(u)), _bce(u[0], u[1]) + _bce(u[1], u[0]),
                             **tol)
  g1 = jax.grad(duo.unlabeled_loss)(*f32(u))
  n = u[0].size
  np.testing.assert_allclose(g1, (u[0] - u[1]) / (u[0] * (1 - u[0])) / n, rtol=1e-4)
  # L_c (segmenters): η·bce(D(p^i), 1) + bce(D(u_i), 1).
  np.testing.assert_allclose(
      duo.segmenter_adversarial_loss(f32(d_l), f32(d_u), eta=0.5),
      sum(0.5 * _bce(d_l[i], 1.0) + _bce(d_u[i], 1.0) for i in range(2)), **tol)
  # L_adv1 (critic): (1 − η)·bce(D(Y^i), 1) + η·bce(D(sg p^i), 0).
  np.testing.assert_allclose(
      duo.critic_loss(f32(d_r), f32(d_l), real_weight=0.25, fake_weight=0.75),
      sum(0.25 * _bce(d_r[i], 1.0) + 0.75 * _bce(d_l[i], 0.0) for i in range(2)), **tol)
  hp = duo.apply_preset(duo.default_config())
  np.testing.assert_allclose(duo.segmenter_loss(1.0, 2.0, 3.0, hp), 0.5 + 0.8 + 0.6, **tol)


def test_presets_give_the_effective_weights():
  paper = duo.apply_preset(duo.default_config())
  assert dict(paper) == dict(preset="paper", k_s=1, k_c=1, separate_bn_calls=False, lambda_s=0.5,
                             lambda_u=0.4, lambda_c=0.2, w_dice=0.0, eta_segmenter=0.5,
                             critic_real=0.5, critic_fake=0.5)
  cfg = duo.default_config()
  cfg.update(preset="released", lambda_u=0.9, w_dice=1.0, eta=0.3)  # ignored by `released`
  released = duo.apply_preset(cfg)
  assert dict(released) == dict(preset="released", k_s=1, k_c=1, separate_bn_calls=False,
                                lambda_s=0.5, lambda_u=0.0, lambda_c=0.2, w_dice=0.0,
                                eta_segmenter=0.0, critic_real=1.0, critic_fake=1.0)
  for key, value in (("preset", "code"), ("k_s", 0), ("k_c", 1.5)):
    bad = duo.default_config().to_dict()
    bad[key] = value
    with pytest.raises(ValueError, match=f"method.{key}"):
      duo.apply_preset(ml_collections.ConfigDict(bad))


# ------------------------------------------------------------------------------------------------
# Gradients against the written-out objectives (docs/methods/duo.md, presets).


def _bce_jnp(p, y):
  return -jnp.mean(y * jnp.maximum(jnp.log(p), -100) + (1 - y) * jnp.maximum(jnp.log(1 - p), -100))


def _written_out_objective(state: duo.State, batch: Batch, preset: str):
  """The segmenters' loss written out from docs/methods/duo.md (`paper`; `released`: the released
  code's effective gradients)."""
  unet_apply, critic = state.seg["f1"].apply_fn, state.critic
  half = batch.labeled["image"].shape[0] // 2
  y = jnp.asarray(batch.labeled["label"], jnp.float32)[..., None]
  xs, ys = (batch.labeled["image"][:half], batch.labeled["image"][half:]), (y[:half], y[half:])

  def segment(params, view, x):  # train mode, one call on concat(X^i, U)
    variables = {"params": params[view], "batch_stats": state.seg.batch_stats[view]}
    logits, _ = unet_apply(variables, jnp.concatenate([x, batch.unlabeled["image"]]), train=True,
                           mutable=["batch_stats"])
    p = jax.nn.sigmoid(logits)
    return p[:half], p[half:]

  def d(m):  # critic in train mode, one call per map
    variables = {"params": critic.params, "batch_stats": critic.batch_stats}
    return jax.nn.sigmoid(critic.apply_fn(variables, m, train=True, mutable=["batch_stats"])[0])

  def loss(params):
    (p1, u1), (p2, u2) = segment(params, "f1", xs[0]), segment(params, "f2", xs[1])
    bce_s = _bce_jnp(p1, ys[0]) + _bce_jnp(p2, ys[1])
    adv_u = _bce_jnp(d(u1), 1.0) + _bce_jnp(d(u2), 1.0)
    if preset == "released":
      return 0.5 * bce_s + 0.2 * adv_u
    sg = jax.lax.stop_gradient
    l_u = _bce_jnp(u1, sg(u2)) + _bce_jnp(u2, sg(u1))
    adv_l = _bce_jnp(d(p1), 1.0) + _bce_jnp(d(p2), 1.0)
    return 0.5 * bce_s + 0.4 * l_u + 0.2 * (0.5 * adv_l + adv_u)

  return loss


@pytest.mark.parametrize("preset", ["paper", "released"])
def test_segmenter_gradient_equals_written_out_loss(preset, batch2d):
  state = _init(_config(preset), batch2d)
  # Non-trivial critic BN running statistics: the train-mode critic must not read them.
  state = state.replace(critic=state.critic.replace(batch_stats=jax.tree.map(
      lambda a: a + 3.0, state.critic.batch_stats)))

  @jax.jit
  def grads(state, batch):
    ours = jax.grad(duo.segmenter_objective, has_aux=True)(
        state.seg.params, state.seg, state.critic, batch, jax.random.key(0), state.hparams)[0]
    return ours, jax.grad(_written_out_objective(state, batch, preset))(state.seg.params)

  ours, expected = grads(state, batch2d)
  norm = lambda t: float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(t))))
  assert norm(expected) > 0
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * norm(expected))
  # Both segmenters get a gradient.
  assert norm(ours["f1"]) > 0 and norm(ours["f2"]) > 0


# ------------------------------------------------------------------------------------------------
# Steps and training.


def _changed(a, b) -> list[bool]:
  return [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


def _kernels_changed(a, b) -> list[bool]:
  """Per conv kernel of both segmenters (biases before a BN have zero gradient)."""
  kernels = lambda t: [x for path, x in jax.tree_util.tree_leaves_with_path(t)
                       if path[-1].key == "kernel"]
  return _changed(kernels(a), kernels(b))


def test_each_step_changes_only_its_networks(state2d, batch2d, jit_train_step):
  hp = state2d.hparams
  seg, critic, aux = jax.jit(duo.segmenter_step, static_argnums=4)(
      state2d.seg, state2d.critic, batch2d, jax.random.key(1), hp)
  assert all(_kernels_changed(seg.params, state2d.seg.params))
  assert all(_changed(seg.batch_stats, state2d.seg.batch_stats))
  assert not any(_changed(critic.params, state2d.critic.params))
  assert not any(_changed(critic.opt_state, state2d.critic.opt_state))
  # The reference's critic is in train mode during the segmenter step: its running stats move.
  assert all(_changed(critic.batch_stats, state2d.critic.batch_stats))

  # The critic step sees the labeled predictions and masks only (no unlabeled maps), and touches
  # only the critic: the full train step's segmenters equal the segmenter step's.
  _, labels = duo.split_views(batch2d)
  assert [p.shape[0] for p in aux["probs"]] == [1, 1]
  critic2, _ = jax.jit(duo.critic_step, static_argnums=3)(critic, aux["probs"], labels, hp)
  assert all(_changed(critic2.params, critic.params))
  new, _ = jit_train_step(state2d, batch2d, jax.random.key(1))
  for a, b in zip(jax.tree.leaves((seg, critic2)), jax.tree.leaves((new.seg, new.critic))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Unlabeled samples carry no label: the batch has no field for one.
  assert "label" not in batch2d.unlabeled


def test_training_decreases_supervised_loss(state2d, batch2d, jit_train_step):
  state, history = state2d, []
  for t in range(20):
    state, metrics = jit_train_step(state, batch2d, jax.random.key(t))
    history.append({k: float(v) for k, v in metrics.items()})
  assert set(history[0]) == {"loss_s", "loss_u", "loss_c", "loss_total", "loss_critic", "d_real",
                             "d_fake", "d_unlabeled", "learning_rate", "learning_rate_critic"}
  assert history[0]["learning_rate"] == pytest.approx(1e-2)  # SGD 1e-2, the reference's
  assert history[0]["learning_rate_critic"] == pytest.approx(5e-5)  # RMSprop
  assert all(np.isfinite(v) for m in history for v in m.values())
  assert all(0 <= m[k] <= 1 for m in history for k in ("d_real", "d_fake", "d_unlabeled"))
  losses_s = [m["loss_s"] for m in history]
  assert losses_s[-1] < 0.92 * losses_s[0] and np.all(np.diff(losses_s[:10]) < 0), losses_s
  assert all(_kernels_changed(state.seg.params, state2d.seg.params))
  assert all(_changed(state.critic.params, state2d.critic.params))


def test_predict_returns_both_views(state2d, batch2d):
  out = jax.jit(duo.predict)(state2d, prediction_inputs(batch2d.unlabeled["image"]))
  assert set(out) == {"f1", "f2"}
  for probs in out.values():
    assert probs.shape == (2, *PATCH_2D, 1)
    assert float(probs.min()) >= 0 and float(probs.max()) <= 1
  assert not np.allclose(out["f1"], out["f2"])  # independent initialisations


def test_3d_step_and_predict():
  batch = _batch(patch=(8, 8, 8), b_u=1)
  config = _config()
  config.method.model.features = (4,)  # one level: XLA CPU compiles 3D conv gradients slowly
  state = _init(config, batch)
  assert state.critic.params["conv_0"]["kernel"].shape == (1, 1, 1, 1, 8)
  new, metrics = jax.jit(duo.train_step)(state, batch, jax.random.key(0))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert all(_kernels_changed(new.seg.params, state.seg.params))
  out = jax.jit(duo.predict)(new, prediction_inputs(batch.labeled["image"]))
  assert {k: v.shape for k, v in out.items()} == {"f1": (2, 8, 8, 8, 1), "f2": (2, 8, 8, 8, 1)}


def test_config_errors(batch2d):
  key = jax.random.key(0)
  config = _config()
  config.data.num_classes = 3
  with pytest.raises(ValueError, match="data.num_classes"):
    duo.init(key, config, batch2d)
  config = _config()
  config.data.labeled_groups = 1
  with pytest.raises(ValueError, match="data.labeled_groups"):
    duo.init(key, config, batch2d)
  with pytest.raises(ValueError, match="data.batch_unlabeled"):
    duo.init(key, _config(), _batch(b_u=0))
  with pytest.raises(ValueError, match="method.preset"):
    duo.init(key, _config("both"), batch2d)
  with pytest.raises(ValueError, match="data.batch_labeled"):
    duo.init(key, _config(), _batch(b_l=3))
