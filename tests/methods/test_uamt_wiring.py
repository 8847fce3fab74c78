"""UA-MT's wiring: `predict` is the softmax of the STUDENT's eval-mode logits, and one train step at
step 3000 equals the step recomputed here, for C = 3 classes and the `paper` preset (ln C, C·Σm):

    keys: student, noise, dropout, mc = split(rng, 4)
    t_𝓤 = teacher (train mode) on x_𝓤 + ξ(noise), dropout key `dropout`
    T = 8 passes: for each of the 4 keys split(mc, 4): (noise_r, dropout_r) = split(key); teacher
          on [x_𝓤; x_𝓤] + ξ(noise_r), dropout key dropout_r; BN running statistics threaded through
          the target pass then the 4 rounds in turn (the reference's separate calls)
    μ = mean of the T softmax maps; u = −Σ_c μ_c ln(μ_c + 1e-6)
    H(t) = (0.75 + 0.25·sigmoid_rampup(t, threshold_rampup))·ln C   (per STEP, not per block)
    m = 1[u < H];  L_c = Σ m·(softmax s_𝓤 − softmax t_𝓤)² / (C·Σm + 1e-16)
    L = 0.5·(CE + mean_c dice_sq(p_c, 1[y = c]))(𝓛) + w(t)·L_c;  SGD;  EMA as Mean Teacher

ξ(key) = clip(0.1·N(key), ±0.2). Non-default threshold_rampup (t and ⌊t / 150⌋ give different
thresholds), consistency, rampup, block and ema_decay; a 2D V-Net; float64 (`written_out`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import written_out as wo
from conftest import jit_init, predict_probs, small_config, two_stream_batch
from jaxseg import losses
from jaxseg.methods import uamt

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH = (32, 32)
NUM_CLASSES = 3
HP = dict(preset="paper", threshold_rampup=4000, ema_decay=0.9, consistency=0.8,
          consistency_rampup=50.0, rampup_block=100)
LR, MOMENTUM, WEIGHT_DECAY, DECAY_EVERY = 0.01, 0.9, 1e-4, 2500


def _arrays(seed: int = 0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(4, *PATCH, 1))
  label = np.where(image[:2, ..., 0] > 0.3, 1, np.where(image[:2, ..., 0] < -0.8, 2, 0))
  return image[:2], label.astype(np.int32), image[2:]


def _ramp(current: float, length: float) -> float:
  return math.exp(-5 * (1 - min(current, length) / length) ** 2)


def _weight(step: int) -> float:
  return HP["consistency"] * _ramp(step // HP["rampup_block"], HP["consistency_rampup"])


def _threshold(step: int) -> float:
  return (0.75 + 0.25 * _ramp(step, HP["threshold_rampup"])) * math.log(NUM_CLASSES)


def _perturbed_stats(stats, shift: float):
  return jax.tree_util.tree_map_with_path(
      lambda path, a: a + shift if path[-1].key == "mean" else a * (1 + shift), stats)


def _noised(key, x):
  return x + jnp.clip(0.1 * jax.random.normal(key, x.shape, x.dtype), -0.2, 0.2)


def _expected_step(state, trace, image_l, label_l, image_u, rng):
  student, teacher = state.student, state.teacher
  student_key, noise_key, dropout_key, mc_key = jax.random.split(rng, 4)

  def teacher_pass(x, key, stats):
    out, updates = student.apply_fn({"params": teacher.params, "batch_stats": stats}, x,
                                    train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    return out, updates["batch_stats"]

  target, stats = teacher_pass(_noised(noise_key, image_u), dropout_key, teacher.batch_stats)
  passes = []
  for round_key in jax.random.split(mc_key, 4):
    round_noise, round_dropout = jax.random.split(round_key)
    out, stats = teacher_pass(_noised(round_noise, jnp.concatenate([image_u, image_u])),
                              round_dropout, stats)
    passes += [out[:2], out[2:]]
  mean = jnp.mean(jnp.stack([jax.nn.softmax(p) for p in passes]), axis=0)
  uncertainty = -jnp.sum(mean * jnp.log(mean + 1e-6), axis=-1, keepdims=True)
  threshold = _threshold(wo.LATE_STEP)
  mask = (uncertainty < threshold).astype(uncertainty.dtype)
  images = jnp.concatenate([image_l, image_u])
  weight = _weight(wo.LATE_STEP)
  one_hot = jax.nn.one_hot(label_l, NUM_CLASSES, dtype=image_l.dtype)

  def loss_fn(params):
    logits, updates = student.apply_fn({"params": params, "batch_stats": student.batch_stats},
                                       images, train=True, rngs={"dropout": student_key},
                                       mutable=["batch_stats"])
    s_l, s_u = logits[:2], logits[2:]
    p = jax.nn.softmax(s_l)
    axes = tuple(range(p.ndim - 1))
    dice = 1 - (2 * jnp.sum(p * one_hot, axes) + 1e-5) / (
        jnp.sum(p * p, axes) + jnp.sum(one_hot * one_hot, axes) + 1e-5)
    loss_seg = 0.5 * (losses.cross_entropy(s_l, label_l) + jnp.mean(dice))
    squared = (jax.nn.softmax(s_u) - jax.nn.softmax(target)) ** 2
    loss_consistency = jnp.sum(mask * squared) / (NUM_CLASSES * jnp.sum(mask) + 1e-16)
    loss = loss_seg + weight * loss_consistency
    return loss, (dict(loss=loss, loss_seg=loss_seg, loss_consistency=loss_consistency),
                  updates["batch_stats"])

  grads, (terms, student_stats) = jax.grad(loss_fn, has_aux=True)(student.params)
  lr = wo.step_learning_rate(LR, wo.LATE_STEP, DECAY_EVERY)
  params, _ = wo.sgd(student.params, grads, trace, lr, MOMENTUM, WEIGHT_DECAY)
  alpha = min(1 - 1 / (wo.LATE_STEP + 1), HP["ema_decay"])
  teacher_params = jax.tree.map(lambda t, s: alpha * t + (1 - alpha) * s, teacher.params, params)
  metrics = dict(terms, consistency_weight=weight, learning_rate=lr, ema_decay=alpha,
                 uncertainty_threshold=threshold, mask_fraction=jnp.mean(mask))
  return params, student_stats, teacher_params, stats, metrics


@pytest.fixture(scope="module")
def run():
  with jax.enable_x64(True):
    image_l, label_l, image_u = _arrays()
    batch = two_stream_batch(image_l, label_l, image_u)
    state = wo.to_float64(jit_init(uamt, small_config(uamt, NUM_CLASSES, **HP), batch))
    student, buffers = wo.at_step(state.student, wo.LATE_STEP, seed=1)
    student = student.replace(batch_stats=_perturbed_stats(student.batch_stats, 0.3))
    teacher = state.teacher.replace(batch_stats=_perturbed_stats(state.teacher.batch_stats, 0.6))
    state = state.replace(student=student, teacher=teacher)
    rng = jax.random.key(5)
    new, metrics = jax.jit(uamt.train_step)(state, batch, rng)
    expected = jax.jit(_expected_step)(state, buffers["trace"], image_l, label_l, image_u, rng)
    probs = predict_probs(uamt, new, image_u)
    apply = lambda params, stats: new.student.apply_fn({"params": params, "batch_stats": stats},
                                                       image_u, train=False)
    student_probs = jax.nn.softmax(apply(new.student.params, new.student.batch_stats))
    teacher_probs = jax.nn.softmax(apply(new.teacher.params, new.teacher.batch_stats))
  return state, new, metrics, expected, probs, student_probs, teacher_probs


def test_train_step_at_step_3000_equals_the_written_out_step(run):
  state, new, metrics, expected, _, _, _ = run
  params, stats, teacher_params, teacher_stats, expected_metrics = expected
  assert int(new.student.step) == wo.LATE_STEP + 1
  wo.assert_updates_close(state.student.params, new.student.params, params, rtol=1e-10,
                          what="student params")
  wo.assert_trees_close(new.student.batch_stats, stats, rtol=1e-10, what="student batch_stats")
  wo.assert_updates_close(state.teacher.params, new.teacher.params, teacher_params, rtol=1e-10,
                          what="teacher params")
  wo.assert_trees_close(new.teacher.batch_stats, teacher_stats, rtol=1e-9,
                        what="teacher batch_stats")
  wo.assert_metrics_equal(metrics, expected_metrics, rtol=1e-6)
  # The mask selects some voxels but not all (else it could not matter), and the per-step ramp
  # is far from the per-block one.
  assert 0.05 < float(metrics["mask_fraction"]) < 0.95
  assert abs(_threshold(wo.LATE_STEP) - _threshold(wo.LATE_STEP // 150)) > 0.1


def test_predict_is_the_student_softmax(run):
  _, _, _, _, probs, student_probs, teacher_probs = run
  assert set(probs) == {"model"}
  np.testing.assert_allclose(probs["model"], student_probs, rtol=1e-12)
  assert np.abs(np.asarray(probs["model"]) - np.asarray(teacher_probs)).max() > 0.05
