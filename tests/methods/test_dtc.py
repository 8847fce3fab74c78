"""Tests of jaxseg.methods.dtc (DTC, docs/methods/dtc.md): golden values of the released loss block,
hand-computed terms, gradients of both heads, presets, and a few training steps."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import learnable_batch, prediction_inputs
from jaxseg.data.base import DataError
from jaxseg.data.batches import Batch
from jaxseg.config_blocks import data_block
from jaxseg.methods import dtc


def _config(preset: str = "paper", **method) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = data_block()
  c.method = dtc.default_config()
  c.method.preset = preset
  c.method.model.n_filters = 4
  c.method.update(method)
  return c


def _batch(b_l: int = 2, b_u: int = 2, seed: int = 0) -> Batch:
  return learnable_batch((16, 16, 16), b_l, b_u, seed)


# ------------------------------------------------------------------------------------------------
# Golden values of the reference (HiLab-git/DTC train_la_dtc.py).


def test_dual_task_consistency_equals_reference_f64(golden):
  g = golden("dtc_dual_task_consistency__f64")
  with jax.enable_x64(True):
    z, s = jnp.asarray(g["in_outputs_tanh"]), jnp.asarray(g["in_outputs_logit"])
    np.testing.assert_allclose(dtc.level_set_to_mask(z), g["out_dis_to_mask"], rtol=1e-10,
                               atol=1e-300)
    np.testing.assert_allclose(dtc.dual_task_consistency(z, s), g["out_consistency_loss"],
                               rtol=1e-10)


def test_dual_task_consistency_equals_reference_f32(golden):
  g = golden("dtc_dual_task_consistency__f32")
  z, s = jnp.asarray(g["in_outputs_tanh"]), jnp.asarray(g["in_outputs_logit"])
  assert z.dtype == jnp.float32
  # σ saturates to exactly 0 / 1 in float32: absolute tolerance (golden README).
  np.testing.assert_allclose(dtc.level_set_to_mask(z), g["out_dis_to_mask"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(dtc.dual_task_consistency(z, s), g["out_consistency_loss"],
                             rtol=1e-5)


def test_loss_block_equals_reference(golden):
  """Every term of lines 173-191 of train_la_dtc.py, `released` preset (beta 0.3), float64."""
  g = golden("dtc_train_loss_block__default")
  hp = dtc.apply_preset(_config("released").method)
  assert hp.beta == 0.3 and hp.k == 1500.0 and hp.consistency == 1.0
  with jax.enable_x64(True):
    outputs = {"sdf": jnp.asarray(g["in_outputs_tanh"]), "seg": jnp.asarray(g["in_outputs_logit"])}
    labels = jnp.asarray(g["in_label"][:2].astype(np.int32))
    sup, terms = dtc.supervised_loss(outputs["seg"][:2], outputs["sdf"][:2], labels, hp.beta,
                                     sdf=jnp.asarray(g["out_gt_dis"]))
    np.testing.assert_allclose(terms["loss_dice"], g["out_loss_seg_dice"], rtol=1e-10)
    np.testing.assert_allclose(terms["loss_lsf"], g["out_loss_sdf"], rtol=1e-10)
    np.testing.assert_allclose(sup, g["out_supervised_loss"], rtol=1e-10)
    for i, step in enumerate(g["in_iter_num"]):
      total, terms = dtc.dtc_loss(outputs, labels, jnp.asarray(step), hp)
      np.testing.assert_allclose(terms["consistency_weight"], g["out_consistency_weight"][i],
                                 rtol=1e-10)
      np.testing.assert_allclose(terms["loss_consistency"], g["out_consistency_loss"], rtol=1e-10)
      # dtc_loss computes T(y) on the device: the total agrees with the reference to the float32
      # precision of the reference's own gt_dis.
      np.testing.assert_allclose(total, g["out_loss"][i], rtol=1e-6)


def test_float32_loss_block_equals_reference_f32(golden):
  g = golden("dtc_train_loss_block__default")
  hp = dtc.apply_preset(_config("released").method)
  outputs = {"sdf": jnp.asarray(g["in_outputs_tanh"], jnp.float32),
             "seg": jnp.asarray(g["in_outputs_logit"], jnp.float32)}
  labels = jnp.asarray(g["in_label"][:2].astype(np.int32))
  for i, step in enumerate(g["in_iter_num"]):
    total, _ = jax.jit(dtc.dtc_loss, static_argnums=3)(outputs, labels, jnp.asarray(step), hp)
    np.testing.assert_allclose(total, g["out_loss_f32"][i], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Hand-computed terms and gradients.


def test_terms_equal_hand_computed_values():
  # z = 0.001 everywhere: T⁻¹(z) = σ(−1.5); s = 0: σ(s) = 1/2.
  z = jnp.full((2, 4, 4, 1), 0.001)
  s = jnp.zeros((2, 4, 4, 1))
  expected = (1 / (1 + math.exp(1.5)) - 0.5) ** 2
  np.testing.assert_allclose(dtc.dual_task_consistency(z, s), expected, rtol=1e-6)
  # Dice of σ(s) = 1/2 against n1 ones out of n: 1 − (2·½·n1 + ε)/(¼n + n1 + ε).
  labels = jnp.zeros((2, 4, 4), jnp.int32).at[0, 1:3, 1:3].set(1)
  n, n1 = 32, 4
  dice = 1 - (n1 + 1e-5) / (0.25 * n + n1 + 1e-5)
  # A given T(y): the level set z is 0.001 everywhere, the target 0.5 → (0.499)².
  sdf = jnp.full((2, 4, 4), 0.5)
  total, terms = dtc.supervised_loss(s, z, labels, beta=0.3, sdf=sdf)
  np.testing.assert_allclose(terms["loss_dice"], dice, rtol=1e-6)
  np.testing.assert_allclose(terms["loss_lsf"], 0.499 ** 2, rtol=1e-6)
  np.testing.assert_allclose(total, dice + 0.3 * 0.499 ** 2, rtol=1e-6)


def test_consistency_sends_gradient_to_both_heads():
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.uniform(-2e-3, 2e-3, (2, 5, 5, 1)))
  s = jnp.asarray(rng.normal(size=(2, 5, 5, 1)))
  gz, gs = jax.grad(dtc.dual_task_consistency, argnums=(0, 1))(z, s)
  assert float(jnp.abs(gz).max()) > 0 and float(jnp.abs(gs).max()) > 0
  # d/ds of mean (a − σ(s))² = −2 (a − σ(s)) σ'(s) / n.
  a, sig = jax.nn.sigmoid(-1500 * z), jax.nn.sigmoid(s)
  np.testing.assert_allclose(gs, -2 * (a - sig) * sig * (1 - sig) / z.size, rtol=1e-5, atol=1e-9)


def test_loss_uses_all_samples_for_consistency_and_labeled_for_supervision():
  rng = np.random.default_rng(2)
  outputs = {"sdf": jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 1)), jnp.float32),
             "seg": jnp.asarray(rng.normal(size=(4, 16, 16, 1)), jnp.float32)}
  labels = jnp.asarray(rng.uniform(size=(2, 16, 16)) > 0.6, jnp.int32)
  hp = dtc.apply_preset(_config().method)
  _, terms = dtc.dtc_loss(outputs, labels, jnp.asarray(6000), hp)
  np.testing.assert_allclose(terms["loss_consistency"],
                             dtc.dual_task_consistency(outputs["sdf"], outputs["seg"]), rtol=1e-6)
  assert float(terms["consistency_weight"]) == 1.0  # Ramp done at 40 blocks of 150 steps.
  # Changing an unlabeled sample's outputs changes only the consistency term.
  changed = {k: v.at[3].set(-v[3]) for k, v in outputs.items()}
  _, terms2 = dtc.dtc_loss(changed, labels, jnp.asarray(6000), hp)
  assert float(terms2["loss_dice"]) == float(terms["loss_dice"])
  assert float(terms2["loss_lsf"]) == float(terms["loss_lsf"])
  assert float(terms2["loss_consistency"]) != float(terms["loss_consistency"])


def test_presets_and_config_errors():
  assert dtc.apply_preset(_config("paper").method).beta == 1.0
  assert dtc.apply_preset(_config("paper", beta=0.5).method).beta == 0.5
  assert dtc.apply_preset(_config("released", beta=0.5).method).beta == 0.3
  with pytest.raises(ValueError, match="method.preset"):
    dtc.apply_preset(_config("nope").method)
  with pytest.raises(ValueError, match="method.rampup_block"):
    dtc.apply_preset(_config(rampup_block=0).method)
  config = _config()
  config.data.num_classes = 3
  with pytest.raises(ValueError, match="data.num_classes"):
    dtc.init(jax.random.key(0), config, _batch())


# ------------------------------------------------------------------------------------------------
# Training.


@pytest.fixture(scope="module")
def trained():
  config, batch = _config(), _batch()
  state0 = jax.jit(lambda key: dtc.init(key, config, batch))(jax.random.key(0))
  step = jax.jit(dtc.train_step)
  state, history = state0, []
  # One key for every step: the same dropout masks, so the steps descend one fixed objective and
  # the loss logged before each step (at that step's parameters) must fall.
  for _ in range(4):
    state, metrics = step(state, batch, jax.random.key(7))
    history.append({k: float(v) for k, v in metrics.items()})
  return state0, state, batch, history


def test_train_steps_give_finite_losses_and_change_the_network(trained):
  state0, state, _, history = trained
  for metrics in history:
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["sdf_full_masks"] == 0
  assert int(state.seg.step) == 4
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state0.seg.params, state.seg.params)
  assert all(jax.tree.leaves(changed))  # Both heads and every layer were updated.
  assert history[-1]["loss"] < history[0]["loss"]


def test_predict_is_the_segmentation_head(trained):
  _, state, batch, _ = trained
  out = jax.jit(dtc.predict)(state, prediction_inputs(jnp.asarray(batch.unlabeled["image"])))
  assert set(out) == {"model"} and out["model"].shape == (2, 16, 16, 16, 1)
  assert float(out["model"].min()) >= 0 and float(out["model"].max()) <= 1


def test_bfloat16_step_keeps_float32_state_and_close_losses():
  """method.model.dtype = bfloat16: the same first-step losses up to bf16 rounding, float32 state."""
  batch = _batch()
  losses, states = {}, {}
  for dtype in ("float32", "bfloat16"):
    config = _config(model=dict(name="vnet_sdf", n_filters=4, dtype=dtype))
    state = jax.jit(lambda key: dtc.init(key, config, batch))(jax.random.key(0))
    states[dtype], metrics = jax.jit(dtc.train_step)(state, batch, jax.random.key(1))
    losses[dtype] = float(metrics["loss"])
  assert all(a.dtype in (jnp.float32, jnp.int32) for a in jax.tree.leaves(states["bfloat16"])
             if hasattr(a, "dtype") and not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key))
  assert np.isfinite(losses["bfloat16"])
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)
  assert losses["bfloat16"] != losses["float32"]


def test_unknown_compute_dtype_names_the_key():
  config = _config(model=dict(name="vnet_sdf", n_filters=4, dtype="float16"))
  with pytest.raises(DataError, match="method.*.dtype of model 'vnet_sdf' is 'float16'"):
    dtc.init(jax.random.key(0), config, _batch())
