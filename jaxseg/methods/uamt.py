"""UA-MT: Mean Teacher with an uncertainty-masked consistency (docs/methods/uamt.md).

Reference: `yulequan/UA-MT code/train_LA_meanteacher_certainty_unlabel.py`. Per step t:

1. Teacher target t_𝓤 = one train-mode teacher pass on x_𝓤 + ξ (ξ = clip(N(0, 0.1²), ±0.2)).
2. Uncertainty from T = 8 stochastic teacher passes: x_𝓤 is repeated twice (2·B_u samples per
   pass) and run in T/2 = 4 rounds, each with fresh noise and dropout. Round r's output rows are
   [u_0 … u_{B_u−1}, u_0 … u_{B_u−1}], so stacking the rounds gives the reference's
   (T·B_u, …) tensor with row t·B_u + b for sample b, reshaped to (T, B_u, …) (`mc_teacher_logits`).
   μ = mean over T of the softmax maps; u = −Σ_c μ_c ln(μ_c + 1e-6).
3. Threshold H(t) = (0.75 + 0.25·sigmoid_rampup(t, threshold_rampup))·ln C (per step, no blocks);
   mask m = 1[u < H].
4. L_c = Σ m·softmax_mse(s_𝓤, t_𝓤) / (C·Σm + 1e-16): the mean over masked voxels and channels.
5. L = 0.5·(CE + dice_sq)(𝓛) + w(t)·L_c, w as Mean Teacher (0.1, 40 blocks of 150); EMA 0.99.

Presets (`method.preset`): "paper" (the default) is the code generalised to C classes
(ln C and C); "released" keeps the code's hard-coded ln 2 and factor 2 whatever C is (as SSL4MIS
does for C = 4). The two are the same for C = 2.

Batch statistics: the 4 rounds run as ONE `jax.vmap`-ed call, so each round normalises with its own
2·B_u samples, exactly like the reference's 4 separate passes (the target pass normalises its B_u
samples). The teacher's BN running statistics follow the reference's order — target pass, then the
four rounds in turn; the BN update s ← μs + (1 − μ)·m is affine, so the vmapped rounds' updates are
chained exactly (`chain_running_stats`). They are never read (the student is evaluated).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxseg import losses, schedules
from jaxseg.data.batches import Batch
from jaxseg.data.base import DataError
from jaxseg.methods import base, mean_teacher
from jaxseg.methods.ema import Teacher, teacher_forward
from jaxseg.methods.mean_teacher import (State, finish_step, hyperparameters, init_state,
                                         student_update, teacher_noise)
from jaxseg.models.layers import BN_MOMENTUM

PRESETS = ("paper", "released")
# T = MC_ROUNDS · MC_REPEATS = 8 teacher passes per step (the reference's `T = 8`, x_𝓤 repeated 2×).
MC_ROUNDS = 4
MC_REPEATS = 2
# H(t) ramps from THRESHOLD_START·ln C to ln C (the entropy's maximum).
THRESHOLD_START = 0.75
ENTROPY_EPS = 1e-6  # log(μ + 1e-6)
MASK_EPS = 1e-16  # Σ m·mse / (C·Σm + 1e-16)
# The classes the released code hard-codes in ln 2 and 2·Σm.
RELEASED_CLASSES = 2


def default_config() -> ml_collections.ConfigDict:
  """The `method` block: Mean Teacher's plus the preset and the threshold ramp."""
  c = mean_teacher.default_config()
  c.name = "uamt"
  c.preset = "paper"  # "paper" (ln C, C) | "released" (ln 2, 2 whatever C is).
  c.threshold_rampup = 6000  # Steps of the threshold's ramp (the reference's max_iterations).
  return c


REQUIREMENTS = mean_teacher.REQUIREMENTS


def check_config(config: ml_collections.ConfigDict) -> None:
  """The method block and the data it needs; raises a DataError naming the key."""
  mean_teacher.check_config(config)
  mask_classes(config.method.preset, config.data.num_classes)
  base.check_positive(config.method, "threshold_rampup")


def init(rng: jax.Array, config: ml_collections.ConfigDict, example_batch: Batch) -> State:
  """Student and teacher V-Nets.

  Raises:
    DataError: an unknown `method.preset`, or a config `mean_teacher.hyperparameters` rejects.
  """
  check_config(config)
  cfg = config.method
  hparams = hyperparameters(config, example_batch, preset=cfg.preset,
                            threshold_rampup=float(cfg.threshold_rampup),
                            mask_classes=mask_classes(cfg.preset, config.data.num_classes))
  return init_state(rng, config, example_batch, hparams)


def mask_classes(preset: str, num_classes: int) -> int:
  """The C of ln C in H(t) and of C·Σm in L_c: `num_classes` ("paper"), 2 ("released").

  Raises:
    DataError: an unknown preset.
  """
  if preset not in PRESETS:
    raise DataError(f"config method.preset = {preset!r} is not one of {list(PRESETS)}")
  return RELEASED_CLASSES if preset == "released" else int(num_classes)


# ------------------------------------------------------------------------------------------------
# Uncertainty, threshold, masked consistency (pure functions of logits).


def uncertainty_threshold(step: Any, rampup: Any, classes: int) -> Any:
  """H(t) = (0.75 + 0.25·sigmoid_rampup(t, rampup))·ln(classes).

  Host inputs give NumPy float64 (as the reference), traced inputs a JAX array.
  """
  return (THRESHOLD_START + (1.0 - THRESHOLD_START) * schedules.sigmoid_rampup(step, rampup)
          ) * math.log(classes)


def mean_probabilities(mc_logits: jax.Array) -> jax.Array:
  """μ = mean over the T passes of softmax: (T, B, *spatial, C) -> (B, *spatial, C)."""
  return jnp.mean(jax.nn.softmax(mc_logits, axis=-1), axis=0)


def predictive_entropy(probs: jax.Array) -> jax.Array:
  """u = −Σ_c μ_c ln(μ_c + 1e-6): (B, *spatial, C) -> (B, *spatial, 1)."""
  return -jnp.sum(probs * jnp.log(probs + ENTROPY_EPS), axis=-1, keepdims=True)


def uncertainty_mask(mc_logits: jax.Array, threshold: jax.Array):
  """m = 1[u < H] from the T passes' logits (T, B, *spatial, C).

  Returns:
    (mask (B, *spatial, 1) float 0/1, uncertainty u (B, *spatial, 1)).
  """
  uncertainty = predictive_entropy(mean_probabilities(mc_logits))
  return (uncertainty < threshold).astype(uncertainty.dtype), uncertainty


def masked_consistency(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
                       classes: int) -> jax.Array:
  """L_c = Σ m·(softmax s − softmax sg t)² / (classes·Σm + 1e-16).

  Args:
    student_logits: (B, *spatial, C).
    teacher_logits: (B, *spatial, C), a constant target.
    mask: (B, *spatial, 1), broadcast over the classes.
    classes: C for the mean over masked voxels and channels (the released code: 2).
  """
  squared = losses.softmax_mse_loss(student_logits, jax.lax.stop_gradient(teacher_logits))
  return jnp.sum(mask * squared) / (classes * jnp.sum(mask) + MASK_EPS)


# ------------------------------------------------------------------------------------------------
# The T stochastic teacher passes.


def chain_running_stats(initial: Any, per_round: Any, momentum: float = BN_MOMENTUM) -> Any:
  """The BN running statistics after the rounds in turn, from their vmapped updates of `initial`.

  Each round r, started from `initial`, returns r_r = μ·initial + (1 − μ)·m_r; run in turn they
  give s ← μ·s + (1 − μ)·m_r = μ·s + (r_r − μ·initial).

  Args:
    initial: the statistics all rounds started from.
    per_round: the same tree with a leading round axis.
    momentum: μ, Flax's BatchNorm momentum of the model.
  """
  def chain(start, rounds):
    state = start
    for r in range(rounds.shape[0]):
      state = momentum * state + (rounds[r] - momentum * start)
    return state

  return jax.tree.map(chain, initial, per_round)


def mc_teacher_logits(student: base.TrainState, teacher: Teacher, images_u: jax.Array,
                      rng: jax.Array, batch_stats: Any = None):
  """The T = 8 noisy train-mode teacher passes of the unlabeled images, as the reference runs them.

  x_𝓤 (B_u, ...) is repeated to [x_𝓤; x_𝓤] (2·B_u samples) and run in 4 rounds, batched by
  `jax.vmap` so that each round has its own BatchNorm batch statistics, each round with its own
  noise and dropout keys (all 2·B_u samples get distinct noise and dropout masks).

  Args:
    student: supplies the architecture.
    teacher: the teacher's parameters (and default BN statistics).
    images_u: (B_u, *spatial, C_in).
    rng: key of the rounds.
    batch_stats: the BN statistics the rounds start from (default: the teacher's).

  Returns:
    (logits (T, B_u, *spatial, K) with pass t of sample b at [t, b] — the reference's row
    t·B_u + b — and the BN statistics after the 4 rounds in turn).
  """
  stats = teacher.batch_stats if batch_stats is None else batch_stats
  repeated = jnp.concatenate([images_u] * MC_REPEATS)

  def one_round(key):
    noise_key, dropout_key = jax.random.split(key)
    return teacher_forward(student, teacher, teacher_noise(noise_key, repeated), dropout_key,
                           batch_stats=stats)

  logits, round_stats = jax.vmap(one_round)(jax.random.split(rng, MC_ROUNDS))
  num_unlabeled = images_u.shape[0]
  logits = logits.reshape(MC_ROUNDS * MC_REPEATS, num_unlabeled, *logits.shape[2:])
  return logits, chain_running_stats(stats, round_stats)


# ------------------------------------------------------------------------------------------------
# The step.


def train_step(state: State, batch: Batch, rng: jax.Array):
  """One UA-MT step: teacher target and uncertainty mask, student SGD step, EMA update.

  Metrics: those of Mean Teacher (loss_consistency = L_c unweighted) plus uncertainty_threshold
  (H(t)) and mask_fraction (the fraction of unlabeled voxels in the mask).
  """
  hp = state.hparams
  student_key, noise_key, dropout_key, mc_key = jax.random.split(rng, 4)
  target, stats = teacher_forward(state.student, state.teacher,
                                  teacher_noise(noise_key, batch.unlabeled["image"]), dropout_key)
  mc_logits, stats = mc_teacher_logits(state.student, state.teacher, batch.unlabeled["image"], mc_key,
                                       batch_stats=stats)
  threshold = uncertainty_threshold(state.student.step, hp.threshold_rampup, hp.mask_classes)
  mask, _ = uncertainty_mask(mc_logits, threshold)
  extra = dict(uncertainty_threshold=threshold, mask_fraction=jnp.mean(mask))

  def consistency(logits_u):
    return masked_consistency(logits_u, target, mask, hp.mask_classes), extra

  student, aux = student_update(state, batch, student_key, consistency)
  return finish_step(state, student, stats, aux)


def predict(state: State, inputs: dict) -> dict:
  """The student's eval-mode class probabilities {"model": (B, *spatial, K)} (as Mean Teacher)."""
  return mean_teacher.predict(state, inputs)
