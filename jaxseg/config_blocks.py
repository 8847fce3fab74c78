"""The config blocks every run shares (`data`, `train`, `train.distributed`, `eval`), their presets,
and the checks a config passes before any data is read or anything compiled.

  c.data = config_blocks.data_block("la")        # a data protocol: the defaults plus its overrides
  c.train, c.eval = config_blocks.train_block(), config_blocks.eval_block()
  config_blocks.apply_overrides(c, PRESETS[preset], "configs/x.py")   # a config file's preset table
  config_blocks.check_config(c)                  # DataError naming the key, e.g. train.num_steps

Config files set what is their own on top of these blocks; a preset is a table of overrides
{"dotted.key": value}, applied in one loop. This module imports no JAX (nor anything that does), so
that a config is built and checked in milliseconds and a bad one fails before JAX starts.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import pathlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Callable, Optional

import ml_collections

from jaxseg.data.base import DataError

# Values of the enumerated keys. The modules that act on them import them from here.
SOURCES = ("synthetic", "la", "msd", "folders2d")  # data.source
ROOT_SOURCES = ("la", "msd", "folders2d")  # The sources read from the folder data.root.
SYNTHETIC_LAYOUTS = ("adjacent", "nested")  # data.synthetic.layout (data/synthetic.py LAYOUTS)
EMPTY_POLICIES = ("worst", "reference", "raise")  # eval.empty_policy (metrics.py EMPTY_POLICIES)
DISTRIBUTED_MODES = ("auto", "on", "off")  # train.distributed.mode
INPUTS = ("grayscale", "rgb_imagenet")  # data.input (data/preprocess.py INPUTS)
BATCHNORM_MODES = ("running", "per_image")  # eval.batchnorm (eval_batchnorm.py MODES)
VALIDATION_RULES = ("last", "random")  # data.validation, else a list file (data/splits.py)
# data.intensity_augment's defaults (nnU-Net v1 moreDA's brightness, contrast and gamma; the class
# data/intensity_augment.py IntensityAugmentConfig has the same).
INTENSITY_AUGMENT = dict(enabled=False, p_scale=0.15, scale_range=(0.75, 1.25), p_shift=0.15,
                         shift_range=(-0.25, 0.25), p_contrast=0.15, contrast_range=(0.75, 1.25),
                         p_gamma=0.3, gamma_range=(0.7, 1.5))
INTENSITY_RESCALES = ("none", "labeled")  # eval.intensity_rescale (data/intensity.py)


# ---------------------------------------------------------------------------------------------------
# The blocks.


def data_block(protocol: str = "") -> ml_collections.ConfigDict:
  """The `data` block: which cases, how they are split, preprocessed and batched.

  With `protocol` (a key of DATA_PROTOCOLS), that protocol's overrides are applied.

  Keys (counts are cases or samples; sizes are voxels/pixels per spatial axis):
    source: where the cases come from, one of SOURCES ("synthetic" is generated in memory).
    root: the data folder of la / msd / folders2d; a flag, never hard-coded.
    list_name: la: the list file under `root` to split (file order matters).
    num_classes: classes including background (>= 2).
    num_labeled: labeled = the first N cases of the list (>= 1)...
    labeled_fraction: ...or, when > 0, this fraction of the training pool, in [0, 1).
    num_validation: K validation cases (>= 0)...
    validation_fraction: ...or, when > 0, this fraction of the list (rounded), in [0, 1).
    validation: which cases validate (data/splits.py): "last" = the last K of the list; "random"
      = K drawn from the cases that are not labeled, seeded by validation_seed; or the path of a
      list file (one ID per line; relative paths are under data.root for the sources read from
      one), whose cases are taken whatever K says. The choice is recorded in split.json and the
      evaluation summary.
    validation_seed: the seed of the "random" draw (its own key: runs of other seeds keep the
      split).
    batch_labeled: labeled samples per training batch (>= 1).
    labeled_groups: contiguous parts of the labeled list sampled side by side (Duo: 2 views); it
      divides batch_labeled.
    batch_unlabeled: unlabeled samples per training batch (>= 0).
    patch_size: training crop size, 2 (H, W) or 3 (X, Y, Z) entries.
    seed: the order of batches and the augmentation draws.
    augment: rotate/flip before cropping.
    pad_to_patch: zero-pad volumes not larger than the patch (the reference rule), else refuse them.
    on_device: keep the training volumes on the devices and cut the crops inside the jitted step
      (the same batches as the host pipeline, bit for bit; data/device_crops.py). Needs them to fit
      in device memory.
    clip_percentiles: (lower, upper) intensity percentiles per modality, 0..100; () for no clipping.
    zscore: z-score each modality after clipping.
    zscore_nonzero: with zscore, take the statistics over the voxels where some modality is
      non-zero (holes filled) and set the others to 0, as nnU-Net normalises MR.
    foreground_oversample: the fraction of each batch's labeled samples whose crop is centred on
      a foreground voxel (nnU-Net: 0.33, the last round(B_l * f) samples of the batch); 0 = every
      crop uniformly placed. In [0, 1].
    percentile_scale: () = off, or (lower, upper) percentiles: each modality of each case mapped
      to (x - median) / (p_upper - p_lower), a robust scaling that one bright or dark volume does
      not set (data/intensity.py); after clip_percentiles, instead of zscore. Applied alike in
      training, evaluation and --mode predict.
    intensity_augment: on-device intensity augmentation of every training batch, for any method
      (data/intensity_augment.py): enabled, then per transform a probability per sample and a
      range drawn per channel: p_scale / scale_range (x * s), p_shift / shift_range (x + b, in
      intensity units), p_contrast / contrast_range, p_gamma / gamma_range (nnU-Net's contrast
      and gamma, as MAML's augmentation). Off by default.
    modalities: the channels to keep, by name or index (e.g. ("FLAIR",) or (0, 2)), in that order;
      () keeps them all. Training and evaluation see only these (a single-modality baseline).
    synthetic: the generated data (its own seed, so that changing the run's `seed` keeps the data):
      seed, num_cases, shape (2 or 3 entries, voxels), num_modalities, layout (SYNTHETIC_LAYOUTS),
      noise and bias (intensity units, >= 0), num_distractors (blobs that are not organs).
    image_size: folders2d: (H, W) in pixels to resize to; () keeps the file size.
    channels: folders2d: 1 or 3 to force; 0 keeps the file's channels.
    input: one of INPUTS. "grayscale": images as read (then clipped / z-scored as configured).
      "rgb_imagenet" (the released Duo-SegNet input): one-channel images repeated to 3 channels,
      the training images (labeled, unlabeled) normalised with the ImageNet mean / std, the
      validation, test and --mode predict images not normalised (data/preprocess.py).
    soft_masks: binary tasks: the labeled targets are soft masks in [0, 1] (2D folders: the mask
      resized bilinearly to image_size; other sources: the label itself), and every scored
      ground truth is its soft mask > 0.5 (the released Duo-SegNet masks). The method must take
      soft targets (its Requirements.soft_labels).
  """
  c = ml_collections.ConfigDict()
  c.source = "synthetic"
  c.root = ""
  c.list_name = "train.list"
  c.num_classes = 2
  c.num_labeled = 4
  c.labeled_fraction = 0.0
  c.num_validation = 4
  c.validation_fraction = 0.0
  c.validation = "last"
  c.validation_seed = 0
  c.batch_labeled = 2
  c.labeled_groups = 1
  c.batch_unlabeled = 2
  c.patch_size = (48, 48, 32)
  c.seed = 0
  c.augment = True
  c.pad_to_patch = True
  c.on_device = False
  c.clip_percentiles = ()
  c.zscore = False
  c.zscore_nonzero = False
  c.foreground_oversample = 0.0
  c.percentile_scale = ()
  c.intensity_augment = ml_collections.ConfigDict(INTENSITY_AUGMENT)
  c.modalities = ()
  c.synthetic = ml_collections.ConfigDict(dict(
      seed=0, num_cases=24, shape=(64, 64, 48), num_modalities=1, layout="adjacent", noise=0.1,
      bias=0.2, num_distractors=3))
  c.image_size = ()
  c.channels = 0
  c.input = "grayscale"
  c.soft_masks = False
  if protocol:
    if protocol not in DATA_PROTOCOLS:
      raise ValueError(f"unknown data protocol {protocol!r}, expected one of "
                       f"{tuple(DATA_PROTOCOLS)}")
    apply_overrides(c, DATA_PROTOCOLS[protocol], f"data protocol {protocol!r}")
  return c


# The data protocols every method's configs share: overrides of `data_block()`.
DATA_PROTOCOLS: dict[str, dict[str, Any]] = {
    # 24 synthetic 64x64x48 volumes, labeled = first 4, validation = last 4, 32^3 crops.
    "synthetic3d": {"patch_size": (32, 32, 32)},
    # 100 synthetic 128x128 images, labeled = first 10, validation = last 20, 96x96 crops.
    "synthetic2d": {"synthetic.shape": (128, 128), "synthetic.num_cases": 100,
                    "num_labeled": 10, "num_validation": 20, "patch_size": (96, 96)},
    # LA 2018: labeled = first 8 of train.list, validation = 8 drawn from the other 72 (seed 0),
    # 112x112x80 crops, 2 + 2 per batch; the data root is given with --config.data.root. Not the
    # last 8: train.list is in ID order, and its last 8 hold 3 of the 6 volumes stored with the
    # most compressed intensities (docs/la_protocol.md).
    "la": {"source": "la", "num_labeled": 8, "num_validation": 8, "validation": "random",
           "patch_size": (112, 112, 80)},
}


def data_overrides(protocol: str) -> dict[str, Any]:
  """The overrides of data protocol `protocol` as keys of the whole config ("data.<key>"), to merge
  into a config file's preset table."""
  return {f"data.{k}": v for k, v in DATA_PROTOCOLS[protocol].items()}


def distributed_block() -> ml_collections.ConfigDict:
  """The `train.distributed` block: whether and how this process joins a multi-process job.

  Keys:
    mode: one of DISTRIBUTED_MODES. "auto": join when the environment names a job (a coordinator
      address, below or in JAX_COORDINATOR_ADDRESS; an `srun` step of several SLURM tasks; an Open
      MPI launch of several ranks). "on": always call jax.distributed.initialize() (Cloud TPU pod
      slices and other clusters that JAX detects itself). "off": one process.
    coordinator_address: host:port of process 0 ("" = JAX_COORDINATOR_ADDRESS).
    num_processes: the number of processes (0 = JAX_NUM_PROCESSES, or what the cluster says).
    process_id: this process's index (-1 = JAX_PROCESS_ID, or what the cluster says).
  """
  return ml_collections.ConfigDict(dict(
      mode="auto", coordinator_address="", num_processes=0, process_id=-1))


def train_block() -> ml_collections.ConfigDict:
  """The `train` block: the length of the run and what it writes.

  Keys (in optimiser steps, one step = one batch):
    num_steps: steps of the run (>= 1), or 0 with num_epochs.
    num_epochs: 0, or the length of the run in epochs (then num_steps must be 0): num_steps is
      num_epochs x the epoch length, the batches after which the shortest stream has gone once
      through its cases (min(|X^1|, |X^2|, |U|) with one sample per stream; data/batches.py
      epoch_length), known once the data are split.
    log_every: steps between console progress lines and TensorBoard scalars (>= 1).
    checkpoint_every: steps between checkpoints (>= 1); one is also written at the end.
    eval_every: steps between validations during training (0: only at the end).
    keep_checkpoints: checkpoints kept on disk, the newest (>= 1).
    distributed: several processes (hosts), `distributed_block()`; by default the environment
      decides.
    compilation_cache: folder of JAX's persistent compilation cache for `python -m jaxseg.main`
      (compiled programs are reused by the next run of the same shapes; `~` is expanded); "" = off.
      With the default, $JAX_COMPILATION_CACHE_DIR, when set, names the folder instead.
  """
  return ml_collections.ConfigDict(dict(
      num_steps=1000, num_epochs=0, log_every=50, checkpoint_every=200, eval_every=0, keep_checkpoints=2,
      distributed=distributed_block(), compilation_cache=DEFAULT_COMPILATION_CACHE))


# train.compilation_cache by default.
DEFAULT_COMPILATION_CACHE = "~/.cache/jaxseg/xla"


def compilation_cache_dir(config: ml_collections.ConfigDict, environ: Mapping[str, str]
                          ) -> Optional[str]:
  """The folder of JAX's persistent compilation cache for a command run with `config`, or None
  (off): `train.compilation_cache` with `~` expanded ("" = off); with the default value,
  $JAX_COMPILATION_CACHE_DIR from `environ` when set (so that a cache chosen through JAX's own
  variable, e.g. the tests', stays in use). A config without the key gets the default."""
  train = config.get("train")
  value = train.get("compilation_cache", DEFAULT_COMPILATION_CACHE) if train is not None else (
      DEFAULT_COMPILATION_CACHE)
  if not value:
    return None
  if value == DEFAULT_COMPILATION_CACHE and environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  return os.path.expanduser(value)


def eval_block() -> ml_collections.ConfigDict:
  """The `eval` block: sliding-window inference and scoring.

  Keys (sizes in voxels/pixels per spatial axis):
    patch_size: window size; () = data.patch_size.
    strides: window step per axis; () = half the window (LA presets: (18, 18, 4)).
    batch_size: windows per network call (>= 1; rounded up to a multiple of the devices).
    shape_bucket: volumes are zero-padded to multiples of this per axis before the sliding window,
      so that volumes of different sizes share a compilation (LA: 4 instead of 78); the results do
      not change. 0 = no padding.
    threshold: foreground threshold of one-channel views (strict >), in (0, 1).
    gaussian: nnU-Net Gaussian window weights instead of the reference's uniform ones.
    mirror_axes: mirror test-time augmentation (nnU-Net): each window's probabilities are averaged
      over its flips along every subset of these spatial axes, e.g. (0, 1, 2); () = off (the LA
      protocol).
    regions: regions scored besides the classes: (name, classes) pairs, a region's mask being the
      voxels of any of its classes, e.g. (("WT", (1, 2, 3)), ("TC", (2, 3)), ("ET", (3,)));
      () = none.
    case_list: a list file under data.root (e.g. "test.list") evaluated instead of validation at
      the end of training and in --mode eval; "" = the validation split.
    lcc: also report largest-connected-component rows (binary tasks only).
    empty_policy: how empty masks are scored, one of EMPTY_POLICIES (metrics.py).
    num_figure_cases: cases drawn in figure.png (>= 0).
    save_predictions: write each case's label map per view.
    modalities: which modalities the method is given at evaluation and in --mode predict (the
      others are withheld: their channels zeroed and their modality_mask entries False): "" =
      those each case has; names or indices separated by commas (e.g. "t1,flair" or "0,2"); or
      "subsets" = every non-empty subset, each scored as its own set of views, "<view>:<subset>"
      (2^M - 1 of them), with the table modality_subsets.csv (evaluation only).
    intensity_rescale: "labeled" maps each evaluated image, channel by channel, linearly to the
      mean and standard deviation of the labeled training images (the average of their per-case
      values; no label read), a diagnostic of cases that fail because of their intensity scale;
      --mode eval then writes eval_step<N>_rescaled/. "none": as preprocessed.
    view: --mode predict: the view whose labels are written: "" = the method's first view (Duo:
      "f1"), a view name, or "mean" = the average of all views' probabilities, then the usual
      decision rule. Evaluation scores every view regardless.
    batchnorm: one of BATCHNORM_MODES, how BatchNorm layers normalise in evaluation and --mode
      predict: "running" (their running statistics, eval mode) or "per_image" (each window by its
      own statistics: a batch-1 train-mode forward, the released Duo-SegNet test; jaxseg/
      eval_batchnorm.py). "per_image" is refused for networks without BatchNorm.
  """
  c = ml_collections.ConfigDict()
  c.patch_size = ()
  c.strides = ()
  c.batch_size = 4
  c.shape_bucket = 32
  c.threshold = 0.5
  c.gaussian = False
  c.mirror_axes = ()
  c.regions = ()
  c.case_list = ""
  c.lcc = True
  c.empty_policy = "worst"
  c.num_figure_cases = 3
  c.save_predictions = True
  c.modalities = ""
  c.intensity_rescale = "none"
  c.view = ""
  c.batchnorm = "running"
  return c


# ---------------------------------------------------------------------------------------------------
# Presets and config files.


def check_preset(preset: str, presets: Mapping[str, Any], config_file: str) -> None:
  """Raises ValueError (config_flags shows it as the load error) if `preset` is not in `presets`."""
  if preset not in presets:
    raise ValueError(f"{config_file}: unknown preset {preset!r}, expected one of "
                     f"{[p for p in presets if p]}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str = "") -> ml_collections.ConfigDict:
  """Sets each {"dotted.key": value} of `overrides` in `config` (in place; returns it).

  Every key must exist already, so that a typo in a preset table fails when the config loads
  instead of adding a key that nothing reads. `where` names the table in that error.
  """
  for key, value in overrides.items():
    *parents, last = key.split(".")
    node = config
    for part in parents:
      node = node[part] if part in node else None
      if not isinstance(node, ml_collections.ConfigDict):
        break
    if not isinstance(node, ml_collections.ConfigDict) or last not in node:
      raise KeyError(f"{where}: the override {key} names no key of the config")
    node[last] = value
  return config


def load_sibling(config_file: str, name: str) -> ModuleType:
  """The module `name`.py next to `config_file` (a config file's `__file__`), loaded by path.

  Config files are loaded by path (ml_collections' config_flags, tests), and configs/ is not a
  package on sys.path; so a helper shared by config files is found from the caller's own path,
  whatever the working directory.
  """
  path = pathlib.Path(config_file).resolve().with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"jaxseg_configs_{name}", path)
  if spec is None or spec.loader is None:
    raise ImportError(f"{config_file}: cannot load {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ---------------------------------------------------------------------------------------------------
# Checks.


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _count(minimum: int) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_int(v) and v >= minimum), f"an integer >= {minimum}"


def _number(test: Callable[[float], bool], what: str) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_number(v) and test(v)), what


def _choice(values: tuple) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in values), f"one of {values}"


def _sizes(lengths: tuple[int, ...], empty: bool = False) -> tuple[Callable[[Any], bool], str]:
  """A tuple of positive integers with one of `lengths` entries (or () if `empty`)."""
  def test(v):
    if not isinstance(v, (tuple, list)):
      return False
    if not v:
      return empty
    return len(v) in lengths and all(_is_int(s) and s >= 1 for s in v)
  entries = " or ".join(str(n) for n in lengths)
  return test, (("() or " if empty else "") + f"a tuple of {entries} integers >= 1")


def _percentiles(v) -> bool:
  if not isinstance(v, (tuple, list)):
    return False
  return not v or (len(v) == 2 and all(_is_number(p) for p in v) and 0 <= v[0] <= v[1] <= 100)


def _scale_percentiles(v) -> bool:
  return _percentiles(v) and (not v or v[0] < v[1])


def _range(positive: bool) -> tuple[Callable[[Any], bool], str]:
  def test(v):
    return (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(x) for x in v)
            and v[0] <= v[1] and (not positive or v[0] > 0))
  return test, "(lo, hi) with " + ("0 < lo <= hi" if positive else "lo <= hi")


def _mirror_axes(v) -> bool:
  return (isinstance(v, (tuple, list)) and len(set(v)) == len(v)
          and all(_is_int(a) and 0 <= a <= 2 for a in v))


def _regions(v) -> bool:
  def region(r):
    # The name keys the region's rows beside the class indices and the "mean" entry.
    return (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) and r[0]
            and not r[0].isdigit() and r[0] != "mean" and isinstance(r[1], (tuple, list))
            and r[1] and len(set(r[1])) == len(r[1]) and all(_is_int(k) and k >= 1 for k in r[1]))
  return (isinstance(v, (tuple, list)) and all(region(r) for r in v)
          and len({r[0] for r in v}) == len(v))


def _modality_selection(v) -> bool:
  def entry(x):
    return (isinstance(x, str) and bool(x)) or (_is_int(x) and x >= 0)
  return (isinstance(v, (tuple, list)) and all(entry(x) for x in v)
          and len({str(x) for x in v}) == len(v))


_BOOL = ((lambda v: isinstance(v, bool)), "True or False")
_STRING = ((lambda v: isinstance(v, str)), "a string")
_SEED = _count(0)

# Every key of the shared blocks: (accepts the value, what the message says it must be). Checks
# across keys (the patch's axes, the data folder) are in `check_config`.
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.source": _choice(SOURCES),
    "data.root": _STRING,
    "data.list_name": ((lambda v: isinstance(v, str) and bool(v)), "a file name"),
    "data.num_classes": _count(2),
    # >= 1 unless labeled_fraction is set: see check_config.
    "data.num_labeled": _count(0),
    "data.labeled_fraction": _number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "data.num_validation": _count(0),
    "data.validation_fraction": _number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "data.validation": ((lambda v: isinstance(v, str) and bool(v.strip())),
                        "'last', 'random' or the path of a list file"),
    "data.validation_seed": _SEED,
    "data.batch_labeled": _count(1),
    "data.labeled_groups": _count(1),
    "data.batch_unlabeled": _count(0),
    "data.patch_size": _sizes((2, 3)),
    "data.seed": _SEED,
    "data.augment": _BOOL,
    "data.pad_to_patch": _BOOL,
    "data.on_device": _BOOL,
    "data.clip_percentiles": (_percentiles, "() or (lower, upper) with 0 <= lower <= upper <= 100"),
    "data.zscore": _BOOL,
    "data.zscore_nonzero": _BOOL,
    "data.foreground_oversample": _number(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "data.percentile_scale": (_scale_percentiles,
                              "() or (lower, upper) with 0 <= lower < upper <= 100"),
    "data.intensity_augment.enabled": _BOOL,
    "data.intensity_augment.p_scale": _number(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "data.intensity_augment.scale_range": _range(positive=True),
    "data.intensity_augment.p_shift": _number(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "data.intensity_augment.shift_range": _range(positive=False),
    "data.intensity_augment.p_contrast": _number(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "data.intensity_augment.contrast_range": _range(positive=True),
    "data.intensity_augment.p_gamma": _number(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "data.intensity_augment.gamma_range": _range(positive=True),
    "data.modalities": (_modality_selection, "() or distinct channel names or indices >= 0"),
    "data.synthetic.seed": _SEED,
    "data.synthetic.num_cases": _count(1),
    "data.synthetic.shape": _sizes((2, 3)),
    "data.synthetic.num_modalities": _count(1),
    "data.synthetic.layout": _choice(SYNTHETIC_LAYOUTS),
    "data.synthetic.noise": _number(lambda v: v >= 0, "a number >= 0"),
    "data.synthetic.bias": _number(lambda v: v >= 0, "a number >= 0"),
    "data.synthetic.num_distractors": _count(0),
    "data.image_size": _sizes((2,), empty=True),
    "data.channels": _choice((0, 1, 3)),
    "data.input": _choice(INPUTS),
    "data.soft_masks": _BOOL,
    # 0 only with num_epochs: see check_config.
    "train.num_steps": ((lambda v: _is_int(v) and v >= 0),
                        "an integer >= 1 (or 0 with train.num_epochs >= 1)"),
    "train.num_epochs": _count(0),
    "train.log_every": _count(1),
    "train.checkpoint_every": _count(1),
    "train.eval_every": _count(0),
    "train.keep_checkpoints": _count(1),
    "train.compilation_cache": _STRING,
    "train.distributed.mode": _choice(DISTRIBUTED_MODES),
    "train.distributed.coordinator_address": _STRING,
    "train.distributed.num_processes": _count(0),
    "train.distributed.process_id": _count(-1),
    "eval.patch_size": _sizes((2, 3), empty=True),
    "eval.strides": _sizes((2, 3), empty=True),
    "eval.batch_size": _count(1),
    "eval.shape_bucket": _count(0),
    "eval.threshold": _number(lambda v: 0 < v < 1, "a number in (0, 1)"),
    "eval.gaussian": _BOOL,
    "eval.mirror_axes": (_mirror_axes, "() or distinct spatial axes among 0, 1, 2"),
    "eval.regions": (_regions, "() or (name, classes) pairs: unique names (not a class index nor "
                     "'mean'), each a tuple of distinct classes >= 1"),
    "eval.case_list": _STRING,
    "eval.lcc": _BOOL,
    "eval.empty_policy": _choice(EMPTY_POLICIES),
    "eval.num_figure_cases": _count(0),
    "eval.save_predictions": _BOOL,
    # Names are resolved against the data's modality names when the cases are known.
    "eval.modalities": _STRING,
    "eval.intensity_rescale": _choice(INTENSITY_RESCALES),
    # The method's views are known once its predict function is traced: evaluate.predict_files
    # checks the name.
    "eval.view": _STRING,
    "eval.batchnorm": _choice(BATCHNORM_MODES),
}


def _lookup(config: ml_collections.ConfigDict, key: str):
  """(True, value) of the dotted `key`, or (False, None) when `config` lacks it."""
  node = config
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      return False, None
    node = node[part]
  return True, node


def _shown(value) -> str:
  # ConfigDict turns tuples given on the command line into lists: show both as tuples.
  return repr(tuple(value)) if isinstance(value, list) else repr(value)


def _fail(key: str, value, what: str) -> None:
  raise DataError(f"config {key} = {_shown(value)} must be {what}")


def check_config(config: ml_collections.ConfigDict, files: bool = True) -> None:
  """Checks every key of the shared blocks of `config` (data, train, eval) and the files they name.

  Reads no data and starts no JAX: the trainer calls it first, so that a bad value fails in
  milliseconds, not after the data are loaded or the step compiled.

  Args:
    config: a run's config (a block it lacks is not checked).
    files: also check that data.root is a folder (for the sources read from one), that the la list
      file and eval.case_list exist under it. --mode predict reads no data and passes False.

  Raises:
    DataError: the first failure, naming the full key, e.g. "config train.num_steps = -5 must be
      an integer >= 1".
  """
  for key, (accepts, what) in CHECKS.items():
    present, value = _lookup(config, key)
    if present and not accepts(value):
      _fail(key, value, what)
  if "train" in config:
    _check_length(config.train)
  if "data" in config:
    _check_data(config.data, files)
  if "eval" in config and "data" in config:
    _check_eval(config.eval, config.data, files)


def _check_length(t: ml_collections.ConfigDict) -> None:
  epochs = t.get("num_epochs", 0)
  if epochs and t.num_steps:
    raise DataError(f"config train.num_epochs = {epochs} and train.num_steps = {t.num_steps} are "
                    "both set: give the length once (train.num_steps = 0 to count in epochs, "
                    "train.num_epochs = 0 to count in steps)")
  if not epochs and t.num_steps < 1:
    _fail("train.num_steps", t.num_steps, "an integer >= 1 (or 0 with train.num_epochs >= 1)")


def _check_data(d: ml_collections.ConfigDict, files: bool) -> None:
  if not d.labeled_fraction and d.num_labeled < 1:
    _fail("data.num_labeled", d.num_labeled, "an integer >= 1 (or set data.labeled_fraction)")
  if d.batch_labeled % d.labeled_groups:
    raise DataError(f"config data.labeled_groups = {d.labeled_groups} must divide "
                    f"data.batch_labeled = {d.batch_labeled}")
  if d.get("percentile_scale", ()) and d.zscore:
    raise DataError(f"config data.percentile_scale = {_shown(d.percentile_scale)} and data.zscore "
                    "= True: choose one normalisation")
  if d.get("input", "grayscale") == "rgb_imagenet" and d.zscore:
    raise DataError("config data.input = 'rgb_imagenet' normalises with the ImageNet statistics: "
                    "set data.zscore = False")
  if d.get("soft_masks", False):
    if d.num_classes != 2:
      raise DataError(f"config data.soft_masks = True needs a binary task, not data.num_classes = "
                      f"{d.num_classes}")
    if d.on_device or d.foreground_oversample > 0:
      raise DataError("config data.soft_masks = True needs the host pipeline without foreground "
                      "crops: set data.on_device = False and data.foreground_oversample = 0")
  if d.get("percentile_scale", ()) and d.zscore:
    raise DataError(f"config data.percentile_scale = {_shown(d.percentile_scale)} and data.zscore "
                    "= True: choose one normalisation")
  if d.get("percentile_scale", ()) and d.zscore:
    raise DataError(f"config data.percentile_scale = {_shown(d.percentile_scale)} and data.zscore "
                    "= True: choose one normalisation")
  if d.on_device and d.foreground_oversample > 0:
    raise DataError(f"config data.foreground_oversample = {d.foreground_oversample} needs the host "
                    "pipeline: set data.on_device = False (the device crops never see the labels)")
  # The axes of the data, where the config alone says them.
  axes = {"synthetic": len(d.synthetic.shape), "la": 3, "folders2d": 2}.get(d.source)
  if axes is not None and len(d.patch_size) != axes:
    raise DataError(f"config data.patch_size = {_shown(d.patch_size)} has {len(d.patch_size)} "
                    f"entries, the data of data.source = {d.source!r} have {axes} axes")
  if d.source == "la" and d.num_classes != 2:
    raise DataError(f"config data.num_classes = {d.num_classes}, LA has 2 (background, atrium)")
  rule = d.get("validation", "last")
  if files and rule not in VALIDATION_RULES:
    file = pathlib.Path(rule).expanduser()
    if not file.is_absolute() and d.source in ROOT_SOURCES:
      file = data_root(d) / file
    if not file.is_file():
      raise DataError(f"config data.validation = {rule!r}: {file} is not a file (expected 'last', "
                      "'random' or a list file)")
  if files and d.source in ROOT_SOURCES:
    root = data_root(d)
    if d.source == "la" and not (root / d.list_name).is_file():
      raise DataError(f"config data.list_name = {d.list_name!r}: {root / d.list_name} is not "
                      "a file")


def data_root(d: ml_collections.ConfigDict) -> pathlib.Path:
  """The folder `data.root` of `d` (the data block), checked to exist.

  Raises:
    DataError: naming data.root, when it is empty or not a folder.
  """
  if not d.root:
    raise DataError(f"config data.root is empty: data.source = {d.source!r} needs the data "
                    "folder, e.g. --config.data.root=/path/to/data")
  root = pathlib.Path(d.root).expanduser()
  if not root.is_dir():
    raise DataError(f"config data.root = {d.root!r}: {root} is not a folder")
  return root


def _check_eval(e: ml_collections.ConfigDict, d: ml_collections.ConfigDict, files: bool) -> None:
  axes = len(d.patch_size)
  for key in ("patch_size", "strides"):
    if e[key] and len(e[key]) != axes:
      raise DataError(f"config eval.{key} = {_shown(e[key])} must have one entry per axis of "
                      f"data.patch_size = {_shown(d.patch_size)} (or be ())")
  if any(a >= axes for a in e.mirror_axes):
    raise DataError(f"config eval.mirror_axes = {_shown(e.mirror_axes)} must name axes of "
                    f"data.patch_size = {_shown(d.patch_size)}, 0 to {axes - 1}")
  for name, classes in e.regions:
    if max(classes) >= d.num_classes:
      raise DataError(f"config eval.regions: region {name!r} names classes {_shown(classes)}, "
                      f"beyond data.num_classes = {d.num_classes}")
  if e.case_list:
    if d.source != "la":
      raise DataError(f"config eval.case_list = {e.case_list!r}: evaluation lists are read from "
                      f"the data root of data.source = 'la', not {d.source!r} (use the "
                      "validation split)")
    if files and not (data_root(d) / e.case_list).is_file():
      raise DataError(f"config eval.case_list = {e.case_list!r}: "
                      f"{data_root(d) / e.case_list} is not a file")


# ---------------------------------------------------------------------------------------------------
# Command-line overrides.


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> Optional[str]:
  """Why the dotted `key` (of a `--config.<key>` override) names nothing in `config`, or None if
  it does: "unknown key train.stepz (did you mean train.num_steps?); the keys of train are ..."."""
  node, path = config, []
  for part in key.split("."):
    where = ".".join(path)
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)):
      return f"unknown key {key}: {where} is a value ({_shown(node)}), not a block of keys"
    if part not in node:
      keys = sorted(node.keys())
      close = difflib.get_close_matches(part, keys, n=1, cutoff=0.5)
      prefix = f"{where}." if where else ""
      hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
      block = f"the keys of {where}" if where else "the top-level keys"
      return f"unknown key {key}{hint}; {block} are {', '.join(keys)}"
    node, path = node[part], path + [part]
  return None
