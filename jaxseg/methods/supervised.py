"""Supervised baseline: one segmenter trained on the labeled samples only (docs/methods/supervised.md).

The baseline of every comparison: same backbone and labeled data as the semi-supervised method it
is compared with, unlabeled samples ignored. Two loss forms:
- "bce": one-logit head, binary cross-entropy on probabilities (Duo-SegNet's supervised term);
- "ce_dice": K-logit head, 0.5 * (CE + Dice) -- the LA family's supervised loss
  (`dice_loss` of class 1 for K = 2, the class-averaged `multiclass_dice_loss` for K > 2).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from jaxseg import losses, models, optim
from jaxseg.data.base import DataError
from jaxseg.data.batches import Batch
from jaxseg.methods import base


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "supervised"
  c.loss = "bce"  # "bce" (one logit) or "ce_dice" (num_classes logits).
  c.model = ml_collections.ConfigDict(dict(
      name="unet", features=(8, 16, 32, 64), norm="batch", upsample="linear_align_corners",
      dtype="float32"))
  c.optimizer = optim.optimizer_config("sgd", 0.01, momentum=0.9)
  return c


LOSSES = ("bce", "ce_dice")
# Labeled data only; "bce" checks that the task is binary (`check_config`).
REQUIREMENTS = base.Requirements(classes="any")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The method block and the data it needs; raises a DataError naming the key."""
  base.check_requirements(config, REQUIREMENTS)
  base.check_choice(config.method, "loss", LOSSES)
  if config.method.loss == "bce" and config.data.num_classes != 2:
    raise DataError(f"config method.loss = 'bce' is binary (one logit), data.num_classes = "
                    f"{config.data.num_classes}: use method.loss = 'ce_dice'")


@flax.struct.dataclass
class State:
  seg: base.TrainState
  hparams: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)


def output_channels(loss: str, num_classes: int) -> int:
  """The head's channels: one logit for "bce", num_classes logits for "ce_dice"."""
  return 1 if loss == "bce" else num_classes


def init(rng: jax.Array, config: ml_collections.ConfigDict, example_batch: Batch) -> State:
  check_config(config)
  base.check_example_batch(example_batch, REQUIREMENTS, "supervised")
  cfg = config.method
  model = models.get_model(cfg.model.name, num_classes=output_channels(cfg.loss,
                                                                       config.data.num_classes),
                           **base.model_kwargs(cfg.model))
  seg = base.create_train_state(model, optim.method_optimizer(config), rng,
                                jnp.asarray(example_batch.labeled["image"][:1]))
  hparams = ml_collections.FrozenConfigDict(
      dict(loss=cfg.loss, num_classes=config.data.num_classes))
  return State(seg=seg, hparams=hparams)


def supervised_loss(logits: jax.Array, labels: jax.Array, loss: str, num_classes: int):
  """The supervised loss of `logits` (B, *spatial, K) against class maps `labels` (B, *spatial)."""
  if loss == "bce":
    return losses.binary_cross_entropy(jax.nn.sigmoid(logits[..., 0]), labels.astype(jnp.float32))
  probs = jax.nn.softmax(logits, axis=-1)
  if num_classes == 2:
    dice = losses.dice_loss(probs[..., 1], (labels == 1).astype(jnp.float32))
  else:
    dice = losses.multiclass_dice_loss(probs, labels, num_classes)
  return 0.5 * (losses.cross_entropy(logits, labels) + dice)


def train_step(state: State, batch: Batch, rng: jax.Array):
  """One optimiser step on the supervised loss of the labeled samples (unlabeled ones unused)."""
  hp = state.hparams

  def objective(params):
    logits, stats = base.forward_train(state.seg, params, batch.labeled["image"], rng)
    return supervised_loss(logits, batch.labeled["label"], hp.loss, hp.num_classes), (None, stats)

  seg, loss, _ = base.gradient_step(state.seg, objective)
  return state.replace(seg=seg), base.scalar_metrics(loss=loss,
                                                     learning_rate=optim.learning_rate(seg))


def predict(state: State, inputs: dict) -> dict:
  """Eval-mode probabilities of `inputs["image"]` (B, *spatial, C): {"model": (B, *spatial, K)},
  K = 1 foreground probability ("bce") or the class probabilities ("ce_dice")."""
  logits = base.forward_eval(state.seg, inputs["image"])
  if state.hparams.loss == "bce":
    return {"model": jax.nn.sigmoid(logits)}
  return {"model": jax.nn.softmax(logits, axis=-1)}
