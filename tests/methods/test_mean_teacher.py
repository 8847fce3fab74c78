"""Tests of jaxseg.methods.mean_teacher (docs/methods/mean_teacher.md): losses against NumPy, the EMA
teacher, the noise, the student's single forward, a few jitted V-Net steps on tiny 3D data, predict.

One jitted train step is compiled per module (16^3 volumes, V-Net base width 4) and shared by the
fixtures; most XLA optimisations are off (compile time dominates on a CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import jit_init, learnable_batch, prediction_inputs, run_steps, small_config
from jaxseg.data.batches import Batch
from jaxseg.methods import base, ema, mean_teacher

PATCH = (16, 16, 16)


pytestmark = pytest.mark.usefixtures("fast_compile")


def _config(num_classes: int = 2, **method) -> ml_collections.ConfigDict:
  return small_config(mean_teacher, num_classes, **method)


def _batch(b_l: int = 2, b_u: int = 2, seed: int = 0) -> Batch:
  return learnable_batch(PATCH, b_l, b_u, seed)


@pytest.fixture(scope="module")
def batch():
  return _batch()


@pytest.fixture(scope="module")
def state0(batch):
  return jit_init(mean_teacher, _config(), batch)


@pytest.fixture(scope="module")
def trajectory(state0, batch):
  """[(state after step t, metrics of step t)] for t = 0, 1, 2 (one jitted step, keys 10 + t)."""
  return run_steps(mean_teacher.train_step, state0, batch, 3)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------------------------
# Losses against NumPy transcriptions.


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _ce(logits, labels):
  p = _softmax(logits)
  return -np.mean(np.log(np.take_along_axis(p, labels[..., None], -1)))


def _dice_sq(p, y):
  return 1 - (2 * np.sum(p * y) + 1e-5) / (np.sum(p * p) + np.sum(y * y) + 1e-5)


def test_losses_equal_numpy_formulas():
  rng = np.random.default_rng(0)
  labeled = rng.normal(size=(2, 4, 3, 5, 2)) * 2
  labels = rng.integers(0, 2, size=(2, 4, 3, 5))
  student_u = rng.normal(size=(3, 4, 3, 5, 2)) * 2
  teacher_u = rng.normal(size=(3, 4, 3, 5, 2)) * 2
  f32 = lambda a: jnp.asarray(a, jnp.float32)

  # Consistency: mean over unlabeled samples, voxels and channels of the softmax MSE.
  expected_c = np.mean((_softmax(student_u) - _softmax(teacher_u)) ** 2)
  np.testing.assert_allclose(mean_teacher.consistency_loss(f32(student_u), f32(teacher_u)),
                             expected_c, rtol=1e-5)
  # The teacher's logits are a constant target.
  grad_t = jax.grad(mean_teacher.consistency_loss, argnums=1)(f32(student_u), f32(teacher_u))
  assert not np.any(grad_t)

  # L = 0.5·(CE + dice_sq(p₁, y)) + w·L_c.
  loss_seg = 0.5 * (_ce(labeled, labels) + _dice_sq(_softmax(labeled)[..., 1], labels))
  loss, aux = mean_teacher.total_loss(f32(labeled), jnp.asarray(labels), f32(expected_c), 0.37,
                                      num_classes=2)
  np.testing.assert_allclose(aux["loss_seg"], loss_seg, rtol=1e-5)
  np.testing.assert_allclose(loss, loss_seg + 0.37 * expected_c, rtol=1e-5)
  np.testing.assert_allclose(aux["loss_consistency"], expected_c, rtol=1e-6)
  assert aux["consistency_weight"] == 0.37


def test_consistency_weight_is_the_la_ramp():
  hp = ml_collections.FrozenConfigDict(dict(consistency=0.1, consistency_rampup=40.0,
                                            rampup_block=150))
  steps = np.array([0, 149, 150, 3000, 5999, 6000, 9000])
  expected = 0.1 * np.exp(-5 * (1 - np.minimum(steps // 150, 40) / 40) ** 2)
  got = jax.jit(lambda t: mean_teacher.consistency_weight(t, hp))(jnp.asarray(steps))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# EMA helpers and noise.


def test_ema_decay_and_update():
  steps = np.arange(0, 300)
  got = jax.jit(lambda t: ema.ema_decay(t, 0.99))(jnp.asarray(steps, jnp.int32))
  np.testing.assert_allclose(got, np.minimum(1 - 1 / (steps + 1), 0.99), rtol=1e-6)
  assert float(got[0]) == 0.0 and float(got[-1]) == pytest.approx(0.99)
  teacher = {"a": jnp.array([1.0, -2.0]), "b": {"c": jnp.array(3.0)}}
  student = {"a": jnp.array([5.0, 2.0]), "b": {"c": jnp.array(-1.0)}}
  new = ema.ema_update(teacher, student, jnp.float32(0.75))
  np.testing.assert_allclose(new["a"], [2.0, -1.0])
  np.testing.assert_allclose(new["b"]["c"], 2.0)
  # α = 0 copies the student exactly.
  copy = ema.ema_update(teacher, student, jnp.float32(0.0))
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(copy), _leaves(student)))


def test_teacher_noise_is_clipped_gaussian():
  x = jnp.full((200_000,), 3.0)
  noise = np.asarray(mean_teacher.teacher_noise(jax.random.key(0), x)) - 3.0
  assert np.abs(noise).max() <= 0.2 + 1e-6
  clipped = np.abs(np.abs(noise) - 0.2) < 1e-6
  # P(|N(0, 0.1²)| > 0.2) = 4.55 %.
  assert 0.040 < clipped.mean() < 0.051
  assert abs(noise.mean()) < 1e-3
  inner = noise[~clipped]
  # Std of N(0, 0.01) truncated at ±2σ: 0.1·0.8796.
  assert inner.std() == pytest.approx(0.08796, rel=0.02)
  # Fresh keys give fresh noise.
  other = np.asarray(mean_teacher.teacher_noise(jax.random.key(1), x)) - 3.0
  assert not np.allclose(noise, other)


# ------------------------------------------------------------------------------------------------
# The jitted step.


def test_init_teacher_is_an_independent_network(state0):
  assert jax.tree.structure(state0.teacher.params) == jax.tree.structure(state0.student.params)
  assert not any(np.array_equal(a, b) for a, b in zip(_leaves(state0.teacher.params),
                                                      _leaves(state0.student.params))
                 if a.size > 1 and a.std() > 0)
  assert jax.tree.structure(state0.teacher.batch_stats) == jax.tree.structure(
      state0.student.batch_stats)
  assert set(type(state0.teacher).__dataclass_fields__) == {"params", "batch_stats"}  # no optimiser


def test_first_step_copies_the_student_then_ema(state0, trajectory):
  (s1, m1), (s2, m2), (s3, m3) = trajectory
  assert [m["ema_decay"] for m in (m1, m2, m3)] == pytest.approx([0.0, 0.5, 2 / 3])
  # After step 0 (α = 0) the teacher is the student.
  for t, s in zip(_leaves(s1.teacher.params), _leaves(s1.student.params)):
    np.testing.assert_array_equal(t, s)
  # After step t: α_t·old teacher + (1 − α_t)·new student.
  for (prev, state), alpha in (((s1, s2), 0.5), ((s2, s3), 2 / 3)):
    for old, new, teacher in zip(_leaves(prev.teacher.params), _leaves(state.student.params),
                                 _leaves(state.teacher.params)):
      np.testing.assert_allclose(teacher, alpha * old + (1 - alpha) * new, rtol=1e-6, atol=1e-7)
  # The student moved, so the teacher lags it.
  assert any(not np.allclose(t, s) for t, s in zip(_leaves(s3.teacher.params),
                                                   _leaves(s3.student.params)))


def test_teacher_keeps_its_own_batch_statistics(state0, trajectory, batch):
  """The teacher's BN statistics are those of its own train-mode pass, not the student's."""
  (s1, _), _, _ = trajectory
  key = jax.random.key(10)
  student_key, noise_key, dropout_key = jax.random.split(key, 3)

  @jax.jit
  def forwards(state):
    _, teacher_stats = mean_teacher.teacher_forward(
        state.student, state.teacher, mean_teacher.teacher_noise(noise_key, batch.unlabeled["image"]),
        dropout_key)
    _, student_stats = base.forward_train(
        state.student, state.student.params, jnp.concatenate([batch.labeled["image"], batch.unlabeled["image"]]),
        student_key)
    return teacher_stats, student_stats

  teacher_stats, student_stats = forwards(state0)
  for a, b in zip(_leaves(s1.teacher.batch_stats), _leaves(teacher_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The student's BN statistics come from ONE forward of the whole batch (labeled + unlabeled).
  for a, b in zip(_leaves(s1.student.batch_stats), _leaves(student_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(not np.allclose(a, b) for a, b in zip(_leaves(s1.teacher.batch_stats),
                                                   _leaves(s1.student.batch_stats)))


def test_steps_are_finite_and_train_the_student(state0, trajectory):
  (s1, m1), _, (s3, m3) = trajectory
  assert set(m1) == {"loss", "loss_seg", "loss_consistency", "consistency_weight",
                     "learning_rate", "ema_decay"}
  for _, m in trajectory:
    assert all(np.isfinite(v) for v in m.values())
    assert m["loss"] == pytest.approx(m["loss_seg"] + m["consistency_weight"]
                                      * m["loss_consistency"], rel=1e-6)
    assert m["consistency_weight"] == pytest.approx(0.1 * np.exp(-5), rel=1e-6)
    assert m["learning_rate"] == pytest.approx(0.01)
  assert m1["loss_consistency"] > 0
  kernels = lambda t: [x for path, x in jax.tree_util.tree_leaves_with_path(t)
                       if path[-1].key == "kernel"]
  assert all(not np.array_equal(a, b) for a, b in zip(_leaves(kernels(s1.student.params)),
                                                      _leaves(kernels(state0.student.params))))
  assert int(s3.student.step) == 3


def test_predict_returns_student_probabilities(trajectory, batch):
  (_, _), _, (state, _) = trajectory
  out = jax.jit(mean_teacher.predict)(state, prediction_inputs(batch.unlabeled["image"]))
  assert set(out) == {"model"}
  probs = np.asarray(out["model"])
  assert probs.shape == (2, *PATCH, 2)
  assert probs.min() >= 0 and probs.max() <= 1
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_config_errors(batch):
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="data.num_classes"):
    mean_teacher.init(key, _config(num_classes=1), batch)
  with pytest.raises(ValueError, match="data.batch_unlabeled"):
    mean_teacher.init(key, _config(), _batch(b_u=0))
  assert mean_teacher.default_config().model.to_dict() == dict(name="vnet", n_filters=16,
                                                               dtype="float32")
