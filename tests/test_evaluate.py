"""Tests of jaxseg.evaluate on tiny synthetic cases with fake, pointwise predict functions.

The fake views are sigmoids of the intensity of channel 0 (`f1`: x > 0.5, `f2`: x > 0.3), far from
the 0.5 decision boundary on the intensities used (0, 0.4, 1), so sliding-window averaging cannot
flip a label and the expected predictions are known exactly without running the window.
"""

from __future__ import annotations

import csv
import json
import math

import h5py
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from jaxseg import evaluate as ev
from jaxseg import inference, metrics, postprocess, writers
from jaxseg.config_blocks import data_block, eval_block
from jaxseg.data import preprocess
from jaxseg.data.base import Case, DataError

SHAPE = (20, 18, 12)
PATCH = (12, 10, 8)
SPACING = (1.0, 1.25, 2.0)
HALO = 0.4  # Foreground for f2 only.


def two_views(inputs):
  x = inputs["image"][..., :1]
  return {"f1": jax.nn.sigmoid(10.0 * (x - 0.5)), "f2": jax.nn.sigmoid(10.0 * (x - 0.3))}


def one_view(inputs):
  return {"model": jax.nn.sigmoid(10.0 * (inputs["image"][..., :1] - 0.5))}


def three_classes(inputs):
  """Softmax over 3 classes: 0 below 0.3, 1 in (0.3, 0.7), 2 above (intensities 0, 0.5, 1)."""
  x = inputs["image"][..., :1]
  logits = jnp.concatenate([-20 * (x - 0.15), jnp.zeros_like(x), 20 * (x - 0.85)], axis=-1)
  return {"model": jax.nn.softmax(logits, axis=-1)}


def expected_labels(image, view):
  return (image[..., 0] > {"f1": 0.5, "f2": 0.3, "model": 0.5}[view]).astype(np.int32)


def box(shape, lo, hi):
  mask = np.zeros(shape, bool)
  mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return mask


def make_case(case_id, image2d_or_3d, label, affine=None, spacing=SPACING):
  image = image2d_or_3d.astype(np.float32)[..., None]
  return Case(case_id=case_id, image=image, label=label.astype(np.uint8),
              spacing=tuple(spacing), affine=affine)


def cases3d():
  """c0 (affine): object with a halo; c1: object plus a spurious blob; c2: empty prediction;
  c3: empty ground truth."""
  obj = box(SHAPE, (5, 4, 3), (13, 12, 9))
  halo = box(SHAPE, (4, 3, 2), (14, 13, 10)) & ~obj
  gt = box(SHAPE, (6, 4, 3), (14, 12, 9))
  image0 = obj * 1.0 + halo * HALO
  affine = np.array([[0, 0, -2.0, 30.0], [1.0, 0, 0, -5.0], [0, 1.25, 0, 7.5], [0, 0, 0, 1]])
  blob = box(SHAPE, (16, 14, 1), (18, 16, 3))
  image1 = obj * 1.0 + blob * 1.0
  return [
      make_case("c0", image0, gt, affine=affine),
      make_case("c1", image1, obj),
      make_case("c2", np.zeros(SHAPE), gt),
      make_case("c3", image1, np.zeros(SHAPE)),
  ]


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluated3d(tmp_path_factory):
  out = tmp_path_factory.mktemp("eval3d")
  cfg = eval_block()
  cases = cases3d()
  summary = ev.evaluate(jax.tree_util.Partial(two_views), cases, cfg, 2, out, patch_size=PATCH,
                        split_name="test")
  return cases, summary, out


def test_eval_config_defaults():
  cfg = eval_block()
  assert cfg.batch_size == 4 and cfg.threshold == 0.5 and cfg.lcc and cfg.empty_policy == "worst"
  assert ev.window_geometry(cfg, PATCH) == (PATCH, (6, 5, 4))
  cfg.patch_size, cfg.strides = (8, 8, 4), (18, 18, 4)
  assert ev.window_geometry(cfg, PATCH) == ((8, 8, 4), (18, 18, 4))


def test_csv_matches_case_metrics(evaluated3d):
  cases, _, out = evaluated3d
  rows = read_csv(out / "metrics.csv")
  assert list(rows[0]) == list(ev.CSV_COLUMNS)
  assert len(rows) == len(cases) * 2 * 2  # cases x views x {raw, lcc} x one class
  by_key = {(r["case"], r["view"], r["postprocess"], r["class"]): r for r in rows}
  for case in cases:
    for view in ("f1", "f2"):
      raw = expected_labels(case.image, view)
      for post, pred in (("raw", raw), ("lcc", postprocess.largest_connected_component(raw))):
        want = metrics.case_metrics(pred.astype(np.int32), case.label, spacing=case.spacing)[1]
        row = by_key[(case.case_id, view, post, "1")]
        for name in ev.METRIC_NAMES:
          np.testing.assert_equal(float(row[name]), want[name], err_msg=f"{case.case_id} {name}")
        assert bool(int(row["pred_empty"])) == want["pred_empty"]
        assert bool(int(row["gt_empty"])) == want["gt_empty"]


def test_summary_means_views_and_counts(evaluated3d):
  cases, summary, out = evaluated3d
  assert json.loads((out / "summary.json").read_text()) == summary
  assert summary["split"] == "test" and summary["empty_policy"] == "worst"
  assert summary["view_names"] == ["f1", "f2"] and summary["postprocesses"] == ["raw", "lcc"]
  assert "mm" in summary["units"]["distances"]
  for view in ("f1", "f2"):
    for post in ("raw", "lcc"):
      stats = summary["views"][view][post]["1"]
      scored = [c for c in cases if c.label.any()]  # c3 (empty gt) is excluded.
      assert stats["num_cases"] == 3 and stats["num_empty_gt_excluded"] == 1
      assert stats["num_empty_predictions"] == 1  # c2.
      values = []
      for case in scored:
        pred = expected_labels(case.image, view)
        if post == "lcc":
          pred = postprocess.largest_connected_component(pred).astype(np.int32)
        values.append(metrics.case_metrics(pred, case.label, spacing=case.spacing)[1])
      for name in ev.METRIC_NAMES:
        v = np.array([x[name] for x in values])
        np.testing.assert_allclose(stats[f"{name}_mean"], v.mean(), rtol=1e-12)
        np.testing.assert_allclose(stats[f"{name}_std"], v.std(), rtol=1e-12)
      assert "f1_pooled" not in stats  # 3D.
  for post in ("raw", "lcc"):
    for name in ev.METRIC_NAMES:
      means = [summary["views"][v][post]["1"][f"{name}_mean"] for v in ("f1", "f2")]
      np.testing.assert_allclose(summary["views_mean"][post]["1"][f"{name}_mean"], np.mean(means))
  assert any(line.startswith("  views_mean raw") for line in ev.summary_lines(summary))
  scores = ev.headline(summary)
  assert scores["f2/hd95"] == summary["views"]["f2"]["raw"]["1"]["hd95_mean"]
  assert scores["f1/lcc_dice"] == summary["views"]["f1"]["lcc"]["1"]["dice_mean"]
  assert scores["views_mean/dice"] == summary["views_mean"]["raw"]["1"]["dice_mean"]


def test_empty_prediction_scored_by_policy(evaluated3d):
  _, _, out = evaluated3d
  row = next(r for r in read_csv(out / "metrics.csv") if r["case"] == "c2" and r["view"] == "f1")
  assert int(row["pred_empty"]) == 1 and float(row["dice"]) == 0.0
  diagonal = metrics.image_diagonal(SHAPE, SPACING)
  assert float(row["hd95"]) == pytest.approx(diagonal) and float(row["asd"]) == pytest.approx(diagonal)


def test_lcc_removes_spurious_blob(evaluated3d):
  _, _, out = evaluated3d
  rows = {(r["view"], r["postprocess"]): r for r in read_csv(out / "metrics.csv") if r["case"] == "c1"}
  raw, lcc = rows[("f1", "raw")], rows[("f1", "lcc")]
  assert float(lcc["dice"]) == 1.0 and float(raw["dice"]) < 1.0
  assert float(lcc["hd"]) == 0.0 < float(raw["hd"])


def test_nifti_predictions_keep_affine(evaluated3d):
  cases, _, out = evaluated3d
  for case in cases[:2]:
    for view in ("f1", "f2"):
      img = nib.load(out / "predictions" / f"{case.case_id}_{view}.nii.gz")
      want_affine = case.affine if case.affine is not None else np.diag([*SPACING, 1.0])
      np.testing.assert_allclose(img.affine, want_affine)
      data = np.asarray(img.dataobj)
      assert data.dtype == np.uint8
      np.testing.assert_array_equal(data, expected_labels(case.image, view))


def test_figure_shows_cases_views_and_their_dice(evaluated3d):
  """figure.png: the first eval.num_figure_cases cases, each at its slice with the most
  ground-truth foreground, image | ground truth | f1 | f2, each view's whole-case Dice in its title."""
  cases, _, out = evaluated3d
  rows = read_csv(out / "metrics.csv")
  shown = []
  for case in cases[:eval_block().num_figure_cases]:
    labels = {view: expected_labels(case.image, view) for view in ("f1", "f2")}
    dice = {view: {1: float(next(r["dice"] for r in rows if r["case"] == case.case_id
                                 and r["view"] == view and r["postprocess"] == "raw"))}
            for view in labels}
    shown.append(writers.figure_case(case, labels, dice))
  header = ("test: 3 of 4 cases; the slice with the most ground-truth foreground; Dice of the "
            "whole case")
  layout = writers.figure_layout(shown, 2, header=header)
  figure = Image.open(out / "figure.png").convert("RGB")
  assert figure.size == layout.size
  assert [p.title[0] for p in layout.panels[:4]] == ["c0", "ground truth", "prediction f1",
                                                     "prediction f2"]
  assert layout.panels[2].title[1] == f"Dice {shown[0].dice['f1'][1]:.3f}"
  assert 0 < shown[0].dice["f1"][1] < 1 and shown[0].where == "slice z = 3 of 12"
  pixels = np.asarray(figure)
  assert np.all(pixels == writers.FIGURE_OUTLINE_COLOUR, axis=-1).any()
  assert np.all(pixels == writers.class_colour(1), axis=-1).any()


def test_one_view_no_views_mean_and_no_outputs():
  cfg = eval_block()
  cfg.lcc = False
  summary = ev.evaluate(one_view, cases3d()[:1], cfg, 2, patch_size=PATCH)
  assert summary["view_names"] == ["model"] and summary["postprocesses"] == ["raw"]
  assert "views_mean" not in summary
  assert summary["views"]["model"]["raw"]["1"]["num_cases"] == 1


def test_multiclass_argmax_and_no_lcc(tmp_path):
  shape = (10, 9, 6)
  label = np.zeros(shape, np.uint8)
  label[2:6, 2:6, 1:4] = 1
  label[6:9, 3:7, 2:5] = 2
  image = label * 0.5
  image[1, 1, 1] = 1.0  # One wrong class-2 voxel.
  case = Case("m0", image[..., None].astype(np.float32), label, (1.0, 1.0, 1.0))
  summary = ev.evaluate(three_classes, [case], eval_block(), 3, tmp_path, patch_size=(6, 6, 4))
  assert summary["postprocesses"] == ["raw"] and summary["classes"] == [1, 2]
  pred = label.astype(np.int32).copy()
  pred[1, 1, 1] = 2
  want = metrics.case_metrics(pred, label, classes=(1, 2))
  for c in (1, 2):
    assert summary["views"]["model"]["raw"][str(c)]["dice_mean"] == pytest.approx(want[c]["dice"])
  assert summary["views"]["model"]["raw"]["1"]["dice_mean"] == 1.0
  assert ev.headline(summary)["model/dice"] == pytest.approx((1.0 + want[2]["dice"]) / 2)
  assert (tmp_path / "predictions" / "m0_model.nii.gz").exists()


def test_2d_pooled_f1_and_mae(tmp_path):
  shape = (6, 5)
  # Case a: gt 4 pixels, f1 predicts 3 of which 2 overlap. Case b: gt 2, f1 predicts 4 covering both.
  gt_a = box(shape, (1, 1), (3, 3))
  pred_a = np.zeros(shape, bool)
  pred_a[1, 1] = pred_a[1, 2] = pred_a[4, 4] = True
  gt_b = box(shape, (0, 0), (1, 2))
  pred_b = box(shape, (0, 0), (2, 2))
  cases = [make_case("a", pred_a * 1.0, gt_a, spacing=(1.0, 1.0)),
           make_case("b", pred_b * 1.0, gt_b, spacing=(1.0, 1.0))]
  cfg = eval_block()
  cfg.lcc = False
  summary = ev.evaluate(two_views, cases, cfg, 2, tmp_path, patch_size=(4, 4))
  stats = summary["views"]["f1"]["raw"]["1"]
  # Pooled: intersections 2 + 2, sizes (3 + 4) + (4 + 2); wrong pixels 3 + 2 of 2 x 30.
  assert stats["f1_pooled"] == pytest.approx(8 / 13)
  assert stats["mae_pooled"] == pytest.approx(5 / 60)
  assert "f1_pooled" in summary["views_mean"]["raw"]["1"]
  assert ev.headline(summary)["f1/f1_pooled"] == pytest.approx(8 / 13)
  mask = np.asarray(Image.open(tmp_path / "predictions" / "a_f1.png"))
  np.testing.assert_array_equal(mask, pred_a * 255)
  figure = Image.open(tmp_path / "figure.png")
  # 2D: no slicing; two cases of 6 x 5 pixels upscaled to at least FIGURE_MIN_SIDE, 4 panels each.
  scale = math.ceil(writers.FIGURE_MIN_SIDE / max(shape))
  assert figure.size[0] > 4 * shape[1] * scale and figure.size[1] > 2 * shape[0] * scale


def test_case_without_label_is_an_error():
  case = cases3d()[0].replace(label=None, source="/data/x.nii.gz")
  with pytest.raises(DataError, match="x.nii.gz"):
    ev.evaluate(one_view, [case], eval_block(), 2, patch_size=PATCH)


# ---------------------------------------------------------------------------------------------------
# predict_files.


def _data_cfg(**changes):
  cfg = data_block()
  cfg.update(changes)
  return cfg


def _volume():
  image = np.zeros(SHAPE, np.float32)
  image[box(SHAPE, (5, 4, 3), (13, 12, 9))] = 1.0
  image[box(SHAPE, (2, 2, 1), (4, 4, 3))] = HALO
  return image


def test_predict_nifti_keeps_affine_and_zooms(tmp_path):
  affine = np.array([[-0.8, 0, 0, 10.0], [0, 0.8, 0, -3.0], [0, 0, 2.5, 1.0], [0, 0, 0, 1]])
  image = _volume()
  nib.save(nib.Nifti1Image(image, affine), tmp_path / "vol.nii.gz")
  written = ev.predict_files(two_views, tmp_path / "vol.nii.gz", tmp_path / "out", eval_block(),
                             patch_size=PATCH, data_cfg=_data_cfg(), num_channels=1)
  assert written == [tmp_path / "out" / "vol.nii.gz"]
  result = nib.load(written[0])
  np.testing.assert_allclose(result.affine, affine)
  np.testing.assert_allclose(result.header.get_zooms(), (0.8, 0.8, 2.5))
  np.testing.assert_array_equal(np.asarray(result.dataobj), image > 0.5)
  # The second view on request.
  written = ev.predict_files(two_views, tmp_path / "vol.nii.gz", tmp_path / "out2",
                             eval_block(), patch_size=PATCH, data_cfg=_data_cfg(), view="f2")
  np.testing.assert_array_equal(np.asarray(nib.load(written[0]).dataobj), image > 0.3)


def test_predict_4d_nifti_with_zscore(tmp_path):
  image = np.stack([_volume(), np.linspace(0, 1, np.prod(SHAPE)).reshape(SHAPE)], axis=-1)
  nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), tmp_path / "mm.nii")
  data_cfg = _data_cfg(zscore=True)
  written = ev.predict_files(two_views, tmp_path / "mm.nii", tmp_path / "out", eval_block(),
                             patch_size=PATCH, data_cfg=data_cfg, num_channels=2)
  want = preprocess.zscore(image.astype(np.float32))[..., 0] > 0.5
  result = nib.load(written[0])
  assert result.shape == SHAPE
  np.testing.assert_array_equal(np.asarray(result.dataobj), want)


def test_predict_la_h5_folder(tmp_path):
  folder = tmp_path / "2018LA_Seg_Training Set" / "CASE_A"
  folder.mkdir(parents=True)
  image = _volume()
  with h5py.File(folder / "mri_norm2.h5", "w") as f:
    f["image"] = image
  written = ev.predict_files(one_view, tmp_path, tmp_path / "out", eval_block(),
                             patch_size=PATCH, data_cfg=_data_cfg(source="la"))
  assert written == [tmp_path / "out" / "CASE_A.nii.gz"]
  result = nib.load(written[0])
  np.testing.assert_allclose(result.affine, np.eye(4))
  np.testing.assert_array_equal(np.asarray(result.dataobj), image > 0.5)


def test_predict_png_folder(tmp_path):
  inputs = tmp_path / "images"
  inputs.mkdir()
  gray = np.zeros((7, 9), np.uint8)
  gray[2:5, 3:8] = 255
  Image.fromarray(gray).save(inputs / "b.png")
  Image.fromarray(gray.T.copy()).save(inputs / "a.png")
  (inputs / "notes.txt").write_text("not an image")
  (inputs / "._b.png").write_bytes(b"macOS resource fork")
  written = ev.predict_files(one_view, inputs, tmp_path / "out", eval_block(), patch_size=(4, 4),
                             data_cfg=_data_cfg(source="folders2d"))
  assert [p.name for p in written] == ["a.png", "b.png"]
  np.testing.assert_array_equal(np.asarray(Image.open(written[1])), gray)
  np.testing.assert_array_equal(np.asarray(Image.open(written[0])), gray.T)
  # Resized like the training data, labels back at the file's size.
  written = ev.predict_files(one_view, inputs / "b.png", tmp_path / "out2", eval_block(),
                             patch_size=(4, 4), data_cfg=_data_cfg(image_size=(14, 18)))
  np.testing.assert_array_equal(np.asarray(Image.open(written[0])), gray)


def test_predict_errors(tmp_path):
  kwargs = dict(patch_size=PATCH, data_cfg=_data_cfg())
  with pytest.raises(DataError, match="missing"):
    ev.predict_files(one_view, tmp_path / "missing", tmp_path / "out", eval_block(), **kwargs)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.md").write_text("")
  with pytest.raises(DataError, match="no supported input files"):
    ev.predict_files(one_view, tmp_path / "empty", tmp_path / "out", eval_block(), **kwargs)
  with pytest.raises(DataError, match="readme.md"):
    ev.predict_files(one_view, tmp_path / "empty" / "readme.md", tmp_path / "out",
                     eval_block(), **kwargs)
  two_channel = np.zeros((*SHAPE, 2), np.float32)
  nib.save(nib.Nifti1Image(two_channel, np.eye(4)), tmp_path / "two.nii.gz")
  with pytest.raises(DataError, match="two.nii.gz.*2 channel"):
    ev.predict_files(one_view, tmp_path / "two.nii.gz", tmp_path / "out", eval_block(),
                     num_channels=1, **kwargs)
  Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "rgb.png")
  with pytest.raises(DataError, match="rgb.png.*2D"):
    ev.predict_files(one_view, tmp_path / "rgb.png", tmp_path / "out", eval_block(), **kwargs)


def test_predict_model_rejecting_channels(tmp_path):
  """Without num_channels, a model that cannot take the file's channels is a DataError too."""
  weights = jnp.ones((1, 1))

  def linear_model(w, inputs):
    return {"model": jax.nn.sigmoid(inputs["image"] @ w)}

  Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "rgb.png")
  with pytest.raises(DataError, match="rgb.png.*3-channel"):
    ev.predict_files(jax.tree_util.Partial(linear_model, weights), tmp_path / "rgb.png",
                     tmp_path / "out", eval_block(), patch_size=(4, 4), data_cfg=_data_cfg())


# ---------------------------------------------------------------------------------------------------
# Classes and regions of a multi-class task; the inputs dict; mirroring.


def four_classes(inputs):
  """Softmax over 4 classes: the class c nearest to 3 x intensity (intensities c / 3)."""
  x = inputs["image"][..., :1]
  logits = jnp.concatenate([-100.0 * (x - c / 3) ** 2 for c in range(4)], axis=-1)
  return {"model": jax.nn.softmax(logits, axis=-1)}


REGIONS = (("WT", (1, 2, 3)), ("TC", (2, 3)), ("ET", (3,)))


def test_classes_regions_and_class_mean_by_hand(tmp_path):
  """2D, 8 x 12, unit spacing. Ground truth: rows 0-3 hold class 1 in columns 0-3, class 2 in 4-7,
  class 3 in 8-11. The prediction labels column 8 class 2 instead of 3.

  Class 1: perfect. Class 2: pred 4 x 5 (20 px), gt 4 x 4 (16), overlap 16: Dice 32/36 = 8/9.
  Surfaces (mask minus its cross erosion, the image edge counting as background): pred 14 px,
  gt 12 px. pred -> gt: the 4 pred surface pixels of column 8 are 1 from gt's column 7, the others
  0: ASD = 4/14; gt -> pred: (1, 7) and (2, 7) are 1 from pred's surface, 10 zeros; pooled 26
  distances, 6 ones: HD95 = 1.
  Class 3: pred 4 x 3 (12 px), gt 4 x 4 (16): Dice 24/28 = 6/7. Surfaces: pred 10, gt 12; pred ->
  gt: (1, 9) and (2, 9) are 1, 8 zeros: ASD = 2/10; gt -> pred: column 8's 4 pixels are 1, 8 zeros;
  HD95 = 1.
  WT = classes 1-3 and TC = classes 2-3: prediction and ground truth the same region, Dice 1 and
  distances 0. ET = class 3.
  """
  gt = np.zeros((8, 12), np.uint8)
  gt[0:4, 0:4], gt[0:4, 4:8], gt[0:4, 8:12] = 1, 2, 3
  pred = gt.copy()
  pred[0:4, 8] = 2
  case = Case("q", (pred / 3.0).astype(np.float32)[..., None], gt, (1.0, 1.0))
  cfg = eval_block()
  cfg.regions = REGIONS
  summary = ev.evaluate(four_classes, [case], cfg, 4, tmp_path, patch_size=(4, 4))

  want = {"1": (1.0, 0.0, 0.0), "2": (8 / 9, 1.0, 4 / 14), "3": (6 / 7, 1.0, 2 / 10),
          "WT": (1.0, 0.0, 0.0), "TC": (1.0, 0.0, 0.0), "ET": (6 / 7, 1.0, 2 / 10)}
  rows = {r["class"]: r for r in read_csv(tmp_path / "metrics.csv")}
  assert list(rows) == ["1", "2", "3", "WT", "TC", "ET"]
  stats = summary["views"]["model"]["raw"]
  assert list(stats) == ["1", "2", "3", "mean", "WT", "TC", "ET"]
  for key, (dice, hd95, asd) in want.items():
    for name, value in (("dice", dice), ("hd95", hd95), ("asd", asd)):
      assert float(rows[key][name]) == pytest.approx(value, abs=1e-12), (key, name)
      assert stats[key][f"{name}_mean"] == pytest.approx(value, abs=1e-12), (key, name)
    assert stats[key]["num_cases"] == 1 and stats[key]["f1_pooled"] == pytest.approx(dice)
  mean = stats["mean"]
  assert mean["dice_mean"] == pytest.approx((1 + 8 / 9 + 6 / 7) / 3)
  assert mean["hd95_mean"] == pytest.approx(2 / 3)
  assert mean["asd_mean"] == pytest.approx((4 / 14 + 2 / 10) / 3)
  assert mean["f1_pooled"] == pytest.approx((1 + 8 / 9 + 6 / 7) / 3)
  assert summary["regions"] == {"WT": [1, 2, 3], "TC": [2, 3], "ET": [3]}

  scores = ev.headline(summary)
  assert scores["model/dice"] == pytest.approx(mean["dice_mean"])  # Today's key: the class mean.
  assert scores["model/hd95"] == pytest.approx(2 / 3)
  assert scores["model/class2/dice"] == pytest.approx(8 / 9)
  assert scores["model/WT/dice"] == 1.0 and scores["model/ET/asd"] == pytest.approx(0.2)
  lines = ev.summary_lines(summary)
  assert any("class mean" in line for line in lines)
  assert any("region ET [3]" in line and "Dice 85.71" in line for line in lines)


def test_binary_headline_keys_unchanged_with_regions_off(evaluated3d):
  _, summary, _ = evaluated3d
  assert "regions" not in summary and "mean" not in summary["views"]["f1"]["raw"]
  assert set(ev.headline(summary)) == {
      f"{view}/{key}" for view in ("f1", "f2", "views_mean")
      for key in ("dice", "jaccard", "hd95", "asd", "lcc_dice")}


@pytest.mark.parametrize("regions, match", [
    ((("WT", (1, 4)),), "1..3"),
    ((("WT", ()),), "non-empty tuple"),
    ((("2", (1,)),), "class index"),
    ((("mean", (1,)),), "not 'mean'"),
    ((("A", (1,)), ("A", (2,))), "unique"),
    ((("A", 1),), "non-empty tuple"),
    (("WT",), "pair"),
])
def test_bad_regions_fail_before_any_work(regions, match):
  def never(inputs):
    raise AssertionError("predict_fn called")

  cfg = eval_block()
  cfg.regions = regions
  with pytest.raises(DataError, match=r"config eval\.regions.*" + match):
    ev.evaluate(never, cases3d()[:1], cfg, 4, patch_size=PATCH)


@pytest.mark.parametrize("axes", [(3,), (0, 0), (-1,)])
def test_bad_mirror_axes_fail_before_any_work(axes, tmp_path):
  def never(inputs):
    raise AssertionError("predict_fn called")

  cfg = eval_block()
  cfg.mirror_axes = axes
  with pytest.raises(DataError, match=r"config eval\.mirror_axes"):
    ev.evaluate(never, cases3d()[:1], cfg, 2, patch_size=PATCH)
  with pytest.raises(DataError, match=r"config eval\.mirror_axes"):
    ev.predict_files(never, tmp_path / "missing", tmp_path / "out", cfg, patch_size=PATCH,
                     data_cfg=_data_cfg())


def test_inputs_dict_carries_fields_and_modality_mask(tmp_path):
  """The predict function sees the case's per-voxel fields windowed and its modality mask."""

  def from_prior(inputs):
    assert inputs["modality_mask"].shape == (4, 2) and inputs["prior"].shape == (4, *PATCH)
    second_missing = ~inputs["modality_mask"][:, 1]
    p = jax.nn.sigmoid(10.0 * (inputs["prior"] - 0.5))[..., None]
    return {"model": jnp.where(second_missing[:, None, None, None, None], p, 0.0)}

  case = cases3d()[0]
  prior = expected_labels(case.image, "f2").astype(np.float32)  # The halo too.
  case = case.replace(image=np.concatenate([case.image, np.zeros_like(case.image)], axis=-1),
                      modality_mask=np.array([True, False]), fields={"prior": prior})
  cfg = eval_block()
  cfg.lcc = False
  ev.evaluate(from_prior, [case], cfg, 2, tmp_path, patch_size=PATCH)
  labels = np.asarray(nib.load(tmp_path / "predictions" / "c0_model.nii.gz").dataobj)
  np.testing.assert_array_equal(labels, prior > 0.5)


def test_mirror_axes_reach_the_sliding_window():
  """eval.mirror_axes: predict_views equals the mirrored sliding window of the inputs dict."""

  def skewed(inputs):  # Not flip-equivariant.
    x = inputs["image"][..., :1]
    ramp = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None, None, None] / x.shape[1]
    return {"model": jax.nn.sigmoid(4.0 * x * ramp - 1.0)}

  case = cases3d()[0]
  cfg = eval_block()
  cfg.mirror_axes = (0, 2)
  patch, strides = ev.window_geometry(cfg, PATCH)
  probs = ev.predict_views(skewed, ev.case_inputs(case), cfg, patch, strides)["model"]
  voxel, per_case = ev.case_inputs(case)
  want = inference.sliding_window_predict(lambda x: skewed(x)["model"], voxel, patch, strides,
                                          per_case=per_case, batch_size=4, mirror_axes=(0, 2),
                                          shape_bucket=cfg.shape_bucket)
  np.testing.assert_array_equal(probs, np.asarray(want))
  cfg.mirror_axes = ()
  plain = ev.predict_views(skewed, ev.case_inputs(case), cfg, patch, strides)["model"]
  assert not np.allclose(plain, probs, atol=1e-4)


def test_predict_files_pass_all_modalities_present(tmp_path):
  def needs_all_present(inputs):
    present = jnp.all(inputs["modality_mask"], axis=-1)[:, None, None, None, None]
    return {"model": jax.nn.sigmoid(10.0 * (inputs["image"][..., :1] - 0.5)) * present}

  image = _volume()
  nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "vol.nii.gz")
  written = ev.predict_files(needs_all_present, tmp_path / "vol.nii.gz", tmp_path / "out",
                             eval_block(), patch_size=PATCH, data_cfg=_data_cfg())
  np.testing.assert_array_equal(np.asarray(nib.load(written[0]).dataobj), image > 0.5)


def _two_probability_views(inputs):
  """f1 = the intensity itself, f2 = 0.6 everywhere: their mean is > 0.5 where x > 0.4."""
  x = inputs["image"][..., :1]
  return {"f1": x, "f2": jnp.full_like(x, 0.6)}


@pytest.mark.parametrize("view, foreground, said", [
    ("", lambda x: x > 0.5, "predicting with view f1 of the method's views f1, f2 (choose with "
                            "--config.eval.view: a view or mean)"),
    ("f2", lambda x: x >= 0, "predicting with view f2 of the method's views f1, f2"),
    ("mean", lambda x: x > 0.4, "predicting with the mean of the views f1, f2"),
])
def test_predict_view_choice_is_printed_and_mean_averages(tmp_path, capsys, view, foreground,
                                                          said):
  image = np.zeros(SHAPE, np.float32)
  image[box(SHAPE, (2, 2, 1), (8, 8, 5))] = 0.45  # Foreground of the mean only, not of f1.
  image[box(SHAPE, (10, 9, 6), (16, 15, 11))] = 0.8
  image[box(SHAPE, (0, 12, 0), (4, 18, 4))] = 0.3
  nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "vol.nii.gz")
  cfg = eval_block()
  cfg.view = view
  written = ev.predict_files(_two_probability_views, tmp_path / "vol.nii.gz", tmp_path / "out",
                             cfg, patch_size=PATCH, data_cfg=_data_cfg())
  np.testing.assert_array_equal(np.asarray(nib.load(written[0]).dataobj), foreground(image))
  assert said in capsys.readouterr().out


def test_predict_unknown_view_lists_the_methods_views(tmp_path):
  nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
  cfg = eval_block()
  cfg.view = "f3"
  with pytest.raises(DataError, match=r"eval.view = 'f3' is not one of the method's views f1, f2"):
    ev.predict_files(two_views, tmp_path / "vol.nii.gz", tmp_path / "out", cfg, patch_size=PATCH,
                     data_cfg=_data_cfg(), log=None)
  assert not (tmp_path / "out" / "vol.nii.gz").exists()
  assert ev.choose_view("", {"model": 1}) == ("model", 1)
  with pytest.raises(DataError, match="different channel counts"):
    ev.choose_view("mean", {"a": 1, "b": 2})
