"""What an evaluation or a prediction writes: metrics.csv, summary.json, label maps, figure.png.

* `write_metrics_csv`: one row per case x view x postprocess x class (or region), floats at full
  precision.
* `write_summary`: the summary as JSON (NaN / inf -> null, `json_safe`).
* `save_case_prediction`, `write_input_prediction`: label maps, 3D as uint8 NIfTI (the case's or
  the input's affine), 2D as PNG (binary: 0 / 255, viewable; else class indices).
* `figure_case`, `write_figure`: figure.png, one row per case (the slice with the most foreground):
  image | ground truth | prediction per view, one colour per class, the case's Dice per view in the
  titles, and a legend; then a method's per-voxel maps (`evaluate.predict_maps`), if any, one heat
  panel each (`heat_colours`) titled with the map's mean over the case.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping, Optional, Sequence

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from jaxseg.data import folders2d, la
from jaxseg.data.base import Case
from jaxseg.data.readers import InputFile

__all__ = [
    "CSV_COLUMNS",
    "FIGURE_CLASS_COLOURS",
    "FIGURE_FONT_SIZE",
    "FIGURE_MIN_SIDE",
    "FigureCase",
    "FigureLayout",
    "FigurePanel",
    "HEAT_COLOURS",
    "METRIC_NAMES",
    "class_colour",
    "diagonal_affine",
    "dice_title",
    "draw_figure",
    "figure_case",
    "figure_font",
    "figure_layout",
    "figure_slice",
    "heat_colours",
    "json_safe",
    "map_title",
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

# figure.png layout, in pixels: each case's images are upscaled by an integer factor (nearest) until
# their longer side is at least FIGURE_MIN_SIDE, so that a 32 x 32 slice reads as well as a
# 183 x 140 LA one; titles and the legend use FIGURE_FONT_SIZE.
FIGURE_MIN_SIDE = 192
FIGURE_MARGIN = 10
FIGURE_FONT_SIZE = 14
# Class c is drawn in FIGURE_CLASS_COLOURS[(c - 1) % 8], filled FIGURE_FILL_ALPHA opaque; yellow is
# kept for the ground-truth outline over the predictions.
FIGURE_CLASS_COLOURS = ((230, 40, 40), (40, 120, 240), (40, 190, 70), (220, 60, 220),
                        (0, 200, 200), (240, 140, 20), (140, 80, 220), (150, 100, 50))
FIGURE_OUTLINE_COLOUR = (255, 230, 0)
FIGURE_FILL_ALPHA = 0.45
# A map's value v in [0, 1] is drawn in viridis (perceptually uniform, readable in gray and by
# colour-blind readers): these are its colours at v = 0, 1/8, ..., 1, interpolated linearly.
HEAT_COLOURS = ((68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
                (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37))


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


def write_table_csv(path: pathlib.Path, rows: Sequence[dict]) -> None:
  """A CSV with the keys of the first row as columns; None as empty, floats at full precision."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


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


@dataclasses.dataclass(frozen=True)
class FigureCase:
  """What figure.png shows of one case: one 2D slice, its labels, and the case's Dice per view.

  Attributes:
    case_id: the case's name.
    image: (H, W) float32 in [0, 1]: rows top to bottom, columns left to right (3D: the transposed
      (X, Y) slice, so that x runs left to right).
    label: (H, W) int32 ground truth of the slice.
    predictions: {view: (H, W) int32 labels of the slice}, in the method's view order.
    dice: {view: {class: the Dice of the whole case (every slice), NaN when undefined}}.
    where: the slice shown, e.g. "slice z = 40 of 88" (0-based index along the last axis); "" in 2D.
    maps: {name: (H, W) float32 in [0, 1]}, the method's per-voxel maps on the slice, in its order;
      empty for a method without maps.
    map_means: {name: the mean of the map over the whole case (every slice)}.
  """

  case_id: str
  image: np.ndarray
  label: np.ndarray
  predictions: dict
  dice: dict
  where: str = ""
  maps: dict = dataclasses.field(default_factory=dict)
  map_means: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FigurePanel:
  """One image of figure.png: `kind` is "image", "ground truth", "prediction" (of `view`) or "map"
  (`view` is the map's name); `box` = (left, top, width, height) of the upscaled image in pixels;
  `title` = the lines above it."""

  case: int
  kind: str
  view: str
  box: tuple[int, int, int, int]
  title: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FigureLayout:
  """Where everything of figure.png goes (pixels; `figure_layout`).

  Attributes:
    size: (width, height) of the figure.
    header: (left, top, text) of the line above the panels, or None.
    panels: one row per case: its image, its ground truth, one prediction per view, then one heat
      panel per map.
    legend: (left, top, style, colour, text) per entry; style "fill" (a class's colour),
      "outline" (the ground-truth outline drawn over the predictions) or "ramp" (the heat colours
      from 0 to 1, only when a case has maps; its colour is unused).
    scales: each case's integer upscaling factor.
  """

  size: tuple[int, int]
  header: Optional[tuple[int, int, str]]
  panels: tuple[FigurePanel, ...]
  legend: tuple[tuple[int, int, str, tuple[int, int, int], str], ...]
  scales: tuple[int, ...]


def figure_font(size: int = FIGURE_FONT_SIZE):
  """PIL's built-in scalable font at `size` pixels (Pillow >= 10.1 with FreeType), else its fixed
  bitmap font (about 11 pixels): no font file is needed."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):
    return ImageFont.load_default()


def _text_width(font, text: str) -> int:
  return int(math.ceil(font.getlength(text))) if text else 0


def figure_slice(label: np.ndarray, predictions: Sequence[np.ndarray] = ()) -> int:
  """The index along the last axis of the slice shown for a 3D case.

  Args:
    label: (X, Y, Z) ground truth; foreground = any class > 0.
    predictions: (X, Y, Z) labels of the views.

  Returns:
    The slice with the most ground-truth foreground voxels; when the ground truth is empty, the one
    with the most predicted foreground (summed over the views); when both are empty, the middle
    slice Z // 2. Ties go to the lowest index.
  """
  for masks in ([label], list(predictions)):
    if not masks:
      continue
    counts = sum(np.count_nonzero(np.asarray(m) > 0, axis=(0, 1)) for m in masks)
    if np.any(counts):
      return int(np.argmax(counts))
  return int(label.shape[-1] // 2)


def figure_case(case: Case, labels: Mapping[str, np.ndarray],
                dice: Mapping[str, Mapping[int, float]],
                maps: Optional[Mapping[str, np.ndarray]] = None) -> FigureCase:
  """The slice of `case` that figure.png shows (`figure_slice`), with its labels and Dice.

  Args:
    case: a labeled case, image (*spatial, C).
    labels: {view: (*spatial,) predicted labels}, in the method's order.
    dice: {view: {class: Dice of the whole case}}.
    maps: {name: (*spatial,) per-voxel values}, a method's maps (`evaluate.predict_maps`), clipped
      to [0, 1]; shown on the same slice, with their means over the whole case. None: no maps.

  The gray image is channel 0, or the channel mean for 3-channel 2D (RGB) images, stretched
  between its 1st and 99th percentiles (of the slice).
  """
  image, label, preds, where = case.image, case.label, dict(labels), ""
  clipped = {name: np.clip(np.asarray(m, np.float32), 0, 1) for name, m in (maps or {}).items()}
  means = {name: float(np.mean(m)) for name, m in clipped.items()}
  if case.ndim == 3:
    z = figure_slice(label, list(preds.values()))
    take = lambda a: np.asarray(a)[:, :, z].swapaxes(0, 1)
    image, label = take(image), take(label)
    preds = {view: take(p) for view, p in preds.items()}
    clipped = {name: take(m) for name, m in clipped.items()}
    where = f"slice z = {z} of {case.spatial_shape[-1]}"
  gray = image.mean(axis=-1) if case.ndim == 2 and image.shape[-1] == 3 else image[..., 0]
  gray = np.asarray(gray, np.float64)
  low, high = np.percentile(gray, [1, 99])
  gray = np.clip((gray - low) / (high - low), 0, 1) if high > low else np.zeros_like(gray)
  return FigureCase(case.case_id, gray.astype(np.float32), np.asarray(label, np.int32),
                    {view: np.asarray(p, np.int32) for view, p in preds.items()},
                    {view: {int(c): float(d) for c, d in by_class.items()}
                     for view, by_class in dice.items()}, where, clipped, means)


def dice_title(dice: Mapping[int, float]) -> str:
  """"Dice 0.812" (one class); "Dice 0.81 (1: 0.90, 2: 0.72)" (the mean over the defined classes,
  then each class); "n/a" where undefined (no foreground in ground truth nor prediction)."""
  fmt = lambda v: "n/a" if not math.isfinite(v) else f"{v:.3f}"
  values = [float(v) for v in dice.values()]
  if len(values) == 1:
    return f"Dice {fmt(values[0])}"
  finite = [v for v in values if math.isfinite(v)]
  mean = float(np.mean(finite)) if finite else math.nan
  return f"Dice {fmt(mean)} (" + ", ".join(f"{c}: {fmt(v)}" for c, v in dice.items()) + ")"


def _panel_titles(case: FigureCase) -> list[tuple[str, str, tuple[str, ...]]]:
  """(kind, view, title lines) of a case's panels, left to right."""
  titles = [("image", "", (case.case_id, case.where or "image")),
            ("ground truth", "", ("ground truth", "" if case.label.any() else "(empty)"))]
  for view in case.predictions:
    titles.append(("prediction", view, (f"prediction {view}", dice_title(case.dice.get(view, {})))))
  for name in case.maps:
    titles.append(("map", name, (map_title(name, case.map_means.get(name, math.nan)), "")))
  return titles


def map_title(name: str, mean: float) -> str:
  """"confidence (mean 0.42)": a map's name and its mean over the case."""
  return f"{name} (mean {mean:.2f})"


def heat_colours(values: np.ndarray) -> np.ndarray:
  """(..., 3) uint8 heat colours of `values` clipped to [0, 1] (viridis: 0 dark purple, 1 yellow;
  HEAT_COLOURS interpolated linearly; NaN as 0)."""
  v = np.clip(np.nan_to_num(np.asarray(values, np.float64)), 0, 1)
  stops = np.asarray(HEAT_COLOURS, np.float64)
  position = v * (len(stops) - 1)
  low = np.minimum(np.floor(position).astype(int), len(stops) - 2)
  frac = (position - low)[..., None]
  return ((1 - frac) * stops[low] + frac * stops[low + 1]).round().astype(np.uint8)


def _legend_entries(num_classes: int, maps: bool = False
                    ) -> list[tuple[str, tuple[int, int, int], str]]:
  if num_classes == 2:
    entries = [("fill", FIGURE_CLASS_COLOURS[0], "foreground (class 1)")]
  else:
    entries = [("fill", class_colour(c), f"class {c}") for c in range(1, num_classes)]
  entries.append(("outline", FIGURE_OUTLINE_COLOUR, "ground-truth outline (on the predictions)"))
  if maps:
    entries.append(("ramp", (0, 0, 0), "map value 0 to 1"))
  return entries


def _swatch_width(style: str) -> int:
  # The ramp needs room for its colours to read as a gradient.
  return 4 * FIGURE_FONT_SIZE if style == "ramp" else FIGURE_FONT_SIZE


def class_colour(c: int) -> tuple[int, int, int]:
  """The colour of class c >= 1 in figure.png (the palette repeats after 8 classes)."""
  return FIGURE_CLASS_COLOURS[(c - 1) % len(FIGURE_CLASS_COLOURS)]


def figure_layout(cases: Sequence[FigureCase], num_classes: int, header: str = "") -> FigureLayout:
  """The layout of figure.png: one row per case, columns image | ground truth | one per view | one
  per map.

  Each case's images are upscaled by the integer factor that brings their longer side to at least
  FIGURE_MIN_SIDE pixels; a column is as wide as its widest image or title line, so text always
  fits; the legend (one entry per class colour and the outline) wraps below the rows.
  """
  font, line = figure_font(), FIGURE_FONT_SIZE + 4
  margin, gap = FIGURE_MARGIN, FIGURE_MARGIN
  scales = [max(1, math.ceil(FIGURE_MIN_SIDE / max(c.image.shape))) for c in cases]
  titles = [_panel_titles(c) for c in cases]
  columns = max((len(t) for t in titles), default=0)
  widths = [0] * columns
  for case, scale, panels in zip(cases, scales, titles):
    for j, (_, _, lines) in enumerate(panels):
      widths[j] = max(widths[j], case.image.shape[1] * scale,
                      *(_text_width(font, text) for text in lines))
  top = margin
  header_entry = None
  if header:
    header_entry = (margin, top, header)
    top += line + gap // 2
  panels = []
  for i, (case, scale, row) in enumerate(zip(cases, scales, titles)):
    h, w = case.image.shape[0] * scale, case.image.shape[1] * scale
    left = margin
    for j, (kind, view, lines) in enumerate(row):
      box = (left + (widths[j] - w) // 2, top + len(lines) * line, w, h)
      panels.append(FigurePanel(i, kind, view, box, lines))
      left += widths[j] + gap
    top += max(len(lines) for _, _, lines in row) * line + h + gap
  width = max(margin + sum(widths) + gap * max(columns - 1, 0) + margin,
              2 * margin + (_text_width(font, header) if header else 0), 320)
  legend, x, y = [], margin, top
  for style, colour, text in _legend_entries(num_classes, any(c.maps for c in cases)):
    entry_width = _swatch_width(style) + 6 + _text_width(font, text)
    if x > margin and x + entry_width > width - margin:
      x, y = margin, y + line
    legend.append((x, y, style, colour, text))
    x += entry_width + 2 * gap
  width = max(width, *(e[0] + _swatch_width(e[2]) + 6 + _text_width(font, e[4]) + margin
                       for e in legend))
  return FigureLayout((int(width), int(y + line + margin)), header_entry, tuple(panels), tuple(legend),
                      tuple(scales))


def _contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
  """Boundary pixels of a 2D bool mask: the mask minus its erosion (4-neighbour, `width` times)."""
  return mask & ~ndimage.binary_erosion(mask, iterations=width)


def _panel_pixels(case: FigureCase, panel: FigurePanel, scale: int,
                  num_classes: int) -> np.ndarray:
  """(H * scale, W * scale, 3) uint8 of one panel: the gray image; the ground truth or the
  prediction filled in the class colours (45 % opaque) with their outlines; on predictions the
  ground-truth outline in FIGURE_OUTLINE_COLOUR; a map in heat colours."""
  up = lambda a: np.kron(a, np.ones((scale, scale), a.dtype))
  if panel.kind == "map":
    return heat_colours(up(case.maps[panel.view]))
  gray = up((255 * case.image).round().astype(np.uint8))
  rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
  if panel.kind == "image":
    return rgb.astype(np.uint8)
  labels = up(case.label if panel.kind == "ground truth" else case.predictions[panel.view])
  width = 2 if scale >= 3 else 1
  outlines = []
  for c in range(1, max(num_classes, int(labels.max(initial=0)) + 1)):
    mask = labels == c
    if mask.any():
      rgb[mask] = (1 - FIGURE_FILL_ALPHA) * rgb[mask] + FIGURE_FILL_ALPHA * np.array(class_colour(c))
      outlines.append((_contour(mask, width), class_colour(c)))
  for mask, colour in outlines:
    rgb[mask] = colour
  if panel.kind == "prediction":
    gt = up(case.label)
    for c in range(1, int(gt.max(initial=0)) + 1):
      rgb[_contour(gt == c, width)] = FIGURE_OUTLINE_COLOUR
  return rgb.round().astype(np.uint8)


def draw_figure(cases: Sequence[FigureCase], num_classes: int, header: str = "") -> Image.Image:
  """figure.png as an RGB image (white background, black text; `figure_layout`)."""
  layout = figure_layout(cases, num_classes, header)
  figure = Image.new("RGB", layout.size, (255, 255, 255))
  draw, font, line = ImageDraw.Draw(figure), figure_font(), FIGURE_FONT_SIZE + 4
  if layout.header is not None:
    draw.text(layout.header[:2], layout.header[2], fill=(0, 0, 0), font=font)
  for panel in layout.panels:
    left, top, w, h = panel.box
    case = cases[panel.case]
    pixels = _panel_pixels(case, panel, layout.scales[panel.case], num_classes)
    figure.paste(Image.fromarray(pixels), (left, top))
    for k, text in enumerate(panel.title):
      y = top - (len(panel.title) - k) * line
      draw.text((left + w // 2 - _text_width(font, text) // 2, y), text, fill=(0, 0, 0), font=font)
  swatch = FIGURE_FONT_SIZE
  for x, y, style, colour, text in layout.legend:
    width = _swatch_width(style)
    if style == "fill":
      draw.rectangle((x, y + 2, x + swatch, y + 2 + swatch), fill=colour, outline=(0, 0, 0))
    elif style == "ramp":
      ramp = heat_colours(np.tile(np.linspace(0, 1, width), (swatch, 1)))
      figure.paste(Image.fromarray(ramp), (x, y + 2))
    else:
      draw.rectangle((x, y + 2, x + swatch, y + 2 + swatch), fill=(128, 128, 128), outline=colour,
                     width=3)
    draw.text((x + width + 6, y + 2), text, fill=(0, 0, 0), font=font)
  return figure


def write_figure(path: pathlib.Path, cases: Sequence[FigureCase], num_classes: int,
                 header: str = "") -> None:
  """figure.png of `cases` (`draw_figure`)."""
  draw_figure(cases, num_classes, header).save(path)
