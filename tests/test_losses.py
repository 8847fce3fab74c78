"""Tests of jaxseg.losses: golden outputs of the reference PyTorch code, hand-computed values, properties,
finite-difference gradients and static shape checks.

Every golden comparison runs in float32 and in float64 (x64 scoped to the test). Tolerances:

* float64 port against a float64 reference: rtol 1e-10.
* float32 port, or a reference that itself computes in float32 (ASDNet GDL, the Duo `_f32` / adversarial
  files, and SSL4MIS `softmax_dice_loss`, whose `dice_loss1` casts the target to float32 and sums it in
  float32 — see `test_softmax_dice_loss_reference_sums_target_in_float32`): rtol 1e-5, atol 1e-6.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxseg import losses

# ---------------------------------------------------------------------------------------------------
# Helpers.


def _to_jax(array: np.ndarray, dtype) -> jax.Array:
  """Golden floats in the test precision; integer / bool / uint8 arrays (labels, masks) as int32."""
  array = np.asarray(array)
  return jnp.asarray(array, dtype if array.dtype.kind == "f" else jnp.int32)


def _assert_golden(actual, expected, dtype, reference_float64: bool = True, atol: float | None = None):
  """Compares in the tolerance class of the less precise of the port and the reference (module docstring)."""
  if dtype == jnp.float64 and reference_float64:
    tolerance = {"rtol": 1e-10, "atol": 0.0}
  else:
    tolerance = {"rtol": 1e-5, "atol": 1e-6 if atol is None else atol}
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), **tolerance)


def _is_float64_reference(g: dict) -> bool:
  return all(v.dtype != np.float32 for k, v in g.items() if k.startswith("in_"))


def _cases(family: str, names: str) -> list[str]:
  return [f"{family}__{name}" for name in names.split()]


# One jit per function; shapes repeat across cases so compiles are shared.
_dice_loss = jax.jit(losses.dice_loss, static_argnames=("squared",))
_multiclass_dice_loss = jax.jit(losses.multiclass_dice_loss, static_argnames=("num_classes", "softmax"))
_multiclass_dice_loss_per_class = jax.jit(losses.multiclass_dice_loss_per_class,
                                          static_argnames=("num_classes", "softmax"))
_soft_dice_loss = jax.jit(losses.soft_dice_loss, static_argnames=("batch_dice",))
_soft_dice_ce_loss = jax.jit(losses.soft_dice_ce_loss)
_tp_fp_fn = jax.jit(lambda logits, labels: losses.tp_fp_fn(jax.nn.softmax(logits, -1), labels))
_generalized_dice_loss = jax.jit(losses.generalized_dice_loss, static_argnames=("num_classes",))
_bce = jax.jit(losses.binary_cross_entropy)
_bce_map = jax.jit(losses.binary_cross_entropy_map)
_entropy_loss = jax.jit(losses.entropy_loss)
_softmax_mse_loss = jax.jit(losses.softmax_mse_loss, static_argnames=("sigmoid",))
_softmax_kl_loss = jax.jit(losses.softmax_kl_loss, static_argnames=("sigmoid",))
_symmetric_mse_loss = jax.jit(losses.symmetric_mse_loss)
_softmax_dice_loss = jax.jit(losses.softmax_dice_loss)


# ---------------------------------------------------------------------------------------------------
# Golden: Dice family.


@pytest.mark.parametrize("name", _cases("dtc_dice_loss", "blob3d blob2d perfect empty_target all_zero")
                         + _cases("dtc_dice_loss1", "blob3d blob2d perfect empty_target all_zero"))
def test_dice_loss_golden(golden, name, dtype):
  g = golden(name)
  squared = name.startswith("dtc_dice_loss__")
  loss = _dice_loss(_to_jax(g["in_score"], dtype), _to_jax(g["in_target"], dtype), squared=squared)
  assert loss.dtype == dtype
  _assert_golden(loss, g["out_loss"], dtype)


@pytest.mark.parametrize("name", _cases("ssl4mis_DiceLoss",
                                        "2d_c2 2d_c4 3d_c2 3d_c4 3d_c4_weighted 2d_c4_softmax_inside "
                                        "2d_c4_absent_class"))
def test_multiclass_dice_loss_golden(golden, name, dtype):
  g = golden(name)
  params = g["meta"]["params"]
  scores = _to_jax(g["in_logits"] if params["softmax"] else g["in_probs"], dtype)
  labels = _to_jax(g["in_label"], dtype)
  num_classes = params["n_classes"]
  loss = _multiclass_dice_loss(scores, labels, num_classes, params["weight"], softmax=params["softmax"])
  per_class = _multiclass_dice_loss_per_class(scores, labels, num_classes, softmax=params["softmax"])
  _assert_golden(loss, g["out_loss"], dtype)
  _assert_golden(per_class, g["out_per_class_loss"], dtype)


@pytest.mark.parametrize("name", _cases("maml_nnunet_dice_ce", "3d_c4 3d_c2 3d_c4_absent_class 2d_c3"))
def test_nnunet_soft_dice_and_ce_golden(golden, name, dtype):
  g = golden(name)
  logits, labels = _to_jax(g["in_logits"], dtype), _to_jax(g["in_label"], dtype)
  _assert_golden(_soft_dice_loss(logits, labels, batch_dice=True), g["out_softdice_batchdice1"], dtype)
  _assert_golden(_soft_dice_loss(logits, labels, batch_dice=False), g["out_softdice_batchdice0"], dtype)
  dc_and_ce = _soft_dice_ce_loss(logits, labels)
  _assert_golden(dc_and_ce, g["out_dc_and_ce"], dtype)
  _assert_golden(dc_and_ce, g["out_dc_and_ce_f32"], dtype, reference_float64=False)
  for expected, actual in zip((g["out_tp"], g["out_fp"], g["out_fn"]), _tp_fp_fn(logits, labels)):
    _assert_golden(actual, expected, dtype)


@pytest.mark.parametrize("name", _cases("asdnet_GeneralizedDiceLoss4Organs", "c2 c4 c4_absent_class"))
def test_generalized_dice_loss_golden(golden, name, dtype):
  g = golden(name)  # a float32 reference
  logits = _to_jax(g["in_logits"], dtype)
  loss = _generalized_dice_loss(logits, _to_jax(g["in_label"], dtype), logits.shape[-1])
  _assert_golden(loss, g["out_loss"], dtype, reference_float64=False)


@pytest.mark.parametrize("name", _cases("ssl4mis_softmax_dice_loss", "2d_c2 2d_c4 3d_c2 3d_c4"))
def test_softmax_dice_loss_golden(golden, name, dtype):
  g = golden(name)
  loss = _softmax_dice_loss(_to_jax(g["in_input_logits"], dtype), _to_jax(g["in_target_logits"], dtype))
  # float32-level reference: see the test below.
  _assert_golden(loss, g["out_loss"], dtype, reference_float64=False)


def _linear_dice_per_class_numpy(a: np.ndarray, b: np.ndarray, target_float32: bool) -> np.ndarray:
  """Per-class `dice_loss1(a_c, b_c)` in NumPy float64; `target_float32` mimics the reference's `.float()`."""
  axes = tuple(range(a.ndim - 1))
  if target_float32:
    b32 = b.astype(np.float32)
    b, target_sum = b32.astype(np.float64), b32.astype(np.float64).sum(axes).astype(np.float32)
  else:
    target_sum = b.sum(axes)
  return 1 - (2 * (a * b).sum(axes) + SMOOTH) / (a.sum(axes) + target_sum.astype(np.float64) + SMOOTH)


@pytest.mark.parametrize("name", _cases("ssl4mis_softmax_dice_loss", "2d_c2 3d_c2"))
def test_softmax_dice_loss_reference_sums_target_in_float32(golden, name, x64):
  """Why the float64 reference is only float32-accurate: `dice_loss1` does `target = target.float()`.

  The softmax target is rounded to float32 and Σ target is a float32 sum. With that rounding (Σ of the
  rounded terms, correctly rounded to float32) a NumPy re-derivation reproduces the C = 2 files to 1e-15; for
  C = 4 torch's own float32 summation order also matters. Without the rounding — what our float64 port
  computes, to 1e-12 — the difference is float32-sized, so the float64 comparison cannot be tighter.
  """
  g = golden(name)
  a = np.asarray(jax.nn.softmax(jnp.asarray(g["in_input_logits"]), -1))
  b = np.asarray(jax.nn.softmax(jnp.asarray(g["in_target_logits"]), -1))
  as_released = np.mean(_linear_dice_per_class_numpy(a, b, target_float32=True))
  np.testing.assert_allclose(as_released, g["out_loss"], rtol=1e-14)
  ours = float(losses.softmax_dice_loss(jnp.asarray(g["in_input_logits"]),
                                        jnp.asarray(g["in_target_logits"])))
  exact = np.mean(_linear_dice_per_class_numpy(a, b, target_float32=False))
  np.testing.assert_allclose(ours, exact, rtol=1e-12)
  assert 1e-9 < abs(ours - g["out_loss"]) / g["out_loss"] < 1e-6


# ---------------------------------------------------------------------------------------------------
# Golden: cross-entropy family and Duo-SegNet composites.


@pytest.mark.parametrize("name", _cases("duo_bce", "blob blob_f32 exact_0_1 exact_0_1_f32"))
def test_binary_cross_entropy_golden(golden, name, dtype):
  g = golden(name)
  pred, target = _to_jax(g["in_pred"], dtype), _to_jax(g["in_target"], dtype)
  reference_float64 = _is_float64_reference(g)
  _assert_golden(_bce(pred, target), g["out_loss"], dtype, reference_float64)
  if dtype == jnp.float32 and reference_float64:
    # Rounding float64 inputs to float32 moves p near 1 by up to 6e-8, which −log(1 − p) amplifies by
    # 1/(1 − p): an input-rounding effect, not the port's. The `_f32` files hold the reference's own
    # elementwise float32 run on the same float32 inputs and pin the float32 map.
    return
  elementwise = _bce_map(pred, target)
  _assert_golden(elementwise, g["out_elementwise"], dtype, reference_float64)
  if "exact_0_1" in name and (dtype == jnp.float64) == reference_float64:
    # The clamp value exactly, at the same elements (in the reference's precision: a target of 1.1e-16
    # against p = 1 gives 100 (1 − t), which is exactly 100 only in float32).
    np.testing.assert_array_equal(np.asarray(elementwise) == 100.0, g["out_elementwise"] == 100.0)
    assert np.sum(g["out_elementwise"] == 100.0) > 0


def _duo_calc_loss(pred, target):
  """Duo-SegNet `calc_loss`: 0.5 · BCE + 0.5 · (1 − dice_coef); dice_coef is computed on detached data."""
  bce = losses.binary_cross_entropy(pred, target)
  dice_coef = 1.0 - losses.dice_loss(pred, target, squared=False)
  return 0.5 * bce + 0.5 * (1.0 - jax.lax.stop_gradient(dice_coef)), bce, dice_coef


def _duo_loss_diff(u1, u2, batch_size):
  """Duo-SegNet `loss_diff`: (BCE(u1, u2) + BCE(u2, u1)) / batch_size, both terms `.item()` (no gradient)."""
  both = losses.binary_cross_entropy(u1, u2) + losses.binary_cross_entropy(u2, u1)
  return jax.lax.stop_gradient(both) / batch_size


def _duo_adversarial(fake_1, fake_2, real_1, real_2):
  """Duo-SegNet `loss_adversarial_1/2`: BCE of the critic outputs against 0 (fake) and 1 (real)."""
  bce_zero = lambda d: losses.binary_cross_entropy(d, jnp.zeros_like(d))
  bce_one = lambda d: losses.binary_cross_entropy(d, jnp.ones_like(d))
  adversarial_1 = bce_zero(fake_1) + bce_zero(fake_2)
  return adversarial_1, adversarial_1 + bce_one(real_1) + bce_one(real_2)


@pytest.mark.parametrize("name", _cases("duo_calc_loss", "blob blob_f32 exact_0_1 exact_0_1_f32"))
def test_duo_calc_loss_golden(golden, name, dtype):
  g = golden(name)
  loss, bce, dice_coef = jax.jit(_duo_calc_loss)(_to_jax(g["in_pred"], dtype), _to_jax(g["in_target"], dtype))
  reference_float64 = _is_float64_reference(g)
  _assert_golden(loss, g["out_loss"], dtype, reference_float64)
  _assert_golden(bce, g["out_bce"], dtype, reference_float64)
  _assert_golden(dice_coef, g["out_dice_coef"], dtype, reference_float64)


@pytest.mark.parametrize("name", _cases("duo_loss_diff", "bs1 bs4"))
def test_duo_loss_diff_golden(golden, name, dtype):
  g = golden(name)
  u1, u2 = _to_jax(g["in_u1"], dtype), _to_jax(g["in_u2"], dtype)
  loss = jax.jit(_duo_loss_diff)(u1, u2, int(g["in_batch_size"]))
  _assert_golden(loss, g["out_loss"], dtype)


def test_duo_loss_adversarial_golden(golden, dtype):
  g = golden("duo_loss_adversarial__default")  # a float32 reference
  inputs = [_to_jax(g[f"in_{k}"], dtype) for k in ("D_fake_1", "D_fake_2", "D_real_1", "D_real_2")]
  adversarial_1, adversarial_2 = jax.jit(_duo_adversarial)(*inputs)
  _assert_golden(adversarial_1, g["out_loss_adversarial_1"], dtype, reference_float64=False)
  _assert_golden(adversarial_2, g["out_loss_adversarial_2"], dtype, reference_float64=False)


@pytest.mark.parametrize("name", _cases("ssl4mis_entropy_loss", "2d_c2 2d_c4 3d_c2 3d_c4 2d_onehot_p"))
def test_entropy_loss_golden(golden, name, dtype):
  g = golden(name)
  probs = _to_jax(g["in_p"], dtype)
  assert probs.shape[-1] == g["meta"]["params"]["C"]
  # One-hot: the value is −1.44e-6 and float32 rounds 1 + 1e-6 (≈ 5 % relative): an atol well below it.
  atol = 1e-7 if name.endswith("onehot_p") else None
  _assert_golden(_entropy_loss(probs), g["out_loss"], dtype, atol=atol)


# ---------------------------------------------------------------------------------------------------
# Golden: consistency losses.


@pytest.mark.parametrize("name", _cases("ssl4mis_softmax_mse_loss", "2d_c2 2d_c4 3d_c2 3d_c4 3d_sigmoid"))
def test_softmax_mse_loss_golden(golden, name, dtype):
  g = golden(name)
  a, b = _to_jax(g["in_input_logits"], dtype), _to_jax(g["in_target_logits"], dtype)
  mse_map = _softmax_mse_loss(a, b, sigmoid=g["meta"]["params"]["sigmoid"])
  assert mse_map.shape == g["out_mse"].shape
  _assert_golden(mse_map, g["out_mse"], dtype)


@pytest.mark.parametrize("name", _cases("ssl4mis_softmax_kl_loss", "2d_c2 2d_c4 3d_c2 3d_c4 3d_sigmoid"))
def test_softmax_kl_loss_golden(golden, name, dtype):
  g = golden(name)
  a, b = _to_jax(g["in_input_logits"], dtype), _to_jax(g["in_target_logits"], dtype)
  _assert_golden(_softmax_kl_loss(a, b, sigmoid=g["meta"]["params"]["sigmoid"]), g["out_loss"], dtype)


@pytest.mark.parametrize("name", _cases("ssl4mis_symmetric_mse_loss", "2d_c2 2d_c4 3d_c2 3d_c4"))
def test_symmetric_mse_loss_golden(golden, name, dtype):
  g = golden(name)
  a, b = _to_jax(g["in_input1"], dtype), _to_jax(g["in_input2"], dtype)
  _assert_golden(_symmetric_mse_loss(a, b), g["out_loss"], dtype)
  _assert_golden(losses.mse(a, b), g["out_loss"], dtype)


# ---------------------------------------------------------------------------------------------------
# Hand-computed values and properties.

SMOOTH = 1e-5


def test_dice_loss_by_hand():
  probs = jnp.array([0.5, 1.0, 0.0, 0.25])
  target = jnp.array([1, 0, 0, 1], jnp.uint8)
  # Σpt = 0.75, Σp² = 1.3125, Σp = 1.75, Σt = Σt² = 2.
  assert losses.dice_loss(probs, target) == pytest.approx(1 - (1.5 + SMOOTH) / (3.3125 + SMOOTH), rel=1e-6)
  assert losses.dice_loss(probs, target, squared=False) == pytest.approx(1 - (1.5 + SMOOTH) / (3.75 + SMOOTH),
                                                                        rel=1e-6)
  assert losses.dice_loss(target.astype(jnp.float32), target) == 0.0
  assert losses.dice_loss(jnp.zeros(4), jnp.zeros(4)) == 0.0  # 0/0 guarded by the smooth term


def test_multiclass_dice_loss_by_hand():
  probs = jnp.array([[[0.8, 0.2], [0.4, 0.6], [1.0, 0.0]]])  # (N=1, W=3, C=2)
  labels = jnp.array([[0, 1, 1]])
  d0 = 1 - (2 * 0.8 + SMOOTH) / (0.64 + 0.16 + 1.0 + 1 + SMOOTH)
  d1 = 1 - (2 * 0.6 + SMOOTH) / (0.04 + 0.36 + 0.0 + 2 + SMOOTH)
  np.testing.assert_allclose(losses.multiclass_dice_loss_per_class(probs, labels, 2), [d0, d1], rtol=1e-6)
  assert losses.multiclass_dice_loss(probs, labels, 2) == pytest.approx((d0 + d1) / 2, rel=1e-6)
  # Weighted: still divided by C.
  assert losses.multiclass_dice_loss(probs, labels, 2, weight=[0.5, 3.0]) == pytest.approx(
      (0.5 * d0 + 3.0 * d1) / 2, rel=1e-6)
  # Perfect one-hot prediction (an absent class included) is exactly 0.
  perfect = jax.nn.one_hot(jnp.array([[0, 1, 1]]), 3)
  assert losses.multiclass_dice_loss(perfect, labels, 3) == 0.0


def test_soft_dice_and_cross_entropy_by_hand():
  logits = jnp.array([[[2.0, 0.0], [0.0, 1.0]]])  # (N=1, W=2, C=2)
  labels = jnp.array([[0, 1]])
  p = jax.nn.softmax(logits, -1)
  tp, fp, fn = losses.tp_fp_fn(p, labels)
  np.testing.assert_allclose(tp, [p[0, 0, 0], p[0, 1, 1]], rtol=1e-6)
  np.testing.assert_allclose(fp, [p[0, 1, 0], p[0, 0, 1]], rtol=1e-6)
  np.testing.assert_allclose(fn, [1 - p[0, 0, 0], 1 - p[0, 1, 1]], rtol=1e-6)
  dc1 = (2 * tp[1] + SMOOTH) / (2 * tp[1] + fp[1] + fn[1] + SMOOTH + 1e-8)
  assert losses.soft_dice_loss(logits, labels) == pytest.approx(-float(dc1), rel=1e-6)
  ce = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (1 + math.e))) / 2
  assert losses.cross_entropy(logits, labels) == pytest.approx(ce, rel=1e-6)
  assert losses.soft_dice_ce_loss(logits, labels) == pytest.approx(ce - float(dc1), rel=1e-6)
  # Weighted CE divides by Σ w_y (PyTorch), not by the voxel count.
  nll = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.e / (1 + math.e))]
  weighted = (0.2 * nll[0] + 3.0 * nll[1]) / (0.2 + 3.0)
  assert losses.cross_entropy(logits, labels, weight=[0.2, 3.0]) == pytest.approx(weighted, rel=1e-6)


def test_soft_dice_loss_is_negative_and_an_absent_class_scores_about_zero():
  logits = jnp.array([[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]])  # class 2 absent from the labels
  labels = jnp.array([[0, 1]])
  tp, fp, fn = losses.tp_fp_fn(jax.nn.softmax(logits, -1), labels)
  # Absent class: tp = fn = 0, so dc_2 = 1e-5 / (fp_2 + 1e-5 + 1e-8) ≈ 0 once fp_2 ≫ 1e-5.
  dc2 = SMOOTH / (float(fp[2]) + SMOOTH + 1e-8)
  assert dc2 < 1e-3
  dc1 = (2 * float(tp[1]) + SMOOTH) / (2 * float(tp[1]) + float(fp[1]) + float(fn[1]) + SMOOTH + 1e-8)
  assert losses.soft_dice_loss(logits, labels) == pytest.approx(-(dc1 + dc2) / 2, rel=1e-6)
  assert -1.0 <= losses.soft_dice_loss(logits, labels, include_background=True) <= 0.0


def test_generalized_dice_loss_by_hand():
  logits = jnp.array([[[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]]])  # (N=1, W=3, C=2)
  labels = jnp.array([[0, 1, 1]])
  p = np.asarray(jax.nn.softmax(logits, -1))[0]
  t = np.array([[1, 0], [0, 1], [0, 1]], np.float64)
  w = 1 / (t.sum(0) ** 2 + 1e-6)
  expected = 1 - 2 * np.sum(w * (p * t).sum(0)) / np.sum(w * (p.sum(0) + t.sum(0)) + 2e-6)
  assert losses.generalized_dice_loss(logits, labels, 2) == pytest.approx(expected, rel=1e-6)
  # An absent class gets weight 0 but still adds 2e-6 to the denominator.
  logits3 = jnp.concatenate([logits, jnp.zeros((1, 3, 1))], -1)
  p3 = np.asarray(jax.nn.softmax(logits3, -1))[0]
  t3 = np.concatenate([t, np.zeros((3, 1))], -1)
  w3 = np.append(w, 0.0)
  expected3 = 1 - 2 * np.sum(w3 * (p3 * t3).sum(0)) / np.sum(w3 * (p3.sum(0) + t3.sum(0)) + 2e-6)
  assert losses.generalized_dice_loss(logits3, labels, 3) == pytest.approx(expected3, rel=1e-6)
  confident = 30.0 * jax.nn.one_hot(labels, 2)
  assert 0.0 <= losses.generalized_dice_loss(confident, labels, 2) < 1e-5


# Sample attention: sample 0 is segmented perfectly (dsc 1 → weight 0); sample 1 predicts foreground on
# voxels {0, 1} against a label on {1, 2}: dsc = 2·1 / (2 + 2) = 0.5 → weight (1 − 0.5)² = 0.25.
_ATTENTION_LABELS = jnp.array([[0, 1, 1, 0], [0, 1, 1, 0]])
_ATTENTION_LOGITS = jnp.array([[[2.0, -1.0], [-0.5, 1.5], [0.0, 3.0], [1.0, 0.2]],
                               [[-1.0, 0.3], [0.1, 0.9], [0.7, -0.4], [2.0, 0.0]]])


def test_sample_attention_generalized_dice_loss_by_hand():
  dsc = losses.per_sample_foreground_dice(_ATTENTION_LOGITS, _ATTENTION_LABELS, 2)
  np.testing.assert_allclose(dsc, [1.0, 0.5])
  gdl = losses.generalized_dice_loss_per_sample(_ATTENTION_LOGITS, _ATTENTION_LABELS, 2)
  for n in range(2):  # each sample's GDL is the batch GDL of that sample alone
    alone = losses.generalized_dice_loss(_ATTENTION_LOGITS[n:n + 1], _ATTENTION_LABELS[n:n + 1], 2)
    assert float(gdl[n]) == pytest.approx(float(alone), rel=1e-6)
  loss = losses.sample_attention_generalized_dice_loss(_ATTENTION_LOGITS, _ATTENTION_LABELS, 2)
  assert loss == pytest.approx(0.25 * float(gdl[1]) / 2, rel=1e-6)
  cubed = losses.sample_attention_generalized_dice_loss(_ATTENTION_LOGITS, _ATTENTION_LABELS, 2, beta=3.0)
  assert cubed == pytest.approx(0.125 * float(gdl[1]) / 2, rel=1e-6)
  # A class absent from both prediction and label counts as Dice 1.
  three_class = jnp.concatenate([_ATTENTION_LOGITS, jnp.full((2, 4, 1), -5.0)], -1)
  np.testing.assert_allclose(losses.per_sample_foreground_dice(three_class, _ATTENTION_LABELS, 3),
                             [1.0, 0.75])


def test_sample_attention_gradient_is_the_weighted_gdl_gradient(x64):
  logits, labels = _ATTENTION_LOGITS.astype(jnp.float64), _ATTENTION_LABELS
  grad = jax.jit(jax.grad(losses.sample_attention_generalized_dice_loss), static_argnums=2)(logits, labels, 2)
  dsc = losses.per_sample_foreground_dice(logits, labels, 2)
  gdl_grad = jax.jit(jax.grad(lambda x, y: losses.generalized_dice_loss(x, y, 2)))
  for n in range(2):
    expected = (1.0 - dsc[n]) ** 2 / 2 * gdl_grad(logits[n:n + 1], labels[n:n + 1])[0]
    np.testing.assert_allclose(grad[n], expected, rtol=1e-12, atol=1e-15)
  assert np.all(grad[0] == 0.0) and np.any(grad[1] != 0.0)


def test_binary_cross_entropy_by_hand_and_clamp():
  probs = jnp.array([0.25, 0.9, 0.0, 1.0, 0.0, 1.0])
  target = jnp.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
  expected = [-math.log(0.25), -math.log(0.1), 100.0, 100.0, 0.0, 0.0]
  np.testing.assert_allclose(losses.binary_cross_entropy_map(probs, target), expected, rtol=1e-6)
  assert losses.binary_cross_entropy(probs, target) == pytest.approx(np.mean(expected), rel=1e-6)


def test_binary_cross_entropy_gradient_is_pytorch_and_finite_at_0_and_1(x64):
  probs = jnp.array([0.0, 0.0, 1.0, 1.0, 0.3, 1e-13])
  target = jnp.array([0.0, 1.0, 0.0, 1.0, 0.8, 1.0])
  summed = lambda p, t: jnp.sum(losses.binary_cross_entropy_map(p, t))
  d_probs, d_target = jax.grad(summed, (0, 1))(probs, target)
  # PyTorch's backward: (p − t) / max(p (1 − p), 1e-12).
  np.testing.assert_allclose(d_probs, [0.0, -1e12, 1e12, 0.0, (0.3 - 0.8) / 0.21, (1e-13 - 1) / 1e-12],
                             rtol=1e-12)
  np.testing.assert_allclose(d_target[:4], [100.0, 100.0, -100.0, -100.0])
  np.testing.assert_allclose(d_target[4], math.log(0.7) - math.log(0.3), rtol=1e-12)
  # Forward mode gives the same (the rule is a custom JVP).
  _, tangent = jax.jvp(lambda p: summed(p, target), (probs,), (jnp.ones(6),))
  assert tangent == pytest.approx(float(jnp.sum(d_probs)), rel=1e-12)
  # A sigmoid saturated to exactly 1 contributes a zero factor: the chained gradient is 0, not NaN.
  through_sigmoid = lambda s: losses.binary_cross_entropy(jax.nn.sigmoid(s), jnp.zeros(1))
  logit_grad = jax.grad(through_sigmoid)(jnp.array([40.0]))
  assert np.isfinite(logit_grad).all()


def test_binary_cross_entropy_with_logits_matches_probability_form_and_is_stable():
  logits = jnp.array([-3.0, -0.5, 0.0, 0.7, 4.0])
  target = jnp.array([0.0, 1.0, 0.3, 1.0, 0.0])
  assert losses.binary_cross_entropy_with_logits(logits, target) == pytest.approx(
      float(losses.binary_cross_entropy(jax.nn.sigmoid(logits), target)), rel=1e-5)
  extreme = jnp.array([800.0, -800.0])
  assert losses.binary_cross_entropy_with_logits(extreme, jnp.array([0.0, 1.0])) == pytest.approx(800.0)
  grad = jax.grad(losses.binary_cross_entropy_with_logits)(logits, target)
  np.testing.assert_allclose(grad, (jax.nn.sigmoid(logits) - target) / 5, rtol=1e-5, atol=1e-7)


def test_entropy_loss_bounds_and_one_hot_quirk():
  uniform = jnp.full((1, 3, 4), 0.25)
  assert losses.entropy_loss(uniform) == pytest.approx(-math.log(0.25 + 1e-6) / math.log(4), rel=1e-6)
  assert losses.entropy_loss(uniform) <= 1.0
  one_hot = jax.nn.one_hot(jnp.array([[0, 1, 1]]), 2, dtype=jnp.float32)
  with jax.enable_x64(True):
    one_hot_64 = jax.nn.one_hot(jnp.array([[0, 1, 1]]), 2, dtype=jnp.float64)
    assert losses.entropy_loss(one_hot_64) == pytest.approx(-math.log1p(1e-6) / math.log(2), rel=1e-12)
  assert losses.entropy_loss(one_hot) < 0.0


def test_softmax_kl_and_mse_properties():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(2, 3, 4, 3)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 3, 4, 3)), jnp.float32)
  assert losses.softmax_kl_loss(a, b) > 0.0
  assert losses.softmax_kl_loss(a, a) == pytest.approx(0.0, abs=1e-7)
  # 'mean' over all N·voxels·C elements: 1/C of the per-voxel KL.
  p, q = jax.nn.softmax(a, -1), jax.nn.softmax(b, -1)
  per_voxel_kl = jnp.sum(q * (jnp.log(q) - jnp.log(p)), -1)
  assert losses.softmax_kl_loss(a, b) == pytest.approx(float(jnp.mean(per_voxel_kl)) / 3, rel=1e-5)
  # The sigmoid variant is only the positive-class term: negative when σ(b) < σ(a).
  assert losses.softmax_kl_loss(jnp.array([2.0]), jnp.array([-2.0]), sigmoid=True) < 0.0
  mse_map = losses.softmax_mse_loss(a, b)
  assert mse_map.shape == a.shape and float(jnp.max(losses.softmax_mse_loss(a, a))) == 0.0
  np.testing.assert_allclose(losses.softmax_mse_loss(a, b, sigmoid=True),
                             (jax.nn.sigmoid(a) - jax.nn.sigmoid(b)) ** 2, rtol=1e-6)


def test_symmetric_mse_is_symmetric_with_opposite_gradients():
  a = jnp.array([[0.1, 0.7], [0.4, 0.2]])
  b = jnp.array([[0.3, 0.5], [0.4, 0.9]])
  assert losses.symmetric_mse_loss(a, b) == losses.symmetric_mse_loss(b, a)
  assert losses.symmetric_mse_loss(a, b) == pytest.approx((0.04 + 0.04 + 0.0 + 0.49) / 4, rel=1e-6)
  grad_a, grad_b = jax.grad(losses.symmetric_mse_loss, (0, 1))(a, b)
  np.testing.assert_allclose(grad_a, -grad_b)
  assert losses.mse(a, b) == losses.symmetric_mse_loss(a, b)


def test_softmax_dice_loss_by_hand():
  a = jnp.array([[[1.0, 0.0], [0.0, 0.5]]])
  b = jnp.array([[[0.0, 0.0], [2.0, 0.0]]])
  pa, pb = np.asarray(jax.nn.softmax(a, -1))[0], np.asarray(jax.nn.softmax(b, -1))[0]
  per_class = 1 - (2 * (pa * pb).sum(0) + SMOOTH) / (pa.sum(0) + pb.sum(0) + SMOOTH)
  assert losses.softmax_dice_loss(a, b) == pytest.approx(per_class.mean(), rel=1e-6)
  assert losses.softmax_dice_loss(a, a) > 0.0  # linear Dice of soft maps with themselves is not 0


# ---------------------------------------------------------------------------------------------------
# Finite-difference gradients (float64, reverse mode, inputs away from kinks and clamps).

_GRAD_SHAPE = (2, 3, 4)  # (N, H, W); C is added per case
_GRAD_CLASSES = 3


def _grad_inputs():
  rng = np.random.default_rng(42)
  logits = rng.normal(size=_GRAD_SHAPE + (_GRAD_CLASSES,))
  other_logits = rng.normal(size=_GRAD_SHAPE + (_GRAD_CLASSES,))
  labels = rng.integers(0, _GRAD_CLASSES, size=_GRAD_SHAPE)
  soft = rng.uniform(0.05, 0.95, size=_GRAD_SHAPE + (2,))
  return (jnp.asarray(logits), jnp.asarray(other_logits), jnp.asarray(labels, jnp.int32),
          jnp.asarray(soft[..., 0]), jnp.asarray(soft[..., 1]))


_GRAD_CASES = {
    "dice_loss_squared": lambda lg, o, y, p, t: (losses.dice_loss, (p, t)),
    "dice_loss_linear": lambda lg, o, y, p, t: (functools.partial(losses.dice_loss, squared=False), (p, t)),
    "multiclass_dice_loss": lambda lg, o, y, p, t: (
        lambda x: losses.multiclass_dice_loss(jax.nn.softmax(x), y, 3, weight=[0.2, 1.0, 2.0]), (lg,)),
    "multiclass_dice_loss_softmax": lambda lg, o, y, p, t: (
        lambda x: losses.multiclass_dice_loss(x, y, 3, softmax=True), (lg,)),
    "softmax_dice_loss": lambda lg, o, y, p, t: (losses.softmax_dice_loss, (lg, o)),
    "soft_dice_loss_batch": lambda lg, o, y, p, t: (lambda x: losses.soft_dice_loss(x, y), (lg,)),
    "soft_dice_ce_loss_per_sample": lambda lg, o, y, p, t: (
        lambda x: losses.soft_dice_ce_loss(x, y, batch_dice=False), (lg,)),
    "generalized_dice_loss": lambda lg, o, y, p, t: (lambda x: losses.generalized_dice_loss(x, y, 3), (lg,)),
    "sample_attention_generalized_dice_loss": lambda lg, o, y, p, t: (
        lambda x: losses.sample_attention_generalized_dice_loss(x, y, 3), (lg,)),
    "cross_entropy": lambda lg, o, y, p, t: (lambda x: losses.cross_entropy(x, y), (lg,)),
    "cross_entropy_weighted": lambda lg, o, y, p, t: (
        lambda x: losses.cross_entropy(x, y, weight=[0.3, 1.0, 2.5]), (lg,)),
    "binary_cross_entropy": lambda lg, o, y, p, t: (losses.binary_cross_entropy, (p, t)),
    "binary_cross_entropy_with_logits": lambda lg, o, y, p, t: (
        losses.binary_cross_entropy_with_logits, (lg[..., 0], t)),
    "entropy_loss": lambda lg, o, y, p, t: (lambda x: losses.entropy_loss(jax.nn.softmax(x)), (lg,)),
    "softmax_mse_loss": lambda lg, o, y, p, t: (losses.softmax_mse_loss, (lg, o)),
    "softmax_mse_loss_sigmoid": lambda lg, o, y, p, t: (
        functools.partial(losses.softmax_mse_loss, sigmoid=True), (lg, o)),
    "softmax_kl_loss": lambda lg, o, y, p, t: (losses.softmax_kl_loss, (lg, o)),
    "softmax_kl_loss_sigmoid": lambda lg, o, y, p, t: (
        functools.partial(losses.softmax_kl_loss, sigmoid=True), (lg, o)),
    "symmetric_mse_loss": lambda lg, o, y, p, t: (losses.symmetric_mse_loss, (p, t)),
    "mse": lambda lg, o, y, p, t: (losses.mse, (lg, o)),
}


@pytest.mark.parametrize("name", sorted(_GRAD_CASES))
def test_gradients_match_finite_differences(name, x64):
  fn, args = _GRAD_CASES[name](*_grad_inputs())
  check_grads(jax.jit(fn), args, order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Static shape checks.


def test_shape_mismatches_raise_at_trace_time():
  logits = jnp.zeros((2, 4, 4, 3))
  labels = jnp.zeros((2, 4, 4), jnp.int32)
  with pytest.raises(ValueError, match="same shape"):
    jax.jit(losses.dice_loss)(jnp.zeros((2, 4)), jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="num_classes=4"):
    losses.multiclass_dice_loss(logits, labels, 4)
  with pytest.raises(ValueError, match="without a channel axis"):
    losses.cross_entropy(logits, labels[..., None])
  with pytest.raises(ValueError, match="weight must have shape"):
    losses.cross_entropy(logits, labels, weight=[1.0, 2.0])
  with pytest.raises(ValueError, match="weight must have shape"):
    losses.multiclass_dice_loss(logits, labels, 3, weight=[1.0, 2.0])
  with pytest.raises(ValueError, match="num_classes=2"):
    losses.generalized_dice_loss(logits, labels, 2)
  with pytest.raises(ValueError, match="at least 2"):
    losses.entropy_loss(jnp.ones((2, 4, 1)))
  with pytest.raises(ValueError, match="same shape"):
    losses.softmax_kl_loss(logits, logits[..., :2])
