"""Tests for jaxseg.data.preprocess: per-modality percentile clipping and z-scoring."""

from __future__ import annotations

import numpy as np
import pytest

from jaxseg.data.base import Case, DataError
from jaxseg.data import preprocess
from jaxseg.data.preprocess import clip_percentiles, preprocess_case, zscore


def _two_channels() -> np.ndarray:
  """(11, 1, 2): channel 0 holds 0..10, channel 1 holds 0, 100, ..., 1000."""
  values = np.arange(11, dtype=np.float32)
  return np.stack([values, 100.0 * values], axis=-1)[:, np.newaxis, :]


def test_clip_percentiles_hand_checked():
  # 11 values 0..10: linear-interpolated 10th and 90th percentiles are exactly 1 and 9.
  clipped = clip_percentiles(_two_channels(), lower=10, upper=90)
  np.testing.assert_array_equal(clipped[:, 0, 0], [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9])
  np.testing.assert_array_equal(clipped[:, 0, 1], [100, 100, 200, 300, 400, 500, 600, 700, 800,
                                                   900, 900])
  assert clipped.dtype == np.float32


def test_clip_percentiles_default_and_interpolation():
  # 0.5th / 99.5th percentile of 0..10: 0.05 and 9.95 (numpy's linear interpolation).
  clipped = clip_percentiles(_two_channels())
  assert clipped[0, 0, 0] == pytest.approx(0.05) and clipped[-1, 0, 0] == pytest.approx(9.95)
  assert clipped[0, 0, 1] == pytest.approx(5.0) and clipped[-1, 0, 1] == pytest.approx(995.0)


def test_clip_percentiles_per_channel_and_input_untouched():
  image = _two_channels()
  copy = image.copy()
  alone = clip_percentiles(image[..., :1], 10, 90)
  together = clip_percentiles(image, 10, 90)
  np.testing.assert_array_equal(together[..., :1], alone)  # Channel 1 does not affect channel 0.
  np.testing.assert_array_equal(image, copy)


def test_clip_percentiles_over_whole_volume_3d():
  image = np.zeros((4, 5, 5, 1), np.float32)
  image[0, 0, 0, 0] = 1000.0  # 1 of 100 voxels: above the 98th percentile, which is 0.
  assert clip_percentiles(image, 0, 98).max() == 0.0


def test_clip_percentiles_bad_range_names_clip():
  with pytest.raises(DataError, match="clip"):
    clip_percentiles(_two_channels(), lower=60, upper=40)


def test_zscore_hand_checked():
  image = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(2, 2, 1)
  # mean 2.5, population std sqrt(1.25).
  expected = (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / np.sqrt(1.25)
  out = zscore(image)
  assert out.dtype == np.float32 and out.shape == image.shape
  np.testing.assert_allclose(out.ravel(), expected, rtol=1e-6)


def test_zscore_per_channel():
  rng = np.random.default_rng(0)
  image = np.stack([rng.normal(5.0, 2.0, size=(6, 7)), rng.normal(-300.0, 50.0, size=(6, 7))],
                   axis=-1).astype(np.float32)
  out = zscore(image)
  np.testing.assert_allclose(out.mean(axis=(0, 1)), [0.0, 0.0], atol=1e-5)
  np.testing.assert_allclose(out.std(axis=(0, 1)), [1.0, 1.0], rtol=1e-5)
  np.testing.assert_allclose(out[..., :1], zscore(image[..., :1]), rtol=1e-6)


def test_zscore_constant_channel_names_source_and_channel():
  image = np.stack([np.arange(6.0), np.full(6, 3.0)], axis=-1).reshape(2, 3, 2)
  with pytest.raises(DataError, match="channel 1 is constant") as err:
    zscore(image, source="/data/x.nii.gz")
  assert "/data/x.nii.gz" in str(err.value)


def test_zscore_non_finite_names_source():
  image = np.array([1.0, np.nan, 3.0, 4.0], np.float32).reshape(2, 2, 1)
  with pytest.raises(DataError, match="NaN/inf") as err:
    zscore(image, source="/data/x.nii.gz")
  assert "/data/x.nii.gz" in str(err.value)


def _case(image: np.ndarray) -> Case:
  return Case(case_id="x", image=image, label=np.zeros(image.shape[:-1], np.uint8),
              spacing=(1.0,) * (image.ndim - 1), affine=np.eye(4), source="/data/x.nii.gz")


def test_preprocess_case_clips_then_zscores():
  case = _case(_two_channels())
  out = preprocess_case(case, clip=(10, 90))
  expected = zscore(clip_percentiles(case.image, 10, 90))
  np.testing.assert_allclose(out.image, expected, rtol=1e-6)
  assert out.image.dtype == np.float32
  assert out is not case and out.label is case.label and out.affine is case.affine
  assert out.spacing == case.spacing and out.source == case.source
  np.testing.assert_array_equal(case.image, _two_channels())  # The input case is unchanged.


def test_preprocess_case_options():
  case = _case(_two_channels())
  np.testing.assert_array_equal(preprocess_case(case, clip=None, zscore=False).image, case.image)
  np.testing.assert_allclose(preprocess_case(case, clip=None).image, zscore(case.image))
  np.testing.assert_array_equal(preprocess_case(case, clip=(10, 90), zscore=False).image,
                                clip_percentiles(case.image, 10, 90))


def test_preprocess_case_constant_after_clip_names_source():
  image = np.zeros((10, 10, 1), np.float32)
  image[0, 0, 0] = 5.0  # 1 % of the pixels: clipping at the 98th percentile flattens it.
  with pytest.raises(DataError, match="constant") as err:
    preprocess_case(_case(image), clip=(0.5, 98))
  assert "/data/x.nii.gz" in str(err.value) and "clipping" in str(err.value)


def test_preprocess_case_bad_clip_names_clip():
  with pytest.raises(DataError, match="clip"):
    preprocess_case(_case(_two_channels()), clip=(1, 50, 99))


def test_zscore_over_the_nonzero_voxels_by_hand():
  """nnU-Net's MR normalisation: statistics over the voxels where some channel is non-zero (a hole
  inside that region counts), the background set to 0."""
  image = np.zeros((5, 5, 2), np.float32)
  image[1:4, 1:4, 0] = [[1, 2, 3], [4, 0, 6], [7, 8, 9]]  # (2, 2) is a hole inside the body.
  image[1:4, 1:4, 1] = 10.0
  image[2, 2, 1] = 0.0
  image[1, 1, 1] = 20.0
  mask = np.zeros((5, 5), bool)
  mask[1:4, 1:4] = True
  np.testing.assert_array_equal(preprocess.nonzero_mask(image), mask)
  out = zscore(image, nonzero=True)
  for c in range(2):
    values = image[..., c][mask].astype(np.float64)
    want = (values - values.mean()) / values.std()
    np.testing.assert_allclose(out[..., c][mask], want, rtol=1e-6)
  assert np.all(out[~mask] == 0)
  # Differs from the whole-image z-score (the background's zeros shift the mean there).
  assert not np.allclose(zscore(image)[mask], out[mask])


def test_zscore_nonzero_errors_name_the_source():
  with pytest.raises(DataError, match=r"^scan.nii.gz: every voxel is 0"):
    zscore(np.zeros((4, 4, 1), np.float32), source="scan.nii.gz", nonzero=True)
  image = np.zeros((4, 4, 1), np.float32)
  image[1:3, 1:3] = 5.0  # Constant inside the mask.
  with pytest.raises(DataError, match=r"^scan.nii.gz: channel 0 is constant"):
    zscore(image, source="scan.nii.gz", nonzero=True)
