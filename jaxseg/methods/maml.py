"""MAML: modality-aware mutual learning, multi-modal and fully supervised (docs/methods/maml.md).

Zhang et al. segment multi-modal volumes (the four BraTS MR sequences, the arterial and venous CT
phases of the liver) with one U-Net branch per modality, a fusion of the branches' last features, a
modality-aware (MA) attention map per modality and a joint head on the attention-weighted sum of the
branch features (`jaxseg.models.maml.MAML`). Every branch is trained to segment on its own (its
deep-supervision heads see the label too) while the joint head learns from all of them: the branches
teach and learn from each other through the shared loss, hence "mutual learning". Nothing is
semi-supervised: every training sample is labeled, and there is no distillation term.

One iteration, on a batch of labeled crops x (B, *S, M) with labels y (B, *S):

1. Augment x and y on the device with nnU-Net's "moreDA" transforms (`nnunet_augment.augment_batch`,
   key split from the step's key; rotation, scaling, noise, blur, brightness, contrast, low
   resolution, gamma, mirroring), unless `method.augment` is False.
2. One forward pass: the joint logits z (B, *S, K) and, for every branch m, its P deep-supervision
   logits z_{m,s} at S/2^s, s = 0 … P−1 (P = num_pools).
3. Labels per scale: y_0 = y, y_s = y[2^(s−1) :: 2^s] on every spatial axis (nearest-neighbour
   downsampling, `labels_per_scale`).
4. The loss, with L = nnU-Net's Dice + CE (`losses.soft_dice_ce_loss`) and w = nnU-Net's
   deep-supervision weights (∝ 1/2^s, the coarsest 0, normalised;
   `losses.deep_supervision_weights`):

       paper     L_total = L(z, y_0) + λ · Σ_m Σ_s w_s L(z_{m,s}, y_s)          (λ = 1)
       released  L_total = w_0 · L(z, y_0) + Σ_m Σ_s w_s L(z_{m,s}, y_s)

   The paper writes L = λ·Σ_m L_intra + L_joint without giving λ; the released code weighs the joint
   output like the full-resolution branch outputs (w_0) and has no λ.
5. One SGD step (Nesterov momentum 0.99, coupled weight decay 3e-5, gradients clipped to norm 12,
   the poly schedule lr·(1 − t/T)^0.9 over the run's T steps).

The presets differ in the loss above and in the MA module's second convolution: 1×1×1 as the paper
describes it ("paper", the default), 3×3×3 as released ("released").

Missing modalities (`predict`, per sample, from `inputs["modality_mask"]`): all present → the joint
head's softmax; one present → that modality's branch alone (its full-resolution softmax); a proper
subset of two or more → the mean of those branches' softmaxes. The paper uses the modality-specific
models alone when a modality is missing; the released code has no such mechanism, and averaging
several branches is our reading of the paper's ensemble baseline. A sample with no modality at all
cannot raise inside `jit`: it gets the joint head's softmax (of an all-zero image). The data layer
refuses such cases (`Case.modality_mask` must hold at least one True), so it arises only from a
hand-made mask.

Training reads `modality_mask` nowhere: every branch is trained on every sample, as released.

Baselines (`method.fusion`, "maml" by default): "early" replaces the MAML network by one nnU-Net
branch (`NNUNetBranch`, model "nnunet_branch") reading all M modalities as input channels, the
paper's early-fusion nnU-Net; with `data.modalities` naming one channel it is the single-modality
nnU-Net. Its loss is nnU-Net's own, Σ_s w_s L(z_s, y_s) over its P deep-supervision outputs
(`losses.deep_supervised_loss`, the same function every MAML branch's term uses), with the same
augmentation, optimiser, schedule and steps as MAML. Only the `paper` preset with λ = 1 applies
(the presets differ in the MA module and the joint term, which early fusion has not). `predict`
ignores `modality_mask` there: a withheld modality is a zero channel of the input.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from jaxseg import losses, models, optim
from jaxseg.data import nnunet_augment
from jaxseg.data.base import DataError
from jaxseg.data.batches import Batch
from jaxseg.methods import base
from jaxseg.models.maml import MAML_PRESETS

PRESETS = ("paper", "released")
MODELS = ("maml",)
# "maml": the MAML network; "early": one nnU-Net branch on all modalities stacked (a baseline).
FUSIONS = ("maml", "early")


def augment_block() -> ml_collections.ConfigDict:
  """The `method.nnunet_augment` block: every field of `nnunet_augment.NnUNetAugmentConfig` at its
  default, nnU-Net v1's 3D "moreDA" setup (rotation ±30° per axis with p 0.2, scaling 0.7-1.4 with p
  0.2, no elastic deformation, the default intensity transforms, mirroring of every axis)."""
  return ml_collections.ConfigDict(dataclasses.asdict(nnunet_augment.NnUNetAugmentConfig()))


def default_config() -> ml_collections.ConfigDict:
  """The `method` block of the `paper` preset (docs/methods/maml.md, hyperparameters)."""
  c = ml_collections.ConfigDict()
  c.name = "maml"
  c.preset = "paper"  # "paper" (MA 1³, L_joint + λ·branches) or "released" (MA 3³, w_0·L_joint...).
  c.branch_weight = 1.0  # λ of the paper preset (the paper gives no value); "released" needs 1.
  c.fusion = "maml"  # "maml", or "early": the nnU-Net baseline on the stacked modalities.
  c.batch_dice = True  # nnU-Net's Dice pooled over the batch (losses.soft_dice_loss).
  c.augment = True  # nnU-Net's moreDA augmentation on the device, every step.
  c.nnunet_augment = augment_block()
  # The released plan's branch: F = 16 (half the plan's 32), 5 poolings; He init in the branches,
  # PyTorch's default init for the fusion, MA and joint-head convolutions (as released).
  c.model = ml_collections.ConfigDict(dict(
      name="maml", base_features=16, num_pools=5, shared_init="torch", dtype="float32"))
  c.optimizer = optim.optimizer_config(
      "sgd", 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5, schedule="poly",
      poly_power=0.9, clip_grad_norm=12.0)
  return c


def released_config() -> ml_collections.ConfigDict:
  """The `method` block of the `released` preset: the same as `default_config` but the preset."""
  c = default_config()
  c.preset = "released"
  return c


# Fully supervised (no unlabeled samples), any number of classes, one input channel per modality.
REQUIREMENTS = base.Requirements(classes="any", unlabeled=False, modalities="any")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The method block and the data it needs; raises a DataError naming the key."""
  base.check_requirements(config, REQUIREMENTS)
  cfg = config.method
  base.check_choice(cfg, "preset", PRESETS)
  base.check_positive(cfg, "branch_weight")
  if cfg.preset == "released" and cfg.branch_weight != 1.0:
    raise DataError(f"config method.branch_weight = {cfg.branch_weight!r}: the released loss has "
                    "no branch weight λ (it must be 1); use method.preset = 'paper' to set one")
  base.check_choice(cfg, "fusion", FUSIONS)
  if cfg.fusion == "early" and cfg.preset != "paper":
    raise DataError(f"config method.fusion = 'early' with method.preset = {cfg.preset!r}: the "
                    "presets differ in the MA module and the joint term, which early fusion has "
                    "not; use method.preset = 'paper'")
  if cfg.fusion == "early" and cfg.branch_weight != 1.0:
    raise DataError(f"config method.branch_weight = {cfg.branch_weight!r} with method.fusion = "
                    "'early': the early-fusion loss has no branch weight λ (it must be 1)")
  for key in ("augment", "batch_dice"):
    if not isinstance(cfg[key], bool):
      raise DataError(f"config method.{key} = {cfg[key]!r} must be True or False")
  augment_config(cfg)
  base.check_choice(cfg.model, "name", MODELS, where="method.model")
  base.check_count(cfg.model, "base_features", where="method.model")
  base.check_count(cfg.model, "num_pools", where="method.model")
  multiple = 2 ** int(cfg.model.num_pools)
  base.check_crop_sizes(config, multiple, f"maml's branches pool method.model.num_pools = "
                                          f"{cfg.model.num_pools} times")


def augment_config(cfg: ml_collections.ConfigDict) -> nnunet_augment.NnUNetAugmentConfig:
  """The method block's `nnunet_augment` as an `NnUNetAugmentConfig`; DataError naming the key."""
  try:
    return nnunet_augment.NnUNetAugmentConfig.from_config(cfg.nnunet_augment.to_dict())
  except ValueError as e:
    raise DataError(f"config method.{e}") from e


@flax.struct.dataclass
class State:
  """MAML's training state.

  Attributes:
    net: the MAML network (all branches, fusion, MA modules, joint head), or with fusion "early"
      the one nnU-Net branch; its SGD state.
    augment: the augmentation's settings (static).
    hparams: preset, branch_weight, batch_dice, augment, fusion (static).
  """
  net: base.TrainState
  augment: nnunet_augment.NnUNetAugmentConfig = flax.struct.field(pytree_node=False)
  hparams: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)


def init(rng: jax.Array, config: ml_collections.ConfigDict, example_batch: Batch) -> State:
  """The MAML network for the batch's M modalities (one branch each) and its optimiser; with
  fusion "early", one `NNUNetBranch` with M input channels (the model block's base_features,
  num_pools and dtype; `shared_init` is MAML's and unused)."""
  check_config(config)
  base.check_example_batch(example_batch, REQUIREMENTS, "maml")
  cfg = config.method
  kwargs = base.model_kwargs(cfg.model)
  if cfg.fusion == "early":
    kwargs.pop("shared_init", None)
    network = models.get_model("nnunet_branch", num_classes=config.data.num_classes, **kwargs)
  else:
    network = models.get_model("maml", num_classes=config.data.num_classes,
                               ma_kernel=MAML_PRESETS[cfg.preset], **kwargs)
  net = base.create_train_state(network, optim.method_optimizer(config), rng,
                                jnp.asarray(example_batch.labeled["image"][:1]))
  hparams = ml_collections.FrozenConfigDict(dict(
      preset=cfg.preset, branch_weight=float(cfg.branch_weight), batch_dice=cfg.batch_dice,
      augment=cfg.augment, fusion=cfg.fusion))
  return State(net=net, augment=augment_config(cfg), hparams=hparams)


# ------------------------------------------------------------------------------------------------
# The loss.


def labels_per_scale(labels: jax.Array, num_scales: int) -> tuple[jax.Array, ...]:
  """The label map at every deep-supervision scale: y_s = y[o::2^s] on every spatial axis with
  o = 2^(s−1) (o = 0 and y_0 = y at full resolution).

  nnU-Net v1 downsamples the segmentation for deep supervision with order-0 (nearest-neighbour)
  resizing to each output's shape. With pixel centres aligned ("half-pixel" coordinates, as
  scipy.ndimage.zoom with grid_mode and `jax.image.resize(method="nearest")` compute it), output
  voxel i of a factor-2^s reduction samples input 2^s·i + 2^(s−1): a strided slice, which keeps the
  shapes static and costs no gather (tests/methods/test_maml.py checks it against
  `jax.image.resize`). The sizes must be divisible by 2^(num_scales−1).

  Args:
    labels: (B, *S) integer labels.
    num_scales: P, the number of scales (full resolution first).
  """
  out = [labels]
  for s in range(1, num_scales):
    f = 2**s
    out.append(labels[(slice(None),) + (slice(f // 2, None, f),) * (labels.ndim - 1)])
  return tuple(out)


def maml_loss(outputs: dict, labels: jax.Array, preset: str, branch_weight: float = 1.0,
              batch_dice: bool = True):
  """The deep-supervised MAML loss of the network's `outputs` against `labels` (B, *S).

  Returns:
    (L_total, {"loss_joint": L(z, y_0), "loss_branches": Σ_m Σ_s w_s L(z_{m,s}, y_s)}); L_total is
    loss_joint + λ·loss_branches ("paper") or w_0·loss_joint + loss_branches ("released"). Terms of
    weight 0 (the coarsest scale) are not computed, as nnU-Net's `MultipleOutputLoss2`.
  """
  def loss_fn(logits, target):
    return losses.soft_dice_ce_loss(logits, target, batch_dice=batch_dice)

  targets = labels_per_scale(labels, len(outputs["branches"][0]))
  return losses.maml_deep_supervised_terms(loss_fn, outputs["joint"], outputs["branches"],
                                           targets, preset, branch_weight)


def early_fusion_loss(outputs: dict, labels: jax.Array, batch_dice: bool = True):
  """nnU-Net's deep-supervised loss of the early-fusion branch's `outputs` ("logits": P maps, full
  resolution first) against `labels` (B, *S): Σ_s w_s L(z_s, y_s) (`losses.deep_supervised_loss`,
  the weight-0 coarsest term not computed).

  Returns:
    (loss, {}): no parts to log.
  """
  def loss_fn(logits, target):
    return losses.soft_dice_ce_loss(logits, target, batch_dice=batch_dice)

  targets = labels_per_scale(labels, len(outputs["logits"]))
  return losses.deep_supervised_loss(loss_fn, outputs["logits"], targets), {}


# ------------------------------------------------------------------------------------------------
# The method.


def augmented(state: State, batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The labeled images and labels of the step, augmented on the device when `augment` is on (key:
  the first half of split(rng))."""
  images, labels = batch.labeled["image"], batch.labeled["label"]
  if not state.hparams.augment:
    return images, labels
  key, _ = jax.random.split(rng)
  images, labels, _ = nnunet_augment.augment_batch(key, images, labels, state.augment)
  return images, labels


def train_step(state: State, batch: Batch, rng: jax.Array):
  """One SGD step on the deep-supervised loss of the (augmented) labeled samples.

  Metrics: loss (L_total), loss_joint, loss_branches (`maml_loss`), learning_rate; with fusion
  "early": loss (`early_fusion_loss`), learning_rate.
  """
  hp = state.hparams
  images, labels = augmented(state, batch, rng)

  def objective(params):
    outputs, stats = base.forward_train(state.net, params, images)
    if hp.fusion == "early":
      total, terms = early_fusion_loss(outputs, labels, hp.batch_dice)
    else:
      total, terms = maml_loss(outputs, labels, hp.preset, hp.branch_weight, hp.batch_dice)
    return total, (terms, stats)

  net, loss, terms = base.gradient_step(state.net, objective)
  return state.replace(net=net), base.scalar_metrics(
      loss=loss, **terms, learning_rate=optim.learning_rate(net))


def missing_modality_probabilities(outputs: dict, modality_mask: jax.Array) -> jax.Array:
  """Class probabilities (B, *S, K) for the modalities each sample has.

  Per sample b with n present modalities (of M): n = M → softmax of the joint head; n = 1 → the
  present branch's full-resolution softmax; 1 < n < M → the mean of the present branches'
  softmaxes; n = 0 → the joint head (cannot raise under jit; the data layer never yields it).
  Branch-free: every output is computed, then selected with `jnp.where`.

  Args:
    outputs: the network's eval-mode outputs ("joint", "branches").
    modality_mask: (B, M) bool, which modalities each sample has.
  """
  joint = jax.nn.softmax(outputs["joint"], axis=-1)
  mask = jnp.asarray(modality_mask, bool)
  num_modalities = len(outputs["branches"])
  expand = (slice(None),) + (None,) * (joint.ndim - 1)  # (B,) -> (B, 1, ..., 1)
  total = jnp.zeros_like(joint)
  for m, scales in enumerate(outputs["branches"]):  # In order m = 0 … M−1.
    total = total + jnp.where(mask[:, m][expand], jax.nn.softmax(scales[0], axis=-1), 0.0)
  present = jnp.sum(mask, axis=-1)
  subset = total / jnp.maximum(present, 1).astype(joint.dtype)[expand]
  use_joint = (present == num_modalities) | (present == 0)
  return jnp.where(use_joint[expand], joint, subset)


def predict(state: State, inputs: dict) -> dict:
  """Eval-mode class probabilities of `inputs["image"]` (B, *S, M) for the modalities
  `inputs["modality_mask"]` (B, M) says each sample has (`missing_modality_probabilities`):
  {"model": (B, *S, K)}.

  With fusion "early": the softmax of the branch's full-resolution output; `modality_mask` is
  ignored, the network sees a missing modality as its zero channel in the input (which is how
  early fusion meets a missing modality)."""
  outputs = base.forward_eval(state.net, inputs["image"])
  if state.hparams.fusion == "early":
    return {"model": jax.nn.softmax(outputs["logits"][0], axis=-1)}
  return {"model": missing_modality_probabilities(outputs, inputs["modality_mask"])}
