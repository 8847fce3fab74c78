"""Intensity statistics of a case, and the label-free rescale of an image to reference statistics.

The per-case analysis (`jaxseg.analyse`) describes each case by its intensities as stored, so that
a case whose scale differs from the labeled cases' (the LA volumes stored with a compressed range,
docs/la_protocol.md) shows in one table; `eval.intensity_rescale = "labeled"` rescales each
evaluated image to the labeled cases' mean and standard deviation, without reading its label, to
test whether such a case fails because of its scale.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from jaxseg.data.base import Case, DataError

UPPER_PERCENTILE = 99.5  # The robust "maximum" of a case (np.percentile, linear interpolation).


@dataclasses.dataclass(frozen=True)
class IntensityStats:
  """One channel of one case: statistics over every voxel (population std), and the contrast of
  the label against the background, (mean_fg - mean_bg) / std_bg (None without a label, with an
  empty label or a full one, or a constant background)."""

  mean: float
  std: float
  p99_5: float
  mean_foreground: Optional[float]
  mean_background: Optional[float]
  contrast: Optional[float]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def intensity_stats(image: np.ndarray, label: Optional[np.ndarray], channel: int = 0
                    ) -> IntensityStats:
  """`IntensityStats` of channel `channel` of `image` (*spatial, C); foreground = label > 0."""
  if not 0 <= channel < image.shape[-1]:
    raise DataError(f"channel {channel} is out of range: the image has {image.shape[-1]}")
  x = np.asarray(image[..., channel], np.float64)
  mean_fg = mean_bg = contrast = None
  if label is not None:
    fg = np.asarray(label) > 0
    if fg.any() and not fg.all():
      mean_fg, mean_bg = float(x[fg].mean()), float(x[~fg].mean())
      std_bg = float(x[~fg].std())
      contrast = (mean_fg - mean_bg) / std_bg if std_bg > 0 else None
  return IntensityStats(mean=float(x.mean()), std=float(x.std()),
                        p99_5=float(np.percentile(x, UPPER_PERCENTILE)),
                        mean_foreground=mean_fg, mean_background=mean_bg, contrast=contrast)


def reference_stats(cases: Sequence[Case]) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std), each (C,): per channel, the average over `cases` of each case's mean and
  (population) standard deviation. Labels are not read."""
  if not cases:
    raise DataError("no reference cases to take intensity statistics from")
  flat = [np.asarray(c.image, np.float64).reshape(-1, c.image.shape[-1]) for c in cases]
  return (np.mean([f.mean(axis=0) for f in flat], axis=0),
          np.mean([f.std(axis=0) for f in flat], axis=0))


def rescaled(case: Case, mean: np.ndarray, std: np.ndarray) -> Case:
  """`case` with each channel mapped linearly to the given mean and standard deviation:
  (x - mean_case) / std_case * std + mean. The label is neither read nor changed.

  Raises:
    DataError: naming the case, for a constant channel.
  """
  image = np.asarray(case.image, np.float64)
  flat = image.reshape(-1, image.shape[-1])
  own_mean, own_std = flat.mean(axis=0), flat.std(axis=0)
  if np.any(own_std == 0):
    raise DataError(f"{case.source}: case {case.case_id!r} has a constant channel; it cannot be "
                    "rescaled (eval.intensity_rescale)")
  out = (image - own_mean) / own_std * np.asarray(std) + np.asarray(mean)
  return case.replace(image=out.astype(np.float32))


def percentile_scaled(case: Case, lower: float, upper: float) -> Case:
  """`case` with each present channel mapped to (x - median) / (p_upper - p_lower) (percentiles
  over the whole image, np.percentile's linear interpolation, in float64); absent channels
  (`Case.present` False) set to 0. `data.percentile_scale`.

  Raises:
    DataError: naming the case and channel when its percentile range is empty (p_upper == p_lower).
  """
  image = np.asarray(case.image, np.float64)
  flat = image.reshape(-1, image.shape[-1])
  low, median, high = np.percentile(flat, [lower, 50.0, upper], axis=0)
  present = np.asarray(case.present, bool)
  empty = np.flatnonzero((high <= low) & present)
  if empty.size:
    raise DataError(f"{case.source}: case {case.case_id!r}, channel {int(empty[0])}: its "
                    f"{lower}th and {upper}th percentiles are equal ({low[empty[0]]:g}); "
                    "data.percentile_scale would divide by zero")
  width = np.where(present, high - low, 1.0)
  out = np.where(present, (image - median) / width, 0.0)
  return case.replace(image=out.astype(np.float32))
