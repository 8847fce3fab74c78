"""Mean Teacher on the LA V-Net (docs/methods/mean_teacher.md; batches and optimiser: docs/la_protocol.md).

A student V-Net (num_classes logits, softmax outside) is trained by SGD on

    L = 0.5·(CE + dice_sq(p₁, y))(𝓛) + w(t)·mean_{𝓤, voxels, channels} softmax_mse(s_𝓤, sg t_𝓤),
    w(t) = consistency · sigmoid_rampup(⌊t / rampup_block⌋, consistency_rampup)   (0.1, 40, 150),

where s = the student's logits of the whole batch concat(x_𝓛, x_𝓤) in ONE train-mode call (BN
statistics span all samples) and t_𝓤 = the teacher's logits of x_𝓤 + ξ,
ξ = clip(N(0, 0.1²), ±0.2). There is no released LA Mean Teacher script: this is the UA-MT recipe
(`yulequan/UA-MT code/train_LA_meanteacher_certainty_unlabel.py`) without the uncertainty mask.

The teacher (`jaxseg/methods/ema.py`; docs/methods/mean_teacher.md):
- its parameters are an EMA of the student's, θ′ ← α_t θ′ + (1 − α_t) θ after each student step,
  α_t = min(1 − 1/(t + 1), ema_decay) with t the step just taken (0 first), so after the first step
  the teacher is a copy of the student. It is initialised independently of the student, as the
  reference's `create_model(ema=True)` is (only its step-0 targets depend on that);
- only parameters are averaged: it keeps its own BatchNorm running statistics, updated by its own
  train-mode forward passes (batch statistics and dropout on, as the reference's
  `ema_model.train()`) and never read — the student is the model that is evaluated;
- it gets no gradient (its outputs are stop-gradient targets; it has no optimiser).

`uamt.py` reuses the state, the EMA helpers and the student update of this module.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from jaxseg import losses, models, optim, schedules
from jaxseg.data.base import DataError
from jaxseg.data.batches import Batch
from jaxseg.methods import base, supervised
from jaxseg.methods.ema import Teacher, follow, teacher_forward

# Teacher input noise ξ = clip(N(0, NOISE_STD²), ±NOISE_CLIP): the reference's
# `torch.clamp(torch.randn_like(x) * 0.1, -0.2, 0.2)`.
NOISE_STD = 0.1
NOISE_CLIP = 0.2

# The LA family's supervised loss, 0.5·(CE + Dice) (`supervised.supervised_loss`).
SUPERVISED_LOSS = "ce_dice"

# A consistency term of the unlabeled student logits (B_u, *S, C): returns (L_c, extra metrics).
ConsistencyFn = Callable[[jax.Array], tuple[jax.Array, dict]]


def default_config() -> ml_collections.ConfigDict:
  """The `method` block: UA-MT's LA recipe without the mask (width 16; SGD 0.01, momentum 0.9, coupled
  weight decay 1e-4, ×0.1 every 2500 steps: docs/la_protocol.md)."""
  c = ml_collections.ConfigDict()
  c.name = "mean_teacher"
  c.ema_decay = 0.99  # The cap of α_t.
  c.consistency = 0.1  # w_max.
  c.consistency_rampup = 40.0  # Ramp length in blocks.
  c.rampup_block = 150  # Steps per block (`iter_num // 150`).
  c.model = ml_collections.ConfigDict(dict(name="vnet", n_filters=16, dtype="float32"))
  c.optimizer = optim.optimizer_config("sgd", 0.01, momentum=0.9, weight_decay=1e-4,
                                       decay_every=2500, decay_factor=0.1)
  return c


@flax.struct.dataclass
class State:
  """A Mean Teacher (or UA-MT) training state.

  Attributes:
    student: the trained V-Net, its SGD state and BN statistics; `apply_fn` also runs the teacher.
    teacher: the EMA teacher (no optimiser).
    hparams: the method's hyperparameters and `num_classes` (static).
  """
  student: base.TrainState
  teacher: Teacher
  hparams: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)


# ------------------------------------------------------------------------------------------------
# The teacher's input.


def teacher_noise(rng: jax.Array, x: jax.Array) -> jax.Array:
  """x + clip(N(0, 0.1²), −0.2, 0.2), drawn independently per element."""
  noise = NOISE_STD * jax.random.normal(rng, x.shape, x.dtype)
  return x + jnp.clip(noise, -NOISE_CLIP, NOISE_CLIP)


# ------------------------------------------------------------------------------------------------
# Losses.


def consistency_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Mean over samples, voxels and channels of (softmax s − softmax sg t)²."""
  return jnp.mean(losses.softmax_mse_loss(student_logits, jax.lax.stop_gradient(teacher_logits)))


def total_loss(labeled_logits: jax.Array, labels: jax.Array, loss_consistency: jax.Array,
               weight: jax.Array, num_classes: int):
  """L = 0.5·(CE + Dice)(labeled) + w·L_c.

  Args:
    labeled_logits: (B_l, *spatial, K) student logits of the labeled samples.
    labels: (B_l, *spatial) class maps.
    loss_consistency: the (unweighted) consistency term L_c.
    weight: w(t).
    num_classes: K (Dice of class 1 for K = 2, the class-averaged Dice otherwise).

  Returns:
    (L, {"loss", "loss_seg", "loss_consistency", "consistency_weight"}).
  """
  loss_seg = supervised.supervised_loss(labeled_logits, labels, SUPERVISED_LOSS, num_classes)
  loss = loss_seg + weight * loss_consistency
  return loss, dict(loss=loss, loss_seg=loss_seg, loss_consistency=loss_consistency,
                    consistency_weight=weight)


def consistency_weight(step: jax.Array, hp: ml_collections.FrozenConfigDict) -> jax.Array:
  """w(t) = consistency · sigmoid_rampup(⌊t / rampup_block⌋, consistency_rampup)."""
  return schedules.consistency_weight(step, hp.consistency, hp.consistency_rampup, hp.rampup_block)


# ------------------------------------------------------------------------------------------------
# Initialisation and the step, shared with UA-MT.


# Any number of classes (a softmax head); the consistency term needs unlabeled samples.
REQUIREMENTS = base.Requirements(classes="any", unlabeled=True)


def check_method_block(cfg: ml_collections.ConfigDict) -> None:
  """The keys Mean Teacher and UA-MT share; raises a DataError naming the key."""
  ema = cfg.ema_decay
  if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
    raise DataError(f"config method.ema_decay = {ema!r} must be a number in [0, 1)")
  base.check_positive(cfg, "consistency")
  base.check_positive(cfg, "consistency_rampup")
  base.check_count(cfg, "rampup_block")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The method block and the data it needs; raises a DataError naming the key."""
  base.check_requirements(config, REQUIREMENTS)
  check_method_block(config.method)


def hyperparameters(config: ml_collections.ConfigDict, example_batch: Batch, **extra) -> dict:
  """The static hyperparameters of the state, after checking the config against the batch.

  Raises:
    DataError: data.num_classes < 2, no labeled or no unlabeled samples per batch, a bad key of
      the method block.
  """
  cfg = config.method
  base.check_requirements(config, REQUIREMENTS)
  base.check_example_batch(example_batch, REQUIREMENTS, cfg.name)
  check_method_block(cfg)
  return dict(num_classes=int(config.data.num_classes), ema_decay=float(cfg.ema_decay),
              consistency=float(cfg.consistency),
              consistency_rampup=float(cfg.consistency_rampup),
              rampup_block=int(cfg.rampup_block), **extra)


def init_state(rng: jax.Array, config: ml_collections.ConfigDict, example_batch: Batch,
               hparams: dict) -> State:
  """Student and teacher V-Nets, independently initialised (as in the reference)."""
  cfg = config.method
  model = models.get_model(cfg.model.name, num_classes=config.data.num_classes,
                           **base.model_kwargs(cfg.model))
  x = jnp.asarray(example_batch.labeled["image"][:1])
  # Both networks in one vmapped init: one traced initialisation (half the compile time).
  both = jax.vmap(lambda key: model.init({"params": key, "dropout": key}, x, train=False))(
      jax.random.split(rng))
  student_vars, teacher_vars = (jax.tree.map(lambda a, i=i: a[i], both) for i in range(2))
  student = base.TrainState.create(apply_fn=model.apply, params=student_vars["params"],
                                   tx=optim.method_optimizer(config),
                                   batch_stats=student_vars.get("batch_stats", {}))
  teacher = Teacher(params=teacher_vars["params"],
                    batch_stats=teacher_vars.get("batch_stats", {}))
  return State(student=student, teacher=teacher,
               hparams=ml_collections.FrozenConfigDict(hparams))


def init(rng: jax.Array, config: ml_collections.ConfigDict, example_batch: Batch) -> State:
  """Student and teacher V-Nets (see `hyperparameters` for the config errors raised)."""
  check_config(config)
  return init_state(rng, config, example_batch, hyperparameters(config, example_batch))


def student_update(state: State, batch: Batch, rng: jax.Array, consistency_fn: ConsistencyFn):
  """One SGD step of the student on 0.5·(CE + Dice)(𝓛) + w(t)·consistency_fn(s_𝓤).

  The student runs once, in train mode, on concat(x_𝓛, x_𝓤) with dropout key `rng`.

  Returns:
    (the updated student TrainState, metrics of `total_loss` plus consistency_fn's extras).
  """
  hp = state.hparams
  num_labeled = batch.labeled["image"].shape[0]
  weight = consistency_weight(state.student.step, hp)
  images = base.all_images(batch)

  def objective(params):
    logits, stats = base.forward_train(state.student, params, images, rng)
    loss_c, extra = consistency_fn(logits[num_labeled:])
    loss, aux = total_loss(logits[:num_labeled], batch.labeled["label"], loss_c, weight, hp.num_classes)
    return loss, (dict(aux, **extra), stats)

  student, _, aux = base.gradient_step(state.student, objective)
  return student, aux


def finish_step(state: State, student: base.TrainState, teacher_stats: Any, aux: dict):
  """The EMA update after the student's step: (new state, metrics)."""
  teacher, decay = follow(state.teacher, student.params, state.student.step,
                         state.hparams.ema_decay, teacher_stats)
  metrics = base.scalar_metrics(**aux, learning_rate=optim.learning_rate(student), ema_decay=decay)
  return state.replace(student=student, teacher=teacher), metrics


def train_step(state: State, batch: Batch, rng: jax.Array):
  """One Mean Teacher step: teacher target, student SGD step, EMA update.

  Metrics: loss, loss_seg (the supervised part), loss_consistency (unweighted L_c),
  consistency_weight (w(t)), learning_rate, ema_decay (α_t of this step's EMA update).
  """
  student_key, noise_key, dropout_key = jax.random.split(rng, 3)
  target, teacher_stats = teacher_forward(state.student, state.teacher,
                                          teacher_noise(noise_key, batch.unlabeled["image"]), dropout_key)
  student, aux = student_update(state, batch, student_key,
                                lambda logits_u: (consistency_loss(logits_u, target), {}))
  return finish_step(state, student, teacher_stats, aux)


def predict(state: State, inputs: dict) -> dict:
  """The student's eval-mode class probabilities of `inputs["image"]`: {"model": (B, *spatial, K)}."""
  return {"model": jax.nn.softmax(base.forward_eval(state.student, inputs["image"]), axis=-1)}
