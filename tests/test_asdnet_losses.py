"""Tests of the ASDNet losses in jaxseg.losses: generalized Dice (Eq. 1), sample attention (Eq. 2), the
masked pseudo-label semi loss (Eq. 6) and the confidence network's per-voxel CE terms.

Golden values come from the reference `GeneralizedDiceLoss4Organs` (a float32 reference: rtol 1e-5, also when
the port runs in float64). Hand-computed cases use a 2×2×2 volume with 3 classes written out below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxseg import losses

GOLDEN_CASES = ["c2", "c4", "c4_absent_class"]


def _gdl_numpy(probs: np.ndarray, one_hot: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Eq. 1 re-derived with loops in float64 (an independent check of the pooled sums and weights)."""
  probs, one_hot = np.asarray(probs, np.float64), np.asarray(one_hot, np.float64)
  num_classes = probs.shape[-1]
  p = probs.reshape(-1, num_classes)
  t = one_hot.reshape(-1, num_classes)
  m = np.ones(len(p)) if mask is None else np.asarray(mask, np.float64).reshape(-1)
  numerator, denominator = 0.0, 0.0
  for c in range(num_classes):
    count = float(np.sum(m * t[:, c]))
    weight = 0.0 if count == 0 else 1.0 / (count ** 2 + 1e-6)
    numerator += weight * float(np.sum(m * p[:, c] * t[:, c]))
    denominator += weight * (float(np.sum(m * p[:, c])) + count) + 2e-6
  return 1.0 - 2.0 * numerator / denominator


# ---------------------------------------------------------------------------------------------------
# Golden: the reference GeneralizedDiceLoss4Organs (softmax inside, batch-pooled, absent class w = 0).


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_generalized_dice_loss_golden_all_input_forms(golden, case, dtype):
  g = golden(f"asdnet_GeneralizedDiceLoss4Organs__{case}")
  logits = jnp.asarray(g["in_logits"], dtype)
  labels = jnp.asarray(g["in_label"], jnp.int32)
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=dtype)
  expected = float(g["out_loss"])
  values = {
      "logits, labels": jax.jit(losses.generalized_dice_loss)(logits, labels),
      "probs, labels": jax.jit(lambda p, y: losses.generalized_dice_loss(p, y, from_logits=False))(probs, labels),
      "probs, one-hot": jax.jit(lambda p, t: losses.generalized_dice_loss(p, t, from_logits=False))(probs, one_hot),
  }
  for form, value in values.items():
    assert value.dtype == dtype, form
    np.testing.assert_allclose(float(value), expected, rtol=1e-5, atol=0, err_msg=form)
  # The independent float64 re-derivation of the same inputs agrees too.
  assert _gdl_numpy(np.asarray(probs), np.asarray(one_hot)) == pytest.approx(expected, rel=1e-5)


def test_golden_absent_class_really_is_absent(golden):
  """The c4_absent_class file exercises the w_c = 0 branch (a class with no voxel in the whole batch)."""
  labels = golden("asdnet_GeneralizedDiceLoss4Organs__c4_absent_class")["in_label"]
  assert len(np.unique(labels)) < 4


def test_golden_is_pooled_over_the_batch_not_averaged_per_sample(golden):
  g = golden("asdnet_GeneralizedDiceLoss4Organs__c4_absent_class")
  logits, labels = jnp.asarray(g["in_logits"]), jnp.asarray(g["in_label"], jnp.int32)
  per_sample = losses.generalized_dice_loss_per_sample(logits, labels)
  assert abs(float(jnp.mean(per_sample)) - float(g["out_loss"])) > 1e-3
  for n in range(logits.shape[0]):
    alone = losses.generalized_dice_loss(logits[n:n + 1], labels[n:n + 1])
    assert float(per_sample[n]) == pytest.approx(float(alone), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# Hand-computed: one 2×2×2 volume, 3 classes, voxels in C order.
#
#   voxel        0     1     2     3     4     5     6     7
#   label        0     0     0     0     1     1     2     2
#   P̂ (c0,c1,c2) A     A     A     A     B     B     C     B      A = (.5,.25,.25) B = (.25,.5,.25) C = (.25,.25,.5)
#   argmax       0     0     0     0     1     1     2     1      (voxel 7 is wrong)
#
# GDL: counts t = (4, 2, 2); Σp = (3, 2.75, 2.25); Σpt = (2, 1, .75); w = 1/(t² + 1e-6)
#   numerator   = 2/16 + 1/4 + .75/4         = 0.5625          (without the 1e-6)
#   denominator = 7/16 + 4.75/4 + 4.25/4     = 2.6875, + 3·2e-6
#   loss        = 1 − 2·0.5625 / 2.6875      ≈ 0.581395
# Hard Dice: class 1 {4,5,7} vs {4,5}: 4/5; class 2 {6} vs {6,7}: 2/3; dsc = (4/5 + 2/3)/2 = 11/15.
# Masked (Eq. 6), M = (.9, .5, .9, .2, .9, .2, .9, .9), γ = .5 (strict, so voxel 1 is out): voxels {0,2,4,6,7},
#   P̄ = (0, 0, 1, 2, 1): counts (2, 2, 1); Σ mP̄P̂ = (1, 1, .5); Σ mP̂ = (1.75, 1.75, 1.5)
#   loss = 1 − 2(1/4 + 1/4 + .5/1) / ((1.75+2)/4 + (1.75+2)/4 + (1.5+1)/1) = 1 − 2/4.375 ≈ 0.542857

_A, _B, _C = (0.5, 0.25, 0.25), (0.25, 0.5, 0.25), (0.25, 0.25, 0.5)
HAND_PROBS = np.array([_A, _A, _A, _A, _B, _B, _C, _B]).reshape(1, 2, 2, 2, 3)
HAND_LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2]).reshape(1, 2, 2, 2)
HAND_CONFIDENCE = np.array([0.9, 0.5, 0.9, 0.2, 0.9, 0.2, 0.9, 0.9]).reshape(1, 2, 2, 2)
HAND_GDL = 1 - 2 * (2 / (16 + 1e-6) + 1 / (4 + 1e-6) + 0.75 / (4 + 1e-6)) / (
    7 / (16 + 1e-6) + 4.75 / (4 + 1e-6) + 4.25 / (4 + 1e-6) + 3 * 2e-6)
HAND_DSC = 11 / 15
HAND_MASKED = 1 - 2 * (1 / (4 + 1e-6) + 1 / (4 + 1e-6) + 0.5 / (1 + 1e-6)) / (
    3.75 / (4 + 1e-6) + 3.75 / (4 + 1e-6) + 2.5 / (1 + 1e-6) + 3 * 2e-6)


def _hand_inputs(dtype, two_d: bool):
  """The hand volume (3D, (1, 2, 2, 2, ·)) or the same 8 voxels as a 2D image (1, 2, 4, ·)."""
  shape = (1, 2, 4) if two_d else (1, 2, 2, 2)
  probs = jnp.asarray(HAND_PROBS.reshape(shape + (3,)), dtype)
  labels = jnp.asarray(HAND_LABELS.reshape(shape), jnp.int32)
  return probs, labels, jnp.asarray(HAND_CONFIDENCE.reshape(shape), dtype)


@pytest.mark.parametrize("two_d", [False, True], ids=["3d", "2d"])
def test_hand_computed_volume(dtype, two_d):
  probs, labels, confidence = _hand_inputs(dtype, two_d)
  one_hot = jax.nn.one_hot(labels, 3, dtype=dtype)
  # The ε terms move the rounded values of the comment by about 1e-6.
  assert HAND_GDL == pytest.approx(0.581395, abs=2e-6) and HAND_MASKED == pytest.approx(0.542857, abs=2e-6)
  rtol = 1e-6 if dtype == jnp.float32 else 1e-12
  for target in (labels, one_hot):
    np.testing.assert_allclose(losses.generalized_dice_loss(probs, target, 3, from_logits=False), HAND_GDL,
                               rtol=rtol)
    np.testing.assert_allclose(losses.generalized_dice_loss_per_sample(probs, target, from_logits=False),
                               [HAND_GDL], rtol=rtol)
    np.testing.assert_allclose(losses.per_sample_foreground_dice(probs, target), [HAND_DSC], rtol=rtol)
  np.testing.assert_allclose(losses.masked_pseudo_label_gdl(probs, confidence, 0.5), HAND_MASKED, rtol=rtol)
  # Sample attention over a batch of the perfect twin (dsc 1, weight 0) and the hand sample (weight (4/15)²).
  perfect = jnp.where(jnp.arange(8).reshape(labels.shape)[..., None] == 7, jnp.asarray(_C, dtype), probs)
  batch_probs = jnp.concatenate([perfect, probs])
  batch_labels = jnp.concatenate([labels, labels])
  np.testing.assert_allclose(losses.per_sample_foreground_dice(batch_probs, batch_labels), [1.0, HAND_DSC],
                             rtol=rtol)
  attention = losses.sample_attention_generalized_dice_loss(batch_probs, batch_labels, from_logits=False)
  np.testing.assert_allclose(attention, (4 / 15) ** 2 * HAND_GDL / 2, rtol=rtol)
  cubed = losses.sample_attention_generalized_dice_loss(batch_probs, batch_labels, beta=3.0, from_logits=False)
  np.testing.assert_allclose(cubed, (4 / 15) ** 3 * HAND_GDL / 2, rtol=rtol)


def test_dsc_counts_a_class_absent_from_prediction_and_label_as_one():
  probs, labels, _ = _hand_inputs(jnp.float32, False)
  four = jnp.concatenate([probs, jnp.zeros_like(probs[..., :1])], -1)  # class 3: never predicted nor labeled
  np.testing.assert_allclose(losses.per_sample_foreground_dice(four, labels), [(0.8 + 2 / 3 + 1) / 3], rtol=1e-6)
  # Absent from the label but predicted: Dice 0 for that class.
  background_only = jnp.zeros_like(labels)
  np.testing.assert_allclose(losses.per_sample_foreground_dice(probs, background_only), [0.0])


def test_masked_loss_matches_the_plain_gdl_on_the_selected_voxels():
  """Eq. 6 is Eq. 1 restricted to the mask with P̄ as target: compare with gdl on the gathered voxels."""
  rng = np.random.default_rng(3)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 4, 3, 5, 4)) * 2, jnp.float32), -1)
  confidence = jnp.asarray(rng.uniform(size=(2, 4, 3, 5)), jnp.float32)
  mask = np.asarray(confidence) > 0.6
  selected = np.asarray(probs)[mask][None]  # (1, V, C): a 1-sample "image" of the selected voxels
  pseudo = np.argmax(selected, -1)
  expected = losses.generalized_dice_loss(jnp.asarray(selected), jnp.asarray(pseudo), from_logits=False)
  np.testing.assert_allclose(losses.masked_pseudo_label_gdl(probs, confidence, 0.6), expected, rtol=1e-5)
  pseudo_full = jax.nn.one_hot(np.argmax(np.asarray(probs), -1), 4)
  assert float(expected) == pytest.approx(_gdl_numpy(np.asarray(probs), pseudo_full, mask), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Properties.


def test_perfect_prediction_range_and_empty_target():
  rng = np.random.default_rng(0)
  labels = jnp.asarray(rng.integers(0, 3, size=(2, 5, 6)), jnp.int32)
  one_hot = jax.nn.one_hot(labels, 3)
  perfect = losses.generalized_dice_loss(one_hot, labels, from_logits=False)
  # Only the 2e-6 per class keeps it off exactly 0: loss = C·2e-6 / (2 Σ_c w_c t_c + C·2e-6).
  counts = np.bincount(np.asarray(labels).ravel(), minlength=3).astype(np.float64)
  twice_overlap = 2 * np.sum(counts / (counts ** 2 + 1e-6))
  # float32: 1 − (a number near 1) is exact only to about 1e-7.
  assert float(perfect) == pytest.approx(6e-6 / (twice_overlap + 6e-6), abs=2e-7)
  assert 0.0 < float(perfect) < 1e-4
  assert float(losses.sample_attention_generalized_dice_loss(one_hot, labels, from_logits=False)) == 0.0
  all_confident = jnp.ones(labels.shape)
  # A one-hot P̂ is its own pseudo-label: with every voxel selected, the same value as the perfect GDL.
  assert float(losses.masked_pseudo_label_gdl(one_hot, all_confident, 0.5)) == pytest.approx(float(perfect),
                                                                                              rel=1e-6)
  for seed in range(5):
    logits = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 5, 6, 3)) * 3, jnp.float32)
    for value in (losses.generalized_dice_loss(logits, labels),
                  losses.sample_attention_generalized_dice_loss(logits, labels),
                  losses.masked_pseudo_label_gdl(jax.nn.softmax(logits), jnp.asarray(rng.uniform(size=labels.shape)),
                                                 0.5)):
      assert 0.0 <= float(value) <= 1.0
  # An all-zero target (no class anywhere): every weight is 0, so the loss is exactly 1.
  assert float(losses.generalized_dice_loss(jax.nn.softmax(logits), jnp.zeros_like(one_hot),
                                            from_logits=False)) == 1.0


def test_empty_mask_gives_zero_and_zero_gradient():
  probs, _, _ = _hand_inputs(jnp.float32, False)
  # Every voxel at or below γ: strict, so nothing is selected (the value at γ itself is excluded).
  confidence = jnp.asarray([0.5, 0.1, 0.0, 0.5, 0.3, 0.2, 0.4, 0.5]).reshape(1, 2, 2, 2)
  loss_fn = jax.jit(losses.masked_pseudo_label_gdl)
  value, grad = jax.value_and_grad(loss_fn)(probs, confidence, 0.5)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)
  # One voxel just above γ makes it non-empty again (a nonzero value with a nonzero gradient).
  value, grad = jax.value_and_grad(loss_fn)(probs, confidence.at[0, 0, 0, 0].set(0.51), 0.5)
  assert float(value) > 0.0 and np.any(np.asarray(grad) != 0.0)


# ---------------------------------------------------------------------------------------------------
# Gradients (float64): central differences, and the stop-gradient proofs.


def _random_probs(shape, seed, dtype=jnp.float64):
  logits = np.random.default_rng(seed).normal(size=shape) * 1.5
  return jax.nn.softmax(jnp.asarray(logits, dtype), -1)


def _central_differences(fn, x, indices, eps=1e-6):
  """d fn / d x at the given multi-indices, by (f(x + ε) − f(x − ε)) / 2ε."""
  out = []
  for index in indices:
    plus, minus = x.at[index].add(eps), x.at[index].add(-eps)
    out.append((float(fn(plus)) - float(fn(minus))) / (2 * eps))
  return np.array(out)


_FD_INDICES = [(0, 0, 0, 0, 0), (0, 1, 2, 1, 1), (1, 2, 0, 1, 2), (1, 3, 1, 0, 0)]


def test_gradients_match_central_differences(x64):
  probs = _random_probs((2, 4, 3, 2, 3), seed=1)
  labels = jnp.asarray(np.random.default_rng(2).integers(0, 3, size=(2, 4, 3, 2)), jnp.int32)
  confidence = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 4, 3, 2)))
  cases = {
      "gdl": lambda p: losses.generalized_dice_loss(p, labels, from_logits=False),
      "gdl_one_hot": lambda p: losses.generalized_dice_loss(p, jax.nn.one_hot(labels, 3), from_logits=False),
      "gdl_per_sample": lambda p: jnp.sum(losses.generalized_dice_loss_per_sample(p, labels, from_logits=False)
                                          * jnp.array([0.3, 1.7])),
      "attention": lambda p: losses.sample_attention_generalized_dice_loss(p, labels, from_logits=False),
      "attention_logits": lambda p: losses.sample_attention_generalized_dice_loss(p, labels),
      "masked": lambda p: losses.masked_pseudo_label_gdl(p, confidence, 0.5),
  }
  # The ε steps (1e-6) cannot flip an argmax or a mask here: the nearest tie is far larger.
  top2 = np.sort(np.asarray(probs), -1)[..., -2:]
  assert np.min(top2[..., 1] - top2[..., 0]) > 1e-4
  for name, fn in cases.items():
    fn = jax.jit(fn)
    grad = jax.grad(fn)(probs)
    assert np.any(np.asarray(grad) != 0.0), name
    numeric = _central_differences(fn, probs, _FD_INDICES)
    analytic = np.array([float(grad[i]) for i in _FD_INDICES])
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9, err_msg=name)
    check_grads(fn, (probs,), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


def test_the_attention_factor_carries_no_gradient(x64):
  """dsc is a constant: d/dP of (1 − dsc)^β is zero, also with respect to a float one-hot target, and the
  gradient of the attention loss equals that of the per-sample GDL weighted by constants computed outside."""
  probs = _random_probs((3, 4, 4, 3), seed=5)
  labels = jnp.asarray(np.random.default_rng(6).integers(0, 3, size=(3, 4, 4)), jnp.int32)
  one_hot = jax.nn.one_hot(labels, 3)
  factor = lambda p, t: jnp.sum((1.0 - losses.per_sample_foreground_dice(p, t)) ** 2)
  d_probs, d_target = jax.grad(factor, (0, 1))(probs, one_hot)
  assert np.all(np.asarray(d_probs) == 0.0) and np.all(np.asarray(d_target) == 0.0)

  dsc = np.asarray(losses.per_sample_foreground_dice(probs, labels))
  assert np.all((dsc > 0) & (dsc < 1))  # every sample has a nonzero weight and a nonzero dsc
  constant_weights = jnp.asarray((1.0 - dsc) ** 2)
  for target in (labels, one_hot):
    attention = lambda p: losses.sample_attention_generalized_dice_loss(p, target, from_logits=False)
    weighted = lambda p: jnp.mean(constant_weights
                                  * losses.generalized_dice_loss_per_sample(p, target, from_logits=False))
    assert float(attention(probs)) == pytest.approx(float(weighted(probs)), rel=1e-12)
    np.testing.assert_allclose(jax.grad(attention)(probs), jax.grad(weighted)(probs), rtol=1e-12, atol=1e-16)


def test_mask_and_pseudo_label_carry_no_gradient(x64):
  """Compare with Eq. 6 written out with the mask and P̄ computed outside as NumPy constants."""
  probs = _random_probs((2, 5, 4, 3), seed=7)
  confidence = jnp.asarray(np.random.default_rng(8).uniform(size=(2, 5, 4)))
  gamma = 0.4
  mask = jnp.asarray((np.asarray(confidence) > gamma)[..., None], jnp.float64)
  pseudo = jnp.asarray(jax.nn.one_hot(np.argmax(np.asarray(probs), -1), 3))
  count = jnp.sum(mask * pseudo, axis=(0, 1, 2))
  weight = jnp.where(count > 0, 1.0 / (count ** 2 + 1e-6), 0.0)

  def constants_outside(p):
    numerator = jnp.sum(weight * jnp.sum(mask * pseudo * p, axis=(0, 1, 2)))
    denominator = jnp.sum(weight * (jnp.sum(mask * p, axis=(0, 1, 2)) + count) + 2e-6)
    return 1.0 - 2.0 * numerator / denominator

  loss = lambda p, m: losses.masked_pseudo_label_gdl(p, m, gamma)
  assert float(loss(probs, confidence)) == pytest.approx(float(constants_outside(probs)), rel=1e-12)
  d_probs, d_confidence = jax.grad(loss, (0, 1))(probs, confidence)
  np.testing.assert_allclose(d_probs, jax.grad(constants_outside)(probs), rtol=1e-12, atol=1e-16)
  assert np.all(np.asarray(d_confidence) == 0.0)


# ---------------------------------------------------------------------------------------------------
# The confidence network's CE terms, per-voxel means: expressible with `losses.cross_entropy`.


@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 4)], ids=["2d", "3d"])
def test_confidence_network_ce_terms_are_cross_entropy_with_a_constant_class(spatial):
  """mean_v CE(D(x), real) = cross_entropy(d_logits, ones), fake = zeros; M = softmax(D)[..., 1]."""
  d_logits = jnp.asarray(np.random.default_rng(9).normal(size=(2,) + spatial + (2,)), jnp.float32)
  real = losses.cross_entropy(d_logits, jnp.ones((2,) + spatial, jnp.int32))
  fake = losses.cross_entropy(d_logits, jnp.zeros((2,) + spatial, jnp.int32))
  m = np.asarray(jax.nn.softmax(d_logits, -1))[..., 1].astype(np.float64)
  assert float(real) == pytest.approx(float(np.mean(-np.log(m))), rel=1e-5)
  assert float(fake) == pytest.approx(float(np.mean(-np.log(1 - m))), rel=1e-5)
  # The same as the mean BCE on M (a 2-way CE over (a, b) is BCE on σ(b − a)).
  assert float(real) == pytest.approx(float(losses.binary_cross_entropy(jnp.asarray(m), jnp.ones(m.shape))),
                                      rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Static checks.


def test_shape_mismatches_raise():
  probs = jnp.full((1, 2, 2, 2, 3), 1 / 3)
  with pytest.raises(ValueError, match="without a channel axis"):
    losses.masked_pseudo_label_gdl(probs, jnp.ones((1, 2, 2, 2, 1)), 0.5)
  with pytest.raises(ValueError, match="num_classes=4"):
    losses.generalized_dice_loss(probs, jnp.zeros((1, 2, 2, 2, 3)), 4, from_logits=False)
  with pytest.raises(ValueError, match="without a channel axis"):
    losses.generalized_dice_loss(probs, jnp.zeros((1, 2, 2, 2, 4)), from_logits=False)
  with pytest.raises(ValueError, match="at least 2"):
    losses.per_sample_foreground_dice(probs[..., :1], jnp.zeros((1, 2, 2, 2), jnp.int32))
