"""ASDNet: a segmenter and a per-voxel confidence network, trained in turn (docs/methods/asdnet.md).

Nie et al. (MICCAI 2018) train a segmenter S next to a fully convolutional confidence network D that
tells, voxel by voxel, a label map from a prediction. D's confidence then selects the voxels of the
unlabeled images whose predictions serve as their own targets. The `paper` preset (the default):

- S = `svnet` (the V-Net without its deepest level), C-class logits s, P̂ = softmax(s).
- D = `asdnet_confidence` with the repaired decoder; it reads a C-channel map (a probability map or a
  one-hot label) and returns 2 logits per voxel, class 1 = "real" (a label); M = softmax(D(·))[…, 1].

Per step, with the batch's labeled samples 𝓛 (images x_𝓛, labels y, one-hot P) first and the
unlabeled 𝓤 after, all sums over voxels written as means (CE_v: the mean over batch and voxels):

1. **D step** (first), S's output constant:

       L_D = CE_v(D(P), real) + CE_v(D(sg P̂_𝓛), fake)                                  (Eqs. 3-4)

2. **S step**, with the **updated** D's parameters constant:

       L_S = L_att + λ₁·L_adv + λ₂·L_semi                                                  (Eq. 7)
       L_att  = mean_{n ∈ 𝓛} (1 − sg dsc_n)^β · GDL(P̂_n, P_n)                             (Eq. 2)
       L_adv  = CE_v(D(P̂_{𝓛∪𝓤}), real)                                                    (Eq. 5)
       L_semi = GDL over {v : M_v > γ} of P̂_𝓤 against P̄ = one-hot(argmax P̂_𝓤),
                M = softmax(sg D(P̂_{𝓛∪𝓤}))_𝓤[…, 1], P̄ and the mask constant              (Eq. 6)

   GDL is the generalized Dice of Eq. 1 (class weights 1/(Σ_v t_c)², an absent class weighted 0);
   dsc_n the mean hard Dice of argmax P̂_n over the foreground classes (`losses`).

λ₁ = 0.03, λ₂ = 0.3 (the paper's), β = 2 (the paper's), γ = 0.5 (jaxseg's: the paper gives none).
Adam with coupled weight decay 1e-4, S lr 1e-3, D lr 1e-4, both ×0.1 at steps 2500 and 5000; every
convolution Xavier-uniform (gain √2) with zero biases (the models' default).

Choices the paper leaves open, made here:
- P̂ is ONE train-mode forward of S on concat(x_𝓛, x_𝓤) per step, with one dropout key: the D step's
  fakes are its labeled part (recomputed from the same parameters, statistics and key, so they equal
  the S step's P̂_𝓛; the whole batch is forwarded because BatchNorm normalises over it), and the S
  step differentiates it. S's BN running statistics move once per step (in the S step).
- D runs in train mode throughout (the released code never switches it to eval): one call on the
  one-hot labels and one on the fakes in the D step (real and fake maps are never normalised
  together), one call on P̂_{𝓛∪𝓤} in the S step. Its running statistics are threaded through the
  three calls. M is the unlabeled part of the S step's call, stopped: the value of D(sg P̂_𝓤) as D
  sees the batch in that step, so L_adv and L_semi read one D output.
- The D step comes first and sees only labeled predictions (𝓛) as fakes; the S step's adversarial
  term covers 𝓛 ∪ 𝓤, as Eq. 5's 𝐎 = {X, U}.

Only `paper` exists; the `released` preset (the authors' code: another segmenter, sub-batches,
gradient leaks; docs/methods/asdnet.md) is not implemented yet and is refused by `check_config`.
At test time only P̂ is used.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from jaxseg import losses, models, optim
from jaxseg.data.base import DataError
from jaxseg.data.batches import Batch
from jaxseg.methods import adversarial, base
from jaxseg.models.asdnet import CONFIDENCE_DECODERS

PRESETS = ("paper",)
NOT_IMPLEMENTED_PRESETS = ("released",)
FAKE, REAL = 0, 1  # D's classes per voxel.
SIZE_MULTIPLE = 8  # svnet and the confidence net halve the crop three times.


def default_config() -> ml_collections.ConfigDict:
  """The `method` block: the `paper` preset (docs/methods/asdnet.md, hyperparameters)."""
  c = ml_collections.ConfigDict()
  c.name = "asdnet"
  c.preset = "paper"  # "paper" ("released" is not implemented yet).
  c.beta = 2.0  # β: the sample-attention exponent of Eq. 2.
  c.lambda_adv = 0.03  # λ₁: weight of the adversarial term L_adv (Eq. 5).
  c.lambda_semi = 0.3  # λ₂: weight of the region-attention semi term L_semi (Eq. 6).
  c.gamma = 0.5  # γ: confidence threshold of L_semi's mask M > γ (jaxseg's value).
  c.model = ml_collections.ConfigDict(dict(name="svnet", n_filters=16, dtype="float32"))
  c.confidence = ml_collections.ConfigDict(dict(
      name="asdnet_confidence", features=(32, 64, 128, 256), decoder="repaired", dtype="float32"))
  c.optimizer = optim.optimizer_config("adam", 1e-3, weight_decay=1e-4,
                                       decay_boundaries=(2500, 5000))
  c.confidence_optimizer = optim.optimizer_config("adam", 1e-4, weight_decay=1e-4,
                                                  decay_boundaries=(2500, 5000))
  return c


# C-class softmax and generalized Dice: any number of classes; L_adv and L_semi read unlabeled
# samples.
REQUIREMENTS = base.Requirements(classes="any", unlabeled=True)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The method block and the data it needs; raises a DataError naming the key."""
  base.check_requirements(config, REQUIREMENTS)
  apply_preset(config.method)
  if "decoder" in config.method.confidence:
    base.check_choice(config.method.confidence, "decoder", CONFIDENCE_DECODERS,
                      where="method.confidence")
  sizes = [("data.patch_size", config.data.patch_size)]
  if "eval" in config and config.eval.get("patch_size"):
    sizes.append(("eval.patch_size", config.eval.patch_size))
  for key, size in sizes:
    if any(int(s) % SIZE_MULTIPLE for s in size):
      raise DataError(f"config {key} = {tuple(size)!r}: asdnet's networks (svnet, the confidence "
                      f"net) need sizes divisible by {SIZE_MULTIPLE}")


def apply_preset(cfg: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """The effective hyperparameters of the method block `cfg` (static in the train step).

  Raises:
    DataError: `method.preset` "released" (not implemented yet) or unknown, a negative weight or
      β, γ outside [0, 1].
  """
  if cfg.preset in NOT_IMPLEMENTED_PRESETS:
    raise DataError(f"config method.preset = {cfg.preset!r}: asdnet's {cfg.preset!r} preset is "
                    f"not implemented yet; use one of {list(PRESETS)}")
  base.check_choice(cfg, "preset", PRESETS)
  for key in ("beta", "lambda_adv", "lambda_semi"):
    base.check_positive(cfg, key)
  gamma = cfg.gamma
  if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
    raise DataError(f"config method.gamma = {gamma!r} must be a number in [0, 1]")
  return ml_collections.FrozenConfigDict(dict(
      preset=cfg.preset, beta=float(cfg.beta), lambda_adv=float(cfg.lambda_adv),
      lambda_semi=float(cfg.lambda_semi), gamma=float(gamma)))


@flax.struct.dataclass
class State:
  """ASDNet's training state.

  Attributes:
    seg: the segmenter S, its Adam state and BN statistics.
    confidence: the confidence network D, its Adam state and BN statistics (of its up units).
    hparams: `apply_preset`'s hyperparameters (static).
  """
  seg: base.TrainState
  confidence: base.TrainState
  hparams: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)


# ------------------------------------------------------------------------------------------------
# Losses. D's outputs are logits (N, *spatial, 2); S's are logits (N, *spatial, C).


def _constant_class_ce(d_logits: jax.Array, cls: int) -> jax.Array:
  """mean_v CE(D(·), cls): every voxel's target is class `cls`."""
  return losses.cross_entropy(d_logits, jnp.full(d_logits.shape[:-1], cls, jnp.int32))


def real_loss(d_logits: jax.Array) -> jax.Array:
  """mean_v CE(D(·), real): D's loss on labels, and S's adversarial surrogate L_adv."""
  return _constant_class_ce(d_logits, REAL)


def fake_loss(d_logits: jax.Array) -> jax.Array:
  """mean_v CE(D(·), fake): D's loss on S's predictions."""
  return _constant_class_ce(d_logits, FAKE)


def confidence_map(d_logits: jax.Array) -> jax.Array:
  """M = softmax(D(·))[…, real]: (N, *spatial), D's probability that each voxel is a label's."""
  return jax.nn.softmax(d_logits, axis=-1)[..., REAL]


def confidence_loss(d_real: jax.Array, d_fake: jax.Array):
  """L_D = CE_v(D(P), real) + CE_v(D(sg P̂_𝓛), fake), from D's logits on labels and on fakes.

  Returns:
    (L_D, dict: loss_confidence_real, loss_confidence_fake, and d_real / d_fake, the mean M on
    labels / on fakes).
  """
  loss_real, loss_fake = real_loss(d_real), fake_loss(d_fake)
  return loss_real + loss_fake, dict(
      loss_confidence_real=loss_real, loss_confidence_fake=loss_fake,
      d_real=jnp.mean(confidence_map(d_real)), d_fake=jnp.mean(confidence_map(d_fake)))


def segmenter_loss(logits: jax.Array, labels: jax.Array, d_logits: jax.Array,
                   hp: ml_collections.FrozenConfigDict):
  """L_S = L_att + λ₁·L_adv + λ₂·L_semi (Eq. 7) for one batch.

  Args:
    logits: S's logits (B_𝓛 + B_𝓤, *spatial, C), labeled samples first.
    labels: (B_𝓛, *spatial) integer labels of the first B_𝓛 samples.
    d_logits: D's logits (B_𝓛 + B_𝓤, *spatial, 2) on softmax(logits) (D's parameters constant).
    hp: `apply_preset`'s hyperparameters.

  Returns:
    (L_S, dict: loss_att_dice, loss_adversarial, loss_semi (unweighted), sample_dice (the mean dsc
    of the labeled samples) and mask_fraction (the share of unlabeled voxels with M > γ)).
  """
  num_labeled, num_classes = labels.shape[0], logits.shape[-1]
  logits_l = logits[:num_labeled]
  loss_att = losses.sample_attention_generalized_dice_loss(logits_l, labels, num_classes,
                                                           beta=hp.beta)
  loss_adv = real_loss(d_logits)
  # M selects voxels; it is not a target to move D's opinion by: no gradient through it.
  confidence_u = confidence_map(jax.lax.stop_gradient(d_logits[num_labeled:]))
  probs_u = jax.nn.softmax(logits[num_labeled:], axis=-1)
  loss_semi = losses.masked_pseudo_label_gdl(probs_u, confidence_u, hp.gamma)
  total = loss_att + hp.lambda_adv * loss_adv + hp.lambda_semi * loss_semi
  return total, dict(
      loss_att_dice=loss_att, loss_adversarial=loss_adv, loss_semi=loss_semi,
      sample_dice=jnp.mean(losses.per_sample_foreground_dice(logits_l, labels, num_classes)),
      mask_fraction=jnp.mean((confidence_u > hp.gamma).astype(jnp.float32)))


# ------------------------------------------------------------------------------------------------
# Forward passes.


def segment(seg: base.TrainState, params, batch: Batch, rng: jax.Array):
  """S's train-mode logits (B_𝓛 + B_𝓤, *spatial, C) of concat(x_𝓛, x_𝓤), dropout key `rng`, and
  the updated BN statistics."""
  return base.forward_train(seg, params, base.all_images(batch), rng)


def judge(confidence: base.TrainState, params, maps: jax.Array, batch_stats=None):
  """D's train-mode logits (N, *spatial, 2) of C-channel maps, and its updated BN statistics
  (threaded from `batch_stats`, default its own)."""
  return base.forward_train(confidence, params, maps, batch_stats=batch_stats)


def one_hot_labels(labels: jax.Array, num_classes: int, dtype) -> jax.Array:
  """P: (B, *spatial) integer labels as (B, *spatial, C) one-hot maps, D's "real" inputs."""
  return jax.nn.one_hot(labels, num_classes, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# The method.


def init(rng: jax.Array, config: ml_collections.ConfigDict, example_batch: Batch) -> State:
  """S (C-class svnet) and D (confidence FCN on C channels), each with its own Adam.

  Raises:
    DataError: `check_config`'s, an example batch without unlabeled samples, or a segmenter whose
      output is not one (…, num_classes) array.
  """
  check_config(config)
  base.check_example_batch(example_batch, REQUIREMENTS, "asdnet")
  cfg = config.method
  hparams = apply_preset(cfg)
  num_classes = config.data.num_classes

  segmenter = models.get_model(cfg.model.name, num_classes=num_classes,
                               **base.model_kwargs(cfg.model))
  confidence = models.get_model(cfg.confidence.name, **base.model_kwargs(cfg.confidence))
  x = jnp.asarray(example_batch.labeled["image"][:1])
  out = jax.eval_shape(lambda: segmenter.init_with_output(jax.random.key(0), x, train=False)[0])
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape[-1] != num_classes:
    raise DataError(f"config method.model.name = {cfg.model.name!r}: asdnet needs a segmenter "
                    f"with one output of data.num_classes = {num_classes} logits (svnet)")
  seg_key, confidence_key = jax.random.split(rng)
  seg = base.create_train_state(segmenter, optim.method_optimizer(config), seg_key, x)
  conf = base.create_train_state(
      confidence, optim.method_optimizer(config, "confidence_optimizer"), confidence_key,
      jnp.zeros((1, *x.shape[1:-1], num_classes), jnp.float32))
  return State(seg=seg, confidence=conf, hparams=hparams)


def confidence_step(confidence: base.TrainState, seg: base.TrainState, batch: Batch,
                    rng: jax.Array):
  """One Adam step of D on L_D; S (not changed) gives the fakes sg P̂_𝓛.

  Args:
    confidence: D.
    seg: S before its own step of this iteration.
    batch: the training batch.
    rng: S's dropout key, the S step's (so that the fakes are its P̂_𝓛).

  Returns:
    (D after the update, with the BN statistics of its two calls; metrics: loss_confidence and the
    `confidence_loss` terms, of D before the update).
  """
  num_labeled = batch.labeled["image"].shape[0]
  logits, _ = segment(seg, seg.params, batch, rng)  # S's BN statistics move in the S step only.
  fakes = jax.nn.softmax(logits[:num_labeled], axis=-1)
  reals = one_hot_labels(batch.labeled["label"], logits.shape[-1], fakes.dtype)

  def objective(params, fakes):
    d_real, stats = judge(confidence, params, reals)
    d_fake, stats = judge(confidence, params, fakes, stats)
    loss, terms = confidence_loss(d_real, d_fake)
    return loss, (dict(loss_confidence=loss, **terms), stats)

  confidence, _, metrics = adversarial.critic_step(confidence, fakes, objective)
  return confidence, metrics


def segmenter_objective(params, seg: base.TrainState, confidence: base.TrainState, batch: Batch,
                        rng: jax.Array, hp: ml_collections.FrozenConfigDict):
  """L_S as a function of S's `params`; D (frozen by the caller) in train mode.

  Returns:
    (L_S, (terms, S's updated batch_stats, D's batch_stats after its call)).
  """
  logits, seg_stats = segment(seg, params, batch, rng)
  d_logits, confidence_stats = judge(confidence, confidence.params,
                                     jax.nn.softmax(logits, axis=-1))
  total, terms = segmenter_loss(logits, batch.labeled["label"], d_logits, hp)
  return total, (terms, seg_stats, confidence_stats)


def segmenter_step(seg: base.TrainState, confidence: base.TrainState, batch: Batch,
                   rng: jax.Array, hp: ml_collections.FrozenConfigDict):
  """One Adam step of S on L_S against D with constant parameters (`adversarial.segmenter_step`).

  Returns:
    (S after the update, D with the BN statistics of its call (parameters and Adam state
    unchanged), metrics: loss = L_S and the `segmenter_loss` terms).
  """
  seg, confidence, loss, terms = adversarial.segmenter_step(
      seg, confidence, lambda params, frozen: segmenter_objective(params, seg, frozen, batch, rng,
                                                                  hp))
  return seg, confidence, dict(loss=loss, **terms)


def train_step(state: State, batch: Batch, rng: jax.Array):
  """The D step, then the S step against the updated D; `rng` is S's dropout key in both.

  Metrics: loss (L_S), loss_att_dice, loss_adversarial, loss_semi (unweighted), sample_dice,
  mask_fraction, loss_confidence (L_D) with its real and fake terms, d_real, d_fake, and both
  learning rates.
  """
  confidence, confidence_metrics = confidence_step(state.confidence, state.seg, batch, rng)
  seg, confidence, seg_metrics = segmenter_step(state.seg, confidence, batch, rng, state.hparams)
  return state.replace(seg=seg, confidence=confidence), base.scalar_metrics(
      **seg_metrics, **confidence_metrics, learning_rate=optim.learning_rate(seg),
      learning_rate_confidence=optim.learning_rate(confidence))


def predict(state: State, inputs: dict) -> dict:
  """Eval-mode class probabilities P̂ = softmax(S(x)) of `inputs["image"]` (B, *S, C_in):
  {"model": (B, *S, C)}."""
  return {"model": jax.nn.softmax(base.forward_eval(state.seg, inputs["image"]), axis=-1)}
