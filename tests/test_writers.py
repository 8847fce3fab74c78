"""Tests of jaxseg.writers: metrics.csv, summary JSON values, NIfTI / PNG label maps (affines,
headers, sizes) and the figure, on tiny arrays."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from jaxseg import writers
from jaxseg.data.base import Case
from jaxseg.data.readers import InputFile


def _row(key, dice, **changes):
  row = {"case": "c0", "view": "model", "postprocess": "raw", "class": key, "dice": dice,
         "jaccard": 0.25, "hd95": math.nan, "asd": 1.0, "assd": 2.0, "hd": 3.0, "mae": 0.0,
         "pred_empty": False, "gt_empty": True, "not_a_column": "ignored"}
  row.update(changes)
  return row


def test_metrics_csv_columns_precision_and_flags(tmp_path):
  writers.write_metrics_csv(tmp_path / "m.csv", [_row(1, 1 / 3), _row("WT", 0.5, pred_empty=True)])
  with open(tmp_path / "m.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(writers.CSV_COLUMNS)
  assert writers.CSV_COLUMNS == ("case", "view", "postprocess", "class", "dice", "jaccard", "hd95",
                                 "asd", "assd", "hd", "mae", "pred_empty", "gt_empty")
  assert rows[0]["class"] == "1" and rows[1]["class"] == "WT"
  assert float(rows[0]["dice"]) == 1 / 3 and rows[0]["hd95"] == "nan"
  assert (rows[0]["pred_empty"], rows[0]["gt_empty"], rows[1]["pred_empty"]) == ("0", "1", "1")


def test_json_safe_and_summary(tmp_path):
  value = {"a": [np.float32(0.5), math.nan, math.inf], "b": np.int64(3), "c": (1.0, "x")}
  safe = writers.json_safe(value)
  assert safe == {"a": [0.5, None, None], "b": 3, "c": [1.0, "x"]}
  assert type(safe["b"]) is int
  writers.write_summary(tmp_path / "s.json", safe)
  assert json.loads((tmp_path / "s.json").read_text()) == safe


def _case(image, label, affine=None, spacing=None):
  return Case("c", image.astype(np.float32)[..., None], label,
              tuple(spacing or (1.0,) * label.ndim), affine=affine)


def test_case_prediction_3d_nifti_keeps_affine(tmp_path):
  labels = np.zeros((4, 5, 3), np.int32)
  labels[1:3, 1:4, 1] = 2
  affine = np.array([[0, 0, -2.0, 30.0], [1.0, 0, 0, -5.0], [0, 1.25, 0, 7.5], [0, 0, 0, 1]])
  writers.save_case_prediction(tmp_path / "a", labels, _case(labels, labels, affine), 3)
  img = nib.load(tmp_path / "a.nii.gz")
  np.testing.assert_allclose(img.affine, affine)
  data = np.asarray(img.dataobj)
  assert data.dtype == np.uint8
  np.testing.assert_array_equal(data, labels)
  # Without an affine: diag(spacing).
  spaced = _case(labels, labels, None, (1.0, 1.25, 2.0))
  writers.save_case_prediction(tmp_path / "b", labels, spaced, 3)
  np.testing.assert_allclose(nib.load(tmp_path / "b.nii.gz").affine, np.diag([1.0, 1.25, 2.0, 1.0]))


def test_case_prediction_2d_png_binary_and_classes(tmp_path):
  labels = np.zeros((6, 5), np.int32)
  labels[1:3, 1:3] = 1
  writers.save_case_prediction(tmp_path / "a", labels, _case(labels, labels), 2)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), labels * 255)
  labels[4, 4] = 3
  writers.save_case_prediction(tmp_path / "b", labels, _case(labels, labels), 4)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), labels)
  with pytest.raises(ValueError, match="257 classes"):
    writers.write_png_mask(tmp_path / "c.png", labels, 257)


def test_input_predictions_written_like_their_inputs(tmp_path):
  # NIfTI: the input's affine and zooms, unscaled uint8, scalar intent.
  affine = np.array([[-0.8, 0, 0, 10.0], [0, 0.8, 0, -3.0], [0, 0, 2.5, 1.0], [0, 0, 0, 1]])
  nifti = nib.Nifti1Image(np.zeros((4, 3, 2, 2), np.float32), affine)
  nifti.header.set_intent("vector")
  nifti.header.set_slope_inter(2.0, 1.0)
  labels = np.zeros((4, 3, 2), np.int32)
  labels[1, 1, 1] = 1
  dummy = _case(labels, labels)
  writers.write_input_prediction(tmp_path / "n.nii.gz", labels, InputFile(dummy, nifti=nifti), 2)
  result = nib.load(tmp_path / "n.nii.gz")
  np.testing.assert_allclose(result.affine, affine)
  np.testing.assert_allclose(result.header.get_zooms(), (0.8, 0.8, 2.5))
  assert result.header.get_intent()[0] == "none"
  np.testing.assert_array_equal(np.asarray(result.dataobj), labels)
  # h5: identity affine (LA works in voxels).
  writers.write_input_prediction(tmp_path / "h.nii.gz", labels, InputFile(dummy), 2)
  np.testing.assert_allclose(nib.load(tmp_path / "h.nii.gz").affine, np.eye(4))
  # 2D: back at the file's original size by nearest neighbour.
  small = np.zeros((7, 9), np.int32)
  small[2:5, 3:8] = 1
  big = np.kron(small, np.ones((2, 2), np.int32))
  writers.write_input_prediction(tmp_path / "p.png", big, InputFile(_case(big, big),
                                                                     original_size=(7, 9)), 2)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "p.png")), small * 255)


def test_figure_tiles_size_and_colours(tmp_path):
  shape = (20, 18, 12)
  gt = np.zeros(shape, np.uint8)
  gt[6:14, 4:12, 3:9] = 1
  pred = np.zeros(shape, np.int32)
  pred[5:13, 4:12, 3:9] = 1
  case = _case(gt * 1.0, gt)
  tile = writers.figure_tile(case, pred)
  # 3D tiles: slice (X, Y) transposed to (18, 20), upscaled x ceil(128 / 20) = 7.
  scale = math.ceil(writers.FIGURE_MIN_SIDE / max(shape[:2]))
  assert tile.size == (shape[0] * scale, shape[1] * scale + writers.FIGURE_CAPTION_HEIGHT)
  writers.write_figure(tmp_path / "f.png", [tile, tile, tile])
  figure = np.asarray(Image.open(tmp_path / "f.png").convert("RGB"))
  assert figure.shape == (shape[1] * scale + writers.FIGURE_CAPTION_HEIGHT, 3 * shape[0] * scale, 3)
  green = np.all(figure == (0, 255, 0), axis=-1)
  red = np.all(figure == (255, 0, 0), axis=-1)
  assert green.any() and red.any()
  # 2D: no slicing; tiles of different heights are top-aligned.
  tile2d = writers.figure_tile(_case(gt[:, :, 5] * 1.0, gt[:, :, 5], spacing=(1.0, 1.0)),
                               pred[:, :, 5])
  assert tile2d.size == (shape[1] * scale, shape[0] * scale + writers.FIGURE_CAPTION_HEIGHT)
