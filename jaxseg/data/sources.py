"""From `config.data` to checked cases, a split and batches: the one boundary between configs and data.

Every config holds a `data` block made by `data_config()`; `load_dataset(config.data)` reads the
named source, preprocesses, splits (labeled = first N, validation = last K, unlabeled = the rest,
METHODS.md §1.2) and drops the labels of the unlabeled cases; `make_batches` builds the two-stream
iterator. Errors name the config key (`data.root`, `data.source`, ...) or the file.
"""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections

from jaxseg.data import folders2d, la, msd, preprocess, synthetic
from jaxseg.data.base import Case, DataError
from jaxseg.data.batches import TwoStreamBatches
from jaxseg.data.splits import Split, make_split

SOURCES = ("synthetic", "la", "msd", "folders2d")


def data_config(source: str = "synthetic") -> ml_collections.ConfigDict:
  """The `data` block of every config, with the defaults of the embedded synthetic data."""
  c = ml_collections.ConfigDict()
  c.source = source  # One of SOURCES.
  c.root = ""  # Data folder of la / msd / folders2d (a flag: never hard-coded).
  c.list_name = "train.list"  # la: the list to split (file order matters).
  c.num_classes = 2  # Including background.
  c.num_labeled = 4  # Labeled = the first N cases of the list...
  c.labeled_fraction = 0.0  # ...or, when > 0, this fraction of the training pool.
  c.num_validation = 4  # Validation = the last K cases of the list...
  c.validation_fraction = 0.0  # ...or, when > 0, this fraction of the list (rounded).
  c.batch_labeled = 2
  c.labeled_groups = 1  # Contiguous parts of the labeled list sampled side by side (Duo: 2 views).
  c.batch_unlabeled = 2
  c.patch_size = (48, 48, 32)
  c.seed = 0  # Order of batches and augmentation draws.
  c.augment = True  # Rotate/flip before cropping (METHODS.md §1.4).
  c.pad_to_patch = True  # Zero-pad volumes not larger than the patch (reference rule).
  # Keep the training volumes on the devices and cut the crops inside the jitted step (the same
  # batches as the host pipeline, bit for bit; data/device_crops.py). Needs them to fit in memory.
  c.on_device = False
  c.clip_percentiles = ()  # (lower, upper) percentiles per modality, () for no clipping.
  c.zscore = False  # z-score per modality after clipping.
  # The synthetic data's own seed: changing the run's `seed` keeps the same data.
  c.synthetic = ml_collections.ConfigDict(dict(
      seed=0, num_cases=24, shape=(64, 64, 48), num_modalities=1, layout="adjacent", noise=0.1, bias=0.2,
      num_distractors=3))
  c.image_size = ()  # folders2d: (H, W) to resize to, () keeps the file size.
  c.channels = 0  # folders2d: 1 or 3 to force, 0 keeps the file's channels.
  return c


PROTOCOLS = ("synthetic3d", "synthetic2d", "la")


def protocol_data_config(protocol: str) -> ml_collections.ConfigDict:
  """The `data` block of a named data protocol, shared by every method's configs.

  - "synthetic3d": 24 synthetic 64x64x48 volumes, labeled = first 4, validation = last 4.
  - "synthetic2d": 100 synthetic 128x128 images, labeled = first 10, validation = last 20, 96x96 crops.
  - "la": LA 2018 (METHODS.md §1): labeled = first 8 of train.list, validation = last 8,
    112x112x80 crops, 2 + 2 per batch; the data root is given with --config.data.root.
  """
  c = data_config()
  if protocol == "synthetic3d":
    c.patch_size = (32, 32, 32)
  elif protocol == "synthetic2d":
    c.synthetic.shape = (128, 128)
    c.synthetic.num_cases = 100
    c.num_labeled, c.num_validation = 10, 20
    c.patch_size = (96, 96)
  elif protocol == "la":
    c.source = "la"
    c.num_labeled, c.num_validation = 8, 8
    c.patch_size = (112, 112, 80)
  else:
    raise ValueError(f"unknown data protocol {protocol!r}, expected one of {PROTOCOLS}")
  return c


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The cases of one run, by role. Unlabeled cases carry no label."""

  split: Split
  labeled: tuple[Case, ...]
  unlabeled: tuple[Case, ...]
  validation: tuple[Case, ...]
  num_classes: int


def _root(cfg: ml_collections.ConfigDict) -> pathlib.Path:
  if not cfg.root:
    raise DataError(f"config data.root is empty: data.source = {cfg.source!r} needs the data "
                    "folder, e.g. --config.data.root=/path/to/data")
  root = pathlib.Path(cfg.root).expanduser()
  if not root.is_dir():
    raise DataError(f"config data.root: {root} is not a folder")
  return root


def load_cases(cfg: ml_collections.ConfigDict) -> list[Case]:
  """All cases of the configured source, in list order, checked and preprocessed."""
  if cfg.source not in SOURCES:
    raise DataError(f"config data.source = {cfg.source!r} is not one of {SOURCES}")
  if cfg.source == "synthetic":
    options = cfg.synthetic.to_dict()
    num_cases, seed = options.pop("num_cases"), options.pop("seed")
    spec = synthetic.SyntheticSpec(num_classes=cfg.num_classes, **options)
    cases = synthetic.make_cases(spec, num_cases, seed=seed)
  elif cfg.source == "la":
    if cfg.num_classes != la.NUM_CLASSES:
      raise DataError(f"config data.num_classes = {cfg.num_classes}, LA has {la.NUM_CLASSES}")
    cases = la.load_la(_root(cfg), cfg.list_name)
  elif cfg.source == "msd":
    root = _root(cfg)
    manifest = msd.read_msd_manifest(root)
    if cfg.num_classes != manifest.num_classes:
      raise DataError(f"config data.num_classes = {cfg.num_classes}, but {root}/dataset.json "
                      f"declares {manifest.num_classes} labels")
    cases = msd.load_msd(root)
  else:
    cases = folders2d.load_folder2d(_root(cfg), size=cfg.image_size or None,
                                    num_classes=cfg.num_classes, channels=cfg.channels or None)
  return _preprocessed(cfg, cases)


def _preprocessed(cfg: ml_collections.ConfigDict, cases: list[Case]) -> list[Case]:
  """`cases` clipped and z-scored as `cfg` says (unchanged when it says neither)."""
  if not (cfg.clip_percentiles or cfg.zscore):
    return cases
  clip = tuple(cfg.clip_percentiles) or None
  return [preprocess.preprocess_case(c, clip=clip, zscore=cfg.zscore) for c in cases]


def load_dataset(cfg: ml_collections.ConfigDict) -> Dataset:
  """Loads, splits and returns the cases of `cfg` (the config's `data` block)."""
  cases = load_cases(cfg)
  if cfg.labeled_fraction:
    num_labeled, key = float(cfg.labeled_fraction), "data.labeled_fraction"
  else:
    num_labeled, key = int(cfg.num_labeled), "data.num_labeled"
  num_validation = cfg.num_validation
  if cfg.validation_fraction:
    if not 0.0 < cfg.validation_fraction < 1.0:
      raise DataError(f"config data.validation_fraction must be in (0, 1), got "
                      f"{cfg.validation_fraction}")
    num_validation = int(round(cfg.validation_fraction * len(cases)))
  split = make_split([c.case_id for c in cases], num_labeled, num_validation, key=key)
  by_id = {c.case_id: c for c in cases}
  return Dataset(
      split=split,
      labeled=tuple(by_id[i] for i in split.labeled),
      # Labels of unlabeled cases are dropped here, so no loss can ever see them.
      unlabeled=tuple(by_id[i].replace(label=None) for i in split.unlabeled),
      validation=tuple(by_id[i] for i in split.validation),
      num_classes=cfg.num_classes)


def load_evaluation_cases(cfg: ml_collections.ConfigDict, case_list: str,
                          dataset: Dataset) -> tuple[Case, ...]:
  """The cases of the list file `case_list` under `cfg.root` (e.g. LA's "test.list"), preprocessed as
  the training cases, for evaluation in place of the validation split (`eval.case_list`).

  Raises:
    DataError: the source has no case lists, the list or a case is missing, or a listed case is also
      a training case (labeled or unlabeled) of `dataset` -- evaluating on it would leak.
  """
  if cfg.source != "la":
    raise DataError(f"config eval.case_list = {case_list!r}: evaluation lists are read from the data "
                    f"root of data.source = 'la', not {cfg.source!r} (use the validation split)")
  root = _root(cfg)
  cases = _preprocessed(cfg, la.load_la(root, case_list))
  training = set(dataset.split.labeled) | set(dataset.split.unlabeled)
  leaked = sorted(c.case_id for c in cases if c.case_id in training)
  if leaked:
    raise DataError(f"config eval.case_list: {root / case_list} lists training cases {leaked[:5]} "
                    f"({len(leaked)} in all); an evaluation list must be disjoint from training")
  return tuple(cases)


def make_batches(dataset: Dataset, cfg: ml_collections.ConfigDict) -> TwoStreamBatches:
  """The two-stream training iterator of `dataset` as configured by `cfg` (the `data` block)."""
  return TwoStreamBatches(dataset.labeled, dataset.unlabeled, batch_labeled=cfg.batch_labeled,
                          batch_unlabeled=cfg.batch_unlabeled, patch_size=tuple(cfg.patch_size),
                          seed=cfg.seed, augment=cfg.augment, pad_to_patch=cfg.pad_to_patch,
                          labeled_groups=cfg.labeled_groups)
