"""The loss-function zoo, ported from the reference PyTorch code (UA-MT, DTC, SASSNet, SSL4MIS,
Duo-SegNet, ASDNet, MONAI, nnU-Net).

Every loss is a pure, jittable and differentiable function of JAX arrays. Conventions:

* Channels-last: class scores / probabilities are (N, *spatial, C) — (N, X, Y, Z, C) in 3D, (N, H, W, C) in
  2D. Integer label maps have no channel axis: (N, *spatial), values in [0, C). Labels outside [0, C) are
  not checked (they cannot be inside `jit`); they count as "no class" in the Dice losses.
* "Pooled" sums run over every sample and voxel passed in (the reference's batch Dice), unless stated.
* The ε / smoothing constants are the reference's, exactly.
* Only static properties are validated (shapes, class counts): a mismatch raises `ValueError` at trace time.
  Values (ranges of probabilities or labels) are never checked.

Which reference each function reproduces is named in its docstring; `tests/test_losses.py` pins each one to
the golden outputs of the original code in `tests/golden/`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

# Re-exported: the issue lists the ramps among the losses; they live in `jaxseg.schedules`.
from jaxseg.schedules import cosine_rampdown, linear_rampup, sigmoid_rampup

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_map",
    "binary_cross_entropy_with_logits",
    "cosine_rampdown",
    "cross_entropy",
    "dice_loss",
    "entropy_loss",
    "generalized_dice_loss",
    "generalized_dice_loss_per_sample",
    "linear_rampup",
    "masked_pseudo_label_gdl",
    "masked_argmax_cross_entropy",
    "mse",
    "multiclass_dice_loss",
    "multiclass_dice_loss_per_class",
    "per_sample_foreground_dice",
    "sample_attention_generalized_dice_loss",
    "sigmoid_rampup",
    "soft_dice_ce_loss",
    "soft_dice_loss",
    "softmax_dice_loss",
    "softmax_kl_loss",
    "softmax_mse_loss",
    "symmetric_mse_loss",
    "tp_fp_fn",
]

# Smoothing of every LA-family / SSL4MIS Dice (numerator and denominator).
DICE_SMOOTH = 1e-5
# nnU-Net adds this to the Dice denominator on top of `smooth`.
NNUNET_DENOMINATOR_EPS = 1e-8
# ASDNet GDL: class weight 1 / ((Σt)² + ε) and ε' added per class to the denominator.
GDL_WEIGHT_EPS = 1e-6
GDL_DENOMINATOR_EPS = 2e-6
# SSL4MIS entropy: log(p + ε).
ENTROPY_EPS = 1e-6
# PyTorch BCELoss clamps log(p) and log(1 - p) from below at -100 ...
BCE_LOG_CLAMP = -100.0
# ... and its backward divides by max(p (1 - p), 1e-12).
BCE_GRAD_EPS = 1e-12


# --------------------------------------------------------------------------------------------------------
# Shape checks (static, at trace time).


def _check_same_shape(a: jax.Array, b: jax.Array, what: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{what}: the two inputs must have the same shape, got {a.shape} and {b.shape}.")


def _check_scores_and_labels(scores: jax.Array, labels: jax.Array, what: str,
                             num_classes: Optional[int] = None) -> None:
  """Scores (N, *spatial, C) against integer labels (N, *spatial) and, if given, the class count."""
  if scores.ndim < 2 or scores.shape[:-1] != labels.shape:
    raise ValueError(
        f"{what}: expected channels-last scores (N, *spatial, C) and labels (N, *spatial) without a channel "
        f"axis, got {scores.shape} and {labels.shape}.")
  if num_classes is not None and scores.shape[-1] != num_classes:
    raise ValueError(f"{what}: num_classes={num_classes} but the scores have {scores.shape[-1]} channels.")


def _one_hot(labels: jax.Array, num_classes: int, dtype: jnp.dtype) -> jax.Array:
  """(N, *spatial) integer labels -> (N, *spatial, C); labels outside [0, C) become all-zero rows."""
  return jax.nn.one_hot(labels, num_classes, dtype=dtype)


def _sum_all_but_classes(x: jax.Array) -> jax.Array:
  """(..., C) -> (C,): pooled over batch and space."""
  return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


def _sum_space(x: jax.Array) -> jax.Array:
  """(N, *spatial, C) -> (N, C): per sample, pooled over space."""
  return jnp.sum(x, axis=tuple(range(1, x.ndim - 1)))


# --------------------------------------------------------------------------------------------------------
# Dice family.


def dice_loss(probs: jax.Array, target: jax.Array, squared: bool = True,
              smooth: float = DICE_SMOOTH) -> jax.Array:
  """Binary batch-pooled Dice loss (DTC / UA-MT / SSL4MIS `dice_loss` and `dice_loss1`).

  squared:  1 − (2Σpt + s) / (Σp² + Σt² + s)   (`dice_loss`, the LA family's supervised Dice)
  linear:   1 − (2Σpt + s) / (Σp + Σt + s)     (`dice_loss1`; 1 − Duo-SegNet's `dice_coef`)

  Sums run over all elements. An all-zero prediction against an all-zero target gives exactly 0 (the smooth
  term makes 0/0 = s/s).

  Args:
    probs: foreground probabilities, any shape, e.g. (N, X, Y, Z) for `softmax[..., 1]`.
    target: binary target of the same shape (bool, integer or float; soft targets are allowed).
    squared: squared (True) or linear (False) denominator.
    smooth: added to numerator and denominator.

  Returns:
    Scalar loss in [0, 1] for probabilities and binary targets.
  """
  _check_same_shape(probs, target, "dice_loss")
  target = target.astype(probs.dtype)
  intersection = jnp.sum(probs * target)
  if squared:
    denominator = jnp.sum(probs * probs) + jnp.sum(target * target)
  else:
    denominator = jnp.sum(probs) + jnp.sum(target)
  return 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)


def multiclass_dice_loss_per_class(probs: jax.Array, labels: jax.Array, num_classes: int,
                                   softmax: bool = False) -> jax.Array:
  """Per-class squared Dice loss d_c of SSL4MIS `DiceLoss` (its `_dice_loss` for each class).

  d_c = 1 − (2Σ p_c t_c + 1e-5) / (Σ p_c² + Σ t_c² + 1e-5), pooled over batch and space, t = one-hot(labels).
  A class absent from the labels gives d_c = 1 − 1e-5 / (Σ p_c² + 1e-5).

  Args:
    probs: (N, *spatial, C) class probabilities (logits when `softmax=True`).
    labels: (N, *spatial) integer labels.
    num_classes: C.
    softmax: apply a softmax over the class axis first.

  Returns:
    (C,) per-class losses, background included.
  """
  _check_scores_and_labels(probs, labels, "multiclass_dice_loss", num_classes)
  if softmax:
    probs = jax.nn.softmax(probs, axis=-1)
  target = _one_hot(labels, num_classes, probs.dtype)
  intersection = _sum_all_but_classes(probs * target)
  denominator = _sum_all_but_classes(probs * probs) + _sum_all_but_classes(target * target)
  return 1.0 - (2.0 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)


def multiclass_dice_loss(probs: jax.Array, labels: jax.Array, num_classes: int,
                         weight: Optional[Sequence[float] | jax.Array] = None,
                         softmax: bool = False) -> jax.Array:
  """SSL4MIS `DiceLoss(C)(probs, labels, weight, softmax)`: Σ_c w_c d_c / C.

  Background included, and divided by C even when weighted (as released). d_c as in
  `multiclass_dice_loss_per_class`.

  Args:
    probs: (N, *spatial, C) class probabilities (logits when `softmax=True`).
    labels: (N, *spatial) integer labels.
    num_classes: C.
    weight: optional (C,) class weights (default all 1).
    softmax: apply a softmax over the class axis first.

  Returns:
    Scalar loss.
  """
  per_class = multiclass_dice_loss_per_class(probs, labels, num_classes, softmax=softmax)
  if weight is None:
    return jnp.mean(per_class)
  weight = jnp.asarray(weight, per_class.dtype)
  if weight.shape != (num_classes,):
    raise ValueError(f"multiclass_dice_loss: weight must have shape ({num_classes},), got {weight.shape}.")
  return jnp.sum(weight * per_class) / num_classes


def softmax_dice_loss(input_logits: jax.Array, target_logits: jax.Array) -> jax.Array:
  """SSL4MIS `softmax_dice_loss`: mean over classes of the linear Dice loss between two softmax maps.

  mean_c [1 − (2Σ a_c b_c + 1e-5) / (Σ a_c + Σ b_c + 1e-5)], a = softmax(input), b = softmax(target), sums
  pooled over batch and space. No stop-gradient on the target: the caller decides.

  Args:
    input_logits: (N, *spatial, C).
    target_logits: (N, *spatial, C).

  Returns:
    Scalar loss.
  """
  _check_same_shape(input_logits, target_logits, "softmax_dice_loss")
  a = jax.nn.softmax(input_logits, axis=-1)
  b = jax.nn.softmax(target_logits, axis=-1)
  intersection = _sum_all_but_classes(a * b)
  denominator = _sum_all_but_classes(a) + _sum_all_but_classes(b)
  return jnp.mean(1.0 - (2.0 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH))


def tp_fp_fn(probs: jax.Array, labels: jax.Array,
             batch_dice: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Soft true/false positives and false negatives per class (nnU-Net `get_tp_fp_fn_tn`).

  tp = Σ p·y, fp = Σ p·(1 − y), fn = Σ (1 − p)·y with y = one-hot(labels).

  Args:
    probs: (N, *spatial, C) probabilities.
    labels: (N, *spatial) integer labels.
    batch_dice: sum over batch and space (True) or over space only (False).

  Returns:
    (tp, fp, fn), each (C,) if `batch_dice` else (N, C); background included.
  """
  _check_scores_and_labels(probs, labels, "tp_fp_fn")
  target = _one_hot(labels, probs.shape[-1], probs.dtype)
  reduce = _sum_all_but_classes if batch_dice else _sum_space
  return (reduce(probs * target), reduce(probs * (1.0 - target)), reduce((1.0 - probs) * target))


def soft_dice_loss(logits: jax.Array, labels: jax.Array, batch_dice: bool = True,
                   include_background: bool = False, smooth: float = DICE_SMOOTH) -> jax.Array:
  """nnU-Net `SoftDiceLoss` with softmax inside: the **negative** mean soft Dice.

  dc_c = (2tp_c + s) / (2tp_c + fp_c + fn_c + s + 1e-8); loss = −mean(dc) over the foreground classes (and
  over samples when `batch_dice=False`). It lies in [−1, 0]; an absent class gives dc ≈ 0.

  Args:
    logits: (N, *spatial, C).
    labels: (N, *spatial) integer labels.
    batch_dice: tp/fp/fn pooled over the batch (MAML's setting) or per sample.
    include_background: keep class 0 (nnU-Net `do_bg`).
    smooth: nnU-Net `smooth` (1e-5 in MAMLTrainerV2).

  Returns:
    Scalar loss (≤ 0).
  """
  tp, fp, fn = tp_fp_fn(jax.nn.softmax(logits, axis=-1), labels, batch_dice=batch_dice)
  dice = (2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth + NNUNET_DENOMINATOR_EPS)
  if not include_background:
    dice = dice[..., 1:]
  return -jnp.mean(dice)


def soft_dice_ce_loss(logits: jax.Array, labels: jax.Array, batch_dice: bool = True,
                      include_background: bool = False, smooth: float = DICE_SMOOTH) -> jax.Array:
  """nnU-Net `DC_and_CE_loss` as MAMLTrainerV2 configures it: CE mean + `soft_dice_loss` (weights 1, 1).

  Usually negative, because the Dice part is the negative Dice.

  Args:
    logits: (N, *spatial, C).
    labels: (N, *spatial) integer labels.
    batch_dice, include_background, smooth: as in `soft_dice_loss`.

  Returns:
    Scalar loss.
  """
  return cross_entropy(logits, labels) + soft_dice_loss(
      logits, labels, batch_dice=batch_dice, include_background=include_background, smooth=smooth)


# --------------------------------------------------------------------------------------------------------
# ASDNet generalized Dice, sample attention and masked pseudo-label loss (Nie et al., MICCAI 2018;
# `ginobilinie/asdnet`; docs/methods/asdnet.md).


def _generalized_dice_from_sums(intersection: jax.Array, prob_sum: jax.Array,
                                target_sum: jax.Array) -> jax.Array:
  """GDL from per-class sums (..., C) -> (...).

  w_c = 0 for a class absent from the target (else 1 / ((Σt_c)² + 1e-6)); 2e-6 is added per class to the
  denominator even when w_c = 0, as released.
  """
  weight = jnp.where(target_sum > 0, 1.0 / (target_sum * target_sum + GDL_WEIGHT_EPS), 0.0)
  numerator = jnp.sum(weight * intersection, axis=-1)
  denominator = jnp.sum(weight * (prob_sum + target_sum) + GDL_DENOMINATOR_EPS, axis=-1)
  return 1.0 - 2.0 * numerator / denominator


def _probs_and_one_hot(scores: jax.Array, target: jax.Array, num_classes: Optional[int], from_logits: bool,
                       what: str) -> tuple[jax.Array, jax.Array]:
  """(probabilities, one-hot target), both (N, *spatial, C), from scores and a label map or one-hot target.

  The target is a one-hot (or soft) map when it has the scores' shape, an integer label map when it has the
  scores' shape without the class axis; anything else raises.
  """
  if num_classes is None:
    num_classes = scores.shape[-1]
  is_one_hot = target.shape == scores.shape
  if is_one_hot and scores.shape[-1] != num_classes:
    raise ValueError(f"{what}: num_classes={num_classes} but the scores have {scores.shape[-1]} channels.")
  if not is_one_hot:
    _check_scores_and_labels(scores, target, what, num_classes)
  probs = jax.nn.softmax(scores, axis=-1) if from_logits else scores
  target = target.astype(probs.dtype) if is_one_hot else _one_hot(target, num_classes, probs.dtype)
  return probs, target


def generalized_dice_loss(scores: jax.Array, target: jax.Array, num_classes: Optional[int] = None, *,
                          from_logits: bool = True) -> jax.Array:
  """ASDNet generalized Dice loss (Eq. 1), `GeneralizedDiceLoss4Organs` of `ginobilinie/asdnet`.

  loss = 1 − 2 Σ_c w_c Σ_v p_c t_c / Σ_c [w_c (Σ_v p_c + Σ_v t_c) + 2e-6], w_c = 1 / ((Σ_v t_c)² + 1e-6), or
  w_c = 0 when class c is absent from the target. Background included. As in the reference, the sums are
  pooled over the whole batch and space (one set of class weights per batch); see
  `generalized_dice_loss_per_sample` for one loss per sample.

  Args:
    scores: (N, *spatial, C) logits (softmax inside, the reference's call) or, with `from_logits=False`,
      probabilities P̂.
    target: (N, *spatial) integer labels, or (N, *spatial, C) one-hot (soft targets are accepted).
    num_classes: C; inferred from the scores when None, checked against them otherwise.
    from_logits: apply a softmax over the class axis first.

  Returns:
    Scalar loss in [0, 1] (exactly 1 with zero gradient when the target is empty everywhere).
  """
  probs, target = _probs_and_one_hot(scores, target, num_classes, from_logits, "generalized_dice_loss")
  return _generalized_dice_from_sums(_sum_all_but_classes(probs * target), _sum_all_but_classes(probs),
                                     _sum_all_but_classes(target))


def generalized_dice_loss_per_sample(scores: jax.Array, target: jax.Array, num_classes: Optional[int] = None,
                                     *, from_logits: bool = True) -> jax.Array:
  """`generalized_dice_loss` (Eq. 1) of each sample on its own (class weights from that sample's counts).

  Args:
    scores: (N, *spatial, C) logits, or probabilities with `from_logits=False`.
    target: (N, *spatial) integer labels or (N, *spatial, C) one-hot.
    num_classes: C, or None to infer it from the scores.
    from_logits: apply a softmax over the class axis first.

  Returns:
    (N,) losses in [0, 1].
  """
  probs, target = _probs_and_one_hot(scores, target, num_classes, from_logits,
                                     "generalized_dice_loss_per_sample")
  return _generalized_dice_from_sums(_sum_space(probs * target), _sum_space(probs), _sum_space(target))


def per_sample_foreground_dice(scores: jax.Array, target: jax.Array,
                               num_classes: Optional[int] = None) -> jax.Array:
  """The dsc of ASDNet's sample attention (Eq. 2): per sample, the mean hard foreground Dice of argmax P̂.

  dsc_n = mean_{c ≥ 1} 2|A_c ∩ Y_c| / (|A_c| + |Y_c|) with A = one-hot(argmax scores), and 1 for a class
  absent from both prediction and label. The argmax is the same for logits and probabilities (ties go to the
  first class). It is a measurement, not a loss: the result is under stop-gradient, also with respect to a
  float one-hot target.

  Args:
    scores: (N, *spatial, C) logits or probabilities, C ≥ 2.
    target: (N, *spatial) integer labels or (N, *spatial, C) one-hot.
    num_classes: C, or None to infer it from the scores.

  Returns:
    (N,) Dice scores in [0, 1].
  """
  if scores.shape[-1] < 2:
    raise ValueError(f"per_sample_foreground_dice needs at least 2 classes, got {scores.shape[-1]}.")
  dtype = jnp.result_type(scores.dtype, jnp.float32)
  predicted = _one_hot(jnp.argmax(scores, axis=-1), scores.shape[-1], dtype)
  # from_logits=False: the one-hot argmax is already a "probability" map; only the target is converted.
  predicted, target = _probs_and_one_hot(predicted, target, num_classes, False, "per_sample_foreground_dice")
  predicted, target = predicted[..., 1:], target[..., 1:]
  overlap = _sum_space(predicted * target)
  size_sum = _sum_space(predicted) + _sum_space(target)
  dice = jnp.where(size_sum > 0, 2.0 * overlap / jnp.where(size_sum > 0, size_sum, 1.0), 1.0)
  return jax.lax.stop_gradient(jnp.mean(dice, axis=-1))


def sample_attention_generalized_dice_loss(scores: jax.Array, target: jax.Array,
                                           num_classes: Optional[int] = None, beta: float = 2.0, *,
                                           from_logits: bool = True) -> jax.Array:
  """ASDNet sample-attention Dice (Eq. 2), per sample as jaxseg implements it.

  loss = mean_n (1 − sg(dsc_n))^β · gdl_n, where gdl_n is the generalized Dice loss of sample n alone and
  dsc_n its hard foreground Dice (`per_sample_foreground_dice`) under stop-gradient. Well-segmented samples
  are down-weighted; the gradient of sample n is (1 − dsc_n)^β / N times the gradient of gdl_n. (The paper's
  dsc is "the sample's mean Dice over categories"; the released code's own sample attention is a different,
  off-by-default factor computed from D's output, w = 12.5·(p̄ − 0.5)² − 0.5, applied as (1 + w).)

  Args:
    scores: (N, *spatial, C) logits, or probabilities with `from_logits=False`.
    target: (N, *spatial) integer labels or (N, *spatial, C) one-hot.
    num_classes: C ≥ 2, or None to infer it from the scores.
    beta: attention exponent β (2 in the paper).
    from_logits: apply a softmax over the class axis first (the dsc uses the argmax either way).

  Returns:
    Scalar loss in [0, 1].
  """
  # Stop-gradient again here, so the factor stays a constant whatever the dsc function becomes.
  dice = jax.lax.stop_gradient(per_sample_foreground_dice(scores, target, num_classes))
  attention = (1.0 - dice) ** beta
  gdl = generalized_dice_loss_per_sample(scores, target, num_classes, from_logits=from_logits)
  return jnp.mean(attention * gdl)


def masked_pseudo_label_gdl(probs_u: jax.Array, confidence: jax.Array, gamma: float = 0.5) -> jax.Array:
  """ASDNet region-attention semi-supervised loss (Eq. 6): GDL of P̂ against its own argmax, where D trusts it.

  With P̄ = one-hot(argmax P̂) and m_v = [M_v > γ] (strict):

      loss = 1 − 2 Σ_c π_c Σ_v m_v P̄_c P̂_c / Σ_c [π_c Σ_v m_v (P̄_c + P̂_c) + 2e-6],
      π_c  = 1 / ((Σ_v m_v P̄_c)² + 1e-6), or 0 when no selected voxel is predicted as class c,

  i.e. `generalized_dice_loss` restricted to the selected voxels, sums pooled over the batch and space.
  P̄ and the mask are constants (stop-gradient): only P̂ receives a gradient, and the class weights come
  from the masked pseudo-label counts.

  Empty mask (no voxel with M > γ): the loss is defined as **0, with zero gradient** (the plain formula
  would give 1 with zero gradient, which would log as a maximal loss although nothing was selected).

  Args:
    probs_u: (N, *spatial, C) probabilities P̂ of the unlabeled samples.
    confidence: (N, *spatial) confidence map M, e.g. softmax(D(sg P̂))[..., 1]; not differentiated.
    gamma: the confidence threshold γ (0.5 in jaxseg; the paper gives no value).

  Returns:
    Scalar loss in [0, 1].
  """
  _check_scores_and_labels(probs_u, confidence, "masked_pseudo_label_gdl")
  # Both are selections made from the network's outputs, not targets to move: no gradient through them.
  pseudo = jax.lax.stop_gradient(_one_hot(jnp.argmax(probs_u, axis=-1), probs_u.shape[-1], probs_u.dtype))
  mask = jax.lax.stop_gradient(confidence > gamma).astype(probs_u.dtype)[..., None]
  loss = _generalized_dice_from_sums(_sum_all_but_classes(mask * pseudo * probs_u),
                                     _sum_all_but_classes(mask * probs_u), _sum_all_but_classes(mask * pseudo))
  # The other branch is finite (denominator ≥ C·2e-6), so the where passes a zero gradient, never a NaN.
  return jnp.where(jnp.any(mask > 0), loss, jnp.zeros_like(loss))


def masked_argmax_cross_entropy(logits_u: jax.Array, confidence: jax.Array,
                                threshold: float | jax.Array) -> jax.Array:
  """The semi-supervised term of ASDNet's released code: cross-entropy against the own argmax where
  the confidence network trusts the prediction.

      loss = −mean_{v : M_v > threshold} log softmax(s_v)[argmax s_v]

  `ginobilinie/asdnet` (runGAN.py) builds a one-hot mask of the argmax at the selected voxels and
  averages the selected log-probabilities (`masked_select(...).mean()`): one value per selected voxel,
  the mean pooled over the batch and space. The mask and the argmax are constants; only the logits
  receive a gradient. No voxel selected: 0 with zero gradient (the reference then adds no term).

  Args:
    logits_u: (N, *spatial, C) logits s of the unlabeled samples.
    confidence: (N, *spatial) confidence map M (D's "real" probability); not differentiated.
    threshold: selection threshold (strict); the released code uses 1 − the latest validation Dice.

  Returns:
    Scalar loss ≥ 0.
  """
  _check_scores_and_labels(logits_u, confidence, "masked_argmax_cross_entropy")
  log_probs = jax.nn.log_softmax(logits_u, axis=-1)
  # The pseudo-label is an index (ties go to the first class, as torch.max's): a constant.
  pseudo = jnp.argmax(logits_u, axis=-1)
  picked = jnp.take_along_axis(log_probs, pseudo[..., None], axis=-1)[..., 0]
  mask = jax.lax.stop_gradient(confidence > threshold).astype(log_probs.dtype)
  count = jnp.sum(mask)
  return -jnp.sum(mask * picked) / jnp.maximum(count, 1.0)


# --------------------------------------------------------------------------------------------------------
# Cross-entropy family.


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  weight: Optional[Sequence[float] | jax.Array] = None) -> jax.Array:
  """PyTorch `CrossEntropyLoss` (mean): −Σ_v w_{y_v} log softmax(s_v)_{y_v} / Σ_v w_{y_v}.

  Unweighted it is the plain mean over batch and voxels. Labels must lie in [0, C) (no `ignore_index`).

  Args:
    logits: (N, *spatial, C).
    labels: (N, *spatial) integer labels.
    weight: optional (C,) class weights.

  Returns:
    Scalar loss.
  """
  _check_scores_and_labels(logits, labels, "cross_entropy")
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  labels = labels.astype(jnp.int32)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  if weight is None:
    return jnp.mean(nll)
  weight = jnp.asarray(weight, log_probs.dtype)
  if weight.shape != (logits.shape[-1],):
    raise ValueError(f"cross_entropy: weight must have shape ({logits.shape[-1]},), got {weight.shape}.")
  voxel_weight = weight[labels]
  return jnp.sum(voxel_weight * nll) / jnp.sum(voxel_weight)


@jax.custom_jvp
def _bce_map(probs: jax.Array, target: jax.Array) -> jax.Array:
  """Elementwise PyTorch BCE with the log clamp; derivatives as PyTorch's backward (see below)."""
  log_p = jnp.maximum(jnp.log(probs), BCE_LOG_CLAMP)
  log_not_p = jnp.maximum(jnp.log1p(-probs), BCE_LOG_CLAMP)
  return -(target * log_p + (1.0 - target) * log_not_p)


@_bce_map.defjvp
def _bce_map_jvp(primals, tangents):
  probs, target = primals
  probs_dot, target_dot = tangents
  log_p = jnp.maximum(jnp.log(probs), BCE_LOG_CLAMP)
  log_not_p = jnp.maximum(jnp.log1p(-probs), BCE_LOG_CLAMP)
  loss = -(target * log_p + (1.0 - target) * log_not_p)
  # PyTorch's BCELoss backward: (p − t) / max(p (1 − p), 1e-12). It equals the analytic derivative wherever
  # p (1 − p) > 1e-12 and stays finite at p = 0 or 1 (±1e12 for a wrong target, 0 for the right one), where
  # the derivative of the clamped forward would be 0 · ∞.
  d_probs = (probs - target) / jnp.maximum(probs * (1.0 - probs), BCE_GRAD_EPS)
  # Target derivative of the clamped forward: finite everywhere.
  d_target = log_not_p - log_p
  return loss, d_probs * probs_dot + d_target * target_dot


def binary_cross_entropy_map(probs: jax.Array, target: jax.Array) -> jax.Array:
  """Elementwise PyTorch `BCELoss(reduction='none')` on probabilities (Duo-SegNet `CE`).

  l = −(t · max(log p, −100) + (1 − t) · max(log(1 − p), −100)). There is no ε: exact p = 0 or 1 with the
  opposite target give exactly 100.

  Gradient (a documented choice): PyTorch's, dl/dp = (p − t) / max(p (1 − p), 1e-12). It is the analytic
  derivative away from 0 and 1, and finite at exact 0/1: ±1e12 per element for a wrong hard target and 0 for
  the right one (a preceding sigmoid that saturated to exactly 0/1 then contributes a zero factor, as in
  PyTorch). dl/dt = max(log(1 − p), −100) − max(log p, −100).

  Args:
    probs: probabilities in [0, 1], any shape.
    target: targets in [0, 1] (soft targets allowed), same shape.

  Returns:
    Elementwise losses, same shape.
  """
  _check_same_shape(probs, target, "binary_cross_entropy")
  return _bce_map(probs, target.astype(probs.dtype))


def binary_cross_entropy(probs: jax.Array, target: jax.Array) -> jax.Array:
  """PyTorch `BCELoss()` (mean) on probabilities; see `binary_cross_entropy_map` for the clamp and gradient.

  Args:
    probs: probabilities in [0, 1], any shape, e.g. (N, H, W, 1).
    target: targets in [0, 1], same shape.

  Returns:
    Scalar loss.
  """
  return jnp.mean(binary_cross_entropy_map(probs, target))


def binary_cross_entropy_with_logits(logits: jax.Array, target: jax.Array) -> jax.Array:
  """PyTorch `BCEWithLogitsLoss()` (mean): mean[max(s, 0) − s·t + log(1 + e^{−|s|})].

  Computed as mean[softplus(s) − s·t]: stable for any logit (no clamp needed); the gradient is σ(s) − t.

  Args:
    logits: any shape.
    target: targets in [0, 1], same shape.

  Returns:
    Scalar loss.
  """
  _check_same_shape(logits, target, "binary_cross_entropy_with_logits")
  return jnp.mean(jax.nn.softplus(logits) - logits * target.astype(logits.dtype))


def entropy_loss(probs: jax.Array) -> jax.Array:
  """SSL4MIS `entropy_loss(p, C)` with C = the channel count: mean_v[−Σ_c p_c log(p_c + 1e-6)] / log C.

  The ε inside the log makes a one-hot map slightly negative: −log(1 + 1e-6) / log C per voxel (≈ −1.44e-6 for
  C = 2), as released.

  Args:
    probs: (N, *spatial, C) probabilities, C ≥ 2.

  Returns:
    Scalar mean normalised entropy (≤ 1).
  """
  num_classes = probs.shape[-1]
  if num_classes < 2:
    raise ValueError(
        f"entropy_loss needs at least 2 channels (it divides by log C), got shape {probs.shape}.")
  entropy = -jnp.sum(probs * jnp.log(probs + ENTROPY_EPS), axis=-1)
  return jnp.mean(entropy) / jnp.log(jnp.asarray(num_classes, probs.dtype))


# --------------------------------------------------------------------------------------------------------
# Consistency / regression losses.


def _probabilities(logits: jax.Array, sigmoid: bool) -> jax.Array:
  return jax.nn.sigmoid(logits) if sigmoid else jax.nn.softmax(logits, axis=-1)


def softmax_mse_loss(input_logits: jax.Array, target_logits: jax.Array, sigmoid: bool = False) -> jax.Array:
  """SSL4MIS / UA-MT `softmax_mse_loss`: elementwise (softmax(a) − softmax(b))², **not reduced**.

  The reference feeds the teacher's output as the target under `no_grad`; this function does not stop the
  target's gradient — the caller does.

  Args:
    input_logits: (N, *spatial, C).
    target_logits: same shape.
    sigmoid: use a sigmoid per channel instead of the softmax (1-channel heads).

  Returns:
    (N, *spatial, C) squared differences.
  """
  _check_same_shape(input_logits, target_logits, "softmax_mse_loss")
  return (_probabilities(input_logits, sigmoid) - _probabilities(target_logits, sigmoid)) ** 2


def softmax_kl_loss(input_logits: jax.Array, target_logits: jax.Array, sigmoid: bool = False) -> jax.Array:
  """SSL4MIS `softmax_kl_loss`: `F.kl_div(log_softmax(a), softmax(b), reduction='mean')`.

  mean over **all** elements (N · voxels · C, not per sample) of q (log q − log p), with q log q = 0 at q = 0.
  With `sigmoid=True` it is, as released, log σ(a) against σ(b): only the positive-class term, not a Bernoulli
  KL, so it can be negative.

  Args:
    input_logits: (N, *spatial, C).
    target_logits: same shape.
    sigmoid: the sigmoid variant.

  Returns:
    Scalar loss.
  """
  _check_same_shape(input_logits, target_logits, "softmax_kl_loss")
  if sigmoid:
    log_p = jax.nn.log_sigmoid(input_logits)
    q = jax.nn.sigmoid(target_logits)
  else:
    log_p = jax.nn.log_softmax(input_logits, axis=-1)
    q = jax.nn.softmax(target_logits, axis=-1)
  return jnp.mean(xlogy(q, q) - q * log_p)


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean squared error over all elements (e.g. SDF regression).

  Args:
    a: any shape.
    b: same shape.

  Returns:
    Scalar mean (a − b)².
  """
  _check_same_shape(a, b, "mse")
  return jnp.mean((a - b) ** 2)


def symmetric_mse_loss(input1: jax.Array, input2: jax.Array) -> jax.Array:
  """SSL4MIS `symmetric_mse_loss`: mean (x₁ − x₂)² of two probability maps, gradients to both.

  As released in SSL4MIS this is a plain mean (the Mean-Teacher original divided a sum by C); it equals
  `mse`, kept under its reference name.

  Args:
    input1: any shape.
    input2: same shape.

  Returns:
    Scalar loss, symmetric in its arguments.
  """
  _check_same_shape(input1, input2, "symmetric_mse_loss")
  return jnp.mean((input1 - input2) ** 2)


# --------------------------------------------------------------------------------------------------------
# MAML deep supervision (`YaoZhang93/MAML` MAMLTrainerV2, nnU-Net v1's deep-supervision weighting;
# jaxseg/models/maml.py).


def deep_supervision_weights(num_scales: int) -> tuple[float, ...]:
  """nnU-Net v1's deep-supervision weights for `num_scales` outputs, full resolution first.

  w_s ∝ 1/2^s for s = 0 … S − 1, the lowest-resolution output gets 0 (for S > 1), and the weights are
  normalised to sum 1. A network with P poolings has S = P outputs: P = 5 gives
  [8, 4, 2, 1, 0]/15 = [0.533, 0.267, 0.133, 0.067, 0].

  Args:
    num_scales: S ≥ 1 (S = 1: the single weight 1).

  Returns:
    S Python floats (static constants, usable outside `jit`).
  """
  if num_scales < 1:
    raise ValueError(f"num_scales must be ≥ 1, got {num_scales}.")
  weights = [0.5**s for s in range(num_scales)]
  if num_scales > 1:
    weights[-1] = 0.0
  total = sum(weights)
  return tuple(w / total for w in weights)


def maml_loss_weights(num_scales: int, num_modalities: int) -> tuple[float, ...]:
  """The released MAML loss weights of the flattened outputs [joint] + [branch m, scale s for m, s].

  [w_0] followed by M copies of `deep_supervision_weights(num_scales)`: the joint output gets the
  full-resolution weight w_0 and every branch the whole deep-supervision vector (the weights sum to
  1 + M, not 1). 4 poolings and 2 modalities: [4/7, 4/7, 2/7, 1/7, 0, 4/7, 2/7, 1/7, 0].
  """
  if num_modalities < 1:
    raise ValueError(f"num_modalities must be ≥ 1, got {num_modalities}.")
  w = deep_supervision_weights(num_scales)
  return (w[0],) + w * num_modalities


def deep_supervised_loss(loss_fn, scales: Sequence[jax.Array],
                         labels: Sequence[jax.Array]) -> jax.Array:
  """nnU-Net v1's deep-supervised loss of one network: Σ_s w_s·L(scales[s], labels[s]).

  w = `deep_supervision_weights(S)` (nnU-Net's `MultipleOutputLoss2` with its trainer's weights);
  terms of weight 0 (the coarsest output) are not evaluated. MAML applies it to every branch
  (`maml_deep_supervised_terms`), the early-fusion baseline to its only network.

  Args:
    loss_fn: the per-output loss, (logits (N, *S_s, K), labels (N, *S_s)) -> scalar.
    scales: S logit maps, full resolution first.
    labels: S label maps, labels[s] at the resolution of scales[s].
  """
  if len(scales) != len(labels):
    raise ValueError(f"The network has {len(scales)} outputs but there are {len(labels)} label "
                     "scales (one per output).")
  total = None
  for w, logits, target in zip(deep_supervision_weights(len(labels)), scales, labels):
    if w != 0.0:
      term = w * loss_fn(logits, target)
      total = term if total is None else total + term
  return total


MAML_LOSS_PRESETS = ("paper", "released")


def maml_deep_supervised_loss(loss_fn, joint_logits: jax.Array,
                              branch_logits: Sequence[Sequence[jax.Array]], labels: Sequence[jax.Array],
                              preset: str = "released", branch_weight: float = 1.0) -> jax.Array:
  """MAML's supervised loss (`maml_deep_supervised_terms`' total)."""
  return maml_deep_supervised_terms(loss_fn, joint_logits, branch_logits, labels, preset,
                                    branch_weight)[0]


def maml_deep_supervised_terms(loss_fn, joint_logits: jax.Array,
                               branch_logits: Sequence[Sequence[jax.Array]],
                               labels: Sequence[jax.Array], preset: str = "released",
                               branch_weight: float = 1.0):
  """MAML's supervised loss over the joint output and every branch's deep-supervision outputs.

    released: w_0·L(joint, y_0) + Σ_m Σ_s w_s·L(branch_m,s, y_s)
    paper:    L(joint, y_0) + λ·Σ_m Σ_s w_s·L(branch_m,s, y_s), λ = `branch_weight` (1: the paper does
              not give it)

  with w = `deep_supervision_weights(S)`. Terms with weight 0 are not evaluated (as nnU-Net's
  `MultipleOutputLoss2`).

  Args:
    loss_fn: the per-output loss, (logits (N, *S_s, K), labels (N, *S_s)) -> scalar (MAML:
      `soft_dice_ce_loss`).
    joint_logits: (N, *S, K).
    branch_logits: M sequences of S logit maps each, full resolution first (`MAML`'s "branches").
    labels: S label maps (N, *S_s), labels[s] at the resolution of scale s (labels[0] full resolution);
      producing the coarser ones is the caller's job (nnU-Net downsamples the label map per scale).
    preset: "released" or "paper".
    branch_weight: λ of the paper preset; must be 1 for "released".

  Returns:
    (total, {"loss_joint": L(joint, y_0), "loss_branches": Σ_m Σ_s w_s·L(branch_m,s, y_s)}).
  """
  if preset not in MAML_LOSS_PRESETS:
    raise ValueError(f"Unknown preset {preset!r}; expected one of {MAML_LOSS_PRESETS}.")
  if preset == "released" and branch_weight != 1.0:
    raise ValueError("The released loss has no branch weight λ; use preset='paper' to set one.")
  num_scales = len(labels)
  if any(len(scales) != num_scales for scales in branch_logits):
    raise ValueError(f"Every branch needs {num_scales} outputs (one per label scale), got "
                     f"{[len(scales) for scales in branch_logits]}.")
  w = deep_supervision_weights(num_scales)
  loss_joint = loss_fn(joint_logits, labels[0])
  loss_branches = jnp.zeros((), loss_joint.dtype)
  for scales in branch_logits:
    loss_branches = loss_branches + deep_supervised_loss(loss_fn, scales, labels)
  if preset == "released":
    total = w[0] * loss_joint + loss_branches
  else:
    total = loss_joint + branch_weight * loss_branches
  return total, dict(loss_joint=loss_joint, loss_branches=loss_branches)


__all__ += ["MAML_LOSS_PRESETS", "deep_supervised_loss", "deep_supervision_weights", "maml_deep_supervised_loss", "maml_deep_supervised_terms", "maml_loss_weights"]


# --------------------------------------------------------------------------------------------------------
# DKUXNet (dual kMaX UX-Net; `Rows21/DK-UXNet` for the supervised terms, jaxseg's own reading of the
# poster for the contrastive ones).

# `query_distribution_loss`: log clip(D, ε, 1).
QUERY_DISTRIBUTION_EPS = 1e-6
# Cosine similarity: x / max(‖x‖, ε), as PyTorch's `F.normalize`.
COSINE_NORM_EPS = 1e-12
CONTRASTIVE_NEGATIVES = ("other_class", "all")
CONTRASTIVE_SIMILARITIES = ("cosine", "dot")


def monai_dice_ce_loss(logits: jax.Array, labels: jax.Array, *, smooth_nr: float = 1e-5,
                       smooth_dr: float = 1e-5) -> jax.Array:
  """MONAI `DiceCELoss(to_onehot_y=True, softmax=True)` with every other argument at its default.

  Dice part, per sample b and class k (background included), on p = softmax(logits) and y = one-hot(labels):

    d_bk = 1 − (2 Σ_v p_bvk y_bvk + smooth_nr) / (Σ_v p_bvk + Σ_v y_bvk + smooth_dr)

  averaged over all B·K entries (`batch=False`, `squared_pred=False`, `reduction="mean"`). Cross-entropy
  part: PyTorch `CrossEntropyLoss` mean over samples and voxels, on the logits (`cross_entropy`). The sum
  has weights lambda_dice = lambda_ce = 1.

  Checked against MONAI's `monai/losses/dice.py` (DiceLoss, DiceCELoss; `dev`, June 2025): its Dice
  denominator 2(tp + fp/2 + fn/2) + smooth_dr equals Σp + Σy + smooth_dr; the reduction is the plain mean
  of the (B, K) losses; the CE receives the raw logits with the squeezed integer target, and the softmax
  applies to the Dice input only. A class absent from a sample's labels gives
  d = 1 − smooth_nr / (Σp + smooth_dr): ≈ 0 when the prediction is empty too, ≈ 1 once Σp ≫ 1e-5.

  Args:
    logits: (N, *spatial, K), K ≥ 2 (with K = 1 MONAI would switch to a sigmoid-free BCE; not supported).
    labels: (N, *spatial) integer labels in [0, K).
    smooth_nr: added to the Dice numerator.
    smooth_dr: added to the Dice denominator.

  Returns:
    Scalar loss.
  """
  _check_scores_and_labels(logits, labels, "monai_dice_ce_loss")
  num_classes = logits.shape[-1]
  if num_classes < 2:
    raise ValueError(f"monai_dice_ce_loss: needs K ≥ 2 classes, got {num_classes}.")
  probs = jax.nn.softmax(logits, axis=-1)
  target = _one_hot(labels, num_classes, probs.dtype)
  intersection = _sum_space(probs * target)
  denominator = _sum_space(probs) + _sum_space(target)
  dice = 1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)
  return jnp.mean(dice) + cross_entropy(logits, labels)


def group_probabilities(query_logits: jax.Array, groups: Sequence[int]) -> jax.Array:
  """Grouped query distribution D: softmax over the N queries, summed over contiguous query groups.

  R = softmax(query_logits) over the last axis; D_g = Σ_{n ∈ G_g} R_n, where group g holds the queries
  [Σ_{h<g} |G_h|, Σ_{h≤g} |G_h|). `groups=(16, 16)` with N = 32 gives background / foreground groups;
  `(16, 4, 108)` with N = 128 the released three groups.

  Args:
    query_logits: (B, *spatial, N) per-voxel mask logits of the N queries.
    groups: static group sizes, positive, summing to N.

  Returns:
    (B, *spatial, G) group probabilities (summing to 1 over G), in the dtype of the softmax.
  """
  groups = tuple(int(g) for g in groups)
  num_queries = query_logits.shape[-1]
  if not groups or min(groups) < 1 or sum(groups) != num_queries:
    raise ValueError(f"group_probabilities: the group sizes {groups} must be positive and sum to the "
                     f"{num_queries} queries.")
  responses = jax.nn.softmax(query_logits, axis=-1)
  out, start = [], 0
  for size in groups:
    out.append(jnp.sum(responses[..., start:start + size], axis=-1))
    start += size
  return jnp.stack(out, axis=-1)


def query_distribution_loss(group_probs: jax.Array, labels: jax.Array,
                            eps: float = QUERY_DISTRIBUTION_EPS) -> jax.Array:
  """Query-distribution loss L_qd of dkux-v1: the NLL of the label's group, voxel mean.

    L = −(1 / (B·V)) Σ_b Σ_v Σ_g y_bvg log clip(D_bvg, eps, 1),   y = one-hot(labels) over the G groups

  (labels index the groups). The clip bounds the loss and its gradient where a group's probability
  vanishes; it passes no gradient where D < eps. Labels outside [0, G) contribute 0 but still count in V.

  Args:
    group_probs: (B, *spatial, G) grouped query probabilities (`group_probabilities`).
    labels: (B, *spatial) integer labels.
    eps: lower clip of D.

  Returns:
    Scalar loss.
  """
  _check_scores_and_labels(group_probs, labels, "query_distribution_loss")
  target = _one_hot(labels, group_probs.shape[-1], group_probs.dtype)
  log_d = jnp.log(jnp.clip(group_probs, eps, 1.0))
  return -jnp.sum(target * log_d) / (labels.size)


def released_query_distribution_loss(group_probs: jax.Array, labels: jax.Array) -> jax.Array:
  """The released code's query-distribution loss: voxel **sum**, sample mean, no ε.

    L = −(1/B) Σ_b Σ_v Σ_g y_bvg log D_bvg,   y = one-hot(min(labels, G − 1))

  Labels above G − 1 are clamped to the last group, as the released code does. The product y·log D is
  taken literally, so the loss is +inf when the label's group has D = 0 and NaN when any group has D = 0
  (0·log 0): released behaviour, kept on purpose; `query_distribution_loss` is the bounded variant. Its
  scale grows with the number of voxels.

  Args:
    group_probs: (B, *spatial, G).
    labels: (B, *spatial) integer labels ≥ 0.

  Returns:
    Scalar loss.
  """
  _check_scores_and_labels(group_probs, labels, "released_query_distribution_loss")
  num_groups = group_probs.shape[-1]
  target = _one_hot(jnp.minimum(labels, num_groups - 1), num_groups, group_probs.dtype)
  per_sample = jnp.sum(target * jnp.log(group_probs), axis=tuple(range(1, group_probs.ndim)))
  return -jnp.mean(per_sample)


def stratified_anchors(key: jax.Array, classes: jax.Array, num_anchors: int) -> tuple[jax.Array, jax.Array]:
  """Per sample, M anchor voxels stratified by a binary class map.

  Rule, for every sample separately (c = 1 where `classes` > 0, else 0; n_c voxels of class c):

  * quotas: with both classes present, class 1 gets q_1 = ⌊M/2⌋ anchors and class 0 q_0 = M − q_1; with one
    class absent, the present class gets all M.
  * the voxels of each class are put in a uniformly random order (Gumbel-top-k: Gumbel noise on
    log-weights 0 / −∞, `lax.top_k`); the class's slot r (r = 0 … q_c − 1) takes the r-th voxel of that
    order while r < n_c — so a class with n_c ≥ q_c is drawn uniformly **without** replacement;
  * a short class (n_c < q_c) fills its remaining q_c − n_c slots with voxels drawn uniformly **with**
    replacement from its n_c voxels (every voxel appears at least once).

  Slots are ordered class 0 first, then class 1. Shapes are static; the function is jittable.

  Args:
    key: PRNG key.
    classes: (B, V) integer class map over flattened space (0 / 1; anything > 0 counts as 1).
    num_anchors: M ≥ 1 (static).

  Returns:
    (anchors, anchor_classes): (B, M) int32 flattened voxel indices and (B, M) int32 their classes (0 / 1).
  """
  if classes.ndim != 2:
    raise ValueError(f"stratified_anchors: expected a (B, V) class map, got shape {classes.shape}.")
  num_anchors = int(num_anchors)
  if num_anchors < 1:
    raise ValueError(f"stratified_anchors: num_anchors must be ≥ 1, got {num_anchors}.")
  batch, num_voxels = classes.shape
  k = min(num_anchors, num_voxels)
  binary = (classes > 0).astype(jnp.int32)

  def one_sample(sample_key, cls):
    gumbel_key, fill_key = jax.random.split(sample_key)
    gumbel = jax.random.gumbel(gumbel_key, (num_voxels,), jnp.float32)
    counts, orders = [], []
    for c in (0, 1):
      in_class = cls == c
      counts.append(jnp.sum(in_class.astype(jnp.int32)))
      orders.append(jax.lax.top_k(jnp.where(in_class, gumbel, -jnp.inf), k)[1])
    n0, n1 = counts
    q1 = jnp.where(n0 == 0, num_anchors, jnp.where(n1 == 0, 0, num_anchors // 2))
    q0 = num_anchors - q1
    slot = jnp.arange(num_anchors)
    slot_class = (slot >= q0).astype(jnp.int32)
    rank = slot - q0 * slot_class
    n_slot = jnp.where(slot_class == 1, n1, n0)
    fill = jax.random.randint(fill_key, (num_anchors,), 0, jnp.maximum(n_slot, 1))
    pos = jnp.minimum(jnp.where(rank < n_slot, rank, fill), k - 1)
    index = jnp.where(slot_class == 1, orders[1][pos], orders[0][pos]).astype(jnp.int32)
    return index, cls[index]

  return jax.vmap(one_sample)(jax.random.split(key, batch), binary)


def _normalise(x: jax.Array) -> jax.Array:
  """x / max(‖x‖, 1e-12) over the last axis (finite gradient at 0)."""
  norm_sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(norm_sq, COSINE_NORM_EPS**2))


def _flat_features(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1, x.shape[-1])


def contrastive_loss_at(features: jax.Array, peer_features: jax.Array, anchors: jax.Array,
                        anchor_classes: jax.Array, *, temperature: float = 0.1,
                        negatives: str = "other_class", include_positive_in_denominator: bool = False,
                        similarity: str = "cosine") -> jax.Array:
  """Cross-network voxel contrastive loss at given anchors (the core of `voxel_contrastive_loss`).

  Per sample, over its M anchors i, j (anchor slots, so a voxel drawn twice counts twice):

    e_i = features[anchor i], f_j = stop_gradient(peer_features[anchor j]), both L2-normalised
    (`similarity="cosine"`) or raw (`"dot"`); s_ij = e_i·f_j / τ.
    Neg(i) = {j ≠ i : c_j ≠ c_i} (`negatives="other_class"`) or {j ≠ i} (`"all"`).
    Den(i) = Neg(i), plus i itself with `include_positive_in_denominator`.
    loss_i = −s_ii + log Σ_{j ∈ Den(i)} exp(s_ij)   (log-sum-exp).

  Anchor i is valid when Neg(i) is non-empty; the result is the mean of loss_i over the valid anchors of
  all samples pooled (Σ_b Σ_i valid·loss / Σ_b Σ_i valid), 0 when no anchor is valid. A sample whose
  anchors are all of one class (with "other_class") thus has weight 0. Without the positive in the
  denominator the loss is not bounded below by 0 (it is negative once the positive pair outscores the sum
  of the negatives). Computed in float32 at least
  (float64 inputs stay float64). The peer receives no gradient.

  Args:
    features: (B, *spatial, F) embeddings of the network being trained (e.g. probabilities).
    peer_features: (B, *spatial, F) the peer network's embeddings.
    anchors: (B, M) integer flattened voxel indices.
    anchor_classes: (B, M) integer classes of the anchors.
    temperature: τ > 0.
    negatives: "other_class" or "all".
    include_positive_in_denominator: add the positive pair to the denominator (InfoNCE form).
    similarity: "cosine" or "dot".

  Returns:
    Scalar loss.
  """
  _check_same_shape(features, peer_features, "contrastive_loss_at")
  if negatives not in CONTRASTIVE_NEGATIVES:
    raise ValueError(f"Unknown negatives {negatives!r}; expected one of {CONTRASTIVE_NEGATIVES}.")
  if similarity not in CONTRASTIVE_SIMILARITIES:
    raise ValueError(f"Unknown similarity {similarity!r}; expected one of {CONTRASTIVE_SIMILARITIES}.")
  if anchors.ndim != 2 or anchors.shape != anchor_classes.shape or anchors.shape[0] != features.shape[0]:
    raise ValueError(f"contrastive_loss_at: anchors and anchor_classes must both be (B, M) with "
                     f"B = {features.shape[0]}, got {anchors.shape} and {anchor_classes.shape}.")
  dtype = jnp.promote_types(features.dtype, jnp.float32)
  anchors = anchors.astype(jnp.int32)
  e = jnp.take_along_axis(_flat_features(features).astype(dtype), anchors[..., None], axis=1)
  f = jnp.take_along_axis(_flat_features(jax.lax.stop_gradient(peer_features)).astype(dtype),
                          anchors[..., None], axis=1)
  if similarity == "cosine":
    e, f = _normalise(e), _normalise(f)
  logits = jnp.einsum("bif,bjf->bij", e, f) / temperature
  num_anchors = anchors.shape[1]
  off_diagonal = ~jnp.eye(num_anchors, dtype=bool)
  negative = jnp.broadcast_to(off_diagonal, logits.shape)
  if negatives == "other_class":
    negative = negative & (anchor_classes[:, :, None] != anchor_classes[:, None, :])
  valid = jnp.any(negative, axis=-1)
  in_denominator = negative | ~off_diagonal if include_positive_in_denominator else negative
  row_max = jax.lax.stop_gradient(jnp.max(jnp.where(in_denominator, logits, -jnp.inf), axis=-1,
                                          keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  shifted = jnp.where(in_denominator, logits - row_max, -jnp.inf)
  total = jnp.sum(jnp.exp(shifted), axis=-1)
  log_denominator = row_max[..., 0] + jnp.log(jnp.where(valid, total, 1.0))
  positive = jnp.diagonal(logits, axis1=-2, axis2=-1)
  per_anchor = jnp.where(valid, log_denominator - positive, 0.0)
  count = jnp.sum(valid.astype(dtype))
  return jnp.sum(per_anchor) / jnp.maximum(count, 1.0)


def voxel_contrastive_loss(key: jax.Array, features: jax.Array, peer_features: jax.Array,
                           classes: jax.Array, *, num_anchors: int = 512, temperature: float = 0.1,
                           negatives: str = "other_class", include_positive_in_denominator: bool = False,
                           similarity: str = "cosine") -> jax.Array:
  """dkux-v1 cross-network contrastive loss (L_segc on probabilities, L_qdc on grouped distributions).

  Draws `num_anchors` anchors per sample with `stratified_anchors(key, classes)` and returns
  `contrastive_loss_at` there: the same voxel in the peer is the positive, voxels of the other class
  (or all other anchors) the negatives, peer keys under stop-gradient.

  Args:
    key: PRNG key for the anchors.
    features: (B, *spatial, F) the trained network's embeddings.
    peer_features: (B, *spatial, F) the peer's embeddings (no gradient flows into them).
    classes: (B, *spatial) integer classes in {0, 1} (ground truth, or the peer's argmax).
    num_anchors, temperature, negatives, include_positive_in_denominator, similarity: see
      `stratified_anchors` and `contrastive_loss_at`.

  Returns:
    Scalar loss.
  """
  _check_scores_and_labels(features, classes, "voxel_contrastive_loss")
  anchors, anchor_classes = stratified_anchors(key, classes.reshape(classes.shape[0], -1), num_anchors)
  return contrastive_loss_at(features, peer_features, anchors, anchor_classes, temperature=temperature,
                             negatives=negatives,
                             include_positive_in_denominator=include_positive_in_denominator,
                             similarity=similarity)


__all__ += ["CONTRASTIVE_NEGATIVES", "CONTRASTIVE_SIMILARITIES", "contrastive_loss_at", "group_probabilities",
            "monai_dice_ce_loss", "query_distribution_loss", "released_query_distribution_loss",
            "stratified_anchors", "voxel_contrastive_loss"]
