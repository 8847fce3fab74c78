"""The one training loop: data, mesh, jitted step, checkpoints, logging, evaluation.

  train_and_evaluate(config, workdir)   # train (resuming from workdir), then evaluate
  evaluate_workdir(config, workdir)     # --mode eval: the latest checkpoint on the validation split
                                        # (or on the list file eval.case_list, e.g. LA test.list)
  predict_workdir(config, workdir, input, output)   # --mode predict

The method is the module `jaxseg.methods.<config.method.name>` (see `jaxseg/methods/base.py`); the
trainer never looks inside its state. Every step t uses the key fold_in(train_key, t) and the
data batch t of the deterministic iterator, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import sys
import time
from types import ModuleType
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from jaxseg import checkpoint, config_blocks, curves, eval_batchnorm, evaluate, optim, parallel
from jaxseg import compiler_options, prng_lowering
from jaxseg.data import device_crops, intensity, intensity_augment, sources
from jaxseg.data.base import DataError
from jaxseg.data.batches import Batch, BatchSpec, zero_batch
from jaxseg.methods import base


def load_method(config: ml_collections.ConfigDict) -> ModuleType:
  """The method module: `jaxseg.methods.<method.name>`, or, for a name with a dot, the module of
  that import path (a method kept outside the package, e.g. "myproject.methods.mine")."""
  name = config.method.name
  module = name if "." in name else f"jaxseg.methods.{name}"
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name != module:
      raise
    where = f"module {name}" if "." in name else f"module jaxseg/methods/{name}.py"
    raise DataError(f"config method.name = {name!r}: no {where}") from None


def checked_method(config: ml_collections.ConfigDict, files: bool = True) -> ModuleType:
  """Checks `config` (its shared blocks, then the method's own keys) and returns the method module.

  The first thing every mode does: a bad value fails here, in milliseconds, before any data is read
  or anything compiled. `files=False` skips the data files (--mode predict reads none).
  """
  config_blocks.check_config(config, files=files)
  method = load_method(config)
  base.check_method_config(method, _steps_known(config))
  return method


def _steps_known(config: ml_collections.ConfigDict, epoch_length: int = 1
                 ) -> ml_collections.ConfigDict:
  """`config` with train.num_steps = train.num_epochs x `epoch_length` when the run is counted in
  epochs (a copy; `config` itself otherwise). Before the data are split the epoch length is
  unknown: the checks then take 1 batch per epoch (optimiser schedules need some T > 0), and the
  run resolves it (`with_run_length`)."""
  epochs = config.get("train", {}).get("num_epochs", 0)
  if not epochs:
    return config
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.train.num_steps = int(epochs) * int(epoch_length)
  return resolved


def with_run_length(config: ml_collections.ConfigDict, method: ModuleType, batches
                    ) -> ml_collections.ConfigDict:
  """`config` with its run length in steps: with train.num_epochs, train.num_steps = num_epochs x
  `batches.epoch_length()` (checked again by the method, e.g. its optimiser schedules)."""
  if not config.train.get("num_epochs", 0):
    return config
  resolved = _steps_known(config, batches.epoch_length())
  base.check_method_config(method, resolved)
  _print(f"train.num_epochs = {config.train.num_epochs} epochs of {batches.epoch_length()} "
         f"batches: train.num_steps = {resolved.train.num_steps}")
  return resolved


# Keys that may change between a run and its resumption (everything else must match).
_RESUMABLE_CHANGES = ("train.num_steps", "train.log_every", "train.eval_every", "eval.",
                      "data.on_device",  # Same batches either way.
                      "train.compilation_cache",  # Where compiled programs are kept.
                      "train.distributed.")  # Same global batch on any number of processes.


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _same_value(a, b) -> bool:
  """a == b, with tuples and lists (what JSON makes of tuples) alike."""
  return (list(a) if isinstance(a, (list, tuple)) else a) == (
      list(b) if isinstance(b, (list, tuple)) else b)


def _added_default(key: str, current: dict) -> bool:
  """Whether `key`, absent from a saved config, is a data- or train-block key, a key of the
  method's own block or an optimiser field added since that run was started, at the default that
  reproduces the old behaviour (runs of older versions resume)."""
  block, _, field = key.rpartition(".")
  if block.startswith("data."):  # A key of a data sub-block, e.g. data.intensity_augment.p_gamma.
    block, field = "data", key[len("data."):]
  if block in ("data", "train", "method"):
    if block in ("data", "train"):
      shared = config_blocks.data_block() if block == "data" else config_blocks.train_block()
      defaults = _flatten(shared.to_dict())
    else:  # A key of the method's own block, e.g. MAML's method.fusion.
      try:
        defaults = load_method(ml_collections.ConfigDict(
            {"method": {"name": current["method.name"]}})).default_config()
      except (DataError, KeyError, AttributeError):
        return False
    if field not in defaults:
      return False
    return _same_value(current[key], defaults[field])
  if not block.startswith("method.") or not block.endswith("optimizer"):
    return False
  # Before the field existed, a block with decay_every > 0 decayed in steps: schedule "step".
  decay_every = current.get(f"{block}.decay_every") or 0
  defaults = optim.optimizer_config(current.get(f"{block}.name", "sgd"),
                                    **({"decay_every": decay_every} if decay_every else {}))
  if field not in defaults:
    return False
  return _same_value(current[key], defaults[field])


def check_same_run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses to resume a workdir that holds a run of another config (it would mix two runs)."""
  saved_path = workdir / "config.json"
  if not saved_path.exists():
    return
  saved = _flatten(json.loads(saved_path.read_text()))
  current = _flatten(json.loads(config.to_json_best_effort()))
  differ = sorted(k for k in set(saved) | set(current)
                  if saved.get(k) != current.get(k) and not k.startswith(_RESUMABLE_CHANGES)
                  and not (k not in saved and _added_default(k, current)))
  if differ:
    raise DataError(f"workdir {workdir} holds a run with another config (keys {differ[:6]}); use "
                    "a new --workdir or the same config")


class Progress:
  """Console progress line: step, mean metrics since the last line, steps/s and ETA."""

  def __init__(self, start_step: int, num_steps: int):
    self.num_steps = num_steps
    self.last_step, self.last_time = start_step, time.perf_counter()

  def line(self, step: int, scalars: dict[str, float]) -> str:
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.num_steps - step) / max(rate, 1e-9)
    values = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
    return (f"step {step}/{self.num_steps} | {values} | {rate:.2f} steps/s | "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")


class _NoWriter:
  """The event writer of processes other than process 0."""

  def add_scalar(self, *args, **kwargs) -> None:
    pass

  def scalars(self, group: str, values: dict, step: int) -> None:
    pass

  def close(self) -> None:
    pass


class _RunWriter:
  """Process 0's scalars: TensorBoard events in workdir/tensorboard, and train_log.csv,
  validation_log.csv and curves.png in workdir (`jaxseg.curves`, for readers without TensorBoard).
  """

  def __init__(self, workdir: pathlib.Path, start_step: int):
    import tensorboardX  # Imported here: only training writes event files.
    self.events = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
    self.curves = curves.TrainingCurves(workdir, start_step)

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self.events.add_scalar(tag, value, step)

  def scalars(self, group: str, values: dict, step: int) -> None:
    """One log line ("train") or evaluation (its split): events "<group>/<name>", one CSV row."""
    for k, v in values.items():
      self.events.add_scalar(f"{group}/{k}", v, step)
    self.curves.add(group, step, values)

  def close(self) -> None:
    try:
      self.curves.close()
    finally:
      self.events.close()


def _writer(workdir: pathlib.Path, start_step: int = 0):
  """The scalar writer: `_RunWriter` on process 0 (its CSV logs keep the rows up to `start_step`),
  else `_NoWriter`."""
  if not parallel.is_primary():
    return _NoWriter()
  return _RunWriter(workdir, start_step)


def _eval_outputs(out_dir: pathlib.Path) -> str:
  """What an evaluation wrote to `out_dir`: "metrics.csv, summary.json, figure.png, predictions/
  with 4 files"."""
  names = [n for n in ("metrics.csv", "summary.json", "figure.png") if (out_dir / n).exists()]
  predictions = out_dir / evaluate.PREDICTIONS_DIR
  if predictions.is_dir():
    names.append(f"{predictions.name}/ with {sum(1 for _ in predictions.iterdir())} files")
  return ", ".join(names) or "nothing"


def _print_run_outputs(workdir: pathlib.Path, eval_dir: pathlib.Path) -> None:
  """The end of training (process 0): where the run's results are."""
  if not parallel.is_primary():
    return
  lines = [f"results in {workdir}:"]
  if eval_dir.is_dir():
    lines.append(f"  evaluation: {eval_dir}/ ({_eval_outputs(eval_dir)})")
  if (workdir / curves.CURVES_PNG).exists():
    lines.append(f"  training curves: {workdir / curves.CURVES_PNG} (values in "
                 f"{curves.TRAIN_LOG}, {curves.VALIDATION_LOG})")
  lines.append(f"  TensorBoard: tensorboard --logdir {workdir / 'tensorboard'}")
  lines.append(f"  checkpoints: {workdir / 'checkpoints'}/ (for --mode eval and --mode predict)")
  print("\n".join(lines), flush=True)


def _print(*args, **kwargs) -> None:
  """Console output of process 0 only (every process runs the same loop)."""
  if parallel.is_primary():
    print(*args, **kwargs)


def _predict_fn(method: ModuleType, state: Any):
  """window inputs -> {view: probabilities}, the predict function of `evaluate`."""
  # A Partial makes the state a traced argument: new weights do not recompile the window loop.
  return jax.tree_util.Partial(method.predict, state)


def _maps_fn(method: ModuleType, state: Any):
  """window inputs -> {name: (B, *patch) map}, the method's optional `maps` bound like
  `_predict_fn`, or None for a method without maps (the figure then shows none)."""
  return jax.tree_util.Partial(method.maps, state) if hasattr(method, "maps") else None


def _evaluation_cases(config, dataset, final: bool) -> tuple[str, tuple]:
  """(split name, cases) evaluated: the `eval.case_list` file's cases if set and this is the final
  evaluation, else validation. Evaluations during training never read the list: no curve of it
  exists from which to pick a checkpoint."""
  case_list = config.eval.case_list
  if case_list and final:
    return (pathlib.Path(case_list).stem,
            sources.load_evaluation_cases(config.data, case_list, dataset))
  return "validation", dataset.validation


def _validate(method, state, dataset, config, out_dir: Optional[pathlib.Path],
              final: bool = True) -> dict:
  split_name, cases = _evaluation_cases(config, dataset, final)
  if not cases:
    _print("no validation cases (config data.num_validation = 0): evaluation skipped")
    return {}
  if config.eval.get("intensity_rescale", "none") == "labeled":
    mean, std = intensity.reference_stats(dataset.labeled)
    cases = tuple(intensity.rescaled(c, mean, std) for c in cases)
  # Windows are spread over this process's devices; processes share out the cases.
  mesh = parallel.local_mesh()
  if jax.process_count() > 1:
    state = parallel.local_replica(state, mesh)
  return evaluate.evaluate(_predict_fn(method, state), cases, config.eval,
                           dataset.num_classes, out_dir,
                           patch_size=tuple(config.eval.patch_size or config.data.patch_size),
                           split_name=split_name, mesh=mesh,
                           # Maps go into figure.png only: none without reports (validation).
                           maps_fn=_maps_fn(method, state) if out_dir is not None else None,
                           split_record=(dataset.split.rule_dict()
                                         if split_name == "validation" else None))


def _check_eval_batchnorm(method: ModuleType, state: Any, config: ml_collections.ConfigDict,
                          dataset) -> None:
  """Refuses eval.batchnorm = "per_image" for networks without BatchNorm before training (the
  evaluation would refuse it only after the last step)."""
  patch = tuple(config.eval.patch_size or config.data.patch_size)
  spec = evaluate.window_spec(evaluate.case_inputs(dataset.labeled[0]), 1, patch)
  eval_batchnorm.check_runs_batchnorm(_predict_fn(method, state), spec,
                                      eval_batchnorm.check_mode(config.eval))


def batch_spec(config: ml_collections.ConfigDict, spec: Union[int, BatchSpec]) -> BatchSpec:
  """`spec`, or for a channel count the spec of plain images of that many channels (no fields)."""
  if isinstance(spec, BatchSpec):
    return spec
  return BatchSpec(tuple(int(p) for p in config.data.patch_size), int(spec))


def example_batch(config: ml_collections.ConfigDict, spec: Union[int, BatchSpec]) -> Batch:
  """A zero batch of the configured shapes (`spec`, or a channel count): all `method.init` needs
  to build the networks."""
  return zero_batch(batch_spec(config, spec), config.data.batch_labeled,
                    config.data.batch_unlabeled)


def use_compilation_cache(folder: Optional[str]) -> None:
  """Turns JAX's persistent compilation cache on in `folder`, or off (None); `python -m jaxseg.main`
  calls it with `config_blocks.compilation_cache_dir` before anything compiles. JAX's default
  thresholds decide what is stored (programs that took >= 1 s to compile)."""
  jax.config.update("jax_enable_compilation_cache", folder is not None)
  if folder is not None:
    jax.config.update("jax_compilation_cache_dir", folder)
  # JAX decides once whether (and where) it caches: make it decide again with these settings.
  compilation_cache.reset_cache()


def _initial_state(method: ModuleType, config: ml_collections.ConfigDict,
                   spec: Union[int, BatchSpec], mesh):
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  example = example_batch(config, spec)
  # Jitted: flax initialisation op by op is slow (seconds per network on CPU). The unrolled
  # Threefry compiles several times faster on CPU, with the same bits (prng_lowering).
  try:
    with prng_lowering.unrolled_threefry():
      state = jax.jit(lambda key: method.init(key, config, example),
                      out_shardings=parallel.replicated(mesh))(init_key)
  except DataError:
    raise
  except ValueError as e:
    # A bad method setting (a model width, a loss name) that the method's checks let through: one
    # error line naming the method, not a traceback.
    raise DataError(f"config method {config.method.name!r}: {e}") from e
  return state, train_key


def _checkpointer(config: ml_collections.ConfigDict, workdir: pathlib.Path, create: bool = True):
  return checkpoint.Checkpointer(workdir / "checkpoints", config.train.keep_checkpoints,
                                 create=create)


def _no_checkpoint(workdir: pathlib.Path) -> DataError:
  return DataError(f"workdir {workdir} has no checkpoint: train first "
                   "(--mode train with the same --config and --workdir)")


def _check_workdir(workdir: pathlib.Path, train: bool) -> None:
  """Fails at once, with one line naming the path, on a workdir that cannot serve: a file, a folder
  on a read-only (or full) file system, `checkpoints` that is a file. Called before any data are
  read or anything compiled, so that a fault is not met at the first save, minutes later.

  `train`: creates the workdir; else (eval, predict) it must hold checkpoints.
  """
  if workdir.exists() and not workdir.is_dir():
    raise DataError(f"workdir {workdir} is a file, not a folder: use another --workdir")
  ckpts = workdir / "checkpoints"
  if ckpts.exists() and not ckpts.is_dir():
    raise DataError(f"checkpoint folder {ckpts} is a file: move it away or use another --workdir")
  if not train:
    if not ckpts.is_dir():
      raise _no_checkpoint(workdir)
    return
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"workdir {workdir} cannot be created ({checkpoint.reason(e)})") from None
  for folder in (workdir, ckpts) if ckpts.is_dir() else (workdir,):
    # The process index too: processes on several hosts may share a pid.
    probe = folder / f".write_probe.{jax.process_index()}.{os.getpid()}"
    try:
      probe.write_bytes(b"jaxseg")
      probe.unlink()
    except OSError as e:
      what = "workdir" if folder == workdir else "checkpoint folder"
      raise DataError(f"{what} {folder} is not writable ({checkpoint.reason(e)})") from None


def _restore_latest(ckpt: checkpoint.Checkpointer, state: Any, workdir: pathlib.Path,
                    required: bool, set_aside: bool = False):
  """The newest readable checkpoint (state, record), or (state, None) if none exists and none is
  `required`. Each newer checkpoint that cannot be read (a truncated or deleted file) gets one
  warning line and is skipped; with `set_aside` (training resumes and will save its step again) it
  is moved to workdir/unreadable_checkpoints, never deleted."""
  if ckpt.latest_step() is None:
    if required:
      raise _no_checkpoint(workdir)
    return state, None
  state, record, unreadable = ckpt.restore_latest(state)
  if not unreadable:
    return state, record
  parallel.sync("jaxseg: checkpoints read")  # Every process has read before one is moved.
  for step, why in unreadable:
    if parallel.is_primary():
      moved = f"; moved to {ckpt.set_aside(step)}" if set_aside else ""
      print(f"warning: checkpoint {ckpt.step_dir(step)} cannot be read ({why}); using step "
            f"{record['step']}{moved}", file=sys.stderr, flush=True)
  if set_aside:
    parallel.sync("jaxseg: unreadable checkpoints set aside")
    ckpt.reload()
  return state, record


def _all_finite(tree: Any) -> jax.Array:
  """One boolean: every floating leaf of `tree` is finite (one reduction per leaf, fused by XLA;
  PRNG keys and integer leaves are skipped)."""
  flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
           if getattr(x, "dtype", None) is not None and jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(flags).all() if flags else jnp.bool_(True)


def _with_finite_flag(train_step: Callable) -> Callable:
  """`train_step` that also returns `_all_finite` of its metrics and new state, computed inside the
  same jitted function: divergence is noticed without a host sync per step, and no method needs to
  know about it."""

  def step(*args):
    state, metrics = train_step(*args)
    return state, metrics, _all_finite((metrics, state))
  return step


def _check_finite(unchecked: list, num_steps: int, ckpt: checkpoint.Checkpointer) -> None:
  """Reads the flags of the (done, metrics, flag) steps since the last check, in order; stops the
  run at the first non-finite one. Called before every log line, save and evaluation, which wait
  for those steps anyway: a non-finite state is never saved, the last good checkpoint stays."""
  for done, metrics, finite in unchecked:
    if bool(finite):
      continue
    what = "the parameters/state are not finite (the metrics are)"
    for k, v in metrics.items():
      if not np.all(np.isfinite(np.asarray(v))):
        what = f"{k} is {float(np.asarray(v).ravel()[0])}"
        break
    last = ckpt.latest_step()
    kept = (f"the last good checkpoint is {ckpt.step_dir(last)}" if last is not None
            else "no checkpoint was saved")
    raise DataError(f"training diverged at step {done}/{num_steps}: {what}; stopped without "
                    f"saving it, {kept}")
  unchecked.clear()


def _host_batches(batches, sharding) -> Callable[[], Batch]:
  """The next global batch from the host pipeline; each process prepares only its own rows."""
  rows_l = parallel.local_rows(sharding, batches.batch_labeled)
  rows_u = parallel.local_rows(sharding, batches.batch_unlabeled)

  def stream(arrays: dict, rows: tuple[int, int], n: int) -> dict:
    return jax.tree.map(
        lambda a: parallel.global_array(a, rows[0], (n, *a.shape[1:]), sharding), arrays)

  def next_batch() -> Batch:
    local = batches.batch_at(batches.step, rows_l, rows_u)
    batches.step += 1
    return Batch(labeled=stream(local.labeled, rows_l, batches.batch_labeled),
                 unlabeled=stream(local.unlabeled, rows_u, batches.batch_unlabeled))
  return next_batch


def _check_replicas(state: Any) -> None:
  """Several processes: each holds a copy of the replicated state; they must be equal bit for bit
  (a difference means the processes computed different things, e.g. from different data)."""
  if jax.process_count() == 1:
    return
  digests = parallel.allgather_json(parallel.replica_digest(state))
  if len(set(digests)) != 1:
    raise RuntimeError(f"the processes' copies of the state differ: sha256 {digests}")
  _print(f"state replicas agree on all {len(digests)} processes (sha256 {digests[0][:16]})")


def _record(step: int, batches, train_key: jax.Array) -> dict:
  return {"step": step, "data": batches.get_state(),
          "train_key": np.asarray(jax.random.key_data(train_key)).tolist()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds checkpoints), then evaluates.

  Returns the final validation summary (also written to workdir/eval/summary.json).
  """
  method = checked_method(config)
  workdir = pathlib.Path(workdir)
  parallel.initialize_distributed(config.train.distributed)
  _check_workdir(workdir, train=True)
  check_same_run(config, workdir)
  parallel.sync("jaxseg: workdir checked")  # Before process 0 writes config.json.
  dataset = sources.load_dataset(config.data)
  mesh = parallel.make_mesh()
  parallel.check_batch_fits_mesh(config.data, mesh)
  batches = sources.make_batches(dataset, config.data)
  config = with_run_length(config, method, batches)
  spec = batches.spec
  state, train_key = _initial_state(method, config, spec, mesh)
  _check_eval_batchnorm(method, state, config, dataset)
  ckpt = _checkpointer(config, workdir)
  if parallel.is_primary():
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    (workdir / "data_info.json").write_text(json.dumps({
        "channels": spec.channels, "batch_spec": spec.to_json(),
        "modality_names": list(dataset.labeled[0].modality_names)}))
    dataset.split.write(workdir / "split.json")

  state, record = _restore_latest(ckpt, state, workdir, required=False, set_aside=True)
  start = 0
  if record is not None:
    start = int(record["step"])
    batches.set_state(record["data"])
    _print(f"resuming from the checkpoint of step {start} in {workdir}")
  num_steps = config.train.num_steps
  processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
  _print(f"{config.method.name}: {len(dataset.labeled)} labeled / {len(dataset.unlabeled)} "
         f"unlabeled / {len(dataset.validation)} validation cases; {num_steps} steps on "
         f"{mesh.size} {jax.devices()[0].platform} device(s){processes}")

  batch_sharding = parallel.data_sharding(mesh)
  # The method's step, after the on-device intensity augmentation when data.intensity_augment is on.
  train_step = intensity_augment.with_intensity_augment(method.train_step, config.data)
  jit_options = compiler_options.jit_options(len(config.data.patch_size))
  if config.data.on_device:
    device_data = device_crops.DeviceData(batches, parallel.replicated(mesh))
    _print(f"training volumes on the device(s): {device_data.nbytes / 2**20:.0f} MiB")
    patch = tuple(config.data.patch_size)

    def step_on_device(state, arrays, plan, key):
      batch = device_crops.assemble(arrays, plan, patch)
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
      return train_step(state, batch, key)

    jitted = jax.jit(_with_finite_flag(step_on_device), donate_argnums=(0,),
                     compiler_options=jit_options)
    step_fn = lambda state, key: jitted(state, device_data.arrays, device_data.next_plan(), key)
  else:
    jitted = jax.jit(_with_finite_flag(train_step), donate_argnums=(0,),
                     compiler_options=jit_options)
    next_batch = _host_batches(batches, batch_sharding)
    step_fn = lambda state, key: jitted(state, next_batch(), key)
  writer = _writer(workdir, start)
  progress = Progress(start, num_steps)
  pending: list[dict] = []
  unchecked: list = []  # (step, metrics, finite flag) of the steps not checked yet.
  try:
    for step in range(start, num_steps):
      state, metrics, finite = step_fn(state, jax.random.fold_in(train_key, step))
      pending.append(metrics)
      done = step + 1
      unchecked.append((done, metrics, finite))
      ckpt.check()  # A save that failed in the background stops the run now, not a save later.
      eval_every = config.train.eval_every
      if (done % config.train.log_every == 0 or done % config.train.checkpoint_every == 0
          or done == num_steps or (eval_every and done % eval_every == 0)):
        _check_finite(unchecked, num_steps, ckpt)  # Before a log line, save or evaluation.
      if done % config.train.log_every == 0 or done == num_steps:
        means = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
        pending = []
        writer.scalars("train", means, done)
        _print(progress.line(done, means), flush=True)
      # At the last step the final evaluation (below) stands in for this one, unless the method
      # reads its validation scores: then the state saved at that step must hold them, as a longer
      # run's would (the final evaluation may score eval.case_list, never fed back to training).
      if eval_every and done % eval_every == 0 and (
          done < num_steps or hasattr(method, "after_validation")):
        summary = _validate(method, state, dataset, config, None, final=False)
        _log_validation(writer, summary, done)
        # Before the step's save: a state the validation changed is checkpointed as trained on.
        state = _after_validation(method, state, summary)
      if done % config.train.checkpoint_every == 0 or done == num_steps:
        ckpt.save(done, state, _record(done, batches, train_key))
    ckpt.wait()
    _check_replicas(state)
    summary = _validate(method, state, dataset, config, workdir / "eval")
    _log_validation(writer, summary, num_steps)
    _print_table(summary)
  finally:
    failing = sys.exc_info()[0] is not None  # Then keep the error that stopped the run.
    ckpt.close(quiet=failing)
    try:
      writer.close()
    except OSError as e:
      if not failing:
        raise DataError(f"the logs in {workdir} cannot be written "
                        f"({checkpoint.reason(e)})") from None
  _print_run_outputs(workdir, workdir / "eval")
  return summary


def _after_validation(method: ModuleType, state: Any, summary: dict) -> Any:
  """The state after the method's optional `after_validation(state, summary)` hook (a method that
  reads its own validation scores, e.g. ASDNet's released semi-supervised threshold).

  Leaves the hook replaced are placed like the ones they replace (replicated on the mesh, in every
  process from the same host value), so the next step neither recompiles nor moves data; the
  others are passed through untouched.
  """
  hook = getattr(method, "after_validation", None)
  if hook is None or not summary:
    return state
  new_state = hook(state, summary)

  def placed(new, old):
    if new is old or not isinstance(old, jax.Array):
      return new
    value = np.asarray(jax.device_get(new), dtype=old.dtype)
    if value.shape != old.shape:
      raise ValueError(f"{method.__name__}.after_validation changed a state entry's shape "
                       f"{old.shape} to {value.shape}")
    return jax.make_array_from_callback(old.shape, old.sharding, lambda index: value[index])

  return jax.tree.map(placed, new_state, state)


def _log_validation(writer, summary: dict, step: int) -> None:
  if not summary:
    return
  scores = evaluate.headline(summary)
  split = summary.get("split", "validation")
  writer.scalars(split, scores, step)
  _print(f"{split} at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
         + f" ({summary['num_cases']} cases in {summary['seconds']['total']:.1f} s)",
        flush=True)


def _print_table(summary: dict) -> None:
  """The final evaluation's scores, raw and LCC side by side, mean ± std over n cases."""
  if summary:
    _print("\n".join(evaluate.raw_lcc_table_lines(summary)), flush=True)


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode eval: evaluates the latest checkpoint of `workdir` on the validation split (or on the
  cases of `eval.case_list`)."""
  method = checked_method(config)
  workdir = pathlib.Path(workdir)
  _check_workdir(workdir, train=False)
  parallel.initialize_distributed(config.train.distributed)
  dataset = sources.load_dataset(config.data)
  spec = BatchSpec.of_case(dataset.labeled[0], config.data.patch_size)
  # The optimiser's schedule length does not matter to evaluation: no batches are built here.
  state, _ = _initial_state(method, _steps_known(config), spec, parallel.make_mesh())
  ckpt = _checkpointer(config, workdir, create=False)
  state, record = _restore_latest(ckpt, state, workdir, required=True)
  ckpt.close()
  rescaled = "_rescaled" if config.eval.get("intensity_rescale", "none") == "labeled" else ""
  out_dir = workdir / f"eval_step{record['step']}{rescaled}"
  summary = _validate(method, state, dataset, config, out_dir)
  if not summary:
    return summary
  timing = (f"{summary['num_cases']} cases in {summary['seconds']['total']:.1f} s, sliding "
            f"windows {summary['seconds']['sliding_window']:.1f} s")
  table = evaluate.subset_table_lines(summary)
  if table:  # One line per modality subset instead of 2^M times the headline scalars.
    _print(f"{summary.get('split', 'validation')} ({timing}), Dice in % of each modality subset "
           "(raw predictions):\n" + "\n".join(table))
  else:
    scores = evaluate.headline(summary)
    _print(f"{summary.get('split', 'validation')}: "
           + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f" ({timing})")
    _print_table(summary)
  _print(f"wrote the evaluation of step {record['step']} to {out_dir}/: {_eval_outputs(out_dir)}")
  return summary


def predict_workdir(config: ml_collections.ConfigDict, workdir: str, input_path: str,
                    output_dir: str) -> list:
  """--mode predict: segments the files at `input_path` with the latest checkpoint of `workdir`."""
  method = checked_method(config, files=False)
  workdir = pathlib.Path(workdir)
  _check_workdir(workdir, train=False)
  info = workdir / "data_info.json"
  if not info.exists():
    raise DataError(f"workdir {workdir} holds no trained run ({info.name} missing): train first")
  saved = json.loads(info.read_text())
  channels = saved["channels"]
  spec = BatchSpec.from_json(saved["batch_spec"]) if "batch_spec" in saved else channels
  # No data here to count an epoch in: the optimiser's schedule length does not matter to predict.
  state, _ = _initial_state(method, _steps_known(config), spec, parallel.make_mesh())
  ckpt = _checkpointer(config, workdir, create=False)
  state, _ = _restore_latest(ckpt, state, workdir, required=True)
  ckpt.close()
  if config.eval.modalities.strip() == evaluate.SUBSETS:
    raise DataError(f"config eval.modalities = {evaluate.SUBSETS!r} scores every subset in --mode "
                    "eval; --mode predict writes one prediction: name the modalities, e.g. "
                    "--config.eval.modalities=0,2")
  # Runs trained before the names were saved: the channels' default names.
  names = saved.get("modality_names") or [f"channel{c}" for c in range(channels)]
  predict_fn = evaluate.with_modalities(_predict_fn(method, state), config.eval.modalities, names)
  written = evaluate.predict_files(
      predict_fn, input_path, output_dir, config.eval,
      patch_size=tuple(config.eval.patch_size or config.data.patch_size), data_cfg=config.data,
      num_channels=channels, log=_print)
  _print(f"wrote {len(written)} prediction(s) to {output_dir}")
  return written
