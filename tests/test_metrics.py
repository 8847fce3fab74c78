"""Tests of jaxseg.metrics against medpy 0.5.2 golden values, hand-computed cases and properties.

medpy itself is not imported: the golden files (tests/golden/medpy_binary__*.npz) hold its outputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from jaxseg import metrics

GOLDEN_CASES = ("blob3d", "blob3d_unrelated", "blob2d", "identical3d", "disjoint3d", "one_voxel3d",
                "one_voxel_same3d", "one_voxel_vs_blob3d", "border3d")
# medpy name -> our function.
SURFACE_METRICS = {"hd": metrics.hd, "hd95": metrics.hd95, "asd": metrics.asd, "assd": metrics.assd}
OVERLAP_METRICS = {"dc": metrics.dice, "jc": metrics.jaccard}
RTOL = 1e-10


def _blob(shape, seed, threshold=0.55, sigma=2.0) -> np.ndarray:
  """Thresholded Gaussian-smoothed noise: a blob-like bool mask."""
  noise = np.random.default_rng(seed).random(shape)
  smooth = ndimage.gaussian_filter(noise, sigma)
  return smooth > np.quantile(smooth, threshold)


def _full_volume_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
  """medpy's __surface_distances(a, b) written out on the whole array (no cropping)."""
  cross = ndimage.generate_binary_structure(a.ndim, 1)
  surface_a = a ^ ndimage.binary_erosion(a, structure=cross, border_value=0)
  surface_b = b ^ ndimage.binary_erosion(b, structure=cross, border_value=0)
  return ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]


# ---------------------------------------------------------------------------------------------------
# Golden values from medpy 0.5.2.


@pytest.mark.parametrize("case", GOLDEN_CASES)
@pytest.mark.parametrize("name", sorted(SURFACE_METRICS))
def test_surface_metric_matches_medpy(golden, case, name):
  g = golden(f"medpy_binary__{case}")
  result, reference, spacing = g["in_result"], g["in_reference"], g["in_voxelspacing"]
  fn = SURFACE_METRICS[name]
  calls = {"": (result, reference, None), "_sp": (result, reference, spacing),
           "_swapped": (reference, result, None), "_sp_swapped": (reference, result, spacing)}
  for suffix, (pred, gt, sp) in calls.items():
    np.testing.assert_allclose(fn(pred, gt, sp), g[f"out_{name}{suffix}"], rtol=RTOL, atol=0,
                               err_msg=f"{name}{suffix}")


@pytest.mark.parametrize("case", GOLDEN_CASES)
@pytest.mark.parametrize("name", sorted(OVERLAP_METRICS))
def test_overlap_metric_matches_medpy(golden, case, name):
  g = golden(f"medpy_binary__{case}")
  result, reference, spacing = g["in_result"], g["in_reference"], g["in_voxelspacing"]
  fn = OVERLAP_METRICS[name]
  expected = g[f"out_{name}"]
  # Symmetric and spacing-free: every argument order and spacing gives medpy's value.
  for pred, gt, sp in [(result, reference, None), (result, reference, spacing),
                       (reference, result, None), (reference, result, spacing)]:
    np.testing.assert_allclose(fn(pred, gt, sp), expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_surface_metrics_bundle_matches_medpy(golden, case):
  g = golden(f"medpy_binary__{case}")
  result, reference, spacing = g["in_result"], g["in_reference"], g["in_voxelspacing"]
  bundle = metrics.surface_metrics(result, reference, spacing)
  for name in SURFACE_METRICS:
    np.testing.assert_allclose(getattr(bundle, name), g[f"out_{name}_sp"], rtol=RTOL, atol=0)
  # asd_reverse is medpy asd(reference, result).
  np.testing.assert_allclose(bundle.asd_reverse, g["out_asd_sp_swapped"], rtol=RTOL, atol=0)
  assert set(bundle.as_dict()) == {"hd", "hd95", "asd", "assd", "asd_reverse"}


@pytest.mark.parametrize("method", ["tree", "edt"])
@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_both_distance_routes_match_medpy(golden, case, method):
  """The k-d tree and the box-EDT route (picked by density) are both exact."""
  g = golden(f"medpy_binary__{case}")
  result = g["in_result"].astype(bool)
  reference = g["in_reference"].astype(bool)
  spacing = g["in_voxelspacing"]
  forward, backward = metrics._directed_surface_distances(result, reference, spacing, method)
  np.testing.assert_allclose(forward.mean(), g["out_asd_sp"], rtol=RTOL, atol=0)
  np.testing.assert_allclose(backward.mean(), g["out_asd_sp_swapped"], rtol=RTOL, atol=0)
  np.testing.assert_allclose(np.percentile(np.concatenate([forward, backward]), 95),
                             g["out_hd95_sp"], rtol=RTOL, atol=0)


def test_assd_is_medpy_052_pooled_mean_not_mean_of_asds(golden):
  """MedPy 0.5.2 pools both directions; MedPy 0.4.0 averaged the two asd values."""
  g = golden("medpy_binary__blob2d")
  bundle = metrics.surface_metrics(g["in_result"], g["in_reference"])
  np.testing.assert_allclose(bundle.assd, g["out_assd"], rtol=RTOL, atol=0)
  mean_of_asds = 0.5 * (float(g["out_asd"]) + float(g["out_asd_swapped"]))
  assert abs(mean_of_asds - float(g["out_assd"])) > 1e-4
  np.testing.assert_allclose(0.5 * (bundle.asd + bundle.asd_reverse), mean_of_asds, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------
# Hand-computed cases.


def test_two_single_voxels_3d():
  pred = np.zeros((10, 12, 8), bool)
  gt = np.zeros_like(pred)
  pred[2, 3, 4] = True
  gt[5, 7, 4] = True  # offset (3, 4, 0): distance 5 voxels
  for fn in (metrics.hd, metrics.hd95, metrics.asd, metrics.assd):
    assert fn(pred, gt) == 5.0
    np.testing.assert_allclose(fn(pred, gt, (2.0, 1.0, 3.0)), math.sqrt(6.0**2 + 4.0**2), rtol=1e-15)
  assert metrics.dice(pred, gt) == 0.0
  assert metrics.jaccard(pred, gt) == 0.0


def test_square_vs_shifted_square_2d():
  pred = np.zeros((12, 12), np.uint8)
  gt = np.zeros_like(pred)
  pred[2:6, 2:6] = 1
  gt[3:7, 2:6] = 1  # shifted by one row: overlap 3x4 = 12 of 16 + 16
  assert metrics.dice(pred, gt) == 2 * 12 / 32
  assert metrics.jaccard(pred, gt) == 12 / 20
  # Of pred's 12 surface pixels, the 4 on row 2 and the 2 inner ones on row 5 are 1 away from gt's
  # surface (rows 3 and 6); the 6 others lie on it. The same holds for gt by symmetry.
  assert metrics.hd(pred, gt) == 1.0
  assert metrics.hd95(pred, gt) == 1.0
  assert metrics.asd(pred, gt) == 6 / 12
  assert metrics.assd(pred, gt) == 12 / 24
  assert metrics.hd(pred, gt, spacing=(2.5, 1.0)) == 2.5


def test_mask_filling_the_array_is_all_surface():
  """border_value=0: the array edge counts as background, so a full mask has a surface."""
  pred = np.ones((5, 6, 7), bool)
  gt = np.zeros_like(pred)
  gt[2, 3, 3] = True
  # Farthest surface voxel of pred from gt's single voxel is a corner (2, 3, 3) away.
  assert metrics.hd(pred, gt) == math.sqrt(2**2 + 3**2 + 3**2)
  # gt's voxel is 2 away from the nearest face of pred (x = 0 or x = 4).
  assert metrics.asd(gt, pred) == 2.0


def test_mae():
  pred = np.zeros((4, 5), bool)
  gt = np.zeros_like(pred)
  pred[0, :3] = True
  gt[0, 1:4] = True  # differ at (0, 0) and (0, 3)
  assert metrics.mae(pred, gt) == 2 / 20
  assert metrics.mae(pred, pred) == 0.0
  assert metrics.mae(np.zeros((3, 3, 3)), np.zeros((3, 3, 3))) == 0.0  # no empty special case


def test_values_are_python_floats():
  pred = _blob((16, 16, 8), 0)
  gt = _blob((16, 16, 8), 1)
  for fn in (metrics.dice, metrics.jaccard, metrics.hd, metrics.hd95, metrics.asd, metrics.assd,
             metrics.mae):
    assert type(fn(pred, gt)) is float


# ---------------------------------------------------------------------------------------------------
# Bounding-box cropping is exact.


@pytest.mark.parametrize("spacing", [None, (0.625, 0.625, 2.5)])
def test_cropping_equals_full_volume(spacing):
  shape = (30, 26, 20)
  edge = np.zeros(shape, bool)
  edge[0:6, 4:15, 0:5] = True  # touches the x = 0 and z = 0 array faces
  edge[25:30, 20:26, 15:20] = True  # touches the opposite corner faces
  deep = np.zeros(shape, bool)
  deep[10:17, 9:16, 8:13] = True  # far from every array edge
  deep[12:14, 11:13, 9:11] = False  # a hole: inner surface voxels
  sp = None if spacing is None else np.asarray(spacing)
  for pred, gt in [(edge, deep), (deep, edge), (deep, np.roll(deep, 2, axis=1))]:
    forward = _full_volume_distances(pred, gt, sp)
    backward = _full_volume_distances(gt, pred, sp)
    pooled = np.concatenate([forward, backward])
    got = metrics.surface_metrics(pred, gt, spacing)
    np.testing.assert_allclose(got.hd, max(forward.max(), backward.max()), rtol=1e-12)
    np.testing.assert_allclose(got.hd95, np.percentile(pooled, 95), rtol=1e-12)
    np.testing.assert_allclose(got.asd, forward.mean(), rtol=1e-12)
    np.testing.assert_allclose(got.asd_reverse, backward.mean(), rtol=1e-12)
    np.testing.assert_allclose(got.assd, pooled.mean(), rtol=1e-12)


def test_cropped_surface_keeps_inner_crop_edge_as_background():
  """A mask that fills its crop box exactly: all voxels on the box faces are surface voxels."""
  mask = np.zeros((9, 9, 9), bool)
  mask[2:7, 2:7, 2:7] = True
  cross = ndimage.generate_binary_structure(3, 1)
  expected = mask ^ ndimage.binary_erosion(mask, structure=cross, border_value=0)
  box = metrics._bounding_box(mask)
  got = np.zeros_like(mask)
  got[box] = metrics._surface(mask[box])
  np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------------------------------
# Empty masks.


def _one_empty_pair():
  gt = np.zeros((8, 10, 6), bool)
  gt[2:5, 3:7, 1:4] = True
  return np.zeros_like(gt), gt


def test_worst_policy_one_empty():
  empty, gt = _one_empty_pair()
  diagonal = math.sqrt(8**2 + 10**2 + 6**2)
  spacing = (0.5, 1.0, 2.0)
  diagonal_sp = math.sqrt(4.0**2 + 10.0**2 + 12.0**2)
  for pred, target in [(empty, gt), (gt, empty)]:
    assert metrics.dice(pred, target) == 0.0
    assert metrics.jaccard(pred, target) == 0.0
    for fn in SURFACE_METRICS.values():
      assert fn(pred, target) == diagonal
      assert fn(pred, target, spacing) == diagonal_sp
    assert metrics.image_diagonal(pred.shape, spacing) == diagonal_sp


def test_worst_policy_both_empty_is_nan():
  empty = np.zeros((6, 7, 5), bool)
  for fn in (metrics.dice, metrics.jaccard, *SURFACE_METRICS.values()):
    assert math.isnan(fn(empty, empty))
  assert metrics.mae(empty, empty) == 0.0


def test_reference_policy_scores_zero():
  empty, gt = _one_empty_pair()
  for pred, target in [(empty, gt), (gt, empty), (empty, empty)]:
    for fn in (metrics.dice, metrics.jaccard, *SURFACE_METRICS.values()):
      assert fn(pred, target, empty="reference") == 0.0


def test_raise_policy_where_medpy_raises(golden):
  behaviour = golden("medpy_binary__empty_masks_behaviour")["meta"]["behaviour"]
  empty, gt = _one_empty_pair()
  pairs = {"empty_result": (empty, gt), "empty_reference": (gt, empty), "both_empty": (empty, empty)}
  for situation, (pred, target) in pairs.items():
    for name, fn in SURFACE_METRICS.items():
      assert behaviour[situation][name]["raises"] == "RuntimeError"
      with pytest.raises(ValueError, match="empty"):
        fn(pred, target, empty="raise")
  # Dice / Jaccard with exactly one empty mask are well defined (0, as medpy returns).
  for situation in ("empty_result", "empty_reference"):
    pred, target = pairs[situation]
    assert metrics.dice(pred, target, empty="raise") == behaviour[situation]["dc"]["returns"] == 0.0
    assert metrics.jaccard(pred, target, empty="raise") == behaviour[situation]["jc"]["returns"]
  # Both empty: medpy returns NaN / 1.0 (meaningless); we raise.
  for fn in (metrics.dice, metrics.jaccard):
    with pytest.raises(ValueError, match="both empty"):
      fn(empty, empty, empty="raise")


def test_worst_never_returns_the_best_value_for_a_missed_structure():
  empty, gt = _one_empty_pair()
  got = metrics.case_metrics(empty.astype(np.int64), gt.astype(np.int64))[1]
  assert got["dice"] == 0.0 and got["hd95"] > 0 and got["asd"] > 0
  assert got["pred_empty"] and not got["gt_empty"]


# ---------------------------------------------------------------------------------------------------
# Properties on random blob pairs.


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(28, 24, 12), (40, 36)])
def test_metric_properties(seed, shape):
  pred = _blob(shape, 2 * seed)
  gt = _blob(shape, 2 * seed + 1)
  spacing = (0.8, 1.25, 2.0)[:len(shape)]
  for sp in (None, spacing):
    d = metrics.dice(pred, gt, sp)
    assert 0.0 <= d <= 1.0
    np.testing.assert_allclose(metrics.jaccard(pred, gt, sp), d / (2 - d), rtol=1e-12)
    for fn in (metrics.dice, metrics.jaccard, metrics.hd, metrics.hd95, metrics.mae):
      assert fn(pred, gt, sp) == fn(gt, pred, sp), fn.__name__
    # assd pools the two directions in argument order, so only the float summation order differs.
    np.testing.assert_allclose(metrics.assd(pred, gt, sp), metrics.assd(gt, pred, sp), rtol=1e-14)
    forward = metrics.surface_metrics(pred, gt, sp)
    backward = metrics.surface_metrics(gt, pred, sp)
    assert forward.asd_reverse == backward.asd
    assert forward.hd >= forward.hd95 >= 0.0
    assert forward.asd <= forward.hd and forward.assd <= forward.hd
    assert min(forward.asd, backward.asd) <= forward.assd <= max(forward.asd, backward.asd)


def test_identical_masks_are_perfect():
  mask = _blob((20, 18, 10), 7)
  got = metrics.surface_metrics(mask, mask, (0.5, 0.5, 1.0))
  assert got.as_dict() == {"hd": 0.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0, "asd_reverse": 0.0}
  assert metrics.dice(mask, mask) == metrics.jaccard(mask, mask) == 1.0


def test_dense_surfaces_take_the_edt_route_and_agree():
  pred = np.random.default_rng(3).random((24, 20, 16)) < 0.3  # salt noise: very dense surfaces
  gt = _blob((24, 20, 16), 4)
  spacing = np.array([0.625, 0.625, 2.5])
  by_tree = metrics._directed_surface_distances(pred, gt, spacing, "tree")
  by_edt = metrics._directed_surface_distances(pred, gt, spacing, "edt")
  for tree_d, edt_d in zip(by_tree, by_edt):
    np.testing.assert_allclose(tree_d, edt_d, rtol=1e-12)
  np.testing.assert_allclose(metrics.asd(pred, gt, spacing), by_edt[0].mean(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# case_metrics on label maps.


def test_case_metrics_multiclass():
  shape = (24, 20, 12)
  gt = np.zeros(shape, np.int64)
  pred = np.zeros(shape, np.int64)
  gt[_blob(shape, 10)] = 1
  gt[3:9, 3:9, 2:8] = 2
  pred[_blob(shape, 11)] = 1
  pred[4:10, 3:9, 2:8] = 2
  pred[20:23, 15:18, 5:8] = 3  # class 3 only in the prediction
  spacing = (0.625, 0.625, 2.5)
  got = metrics.case_metrics(pred, gt, spacing, classes=(1, 2, 3, 4))
  assert set(got) == {1, 2, 3, 4}
  keys = {"dice", "jaccard", "hd", "hd95", "asd", "assd", "mae", "pred_empty", "gt_empty"}
  for c in (1, 2):
    assert set(got[c]) == keys
    p, g = pred == c, gt == c
    assert got[c]["dice"] == metrics.dice(p, g)
    assert got[c]["jaccard"] == metrics.jaccard(p, g)
    assert got[c]["mae"] == metrics.mae(p, g)
    for name, fn in SURFACE_METRICS.items():
      assert got[c][name] == fn(p, g, spacing), (c, name)
    assert got[c]["pred_empty"] is False and got[c]["gt_empty"] is False
  # Class 3: spurious structure, gt empty -> worst values, flagged for exclusion.
  assert got[3]["gt_empty"] is True and got[3]["pred_empty"] is False
  assert got[3]["dice"] == 0.0 and got[3]["hd"] == metrics.image_diagonal(shape, spacing)
  # Class 4: absent from both -> NaN (undefined), mae still 0.
  assert got[4]["gt_empty"] is True and got[4]["pred_empty"] is True
  assert math.isnan(got[4]["dice"]) and math.isnan(got[4]["hd95"])
  assert got[4]["mae"] == 0.0
  assert metrics.case_metrics(pred, gt, classes=(4,), empty="reference")[4]["hd95"] == 0.0


def test_case_metrics_default_is_class_one():
  gt = np.zeros((10, 10), np.uint8)
  gt[2:6, 2:6] = 1
  got = metrics.case_metrics(gt, gt)
  assert list(got) == [1] and got[1]["dice"] == 1.0 and got[1]["hd95"] == 0.0


# ---------------------------------------------------------------------------------------------------
# Bad input.


def test_shape_mismatch():
  with pytest.raises(ValueError, match="same shape"):
    metrics.dice(np.zeros((4, 5)), np.zeros((5, 4)))
  with pytest.raises(ValueError, match="same shape"):
    metrics.case_metrics(np.zeros((4, 5), int), np.zeros((4, 6), int))


def test_wrong_spacing():
  a = np.ones((4, 5, 6), bool)
  with pytest.raises(ValueError, match="one entry per axis"):
    metrics.hd95(a, a, spacing=(1.0, 1.0))
  with pytest.raises(ValueError, match="one entry per axis"):
    metrics.surface_metrics(a, a, spacing=1.0)
  with pytest.raises(ValueError, match="positive"):
    metrics.asd(a, a, spacing=(1.0, 0.0, 1.0))


def test_unknown_empty_policy():
  a = np.ones((4, 5), bool)
  for fn in (metrics.dice, metrics.hd, metrics.mae, metrics.case_metrics):
    with pytest.raises(ValueError, match="empty-mask policy"):
      fn(a, a, empty="best")


def test_wrong_ndim_and_non_binary_values():
  with pytest.raises(ValueError, match="2-D or 3-D"):
    metrics.dice(np.ones(5), np.ones(5))
  with pytest.raises(ValueError, match="2-D or 3-D"):
    metrics.hd(np.ones((2, 3, 4, 5)), np.ones((2, 3, 4, 5)))
  labels = np.zeros((4, 4), np.int64)
  labels[0, 0] = 2
  with pytest.raises(ValueError, match="binary"):
    metrics.dice(labels, labels)
  with pytest.raises(ValueError, match="binary"):
    metrics.hd95(np.full((4, 4), 0.7), np.ones((4, 4)))
  with pytest.raises(ValueError, match="integer label map"):
    metrics.case_metrics(np.zeros((4, 4)), np.zeros((4, 4)))
