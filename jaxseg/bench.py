"""Benchmark harness: how fast a config's train step and evaluation run on this machine's devices.

  python -m jaxseg.bench --config configs/dtc.py:la8
  python -m jaxseg.bench --config configs/supervised_vnet.py:la8 --steps 50 --eval_volume 183,140,88
  python -m jaxseg.bench --config configs/dtc.py --steps 5 --json bench.json

No data are read: the train step runs on random batches of the configured shapes (the step's cost
does not depend on the values), the evaluation on one random volume of --eval_volume. Prints:

- compile time of the jitted train step (lowering + XLA compilation; the command turns JAX's
  persistent compilation cache off, so that a second run measures a compile, not a cache read);
- step time: median and spread of --steps timed steps after --warmup untimed ones, each timed to
  `block_until_ready`, i.e. device time plus dispatch, with the batch already on the devices (the
  host data pipeline is excluded: compare with the trainer's steps/s to see its cost);
- samples/s and voxels/s (global batch x patch voxels per step);
- XLA's FLOP count of one step (`cost_analysis`) and the achieved FLOP/s, against the device's
  dense peak where it is known (PEAK_FLOPS; bf16 tensor-core peak for GPUs, which fp32 does not
  reach: the ratio is an upper-bound utilisation);
- evaluation: one sliding-window pass (the config's eval patch, strides, batch; each batch of
  windows spread over the devices) over the volume: seconds per volume and windows/s, after one
  untimed pass; with --eval_sweep N, a sweep over N volumes of random LA-like sizes (scaled to the
  eval patch), compilations included, as the evaluation of a test split runs (eval.shape_bucket
  decides how many compilations it needs);
- with --torch (needs the `bench` extra and torch): the reference iteration in PyTorch on the same
  device with the same global batch, patch and width, its steps alternated one for one with ours
  (the order swapped every pair), so that a change of the machine's load falls on both alike; the
  PyTorch / JAX ratio of each pair, reported as the median with its range, and the load average
  before and after. The reference iteration: for DTC (`method.name = "dtc"`) the whole iteration
  of `train_la_dtc.py` (`bench_torch.make_dtc_train_step`: V-Net-SDF forward, the losses with
  `compute_sdf` of the labeled crops on the host, SciPy and scikit-image, every step; backward; SGD),
  on labels that are LA-like blobs (the host SDF's cost depends on them; ours, an exact EDT in the
  step, does not); for the other V-Net configs the supervised V-Net step (`TorchVNet`,
  0.5 (CE + Dice), SGD), like for like with configs/supervised_vnet.py only (JAX then preallocates
  half of a GPU's memory instead of 75 %, leaving PyTorch the rest);
- with --medpy (needs the `bench` extra): the per-case metrics of the LA evaluation (Dice, Jaccard,
  95HD, ASD) of an LA-sized synthetic prediction, `jaxseg.metrics.case_metrics` against medpy
  0.5.2's dc + jc + hd95 + asd, as a time ratio, with the largest relative difference of the values.

Speed is a measurement, not a test: numbers from different machines or runs are not comparable;
compare ratios taken in one run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
from scipy import ndimage

from jaxseg import compiler_options, evaluate, inference, metrics, parallel, train
from jaxseg.data.batches import Batch

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/<name>.py[:preset].",
    lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed train steps after compilation.")
_CHANNELS = flags.DEFINE_integer("channels", 1, "Image channels (modalities) of the random batches.")
_EVAL_VOLUME = flags.DEFINE_string(
    "eval_volume", "", "Spatial shape of the evaluation volume, comma separated (e.g. 183,140,88, "
    "a typical LA case); empty: 1.5x the eval patch per axis; 'none': skip the evaluation.")
_JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
_MEDPY = flags.DEFINE_bool("medpy", False, "Also time the evaluation metrics against medpy.")
_TORCH = flags.DEFINE_bool(
    "torch", False, "Also time the reference iteration in PyTorch (the `bench` extra; DTC's whole "
    "iteration for method dtc, else the supervised V-Net step) on the same device, batch and patch, "
    "its steps alternated with ours, and report the median ratio with its range.")
_EVAL_SWEEP = flags.DEFINE_integer(
    "eval_sweep", 0, "Also time a sweep over this many volumes of LA-like random sizes (compilations "
    "included), as an evaluation of a test split would run.")

# The size range of the LA 2018 volumes (x, y, z) and the LA eval patch they go with.
LA_SHAPE_RANGE = ((148, 244), (132, 160), (88, 88))
LA_PATCH = (112, 112, 80)
# A typical LA 2018 volume size (the 80 training volumes of the LA 2018 data set span
# 148-244 x 132-160 x 88 in 78 distinct shapes; the median is 192 x 142.5 x 88).
LA_SHAPE = (183, 140, 88)

# Dense peak FLOP/s per device kind (vendor datasheets; bf16 tensor cores for GPUs, SXM parts).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}


@dataclasses.dataclass
class BenchResult:
  """What `run` measured (times in seconds)."""
  config: str
  device: str
  num_devices: int
  global_batch: int
  patch: tuple
  compile_s: float
  step_median_s: float
  step_min_s: float
  step_max_s: float
  samples_per_s: float
  voxels_per_s: float
  step_flops: Optional[float]
  achieved_flops: Optional[float]
  peak_flops: Optional[float]
  eval_volume: Optional[tuple] = None
  eval_windows: Optional[int] = None
  eval_s: Optional[float] = None
  eval_windows_per_s: Optional[float] = None
  torch_device: Optional[str] = None
  torch_iteration: Optional[str] = None
  torch_step_median_s: Optional[float] = None
  torch_step_min_s: Optional[float] = None
  torch_step_max_s: Optional[float] = None
  # PyTorch / JAX time of each alternated pair of steps: median, smallest, largest.
  ratio_median: Optional[float] = None
  ratio_min: Optional[float] = None
  ratio_max: Optional[float] = None
  load_average: Optional[tuple] = None  # 1-minute load average before and after the timed steps.
  sweep_volumes: Optional[int] = None
  sweep_s: Optional[float] = None
  sweep_compilations: Optional[int] = None
  metrics_s: Optional[float] = None
  medpy_metrics_s: Optional[float] = None
  metrics_max_rel_diff: Optional[float] = None


def random_batch(config: ml_collections.ConfigDict, channels: int, seed: int = 0) -> Batch:
  """A batch of the configured shapes with random images and labels in [0, num_classes)."""
  rng = np.random.default_rng(seed)
  example = train.example_batch(config, channels)
  image_l = rng.standard_normal(example.labeled["image"].shape, np.float32)
  label_l = rng.integers(0, config.data.num_classes, example.labeled["label"].shape, dtype=np.int32)
  image_u = rng.standard_normal(example.unlabeled["image"].shape, np.float32)
  return Batch(labeled=dict(example.labeled, image=image_l, label=label_l),
               unlabeled=dict(example.unlabeled, image=image_u))


def step_flops(compiled: Any) -> Optional[float]:
  """XLA's FLOP estimate of a compiled function, or None where the backend gives none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return None
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per device program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _timed(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def _eval_volume_shape(spec: str, patch: Sequence[int]) -> Optional[tuple]:
  if spec == "none":
    return None
  if not spec:
    return tuple(int(math.ceil(1.5 * p)) for p in patch)
  shape = tuple(int(s) for s in spec.split(","))
  if len(shape) != len(patch):
    raise ValueError(f"--eval_volume {spec!r} has {len(shape)} axes, the eval patch {tuple(patch)} "
                     f"has {len(patch)}")
  return shape


def sweep_shapes(num_volumes: int, patch: Sequence[int], seed: int = 0) -> list[tuple[int, ...]]:
  """Random volume sizes in the LA 2018 range, scaled by patch / LA_PATCH per axis (3D patches);
  half to twice the patch for other patches."""
  rng = np.random.default_rng(seed)
  shapes = []
  for _ in range(num_volumes):
    if len(patch) == 3:
      shape = [int(round(rng.integers(lo, hi + 1) * p / ref))
               for (lo, hi), p, ref in zip(LA_SHAPE_RANGE, patch, LA_PATCH)]
    else:
      shape = [int(rng.integers(p // 2, 2 * p + 1)) for p in patch]
    shapes.append(tuple(max(s, 1) for s in shape))
  return shapes


@dataclasses.dataclass
class TorchPartner:
  """The PyTorch iteration timed against ours: `step()` runs one and waits for the device."""
  step: Callable[[], None]
  device: str
  iteration: str


def torch_partner(config: ml_collections.ConfigDict, channels: int) -> TorchPartner:
  """The reference iteration of `config` in PyTorch (needs torch), on the device JAX runs on (CUDA
  for a GPU, else the CPU): DTC's whole iteration for method dtc, else the supervised V-Net step.

  Raises:
    ValueError: the config's network is not a V-Net.
  """
  model = config.method.get("model")
  if model is None or not str(model.get("name", "")).startswith("vnet"):
    raise ValueError("--torch times a V-Net; config method.model.name is "
                     f"{None if model is None else model.get('name')!r}")
  from jaxseg import bench_torch  # pylint: disable=import-outside-toplevel  # The `bench` extra.
  device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
  patch = tuple(int(p) for p in config.data.patch_size)
  description = f"torch {bench_torch.torch_version()} on {bench_torch.device_description(device)}"
  if config.method.name == "dtc":
    from jaxseg.methods import dtc  # pylint: disable=import-outside-toplevel
    beta = dtc.apply_preset(config.method).beta
    labels = np.stack([np.roll(la_like_label(patch, seed=i), 3 * i, axis=0)
                       for i in range(int(config.data.batch_labeled))])
    step = bench_torch.make_dtc_train_step(
        labels=labels, batch_unlabeled=int(config.data.batch_unlabeled), channels=channels,
        n_filters=int(model.n_filters), device=device, beta=beta)
    return TorchPartner(step, description, f"DTC iteration with the host SDF, beta {beta}")
  step = bench_torch.make_vnet_train_step(
      batch=int(config.data.batch_labeled + config.data.batch_unlabeled), patch=patch,
      channels=channels, num_classes=int(config.data.num_classes), n_filters=int(model.n_filters),
      device=device)
  return TorchPartner(step, description, "supervised V-Net step")


def _alternated(ours: Callable[[], Any], theirs: Callable[[], None], steps: int
                ) -> tuple[list[float], list[float]]:
  """Times `steps` steps of each, one for one, ours first in even pairs and theirs first in odd
  ones; (our times, their times), pair by pair."""
  times = ([], [])
  for i in range(steps):
    for side in ((0, 1) if i % 2 == 0 else (1, 0)):
      times[side].extend(_timed((ours, theirs)[side], 1))
  return times


def run(config: ml_collections.ConfigDict, *, steps: int = 20, warmup: int = 3, channels: int = 1,
        eval_volume: str = "", name: str = "", eval_sweep: int = 0,
        partner: Optional[TorchPartner] = None) -> BenchResult:
  """Compiles and times `config`'s train step and one sliding-window evaluation; with `partner`,
  its steps alternate with ours (`warmup` untimed ones each first)."""
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
  eval_patch, strides = evaluate.window_geometry(config.eval, config.data.patch_size)
  shape = _eval_volume_shape(eval_volume, eval_patch)  # Checked before anything compiles.
  method = train.load_method(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_fits_mesh(config.data, mesh)
  state, key = train._initial_state(method, config, channels, mesh)
  batch = jax.device_put(random_batch(config, channels), parallel.data_sharding(mesh))

  jitted = jax.jit(method.train_step, donate_argnums=(0,),
                   compiler_options=compiler_options.jit_options(len(config.data.patch_size)))
  start = time.perf_counter()
  compiled = jitted.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - start
  flops = step_flops(compiled)

  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch, key)
    return metrics

  _timed(one_step, warmup)
  if partner is None:
    times = _timed(one_step, steps)
  else:
    for _ in range(warmup):
      partner.step()
    load_before = os.getloadavg()[0]
    times, torch_times = _alternated(one_step, partner.step, steps)
    load_after = os.getloadavg()[0]
  median = statistics.median(times)
  global_batch = int(config.data.batch_labeled + config.data.batch_unlabeled)
  patch = tuple(int(p) for p in config.data.patch_size)
  device = jax.devices()[0]
  peak = PEAK_FLOPS.get(device.device_kind)
  result = BenchResult(
      config=name, device=f"{device.platform} ({device.device_kind})", num_devices=mesh.size,
      global_batch=global_batch, patch=patch, compile_s=compile_s, step_median_s=median,
      step_min_s=min(times), step_max_s=max(times), samples_per_s=global_batch / median,
      voxels_per_s=global_batch * math.prod(patch) / median, step_flops=flops,
      achieved_flops=flops / median if flops else None,
      peak_flops=peak * mesh.size if peak else None)
  if partner is not None:
    ratios = [t / j for t, j in zip(torch_times, times)]
    result.torch_device, result.torch_iteration = partner.device, partner.iteration
    result.torch_step_median_s = statistics.median(torch_times)
    result.torch_step_min_s, result.torch_step_max_s = min(torch_times), max(torch_times)
    result.ratio_median = statistics.median(ratios)
    result.ratio_min, result.ratio_max = min(ratios), max(ratios)
    result.load_average = (load_before, load_after)

  predict_fn = train._predict_fn(method, holder["state"])
  window_batch = evaluate.window_batch_size(config.eval, mesh)
  example = evaluate.image_inputs(np.zeros((*eval_patch, channels), np.float32))
  views = evaluate.view_channels(predict_fn,
                                 evaluate.window_spec(example, window_batch, eval_patch))

  def one_pass(volume):
    return evaluate.predict_views(predict_fn, volume, config.eval, eval_patch, strides, views,
                                  mesh=mesh)

  if shape is not None:
    volume = np.random.default_rng(1).standard_normal((*shape, channels)).astype(np.float32)
    one_pass(volume)  # Compiles.
    (seconds,) = _timed(lambda: one_pass(volume), 1)
    windows = len(inference.window_starts(shape, eval_patch, strides)[0])
    result.eval_volume, result.eval_windows = shape, windows
    result.eval_s, result.eval_windows_per_s = seconds, windows / seconds

  if eval_sweep:
    rng = np.random.default_rng(2)
    volumes = [rng.standard_normal((*shape, channels)).astype(np.float32)
               for shape in sweep_shapes(eval_sweep, eval_patch)]
    sliding_window = inference.sliding_window_jit(len(eval_patch))
    compiled_before = sliding_window._cache_size()
    start = time.perf_counter()
    for volume in volumes:
      one_pass(volume)
    result.sweep_volumes, result.sweep_s = eval_sweep, time.perf_counter() - start
    result.sweep_compilations = sliding_window._cache_size() - compiled_before
  return result


def la_like_label(shape: Sequence[int] = LA_SHAPE, foreground: float = 0.09,
                  seed: int = 0) -> np.ndarray:
  """An LA-like atrium: a bumpy ellipsoid of `foreground` volume fraction, away from the edges.

  The normalised radius of an ellipsoid spanning ~70 % of each axis is modulated by smooth noise
  (clipped to +-30 %), then thresholded at the quantile that gives the requested foreground fraction.
  """
  axes = [np.linspace(-1.0, 1.0, s) / 0.7 for s in shape]
  radius = np.sqrt(sum(a ** 2 for a in np.meshgrid(*axes, indexing="ij")))
  bumps = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 6.0)
  field = radius * (1.0 + 0.15 * np.clip(bumps / bumps.std(), -2.0, 2.0))
  return field < np.quantile(field, foreground)


def dilate_and_shift(gt: np.ndarray) -> np.ndarray:
  """A prediction that over-segments `gt` by 2 voxels, displaced by (3, -2, 1) voxels."""
  return np.roll(ndimage.binary_dilation(gt, iterations=2), (3, -2, 1), axis=(0, 1, 2))


def compare_metrics_with_medpy(result: BenchResult, repeats: int = 3) -> None:
  """Times one case's LA metrics (Dice, Jaccard, 95HD, ASD): ours in one call, medpy in four."""
  from medpy.metric import binary as medpy_binary  # The `bench` extra.
  gt = la_like_label()
  pred = dilate_and_shift(gt)

  def ours():
    s = metrics.case_metrics(pred.astype(np.int32), gt.astype(np.int32), classes=(1,))[1]
    return s["dice"], s["jaccard"], s["hd95"], s["asd"]

  def medpy():
    return (medpy_binary.dc(pred, gt), medpy_binary.jc(pred, gt), medpy_binary.hd95(pred, gt),
            medpy_binary.asd(pred, gt))

  ours_values, medpy_values = ours(), medpy()
  result.metrics_s = statistics.median(_timed(ours, repeats))
  result.medpy_metrics_s = statistics.median(_timed(medpy, repeats))
  result.metrics_max_rel_diff = max(abs(a - b) / max(abs(b), 1e-300)
                                    for a, b in zip(ours_values, medpy_values))


def format_result(r: BenchResult) -> str:
  """The printed report of one `run`."""
  lines = [
      f"config {r.config}: {r.num_devices} x {r.device}, global batch {r.global_batch} of "
      f"{'x'.join(map(str, r.patch))}",
      f"  compile            {r.compile_s:8.2f} s",
      f"  train step         {1e3 * r.step_median_s:8.2f} ms median "
      f"(min {1e3 * r.step_min_s:.2f}, max {1e3 * r.step_max_s:.2f})",
      f"  throughput         {r.samples_per_s:8.2f} samples/s, {r.voxels_per_s / 1e6:.2f} Mvoxel/s",
  ]
  if r.step_flops:
    peak = (f", {100 * r.achieved_flops / r.peak_flops:.1f} % of the {r.peak_flops / 1e12:.0f} "
            "TFLOP/s dense peak" if r.peak_flops else ", device peak unknown")
    lines.append(f"  FLOPs              {r.step_flops / 1e9:8.2f} GFLOP/step, "
                 f"{r.achieved_flops / 1e12:.3f} TFLOP/s achieved{peak}")
  else:
    lines.append("  FLOPs              not reported by this backend")
  if r.eval_s is not None:
    lines.append(f"  evaluation         {r.eval_s:8.3f} s per {'x'.join(map(str, r.eval_volume))} "
                 f"volume, {r.eval_windows} windows, {r.eval_windows_per_s:.1f} windows/s")
  if r.torch_step_median_s is not None:
    lines.append(f"  PyTorch step       {1e3 * r.torch_step_median_s:8.2f} ms median "
                 f"(min {1e3 * r.torch_step_min_s:.2f}, max {1e3 * r.torch_step_max_s:.2f}; "
                 f"{r.torch_iteration}, float32, {r.torch_device})")
    lines.append(f"  PyTorch / JAX      {r.ratio_median:8.2f} median of the alternated pairs "
                 f"(range {r.ratio_min:.2f}-{r.ratio_max:.2f}); load average "
                 f"{r.load_average[0]:.2f} before, {r.load_average[1]:.2f} after")
  if r.sweep_s is not None:
    lines.append(f"  evaluation sweep   {r.sweep_s:8.2f} s for {r.sweep_volumes} volumes of LA-like "
                 f"sizes, {r.sweep_compilations} new compilation(s)")
  if r.metrics_s is not None:
    lines.append(f"  metrics vs medpy   {r.metrics_s:8.3f} s per {'x'.join(map(str, LA_SHAPE))} case "
                 f"(Dice, Jaccard, 95HD, ASD), medpy {r.medpy_metrics_s:.3f} s = "
                 f"{r.medpy_metrics_s / r.metrics_s:.1f}x; largest relative difference "
                 f"{r.metrics_max_rel_diff:.1e}")
  return "\n".join(lines)


def _share_gpu_memory_with_torch() -> None:
  """With --torch both frameworks allocate on one GPU, and JAX by default takes 75 % of its memory
  at start-up: cap JAX at half (before its backend starts) unless the user set a policy."""
  import os
  if not any(k in os.environ for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                        "XLA_PYTHON_CLIENT_PREALLOCATE",
                                        "XLA_PYTHON_CLIENT_ALLOCATOR")):
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.5"


def main(argv):
  if _TORCH.value:
    _share_gpu_memory_with_torch()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  jax.config.update("jax_enable_compilation_cache", False)
  if len(argv) > 1:
    print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  config = _CONFIG.value
  if config is None:
    print("error: --config is required, e.g. --config configs/dtc.py:la8", file=sys.stderr)
    sys.exit(2)
  try:
    partner = torch_partner(config, _CHANNELS.value) if _TORCH.value else None
    result = run(config, steps=_STEPS.value, warmup=_WARMUP.value, channels=_CHANNELS.value,
                 eval_volume=_EVAL_VOLUME.value, eval_sweep=_EVAL_SWEEP.value,
                 name=flags.FLAGS["config"].serialize().split("=", 1)[-1], partner=partner)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _MEDPY.value:
    compare_metrics_with_medpy(result)
  print(format_result(result))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dataclasses.asdict(result), f, indent=1)


if __name__ == "__main__":
  app.run(main)
