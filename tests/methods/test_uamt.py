"""Tests of jaxseg.methods.uamt (docs/methods/uamt.md): uncertainty, threshold, mask and masked
consistency against the reference's golden outputs and NumPy; the T teacher passes (keys, vmapped
rounds = separate calls, the reference's grouping); a few jitted V-Net steps on tiny 3D data;
presets. One jitted train step per module (16^3 volumes, V-Net base width 4), shared by fixtures.

Golden files (`tests/golden/`, see their meta_json):
- `ssl4mis_uamt_uncertainty_consistency__{2d_c4,3d_c2}_iter1500`: the SSL4MIS UA-MT training-loop
  lines run unchanged at iteration 1500 (max 30000, consistency ramp 200): ln 2 and the factor 2 are
  hard-coded, also for C = 4, i.e. our "released" preset. Their supervised loss is SSL4MIS's
  0.5·(DiceLoss(C) + CE), background included; ours for C = 2 is UA-MT's class-1 Dice (checked
  separately), so for 3d_c2 only the consistency part of the total is compared.
- `uamt_threshold_schedule__default`: H(t) = (0.75 + 0.25·sigmoid_rampup(t, 6000))·ln 2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import jit_init, learnable_batch, load_golden, prediction_inputs, run_steps, small_config
from jaxseg import schedules
from jaxseg.data.batches import Batch
from jaxseg.methods import base, ema, mean_teacher, uamt
from jaxseg.models.layers import BN_MOMENTUM

PATCH = (16, 16, 16)
SSL4MIS_GOLDEN = ("ssl4mis_uamt_uncertainty_consistency__2d_c4_iter1500",
                  "ssl4mis_uamt_uncertainty_consistency__3d_c2_iter1500")


pytestmark = pytest.mark.usefixtures("fast_compile")


def _config(num_classes: int = 2, **method) -> ml_collections.ConfigDict:
  return small_config(uamt, num_classes, **method)


def _batch(b_l: int = 2, b_u: int = 2, seed: int = 0) -> Batch:
  return learnable_batch(PATCH, b_l, b_u, seed)


@pytest.fixture(scope="module")
def batch():
  return _batch()


@pytest.fixture(scope="module")
def state0(batch):
  return jit_init(uamt, _config(), batch)


@pytest.fixture(scope="module")
def trajectory(state0, batch):
  """[(state after step t, metrics of step t)] for t = 0, 1 (one jitted step, keys 10 + t)."""
  return run_steps(uamt.train_step, state0, batch, 2)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------------------------
# NumPy transcriptions (docs/methods/uamt.md).


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _uncertainty(mc_logits):
  mean = _softmax(mc_logits).mean(0)
  return -np.sum(mean * np.log(mean + 1e-6), -1, keepdims=True)


def _threshold(step, rampup, classes):
  return (0.75 + 0.25 * np.exp(-5 * (1 - min(step, rampup) / rampup) ** 2)) * np.log(classes)


def _masked_consistency(student, teacher, mask, classes):
  squared = (_softmax(student) - _softmax(teacher)) ** 2
  return np.sum(mask * squared) / (classes * mask.sum() + 1e-16)


def _ce(logits, labels):
  return -np.mean(np.log(np.take_along_axis(_softmax(logits), labels[..., None], -1)))


def _dice_sq(p, y):
  return 1 - (2 * np.sum(p * y) + 1e-5) / (np.sum(p * p) + np.sum(y * y) + 1e-5)


# ------------------------------------------------------------------------------------------------
# Golden files.


def _tolerance(dtype):
  """float64 port vs the float64 reference: 1e-10; float32: rtol 1e-5 (golden README)."""
  return dict(rtol=1e-10, atol=0.0) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", SSL4MIS_GOLDEN)
def test_uncertainty_mask_consistency_equal_the_reference(name, dtype):
  g = load_golden(name)
  params = g["meta"]["params"]
  assert (params["T"], params["labeled_bs"]) == (8, 2)
  num_classes, lb = params["num_classes"], params["labeled_bs"]
  step, rampup = int(g["in_iter_num"]), int(g["in_max_iterations"])
  tol = _tolerance(dtype)
  with jax.enable_x64(dtype == "float64"):
    as_jax = lambda key: jnp.asarray(g[key], dtype)
    teacher, student, ema = (as_jax(k) for k in ("in_teacher_logits", "in_student_logits",
                                                  "in_ema_logits"))
    # The reference hard-codes ln 2 and 2 for any C: our "released"; for C = 2 also "paper".
    classes = uamt.mask_classes("released", num_classes)
    assert classes == 2
    assert uamt.mask_classes("paper", num_classes) == num_classes

    # Threshold: host (float64, as the reference) and traced.
    threshold = uamt.uncertainty_threshold(step, rampup, classes)
    np.testing.assert_allclose(threshold, g["out_threshold"], rtol=1e-14)
    traced = jax.jit(uamt.uncertainty_threshold, static_argnums=(1, 2))(jnp.asarray(step), rampup,
                                                                         classes)
    np.testing.assert_allclose(traced, g["out_threshold"], **tol)

    mean = jax.jit(uamt.mean_probabilities)(teacher)
    np.testing.assert_allclose(mean, g["out_teacher_mean_probs"], **tol)
    mask, uncertainty = jax.jit(uamt.uncertainty_mask)(teacher, traced)
    np.testing.assert_allclose(uncertainty, g["out_uncertainty"], **tol)
    assert mask.shape == g["out_mask"].shape
    np.testing.assert_array_equal(mask, g["out_mask"])  # smallest |u − H| in the files: 2.4e-6
    assert 0 < float(mask.mean()) < 1

    loss_c = jax.jit(uamt.masked_consistency, static_argnums=3)(student[lb:], ema, mask, classes)
    np.testing.assert_allclose(loss_c, g["out_consistency_loss"], **tol)
    weight = schedules.consistency_weight(jnp.asarray(step), params["consistency"],
                                          params["consistency_rampup"])
    np.testing.assert_allclose(weight, g["out_consistency_weight"], **tol)

    labels = g["in_label"][:lb]
    loss, aux = mean_teacher.total_loss(student[:lb], jnp.asarray(labels), loss_c, weight,
                                        num_classes)
    np.testing.assert_allclose(loss, aux["loss_seg"] + weight * loss_c, **tol)
    if num_classes > 2:
      # For C > 2 our supervised loss is SSL4MIS's 0.5·(DiceLoss(C) + CE): the whole loss matches.
      np.testing.assert_allclose(aux["loss_seg"], g["out_supervised_loss"], **tol)
      np.testing.assert_allclose(loss, g["out_loss"], **tol)
    else:
      # For C = 2 it is UA-MT's 0.5·(CE + Dice of class 1); SSL4MIS's DiceLoss(2) averages both
      # classes, so only the consistency part of the reference's total is ours.
      logits = g["in_student_logits"][:lb]
      np.testing.assert_allclose(
          aux["loss_seg"], 0.5 * (_ce(logits, labels) + _dice_sq(_softmax(logits)[..., 1], labels)),
          **tol)
      assert abs(float(aux["loss_seg"]) - float(g["out_supervised_loss"])) > 1e-3
      np.testing.assert_allclose(weight * loss_c, g["out_loss"] - g["out_supervised_loss"], **tol)


def test_paper_preset_uses_ln_c_and_c():
  """For C = 4 "paper" divides by 4·Σm and thresholds at a fraction of ln 4 (NumPy)."""
  g = load_golden(SSL4MIS_GOLDEN[0])
  teacher, student, ema = g["in_teacher_logits"], g["in_student_logits"], g["in_ema_logits"]
  step, rampup = int(g["in_iter_num"]), int(g["in_max_iterations"])
  classes = uamt.mask_classes("paper", 4)
  threshold = uamt.uncertainty_threshold(step, rampup, classes)
  np.testing.assert_allclose(threshold, _threshold(step, rampup, 4), rtol=1e-14)
  np.testing.assert_allclose(threshold, g["out_threshold"] * 2, rtol=1e-14)  # ln 4 = 2 ln 2
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  mask, _ = uamt.uncertainty_mask(f32(teacher), threshold)
  expected_mask = (_uncertainty(teacher) < _threshold(step, rampup, 4)).astype(np.float32)
  np.testing.assert_array_equal(mask, expected_mask)
  assert expected_mask.sum() > g["out_mask"].sum()  # the higher threshold keeps more voxels
  np.testing.assert_allclose(uamt.masked_consistency(f32(student[2:]), f32(ema), mask, classes),
                             _masked_consistency(student[2:], ema, expected_mask, 4), rtol=1e-5)


def test_threshold_schedule_equals_the_reference():
  g = load_golden("uamt_threshold_schedule__default")
  steps, rampup = g["in_iter_num"], int(g["in_max_iterations"])
  assert rampup == uamt.default_config().threshold_rampup == 6000
  np.testing.assert_allclose(uamt.uncertainty_threshold(steps, rampup, 2), g["out_threshold"],
                             rtol=1e-14)
  traced = jax.jit(lambda t: uamt.uncertainty_threshold(t, float(rampup), 2))(
      jnp.asarray(steps, jnp.int32))
  np.testing.assert_allclose(traced, g["out_threshold"], rtol=1e-6)


def test_uncertainty_and_consistency_equal_numpy_3_classes():
  rng = np.random.default_rng(1)
  mc = rng.normal(size=(8, 2, 4, 4, 3, 3)) * 2
  student = rng.normal(size=(2, 4, 4, 3, 3)) * 2
  teacher = rng.normal(size=(2, 4, 4, 3, 3)) * 2
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  threshold = _threshold(3000, 6000, 3)
  mask, u = uamt.uncertainty_mask(f32(mc), threshold)
  np.testing.assert_allclose(u, _uncertainty(mc), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(mask, (_uncertainty(mc) < threshold).astype(np.float32))
  assert 0 < float(mask.mean()) < 1
  np.testing.assert_allclose(uamt.masked_consistency(f32(student), f32(teacher), mask, 3),
                             _masked_consistency(student, teacher, np.asarray(mask), 3), rtol=1e-5)
  # The teacher's logits are a constant target; an empty mask gives 0, not NaN.
  grad_t = jax.grad(uamt.masked_consistency, argnums=1)(f32(student), f32(teacher), mask, 3)
  assert not np.any(grad_t)
  assert float(uamt.masked_consistency(f32(student), f32(teacher), jnp.zeros_like(mask), 3)) == 0


def test_presets():
  assert uamt.default_config().preset == "paper"
  assert uamt.mask_classes("paper", 2) == uamt.mask_classes("released", 2) == 2
  assert (uamt.mask_classes("paper", 4), uamt.mask_classes("released", 4)) == (4, 2)
  with pytest.raises(ValueError, match="method.preset"):
    uamt.init(jax.random.key(0), _config(preset="code"), _batch())


# ------------------------------------------------------------------------------------------------
# The T teacher passes.


def test_chain_running_stats_equals_sequential_updates():
  rng = np.random.default_rng(0)
  start, batch_means = rng.normal(size=5), rng.normal(size=(4, 5))
  per_round = BN_MOMENTUM * start + (1 - BN_MOMENTUM) * batch_means
  expected = start
  for m in batch_means:
    expected = BN_MOMENTUM * expected + (1 - BN_MOMENTUM) * m
  np.testing.assert_allclose(uamt.chain_running_stats({"a": start}, {"a": per_round})["a"],
                             expected, rtol=1e-12)


def test_vmapped_rounds_equal_separate_calls(state0, batch):
  """4 rounds in one vmapped call = 4 teacher passes in turn (own BN batch statistics, threaded
  running statistics); rows are the reference's t·B_u + b; all 8 passes differ.

  In float64: in float32 the two differ by rounding only (≈1e-4 on logits: BatchNorm over the 4
  values of the 1-voxel bottleneck amplifies it); in float64 they agree to ≈1e-13.
  """
  with jax.enable_x64(True):
    f64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    student = state0.student.replace(params=f64(state0.student.params))
    # Non-trivial teacher BN running statistics (train mode must not read them, the chain must).
    teacher = ema.Teacher(
        params=f64(state0.teacher.params),
        batch_stats=jax.tree.map(lambda a: a + 0.5, f64(state0.teacher.batch_stats)))
    key = jax.random.key(3)
    x_u = jnp.asarray(batch.unlabeled["image"], jnp.float64)

    @jax.jit
    def vmapped(teacher):
      return uamt.mc_teacher_logits(student, teacher, x_u, key)

    @jax.jit
    def one_pass(teacher, stats, round_key):
      noise_key, dropout_key = jax.random.split(round_key)
      x = jnp.concatenate([x_u, x_u])
      return mean_teacher.teacher_forward(student, teacher,
                                          mean_teacher.teacher_noise(noise_key, x), dropout_key,
                                          batch_stats=stats)

    logits, stats = vmapped(teacher)
    b_u = x_u.shape[0]
    assert logits.shape == (8, b_u, *PATCH, 2) and logits.dtype == jnp.float64
    sequential_stats = teacher.batch_stats
    for r, round_key in enumerate(jax.random.split(key, uamt.MC_ROUNDS)):
      out, sequential_stats = one_pass(teacher, sequential_stats, round_key)
      for copy in range(2):  # round r's rows [u_0, u_1, u_0, u_1] are passes 2r, 2r + 1
        np.testing.assert_allclose(logits[2 * r + copy], out[copy * b_u:(copy + 1) * b_u],
                                   rtol=1e-10, atol=1e-12)
    for a, b in zip(_leaves(stats), _leaves(sequential_stats)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    assert all(not np.allclose(a, b) for a, b in zip(_leaves(stats),
                                                     _leaves(teacher.batch_stats)))
  # Distinct noise and dropout per pass: the 8 maps of each sample are pairwise different.
  probs = _softmax(np.asarray(logits))
  for b in range(b_u):
    for i in range(8):
      for j in range(i + 1, 8):
        assert np.abs(probs[i, b] - probs[j, b]).max() > 1e-3, (b, i, j)


# ------------------------------------------------------------------------------------------------
# The jitted step.


def test_step_losses_equal_numpy_recomputation(state0, batch, trajectory):
  """Step 0's loss, mask and consistency recomputed from the pieces with the step's keys."""
  (_, m), _ = trajectory
  student_key, noise_key, dropout_key, mc_key = jax.random.split(jax.random.key(10), 4)

  @jax.jit
  def pieces(state):
    target, stats = mean_teacher.teacher_forward(
        state.student, state.teacher, mean_teacher.teacher_noise(noise_key, batch.unlabeled["image"]),
        dropout_key)
    mc, _ = uamt.mc_teacher_logits(state.student, state.teacher, batch.unlabeled["image"], mc_key,
                                   batch_stats=stats)
    logits, _ = base.forward_train(state.student, state.student.params,
                                   jnp.concatenate([batch.labeled["image"], batch.unlabeled["image"]]), student_key)
    return target, mc, logits

  target, mc, logits = (np.asarray(a, np.float64) for a in pieces(state0))
  threshold = _threshold(0, 6000, 2)
  mask = (_uncertainty(mc) < threshold).astype(np.float64)
  loss_c = _masked_consistency(logits[2:], target, mask, 2)
  loss_seg = 0.5 * (_ce(logits[:2], batch.labeled["label"])
                    + _dice_sq(_softmax(logits[:2])[..., 1], batch.labeled["label"]))
  weight = 0.1 * math.exp(-5)
  assert m["uncertainty_threshold"] == pytest.approx(threshold, rel=1e-6)
  assert m["mask_fraction"] == mask.mean()  # a count over 2·16³ voxels: exact in float32
  assert 0 < m["mask_fraction"] < 1
  assert m["consistency_weight"] == pytest.approx(weight, rel=1e-6)
  assert m["loss_consistency"] == pytest.approx(loss_c, rel=1e-5)
  assert m["loss_seg"] == pytest.approx(loss_seg, rel=1e-5)
  assert m["loss"] == pytest.approx(loss_seg + weight * loss_c, rel=1e-5)


def test_steps_train_the_student_and_average_the_teacher(state0, trajectory, batch):
  (s1, m1), (s2, m2) = trajectory
  assert set(m1) == {"loss", "loss_seg", "loss_consistency", "consistency_weight",
                     "learning_rate", "ema_decay", "uncertainty_threshold", "mask_fraction"}
  assert all(np.isfinite(v) for _, m in trajectory for v in m.values())
  assert (m1["ema_decay"], m2["ema_decay"]) == (0.0, 0.5)
  for t, s in zip(_leaves(s1.teacher.params), _leaves(s1.student.params)):
    np.testing.assert_array_equal(t, s)
  for old, new, teacher in zip(_leaves(s1.teacher.params), _leaves(s2.student.params),
                               _leaves(s2.teacher.params)):
    np.testing.assert_allclose(teacher, 0.5 * old + 0.5 * new, rtol=1e-6, atol=1e-7)
  kernels = lambda t: [x for path, x in jax.tree_util.tree_leaves_with_path(t)
                       if path[-1].key == "kernel"]
  assert all(not np.array_equal(a, b) for a, b in zip(_leaves(kernels(s2.student.params)),
                                                      _leaves(kernels(s1.student.params))))
  # The teacher's running statistics moved (9 train-mode passes per step), the student's too.
  assert all(not np.array_equal(a, b) for a, b in zip(_leaves(s1.teacher.batch_stats),
                                                      _leaves(state0.teacher.batch_stats)))
  out = jax.jit(uamt.predict)(s2, prediction_inputs(batch.labeled["image"]))
  probs = np.asarray(out["model"])
  assert set(out) == {"model"} and probs.shape == (2, *PATCH, 2)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
