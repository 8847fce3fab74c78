"""Tests of jaxseg.curves: the CSV logs (one row per log line, resume keeps the rows up to the
resumed step and appends) and curves.png (size by number of charts, NaN-tolerant), without JAX."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from jaxseg import curves


def test_log_appends_and_resume_drops_rows_past_the_resumed_step(tmp_path):
  path = tmp_path / curves.TRAIN_LOG
  log = curves.ScalarLog(path, keep_until=0)
  for step in (5, 10, 15):
    log.append(step, {"loss": 1.0 / step, "learning_rate": 0.01})
  rows = curves.read_log(path)
  assert [r["step"] for r in rows] == [5, 10, 15]
  assert rows[0]["loss"] == 0.2 and path.read_text().splitlines()[0] == "step,loss,learning_rate"
  # Resumed from the checkpoint of step 10: step 15 is trained (and logged) again.
  log = curves.ScalarLog(path, keep_until=10)
  log.append(15, {"loss": 0.5, "learning_rate": 0.01})
  log.append(20, {"loss": math.nan, "learning_rate": 0.01, "new": 1.0})  # A new column: rewritten.
  rows = curves.read_log(path)
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  assert rows[2]["loss"] == 0.5 and math.isnan(rows[3]["loss"])
  assert math.isnan(rows[0]["new"]) and rows[3]["new"] == 1.0
  # A fresh run (step 0) in a workdir without checkpoints starts the log again.
  assert curves.ScalarLog(path, keep_until=0).rows == [] and curves.read_log(path) == []


def test_curves_png_size_charts_and_redraw(tmp_path):
  tc = curves.TrainingCurves(tmp_path, 0)
  for step in range(10, 110, 10):
    tc.add("train", step, {"learning_rate": 0.01, "loss": 1.0 / step, "loss_dice": 0.5,
                           "loss_ce": math.nan if step == 50 else 0.3, "extra": 1.0})
  tc.add("validation", 50, {"f1/dice": 0.5, "f2/dice": 0.6, "f1/hd95": 3.0, "views_mean/dice": 0.55})
  tc.add("validation", 100, {"f1/dice": 0.7, "f2/dice": 0.8, "f1/hd95": 2.0,
                             "views_mean/dice": 0.75})
  tc.close()
  panels = curves.chart_panels(tc.train.rows, tc.validation.rows)
  # "loss" first, then the other losses, MAX_TRAIN_CURVES in all; then the validation Dice.
  assert [title for title, _ in panels] == ["train loss", "train loss_dice", "train loss_ce",
                                            "validation Dice"]
  assert [name for name, _ in panels[-1][1]] == ["f1", "f2", "views_mean"]
  image = Image.open(tmp_path / curves.CURVES_PNG)
  assert image.size == curves.curves_size(4) == (2 * curves.PANEL_SIZE[0], 2 * curves.PANEL_SIZE[1])
  assert np.asarray(image.convert("RGB")).std() > 10  # Something is drawn.
  # Redrawn from the CSVs alone.
  (tmp_path / curves.CURVES_PNG).unlink()
  assert curves.draw_curves(tmp_path) == tmp_path / curves.CURVES_PNG
  assert Image.open(tmp_path / curves.CURVES_PNG).size == image.size
  assert curves.curves_size(1) == curves.PANEL_SIZE
  assert curves.curves_size(3) == (2 * curves.PANEL_SIZE[0], 2 * curves.PANEL_SIZE[1])


def test_nice_ticks():
  assert curves.nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
  assert curves.nice_ticks(0.12, 0.78) == [0.0, 0.2, 0.4, 0.6, 0.8]
  assert curves.nice_ticks(5, 30) == [5, 10, 15, 20, 25, 30]
  assert curves.nice_ticks(1.0, 1.0) == [1.0]


def test_a_method_without_loss_charts_its_total_first():
  rows = [{"step": 50, "loss_s": 1.0, "loss_c": 2.0, "loss_total": 0.6, "learning_rate": 0.01}]
  assert curves._train_names(rows) == ["loss_total", "loss_s", "loss_c"]
