"""A file that lacks a modality: its constant channel is marked missing, with a warning naming the
case (preprocess.with_absent_modalities, the MSD reader), and the z-score leaves it at 0."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_msd_task
from jaxseg.data import msd, preprocess, sources
from jaxseg import config_blocks
from jaxseg.data.base import Case, DataError


def _image(rng, absent=(), value=0.0, shape=(6, 5, 4, 3)):
  image = rng.normal(size=shape).astype(np.float32)
  for c in absent:
    image[..., c] = value
  return image


def test_absent_modalities_are_the_constant_channels():
  rng = np.random.default_rng(0)
  assert preprocess.absent_modalities(_image(rng, absent=(1,))).tolist() == [False, True, False]
  assert preprocess.absent_modalities(_image(rng, absent=(0, 2), value=7.0)).tolist() == [
      True, False, True]
  # All constant: an empty image, not a missing modality; one channel: never "missing".
  assert not preprocess.absent_modalities(_image(rng, absent=(0, 1, 2))).any()
  assert not preprocess.absent_modalities(_image(rng, absent=(0,), shape=(4, 4, 1))).any()


def test_with_absent_modalities_marks_zeroes_and_warns():
  rng = np.random.default_rng(1)
  case = Case("BRATS_007", _image(rng, absent=(0,), value=5.0), None, (1.0,) * 3,
              source="imagesTr/BRATS_007.nii.gz", modalities=("FLAIR", "T1w", "T2w"))
  lines = []
  marked = preprocess.with_absent_modalities(case, log=lines.append)
  assert marked.present.tolist() == [False, True, True]
  assert np.all(marked.image[..., 0] == 0)
  np.testing.assert_array_equal(marked.image[..., 1:], case.image[..., 1:])
  assert lines == ["warning: imagesTr/BRATS_007.nii.gz: case 'BRATS_007' lacks modality FLAIR "
                   "(channel 0, constant 5); it is used with the modalities it has: T1w, T2w"]
  full = case.replace(image=_image(rng))
  assert preprocess.with_absent_modalities(full, log=lines.append) is full and len(lines) == 1


def test_zscore_skips_an_absent_channel_and_leaves_it_zero():
  rng = np.random.default_rng(2)
  image = _image(rng, absent=(1,), value=0.0)
  present = np.array([True, False, True])
  out = preprocess.zscore(image, present=present)
  assert np.all(out[..., 1] == 0)
  for c in (0, 2):  # The others exactly as z-scored alone.
    np.testing.assert_allclose(out[..., c], preprocess.zscore(image[..., c:c + 1])[..., 0],
                               rtol=1e-6, atol=1e-6)
  with pytest.raises(DataError, match="channel 1 is constant"):  # Present and constant: refused.
    preprocess.zscore(image)
  out = preprocess.zscore(image, nonzero=True, present=present)
  assert np.all(out[..., 1] == 0) and np.isfinite(out).all()


def test_msd_case_lacking_a_modality_is_loaded_masked_with_a_warning(tmp_path, capsys):
  rng = np.random.default_rng(3)
  label = (rng.random((6, 5, 4)) > 0.5).astype(np.uint8)
  cases = [(_image(rng) * 100 + 300, label), (_image(rng, absent=(2,)) * 100 + 300, label)]
  cases[1][0][..., 2] = 0.0
  root = write_msd_task(tmp_path / "Task99", "Fake", "FAKE", cases, np.eye(4),
                        ("FLAIR", "T1w", "T2w"), ("background", "tumour"))
  loaded = msd.load_msd(root)
  assert [c.present.tolist() for c in loaded] == [[True] * 3, [True, True, False]]
  err = capsys.readouterr().out
  assert "warning:" in err and "case 'FAKE_001' lacks modality T2w (channel 2" in err
  assert "FAKE_000" not in err
  # Through the data block with the z-score: the absent channel stays 0, the run does not fail.
  cfg = config_blocks.data_block()
  cfg.source, cfg.root, cfg.num_classes = "msd", str(root), 2
  cfg.num_labeled, cfg.num_validation, cfg.zscore, cfg.zscore_nonzero = 1, 1, True, True
  by_id = {c.case_id: c for c in sources.load_cases(cfg)}
  assert np.all(by_id["FAKE_001"].image[..., 2] == 0)
  assert by_id["FAKE_001"].present.tolist() == [True, True, False]


def test_predict_input_lacking_a_modality_is_read_masked_with_a_warning(tmp_path):
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  from jaxseg.data import readers  # pylint: disable=import-outside-toplevel
  image = _image(np.random.default_rng(4), absent=(1,), value=0.0) * 50 + 200
  image[..., 1] = 0.0
  nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "scan.nii.gz")
  cfg = config_blocks.data_block()
  cfg.zscore = True
  lines = []
  case = readers.read_input(tmp_path / "scan.nii.gz", cfg, log=lines.append).case
  assert case.present.tolist() == [True, False, True] and np.all(case.image[..., 1] == 0)
  assert len(lines) == 1 and "scan.nii.gz: case 'scan.nii.gz' lacks modality channel1" in lines[0]
