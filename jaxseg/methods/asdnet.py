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

The `released` preset (`released_config`, `released_train_step`, below) reproduces the authors'
code instead: another segmenter, random labeled/unlabeled sub-batches whose gradients accumulate,
the gradient leaks, no Dice backward, a masked cross-entropy whose threshold reads the last
validation Dice (`after_validation`). At test time only P̂ is used (S's main output).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from jaxseg import evaluate, losses, models, optim
from jaxseg.data.base import DataError
from jaxseg.data.batches import Batch
from jaxseg.methods import adversarial, base
from jaxseg.models.asdnet import CONFIDENCE_DECODERS

PRESETS = ("paper", "released")
FAKE, REAL = 0, 1  # D's classes per voxel.
SIZE_MULTIPLE = 8  # svnet and the confidence net halve the crop three times.


def default_config() -> ml_collections.ConfigDict:
  """The `method` block: the `paper` preset (docs/methods/asdnet.md, hyperparameters)."""
  c = ml_collections.ConfigDict()
  c.name = "asdnet"
  c.preset = "paper"  # "paper" or "released" (the authors' code; `released_config` sets it up).
  c.beta = 2.0  # β: the sample-attention exponent of Eq. 2.
  c.lambda_adv = 0.03  # λ₁: weight of the adversarial term L_adv (Eq. 5).
  c.lambda_semi = 0.3  # λ₂: weight of the region-attention semi term L_semi (Eq. 6).
  c.gamma = 0.5  # γ: confidence threshold of L_semi's mask M > γ (jaxseg's value; paper only).
  # `released` only (the authors' code; `released_config`):
  c.sub_batches = 3  # iter_size: sub-batches per iteration, gradients accumulated.
  c.labeled_probability = 0.5  # Each sub-batch is labeled with this probability.
  c.aux_weights = (0.4, 0.2)  # GDL weights of the deep-supervision outputs aux1, aux2.
  c.released_fix_dice_backward = False  # True: back-propagate the GDL (the code never does).
  c.model = ml_collections.ConfigDict(dict(name="svnet", n_filters=16, dtype="float32"))
  c.confidence = ml_collections.ConfigDict(dict(
      name="asdnet_confidence", features=(32, 64, 128, 256), decoder="repaired", dtype="float32"))
  c.optimizer = optim.optimizer_config("adam", 1e-3, weight_decay=1e-4,
                                       decay_boundaries=(2500, 5000))
  c.confidence_optimizer = optim.optimizer_config("adam", 1e-4, weight_decay=1e-4,
                                                  decay_boundaries=(2500, 5000))
  return c


def released_config() -> ml_collections.ConfigDict:
  """The `method` block of the `released` preset: the authors' code (docs/methods/asdnet.md).

  HRResSegNet_DS (deep supervision) and the confidence net as coded; adversarial weight 0.05, semi
  weight 0.5; S: Adam 2e-3 ×0.1 every 10000 steps, D: Adam 1e-4, neither with weight decay.
  """
  c = default_config()
  c.preset = "released"
  c.lambda_adv = 0.05
  c.lambda_semi = 0.5
  c.model = ml_collections.ConfigDict(dict(name="hrres_segnet_ds", features=(32, 64, 128, 256),
                                           dtype="float32"))
  c.confidence.decoder = "as_coded"
  c.optimizer = optim.optimizer_config("adam", 2e-3, weight_decay=0.0, decay_every=10000,
                                       decay_factor=0.1)
  c.confidence_optimizer = optim.optimizer_config("adam", 1e-4, weight_decay=0.0)
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
  base.check_crop_sizes(config, SIZE_MULTIPLE,
                        "asdnet's segmenter and confidence net halve the crop three times")
  if config.method.preset == "released":
    data, n = config.data, int(config.method.sub_batches)
    if data.batch_labeled != data.batch_unlabeled or data.batch_labeled % n:
      raise DataError(
          f"config data.batch_labeled = {data.batch_labeled}, data.batch_unlabeled = "
          f"{data.batch_unlabeled}: asdnet's released preset draws each of its method.sub_batches "
          f"= {n} sub-batches from either stream, so both must be equal multiples of {n}")


def apply_preset(cfg: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """The effective hyperparameters of the method block `cfg` (static in the train step).

  Raises:
    DataError: an unknown `method.preset`, a negative weight or β, γ or the labeled probability
      outside [0, 1], sub_batches < 1, aux_weights not two numbers >= 0, a non-boolean fix flag.
  """
  base.check_choice(cfg, "preset", PRESETS)
  for key in ("beta", "lambda_adv", "lambda_semi"):
    base.check_positive(cfg, key)
  for key in ("gamma", "labeled_probability"):
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
      raise DataError(f"config method.{key} = {value!r} must be a number in [0, 1]")
  base.check_count(cfg, "sub_batches")
  aux = cfg.aux_weights
  if (not isinstance(aux, (tuple, list)) or len(aux) != 2
      or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in aux)):
    raise DataError(f"config method.aux_weights = {aux!r} must be two numbers >= 0 (aux1, aux2)")
  if not isinstance(cfg.released_fix_dice_backward, bool):
    raise DataError(f"config method.released_fix_dice_backward = "
                    f"{cfg.released_fix_dice_backward!r} must be True or False")
  return ml_collections.FrozenConfigDict(dict(
      preset=cfg.preset, beta=float(cfg.beta), lambda_adv=float(cfg.lambda_adv),
      lambda_semi=float(cfg.lambda_semi), gamma=float(cfg.gamma),
      sub_batches=int(cfg.sub_batches), labeled_probability=float(cfg.labeled_probability),
      aux_weights=tuple(float(w) for w in aux),
      fix_dice_backward=bool(cfg.released_fix_dice_backward)))


@flax.struct.dataclass
class State:
  """ASDNet's training state.

  Attributes:
    seg: the segmenter S, its Adam state and BN statistics.
    confidence: the confidence network D, its Adam state and BN statistics (of its up units).
    validation_dice: the mean foreground Dice of the latest validation (0 before the first), set
      by `after_validation`; `released` selects its semi-supervised voxels with it.
    hparams: `apply_preset`'s hyperparameters (static).
  """
  seg: base.TrainState
  confidence: base.TrainState
  validation_dice: jax.Array
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
  if hparams.preset == "released":
    if (not isinstance(out, dict) or set(out) != set(DEEP_SUPERVISION)
        or any(o.shape[-1] != num_classes for o in out.values())):
      raise DataError(f"config method.model.name = {cfg.model.name!r}: asdnet's released preset "
                      f"needs a deeply supervised segmenter with outputs {DEEP_SUPERVISION} of "
                      f"data.num_classes = {num_classes} logits (hrres_segnet_ds)")
  elif not isinstance(out, jax.ShapeDtypeStruct) or out.shape[-1] != num_classes:
    raise DataError(f"config method.model.name = {cfg.model.name!r}: asdnet needs a segmenter "
                    f"with one output of data.num_classes = {num_classes} logits (svnet)")
  seg_key, confidence_key = jax.random.split(rng)
  seg = base.create_train_state(segmenter, optim.method_optimizer(config), seg_key, x)
  conf = base.create_train_state(
      confidence, optim.method_optimizer(config, "confidence_optimizer"), confidence_key,
      jnp.zeros((1, *x.shape[1:-1], num_classes), jnp.float32))
  return State(seg=seg, confidence=conf, validation_dice=jnp.zeros((), jnp.float32),
               hparams=hparams)


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
  """One iteration of the state's preset: `paper_train_step` or `released_train_step`."""
  if state.hparams.preset == "released":
    return released_train_step(state, batch, rng)
  return paper_train_step(state, batch, rng)


def paper_train_step(state: State, batch: Batch, rng: jax.Array):
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
  """Eval-mode class probabilities P̂ = softmax(S(x)) of `inputs["image"]` (B, *S, C_in) (the main
  output of a deeply supervised S): {"model": (B, *S, C)}."""
  return {"model": _eval_probabilities(state, inputs["image"])}


def _eval_probabilities(state: State, image: jax.Array) -> jax.Array:
  """P̂ = softmax(S(x)) in eval mode (S's main output when it is deeply supervised)."""
  return jax.nn.softmax(main_logits(base.forward_eval(state.seg, image)), axis=-1)


def maps(state: State, inputs: dict) -> dict:
  """Eval-mode per-voxel maps for figure.png: {"confidence": (B, *S)}, M = softmax(D(P̂))[…, real],
  D's probability that S's prediction P̂ = softmax(S(x)) (its main output) is a label map."""
  probs = _eval_probabilities(state, inputs["image"])
  return {"confidence": confidence_map(base.forward_eval(state.confidence, probs))}


def after_validation(state: State, summary: dict) -> State:
  """Records the validation's mean foreground Dice (raw predictions of the method's view) in the
  state; the trainer calls it after each validation during training, before the step's
  checkpoint. A Dice that is not a number (no foreground anywhere) keeps the previous value."""
  view = summary["view_names"][0]
  dice = evaluate.headline(summary)[f"{view}/dice"]
  if not math.isfinite(dice):
    return state
  return state.replace(validation_dice=jnp.asarray(dice, jnp.float32))


# ------------------------------------------------------------------------------------------------
# The released code (`released`): three sub-batches, each labeled or unlabeled at random, their
# gradients accumulated, then one step of D and one of S. Reproduced term by term:
#
#   labeled sub-batch (images x, labels y, one-hot P); three train-mode forwards of S, each with
#   its own dropout key, BN statistics threaded (S₁, S₂, S₃ below):
#     CE_v(D(P), real) + CE_v(D(softmax S₁(x)), fake)    once; the fake NOT detached: its gradient
#                                                          reaches S too (towards "fake")
#     A = λ_adv·CE_v(D(softmax S₂(x)), real)              added to the running sum G
#     GDL(S₃) + 0.4·GDL(aux1) + 0.2·GDL(aux2)              added to the running sum T; back-propagated
#                                                          only with released_fix_dice_backward
#   unlabeled sub-batch (images u), one forward S₁:
#     A = λ_adv·CE_v(D(softmax S₁(u)), real)              added to the running sum G_U
#     Semi = λ_semi·masked_argmax_cross_entropy(S₁(u), M, 1 − validation Dice),
#            M = softmax(D(softmax S₁(u)))[…, real] of the same D call
#     G is replaced by G_U + Semi.
#   After each sub-batch G is back-propagated (and T, with the fix) into S AND D: D's gradients are
#   reset only at the iteration's start, so S's adversarial terms move D too.
#
# With the parameters fixed within the iteration, a term back-propagated k times contributes k
# times its gradient: the accumulated gradient is that of Σ (multiplicity × term), the
# multiplicities following from the L/U sequence (`released_multiplicities`).

DEEP_SUPERVISION = ("main", "aux1", "aux2")


def main_logits(out) -> jax.Array:
  """S's logits: the output itself, or the "main" one of a deeply supervised S."""
  return out["main"] if isinstance(out, dict) else out


@flax.struct.dataclass
class Multiplicities:
  """How often each term of the iteration is back-propagated: (n,) float32 arrays by sub-batch.

  Attributes:
    adversarial: the adversarial term A_m of sub-batch m (labeled or not).
    semi: the semi term of unlabeled sub-batch m (0 for a labeled one).
    dice: the GDL of labeled sub-batch m, if it were back-propagated (0 for an unlabeled one).
  """
  adversarial: jax.Array
  semi: jax.Array
  dice: jax.Array


def released_multiplicities(labeled: jax.Array) -> Multiplicities:
  """The multiplicities of the released code's repeated backward calls for one L/U sequence.

  Args:
    labeled: (n,) booleans, sub-batch m labeled or not.

  Returns:
    `Multiplicities`. E.g. (L, L, L): adversarial (3, 2, 1), dice (3, 2, 1); (U, L, U):
    adversarial (3, 1, 1), semi (2, 0, 1).
  """
  labeled = jnp.asarray(labeled, bool)
  n = labeled.shape[0]
  ids = jnp.arange(n)
  zeros = jnp.zeros((n,), jnp.float32)
  in_g, in_g_u, semi_in_g, in_t = zeros, zeros, zeros, zeros  # membership of G, G_U, G, T.
  adversarial, semi, dice = zeros, zeros, zeros
  for m in range(n):
    this = (ids == m).astype(jnp.float32)
    is_l = labeled[m]
    g_u = in_g_u + jnp.where(is_l, 0.0, this)  # unlabeled: G_U += A_m
    in_g = jnp.where(is_l, in_g + this, g_u)  # labeled: G += A_m; unlabeled: G = G_U + Semi_m
    semi_in_g = jnp.where(is_l, semi_in_g, this)
    in_g_u = g_u
    in_t = in_t + jnp.where(is_l, this, 0.0)  # labeled: T += Dice_m (T is never reset)
    adversarial, semi = adversarial + in_g, semi + semi_in_g  # backward(G)
    dice = dice + jnp.where(is_l, in_t, 0.0)  # backward(T), labeled sub-batches only
  return Multiplicities(adversarial=adversarial, semi=semi, dice=dice)


def _sub_batches(stream: dict, n: int) -> dict:
  """A batch stream's arrays (n·b, ...) as (n, b, ...): sub-batch m is rows m·b .. m·b + b − 1."""
  return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in stream.items()}


def deep_supervision_gdl(out: dict, labels: jax.Array, aux_weights) -> jax.Array:
  """GDL(main) + w₁·GDL(aux1) + w₂·GDL(aux2), each the batch-pooled `generalized_dice_loss`."""
  num_classes = out["main"].shape[-1]
  weights = (1.0, *aux_weights)
  return sum(w * losses.generalized_dice_loss(out[k], labels, num_classes)
             for w, k in zip(weights, DEEP_SUPERVISION))


def _logged(terms: dict) -> dict:
  """Metrics as float32 (both branches of a sub-batch must return the same types)."""
  return {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}


# The sub-batches each logged term is averaged over: "labeled", "unlabeled" or "all".
RELEASED_METRICS = {"loss_dice": "labeled", "loss_confidence_real": "labeled",
                    "loss_confidence_fake": "labeled", "loss_adversarial": "all",
                    "loss_semi": "unlabeled", "mask_fraction": "unlabeled"}


def released_objective(params: dict, state: State, batch: Batch, labeled: jax.Array,
                       rng: jax.Array):
  """Σ multiplicity × term over the iteration's sub-batches, as a function of both networks'
  parameters {"seg", "confidence"}: its gradient is what the released code accumulates.

  Args:
    params: {"seg": S's parameters, "confidence": D's}.
    state: the state (BN statistics, hyperparameters, the latest validation Dice).
    batch: n·b labeled and n·b unlabeled samples; sub-batch m uses rows m·b .. m·b + b − 1 of the
      stream it draws from.
    labeled: (n,) booleans, the L/U sequence.
    rng: dropout keys (one per forward of S).

  Returns:
    (objective, (metrics: per-kind means over the sub-batches of that kind (0 if none) of the
    unweighted terms, (S's, D's batch_stats after all the calls))).
  """
  hp = state.hparams
  n = hp.sub_batches
  mult = released_multiplicities(labeled)
  threshold = 1.0 - state.validation_dice
  seg, conf = state.seg, state.confidence
  lab, unl = _sub_batches(batch.labeled, n), _sub_batches(batch.unlabeled, n)

  def labeled_terms(m, lab_m, unl_m, stats):
    del unl_m
    seg_stats, d_stats = stats
    x, y = lab_m["image"], lab_m["label"]
    keys = jax.random.split(jax.random.fold_in(rng, m), 3)
    out1, seg_stats = base.forward_train(seg, params["seg"], x, keys[0], seg_stats)
    logits = main_logits(out1)
    reals = one_hot_labels(y, logits.shape[-1], jnp.float32)
    d_real, d_stats = base.forward_train(conf, params["confidence"], reals, batch_stats=d_stats)
    d_fake, d_stats = base.forward_train(conf, params["confidence"],
                                         jax.nn.softmax(logits, axis=-1), batch_stats=d_stats)
    out2, seg_stats = base.forward_train(seg, params["seg"], x, keys[1], seg_stats)
    d_adv, d_stats = base.forward_train(conf, params["confidence"],
                                        jax.nn.softmax(main_logits(out2), axis=-1),
                                        batch_stats=d_stats)
    out3, seg_stats = base.forward_train(seg, params["seg"], x, keys[2], seg_stats)
    loss_real, loss_fake, loss_adv = real_loss(d_real), fake_loss(d_fake), real_loss(d_adv)
    loss_dice = deep_supervision_gdl(out3, y, hp.aux_weights)
    dice_weight = mult.dice[m] if hp.fix_dice_backward else 0.0
    # Multiplicities (small integers) last, so that they scale the loss in its own dtype.
    total = (loss_real + loss_fake + hp.lambda_adv * loss_adv * mult.adversarial[m]
             + loss_dice * dice_weight)
    terms = dict(loss_dice=loss_dice, loss_confidence_real=loss_real,
                 loss_confidence_fake=loss_fake, loss_adversarial=loss_adv,
                 loss_semi=jnp.zeros(()), mask_fraction=jnp.zeros(()))
    return total, (seg_stats, d_stats), _logged(terms)

  def unlabeled_terms(m, lab_m, unl_m, stats):
    del lab_m
    seg_stats, d_stats = stats
    key = jax.random.split(jax.random.fold_in(rng, m), 3)[0]
    out, seg_stats = base.forward_train(seg, params["seg"], unl_m["image"], key, seg_stats)
    logits = main_logits(out)
    d_adv, d_stats = base.forward_train(conf, params["confidence"],
                                        jax.nn.softmax(logits, axis=-1), batch_stats=d_stats)
    loss_adv = real_loss(d_adv)
    confidence_u = confidence_map(jax.lax.stop_gradient(d_adv))
    loss_semi = losses.masked_argmax_cross_entropy(logits, confidence_u, threshold)
    total = (hp.lambda_adv * loss_adv * mult.adversarial[m]
             + hp.lambda_semi * loss_semi * mult.semi[m])
    terms = dict(loss_dice=jnp.zeros(()), loss_confidence_real=jnp.zeros(()),
                 loss_confidence_fake=jnp.zeros(()), loss_adversarial=loss_adv,
                 loss_semi=loss_semi,
                 mask_fraction=jnp.mean((confidence_u > threshold).astype(jnp.float32)))
    return total, (seg_stats, d_stats), _logged(terms)

  def sub_batch(stats, inputs):
    # One compiled body for all sub-batches; at run time only the drawn kind's branch executes.
    m, is_labeled, lab_m, unl_m = inputs
    term, stats, terms = jax.lax.cond(is_labeled, labeled_terms, unlabeled_terms,
                                      m, lab_m, unl_m, stats)
    return stats, (term, terms)

  (seg_stats, d_stats), (per_term, per_sub_batch) = jax.lax.scan(
      sub_batch, (seg.batch_stats, conf.batch_stats), (jnp.arange(n), labeled, lab, unl))
  total = jnp.sum(per_term)
  kinds = {"labeled": labeled, "unlabeled": ~labeled, "all": jnp.ones_like(labeled)}

  def mean_over(key, kind):
    mask = kinds[kind]
    return (jnp.sum(jnp.where(mask, per_sub_batch[key], 0.0))
            / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0))

  metrics = {key: mean_over(key, kind) for key, kind in RELEASED_METRICS.items()}
  metrics.update(labeled_sub_batches=jnp.sum(labeled.astype(jnp.float32)),
                 semi_threshold=threshold)
  return total, (metrics, (seg_stats, d_stats))


def released_train_step(state: State, batch: Batch, rng: jax.Array):
  """One iteration of the released code: the L/U sequence drawn from `rng`, the gradient of
  `released_objective` with respect to both networks, then one Adam step of D and one of S.

  Metrics: loss (the objective), loss_dice (logged even when not back-propagated),
  loss_confidence_real / _fake (labeled sub-batches), loss_adversarial (all), loss_semi and
  mask_fraction (unlabeled sub-batches), labeled_sub_batches, semi_threshold, both learning rates.
  """
  sequence_key, dropout_key = jax.random.split(rng)
  labeled = jax.random.bernoulli(sequence_key, state.hparams.labeled_probability,
                                 (state.hparams.sub_batches,))
  params = {"seg": state.seg.params, "confidence": state.confidence.params}
  (loss, (metrics, (seg_stats, d_stats))), grads = jax.value_and_grad(
      released_objective, has_aux=True)(params, state, batch, labeled, dropout_key)
  seg = state.seg.updated(grads["seg"], seg_stats)
  confidence = state.confidence.updated(grads["confidence"], d_stats)
  return state.replace(seg=seg, confidence=confidence), base.scalar_metrics(
      loss=loss, **metrics, learning_rate=optim.learning_rate(seg),
      learning_rate_confidence=optim.learning_rate(confidence))
