"""What an evaluation or a prediction writes: metrics.csv, summary.json, label maps, figure.png.

* `write_metrics_csv`: one row per case x view x postprocess x class (or region), floats at full
  precision.
* `write_summary`: the summary as JSON (NaN / inf -> null, `json_safe`).
* `save_case_prediction`, `write_input_prediction`: label maps, 3D as uint8 NIfTI (the case's or
  the input's affine), 2D as PNG (binary: 0 / 255, viewable; else class indices).
* `figure_tile`, `write_figure`: ground-truth (green) and prediction (red) contours over the image.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Any, Optional, Sequence

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from jaxseg.data import folders2d, la
from jaxseg.data.base import Case
from jaxseg.data.readers import InputFile

__all__ = [
    "CSV_COLUMNS",
    "FIGURE_CAPTION_HEIGHT",
    "FIGURE_MIN_SIDE",
    "METRIC_NAMES",
    "diagonal_affine",
    "figure_tile",
    "json_safe",
    "save_case_prediction",
    "write_figure",
    "write_input_prediction",
    "write_metrics_csv",
    "write_nifti_labels",
    "write_png_mask",
    "write_summary",
]

# The per-case metrics (`jaxseg.metrics.case_metrics`), in metrics.csv's column order. "class" holds
# a class index (1, 2, ...) or a region name (eval.regions).
METRIC_NAMES = ("dice", "jaccard", "hd95", "asd", "assd", "hd", "mae")
CSV_COLUMNS = ("case", "view", "postprocess", "class", *METRIC_NAMES, "pred_empty", "gt_empty")

# Figure layout: tiles are upscaled by an integer factor (nearest) until their longer side is at
# least this many pixels, so that tiny volumes stay readable; the caption band sits above each tile.
FIGURE_MIN_SIDE = 128
FIGURE_CAPTION_HEIGHT = 16
_GT_COLOUR = (0, 255, 0)
_PRED_COLOUR = (255, 0, 0)


# ---------------------------------------------------------------------------------------------------
# Tables.


def json_safe(value: Any) -> Any:
  """NaN / inf -> None (JSON has no NaN), recursively; numpy scalars -> Python numbers."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_summary(path: pathlib.Path, summary: dict) -> None:
  """summary.json, indented; `summary` must already be `json_safe`."""
  path.write_text(json.dumps(summary, indent=1))


def write_metrics_csv(path: pathlib.Path, rows: Sequence[dict]) -> None:
  """metrics.csv (`CSV_COLUMNS`): floats at full precision (repr), NaN as "nan", empty flags as
  0 / 1."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, "pred_empty": int(row["pred_empty"]),
                       "gt_empty": int(row["gt_empty"])})


# ---------------------------------------------------------------------------------------------------
# Label maps.


def diagonal_affine(spacing: Sequence[float]) -> np.ndarray:
  """4x4 voxel-to-world matrix diag(spacing, 1) (no origin, no rotation)."""
  return np.diag([*map(float, spacing), 1.0])


def save_case_prediction(stem: pathlib.Path, labels: np.ndarray, case: Case,
                         num_classes: int) -> None:
  """3D: <stem>.nii.gz with the case's affine (else diag(spacing)); 2D: <stem>.png."""
  if labels.ndim == 2:
    write_png_mask(stem.with_name(stem.name + ".png"), labels, num_classes)
  else:
    affine = case.affine if case.affine is not None else diagonal_affine(case.spacing)
    write_nifti_labels(stem.with_name(stem.name + ".nii.gz"), labels, affine)


def write_input_prediction(path: pathlib.Path, labels: np.ndarray, source: InputFile,
                           num_classes: int) -> None:
  """The labels (*spatial,) of a `--mode predict` input, written back like the input.

  2D files: a PNG at the file's original size (labels of a resized image are resized back by
  nearest neighbour). NIfTI: uint8 NIfTI with the input's affine and zooms. h5: identity affine
  (LA works in voxels).
  """
  if source.original_size is not None:
    if labels.shape != source.original_size:
      labels = folders2d.resize_mask(labels, source.original_size)
    write_png_mask(path, labels, num_classes)
  elif source.nifti is not None:
    write_nifti_labels(path, labels, np.asarray(source.nifti.affine), like=source.nifti)
  else:
    write_nifti_labels(path, labels, diagonal_affine(la.SPACING))


def write_png_mask(path: pathlib.Path, labels: np.ndarray, num_classes: int) -> None:
  """Binary: 0 / 255 (viewable; folders2d reads > 0 as foreground); else class indices."""
  if num_classes > 256:
    raise ValueError(f"{path}: cannot store {num_classes} classes in an 8-bit PNG")
  values = labels * 255 if num_classes == 2 else labels
  Image.fromarray(values.astype(np.uint8)).save(path)


def write_nifti_labels(path: pathlib.Path, labels: np.ndarray, affine: np.ndarray,
                       like: Optional[nib.spatialimages.SpatialImage] = None) -> None:
  """uint8 NIfTI-1 of `labels` with `affine`; with `like`, its header (zooms, codes), unscaled."""
  if like is None:
    header = nib.Nifti1Header()
  else:
    header = nib.Nifti1Header.from_header(like.header)
    header.set_intent("none")  # A 4D input may carry a vector intent; labels are scalars.
  header.set_data_dtype(np.uint8)
  image = nib.Nifti1Image(labels.astype(np.uint8), affine, header)
  # Labels are stored exactly: no scaling inherited from the input.
  image.header.set_slope_inter(1.0, 0.0)
  if like is not None:
    image.header.set_zooms(tuple(like.header.get_zooms()[:labels.ndim]))
  nib.save(image, path)


# ---------------------------------------------------------------------------------------------------
# Figure.


def figure_tile(case: Case, labels: np.ndarray) -> Image.Image:
  """One captioned RGB tile: grayscale image, ground-truth contour green, prediction contour red.

  3D: the slice along the last axis through the ground-truth centroid (the prediction's when the
  ground truth is empty, else the middle), transposed so that x runs left to right. Gray = channel 0,
  or the channel mean for 3-channel 2D (RGB) images, stretched between its 1st and 99th percentiles.
  Foreground = any class > 0.
  """
  image, gt, pred = case.image, case.label > 0, labels > 0
  if case.ndim == 3:
    z = _centroid_index(gt, pred)
    image, gt, pred = (a[:, :, z].swapaxes(0, 1) for a in (image, gt, pred))
  gray = image.mean(axis=-1) if case.ndim == 2 and image.shape[-1] == 3 else image[..., 0]
  scale = max(1, math.ceil(FIGURE_MIN_SIDE / max(gray.shape)))
  gray, gt, pred = (np.kron(a, np.ones((scale, scale), a.dtype)) for a in (gray, gt, pred))
  low, high = np.percentile(gray, [1, 99])
  gray = np.clip((gray - low) / (high - low), 0, 1) if high > low else np.zeros_like(gray)
  rgb = np.repeat((255 * gray).astype(np.uint8)[..., None], 3, axis=-1)
  rgb[_contour(gt)] = _GT_COLOUR
  rgb[_contour(pred)] = _PRED_COLOUR  # Drawn last: where the contours coincide, red shows.
  tile = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + FIGURE_CAPTION_HEIGHT))
  tile.paste(Image.fromarray(rgb), (0, FIGURE_CAPTION_HEIGHT))
  ImageDraw.Draw(tile).text((2, 2), case.case_id, fill=(255, 255, 255))
  return tile


def _centroid_index(gt: np.ndarray, pred: np.ndarray) -> int:
  """Index along the last axis through the centroid of gt (else pred, else the middle)."""
  for mask in (gt, pred):
    if mask.any():
      return int(round(np.nonzero(mask)[-1].mean()))
  return mask.shape[-1] // 2


def _contour(mask: np.ndarray) -> np.ndarray:
  """Boundary pixels of a 2D bool mask (mask minus its 4-neighbour erosion)."""
  return mask & ~ndimage.binary_erosion(mask)


def write_figure(path: pathlib.Path, tiles: Sequence[Image.Image]) -> None:
  """figure.png: the tiles side by side, top-aligned, on black."""
  width = sum(t.width for t in tiles)
  height = max(t.height for t in tiles)
  figure = Image.new("RGB", (width, height))
  left = 0
  for tile in tiles:
    figure.paste(tile, (left, 0))
    left += tile.width
  figure.save(path)
