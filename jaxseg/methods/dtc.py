"""DTC: dual-task consistency between a segmentation head and a level-set head (docs/methods/dtc.md).

One V-Net (`vnet_sdf`) with two heads on the same features: a segmentation logit s (f₁) and a tanh
level set z (f₂) that regresses the normalised signed distance map T(y) of the label (negative
inside, positive outside). The transform back to a mask is T⁻¹(z) = σ(−k·z), k = 1500 (the paper's
σ(k·z) has a sign slip; the code's σ(−1500·z) is the consistent form). The loss:

    L = L_seg + β·L_LSF + λ(t)·L_DTC
    L_seg = dice_sq(σ(s_𝓛), y)                      (labeled samples)
    L_LSF = mean (z_𝓛 − T(y))²                       (labeled samples)
    L_DTC = mean over ALL samples and voxels of (σ(−k·z) − σ(s))²   (both heads get gradient)
    λ(t) = λ_max · sigmoid_rampup(⌊t / 150⌋, 40)    (Gaussian ramp-up, 1.0 at t = 6000)

The paper's sums are means here (a sum would be ≈10⁶× larger). Presets (`apply_preset`):

| | `paper` (default) | `released` (`HiLab-git/DTC code/train_la_dtc.py`) |
|---|---|---|
| β | `method.beta` (1.0) | 0.3 (the published LA numbers use it) |
| everything else | same | same |

T(y) is computed inside the jitted step on the device (`geometry.signed_distance_map`, an exact
EDT); the reference computes it with scipy on the CPU at every step. The released code also computes
a BCE-with-logits term that it never adds to the loss; we skip it. At test time only σ(s) is used.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from jaxseg import geometry, losses, models, optim, schedules
from jaxseg.data.base import DataError
from jaxseg.data.batches import Batch
from jaxseg.methods import base

PRESETS = ("paper", "released")
RELEASED_BETA = 0.3


def default_config() -> ml_collections.ConfigDict:
  """The `method` block (docs/methods/dtc.md, hyperparameters)."""
  c = ml_collections.ConfigDict()
  c.name = "dtc"
  c.preset = "paper"  # "paper" | "released" (see `apply_preset`).
  c.beta = 1.0  # Weight of L_LSF (paper; `released` uses 0.3).
  c.k = 1500.0  # Steepness of T⁻¹(z) = σ(−k·z).
  c.consistency = 1.0  # λ_max.
  c.consistency_rampup = 40  # Ramp length in blocks of `rampup_block` steps.
  c.rampup_block = 150
  c.model = ml_collections.ConfigDict(dict(name="vnet_sdf", n_filters=16, dtype="float32"))
  c.optimizer = optim.optimizer_config("sgd", 0.01, momentum=0.9, weight_decay=1e-4,
                                       decay_every=2500, decay_factor=0.1)
  return c


# The level set describes one foreground; labeled samples for L_seg and L_LSF. Unlabeled samples
# are optional (they only enter L_DTC).
REQUIREMENTS = base.Requirements(classes="binary")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The method block and the data it needs; raises a DataError naming the key."""
  base.check_requirements(config, REQUIREMENTS)
  apply_preset(config.method)


def apply_preset(cfg: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """The effective hyperparameters of the method block `cfg` (static in the train step).

  Raises:
    DataError: unknown `method.preset`, or a non-positive `method.k` / `method.rampup_block`.
  """
  base.check_choice(cfg, "preset", PRESETS)
  base.check_positive(cfg, "k", allow_zero=False)
  base.check_count(cfg, "rampup_block")
  for key in ("beta", "consistency", "consistency_rampup"):
    base.check_positive(cfg, key)
  beta = RELEASED_BETA if cfg.preset == "released" else float(cfg.beta)
  return ml_collections.FrozenConfigDict(dict(
      preset=cfg.preset, beta=beta, k=float(cfg.k), consistency=float(cfg.consistency),
      consistency_rampup=float(cfg.consistency_rampup), rampup_block=int(cfg.rampup_block)))


@flax.struct.dataclass
class State:
  seg: base.TrainState
  hparams: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)


# ------------------------------------------------------------------------------------------------
# Losses (docs/methods/dtc.md, the loss as implemented). Level sets z and logits s are (B, *spatial, 1); labels (B, *spatial).


def level_set_to_mask(level_set: jax.Array, k: float = 1500.0) -> jax.Array:
  """T⁻¹(z) = σ(−k·z): ≈1 inside (z < 0), ≈0 outside, 0.5 on the boundary."""
  return jax.nn.sigmoid(-k * level_set)


def dual_task_consistency(level_set: jax.Array, seg_logits: jax.Array, k: float = 1500.0
                          ) -> jax.Array:
  """L_DTC = mean (T⁻¹(z) − σ(s))² over every sample and voxel; both heads receive gradient."""
  return jnp.mean(jnp.square(level_set_to_mask(level_set, k) - jax.nn.sigmoid(seg_logits)))


def supervised_loss(seg_logits: jax.Array, level_set: jax.Array, labels: jax.Array, beta: float,
                    sdf: jax.Array | None = None):
  """L_seg + β·L_LSF on labeled samples: dice_sq(σ(s), y) + β·mean (z − T(y))².

  Args:
    seg_logits: (B, *spatial, 1) segmentation logits s of the labeled samples.
    level_set: (B, *spatial, 1) tanh level set z of the same samples.
    labels: (B, *spatial) {0, 1} labels y.
    beta: weight of L_LSF.
    sdf: T(y), (B, *spatial); computed from `labels` with `geometry.signed_distance_map` if None.

  Returns:
    (total, {"loss_dice": L_seg, "loss_lsf": L_LSF}).
  """
  if sdf is None:
    sdf = geometry.signed_distance_map(labels)
  target = (labels == 1).astype(seg_logits.dtype)
  loss_dice = losses.dice_loss(jax.nn.sigmoid(seg_logits[..., 0]), target)
  loss_lsf = losses.mse(level_set[..., 0], sdf.astype(level_set.dtype))
  return loss_dice + beta * loss_lsf, dict(loss_dice=loss_dice, loss_lsf=loss_lsf)


def dtc_loss(outputs: dict, labels: jax.Array, step: jax.Array,
             hp: ml_collections.FrozenConfigDict):
  """L = L_seg + β·L_LSF + λ(t)·L_DTC for the network outputs {"sdf", "seg"} of a whole batch whose
  first len(labels) samples are the labeled ones.

  Returns:
    (L, dict of the terms and λ(t)).
  """
  num_labeled = labels.shape[0]
  z, s = outputs["sdf"], outputs["seg"]
  sup, terms = supervised_loss(s[:num_labeled], z[:num_labeled], labels, hp.beta)
  consistency = dual_task_consistency(z, s, hp.k)
  weight = schedules.consistency_weight(step, hp.consistency, hp.consistency_rampup,
                                        block=hp.rampup_block)
  total = sup + weight * consistency
  return total, dict(terms, loss_consistency=consistency, consistency_weight=weight)


# ------------------------------------------------------------------------------------------------
# The method.


def init(rng: jax.Array, config: ml_collections.ConfigDict, example_batch: Batch) -> State:
  """The two-head V-Net and its optimiser.

  Raises:
    DataError: `check_config`'s.
  """
  check_config(config)
  base.check_example_batch(example_batch, REQUIREMENTS, "dtc")
  cfg = config.method
  hparams = apply_preset(cfg)
  model = models.get_model(cfg.model.name, **base.model_kwargs(cfg.model))
  seg = base.create_train_state(model, optim.method_optimizer(config), rng,
                                jnp.asarray(example_batch.labeled["image"][:1]))
  return State(seg=seg, hparams=hparams)


def train_step(state: State, batch: Batch, rng: jax.Array):
  """One SGD step on L over the whole batch (labeled then unlabeled) in one train-mode forward."""
  hp = state.hparams
  images = base.all_images(batch)

  def objective(params):
    outputs, stats = base.forward_train(state.seg, params, images, rng)
    total, terms = dtc_loss(outputs, batch.labeled["label"], state.seg.step, hp)
    return total, (terms, stats)

  seg, loss, terms = base.gradient_step(state.seg, objective)
  return state.replace(seg=seg), base.scalar_metrics(
      loss=loss, **terms, learning_rate=optim.learning_rate(seg),
      sdf_full_masks=geometry.count_degenerate_masks(batch.labeled["label"]))


def predict(state: State, inputs: dict) -> dict:
  """Eval-mode foreground probabilities σ(s) of the segmentation head on `inputs["image"]`
  (B, *S, C): {"model": (B, *S, 1)}."""
  return {"model": jax.nn.sigmoid(base.forward_eval(state.seg, inputs["image"])["seg"])}
