"""Tests for jaxseg.data.msd: the MSD dataset.json + NIfTI layout, on tiny fake files."""

from __future__ import annotations

import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from jaxseg.data import msd
from jaxseg.data.base import DataError

SPATIAL = (5, 4, 3)
SPACING = (1.5, 2.0, 3.0)
AFFINE = np.array([[1.5, 0.0, 0.0, -10.0],
                   [0.0, 2.0, 0.0, 20.0],
                   [0.0, 0.0, 3.0, 5.0],
                   [0.0, 0.0, 0.0, 1.0]])
CASE_IDS = ("BRATS_002", "BRATS_001", "BRATS_003")  # Manifest order, deliberately not sorted.


def _save_nifti(path: pathlib.Path, data: np.ndarray, affine=AFFINE) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine), path)
  return path


def _image(seed: int, modalities: int = 2) -> np.ndarray:
  """An (X, Y, Z, M) image whose channel m is offset by 100 * m, to tell channels apart."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=SPATIAL + (modalities,)) + 100.0 * np.arange(modalities)).astype(
      np.float32)


def _label(seed: int, num_classes: int = 3) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, num_classes, size=SPATIAL).astype(np.uint8)


def _write_dataset(root: pathlib.Path, modalities=("FLAIR", "T1w"),
                   labels=("background", "edema", "tumour"), image_ndim=4) -> pathlib.Path:
  """A tiny MSD task: 3 training cases, 1 test image, a macOS "._" file to be ignored."""
  pairs = []
  for seed, case_id in enumerate(CASE_IDS):
    image = _image(seed, len(modalities))
    if image_ndim == 3:
      image = image[..., 0]
    _save_nifti(root / "imagesTr" / f"{case_id}.nii.gz", image)
    _save_nifti(root / "labelsTr" / f"{case_id}.nii.gz", _label(seed, len(labels)))
    pairs.append({"image": f"./imagesTr/{case_id}.nii.gz",
                  "label": f"./labelsTr/{case_id}.nii.gz"})
  _save_nifti(root / "imagesTs" / "BRATS_900.nii.gz", _image(9, len(modalities)))
  (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
  manifest = {
      "name": "FAKE",
      "modality": {str(i): m for i, m in enumerate(modalities)},
      "labels": {str(i): name for i, name in enumerate(labels)},
      "numTraining": len(pairs),
      "training": pairs,
      "test": ["./imagesTs/BRATS_900.nii.gz"],
  }
  (root / "dataset.json").write_text(json.dumps(manifest, indent=2))
  return root


@pytest.fixture
def msd_root(tmp_path):
  return _write_dataset(tmp_path / "Task01_Fake")


def _edit_manifest(root: pathlib.Path, **changes) -> None:
  manifest = json.loads((root / "dataset.json").read_text())
  manifest.update(changes)
  for key, value in changes.items():
    if value is None:
      del manifest[key]
  (root / "dataset.json").write_text(json.dumps(manifest))


def _snapshot(root: pathlib.Path) -> dict:
  return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_read_manifest(msd_root):
  manifest = msd.read_msd_manifest(msd_root)
  assert manifest.name == "FAKE"
  assert manifest.modalities == ("FLAIR", "T1w") and manifest.num_modalities == 2
  assert manifest.label_names == ("background", "edema", "tumour") and manifest.num_classes == 3
  assert [p.case_id for p in manifest.training] == list(CASE_IDS)
  # The "./" of MSD paths is dropped and paths are resolved against the root.
  assert manifest.training[0].image == msd_root / "imagesTr" / "BRATS_002.nii.gz"
  assert manifest.training[0].label == msd_root / "labelsTr" / "BRATS_002.nii.gz"
  assert manifest.test == (msd_root / "imagesTs" / "BRATS_900.nii.gz",)


def test_manifest_without_test_key(msd_root):
  _edit_manifest(msd_root, test=None)
  assert msd.read_msd_manifest(msd_root).test == ()


def test_manifest_modality_indices_in_order(msd_root):
  _edit_manifest(msd_root, modality={"1": "T1w", "0": "FLAIR"})
  assert msd.read_msd_manifest(msd_root).modalities == ("FLAIR", "T1w")


def test_load_msd_multimodal_channels_last(msd_root):
  cases = msd.load_msd(msd_root)
  assert [c.case_id for c in cases] == list(CASE_IDS)  # Manifest order; the "._" file is ignored.
  case = cases[1]
  assert case.image.shape == SPATIAL + (2,) and case.image.dtype == np.float32
  assert case.num_modalities == 2
  assert case.modalities == ("FLAIR", "T1w") and case.present.tolist() == [True, True]
  np.testing.assert_allclose(case.image, _image(1, 2))  # Modality m stays on channel m.
  assert case.label.shape == SPATIAL and case.label.dtype == np.uint8
  np.testing.assert_array_equal(case.label, _label(1))
  assert case.spacing == SPACING
  np.testing.assert_allclose(case.affine, AFFINE)
  assert case.source == str(msd_root / "imagesTr" / "BRATS_001.nii.gz")


def test_load_msd_3d_single_modality(tmp_path):
  root = _write_dataset(tmp_path / "Task09_Fake", modalities=("CT",), labels=("bg", "spleen"),
                        image_ndim=3)
  case = msd.load_msd(root)[0]
  assert case.image.shape == SPATIAL + (1,)
  assert case.spacing == SPACING
  assert set(np.unique(case.label).tolist()) <= {0, 1}


def test_load_msd_ids_in_given_order(msd_root):
  cases = msd.load_msd(msd_root, ids=["BRATS_003", "BRATS_001"])
  assert [c.case_id for c in cases] == ["BRATS_003", "BRATS_001"]


def test_float_label_with_integral_values_is_rounded(msd_root):
  _save_nifti(msd_root / "labelsTr" / "BRATS_001.nii.gz", _label(1).astype(np.float32))
  case = msd.load_msd(msd_root, ids=["BRATS_001"])[0]
  assert case.label.dtype == np.uint8
  np.testing.assert_array_equal(case.label, _label(1))


def test_unknown_id_names_manifest(msd_root):
  with pytest.raises(DataError, match="BRATS_404") as err:
    msd.load_msd(msd_root, ids=["BRATS_404"])
  assert "dataset.json" in str(err.value)


def test_missing_root(tmp_path):
  with pytest.raises(DataError, match="not found") as err:
    msd.load_msd(tmp_path / "Task99")
  assert "Task99" in str(err.value)


def test_missing_manifest_names_file(msd_root):
  (msd_root / "dataset.json").unlink()
  with pytest.raises(DataError, match="not found") as err:
    msd.load_msd(msd_root)
  assert str(msd_root / "dataset.json") in str(err.value)


def test_invalid_json_names_file(msd_root):
  (msd_root / "dataset.json").write_text('{"name": "FAKE", "training": [')
  with pytest.raises(DataError, match="not valid JSON") as err:
    msd.read_msd_manifest(msd_root)
  assert str(msd_root / "dataset.json") in str(err.value)


@pytest.mark.parametrize("key", ["name", "modality", "labels", "training"])
def test_missing_key_names_file_and_key(msd_root, key):
  _edit_manifest(msd_root, **{key: None})
  with pytest.raises(DataError, match=key) as err:
    msd.read_msd_manifest(msd_root)
  assert "dataset.json" in str(err.value)


@pytest.mark.parametrize("key, value", [
    ("labels", {"0": "background", "2": "tumour"}),  # Gap in the class indices.
    ("labels", {"background": 0, "tumour": 1}),  # nnU-Net v2 style, not MSD.
    ("modality", []),
    ("training", [{"image": "./imagesTr/BRATS_001.nii.gz"}]),  # No label.
    ("training", [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/a.nii.gz"}] * 2),
    ("test", "./imagesTs/BRATS_900.nii.gz"),  # Not a list.
])
def test_malformed_entry_names_file_and_key(msd_root, key, value):
  _edit_manifest(msd_root, **{key: value})
  with pytest.raises(DataError) as err:
    msd.read_msd_manifest(msd_root)
  assert "dataset.json" in str(err.value) and key in str(err.value)


@pytest.mark.parametrize("folder", ["imagesTr", "labelsTr"])
def test_listed_file_missing_names_file(msd_root, folder):
  path = msd_root / folder / "BRATS_003.nii.gz"
  path.unlink()
  with pytest.raises(DataError, match="not found") as err:
    msd.load_msd(msd_root)
  assert str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"not a nifti file", b""])
def test_unreadable_nifti_names_file(msd_root, content):
  path = msd_root / "labelsTr" / "BRATS_001.nii.gz"
  path.write_bytes(content)
  before = _snapshot(msd_root)
  with pytest.raises(DataError, match="not a readable NIfTI") as err:
    msd.load_msd(msd_root)
  assert str(path) in str(err.value)
  assert _snapshot(msd_root) == before  # A failing load leaves every input file untouched.


def test_truncated_nifti_names_file(msd_root):
  path = msd_root / "imagesTr" / "BRATS_001.nii.gz"
  _save_nifti(path, np.random.default_rng(0).normal(size=(40, 40, 40, 2)).astype(np.float32))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 2000])  # Header intact, data cut short.
  with pytest.raises(DataError, match="not a readable NIfTI") as err:
    msd.load_msd(msd_root, ids=["BRATS_001"])
  assert str(path) in str(err.value)


def test_shape_mismatch_names_files(msd_root):
  label_path = _save_nifti(msd_root / "labelsTr" / "BRATS_001.nii.gz",
                           np.zeros((5, 4, 2), np.uint8))
  with pytest.raises(DataError, match="differ") as err:
    msd.load_msd(msd_root, ids=["BRATS_001"])
  assert str(msd_root / "imagesTr" / "BRATS_001.nii.gz") in str(err.value)
  assert str(label_path) in str(err.value)


def test_label_outside_declared_classes_names_file(msd_root):
  label = _label(1)
  label[0, 0, 0] = 4  # Classes are 0..2.
  path = _save_nifti(msd_root / "labelsTr" / "BRATS_001.nii.gz", label)
  with pytest.raises(DataError, match=r"\[4\]") as err:
    msd.load_msd(msd_root, ids=["BRATS_001"])
  assert str(path) in str(err.value)


def test_non_integral_label_names_file(msd_root):
  label = _label(1).astype(np.float32)
  label[0, 0, 0] = 0.5
  path = _save_nifti(msd_root / "labelsTr" / "BRATS_001.nii.gz", label)
  with pytest.raises(DataError, match="non-integral") as err:
    msd.load_msd(msd_root, ids=["BRATS_001"])
  assert str(path) in str(err.value)


@pytest.mark.parametrize("modalities", [1, 3])
def test_modality_count_mismatch_names_file(msd_root, modalities):
  image = _image(1, modalities)
  path = _save_nifti(msd_root / "imagesTr" / "BRATS_001.nii.gz",
                     image[..., 0] if modalities == 1 else image)
  with pytest.raises(DataError, match="modalities") as err:
    msd.load_msd(msd_root, ids=["BRATS_001"])
  assert str(path) in str(err.value)


@pytest.mark.parametrize("bad_value", [np.nan, -np.inf])
def test_non_finite_image_names_file(msd_root, bad_value):
  image = _image(1)
  image[1, 1, 1, 1] = bad_value
  path = _save_nifti(msd_root / "imagesTr" / "BRATS_001.nii.gz", image)
  with pytest.raises(DataError, match="NaN/inf") as err:
    msd.load_msd(msd_root, ids=["BRATS_001"])
  assert str(path) in str(err.value)
