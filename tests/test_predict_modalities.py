"""--mode predict with data.modalities: the input files carry every channel the run was trained from;
`evaluate.predict_files` keeps the selected ones before the preprocessing and hands only those to the
predict function."""

from __future__ import annotations

import h5py
import jax
import nibabel as nib
import numpy as np
import pytest

from jaxseg import evaluate as ev
from jaxseg.config_blocks import data_block, eval_block
from jaxseg.data import preprocess
from jaxseg.data.base import DataError

SHAPE = (20, 18, 12)
PATCH = (12, 10, 8)


def one_channel_echo(inputs):
  """Foreground where the (only) input channel is > 0.5; refuses anything but one channel."""
  image = inputs["image"]
  assert image.shape[-1] == 1, f"the predict function got {image.shape[-1]} channels"
  return {"model": jax.nn.sigmoid(10.0 * (image - 0.5))}


def _data_cfg(**changes):
  cfg = data_block()
  cfg.update(changes)
  return cfg


def _three_channels():
  """Channel 2 holds a bright box on a zero background; channels 0 and 1 are bright elsewhere, so a
  prediction from either of them (or from all three) differs from channel 2's."""
  image = np.zeros((*SHAPE, 3), np.float32)
  image[..., 0] = 1.0 + np.linspace(0, 1, np.prod(SHAPE)).reshape(SHAPE)
  image[2:8, 2:8, 2:6, 1] = 1.0
  image[5:13, 4:12, 3:9, 2] = 1.0
  image[6:8, 6:8, 4:6, 2] = 3.0
  return image


def test_predict_nifti_hands_over_only_the_selected_channel(tmp_path):
  image = _three_channels()
  nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "mm.nii.gz")
  written = ev.predict_files(one_channel_echo, tmp_path / "mm.nii.gz", tmp_path / "out",
                             eval_block(), patch_size=PATCH, data_cfg=_data_cfg(modalities=(2,)),
                             num_channels=1)
  got = np.asarray(nib.load(written[0]).dataobj)
  np.testing.assert_array_equal(got, image[..., 2] > 0.5)
  # By name: files are unnamed, so "channel2" is the third channel.
  written = ev.predict_files(one_channel_echo, tmp_path / "mm.nii.gz", tmp_path / "out_name",
                             eval_block(), patch_size=PATCH,
                             data_cfg=_data_cfg(modalities=("channel2",)), num_channels=1)
  np.testing.assert_array_equal(np.asarray(nib.load(written[0]).dataobj), got)


def test_predict_h5_zscore_nonzero_uses_the_kept_channel_only(tmp_path):
  """Channel 0 is non-zero everywhere: with every channel the non-zero mask would be the whole
  volume; with channel 2 alone it is channel 2's box, the statistics taken there and 0 outside."""
  image = _three_channels()
  with h5py.File(tmp_path / "case.h5", "w") as f:
    f["image"] = image
  data_cfg = _data_cfg(modalities=(2,), zscore=True, zscore_nonzero=True)
  written = ev.predict_files(one_channel_echo, tmp_path / "case.h5", tmp_path / "out",
                             eval_block(), patch_size=PATCH, data_cfg=data_cfg, num_channels=1)
  want = preprocess.zscore(image[..., 2:3], nonzero=True)[..., 0] > 0.5
  all_channels = preprocess.zscore(image, nonzero=True)[..., 2] > 0.5
  assert not np.array_equal(want, all_channels)  # The test tells the two apart.
  np.testing.assert_array_equal(np.asarray(nib.load(written[0]).dataobj), want)


def test_predict_file_with_too_few_channels(tmp_path):
  nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), np.eye(4)), tmp_path / "one.nii.gz")
  with pytest.raises(DataError, match=r"one\.nii\.gz.*data\.modalities.*index 2"):
    ev.predict_files(one_channel_echo, tmp_path / "one.nii.gz", tmp_path / "out", eval_block(),
                     patch_size=PATCH, data_cfg=_data_cfg(modalities=(2,)), num_channels=1)
  # A name the unnamed file cannot have.
  nib.save(nib.Nifti1Image(_three_channels(), np.eye(4)), tmp_path / "mm.nii.gz")
  with pytest.raises(DataError, match=r"mm\.nii\.gz.*'flair'.*unnamed"):
    ev.predict_files(one_channel_echo, tmp_path / "mm.nii.gz", tmp_path / "out", eval_block(),
                     patch_size=PATCH, data_cfg=_data_cfg(modalities=("flair",)), num_channels=1)
  # Two channels kept for a one-channel model.
  with pytest.raises(DataError, match=r"mm\.nii\.gz.*2 channel\(s\) after data\.modalities"):
    ev.predict_files(one_channel_echo, tmp_path / "mm.nii.gz", tmp_path / "out", eval_block(),
                     patch_size=PATCH, data_cfg=_data_cfg(modalities=(2, 0)), num_channels=1)
