import numpy as np
import pytest

from jaxseg.data import augment
from jaxseg.data.base import DataError


def coordinate_volume(shape):
  """A volume whose value encodes each voxel's coordinates, so that crops can be located."""
  grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
  code = sum(g * 1000 ** (len(shape) - 1 - i) for i, g in enumerate(grids))
  return code.astype(np.float64)[..., None], code.astype(np.int64)


def test_rot_flip_follows_the_reference_draw_order():
  image, label = coordinate_volume((5, 7, 3))
  for seed in range(12):
    out_image, out_label = augment.random_rot_flip(image, label, np.random.default_rng(seed))
    draws = np.random.default_rng(seed)
    k, axis = int(draws.integers(0, 4)), int(draws.integers(0, 2))
    expected = np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
    np.testing.assert_array_equal(out_label, expected)
    np.testing.assert_array_equal(out_image[..., 0], expected)  # same transform on both


def test_rot_flip_gives_the_four_reflections_only():
  # Reference quirk: the flip is always applied, and flipping axis 0 equals a 180-degree turn followed
  # by a flip of axis 1, so rot90^k + flip yields the 4 reflections of the square, never the identity
  # or a pure rotation.
  image, label = coordinate_volume((4, 4, 2))
  seen = {augment.random_rot_flip(image, label, np.random.default_rng(s))[1].tobytes()
          for s in range(200)}
  reflections = {np.flip(np.rot90(label, k, axes=(0, 1)), axis=1).tobytes() for k in range(4)}
  assert seen == reflections and len(reflections) == 4
  assert label.tobytes() not in seen


@pytest.mark.parametrize("shape, patch, expected", [
    ((200, 150, 88), (112, 112, 80), (0, 0, 0)),      # LA: never padded
    ((115, 150, 80), (112, 112, 80), (1, 0, 3)),      # 80 <= 80 fires; (112-115)//2+3 = 1
    ((100, 112, 60), (112, 112, 80), (9, 3, 13)),
    ((40, 50), (32, 32), (0, 0)),
])
def test_crop_padding_rule(shape, patch, expected):
  assert augment.crop_padding(shape, patch) == expected


def test_crop_takes_the_window_at_a_uniform_offset_with_exclusive_upper_bound():
  image, label = coordinate_volume((10, 9, 8))
  patch = (6, 6, 6)
  offsets = []
  for seed in range(300):
    out_image, out_label = augment.random_crop(image, label, patch, np.random.default_rng(seed))
    assert out_image.shape == (*patch, 1) and out_label.shape == patch
    corner = np.unravel_index(np.flatnonzero(label == out_label[0, 0, 0])[0], label.shape)
    window = tuple(slice(c, c + p) for c, p in zip(corner, patch))
    np.testing.assert_array_equal(out_label, label[window])
    np.testing.assert_array_equal(out_image, image[window])
    offsets.append(corner)
  offsets = np.array(offsets)
  # o_i ~ U{0, ..., S_i - P_i - 1}: S - P itself never occurs.
  np.testing.assert_array_equal(offsets.min(0), [0, 0, 0])
  np.testing.assert_array_equal(offsets.max(0), [3, 2, 1])


def test_small_volume_is_zero_padded_then_cropped():
  image = np.ones((5, 20, 4, 2), np.float32)
  label = np.ones((5, 20, 4), np.int64)
  out_image, out_label = augment.random_crop(image, label, (8, 8, 8), np.random.default_rng(0))
  assert out_image.shape == (8, 8, 8, 2) and out_label.shape == (8, 8, 8)
  # Padding adds (8-5)//2+3 = 4 zeros each side along x: the 13-wide padded axis has 5 ones.
  assert 0 < out_label.sum() < out_label.size
  np.testing.assert_array_equal(out_image[..., 0] > 0, out_label > 0)


def test_no_padding_and_patch_too_large_names_the_file():
  image = np.zeros((10, 10, 4, 1), np.float32)
  with pytest.raises(DataError, match="case_17.h5.*data.pad_to_patch"):
    augment.random_crop(image, None, (8, 8, 8), np.random.default_rng(0), pad=False,
                        source="/data/case_17.h5")


def test_2d_crop_and_rot_flip():
  image, label = coordinate_volume((12, 10))
  image2, label2 = augment.random_rot_flip(image, label, np.random.default_rng(3))
  out_image, out_label = augment.random_crop(image2, label2, (8, 8), np.random.default_rng(3))
  assert out_image.shape == (8, 8, 1) and out_label.shape == (8, 8)
