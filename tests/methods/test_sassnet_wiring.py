"""SASSNet's wiring: `predict` is σ of the "seg" head, and one train step at step 3000 equals the
step recomputed here:

    keys: seg, disc = split(rng)
    segmenter (train mode, dropout key `seg`) on concat(x_𝓛, x_𝓤) -> z, s;  D in EVAL mode
    L_G = dice_sq(σ(s_𝓛), y) + β·mean (z_𝓛 − T(y))² + w(t)·CE(D(z_𝓤, x_𝓤), 1),
    w(t) = β_max·sigmoid_rampup(⌊t / block⌋, rampup);  SGD (coupled decay, x0.1 at 2500)
    then D (train mode, dropout key `disc`) on (z of the UPDATED segmenter in eval mode, x) of all
    samples: L_D = CE(D, [1]·B_𝓛 + [0]·B_𝓤);  Adam (lr 1e-4, betas (0.9, 0.99))

with non-default β, β_max, rampup and block, on a 2D V-Net and discriminator (both are
dimension-agnostic; XLA:CPU compiles 2D convolutions in seconds), in float64 (`written_out`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import written_out as wo
from conftest import jit_init, predict_probs, small_config, two_stream_batch
from jaxseg import geometry, losses
from jaxseg.methods import sassnet

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH = (32, 32)
HP = dict(beta=0.45, beta_max=0.05, consistency_rampup=50, rampup_block=100)
LR, MOMENTUM, WEIGHT_DECAY, DECAY_EVERY = 0.01, 0.9, 1e-4, 2500
D_LR, D_BETAS, D_EPS = 1e-4, (0.9, 0.99), 1e-8


def _arrays(seed: int = 0):
  return wo.sdf_method_arrays(PATCH, seed)


def _weight(step: int) -> float:
  return wo.blocked_rampup(step, HP["beta_max"], HP["consistency_rampup"], HP["rampup_block"])


def _expected_step(state, trace, mu, nu, image_l, label_l, image_u, rng):
  seg, disc = state.seg, state.disc
  seg_key, disc_key = jax.random.split(rng)
  images = jnp.concatenate([image_l, image_u])
  num_labeled, num_unlabeled = label_l.shape[0], image_u.shape[0]
  target = geometry.signed_distance_map(label_l)
  weight = _weight(wo.LATE_STEP)

  def generator_loss(params):
    out, updates = seg.apply_fn({"params": params, "batch_stats": seg.batch_stats}, images,
                                train=True, rngs={"dropout": seg_key}, mutable=["batch_stats"])
    z, s = out["sdf"], out["seg"]
    d_logits = disc.apply_fn({"params": disc.params}, z[num_labeled:], image_u, train=False)
    loss_dice = losses.dice_loss(jax.nn.sigmoid(s[:num_labeled, ..., 0]), label_l == 1)
    loss_lsf = jnp.mean((z[:num_labeled, ..., 0] - target) ** 2)
    loss_adversarial = losses.cross_entropy(d_logits, jnp.ones(num_unlabeled, jnp.int32))
    loss = loss_dice + HP["beta"] * loss_lsf + weight * loss_adversarial
    return loss, (dict(loss=loss, loss_dice=loss_dice, loss_lsf=loss_lsf,
                       loss_adversarial=loss_adversarial), updates["batch_stats"])

  grads, (terms, stats) = jax.grad(generator_loss, has_aux=True)(seg.params)
  lr = wo.step_learning_rate(LR, wo.LATE_STEP, DECAY_EVERY)
  params, _ = wo.sgd(seg.params, grads, trace, lr, MOMENTUM, WEIGHT_DECAY)

  sdm = seg.apply_fn({"params": params, "batch_stats": stats}, images, train=False)["sdf"]
  targets = jnp.array([1] * num_labeled + [0] * num_unlabeled, jnp.int32)

  def discriminator_loss(d_params):
    logits = disc.apply_fn({"params": d_params}, sdm, images, train=True,
                           rngs={"dropout": disc_key})
    return losses.cross_entropy(logits, targets), logits

  d_grads, logits = jax.grad(discriminator_loss, has_aux=True)(disc.params)
  loss_discriminator, _ = discriminator_loss(disc.params)
  d_params, _, _ = wo.adam(disc.params, d_grads, mu, nu, wo.LATE_STEP, D_LR, *D_BETAS, D_EPS)
  metrics = dict(terms, adversarial_weight=weight, loss_discriminator=loss_discriminator,
                 d_accuracy=jnp.mean(jnp.argmax(logits, -1) == targets), learning_rate=lr,
                 learning_rate_discriminator=D_LR, sdf_full_masks=1)
  return params, stats, d_params, metrics


@pytest.fixture(scope="module")
def run():
  with jax.enable_x64(True):
    image_l, label_l, image_u = _arrays()
    batch = two_stream_batch(image_l, label_l, image_u)
    config = small_config(sassnet, **HP)
    config.method.discriminator.ndf = 4
    state = wo.to_float64(jit_init(sassnet, config, batch))
    seg, seg_buffers = wo.at_step(state.seg, wo.LATE_STEP, seed=1)
    seg = seg.replace(batch_stats=jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 if path[-1].key == "mean" else a * 2.0, seg.batch_stats))
    disc, disc_buffers = wo.at_step(state.disc, wo.LATE_STEP, seed=2, scale=1e-3)
    # A discriminator that reads the SDM (at init its logits hardly depend on it): a stronger stem.
    disc_params = dict(disc.params)
    disc_params["conv0"] = {k: 20.0 * v for k, v in disc_params["conv0"].items()}
    state = state.replace(seg=seg, disc=disc.replace(params=disc_params))
    rng = jax.random.key(5)
    new, metrics = jax.jit(sassnet.train_step)(state, batch, rng)
    expected = jax.jit(_expected_step)(state, seg_buffers["trace"], disc_buffers["mu"],
                                       disc_buffers["nu"], image_l, label_l, image_u, rng)
    probs = predict_probs(sassnet, new, image_u)
    heads = new.seg.apply_fn({"params": new.seg.params, "batch_stats": new.seg.batch_stats},
                             image_u, train=False)
    seg_probs, sdf_probs = jax.nn.sigmoid(heads["seg"]), jax.nn.sigmoid(-1500.0 * heads["sdf"])
  return state, new, metrics, expected, probs, seg_probs, sdf_probs


def test_train_step_at_step_3000_equals_the_written_out_step(run):
  state, new, metrics, (params, stats, d_params, expected_metrics), _, _, _ = run
  assert int(new.seg.step) == int(new.disc.step) == wo.LATE_STEP + 1
  wo.assert_updates_close(state.seg.params, new.seg.params, params, rtol=1e-10,
                          what="segmenter params")
  wo.assert_trees_close(new.seg.batch_stats, stats, rtol=1e-10, what="segmenter batch_stats")
  wo.assert_updates_close(state.disc.params, new.disc.params, d_params, rtol=1e-10,
                          what="discriminator params")
  wo.assert_metrics_equal(metrics, expected_metrics, rtol=1e-6)
  assert float(metrics["learning_rate"]) == pytest.approx(1e-3)
  assert 0.1 < _weight(wo.LATE_STEP) / HP["beta_max"] < 0.9


def test_predict_is_sigmoid_of_the_seg_head(run):
  _, _, _, _, probs, seg_probs, sdf_probs = run
  assert set(probs) == {"model"}
  np.testing.assert_allclose(probs["model"], seg_probs, rtol=1e-12)
  assert np.abs(np.asarray(probs["model"]) - np.asarray(sdf_probs)).max() > 0.1
