"""Tests for jaxseg.data.la: LA 2018 h5 layout, on tiny fake files and the real data if present."""

from __future__ import annotations

import pathlib
import zlib

import h5py
import numpy as np
import pytest

from jaxseg.data import la
from jaxseg.data.base import DataError

from conftest import require_la_data

CASE_IDS = ("CASE_B", "CASE_A", "CASE_C")  # List order, deliberately not sorted.
SHAPE = (6, 5, 4)  # (W, H, D) as stored = our (X, Y, Z).


def _write_case(root: pathlib.Path, case_id: str, image=None, label=None) -> pathlib.Path:
  rng = np.random.default_rng(zlib.crc32(case_id.encode()))  # Same data on every run.
  image = rng.normal(size=SHAPE).astype(np.float32) if image is None else image
  label = (rng.random(SHAPE) > 0.7).astype(np.uint8) if label is None else label
  path = la.case_path(root, case_id)
  path.parent.mkdir(parents=True, exist_ok=True)
  with h5py.File(path, "w") as f:
    if image is not False:
      f.create_dataset("image", data=image)
    if label is not False:
      f.create_dataset("label", data=label)
  return path


@pytest.fixture
def la_root(tmp_path):
  root = tmp_path / "la"
  for case_id in CASE_IDS:
    _write_case(root, case_id)
  # Blank lines and stray whitespace, as hand-edited lists have.
  (root / "train.list").write_text("CASE_B\n  CASE_A \n\n CASE_C\n\n")
  return root


def _snapshot(root: pathlib.Path) -> dict:
  """Bytes and mtime of every file under root, to show that loading never writes."""
  return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_read_case_list_strips_whitespace_and_blank_lines(la_root):
  assert la.read_case_list(la_root / "train.list") == list(CASE_IDS)


def test_read_case_list_empty_names_file(tmp_path):
  path = tmp_path / "train.list"
  path.write_text("\n   \n")
  with pytest.raises(DataError, match="empty") as err:
    la.read_case_list(path)
  assert str(path) in str(err.value)


def test_read_case_list_missing_names_file(tmp_path):
  with pytest.raises(DataError, match="not found") as err:
    la.read_case_list(tmp_path / "test.list")
  assert "test.list" in str(err.value)


def test_read_case_list_duplicate_id(tmp_path):
  path = tmp_path / "train.list"
  path.write_text("A\nB\nA\n")
  with pytest.raises(DataError, match="twice") as err:
    la.read_case_list(path)
  assert str(path) in str(err.value)


def test_load_la_case_shapes_dtypes_and_values(la_root):
  case = la.load_la_case(la_root, "CASE_A")
  with h5py.File(la.case_path(la_root, "CASE_A"), "r") as f:
    stored_image, stored_label = f["image"][()], f["label"][()]
  assert case.case_id == "CASE_A"
  assert case.image.shape == SHAPE + (1,) and case.image.dtype == np.float32
  assert case.label.shape == SHAPE and case.label.dtype == np.uint8
  # Axes are kept as stored: (W, H, D) is our (X, Y, Z), no transpose.
  np.testing.assert_array_equal(case.image[..., 0], stored_image)
  np.testing.assert_array_equal(case.label, stored_label)
  assert case.spacing == (1.0, 1.0, 1.0)
  assert case.affine is None
  assert case.source == str(la.case_path(la_root, "CASE_A"))


def test_load_la_follows_list_order(la_root):
  cases = la.load_la(la_root)
  assert [c.case_id for c in cases] == list(CASE_IDS)


def test_load_la_ids_in_given_order(la_root):
  cases = la.load_la(la_root, ids=["CASE_C", "CASE_B"])
  assert [c.case_id for c in cases] == ["CASE_C", "CASE_B"]


def test_load_la_without_list(la_root):
  (la_root / "train.list").unlink()
  cases = la.load_la(la_root, list_name=None, ids=["CASE_A"])
  assert [c.case_id for c in cases] == ["CASE_A"]


def test_load_la_accepts_integer_label_dtype(la_root):
  _write_case(la_root, "CASE_A", label=np.ones(SHAPE, np.int64))
  assert la.load_la_case(la_root, "CASE_A").label.dtype == np.uint8


def test_unknown_id_names_list(la_root):
  with pytest.raises(DataError, match="NOPE") as err:
    la.load_la(la_root, ids=["CASE_A", "NOPE"])
  assert str(la_root / "train.list") in str(err.value)


def test_missing_root(tmp_path):
  with pytest.raises(DataError, match="not found") as err:
    la.load_la(tmp_path / "nowhere")
  assert "nowhere" in str(err.value)


def test_missing_list_names_file(la_root):
  with pytest.raises(DataError, match="not found") as err:
    la.load_la(la_root, list_name="test.list")
  assert str(la_root / "test.list") in str(err.value)


def test_missing_h5_names_file(la_root):
  path = la.case_path(la_root, "CASE_C")
  path.unlink()
  with pytest.raises(DataError, match="not found") as err:
    la.load_la(la_root)
  assert str(path) in str(err.value)


def test_path_like_case_id_rejected(la_root):
  with pytest.raises(DataError, match="invalid case ID"):
    la.load_la_case(la_root, "../CASE_A")


def test_corrupt_h5_names_file(la_root):
  path = la.case_path(la_root, "CASE_A")
  path.write_text("this is not an h5 file\n")
  before = _snapshot(la_root)
  with pytest.raises(DataError, match="not a readable h5 file") as err:
    la.load_la(la_root)
  assert str(path) in str(err.value)
  assert _snapshot(la_root) == before  # A failing load leaves every input file untouched.


def test_missing_key_names_file(la_root):
  path = _write_case(la_root, "CASE_A", label=False)
  with pytest.raises(DataError, match="label") as err:
    la.load_la_case(la_root, "CASE_A")
  assert str(path) in str(err.value)


def test_shape_mismatch_names_file(la_root):
  path = _write_case(la_root, "CASE_A", label=np.zeros((6, 5, 3), np.uint8))
  with pytest.raises(DataError, match="differ") as err:
    la.load_la_case(la_root, "CASE_A")
  assert str(path) in str(err.value)


def test_non_3d_image_names_file(la_root):
  path = _write_case(la_root, "CASE_A", image=np.zeros((6, 5), np.float32),
                     label=np.zeros((6, 5), np.uint8))
  with pytest.raises(DataError, match="3D") as err:
    la.load_la_case(la_root, "CASE_A")
  assert str(path) in str(err.value)


@pytest.mark.parametrize("bad_value", [2, 255])
def test_label_outside_binary_names_file(la_root, bad_value):
  label = np.zeros(SHAPE, np.uint8)
  label[1, 2, 3] = bad_value
  path = _write_case(la_root, "CASE_A", label=label)
  with pytest.raises(DataError, match=rf"\[{bad_value}\]") as err:
    la.load_la_case(la_root, "CASE_A")
  assert str(path) in str(err.value)


def test_negative_label_not_wrapped(la_root):
  label = np.zeros(SHAPE, np.int16)
  label[0, 0, 0] = -1
  _write_case(la_root, "CASE_A", label=label)
  with pytest.raises(DataError, match=r"\[-1\]"):
    la.load_la_case(la_root, "CASE_A")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_image_names_file(la_root, bad_value):
  image = np.zeros(SHAPE, np.float32)
  image[2, 2, 2] = bad_value
  path = _write_case(la_root, "CASE_A", image=image)
  before = _snapshot(la_root)
  with pytest.raises(DataError, match="NaN/inf") as err:
    la.load_la_case(la_root, "CASE_A")
  assert str(path) in str(err.value)
  assert _snapshot(la_root) == before


def test_real_la_data_two_cases():
  la_root = require_la_data()
  ids = la.read_case_list(la_root / "train.list")[:2]
  cases = la.load_la(la_root, ids=ids)
  assert [c.case_id for c in cases] == ids
  for case in cases:
    x, y, z, c = case.image.shape
    assert (z, c) == (88, 1) and 100 < x < 300 and 100 < y < 200
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert set(np.unique(case.label).tolist()) == {0, 1}
    foreground = case.label.mean()
    assert 0.01 < foreground < 0.25, foreground
