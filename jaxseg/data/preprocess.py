"""Intensity preprocessing per modality: percentile clipping and z-scoring.

Statistics are taken per channel (modality) over the whole image or volume, background included,
unless `nonzero` z-scoring is asked for: then over the voxels where some modality is non-zero
(holes filled), the rest set to 0, as nnU-Net normalises MR (BraTS' skull-stripped volumes). LA is
already z-scored by its preprocessing (docs/la_protocol.md) and does not need this; it is meant
for MSD / BraTS-like NIfTI sources.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import scipy.ndimage

from jaxseg.data import intensity
from jaxseg.data.base import Case, DataError, resolve_modalities, select_modalities


def clip_percentiles(image: np.ndarray, lower: float = 0.5, upper: float = 99.5,
                     source: str = "<memory>") -> np.ndarray:
  """Clips each channel to its own [lower, upper] percentiles.

  Percentiles are computed over all voxels of the whole volume of that channel (numpy's default
  linear interpolation), background included.

  Args:
    image: (*spatial, C) intensities.
    lower: lower percentile, in [0, 100].
    upper: upper percentile, in [lower, 100].
    source: named in error messages (the file the image came from).

  Returns:
    A new float32 array of the same shape; the input is not modified.

  Raises:
    DataError: the percentiles are out of order or range (naming `clip`), or the image has NaN/inf.
  """
  if not 0.0 <= lower <= upper <= 100.0:
    raise DataError(f"clip: percentiles must satisfy 0 <= lower <= upper <= 100, "
                    f"got ({lower}, {upper})")
  flat = _channels_flat(image, source)
  low, high = np.percentile(flat, [lower, upper], axis=0)  # Each (C,).
  return np.clip(image, low, high).astype(np.float32)


def nonzero_mask(image: np.ndarray) -> np.ndarray:
  """(*spatial,) bool: the voxels where some channel is non-zero, holes filled (nnU-Net's
  `create_nonzero_mask`: the body inside a zero background)."""
  return scipy.ndimage.binary_fill_holes(np.any(image != 0, axis=-1))


def zscore(image: np.ndarray, source: str = "<memory>", nonzero: bool = False,
           present: Optional[np.ndarray] = None) -> np.ndarray:
  """Standardises each channel to mean 0 and standard deviation 1 (population std, ddof=0).

  Args:
    image: (*spatial, C) intensities.
    source: named in error messages (the file the image came from).
    nonzero: statistics over `nonzero_mask(image)` only, and 0 outside it.
    present: (C,) bool, the modalities the image has (`Case.present`); an absent one's channel is
      set to 0 (the mean of a z-scored channel) and not checked. None: all present.

  Returns:
    A new float32 array of the same shape; statistics in float64.

  Raises:
    DataError: naming `source` and the channel when a channel is constant (its z-score would divide
      by zero), when the image has NaN/inf, or (`nonzero`) when every voxel is zero.
  """
  flat = _channels_flat(image, source).astype(np.float64)
  if nonzero:
    mask = nonzero_mask(image)
    if not mask.any():
      raise DataError(f"{source}: every voxel is 0; a z-score over the non-zero voxels is undefined")
    flat = flat[mask.reshape(-1)]
  present = np.ones(flat.shape[1], bool) if present is None else np.asarray(present, bool)
  constant = np.flatnonzero((flat.max(axis=0) == flat.min(axis=0)) & present)
  if constant.size:
    channel = int(constant[0])
    raise DataError(f"{source}: channel {channel} is constant (value {flat[0, channel]:g}); "
                    "a z-score would divide by zero")
  mean, std = flat.mean(axis=0), flat.std(axis=0)
  std = np.where(present, std, 1.0)  # An absent channel is zeroed below, never divided.
  out = (image - mean) / std
  if nonzero:
    out = np.where(mask[..., None], out, 0.0)
  return np.where(present, out, 0.0).astype(np.float32)


def absent_modalities(image: np.ndarray) -> np.ndarray:
  """(C,) bool: the channels that are constant over the whole image, i.e. modalities that were not
  acquired (tools that assemble multi-modal files fill a missing sequence with a constant, usually
  0). None of them when every channel is constant (nothing to predict from: not a missing
  modality but an empty image, which the z-score refuses) or when there is one channel."""
  flat = image.reshape(-1, image.shape[-1])
  constant = (flat.max(axis=0) == flat.min(axis=0)) if flat.size else np.zeros(0, bool)
  if image.shape[-1] < 2 or constant.all():
    return np.zeros(image.shape[-1], bool)
  return constant


def with_absent_modalities(case: Case, log: Callable[[str], None] = print) -> Case:
  """`case` with its constant channels marked missing (`absent_modalities`): modality_mask False
  there and the channel set to 0; a warning line naming the case and the modality goes to `log`.
  Methods that read the mask predict such a case from the modalities it has (MAML: from those
  branches). Unchanged when no channel is absent."""
  absent = absent_modalities(case.image) & case.present
  if not absent.any():
    return case
  names = case.modality_names
  present = case.present & ~absent
  first_voxel = case.image.reshape(-1, case.num_modalities)[0]
  missing = ", ".join(f"{names[c]} (channel {c}, constant {first_voxel[c]:g})"
                      for c in np.flatnonzero(absent))
  log(f"warning: {case.source}: case {case.case_id!r} lacks modality {missing}; it is used with "
      f"the modalities it has: {', '.join(names[c] for c in np.flatnonzero(present))}")
  image = np.where(present, case.image, 0.0).astype(case.image.dtype)
  return case.replace(image=image, modality_mask=present)


def selected_modalities(cases: Sequence[Case], data_cfg) -> list[Case]:
  """`cases` reduced to the channels of `data.modalities` (resolved against the first case's
  names; all of them when the key is empty or absent).

  Raises:
    DataError: naming data.modalities (unknown name, index out of range), or the case none of whose
      kept modalities is present.
  """
  cases = list(cases)
  selection = tuple(data_cfg.get("modalities", ()) or ())
  if not selection or not cases:
    return cases
  indices = resolve_modalities(selection, cases[0].modality_names, "data.modalities")
  return [select_modalities(c, indices) for c in cases]


def configured_cases(cases: Sequence[Case], data_cfg) -> list[Case]:
  """`cases` as the data block `data_cfg` says: reduced to the channels of `data.modalities` (when
  set; resolved against the first case's names), then clipped and z-scored
  (`data.clip_percentiles`, `data.zscore`, `data.zscore_nonzero`). The selection comes first, so
  that the statistics and the non-zero mask use only the kept channels. Keys `data_cfg` lacks are
  off.

  Raises:
    DataError: naming data.modalities (unknown name, index out of range) or the case at fault
      (none of the kept modalities present, a constant channel, NaN/inf), or data.zscore_nonzero
      without data.zscore.
  """
  return normalised(selected_modalities(cases, data_cfg), data_cfg)


def normalised(cases: Sequence[Case], data_cfg) -> list[Case]:
  """`cases` clipped and z-scored as the data block `data_cfg` says (`data.clip_percentiles`,
  `data.zscore`, `data.zscore_nonzero`; keys it lacks are off); unchanged when it says neither.
  With data.input = "rgb_imagenet" the images are first made RGB (`as_rgb`); their ImageNet
  normalisation is for training images only (`sources.load_dataset`).

  Raises:
    DataError: data.zscore_nonzero without data.zscore, or naming the case at fault (a constant
      channel, NaN/inf).
  """
  cases = list(cases)
  if data_cfg.get("input", GRAYSCALE) == RGB_IMAGENET:
    cases = [as_rgb(c) for c in cases]
  do_zscore, nonzero = data_cfg.get("zscore", False), data_cfg.get("zscore_nonzero", False)
  if nonzero and not do_zscore:
    raise DataError("config data.zscore_nonzero = True needs data.zscore = True (it chooses the "
                    "voxels of the z-score)")
  clip = tuple(data_cfg.get("clip_percentiles", ()) or ()) or None
  scale = tuple(data_cfg.get("percentile_scale", ()) or ())
  if scale and do_zscore:
    raise DataError(f"config data.percentile_scale = {scale} and data.zscore = True: choose one "
                    "normalisation")
  if clip is not None or do_zscore:
    cases = [preprocess_case(c, clip=clip, zscore=do_zscore, nonzero=nonzero) for c in cases]
  if scale:
    cases = [intensity.percentile_scaled(c, *scale) for c in cases]
  return cases


# data.input: how images enter the network. "grayscale": as read (and clipped / z-scored as
# configured). "rgb_imagenet": the released Duo-SegNet input, an RGB image (a one-channel image
# repeated 3 times) whose training images (labeled and unlabeled) are normalised with the ImageNet
# channel means and standard deviations (`imagenet_normalised`, applied by
# `sources.load_dataset`), while validation, test and --mode predict images are left in [0, 1] as
# the released test code leaves them.
GRAYSCALE, RGB_IMAGENET = "grayscale", "rgb_imagenet"
INPUTS = (GRAYSCALE, RGB_IMAGENET)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def as_rgb(case: Case) -> Case:
  """`case` with 3 channels: a one-channel image repeated 3 times (its modality flag too, names
  dropped); a 3-channel image unchanged.

  Raises:
    DataError: naming data.input and the case, for another channel count.
  """
  channels = case.num_modalities
  if channels == 3:
    return case
  if channels != 1:
    raise DataError(f"config data.input = {RGB_IMAGENET!r}: {case.source} (case "
                    f"{case.case_id!r}) has {channels} channels; it takes 1 (repeated) or 3")
  mask = None if case.modality_mask is None else np.repeat(case.present, 3)
  return case.replace(image=np.repeat(np.asarray(case.image, np.float32), 3, axis=-1),
                      modalities=(), modality_mask=mask)


def imagenet_normalised(case: Case) -> Case:
  """`case` (3 channels) with each channel c mapped to (x - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
  (torchvision's `Normalize` with the ImageNet statistics)."""
  if case.num_modalities != 3:
    raise DataError(f"config data.input = {RGB_IMAGENET!r}: {case.source} (case "
                    f"{case.case_id!r}) has {case.num_modalities} channels, not 3")
  image = (np.asarray(case.image, np.float32) - IMAGENET_MEAN) / IMAGENET_STD
  return case.replace(image=image.astype(np.float32))


# preprocess_case's `zscore` flag shadows the function inside it.
_zscore = zscore


def preprocess_case(case: Case, clip: Optional[Sequence[float]] = (0.5, 99.5),
                    zscore: bool = True, nonzero: bool = False) -> Case:
  """Clips (optional) then z-scores (optional) a case's image, per modality.

  Args:
    case: the case; its label, spacing and affine are kept.
    clip: (lower, upper) percentiles, or None for no clipping.
    zscore: whether to z-score each channel after clipping.
    nonzero: z-score over the non-zero voxels only (`zscore`'s `nonzero`).

  Returns:
    A new `Case` with a float32 image; `case` is not modified.

  Raises:
    DataError: naming `clip` for a malformed clip, or naming `case.source` for NaN/inf or a
      constant channel (which clipping can create when a percentile range is empty).
  """
  image = np.asarray(case.image, dtype=np.float32)
  if clip is not None:
    if len(clip) != 2:
      raise DataError(f"clip: must be (lower, upper) percentiles or None, got {clip!r}")
    image = clip_percentiles(image, clip[0], clip[1], source=case.source)
  if zscore:
    where = case.source if clip is None else f"{case.source} (after clipping to {tuple(clip)})"
    image = _zscore(image, source=where, nonzero=nonzero, present=case.present)
  return case.replace(image=image)


def _channels_flat(image: np.ndarray, source: str) -> np.ndarray:
  """(*spatial, C) -> (N, C); raises naming `source` for an empty or non-finite image."""
  if image.ndim < 2 or image.size == 0:
    raise DataError(f"{source}: image must be (*spatial, C) and non-empty, got {image.shape}")
  if not np.all(np.isfinite(image)):
    raise DataError(f"{source}: image has NaN/inf intensities")
  return image.reshape(-1, image.shape[-1])
