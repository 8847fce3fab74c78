"""Tests of jaxseg.data.readers: finding `--mode predict` inputs, naming their outputs, and reading
NIfTI / h5 / 2D files as the training data were read, on tiny files."""

from __future__ import annotations

import pathlib

import h5py
import ml_collections
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from jaxseg import config_blocks
from jaxseg.data import preprocess, readers
from jaxseg.data.base import DataError

SHAPE = (6, 5, 4)


def _data_cfg(**changes):
  """The keys of the `data` block that the readers use, at their defaults."""
  cfg = ml_collections.ConfigDict(dict(channels=0, image_size=(), clip_percentiles=(), zscore=False))
  cfg.update(changes)
  return cfg


def _touch(path: pathlib.Path, data: bytes = b"") -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


def test_input_kind_by_name():
  kinds = {name: readers.input_kind(pathlib.Path(name))
           for name in ("a.nii.gz", "B.NII", "c.h5", "d.png", "e.TIF", "f.jpeg", "g.txt",
                        "._a.nii.gz", ".hidden.png", "h.nii.gz.bak")}
  assert kinds == {"a.nii.gz": "nifti", "B.NII": "nifti", "c.h5": "h5", "d.png": "image",
                   "e.TIF": "image", "f.jpeg": "image", "g.txt": None, "._a.nii.gz": None,
                   ".hidden.png": None, "h.nii.gz.bak": None}


def test_find_input_files_in_a_folder(tmp_path):
  wanted = [_touch(tmp_path / name) for name in ("b.nii.gz", "a.png", "c.h5")]
  wanted.append(_touch(tmp_path / "LA" / "deep" / "CASE_A" / "mri_norm2.h5"))
  for name in ("notes.txt", "._b.nii.gz", "sub/x.nii.gz"):  # Other files; no recursion for NIfTI.
    _touch(tmp_path / name)
  assert readers.find_input_files(tmp_path) == sorted(wanted)
  assert readers.find_input_files(tmp_path / "a.png") == [tmp_path / "a.png"]


def test_find_input_files_errors(tmp_path):
  with pytest.raises(DataError, match="missing"):
    readers.find_input_files(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.md").write_text("")
  with pytest.raises(DataError, match="no supported input files"):
    readers.find_input_files(tmp_path / "empty")
  with pytest.raises(DataError, match="readme.md"):
    readers.find_input_files(tmp_path / "empty" / "readme.md")


def test_output_names():
  names = {p: readers.output_name(pathlib.Path(p))
           for p in ("x/BRATS_001.nii.gz", "y.nii", "LA/CASE_A/mri_norm2.h5", "z/vol.h5",
                     "w/im.tif")}
  assert names == {"x/BRATS_001.nii.gz": "BRATS_001.nii.gz", "y.nii": "y.nii.gz",
                   "LA/CASE_A/mri_norm2.h5": "CASE_A.nii.gz", "z/vol.h5": "vol.nii.gz",
                   "w/im.tif": "im.png"}


def test_read_3d_nifti_keeps_header_and_adds_a_channel(tmp_path):
  image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
  affine = np.diag([0.5, 0.5, 2.0, 1.0])
  nib.save(nib.Nifti1Image(image, affine), tmp_path / "v.nii.gz")
  source = readers.read_input(tmp_path / "v.nii.gz", _data_cfg())
  case = source.case
  assert case.image.shape == (*SHAPE, 1) and case.image.dtype == np.float32 and case.label is None
  np.testing.assert_array_equal(case.image[..., 0], image)
  np.testing.assert_array_equal(case.present, [True])
  assert dict(case.fields) == {} and case.source == str(tmp_path / "v.nii.gz")
  np.testing.assert_allclose(source.nifti.affine, affine)
  assert source.original_size is None


def test_read_4d_nifti_with_zscore(tmp_path):
  image = np.random.default_rng(0).normal(3.0, 2.0, size=(*SHAPE, 2)).astype(np.float32)
  nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "mm.nii")
  case = readers.read_input(tmp_path / "mm.nii", _data_cfg(zscore=True)).case
  np.testing.assert_allclose(case.image, preprocess.zscore(image), rtol=1e-6)


def test_read_h5(tmp_path):
  image = np.random.default_rng(1).uniform(size=SHAPE).astype(np.float32)
  with h5py.File(tmp_path / "a.h5", "w") as f:
    f["image"] = image
  source = readers.read_input(tmp_path / "a.h5", _data_cfg())
  np.testing.assert_array_equal(source.case.image[..., 0], image)
  assert source.nifti is None and source.original_size is None
  with h5py.File(tmp_path / "b.h5", "w") as f:
    f["volume"] = image
  with pytest.raises(DataError, match="b.h5.*no `image` dataset"):
    readers.read_input(tmp_path / "b.h5", _data_cfg())
  _touch(tmp_path / "c.h5", b"not h5")
  with pytest.raises(DataError, match="c.h5.*not a readable h5"):
    readers.read_input(tmp_path / "c.h5", _data_cfg())


def test_read_2d_image_resized_like_training(tmp_path):
  gray = np.zeros((7, 9), np.uint8)
  gray[2:5, 3:8] = 255
  Image.fromarray(gray).save(tmp_path / "b.png")
  source = readers.read_input(tmp_path / "b.png", _data_cfg())
  assert source.case.image.shape == (7, 9, 1) and source.original_size == (7, 9)
  np.testing.assert_array_equal(source.case.image[..., 0], gray / 255.0)
  resized = readers.read_input(tmp_path / "b.png", _data_cfg(image_size=(14, 18)))
  assert resized.case.image.shape == (14, 18, 1) and resized.original_size == (7, 9)
  rgb = readers.read_input(tmp_path / "b.png", _data_cfg(channels=3)).case
  assert rgb.image.shape == (7, 9, 3)


def test_read_errors_name_the_file(tmp_path):
  nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
  with pytest.raises(DataError, match="flat.nii.gz.*3D"):
    readers.read_input(tmp_path / "flat.nii.gz", _data_cfg())
  image = np.zeros(SHAPE, np.float32)
  image[0, 0, 0] = np.nan
  nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "nan.nii.gz")
  with pytest.raises(DataError, match="nan.nii.gz.*NaN"):
    readers.read_input(tmp_path / "nan.nii.gz", _data_cfg())


def test_read_input_z_scores_over_the_nonzero_voxels_when_asked(tmp_path):
  """--mode predict inputs get the training preprocessing, nnU-Net's non-zero z-score included:
  the zero background stays 0 and the statistics are the body's."""
  rng = np.random.default_rng(0)
  image = np.zeros((10, 9, 8, 2), np.float32)
  image[2:8, 2:7, 1:7] = 50.0 + rng.normal(size=(6, 5, 6, 2)).astype(np.float32)
  nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "mm.nii.gz")
  cfg = config_blocks.data_block()
  cfg.update(dict(zscore=True, zscore_nonzero=True))
  got = readers.read_input(tmp_path / "mm.nii.gz", cfg).case.image
  np.testing.assert_allclose(got, preprocess.zscore(image, nonzero=True), rtol=1e-6, atol=1e-6)
  assert np.all(got[:2] == 0) and abs(float(got[2:8, 2:7, 1:7].mean())) < 1e-4
