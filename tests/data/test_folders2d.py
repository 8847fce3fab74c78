"""Tests for jaxseg.data.folders2d: images/ + masks/ folders matched by stem, on tiny fake files."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from jaxseg.data import folders2d
from jaxseg.data.base import DataError

H, W = 6, 8


def _save(path: pathlib.Path, array: np.ndarray, mode=None) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
  img.save(path)
  return path


def _gray(seed: int, shape=(H, W)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _binary_mask(seed: int, shape=(H, W), on: int = 255) -> np.ndarray:
  return np.where(np.random.default_rng(100 + seed).random(shape) > 0.5, on, 0).astype(np.uint8)


@pytest.fixture
def root(tmp_path):
  """Three gray PNG pairs written in unsorted order, plus a JPEG image with a PNG mask."""
  root = tmp_path / "nuclei"
  for seed, stem in enumerate(["c", "a", "b"]):
    _save(root / "images" / f"{stem}.png", _gray(seed))
    _save(root / "masks" / f"{stem}.png", _binary_mask(seed))
  return root


def _snapshot(root: pathlib.Path) -> dict:
  return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_gray_pairs_sorted_scaled_binary(root):
  cases = folders2d.load_folder2d(root)
  assert [c.case_id for c in cases] == ["a", "b", "c"]  # Sorted by stem, not listdir order.
  case = cases[0]  # "a" was written with seed 1.
  assert case.image.shape == (H, W, 1) and case.image.dtype == np.float32
  np.testing.assert_allclose(case.image[..., 0], _gray(1) / 255.0, rtol=1e-6)
  assert case.label.shape == (H, W) and case.label.dtype == np.uint8
  np.testing.assert_array_equal(case.label, _binary_mask(1) > 0)  # 0/255 -> {0, 1}.
  assert case.spacing == (1.0, 1.0) and case.affine is None
  assert case.source == str(root / "images" / "a.png")


def test_stem_match_with_different_extensions(tmp_path):
  root = tmp_path / "d"
  rgb = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
  _save(root / "images" / "x1.JPG", rgb)
  _save(root / "masks" / "x1.png", _binary_mask(0, on=1))  # 0/1 mask.
  _save(root / "images" / "x2.tiff", rgb)
  _save(root / "masks" / "x2.tif", _binary_mask(1))
  cases = folders2d.load_folder2d(root)
  assert [c.case_id for c in cases] == ["x1", "x2"]
  assert cases[0].image.shape == (H, W, 3)
  np.testing.assert_array_equal(cases[0].label, _binary_mask(0, on=1))
  np.testing.assert_allclose(cases[1].image, rgb / 255.0, rtol=1e-6)  # TIFF is lossless.


def test_hidden_and_other_files_ignored(root):
  (root / "images" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
  (root / "images" / ".DS_Store").write_bytes(b"junk")
  (root / "masks" / "notes.txt").write_text("not an image")
  (root / "images" / "sub").mkdir()
  assert len(folders2d.load_folder2d(root)) == 3


def test_rgba_drops_alpha(tmp_path):
  rgba = np.random.default_rng(0).integers(0, 256, size=(H, W, 4), dtype=np.uint8)
  _save(tmp_path / "images" / "a.png", rgba)
  _save(tmp_path / "masks" / "a.png", _binary_mask(0))
  case = folders2d.load_folder2d(tmp_path)[0]
  np.testing.assert_allclose(case.image, rgba[..., :3] / 255.0, rtol=1e-6)


def test_16bit_image_scaled_by_65535(tmp_path):
  values = np.random.default_rng(0).integers(0, 65536, size=(H, W), dtype=np.uint16)
  _save(tmp_path / "images" / "a.png", values)
  _save(tmp_path / "masks" / "a.png", _binary_mask(0))
  case = folders2d.load_folder2d(tmp_path)[0]
  assert case.image.shape == (H, W, 1)
  np.testing.assert_allclose(case.image[..., 0], values / 65535.0, rtol=1e-6)


def test_channels_option(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
  _save(tmp_path / "images" / "a.png", rgb)
  _save(tmp_path / "images" / "b.png", _gray(1))
  for stem in "ab":
    _save(tmp_path / "masks" / f"{stem}.png", _binary_mask(0))
  gray = folders2d.load_folder2d(tmp_path, channels=1)
  assert [c.image.shape for c in gray] == [(H, W, 1)] * 2
  luma = (rgb / 255.0) @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(gray[0].image[..., 0], luma, rtol=1e-5)
  colour = folders2d.load_folder2d(tmp_path, channels=3)
  assert [c.image.shape for c in colour] == [(H, W, 3)] * 2
  np.testing.assert_array_equal(colour[1].image, np.repeat(gray[1].image, 3, axis=-1))


def test_mixed_channels_without_option_names_file(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
  _save(tmp_path / "images" / "a.png", _gray(0))
  _save(tmp_path / "images" / "b.png", rgb)
  for stem in "ab":
    _save(tmp_path / "masks" / f"{stem}.png", _binary_mask(0))
  with pytest.raises(DataError, match="channels=1") as err:
    folders2d.load_folder2d(tmp_path)
  assert str(tmp_path / "images" / "b.png") in str(err.value)


def test_multiclass_mask_keeps_indices(tmp_path):
  mask = np.random.default_rng(0).integers(0, 4, size=(H, W), dtype=np.uint8)
  _save(tmp_path / "images" / "a.png", _gray(0))
  _save(tmp_path / "masks" / "a.png", mask)
  case = folders2d.load_folder2d(tmp_path, num_classes=4)[0]
  np.testing.assert_array_equal(case.label, mask)
  # The same mask read as binary: every non-zero class is foreground.
  binary = folders2d.load_folder2d(tmp_path, num_classes=2)[0]
  np.testing.assert_array_equal(binary.label, mask > 0)


def test_gray_mask_saved_as_rgb_accepted(tmp_path):
  mask = _binary_mask(0)
  _save(tmp_path / "images" / "a.png", _gray(0))
  _save(tmp_path / "masks" / "a.png", np.stack([mask] * 3, axis=-1))
  np.testing.assert_array_equal(folders2d.load_folder2d(tmp_path)[0].label, mask > 0)


def test_colour_mask_names_file(tmp_path):
  mask = np.stack([_binary_mask(0), _binary_mask(1), _binary_mask(0)], axis=-1)
  _save(tmp_path / "images" / "a.png", _gray(0))
  path = _save(tmp_path / "masks" / "a.png", mask)
  with pytest.raises(DataError, match="colour") as err:
    folders2d.load_folder2d(tmp_path)
  assert str(path) in str(err.value)


def test_resize_image_bilinear_mask_nearest(tmp_path):
  mask = np.zeros((H, W), np.uint8)
  mask[:, W // 2:] = 2
  mask[: H // 2, : W // 2] = 1
  _save(tmp_path / "images" / "a.png", _gray(0))
  _save(tmp_path / "masks" / "a.png", mask)
  case = folders2d.load_folder2d(tmp_path, size=(12, 4), num_classes=3)[0]
  assert case.image.shape == (12, 4, 1) and case.label.shape == (12, 4)
  # Nearest keeps exactly the mask's classes and block layout; no blended values appear.
  expected = np.zeros((12, 4), np.uint8)
  expected[:, 2:] = 2
  expected[:6, :2] = 1
  np.testing.assert_array_equal(case.label, expected)
  assert 0.0 <= case.image.min() and case.image.max() <= 1.0


def test_resize_allows_different_image_and_mask_sizes(tmp_path):
  _save(tmp_path / "images" / "a.png", _gray(0, (2 * H, 2 * W)))
  _save(tmp_path / "masks" / "a.png", _binary_mask(0))
  case = folders2d.load_folder2d(tmp_path, size=(H, W))[0]
  assert case.image.shape == (H, W, 1) and case.label.shape == (H, W)


def test_missing_images_folder(tmp_path):
  (tmp_path / "masks").mkdir()
  with pytest.raises(DataError, match="folder not found") as err:
    folders2d.load_folder2d(tmp_path)
  assert str(tmp_path / "images") in str(err.value)


def test_missing_masks_folder(tmp_path):
  _save(tmp_path / "images" / "a.png", _gray(0))
  with pytest.raises(DataError, match="folder not found") as err:
    folders2d.load_folder2d(tmp_path)
  assert str(tmp_path / "masks") in str(err.value)


def test_no_images(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  (tmp_path / "images" / "readme.txt").write_text("no images here")
  with pytest.raises(DataError, match="no images") as err:
    folders2d.load_folder2d(tmp_path)
  assert str(tmp_path / "images") in str(err.value)


def test_image_without_mask_names_it(root):
  (root / "masks" / "b.png").unlink()
  with pytest.raises(DataError, match="without a mask") as err:
    folders2d.load_folder2d(root)
  assert str(root / "images" / "b.png") in str(err.value)


def test_mask_without_image_names_it(root):
  _save(root / "masks" / "zz.png", _binary_mask(0))
  with pytest.raises(DataError, match="without an image") as err:
    folders2d.load_folder2d(root)
  assert str(root / "masks" / "zz.png") in str(err.value)


def test_duplicate_stem_names_files(root):
  _save(root / "images" / "a.tif", _gray(0))
  with pytest.raises(DataError, match="ambiguous") as err:
    folders2d.load_folder2d(root)
  assert "a.tif" in str(err.value) and "a.png" in str(err.value)


@pytest.mark.parametrize("folder", ["images", "masks"])
def test_unreadable_file_names_it(root, folder):
  path = root / folder / "b.png"
  path.write_bytes(b"not a png at all")
  before = _snapshot(root)
  with pytest.raises(DataError, match="not a readable image") as err:
    folders2d.load_folder2d(root)
  assert str(path) in str(err.value)
  assert _snapshot(root) == before  # A failing load leaves every input file untouched.


def test_truncated_png_names_it(root):
  path = _save(root / "images" / "b.png", _gray(0, (64, 64)))
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(DataError, match="not a readable image") as err:
    folders2d.load_folder2d(root)
  assert str(path) in str(err.value)


def test_shape_mismatch_names_files(root):
  path = _save(root / "masks" / "b.png", _binary_mask(0, shape=(H, W + 1)))
  with pytest.raises(DataError, match="differ") as err:
    folders2d.load_folder2d(root)
  assert str(root / "images" / "b.png") in str(err.value) and str(path) in str(err.value)


def test_label_outside_classes_names_file(tmp_path):
  mask = np.zeros((H, W), np.uint8)
  mask[0, 0] = 3
  _save(tmp_path / "images" / "a.png", _gray(0))
  path = _save(tmp_path / "masks" / "a.png", mask)
  with pytest.raises(DataError, match=r"\[3\]") as err:
    folders2d.load_folder2d(tmp_path, num_classes=3)
  assert str(path) in str(err.value)


@pytest.mark.parametrize("kwargs, key", [
    ({"num_classes": 1}, "num_classes"),
    ({"channels": 2}, "channels"),
    ({"size": (0, 4)}, "size"),
    ({"size": (4,)}, "size"),
])
def test_invalid_option_names_key(root, kwargs, key):
  with pytest.raises(DataError, match=key):
    folders2d.load_folder2d(root, **kwargs)
