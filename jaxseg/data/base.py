"""What every data source yields: a `Case`, and the one error type for bad input.

Arrays are channels-last. A 3D case has image (X, Y, Z, C) and label (X, Y, Z); a 2D case has image
(H, W, C) and label (H, W). The channel axis holds modalities (1 for LA, 4 for BraTS, 3 for RGB).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping, Optional, Sequence, Union

import numpy as np


class DataError(ValueError):
  """Bad input data. The message always names the offending file or config key."""


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """One image (2D) or volume (3D) with its label map.

  Attributes:
    case_id: identifier (LA: the folder name; MSD: the file stem; 2D folders: the file stem).
    image: float32 array (*spatial, C), channels-last, C = number of modalities.
    label: integer array (*spatial,) of class indices, or None for unlabeled data.
    spacing: voxel size per spatial axis, in mm (1.0 when the format has none, e.g. LA h5).
    affine: 4x4 voxel-to-world matrix for NIfTI sources (kept to write predictions back), else None.
    source: path of the file the case came from; named in every error about it.
    modalities: the name of each channel of `image` (e.g. ("flair", "t1", "t1ce", "t2")); () means
      unnamed (`modality_names` then says "channel0", ...).
    modality_mask: (C,) bool, which channels were acquired; None = all of them. A missing
      modality's channel holds zeros; methods read the mask from the batch ("modality_mask").
    fields: further per-voxel arrays of the case, each (*spatial, ...) (e.g. a prior map). They are
      inputs, not targets: batches, crops and the sliding window carry them beside "image" under
      their own names, for labeled and unlabeled cases alike.
  """

  case_id: str
  image: np.ndarray
  label: Optional[np.ndarray]
  spacing: tuple[float, ...]
  affine: Optional[np.ndarray] = None
  source: str = "<memory>"
  modalities: tuple[str, ...] = ()
  modality_mask: Optional[np.ndarray] = None
  fields: Mapping[str, np.ndarray] = dataclasses.field(
      default_factory=lambda: types.MappingProxyType({}))

  @property
  def spatial_shape(self) -> tuple[int, ...]:
    return tuple(self.image.shape[:-1])

  @property
  def ndim(self) -> int:
    """Number of spatial dimensions (2 or 3)."""
    return self.image.ndim - 1

  @property
  def num_modalities(self) -> int:
    return self.image.shape[-1]

  @property
  def modality_names(self) -> tuple[str, ...]:
    """The channels' names: `modalities`, or "channel0", "channel1", ... when unnamed."""
    return self.modalities or tuple(f"channel{i}" for i in range(self.num_modalities))

  @property
  def present(self) -> np.ndarray:
    """(C,) bool: which modalities the case has (`modality_mask`, all True when None)."""
    if self.modality_mask is None:
      return np.ones(self.num_modalities, bool)
    return np.asarray(self.modality_mask, bool)

  def replace(self, **changes) -> "Case":
    return dataclasses.replace(self, **changes)


def check_case(case: Case, num_classes: Optional[int] = None) -> Case:
  """Checks a case at the loading boundary; raises one `DataError` naming `case.source`.

  Checks: image is (*spatial, C) with 2 or 3 spatial axes; intensities are finite; the label (if any)
  has the image's spatial shape and integer values in [0, num_classes).
  """
  where = f"{case.source} (case {case.case_id!r})"
  if case.image.ndim not in (3, 4):
    raise DataError(
        f"{where}: image must be (H, W, C) or (X, Y, Z, C), got shape {case.image.shape}")
  if not np.issubdtype(case.image.dtype, np.floating):
    raise DataError(f"{where}: image must be floating point, got {case.image.dtype}")
  if not np.all(np.isfinite(case.image)):
    bad = int(np.size(case.image) - np.count_nonzero(np.isfinite(case.image)))
    raise DataError(f"{where}: image has {bad} NaN/inf intensities")
  if len(case.spacing) != case.ndim:
    raise DataError(f"{where}: spacing {case.spacing} does not have {case.ndim} entries")
  if case.modalities and len(case.modalities) != case.num_modalities:
    raise DataError(f"{where}: {len(case.modalities)} modality names {case.modalities} for "
                    f"{case.num_modalities} channel(s)")
  if case.modality_mask is not None:
    mask = np.asarray(case.modality_mask)
    if mask.shape != (case.num_modalities,) or mask.dtype != bool or not mask.any():
      raise DataError(f"{where}: modality_mask must be ({case.num_modalities},) bool with at least "
                      f"one modality present, got {mask.dtype} {mask.shape} {mask.tolist()}")
  for name, field in case.fields.items():
    if name in ("image", "label", "modality_mask"):
      raise DataError(f"{where}: field name {name!r} is reserved")
    if tuple(np.shape(field)[:case.ndim]) != case.spatial_shape:
      raise DataError(f"{where}: field {name!r} has shape {np.shape(field)}, not the image's "
                      f"spatial shape {case.spatial_shape} first")
  if case.label is not None:
    if tuple(case.label.shape) != case.spatial_shape:
      raise DataError(f"{where}: image shape {case.spatial_shape} and label shape "
                      f"{tuple(case.label.shape)} differ")
    if np.issubdtype(case.label.dtype, np.floating):
      if not np.all(np.isfinite(case.label)) or np.any(case.label != np.round(case.label)):
        raise DataError(f"{where}: label has non-integer values")
    if num_classes is not None:
      lo, hi = (int(case.label.min()), int(case.label.max())) if case.label.size else (0, 0)
      if lo < 0 or hi >= num_classes:
        found = np.unique(case.label)
        outside = found[(found < 0) | (found >= num_classes)]
        raise DataError(f"{where}: label values {outside.tolist()} are outside the declared "
                        f"classes 0..{num_classes - 1}")
  return case


def resolve_modalities(selection: Sequence[Union[str, int]], names: Sequence[str],
                       key: str) -> tuple[int, ...]:
  """The channel indices of `selection`: each entry a modality name (matched case-insensitively
  against `names`, the channels' names) or a channel index (an int, or a string of digits).

  Args:
    selection: e.g. ("flair", "T1") or (0, 2) or ("0", "2"); must be non-empty and distinct.
    names: the channels' names, e.g. `Case.modality_names`.
    key: the config key named in errors (e.g. "data.modalities").

  Raises:
    DataError: naming `key` for an unknown name, an index out of range, a repeated channel or an
      empty selection.
  """
  if not len(selection):
    raise DataError(f"config {key}: no modality selected; the channels are {tuple(names)}")
  lower = [n.lower() for n in names]
  indices = []
  for entry in selection:
    if isinstance(entry, str) and not entry.strip().isdigit():
      if entry.strip().lower() not in lower:
        raise DataError(f"config {key}: unknown modality {entry!r}; the channels are "
                        f"{tuple(names)} (names or indices 0..{len(names) - 1})")
      indices.append(lower.index(entry.strip().lower()))
    else:
      index = int(entry)
      if not 0 <= index < len(names):
        raise DataError(f"config {key}: channel index {index} is out of range; the channels are "
                        f"{tuple(names)} (indices 0..{len(names) - 1})")
      indices.append(index)
  if len(set(indices)) != len(indices):
    raise DataError(f"config {key}: {tuple(selection)} names a channel twice; the channels are "
                    f"{tuple(names)}")
  return tuple(indices)


def select_modalities(case: Case, indices: Sequence[int]) -> Case:
  """`case` with only the channels `indices` (e.g. from `resolve_modalities`), in that order.

  The image, the channel names and the modality mask are selected alike. The names are always set:
  an unnamed case keeps its default names ("channel2" stays "channel2"), so that they still say
  which channel of the source each one was. Label, spacing, affine and fields are unchanged.

  Raises:
    DataError: naming `case.source` and the case: an empty selection, an index out of range, or
      none of the selected modalities present in the case (`modality_mask`).
  """
  where = f"{case.source} (case {case.case_id!r})"
  indices = [int(i) for i in indices]
  names = case.modality_names
  if not indices:
    raise DataError(f"{where}: no modality selected; the channels are {names}")
  bad = [i for i in indices if not 0 <= i < case.num_modalities]
  if bad:
    raise DataError(f"{where}: channel indices {bad} are out of range; the case has "
                    f"{case.num_modalities} channel(s) {names}")
  selected = tuple(names[i] for i in indices)
  mask = None
  if case.modality_mask is not None:
    mask = np.asarray(case.modality_mask, bool)[indices]
    if not mask.any():
      raise DataError(f"{where}: none of the selected modalities {selected} is present in the "
                      f"case (present: {tuple(n for n, p in zip(names, case.present) if p)})")
  return case.replace(image=np.ascontiguousarray(case.image[..., indices]), modalities=selected,
                      modality_mask=mask)
