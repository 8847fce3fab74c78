"""From `config.data` to checked cases, a split and batches: the one boundary between configs and data.

Every config holds a `data` block made by `config_blocks.data_block()` (and checked, before any
data is read, by `config_blocks.check_config`); `load_dataset(config.data)` reads the named source,
preprocesses, splits (labeled = first N, validation = last K, unlabeled = the rest; docs/data.md, splits)
and drops the labels of the unlabeled cases; `make_batches` builds the two-stream iterator. Errors
name the config key (`data.root`, `data.source`, ...) or the file.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

import ml_collections
import numpy as np

from jaxseg import config_blocks
from jaxseg.data import folders2d, la, msd, preprocess, synthetic
from jaxseg.data.base import Case, DataError
from jaxseg.data.batches import TwoStreamBatches
from jaxseg.data.splits import VALIDATION_RULES, Split, make_split

# data.source values (the data block and its checks live in jaxseg/config_blocks.py).
SOURCES = config_blocks.SOURCES


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The cases of one run, by role. Unlabeled cases carry no label."""

  split: Split
  labeled: tuple[Case, ...]
  unlabeled: tuple[Case, ...]
  validation: tuple[Case, ...]
  num_classes: int
  # data.soft_masks: the soft mask of each labeled case (same order), the training targets; None:
  # the labels are.
  soft_labels: Optional[tuple[np.ndarray, ...]] = None


def load_cases(cfg: ml_collections.ConfigDict) -> list[Case]:
  """All cases of the configured source, in list order, checked, reduced to the channels of
  `data.modalities` (when set) and preprocessed."""
  return preprocess.normalised(read_cases(cfg), cfg)


def read_cases(cfg: ml_collections.ConfigDict) -> list[Case]:
  """`load_cases` before the intensity preprocessing: the images as stored (the per-case analysis
  describes them so)."""
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
    cases = la.load_la(config_blocks.data_root(cfg), cfg.list_name)
  elif cfg.source == "msd":
    root = config_blocks.data_root(cfg)
    manifest = msd.read_msd_manifest(root)
    if cfg.num_classes != manifest.num_classes:
      raise DataError(f"config data.num_classes = {cfg.num_classes}, but {root}/dataset.json "
                      f"declares {manifest.num_classes} labels")
    cases = msd.load_msd(root)
  else:
    cases = folders2d.load_folder2d(config_blocks.data_root(cfg), size=cfg.image_size or None,
                                    num_classes=cfg.num_classes, channels=cfg.channels or None)
  return preprocess.selected_modalities(cases, cfg)


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
  rule = cfg.get("validation", "last")
  validation_ids = None
  if rule not in VALIDATION_RULES:
    validation_ids = _validation_file_ids(cfg, rule)
  split = make_split([c.case_id for c in cases], num_labeled, num_validation, key=key,
                     validation=rule, validation_seed=int(cfg.get("validation_seed", 0)),
                     validation_ids=validation_ids)
  by_id = {c.case_id: c for c in cases}
  labeled = tuple(by_id[i] for i in split.labeled)
  # Labels of unlabeled cases are dropped here, so no loss can ever see them.
  unlabeled = tuple(by_id[i].replace(label=None) for i in split.unlabeled)
  validation = tuple(by_id[i] for i in split.validation)
  soft_labels = None
  if cfg.get("soft_masks", False):
    soft_labels = tuple(soft_mask(cfg, c) for c in labeled)
    # Every label (the scored ground truth included) is its soft mask > 0.5.
    labeled = tuple(c.replace(label=(s > 0.5).astype(np.uint8))
                    for c, s in zip(labeled, soft_labels))
    validation = tuple(c.replace(label=(soft_mask(cfg, c) > 0.5).astype(np.uint8))
                       for c in validation)
  if cfg.get("input", preprocess.GRAYSCALE) == preprocess.RGB_IMAGENET:
    # Training images only: validation (and test, predict) images stay in [0, 1], as released.
    labeled = tuple(preprocess.imagenet_normalised(c) for c in labeled)
    unlabeled = tuple(preprocess.imagenet_normalised(c) for c in unlabeled)
  return Dataset(split=split, labeled=labeled, unlabeled=unlabeled, validation=validation,
                 num_classes=cfg.num_classes, soft_labels=soft_labels)


def soft_mask(cfg: ml_collections.ConfigDict, case: Case) -> np.ndarray:
  """The soft mask (*spatial,) float32 in [0, 1] of a binary labeled `case` (data.soft_masks): for
  2D folders its mask file resized bilinearly to data.image_size (`folders2d.soft_mask`); for the
  other sources, which are not resized, its label as 0.0 / 1.0."""
  if cfg.source == "folders2d":
    return folders2d.soft_mask(config_blocks.data_root(cfg), case.case_id,
                               tuple(cfg.image_size) or None)
  return np.asarray(case.label, np.float32)


def validation_file(cfg: ml_collections.ConfigDict, path: str) -> pathlib.Path:
  """The list file named by `data.validation`: an absolute path as it is, a relative one under
  `data.root` when the source reads one, else under the working directory."""
  file = pathlib.Path(path).expanduser()
  if file.is_absolute() or cfg.source not in config_blocks.ROOT_SOURCES or not cfg.root:
    return file
  return pathlib.Path(cfg.root).expanduser() / file


def _validation_file_ids(cfg: ml_collections.ConfigDict, path: str) -> list[str]:
  file = validation_file(cfg, path)
  try:
    return la.read_case_list(file)
  except DataError as e:
    raise DataError(f"config data.validation = {path!r}: {e}") from None


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
  root = config_blocks.data_root(cfg)
  cases = preprocess.configured_cases(la.load_la(root, case_list), cfg)
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
                          labeled_groups=cfg.labeled_groups,
                          foreground_oversample=cfg.foreground_oversample,
                          soft_labels=dataset.soft_labels)
