"""The exponential-moving-average (EMA) teacher, shared by Mean Teacher and UA-MT.

The teacher's parameters are an EMA of the student's, θ′ ← α_t θ′ + (1 − α_t) θ after each student
step, with α_t = min(1 − 1/(t + 1), cap) and t the step just taken (0 first): the true average of
the students so far, then a running average with the capped decay. Only parameters are averaged:
the teacher keeps its own BatchNorm running statistics, moved by its own train-mode passes. It gets
no gradient and has no optimiser. See docs/methods/mean_teacher.md.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxseg.methods import base


@flax.struct.dataclass
class Teacher:
  """The EMA teacher: the student's architecture with averaged parameters and its own BN statistics.

  Attributes:
    params: the EMA of the student's parameters.
    batch_stats: BatchNorm running statistics of the teacher's own train-mode passes ({} if none).
  """
  params: Any
  batch_stats: Any


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
  """α_t = min(1 − 1/(t + 1), max_decay): the true average of the students, then capped."""
  step = jnp.asarray(step)
  return jnp.minimum(1.0 - 1.0 / (step + 1.0), max_decay)


def ema_update(teacher_params: Any, student_params: Any, decay: jax.Array) -> Any:
  """θ′ ← α θ′ + (1 − α) θ, leaf by leaf (the references' `update_ema_variables`)."""
  return jax.tree.map(lambda t, s: (decay * t + (1.0 - decay) * s).astype(t.dtype),
                      teacher_params, student_params)


def follow(teacher: Teacher, student_params: Any, step: jax.Array, max_decay: float,
           batch_stats: Any) -> tuple[Teacher, jax.Array]:
  """The teacher after the student's update of step `step`: (new teacher, α_t used).

  Args:
    teacher: the teacher before the update.
    student_params: the student's parameters after its update.
    step: t, the student step just taken (0 for the first).
    max_decay: the cap of α_t.
    batch_stats: the teacher's BN statistics after this step's teacher passes.
  """
  decay = ema_decay(step, max_decay)
  return Teacher(params=ema_update(teacher.params, student_params, decay),
                 batch_stats=batch_stats), decay


def teacher_forward(student: base.TrainState, teacher: Teacher, x: jax.Array, rng: jax.Array,
                    batch_stats: Any = None):
  """The teacher in train mode (batch statistics, dropout on) on `x`, as the references'
  `ema_model.train()` passes.

  Args:
    student: supplies the architecture (`apply_fn`); its parameters are not used.
    teacher: the teacher's parameters and BN statistics.
    x: (B, *spatial, C_in) inputs.
    rng: the dropout key of this pass.
    batch_stats: the BN statistics to update (default: the teacher's), to thread several passes.

  Returns:
    (stop-gradient logits (B, *spatial, K), updated BN statistics).
  """
  stats = teacher.batch_stats if batch_stats is None else batch_stats
  logits, stats = base.forward_train(student, teacher.params, x, rng, batch_stats=stats)
  return jax.lax.stop_gradient(logits), stats
