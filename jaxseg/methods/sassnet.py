"""SASSNet: shape-aware adversarial semi-supervised segmentation (docs/methods/sassnet.md).

One V-Net (`vnet_sdf`) with a segmentation logit s and a tanh signed distance map (SDM) z, and a
discriminator D (`sassnet_discriminator`, docs/networks.md) that reads an (SDM, image) pair and tells labeled
(class 1) from unlabeled (class 0) samples. Training alternates, every iteration, as
`kleinzcy/SASSnet code/train_gan_sdfloss.py`:

1. **Segmenter step** (segmenter in train mode, ONE forward of concat(x_𝓛, x_𝓤); D in **eval mode**,
   its parameters constants):

       L_G = dice_sq(σ(s_𝓛), y) + β·mse(z_𝓛, T(y)) + w(t)·CE(D(z_𝓤, x_𝓤), 1)
       w(t) = β_max · sigmoid_rampup(⌊t / 150⌋, 40)

   The supervised part is DTC's (`dtc.supervised_loss`; T(y) the normalised SDF, docs/methods/dtc.md). The
   adversarial term is the GAN surrogate: the segmenter wants D to take its unlabeled SDMs for
   labeled ones. SGD with the LA schedule (docs/la_protocol.md).
2. **Discriminator step** (after the segmenter update): the **updated** segmenter in **eval mode**
   (running BN statistics, no dropout) recomputes z for all samples, without gradient; D in train
   mode (channel dropout on) descends

       L_D = CE(D(z, x), [1]·B_𝓛 + [0]·B_𝓤)

   with Adam (lr 1e-4, betas (0.9, 0.99)). The segmenter step's gradient never reaches D: D's
   parameters change only in its own step (the reference discards the gradient the G step leaves
   in D).

β = 0.3 (the paper's α), β_max = 0.01 with 16 labels and 0.015 with 8 (the reference README). The
`paper` and `released` presets are identical (the code agrees with the paper). At test time only σ(s) is used.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from jaxseg import geometry, losses, models, optim, schedules
from jaxseg.data.base import DataError
from jaxseg.data.batches import Batch
from jaxseg.methods import adversarial, base, dtc

PRESETS = ("paper", "released")
LABELED, UNLABELED = 1, 0  # The discriminator's classes.


def default_config() -> ml_collections.ConfigDict:
  """The `method` block (docs/methods/sassnet.md, hyperparameters); β_max = 0.01 is the 16-label setting."""
  c = ml_collections.ConfigDict()
  c.name = "sassnet"
  c.preset = "paper"  # "paper" | "released": identical for SASSNet (its code agrees with the paper).
  c.beta = 0.3  # Weight of the SDF regression mse(z_L, T(y)) (the paper's α).
  c.beta_max = 0.01  # Final weight of the adversarial term (0.015 with 8 labels).
  c.consistency_rampup = 40  # Ramp length in blocks of `rampup_block` steps.
  c.rampup_block = 150
  c.model = ml_collections.ConfigDict(dict(name="vnet_sdf", n_filters=16, dtype="float32"))
  c.discriminator = ml_collections.ConfigDict(dict(name="sassnet_discriminator", ndf=64, dtype="float32"))
  c.optimizer = optim.optimizer_config("sgd", 0.01, momentum=0.9, weight_decay=1e-4,
                                       decay_every=2500, decay_factor=0.1)
  c.discriminator_optimizer = optim.optimizer_config("adam", 1e-4, beta1=0.9, beta2=0.99)
  return c


# The SDM describes one foreground; the discriminator tells labeled from unlabeled samples.
REQUIREMENTS = base.Requirements(classes="binary", unlabeled=True)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The method block and the data it needs; raises a DataError naming the key."""
  base.check_requirements(config, REQUIREMENTS)
  apply_preset(config.method)


def apply_preset(cfg: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """The effective hyperparameters of the method block `cfg` (static in the train step).

  Raises:
    DataError: unknown `method.preset`, a bad `method.rampup_block`, a negative weight.
  """
  base.check_choice(cfg, "preset", PRESETS)
  base.check_count(cfg, "rampup_block")
  for key in ("beta", "beta_max", "consistency_rampup"):
    base.check_positive(cfg, key)
  return ml_collections.FrozenConfigDict(dict(
      preset=cfg.preset, beta=float(cfg.beta), beta_max=float(cfg.beta_max),
      consistency_rampup=float(cfg.consistency_rampup), rampup_block=int(cfg.rampup_block)))


@flax.struct.dataclass
class State:
  """SASSNet's training state.

  Attributes:
    seg: the two-head segmenter ({"sdf": z, "seg": s}), its SGD state and BN statistics.
    disc: the discriminator and its Adam state (no BN statistics).
    hparams: `apply_preset`'s hyperparameters (static).
  """
  seg: base.TrainState
  disc: base.TrainState
  hparams: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)


# ------------------------------------------------------------------------------------------------
# Losses (docs/methods/sassnet.md, one iteration). D's outputs are logits (B, 2).


def discriminator_targets(num_labeled: int, num_unlabeled: int) -> jax.Array:
  """D's class per sample: 1 (labeled) for the first `num_labeled`, then 0 (unlabeled)."""
  return jnp.array([LABELED] * num_labeled + [UNLABELED] * num_unlabeled, jnp.int32)


def adversarial_loss(d_logits_unlabeled: jax.Array) -> jax.Array:
  """The segmenter's GAN surrogate CE(D(z_𝓤, x_𝓤), 1): unlabeled SDMs should pass as labeled."""
  targets = jnp.full(d_logits_unlabeled.shape[:1], LABELED, jnp.int32)
  return losses.cross_entropy(d_logits_unlabeled, targets)


def discriminator_loss(d_logits: jax.Array, targets: jax.Array) -> jax.Array:
  """L_D = CE(D(z, x), targets), the mean over the batch."""
  return losses.cross_entropy(d_logits, targets)


def discriminator_accuracy(d_logits: jax.Array, targets: jax.Array) -> jax.Array:
  """The fraction of samples D classifies right (argmax; a tie counts as class 0, unlabeled)."""
  return jnp.mean((jnp.argmax(d_logits, axis=-1) == targets).astype(jnp.float32))


def adversarial_weight(step: jax.Array, hp: ml_collections.FrozenConfigDict) -> jax.Array:
  """w(t) = β_max · sigmoid_rampup(⌊t / rampup_block⌋, consistency_rampup)."""
  return schedules.consistency_weight(step, hp.beta_max, hp.consistency_rampup,
                                      block=hp.rampup_block)


def generator_loss(outputs: dict, labels: jax.Array, d_logits_unlabeled: jax.Array,
                   step: jax.Array, hp: ml_collections.FrozenConfigDict):
  """L_G for the segmenter outputs {"sdf", "seg"} of a whole batch whose first len(labels)
  samples are the labeled ones, and D's logits on the unlabeled samples' (SDM, image).

  Returns:
    (L_G, dict of the terms: loss_dice, loss_lsf, loss_adversarial (unweighted), and
    adversarial_weight w(t)).
  """
  num_labeled = labels.shape[0]
  z, s = outputs["sdf"], outputs["seg"]
  supervised, terms = dtc.supervised_loss(s[:num_labeled], z[:num_labeled], labels, hp.beta)
  adversarial = adversarial_loss(d_logits_unlabeled)
  weight = adversarial_weight(step, hp)
  return supervised + weight * adversarial, dict(terms, loss_adversarial=adversarial,
                                                 adversarial_weight=weight)


# ------------------------------------------------------------------------------------------------
# Forward passes.


def discriminate(disc: base.TrainState, params, sdm: jax.Array, images: jax.Array,
                 dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """D's logits (B, 2) of (SDM, image) pairs: train mode (channel dropout) iff `dropout_rng`."""
  if dropout_rng is None:
    return disc.apply_fn({"params": params}, sdm, images, train=False)
  return disc.apply_fn({"params": params}, sdm, images, train=True, rngs={"dropout": dropout_rng})


# ------------------------------------------------------------------------------------------------
# The method.


def init(rng: jax.Array, config: ml_collections.ConfigDict, example_batch: Batch) -> State:
  """The two-head V-Net (SGD) and the discriminator (Adam).

  Raises:
    DataError: `check_config`'s, an example batch without labeled or unlabeled samples, or a
      segmenter without "sdf" and "seg" outputs.
  """
  check_config(config)
  base.check_example_batch(example_batch, REQUIREMENTS, "sassnet")
  cfg = config.method
  hparams = apply_preset(cfg)

  segmenter = models.get_model(cfg.model.name, **base.model_kwargs(cfg.model))
  discriminator = models.get_model(cfg.discriminator.name, **base.model_kwargs(cfg.discriminator))
  x = jnp.asarray(example_batch.labeled["image"][:1])
  outputs = jax.eval_shape(lambda: segmenter.init_with_output(jax.random.key(0), x, train=False)[0])
  if not isinstance(outputs, dict) or not {"sdf", "seg"} <= set(outputs):
    raise DataError(f"config method.model.name = {cfg.model.name!r}: sassnet needs a segmenter "
                     "with 'sdf' and 'seg' outputs (vnet_sdf)")
  seg_key, disc_key = jax.random.split(rng)
  seg = base.create_train_state(segmenter, optim.method_optimizer(config), seg_key, x)
  sdm = jnp.zeros(outputs["sdf"].shape, jnp.float32)
  variables = discriminator.init({"params": disc_key, "dropout": disc_key}, sdm, x, train=False)
  disc = base.TrainState.create(apply_fn=discriminator.apply, params=variables["params"],
                                tx=optim.method_optimizer(config, "discriminator_optimizer"),
                                batch_stats={})
  return State(seg=seg, disc=disc, hparams=hparams)


def generator_objective(params, seg: base.TrainState, disc: base.TrainState, batch: Batch,
                        rng: jax.Array, hp: ml_collections.FrozenConfigDict):
  """L_G as a function of the segmenter's `params`; D in eval mode, its parameters constants.

  Returns:
    (L_G, (terms, updated segmenter batch_stats, D's batch_stats (unchanged: eval mode))).
  """
  num_labeled = batch.labeled["image"].shape[0]
  outputs, stats = base.forward_train(seg, params, base.all_images(batch), rng)
  d_logits = discriminate(disc, disc.params, outputs["sdf"][num_labeled:], batch.unlabeled["image"])
  total, terms = generator_loss(outputs, batch.labeled["label"], d_logits, seg.step, hp)
  return total, (terms, stats, disc.batch_stats)


def generator_step(seg: base.TrainState, disc: base.TrainState, batch: Batch, rng: jax.Array,
                   hp: ml_collections.FrozenConfigDict):
  """One SGD step of the segmenter on L_G; `rng` is the segmenter's dropout key (D has none).

  Returns:
    (seg, metrics: loss and the `generator_loss` terms). D is not touched.
  """
  seg, _, loss, terms = adversarial.segmenter_step(
      seg, disc, lambda params, frozen_disc: generator_objective(params, seg, frozen_disc, batch,
                                                                 rng, hp))
  return seg, dict(loss=loss, **terms)


def discriminator_step(disc: base.TrainState, seg: base.TrainState, batch: Batch,
                       rng: jax.Array):
  """One Adam step of D on L_D; `seg` (the updated segmenter) runs in eval mode, no gradient.

  Returns:
    (disc, metrics: loss_discriminator and d_accuracy, of the logits before the update).
  """
  images = base.all_images(batch)
  sdm = base.forward_eval(seg, images)["sdf"]
  targets = discriminator_targets(batch.labeled["image"].shape[0], batch.unlabeled["image"].shape[0])

  def objective(params, sdm):
    logits = discriminate(disc, params, sdm, images, rng)
    return discriminator_loss(logits, targets), (logits, disc.batch_stats)

  disc, loss, logits = adversarial.critic_step(disc, sdm, objective)
  return disc, dict(loss_discriminator=loss,
                    d_accuracy=discriminator_accuracy(logits, targets))


def train_step(state: State, batch: Batch, rng: jax.Array):
  """The segmenter step, then the discriminator step on the updated segmenter.

  Metrics: the segmenter step's loss and terms, the discriminator step's loss_discriminator and
  d_accuracy, both learning rates, and sdf_full_masks (labeled samples that are all foreground,
  whose T(y) is set to 0 where the reference gives NaN).
  """
  seg_key, disc_key = jax.random.split(rng)
  seg, seg_metrics = generator_step(state.seg, state.disc, batch, seg_key, state.hparams)
  disc, disc_metrics = discriminator_step(state.disc, seg, batch, disc_key)
  return state.replace(seg=seg, disc=disc), base.scalar_metrics(
      **seg_metrics, **disc_metrics, learning_rate=optim.learning_rate(seg),
      learning_rate_discriminator=optim.learning_rate(disc),
      sdf_full_masks=geometry.count_degenerate_masks(batch.labeled["label"]))


def predict(state: State, inputs: dict) -> dict:
  """Eval-mode foreground probabilities σ(s) of the segmentation head on `inputs["image"]`
  (B, *S, C): {"model": (B, *S, 1)}."""
  return {"model": jax.nn.sigmoid(base.forward_eval(state.seg, inputs["image"])["seg"])}
