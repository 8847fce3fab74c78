"""The contract between the trainer and a method, and the pieces every method shares.

A method is a module `jaxseg/methods/<name>.py` (or any importable module named by its dotted path
in `method.name`) providing:

  default_config() -> ConfigDict
      The `config.method` block: `name` and the method's hyperparameters.
  REQUIREMENTS: Requirements
      What it needs of the data: binary or any number of classes, labeled groups (views), unlabeled
      samples, modalities.
  check_config(config) -> None
      Checks `REQUIREMENTS` against the `data` block (`check_requirements`) and its own block;
      raises a `DataError` naming the key. The trainer calls it before any data are read.
  init(rng, config, example_batch) -> State
      Builds the networks and their optimisers (`jaxseg.optim.method_optimizer`). `State` is a
      `flax.struct.dataclass` holding one `TrainState` per trained network (segmenters, critic;
      `peers.Peers` for networks trained side by side; an `ema.Teacher` for EMA teachers) and
      static hyperparameters.
  train_step(state, batch, rng) -> (state, metrics)
      Pure; jitted and sharded by the trainer. `batch` is a `jaxseg.data.batches.Batch`, an open
      pytree: `batch.labeled` and `batch.unlabeled` are dicts of arrays ("image", "label" in the
      labeled stream, "modality_mask", and the cases' own fields). `metrics` is a flat dict of
      scalars (losses, weights) for logging.
  predict(state, inputs) -> dict[str, probabilities]
      Eval-mode probabilities of `inputs`, a dict of the same kind as one batch stream ("image"
      (B, *spatial, C), "modality_mask" (B, C), the cases' fields, no label), one entry per view
      (e.g. Duo-SegNet's "f1" and "f2"; a single-network method returns {"model": ...}). An entry
      is (B, *spatial, 1) foreground probabilities (thresholded) or (B, *spatial, K) class
      probabilities (argmax).

The trainer never looks inside `State` or the batch: it jits `train_step`, shards the batch with
`jax.tree.map`, replicates the state, saves and restores it with orbax. Adding a method does not
touch the trainer, the inference or the batch code. Shared parts: `gradient_step` (here),
`ema` (an EMA teacher), `adversarial` (a segmenter and a critic trained in turn), `peers` (networks
with their own optimiser states trained on one coupled objective), `jaxseg.optim` (optimisers and
schedules by name). See docs/adding_a_method.md.
"""

from __future__ import annotations

import dataclasses
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

  def updated(self, grads: Any, batch_stats: Any) -> "TrainState":
    """One optimiser update with `grads`, and the BN statistics of the step's forward passes."""
    return self.apply_gradients(grads=grads).replace(batch_stats=batch_stats)


def gradient_step(net: Any, objective: Callable[[Any], tuple[jax.Array, tuple[Any, Any]]]):
  """One gradient step of a network (a `TrainState`) or of peer networks (`peers.Peers`).

  Args:
    net: what is trained; its `params` are differentiated.
    objective: params -> (loss, (aux, batch_stats)): the loss, anything to report, and the BN
      statistics after the step's train-mode forward passes (the net's own `batch_stats` if none).

  Returns:
    (net after the update, loss, aux).
  """
  (loss, (aux, stats)), grads = jax.value_and_grad(objective, has_aux=True)(net.params)
  return net.updated(grads, stats), loss, aux


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
  """concat(x_𝓛, x_𝓤): the whole batch, labeled first, for one forward call (BN statistics over all
  samples, as the LA references; docs/la_protocol.md)."""
  return jnp.concatenate([batch.labeled["image"], batch.unlabeled["image"]])


def scalar_metrics(**values: jax.Array) -> dict[str, jax.Array]:
  """Metrics dict of float32 scalars (what train_step returns for logging)."""
  return {k: jax.numpy.asarray(v, jax.numpy.float32) for k, v in values.items()}


PredictFn = Callable[[Any, jax.Array], dict]


# ------------------------------------------------------------------------------------------------
# What a method needs of the data, checked before any data are read.

CLASSES = ("binary", "any")
MODALITIES = ("one", "any")


@dataclasses.dataclass(frozen=True)
class Requirements:
  """What a method needs of the data and the batches (its module's `REQUIREMENTS`).

  Attributes:
    classes: "binary" (one foreground: data.num_classes must be 2) or "any" (>= 2).
    labeled_groups: contiguous parts of the labeled list sampled side by side in every batch
      (Duo-SegNet's views X^1, X^2: 2); the batches are built with this many.
    unlabeled: the method needs unlabeled samples (data.batch_unlabeled >= 1).
    modalities: "any" (any number of image channels) or "one" (exactly one).
    soft_labels: the method takes soft targets: with data.soft_masks the labeled stream's "label"
      is a float32 mask in [0, 1] instead of class indices (Duo-SegNet's BCE and critic).
  """

  classes: str = "any"
  labeled_groups: int = 1
  unlabeled: bool = False
  modalities: str = "any"
  soft_labels: bool = False

  def __post_init__(self):
    if self.classes not in CLASSES or self.modalities not in MODALITIES:
      raise ValueError(f"Requirements: classes {self.classes!r} not in {CLASSES} or modalities "
                       f"{self.modalities!r} not in {MODALITIES}")


def check_requirements(config: ml_collections.ConfigDict, needs: Requirements) -> None:
  """Checks the `data` block against what the method `config.method.name` needs.

  Raises:
    DataError: naming the key, e.g. "config data.num_classes = 3: dtc needs 2 (binary ...)".
  """
  name, data = config.method.name, config.data
  if needs.classes == "binary" and data.num_classes != 2:
    raise DataError(f"config data.num_classes = {data.num_classes}: {name} segments one "
                    "foreground (binary), it needs data.num_classes = 2")
  if data.num_classes < 2:
    raise DataError(f"config data.num_classes = {data.num_classes}: {name} needs >= 2 (background "
                    "and at least one class)")
  groups = needs.labeled_groups
  if data.get("labeled_groups", 1) != groups:
    raise DataError(f"config data.labeled_groups = {data.get('labeled_groups', 1)}: {name} needs "
                    f"{groups} (its labeled cases are sampled in {groups} parts side by side)")
  check_batch_sizes(data.batch_labeled, data.batch_unlabeled, needs, name)
  if data.get("soft_masks", False) and not needs.soft_labels:
    raise DataError(f"config data.soft_masks = True: {name} trains on class labels, not soft "
                    "masks; set data.soft_masks = False")


def check_batch_sizes(batch_labeled: int, batch_unlabeled: int, needs: Requirements,
                      name: str) -> None:
  """The labeled and unlabeled samples per batch against `needs` (from the config, or from the
  example batch `init` gets)."""
  groups = needs.labeled_groups
  if batch_labeled < groups or batch_labeled % groups:
    raise DataError(f"config data.batch_labeled = {batch_labeled}: {name} samples its labeled "
                    f"cases in {groups} group(s), it needs a multiple of {groups} (>= {groups})")
  if needs.unlabeled and batch_unlabeled < 1:
    raise DataError(f"config data.batch_unlabeled = {batch_unlabeled}: {name} needs unlabeled "
                    "samples (>= 1)")


def check_example_batch(example_batch: Any, needs: Requirements, name: str) -> None:
  """`check_batch_sizes` and the modalities of the batch `init` is given (its shapes are those
  of training: the first point where the data's channels are known)."""
  check_batch_sizes(example_batch.labeled["image"].shape[0],
                    example_batch.unlabeled["image"].shape[0], needs, name)
  channels = example_batch.labeled["image"].shape[-1]
  if needs.modalities == "one" and channels != 1:
    raise DataError(f"config data: the images have {channels} channels (modalities); {name} "
                    "takes one")


def check_choice(block: ml_collections.ConfigDict, key: str, choices: tuple,
                 where: str = "method") -> None:
  """Raises a DataError naming `<where>.<key>` unless `block[key]` is one of `choices`."""
  value = block[key]
  if value not in choices:
    raise DataError(f"config {where}.{key} = {value!r} is not one of {list(choices)}")


def check_count(block: ml_collections.ConfigDict, key: str, minimum: int = 1,
                where: str = "method") -> None:
  """Raises a DataError naming `<where>.<key>` unless `block[key]` is an integer >= `minimum`."""
  value = block[key]
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value
      or value < minimum):
    raise DataError(f"config {where}.{key} = {value!r} must be an integer >= {minimum}")


def check_positive(block: ml_collections.ConfigDict, key: str, allow_zero: bool = True,
                   where: str = "method") -> None:
  """Raises a DataError naming `<where>.<key>` unless `block[key]` is a number >= 0 (> 0 when
  `allow_zero` is False)."""
  value = block[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
      value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise DataError(f"config {where}.{key} = {value!r} must be a number {bound}")


def check_crop_sizes(config: ml_collections.ConfigDict, multiple: int, why: str) -> None:
  """Raises a DataError naming `data.patch_size` (or `eval.patch_size`, when set) unless every
  size is divisible by `multiple`; `why` ends the message (e.g. "asdnet's networks halve the
  crop three times")."""
  sizes = [("data.patch_size", config.data.patch_size)]
  if "eval" in config and config.eval.get("patch_size"):
    sizes.append(("eval.patch_size", config.eval.patch_size))
  for key, size in sizes:
    if any(int(s) % multiple for s in size):
      raise DataError(f"config {key} = {tuple(size)!r}: every size must be divisible by "
                      f"{multiple} ({why})")


def check_method_config(method: Any, config: ml_collections.ConfigDict) -> None:
  """Runs the method module's own checks of `config` (`check_config`, which also checks its
  `REQUIREMENTS` against the data block), before any data are read or anything compiled; the
  trainer calls it right after the shared blocks' checks.

  Raises:
    DataError: the method's, naming the full key (e.g. "config method.rampup_block = 0 must be an
      integer >= 1"); a plain ValueError of the method becomes one naming the method; a module
      without `check_config` or `REQUIREMENTS` is not a method (docs/adding_a_method.md).
  """
  missing = [n for n in ("REQUIREMENTS", "check_config") if not hasattr(method, n)]
  if missing:
    raise DataError(f"config method.name = {config.method.name!r}: module {method.__name__} lacks "
                    f"{missing} of the method contract (docs/adding_a_method.md)")
  optim.check_method_optimizers(config)
  try:
    method.check_config(config)
  except DataError:
    raise
  except ValueError as e:
    raise DataError(f"config method {config.method.name!r}: {e}") from e
