"""Training curves for people who do not start TensorBoard: CSV logs and a line chart (PIL).

A training run (process 0) keeps, next to `tensorboard/`:

    workdir/
      train_log.csv        one row per progress line: step, then the method's mean scalars since the
                           previous line (loss, ...)
      validation_log.csv   one row per evaluation: step, then "<split>/<view>/<metric>" headline
                           scores (`jaxseg.evaluate.headline`)
      curves.png           the training loss and up to MAX_TRAIN_CURVES - 1 other training scalars,
                           and the validation Dice of each view, against step

A resumed run keeps the rows up to the step it resumes from and appends (rows past that step came
from steps that are trained again). curves.png is redrawn at most every REDRAW_SECONDS at log
lines, at every evaluation and at the end; `draw_curves` redraws it from the CSVs alone.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import time
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from jaxseg.writers import figure_font

__all__ = [
    "CURVES_PNG",
    "MAX_TRAIN_CURVES",
    "PANEL_SIZE",
    "ScalarLog",
    "TRAIN_LOG",
    "TrainingCurves",
    "VALIDATION_LOG",
    "curves_size",
    "draw_curves",
    "nice_ticks",
    "read_log",
]

TRAIN_LOG = "train_log.csv"
VALIDATION_LOG = "validation_log.csv"
CURVES_PNG = "curves.png"
MAX_TRAIN_CURVES = 3  # Training scalars drawn: "loss" (or "loss_total") first, then other "loss*",
# then the rest.
PANEL_SIZE = (480, 300)  # (width, height) of one chart, pixels; two charts per row.
COLUMNS = 2
REDRAW_SECONDS = 30.0
_FONT_SIZE = 13
_SERIES_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
                   (23, 190, 207))


# ---------------------------------------------------------------------------------------------------
# CSV logs.


def read_log(path: pathlib.Path) -> list[dict]:
  """The rows of a log CSV: {"step": int, name: float (NaN where empty or "nan")}; [] if absent."""
  if not pathlib.Path(path).exists():
    return []
  rows = []
  with open(path, newline="") as f:
    for raw in csv.DictReader(f):
      row = {"step": int(raw["step"])}
      for k, v in raw.items():
        if k != "step" and k is not None:
          try:
            row[k] = float(v) if v not in ("", None) else math.nan
          except ValueError:
            row[k] = math.nan
      rows.append(row)
  return rows


class ScalarLog:
  """A CSV of scalars by step (`read_log`), one row appended per call.

  Opening keeps the rows with step <= `keep_until` and drops the rest (a resumed run trains those
  steps again); appending writes one line, or rewrites the file when a new column appears.
  """

  def __init__(self, path: pathlib.Path, keep_until: int):
    self.path = pathlib.Path(path)
    self.rows = [r for r in read_log(self.path) if r["step"] <= keep_until]
    self.columns = ["step"]
    for row in self.rows:
      self.columns += [k for k in row if k not in self.columns]
    if self.path.exists():
      self._rewrite()

  def append(self, step: int, values: Mapping[str, float]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    self.rows.append(row)
    new = [k for k in row if k not in self.columns]
    if new or not self.path.exists():
      self.columns += new
      self._rewrite()
      return
    with open(self.path, "a", newline="") as f:
      csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(row)

  def _rewrite(self) -> None:
    # Written beside, then renamed: a run killed mid-write leaves the previous file.
    tmp = self.path.with_name(self.path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
      writer.writeheader()
      writer.writerows(self.rows)
    os.replace(tmp, self.path)


class TrainingCurves:
  """Process 0's train_log.csv, validation_log.csv and curves.png in `workdir`.

  Args:
    workdir: the run's folder.
    start_step: the step training starts from (0, or the resumed checkpoint's step): rows past it
      are dropped.
  """

  def __init__(self, workdir: pathlib.Path, start_step: int):
    self.workdir = pathlib.Path(workdir)
    self.train = ScalarLog(self.workdir / TRAIN_LOG, start_step)
    self.validation = ScalarLog(self.workdir / VALIDATION_LOG, start_step)
    self._drawn_at: Optional[float] = None

  def add(self, group: str, step: int, values: Mapping[str, float]) -> None:
    """Records the scalars of one log line ("train") or evaluation (its split name)."""
    if group == "train":
      self.train.append(step, values)
      self.draw(force=False)
    else:
      self.validation.append(step, {f"{group}/{k}": v for k, v in values.items()})
      self.draw(force=True)

  def draw(self, force: bool = True) -> None:
    """Redraws curves.png (unless `force` is False and it was drawn under REDRAW_SECONDS ago)."""
    now = time.monotonic()
    if not force and self._drawn_at is not None and now - self._drawn_at < REDRAW_SECONDS:
      return
    self._drawn_at = now
    image = curves_image(self.train.rows, self.validation.rows)
    if image is not None:
      tmp = self.workdir / (CURVES_PNG + ".tmp")
      image.save(tmp, format="PNG")
      os.replace(tmp, self.workdir / CURVES_PNG)

  def close(self) -> None:
    self.draw(force=True)


def draw_curves(workdir: pathlib.Path) -> Optional[pathlib.Path]:
  """Redraws workdir/curves.png from its CSV logs; returns its path (None: nothing logged)."""
  workdir = pathlib.Path(workdir)
  image = curves_image(read_log(workdir / TRAIN_LOG), read_log(workdir / VALIDATION_LOG))
  if image is None:
    return None
  image.save(workdir / CURVES_PNG)
  return workdir / CURVES_PNG


# ---------------------------------------------------------------------------------------------------
# Charts.


def _train_names(rows: Sequence[dict]) -> list[str]:
  names: list[str] = []
  for row in rows:
    names += [k for k in row if k != "step" and k not in names]
  # The objective first: "loss", or a method's "loss_total" (Duo-SegNet), then the other terms.
  total = [n for n in ("loss", "loss_total") if n in names][:1]
  ordered = total + [n for n in names if n.startswith("loss") and n not in total]
  ordered += [n for n in names if n not in ordered]
  return ordered[:MAX_TRAIN_CURVES]


def _dice_names(rows: Sequence[dict]) -> list[str]:
  """The "<split>/<view>/dice" columns (not the per-class or per-region ones)."""
  names: list[str] = []
  for row in rows:
    names += [k for k in row if k.count("/") == 2 and k.endswith("/dice") and k not in names]
  return names


def chart_panels(train_rows: Sequence[dict], validation_rows: Sequence[dict]
                 ) -> list[tuple[str, list[tuple[str, list[tuple[int, float]]]]]]:
  """The charts of curves.png: [(title, [(series name, [(step, value)])])], training scalars first,
  then "validation Dice" (one series per split and view) when evaluations were logged."""
  panels = []
  for name in _train_names(train_rows):
    panels.append((f"train {name}", [(name, [(r["step"], r.get(name, math.nan))
                                             for r in train_rows])]))
  dice = _dice_names(validation_rows)
  if dice:
    splits = sorted({name.split("/")[0] for name in dice})
    # Named by the view alone (the title names the split) unless several splits were logged.
    label = lambda name: (name.split("/")[1] if len(splits) == 1
                          else name.removesuffix("/dice").replace("/", " "))
    series = [(label(name), [(r["step"], r[name]) for r in validation_rows if name in r])
              for name in dice]
    panels.append((" / ".join(splits) + " Dice", series))
  return panels


def curves_size(num_panels: int) -> tuple[int, int]:
  """(width, height) of curves.png with `num_panels` charts, COLUMNS per row."""
  columns = min(COLUMNS, max(num_panels, 1))
  rows = -(-max(num_panels, 1) // COLUMNS)
  return PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
  """About `count` round tick values (1, 2 or 5 x 10^k apart), from the last one <= low to the
  first one >= high (the chart's axis spans them)."""
  if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
    return [low]
  raw = (high - low) / count
  power = 10 ** math.floor(math.log10(raw))
  step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
  return [round(k * step, 12) for k in range(first, last + 1)]


def _fmt(value: float) -> str:
  return f"{value:.4g}" if value != int(value) or abs(value) >= 1e5 else f"{int(value)}"


def curves_image(train_rows: Sequence[dict], validation_rows: Sequence[dict]
                 ) -> Optional[Image.Image]:
  """curves.png as an image (`chart_panels`, `curves_size`); None when nothing was logged."""
  panels = chart_panels(train_rows, validation_rows)
  if not panels:
    return None
  image = Image.new("RGB", curves_size(len(panels)), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  max_step = max([r["step"] for r in (*train_rows, *validation_rows)], default=1)
  for i, (title, series) in enumerate(panels):
    left, top = (i % COLUMNS) * PANEL_SIZE[0], (i // COLUMNS) * PANEL_SIZE[1]
    _chart(draw, (left, top), title, series, max(max_step, 1))
  return image


def _chart(draw: ImageDraw.ImageDraw, origin: tuple[int, int], title: str,
           series: Sequence[tuple[str, Sequence[tuple[int, float]]]], max_step: int) -> None:
  """One line chart in the PANEL_SIZE box at `origin`: title, a row naming each series (in its
  colour) with its last value, axes with round ticks and labels, x = step from 0 to `max_step`,
  y = the series' finite range; NaN points are left out (the line breaks there)."""
  font = figure_font(_FONT_SIZE)
  x0, y0 = origin
  plot = (x0 + 70, y0 + 48, x0 + PANEL_SIZE[0] - 20, y0 + PANEL_SIZE[1] - 46)
  draw.text((x0 + PANEL_SIZE[0] // 2 - font.getlength(title) / 2, y0 + 8), title,
            fill=(0, 0, 0), font=font)
  values = [v for _, points in series for _, v in points if math.isfinite(v)]
  if values:
    low, high = min(values), max(values)
  else:
    low, high = 0.0, 1.0
  if high - low < 1e-12 * max(1.0, abs(high)):
    pad = abs(high) * 0.1 or 1.0
    low, high = low - pad, high + pad
  y_ticks = nice_ticks(low, high)
  low, high = min(low, y_ticks[0]), max(high, y_ticks[-1])
  legend_x = plot[0]
  x_ticks = [t for t in nice_ticks(0, max_step) if t <= max_step]
  px = lambda step: plot[0] + (plot[2] - plot[0]) * step / max_step
  py = lambda v: plot[3] - (plot[3] - plot[1]) * (v - low) / (high - low)
  for t in y_ticks:
    y = py(t)
    draw.line((plot[0], y, plot[2], y), fill=(225, 225, 225))
    label = _fmt(t)
    draw.text((plot[0] - 6 - font.getlength(label), y - _FONT_SIZE / 2 - 1), label,
              fill=(0, 0, 0), font=font)
  for t in x_ticks:
    x = px(t)
    draw.line((x, plot[3], x, plot[3] + 4), fill=(0, 0, 0))
    label = _fmt(t)
    draw.text((x - font.getlength(label) / 2, plot[3] + 6), label, fill=(0, 0, 0), font=font)
  draw.rectangle(plot, outline=(0, 0, 0))
  draw.text(((plot[0] + plot[2]) / 2 - font.getlength("step") / 2, plot[3] + 24), "step",
            fill=(0, 0, 0), font=font)
  for k, (name, points) in enumerate(series):
    colour = _SERIES_COLOURS[k % len(_SERIES_COLOURS)]
    segment: list[tuple[float, float]] = []
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    for step, v in points:
      if math.isfinite(v):
        segment.append((px(step), py(v)))
        continue
      if len(segment) > 1:
        draw.line(segment, fill=colour, width=2)
      segment = []
    if len(segment) > 1:
      draw.line(segment, fill=colour, width=2)
    if len(finite) <= 30:  # Few points (evaluations): mark each.
      for step, v in finite:
        x, y = px(step), py(v)
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    label = f"{name}: {_fmt(finite[-1][1])}" if finite else name
    draw.line((legend_x, y0 + 34, legend_x + 14, y0 + 34), fill=colour, width=3)
    draw.text((legend_x + 18, y0 + 27), label, fill=colour, font=font)
    legend_x += 18 + font.getlength(label) + 14
