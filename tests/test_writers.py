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


def test_figure_slice_is_the_one_with_most_foreground():
  label = np.zeros((6, 5, 8), np.uint8)
  label[1:3, 1:3, 1] = 1      # 4 voxels in slice 1,
  label[0:3, 0:3, 5] = 2      # 9 in slice 5 (any class counts),
  label[0:6, 0:5, 7] = 0
  label[2, 2, 6] = 1          # 1 in slice 6: the centroid (z ~ 3.9) would pick an empty slice.
  pred = np.zeros_like(label)
  pred[:, :, 2] = 1
  assert writers.figure_slice(label, [pred]) == 5
  # Empty ground truth: the prediction's (summed over the views); both empty: the middle.
  other = np.zeros_like(label)
  other[0, 0, 3] = other[0, 1, 3] = 1
  empty = np.zeros_like(label)
  assert writers.figure_slice(empty, [pred]) == 2
  assert writers.figure_slice(empty, [empty, other]) == 3
  assert writers.figure_slice(empty, [empty]) == 4
  # figure_case shows that slice, transposed so that x runs left to right.
  image = np.arange(6 * 5 * 8, dtype=np.float32).reshape(6, 5, 8)
  shown = writers.figure_case(_case(image, label), {"f1": pred}, {"f1": {1: 0.5}})
  np.testing.assert_array_equal(shown.label, label[:, :, 5].T)
  np.testing.assert_array_equal(shown.predictions["f1"], pred[:, :, 5].T)
  assert shown.where == "slice z = 5 of 8" and shown.image.shape == (5, 6)


def _figure_case(case_id, shape, views, dice=0.75, num_classes=2):
  label = np.zeros(shape, np.int32)
  label[2:6, 2:6] = 1
  if num_classes > 2:
    label[6:8, 6:8] = 2
  by_class = {c: dice - 0.1 * (c - 1) for c in range(1, num_classes)}
  return writers.FigureCase(case_id, np.linspace(0, 1, np.prod(shape)).reshape(shape), label,
                            {v: label for v in views}, {v: by_class for v in views})


def test_figure_layout_grows_with_cases_and_views_and_titles_carry_dice():
  one = writers.figure_layout([_figure_case("a", (10, 12), ["model"])], 2)
  two = writers.figure_layout([_figure_case("a", (10, 12), ["f1", "f2"]),
                               _figure_case("b", (10, 12), ["f1", "f2"])], 2, header="validation")
  assert two.size[0] > one.size[0] and two.size[1] > one.size[1]
  assert [p.kind for p in one.panels] == ["image", "ground truth", "prediction"]
  assert len(two.panels) == 8 and [p.view for p in two.panels[2:4]] == ["f1", "f2"]
  # Small images are upscaled (integer factor) to at least FIGURE_MIN_SIDE; every title fits.
  scale = math.ceil(writers.FIGURE_MIN_SIDE / 12)
  assert one.scales == (scale,) and one.panels[0].box[2:] == (12 * scale, 10 * scale)
  prediction = one.panels[2]
  assert prediction.title == ("prediction model", "Dice 0.750")
  assert two.panels[0].title == ("a", "image") and two.panels[7].title[1] == "Dice 0.750"
  font = writers.figure_font()
  for panel in two.panels:
    assert 0 <= panel.box[0] and panel.box[0] + panel.box[2] <= two.size[0]
    assert all(font.getlength(t) <= two.size[0] for t in panel.title)
  assert [e[4] for e in one.legend] == ["foreground (class 1)",
                                        "ground-truth outline (on the predictions)"]
  # Multi-class: the mean over the classes, then each class; one legend colour per class.
  multi = writers.figure_layout([_figure_case("m", (10, 10), ["model"], num_classes=3)], 3)
  assert multi.panels[2].title[1] == "Dice 0.700 (1: 0.750, 2: 0.650)"
  assert [e[4] for e in multi.legend][:2] == ["class 1", "class 2"]
  assert writers.dice_title({1: math.nan}) == "Dice n/a"


def test_figure_colours_and_size(tmp_path):
  cases = [_figure_case("a", (10, 12), ["f1", "f2"], num_classes=3),
           _figure_case("b", (16, 8), ["f1", "f2"], num_classes=3)]
  writers.write_figure(tmp_path / "f.png", cases, 3, header="validation: 2 cases")
  layout = writers.figure_layout(cases, 3, header="validation: 2 cases")
  figure = Image.open(tmp_path / "f.png").convert("RGB")
  assert figure.size == layout.size
  pixels = np.asarray(figure)
  # Outlines in the class colours, and the ground-truth outline (yellow) over the predictions.
  for colour in (writers.class_colour(1), writers.class_colour(2), writers.FIGURE_OUTLINE_COLOUR):
    assert np.all(pixels == colour, axis=-1).any(), colour
  image_panel = layout.panels[0].box
  crop = pixels[image_panel[1]:image_panel[1] + image_panel[3],
                image_panel[0]:image_panel[0] + image_panel[2]]
  assert np.all(crop[..., 0] == crop[..., 1])  # The image panel is plain gray.
