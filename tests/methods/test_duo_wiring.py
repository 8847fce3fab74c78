"""Duo-SegNet's wiring: `predict` is σ of each view's U-Net (f1, f2) in eval mode, and one train step
at step 3000 equals the step recomputed here, for the `paper` preset with k_s = k_c = 2:

    per segmenter step s: key = fold_in(rng, s); (k₁, k₂) = split(key); F_i in train mode on
      concat(X^i, U) with dropout key k_i -> p^i, u_i; the critic in train mode (parameters
      constant) on p¹, p², u₁, u₂ in that order, its BN running statistics threaded;
      λ_s·Σ_i [bce(p^i, Y^i) + w_dice·dice_lin(p^i, Y^i)] + λ_u·[bce(u₁, sg u₂) + bce(u₂, sg u₁)]
        + λ_c·Σ_i [η·bce(D(p^i), 1) + bce(D(u_i), 1)];  one SGD over both U-Nets
    per critic step, on the last segmenter step's (pre-update) p^i: D(sg p¹), D(sg p²), D(Y¹), D(Y²)
      in that order; Σ_i [(1 − η)·bce(D(Y^i), 1) + η·bce(D(sg p^i), 0)];  RMSprop

with η = 0.3 (at the default 0.5 the real and fake weights are equal and a swap is invisible),
distinct λ_s, λ_u, λ_c, w_dice ≠ 0 and U-Net head dropout on (so that the keys matter), on a 2D
U-Net, in float64 (`written_out`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import written_out as wo
from conftest import jit_init, predict_probs, small_config, two_stream_batch
from jaxseg import losses
from jaxseg.methods import duo

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH = (16, 16)
HP = dict(lambda_s=0.7, lambda_u=0.3, lambda_c=0.15, eta=0.3, w_dice=0.6, k_s=2, k_c=2)
LR, MOMENTUM = 1e-2, 0.9  # SGD, no weight decay, constant rate (the default block)
CRITIC_LR, CRITIC_ALPHA, CRITIC_EPS = 5e-5, 0.99, 1e-8  # RMSprop


def _config() -> ml_collections.ConfigDict:
  c = small_config(duo, **HP)
  c.data.labeled_groups = 2
  c.method.model = ml_collections.ConfigDict(dict(
      name="unet", features=(4, 8), norm="batch", upsample="linear_align_corners",
      head_dropout=0.2, dtype="float32"))
  c.method.critic.ndf = 8
  return c


def _arrays(seed: int = 0):
  """2 labeled (X¹ = the first, X² = the second) + 2 unlabeled."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(4, *PATCH, 1))
  return image[:2], (image[:2, ..., 0] > 0.3).astype(np.int32), image[2:]


def _bce(p, y):
  return losses.binary_cross_entropy(p, jnp.broadcast_to(y, p.shape).astype(p.dtype))


def _expected_step(state, trace, nu, image_l, label_l, image_u, rng):
  seg, critic = state.seg, state.critic
  apply_unet = seg["f1"].apply_fn  # the U-Net architecture both peers share
  xs = (image_l[:1], image_l[1:])
  y = label_l[..., None].astype(image_l.dtype)
  ys = (y[:1], y[1:])
  eta = HP["eta"]
  params, seg_stats, critic_stats = seg.params, seg.batch_stats, critic.batch_stats

  def critic_probs(critic_params, stats, maps):
    out = []
    for m in maps:
      logits, updates = critic.apply_fn({"params": critic_params, "batch_stats": stats}, m,
                                        train=True, mutable=["batch_stats"])
      stats = updates["batch_stats"]
      out.append(jax.nn.sigmoid(logits))
    return out, stats

  for s in range(HP["k_s"]):
    keys = jax.random.split(jax.random.fold_in(rng, s))

    def loss_fn(params):
      probs, unlabeled, new_stats = [], [], {}
      for view, x, key in zip(("f1", "f2"), xs, keys):
        logits, updates = apply_unet(
            {"params": params[view], "batch_stats": seg_stats[view]},
            jnp.concatenate([x, image_u]), train=True, rngs={"dropout": key},
            mutable=["batch_stats"])
        new_stats[view] = updates["batch_stats"]
        p = jax.nn.sigmoid(logits)
        probs.append(p[:1])
        unlabeled.append(p[1:])
      d, d_stats = critic_probs(critic.params, critic_stats, (*probs, *unlabeled))
      loss_s = sum(_bce(p, t) + HP["w_dice"] * losses.dice_loss(p, t, squared=False)
                   for p, t in zip(probs, ys))
      sg = jax.lax.stop_gradient
      loss_u = _bce(unlabeled[0], sg(unlabeled[1])) + _bce(unlabeled[1], sg(unlabeled[0]))
      loss_c = sum(eta * _bce(d[i], 1.0) + _bce(d[2 + i], 1.0) for i in range(2))
      total = HP["lambda_s"] * loss_s + HP["lambda_u"] * loss_u + HP["lambda_c"] * loss_c
      aux = dict(loss_s=loss_s, loss_u=loss_u, loss_c=loss_c, loss_total=total,
                 d_unlabeled=0.5 * (jnp.mean(d[2]) + jnp.mean(d[3])))
      return total, (aux, probs, new_stats, d_stats)

    grads, (seg_aux, probs, seg_stats, critic_stats) = jax.grad(loss_fn, has_aux=True)(params)
    params, trace = wo.sgd(params, grads, trace, LR, MOMENTUM, 0.0)

  critic_params = critic.params
  fakes = [jax.lax.stop_gradient(p) for p in probs]
  for _ in range(HP["k_c"]):

    def critic_loss(critic_params):
      d, stats = critic_probs(critic_params, critic_stats, (*fakes, *ys))
      loss = sum((1 - eta) * _bce(d[2 + i], 1.0) + eta * _bce(d[i], 0.0) for i in range(2))
      return loss, (dict(loss_critic=loss, d_fake=0.5 * (jnp.mean(d[0]) + jnp.mean(d[1])),
                         d_real=0.5 * (jnp.mean(d[2]) + jnp.mean(d[3]))), stats)

    grads, (critic_aux, critic_stats) = jax.grad(critic_loss, has_aux=True)(critic_params)
    critic_params, nu = wo.rmsprop(critic_params, grads, nu, CRITIC_LR, CRITIC_ALPHA, CRITIC_EPS)

  metrics = dict(seg_aux, **critic_aux, learning_rate=LR, learning_rate_critic=CRITIC_LR)
  return params, seg_stats, critic_params, critic_stats, metrics


@pytest.fixture(scope="module")
def run():
  with jax.enable_x64(True):
    image_l, label_l, image_u = _arrays()
    batch = two_stream_batch(image_l, label_l, image_u)
    state = wo.to_float64(jit_init(duo, _config(), batch))
    # Each segmenter has its own SGD state (the reference's one SGD over both networks updates
    # each parameter the same way): each is moved to step 3000 with its own momentum buffer.
    nets, trace = {}, {}
    for seed, view in enumerate(("f1", "f2"), start=1):
      net, buffers = wo.at_step(state.seg[view], wo.LATE_STEP, seed=seed)
      trace[view] = buffers["trace"]
      nets[view] = net.replace(batch_stats=jax.tree_util.tree_map_with_path(
          lambda path, a: a + 0.3 if path[-1].key == "mean" else a * 2.0, net.batch_stats))
    seg = state.seg.replace(nets=nets)
    critic, critic_buffers = wo.at_step(state.critic, wo.LATE_STEP, seed=2, scale=1e-3)
    state = state.replace(seg=seg, critic=critic)
    rng = jax.random.key(5)
    new, metrics = jax.jit(duo.train_step)(state, batch, rng)
    expected = jax.jit(_expected_step)(state, trace, critic_buffers["nu"],
                                       image_l, label_l, image_u, rng)
    probs = predict_probs(duo, new, image_u)
    views = {view: jax.nn.sigmoid(new.seg[view].apply_fn(
        {"params": new.seg.params[view], "batch_stats": new.seg.batch_stats[view]}, image_u,
        train=False)) for view in ("f1", "f2")}
  return state, new, metrics, expected, probs, views


def test_train_step_at_step_3000_equals_the_written_out_step(run):
  state, new, metrics, expected, _, _ = run
  params, seg_stats, critic_params, critic_stats, expected_metrics = expected
  assert [int(new.seg[view].step) for view in ("f1", "f2")] == [wo.LATE_STEP + HP["k_s"]] * 2
  assert int(new.critic.step) == wo.LATE_STEP + HP["k_c"]
  wo.assert_updates_close(state.seg.params, new.seg.params, params, rtol=1e-10,
                          what="segmenter params")
  wo.assert_trees_close(new.seg.batch_stats, seg_stats, rtol=1e-10, what="segmenter batch_stats")
  wo.assert_updates_close(state.critic.params, new.critic.params, critic_params, rtol=1e-10,
                          what="critic params")
  wo.assert_trees_close(new.critic.batch_stats, critic_stats, rtol=1e-10,
                        what="critic batch_stats")
  wo.assert_metrics_equal(metrics, expected_metrics, rtol=1e-6)


def test_predict_is_sigmoid_of_each_view(run):
  _, _, _, _, probs, views = run
  assert set(probs) == {"f1", "f2"}
  for view in ("f1", "f2"):
    np.testing.assert_allclose(probs[view], views[view], rtol=1e-12, err_msg=view)
  # The two views differ here: a swap of f1 and f2 would fail.
  assert np.abs(np.asarray(views["f1"]) - np.asarray(views["f2"])).max() > 0.05
