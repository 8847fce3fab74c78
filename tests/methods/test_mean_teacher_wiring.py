"""Mean Teacher's wiring: `predict` is the softmax of the STUDENT's eval-mode logits, and one train
step at step 3000 equals the step recomputed here:

    keys: student, noise, dropout = split(rng, 3)
    t_𝓤 = teacher in train mode (its params and BN statistics) on x_𝓤 + clip(0.1·N(noise), ±0.2),
          dropout key `dropout`; sg
    s = student in train mode on concat(x_𝓛, x_𝓤), dropout key `student`
    L = 0.5·(CE(s_𝓛, y) + dice_sq(softmax(s_𝓛)₁, y)) + w(t)·mean (softmax s_𝓤 − softmax t_𝓤)²
    w(t) = consistency·sigmoid_rampup(⌊t / block⌋, rampup)
    student: SGD (coupled weight decay, x0.1 at 2500); teacher: θ′ ← α θ′ + (1 − α) θ_new,
    α = min(1 − 1/(t + 1), ema_decay)

with non-default consistency, rampup, block and ema_decay, on a 2D V-Net (the method is
dimension-agnostic; XLA:CPU compiles 2D convolutions in seconds), in float64 (`written_out`).
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
from jaxseg.methods import mean_teacher

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH = (32, 32)
HP = dict(ema_decay=0.95, consistency=0.7, consistency_rampup=50.0, rampup_block=100)
LR, MOMENTUM, WEIGHT_DECAY, DECAY_EVERY = 0.01, 0.9, 1e-4, 2500


def _arrays(seed: int = 0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(4, *PATCH, 1))
  return image[:2], (image[:2, ..., 0] > 0.3).astype(np.int32), image[2:]


def _weight(step: int) -> float:
  block = min(step // HP["rampup_block"], HP["consistency_rampup"]) / HP["consistency_rampup"]
  return HP["consistency"] * math.exp(-5 * (1 - block) ** 2)


def _perturbed_stats(stats, shift: float):
  return jax.tree_util.tree_map_with_path(
      lambda path, a: a + shift if path[-1].key == "mean" else a * (1 + shift), stats)


def _expected_step(state, trace, image_l, label_l, image_u, rng):
  student, teacher = state.student, state.teacher
  student_key, noise_key, dropout_key = jax.random.split(rng, 3)
  noise = jnp.clip(0.1 * jax.random.normal(noise_key, image_u.shape, image_u.dtype), -0.2, 0.2)
  target, teacher_updates = student.apply_fn(
      {"params": teacher.params, "batch_stats": teacher.batch_stats}, image_u + noise, train=True,
      rngs={"dropout": dropout_key}, mutable=["batch_stats"])
  target = jax.lax.stop_gradient(target)
  images = jnp.concatenate([image_l, image_u])
  num_labeled = label_l.shape[0]
  weight = _weight(wo.LATE_STEP)

  def loss_fn(params):
    logits, updates = student.apply_fn({"params": params, "batch_stats": student.batch_stats},
                                       images, train=True, rngs={"dropout": student_key},
                                       mutable=["batch_stats"])
    s_l, s_u = logits[:num_labeled], logits[num_labeled:]
    loss_seg = 0.5 * (losses.cross_entropy(s_l, label_l)
                      + losses.dice_loss(jax.nn.softmax(s_l)[..., 1], label_l))
    loss_consistency = jnp.mean((jax.nn.softmax(s_u) - jax.nn.softmax(target)) ** 2)
    loss = loss_seg + weight * loss_consistency
    return loss, (dict(loss=loss, loss_seg=loss_seg, loss_consistency=loss_consistency),
                  updates["batch_stats"])

  grads, (terms, stats) = jax.grad(loss_fn, has_aux=True)(student.params)
  lr = wo.step_learning_rate(LR, wo.LATE_STEP, DECAY_EVERY)
  params, _ = wo.sgd(student.params, grads, trace, lr, MOMENTUM, WEIGHT_DECAY)
  alpha = min(1 - 1 / (wo.LATE_STEP + 1), HP["ema_decay"])
  teacher_params = jax.tree.map(lambda t, s: alpha * t + (1 - alpha) * s, teacher.params, params)
  metrics = dict(terms, consistency_weight=weight, learning_rate=lr, ema_decay=alpha)
  return params, stats, teacher_params, teacher_updates["batch_stats"], metrics


@pytest.fixture(scope="module")
def run():
  with jax.enable_x64(True):
    image_l, label_l, image_u = _arrays()
    batch = two_stream_batch(image_l, label_l, image_u)
    state = wo.to_float64(jit_init(mean_teacher, small_config(mean_teacher, **HP), batch))
    student, buffers = wo.at_step(state.student, wo.LATE_STEP, seed=1)
    # Distinct running statistics for student and teacher: predict must read the student's.
    student = student.replace(batch_stats=_perturbed_stats(student.batch_stats, 0.3))
    teacher = state.teacher.replace(batch_stats=_perturbed_stats(state.teacher.batch_stats, 0.6))
    state = state.replace(student=student, teacher=teacher)
    rng = jax.random.key(5)
    new, metrics = jax.jit(mean_teacher.train_step)(state, batch, rng)
    expected = jax.jit(_expected_step)(state, buffers["trace"], image_l, label_l, image_u, rng)
    probs = predict_probs(mean_teacher, new, image_u)
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
  wo.assert_trees_close(new.teacher.batch_stats, teacher_stats, rtol=1e-10,
                        what="teacher batch_stats")
  wo.assert_metrics_equal(metrics, expected_metrics, rtol=1e-6)
  assert float(metrics["ema_decay"]) == pytest.approx(0.95)  # the cap, not 1 − 1/3001
  assert float(metrics["learning_rate"]) == pytest.approx(1e-3)


def test_predict_is_the_student_softmax(run):
  _, _, _, _, probs, student_probs, teacher_probs = run
  assert set(probs) == {"model"}
  np.testing.assert_allclose(probs["model"], student_probs, rtol=1e-12)
  # The teacher predicts something else here (own params and statistics): the test can fail.
  assert np.abs(np.asarray(probs["model"]) - np.asarray(teacher_probs)).max() > 0.05


def test_default_hyperparameters():
  """The LA recipe (docs/methods/mean_teacher.md): EMA cap 0.99, w_max 0.1 over 40 blocks of 150 steps (the
  optimiser block is pinned with the presets in tests/test_configs.py)."""
  config = mean_teacher.default_config().to_dict()
  del config["optimizer"]
  assert config == dict(name="mean_teacher", ema_decay=0.99, consistency=0.1,
                        consistency_rampup=40.0, rampup_block=150,
                        model=dict(name="vnet", n_filters=16, dtype="float32"))
