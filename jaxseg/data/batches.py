"""Two-stream batches (docs/data.md, batches and augmentation): labeled samples first, then unlabeled ones.

- Labeled stream: each "epoch" is a fresh random permutation of the labeled cases cut into groups of
  `batch_labeled`; an odd leftover is dropped. With `labeled_groups = g` (Duo-SegNet's views
  X^1, X^2), the labeled list is cut into g contiguous parts and each batch takes
  `batch_labeled / g` samples from each part, in part order, every part with its own epochs.
- Unlabeled stream: an endless chain of independent permutations of the unlabeled cases, read
  `batch_unlabeled` at a time (a batch may straddle two permutations).
- Labels of unlabeled cases are never read: the unlabeled stream has no "label" field.
- Foreground oversampling (`foreground_oversample = f`, nnU-Net): the last labeled samples of each
  batch (`TwoStreamBatches.forced_foreground`) have their crop centred on a foreground voxel.
- Soft masks (`soft_labels`, data.soft_masks): the labeled stream's "label" is then the case's
  float32 soft mask in [0, 1], augmented and cropped like the image, instead of its class indices.
- Epochs (`epoch_length`, train.num_epochs): an epoch is the number of batches after which the
  shortest stream has gone once through its cases.

A batch is an open pytree, `Batch(labeled={...}, unlabeled={...})`: per stream a dict of arrays
with a leading sample axis, "image" (B, *patch, C) float32, "modality_mask" (B, C) bool (the
modalities each sample has), "label" (B, *patch) int32 in the labeled stream, and every per-voxel
field of the cases (`Case.fields`) cropped alike. The trainer shards and feeds it with
`jax.tree.map` and never names a field; a method reads the fields it needs.

Every batch is a pure function of (seed, step): the iterator's whole state is its step, so saving
`get_state()` with a checkpoint and calling `set_state()` on resume continues the exact sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Sequence

import flax.struct
import numpy as np

from jaxseg.data import augment
from jaxseg.data.base import Case, DataError

# Stream tags mixed into the seed so that the streams draw independent numbers.
_LABELED, _UNLABELED, _AUGMENT = 0, 1, 2


@flax.struct.dataclass
class Batch:
  """One training batch (a pytree): the labeled and the unlabeled samples, each a dict of arrays
  with a leading sample axis (module docstring). The unlabeled stream may have 0 samples."""

  labeled: dict[str, Any]
  unlabeled: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """The shapes of a data set's batches, without the data: what `zero_batch` needs (e.g. to
  initialise a method where no data are loaded, as `--mode predict`). JSON-serialisable.

  Attributes:
    patch_size: spatial crop size.
    channels: C, the modalities.
    fields: {name: (trailing shape, dtype name)} of the per-voxel `Case.fields`.
  """

  patch_size: tuple[int, ...]
  channels: int
  fields: dict[str, tuple[tuple[int, ...], str]] = dataclasses.field(default_factory=dict)

  @classmethod
  def of_case(cls, case: Case, patch_size: Sequence[int]) -> "BatchSpec":
    return cls(tuple(int(p) for p in patch_size), case.num_modalities,
               {name: (tuple(np.shape(a)[case.ndim:]), np.asarray(a).dtype.name)
                for name, a in case.fields.items()})

  def to_json(self) -> dict:
    return {"patch_size": list(self.patch_size), "channels": self.channels,
            "fields": {k: [list(shape), dtype] for k, (shape, dtype) in self.fields.items()}}

  @classmethod
  def from_json(cls, d: dict) -> "BatchSpec":
    return cls(tuple(d["patch_size"]), int(d["channels"]),
               {k: (tuple(shape), dtype) for k, (shape, dtype) in d.get("fields", {}).items()})

  def stream(self, num: int, labeled: bool) -> dict[str, np.ndarray]:
    """Zero arrays of one stream with `num` samples (all modalities present)."""
    patch = self.patch_size
    out = {"image": np.zeros((num, *patch, self.channels), np.float32),
           "modality_mask": np.ones((num, self.channels), bool)}
    if labeled:
      out["label"] = np.zeros((num, *patch), np.int32)
    for name, (trailing, dtype) in self.fields.items():
      out[name] = np.zeros((num, *patch, *trailing), dtype)
    return out


def zero_batch(spec: BatchSpec, batch_labeled: int, batch_unlabeled: int) -> Batch:
  """A batch of zeros with the shapes of `spec`'s batches: all `method.init` needs."""
  return Batch(labeled=spec.stream(batch_labeled, True),
               unlabeled=spec.stream(batch_unlabeled, False))


def stack_samples(samples: Sequence[dict], empty: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Samples (dicts of arrays) stacked per field; `empty` (the 0-sample stream) if there are none
  (B_u = 0, or another process's rows)."""
  if not samples:
    return empty
  return {name: np.stack([s[name] for s in samples]) for name in samples[0]}


def epoch_length(group_sizes: Sequence[int], per_group: int, num_unlabeled: int,
                 batch_unlabeled: int) -> int:
  """Batches in one epoch of two-stream batches: the shortest stream's passes over its cases.

  Args:
    group_sizes: the cases of each labeled part (one part without labeled_groups).
    per_group: labeled samples per part in a batch.
    num_unlabeled: the unlabeled cases.
    batch_unlabeled: unlabeled samples per batch (0: no unlabeled stream, not counted).

  Returns:
    min over the parts of floor(size / per_group), and floor(num_unlabeled / batch_unlabeled) when
    batch_unlabeled > 0; at least 1 is required.

  Raises:
    DataError: naming train.num_epochs, when a stream has fewer cases than one batch takes.
  """
  lengths = [size // per_group for size in group_sizes]
  if batch_unlabeled:
    lengths.append(num_unlabeled // batch_unlabeled)
  length = min(lengths)
  if length < 1:
    raise DataError(f"config train.num_epochs: a stream has fewer cases than one batch takes "
                    f"(labeled parts {list(group_sizes)} at {per_group} per batch, {num_unlabeled} "
                    f"unlabeled at {batch_unlabeled}): an epoch would have no batch")
  return length


def _check_stream(cases: Sequence[Case], name: str, ndim: int, channels: int,
                  fields: dict, need_labels: bool) -> None:
  for case in cases:
    if case.ndim != ndim or case.num_modalities != channels:
      raise DataError(f"{case.source}: case {case.case_id!r} in the {name} set has shape "
                      f"{case.image.shape}, the others have {ndim} spatial axes and "
                      f"{channels} channel(s)")
    if need_labels and case.label is None:
      raise DataError(f"{case.source}: case {case.case_id!r} is in the labeled set but has no label")
    have = {k: (tuple(np.shape(a)[ndim:]), np.asarray(a).dtype.name) for k, a in case.fields.items()}
    if have != fields:
      raise DataError(f"{case.source}: case {case.case_id!r} in the {name} set has fields {have}, "
                      f"the others have {fields} (every case needs the same fields)")


def _foreground_voxel(label: np.ndarray, rng: np.random.Generator) -> Optional[tuple[int, ...]]:
  """A voxel of `label`: a class uniformly among the classes > 0 present, then one of its voxels
  uniformly (two draws from `rng`); None, with nothing drawn, when there is no foreground."""
  flat = np.asarray(label).reshape(-1)
  counts = np.bincount(flat)
  classes = np.flatnonzero(counts[1:]) + 1
  if not classes.size:
    return None
  c = classes[int(rng.integers(0, classes.size))]
  voxels = np.flatnonzero(flat == c)
  v = voxels[int(rng.integers(0, voxels.size))]
  return tuple(int(i) for i in np.unravel_index(v, np.shape(label)))


class TwoStreamBatches(Iterator[Batch]):
  """Endless deterministic iterator of augmented two-stream batches.

  Args:
    labeled: labeled cases (each with a label).
    unlabeled: unlabeled cases (their labels, if any, are ignored).
    batch_labeled: labeled samples per batch (B_l).
    batch_unlabeled: unlabeled samples per batch (B_u, may be 0).
    patch_size: spatial size of the crops.
    seed: the data seed; batch t depends only on (seed, t).
    augment: rotate/flip before cropping (docs/data.md); crops are always taken.
    pad_to_patch: zero-pad volumes not larger than the patch (reference rule), else raise.
    labeled_groups: number of contiguous parts of the labeled list, sampled side by side.
    foreground_oversample: f in [0, 1], the fraction of the labeled samples whose crop is centred on
      a foreground voxel (nnU-Net: 0.33); which ones, `forced_foreground`; how, `_sample`.
    soft_labels: one float32 (*spatial,) soft mask per labeled case (same order), the labeled
      stream's targets in place of the labels; None: the labels.
  """

  def __init__(self, labeled: Sequence[Case], unlabeled: Sequence[Case], *, batch_labeled: int,
               batch_unlabeled: int, patch_size: Sequence[int], seed: int, augment: bool = True,
               pad_to_patch: bool = True, labeled_groups: int = 1,
               foreground_oversample: float = 0.0,
               soft_labels: Optional[Sequence[np.ndarray]] = None):
    if not labeled:
      raise DataError("config data.num_labeled: the labeled set is empty")
    if batch_labeled < 1:
      raise DataError(f"config data.batch_labeled must be >= 1, got {batch_labeled}")
    if batch_labeled > len(labeled):
      raise DataError(f"config data.batch_labeled = {batch_labeled} exceeds the {len(labeled)} "
                      "labeled cases")
    if labeled_groups < 1 or batch_labeled % labeled_groups:
      raise DataError(f"config data.labeled_groups = {labeled_groups} must be >= 1 and divide "
                      f"data.batch_labeled = {batch_labeled}")
    per_group = batch_labeled // labeled_groups
    self.groups = [g for g in np.array_split(np.arange(len(labeled)), labeled_groups)]
    if min(len(g) for g in self.groups) < per_group:
      raise DataError(f"config data.labeled_groups = {labeled_groups}: {len(labeled)} labeled "
                      f"cases give a part smaller than {per_group} samples per batch")
    if not 0.0 <= foreground_oversample <= 1.0:
      raise DataError(f"config data.foreground_oversample = {foreground_oversample} must be in "
                      "[0, 1]")
    if batch_unlabeled < 0:
      raise DataError(f"config data.batch_unlabeled must be >= 0, got {batch_unlabeled}")
    if batch_unlabeled > 0 and not unlabeled:
      raise DataError(f"config data.batch_unlabeled = {batch_unlabeled} but the unlabeled set is "
                      "empty")
    ndim, channels = labeled[0].ndim, labeled[0].num_modalities
    if len(patch_size) != ndim:
      raise DataError(f"config data.patch_size {tuple(patch_size)} has {len(patch_size)} axes, "
                      f"the data have {ndim}")
    self.spec = BatchSpec.of_case(labeled[0], patch_size)
    _check_stream(labeled, "labeled", ndim, channels, self.spec.fields, need_labels=True)
    _check_stream(unlabeled, "unlabeled", ndim, channels, self.spec.fields, need_labels=False)
    self.labeled = tuple(labeled)
    self.unlabeled = tuple(unlabeled) if batch_unlabeled else ()
    self.batch_labeled = batch_labeled
    self.batch_unlabeled = batch_unlabeled
    self.patch_size = tuple(int(p) for p in patch_size)
    self.seed = int(seed)
    self.augment = augment
    self.pad_to_patch = pad_to_patch
    self.channels = channels
    self.foreground_oversample = float(foreground_oversample)
    if soft_labels is not None:
      if len(soft_labels) != len(labeled):
        raise ValueError(f"{len(soft_labels)} soft labels for {len(labeled)} labeled cases")
      if self.foreground_oversample:
        raise DataError("config data.soft_masks = True and data.foreground_oversample > 0: "
                        "foreground crops need class labels; set one of them off")
      for case, soft in zip(labeled, soft_labels):
        if np.shape(soft) != case.spatial_shape:
          raise DataError(f"{case.source}: soft mask {np.shape(soft)} and image "
                          f"{case.spatial_shape} differ")
    self.soft_labels = None if soft_labels is None else tuple(
        np.asarray(s, np.float32) for s in soft_labels)
    self.step = 0

  def epoch_length(self) -> int:
    """Batches per epoch: min over the labeled parts of floor(|part| / samples per part) and, with
    an unlabeled stream, floor(|U| / batch_unlabeled). With one sample per stream and part this is
    min(|X^1|, |X^2|, |U|), the released Duo-SegNet epoch (its loaders zipped, batch size 1)."""
    return epoch_length([len(g) for g in self.groups], self.batch_labeled // len(self.groups),
                        len(self.unlabeled), self.batch_unlabeled)

  # --- which cases go into batch `step` -------------------------------------------------------

  def labeled_indices(self, step: int) -> np.ndarray:
    """Indices into `labeled` of batch `step`: per part, a slice of that part's epoch permutation."""
    per_group = self.batch_labeled // len(self.groups)
    picked = []
    for part, members in enumerate(self.groups):
      epoch, slot = divmod(step, len(members) // per_group)
      order = np.random.default_rng([self.seed, _LABELED, part, epoch]).permutation(len(members))
      picked.append(members[order[slot * per_group:(slot + 1) * per_group]])
    return np.concatenate(picked)

  def unlabeled_indices(self, step: int) -> np.ndarray:
    """Indices into `unlabeled` of batch `step`: positions in the endless permutation chain."""
    n = len(self.unlabeled)
    positions = step * self.batch_unlabeled + np.arange(self.batch_unlabeled)
    out = np.empty(self.batch_unlabeled, np.int64)
    for block in np.unique(positions // n) if n else ():
      order = np.random.default_rng([self.seed, _UNLABELED, int(block)]).permutation(n)
      here = positions // n == block
      out[here] = order[positions[here] % n]
    return out

  # --- sample preparation ---------------------------------------------------------------------

  def forced_foreground(self, slot: int) -> bool:
    """Whether labeled sample `slot` (0-based in the batch's labeled stream, over all processes) is
    centred on a foreground voxel: nnU-Net v1's `get_do_oversample`, i.e.
    `slot >= round(batch_labeled * (1 - foreground_oversample))`, the last ones of the batch.

    Python's `round` rounds halves to even (round(0.5) = 0, round(1.5) = 2, round(2.5) = 2), as in
    nnU-Net; so f = 0.5 with B_l = 1 forces the single sample, with B_l = 5 forces 3 of the 5.
    With f = 0.33: B_l = 1 none, 2 -> slot 1, 3 -> slot 2, 4 -> slot 3, 12 -> slots 8..11.
    """
    if not self.foreground_oversample:
      return False
    return slot >= round(self.batch_labeled * (1.0 - self.foreground_oversample))

  def sample_rng(self, step: int, slot: int) -> np.random.Generator:
    """The generator of the augmentation draws of sample `slot` (labeled first) of batch `step`."""
    return np.random.default_rng([self.seed, _AUGMENT, step, slot])

  def _sample(self, case: Case, step: int, slot: int, with_label: bool,
              soft_label: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """One sample: the case's image, label (if `with_label`) and fields, rotated, flipped and
    cropped alike, and its modality mask.

    A labeled sample that `forced_foreground` names is cropped around a foreground voxel of its
    (augmented) label: after the rotation/flip draws, a class uniformly among the classes > 0
    present, then one voxel of that class uniformly, both from the sample's generator; the crop
    puts that voxel at index patch // 2, clamped to the (padded) volume. A label without foreground
    falls back to the uniform crop, drawing what an unforced sample draws.

    With `soft_label` (float32, the case's soft mask), "label" is that mask, transformed alike.
    """
    rng = self.sample_rng(step, slot)
    arrays = {"image": case.image}
    if with_label:
      arrays["label"] = case.label if soft_label is None else soft_label
    arrays.update(case.fields)
    if self.augment:
      k, axis = augment.draw_rot_flip(rng)
      arrays = {name: augment.rot_flip(a, k, axis) for name, a in arrays.items()}
    centre = None
    if with_label and self.forced_foreground(slot):
      centre = _foreground_voxel(arrays["label"], rng)
    arrays = augment.random_crop_arrays(arrays, self.patch_size, rng, pad=self.pad_to_patch,
                                        source=case.source, centre=centre)
    arrays["image"] = arrays["image"].astype(np.float32, copy=False)
    if with_label:
      arrays["label"] = arrays["label"].astype(np.int32 if soft_label is None else np.float32,
                                               copy=False)
    arrays["modality_mask"] = case.present
    return arrays

  def batch_at(self, step: int, labeled_rows: Optional[tuple[int, int]] = None,
               unlabeled_rows: Optional[tuple[int, int]] = None) -> Batch:
    """The batch number `step` (0-based); a pure function of (seed, step).

    `labeled_rows` / `unlabeled_rows` = (first, last) prepare only those rows of each stream (the
    share of one process in a multi-process run); by default all of them.
    """
    first_l, last_l = labeled_rows or (0, self.batch_labeled)
    first_u, last_u = unlabeled_rows or (0, self.batch_unlabeled)
    labeled = [self._sample(self.labeled[i], step, slot, with_label=True,
                            soft_label=None if self.soft_labels is None else self.soft_labels[i])
               for slot, i in enumerate(self.labeled_indices(step)) if first_l <= slot < last_l]
    unlabeled = [self._sample(self.unlabeled[i], step, self.batch_labeled + slot, False)
                 for slot, i in enumerate(self.unlabeled_indices(step)) if first_u <= slot < last_u]
    return Batch(labeled=stack_samples(labeled, self.spec.stream(0, labeled=True)),
                 unlabeled=stack_samples(unlabeled, self.spec.stream(0, labeled=False)))

  # --- iterator protocol and exact resume -----------------------------------------------------

  def __next__(self) -> Batch:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def __iter__(self) -> "TwoStreamBatches":
    return self

  def get_state(self) -> dict:
    """The iterator position, to store with a checkpoint."""
    return {"step": self.step, "seed": self.seed}

  def set_state(self, state: dict) -> None:
    """Continues from a position saved by `get_state` (same data and seed)."""
    if int(state["seed"]) != self.seed:
      raise DataError(f"data iterator state was saved with seed {state['seed']}, this run uses "
                      f"seed {self.seed} (config data.seed)")
    self.step = int(state["step"])
