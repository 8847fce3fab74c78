"""The contract between the trainer and a method, and the pieces every method shares.

A method is a module `jaxseg/methods/<name>.py` providing:

  default_config() -> ConfigDict
      The `config.method` block: `name` (= the module name) and the method's hyperparameters.
  init(rng, config, example_batch) -> State
      Builds the networks and their optimisers (`jaxseg.optim.method_optimizer`). `State` is a
      `flax.struct.dataclass` holding one `TrainState` per trained network (segmenters, critic; a
      teacher's parameters for EMA methods) and a static `hparams` field (a `FrozenConfigDict`,
      the method block of the config).
  train_step(state, batch, rng) -> (state, metrics)
      Pure; jitted and sharded by the trainer. `batch` is a `jaxseg.data.batches.Batch`;
      `metrics` is a flat dict of scalars (losses, weights) for logging.
  predict(state, images) -> dict[str, probabilities]
      Eval-mode probabilities of `images` (B, *spatial, C), one entry per view (e.g. Duo-SegNet's
      "f1" and "f2"; a single-network method returns {"model": ...}). An entry is (B, *spatial, 1)
      foreground probabilities (one-logit heads: thresholded at 0.5) or (B, *spatial, K) class
      probabilities (argmax).

The trainer never looks inside `State`: it jits `train_step`, shards the batch, replicates the
state, saves and restores it with orbax. Adding a method does not touch the trainer.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from jaxseg import optim
from jaxseg.data.base import DataError


class TrainState(train_state.TrainState):
  """A network's parameters, optimiser state and BatchNorm running statistics ({} if none)."""

  batch_stats: Any = None


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       example_input: jax.Array) -> TrainState:
  """Initialises `model` on `example_input` (B, *spatial, C) and wraps it with optimiser `tx`."""
  variables = model.init({"params": rng, "dropout": rng}, example_input, train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}))


def forward_train(state: TrainState, params: Any, x: jax.Array, rng: Optional[jax.Array] = None,
                  batch_stats: Any = None):
  """Train-mode forward pass: returns (outputs, updated batch_stats).

  `params` is passed separately so that it can be differentiated; `batch_stats` defaults to the
  state's and lets a method thread BN statistics through several forward calls of one step.
  """
  stats = state.batch_stats if batch_stats is None else batch_stats
  variables = {"params": params}
  if stats:
    variables["batch_stats"] = stats
  rngs = {"dropout": rng} if rng is not None else {}
  if not stats:
    return state.apply_fn(variables, x, train=True, rngs=rngs), stats
  out, updates = state.apply_fn(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
  return out, updates["batch_stats"]


def forward_eval(state: TrainState, x: jax.Array, params: Any = None):
  """Eval-mode forward pass (BN running averages, no dropout)."""
  variables = {"params": state.params if params is None else params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return state.apply_fn(variables, x, train=False)


# A model block's `dtype`: the compute dtype. Parameters, optimizer states, BatchNorm statistics and
# the models' outputs (hence losses) stay float32; "bfloat16" runs convolutions and activations in
# bf16 (mixed precision).
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def model_kwargs(cfg: ml_collections.ConfigDict) -> dict:
  """The model block minus its name, as keyword arguments of `jaxseg.models.get_model`.

  Raises:
    DataError: naming the key, if `dtype` is not one of COMPUTE_DTYPES (one error line from main).
  """
  kwargs = cfg.to_dict()
  name = kwargs.pop("name")
  if "dtype" in kwargs:
    if kwargs["dtype"] not in COMPUTE_DTYPES:
      raise DataError(f"config method.*.dtype of model {name!r} is {kwargs['dtype']!r}, expected "
                       f"one of {sorted(COMPUTE_DTYPES)}")
    kwargs["dtype"] = COMPUTE_DTYPES[kwargs["dtype"]]
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def all_images(batch) -> jax.Array:
  """concat(x_𝓛, x_𝓤): the whole batch, labeled first, for one forward call (METHODS §1.3)."""
  return jnp.concatenate([batch.image_l, batch.image_u])


def scalar_metrics(**values: jax.Array) -> dict[str, jax.Array]:
  """Metrics dict of float32 scalars (what train_step returns for logging)."""
  return {k: jax.numpy.asarray(v, jax.numpy.float32) for k, v in values.items()}


PredictFn = Callable[[Any, jax.Array], dict]


def check_method_config(method: Any, config: ml_collections.ConfigDict) -> None:
  """Runs the checks the method module `method` declares for `config`, before any data is read or
  anything compiled (the trainer calls it right after the shared blocks' checks).

  A method declares what it needs: `REQUIREMENTS` (what it reads from the config and the data) and
  `check_config(config)`, which raises `DataError` naming the full key (e.g. "config
  method.rampup_block = 0 must be an integer >= 1"). A method without `check_config` is not checked
  here; its bad settings surface from `init`, which the trainer also turns into one error line.
  Every method's optimiser blocks (method.*optimizer) are checked by `jaxseg.optim` first.
  """
  optim.check_method_optimizers(config)
  check = getattr(method, "check_config", None)
  if check is None:
    return
  try:
    check(config)
  except DataError:
    raise
  except ValueError as e:
    raise DataError(f"config method {config.method.name!r}: {e}") from e
