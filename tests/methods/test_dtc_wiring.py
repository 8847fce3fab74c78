"""DTC's wiring: `predict` is σ of the "seg" head, and one train step at step 3000 equals the step
recomputed here from the written-out loss and SGD.

    L = dice_sq(σ(s_𝓛), y) + β·mean (z_𝓛 − T(y))² + λ(t)·mean_{all samples} (σ(−k·z) − σ(s))²,
    λ(t) = λ_max·sigmoid_rampup(⌊t / block⌋, rampup),

with non-default β, k, λ_max, rampup and block (so that a swapped or default weight shows), on a 2D
V-Net (the method is dimension-agnostic; XLA:CPU compiles 2D convolutions in seconds), in float64
(`written_out`). Dropout stays on: the method passes the step's key unchanged as the dropout key,
and so does the recomputation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import written_out as wo
from conftest import jit_init, predict_probs, small_config, two_stream_batch
from jaxseg import geometry, losses
from jaxseg.methods import dtc

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH = (32, 32)
HP = dict(beta=0.7, k=900.0, consistency=0.6, consistency_rampup=50, rampup_block=100)
LR, MOMENTUM, WEIGHT_DECAY, DECAY_EVERY = 0.01, 0.9, 1e-4, 2500


def _arrays(seed: int = 0):
  return wo.sdf_method_arrays(PATCH, seed)


def _weight(step: int) -> float:
  return wo.blocked_rampup(step, HP["consistency"], HP["consistency_rampup"], HP["rampup_block"])


def _perturbed_stats(stats):
  """Non-trivial BN running statistics, so that eval mode (predict) reads something else than a
  fresh network's."""
  return jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.3 if path[-1].key == "mean" else a * 2.0, stats)


def _expected_step(state, trace, image_l, label_l, image_u, key):
  """The step written out: one train-mode forward of concat(x_𝓛, x_𝓤), dropout key = the step's
  key, the loss above, SGD with coupled weight decay at the step-decayed rate."""
  seg = state.seg
  images = jnp.concatenate([image_l, image_u])
  num_labeled = label_l.shape[0]
  target = geometry.signed_distance_map(label_l)
  weight = _weight(wo.LATE_STEP)

  def loss_fn(params):
    out, updates = seg.apply_fn({"params": params, "batch_stats": seg.batch_stats}, images,
                                train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    z, s = out["sdf"][..., 0], out["seg"][..., 0]
    loss_dice = losses.dice_loss(jax.nn.sigmoid(s[:num_labeled]), label_l == 1)
    loss_lsf = jnp.mean((z[:num_labeled] - target) ** 2)
    loss_consistency = jnp.mean((jax.nn.sigmoid(-HP["k"] * z) - jax.nn.sigmoid(s)) ** 2)
    total = loss_dice + HP["beta"] * loss_lsf + weight * loss_consistency
    return total, (dict(loss=total, loss_dice=loss_dice, loss_lsf=loss_lsf,
                        loss_consistency=loss_consistency), updates["batch_stats"])

  grads, (terms, stats) = jax.grad(loss_fn, has_aux=True)(seg.params)
  lr = wo.step_learning_rate(LR, wo.LATE_STEP, DECAY_EVERY)
  params, _ = wo.sgd(seg.params, grads, trace, lr, MOMENTUM, WEIGHT_DECAY)
  metrics = dict(terms, consistency_weight=weight, learning_rate=lr, sdf_full_masks=1)
  return params, stats, metrics


@pytest.fixture(scope="module")
def run():
  """(state at step 3000, its state after one train step, metrics, expected params, stats,
  metrics, predict of the new state, the eval-mode heads of the new state)."""
  with jax.enable_x64(True):
    image_l, label_l, image_u = _arrays()
    batch = two_stream_batch(image_l, label_l, image_u)
    state = wo.to_float64(jit_init(dtc, small_config(dtc, **HP), batch))
    seg, buffers = wo.at_step(state.seg, wo.LATE_STEP, seed=1)
    state = state.replace(seg=seg.replace(batch_stats=_perturbed_stats(seg.batch_stats)))
    key = jax.random.key(5)
    new, metrics = jax.jit(dtc.train_step)(state, batch, key)
    expected = jax.jit(_expected_step)(state, buffers["trace"], image_l, label_l, image_u, key)
    probs = predict_probs(dtc, new, image_u)
    heads = new.seg.apply_fn({"params": new.seg.params, "batch_stats": new.seg.batch_stats},
                             image_u, train=False)
    seg_probs = jax.nn.sigmoid(heads["seg"])
    level_set_masks = jax.nn.sigmoid(-HP["k"] * heads["sdf"])
  return state, new, metrics, expected, probs, (seg_probs, level_set_masks)


def test_train_step_at_step_3000_equals_the_written_out_step(run):
  state, new, metrics, (params, stats, expected_metrics), _, _ = run
  assert int(new.seg.step) == wo.LATE_STEP + 1
  wo.assert_updates_close(state.seg.params, new.seg.params, params, rtol=1e-10, what="params")
  wo.assert_trees_close(new.seg.batch_stats, stats, rtol=1e-10, what="batch_stats")
  wo.assert_metrics_equal(metrics, expected_metrics, rtol=1e-6)
  # The late step is where the written-out values put it: x0.1 rate, ramp half-way.
  assert float(metrics["learning_rate"]) == pytest.approx(1e-3)
  assert 0.1 < _weight(wo.LATE_STEP) / HP["consistency"] < 0.9


def test_predict_is_sigmoid_of_the_seg_head(run):
  _, _, _, _, probs, (seg_probs, level_set_masks) = run
  assert set(probs) == {"model"}
  np.testing.assert_allclose(probs["model"], seg_probs, rtol=1e-12)
  # The level-set head's mask σ(−k·z) is another map here: the comparison above can fail.
  assert np.abs(np.asarray(probs["model"]) - np.asarray(level_set_masks)).max() > 0.1
