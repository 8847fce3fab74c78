"""data.modalities: `base.select_modalities` by hand and `sources.load_cases` keeping a subset of the
channels before the preprocessing."""

import numpy as np
import pytest

from jaxseg import config_blocks
from jaxseg.data import preprocess, sources
from jaxseg.data.base import Case, DataError, select_modalities


def three_channel_case(**changes):
  image = np.stack([np.full((4, 5, 3), c, np.float32) for c in (10.0, 20.0, 30.0)], axis=-1)
  case = Case(case_id="c7", image=image, label=np.zeros((4, 5, 3), np.uint8),
              spacing=(1.0, 1.0, 2.0), source="/data/c7.nii.gz")
  return case.replace(**changes)


def test_select_named_case_with_mask():
  mask = np.array([True, False, True])
  case = three_channel_case(modalities=("flair", "t1", "t2"), modality_mask=mask)
  got = select_modalities(case, (2, 1))
  assert got.image.shape == (4, 5, 3, 2)
  np.testing.assert_array_equal(got.image[0, 0, 0], [30.0, 20.0])
  assert got.modalities == ("t2", "t1") and got.modality_names == ("t2", "t1")
  np.testing.assert_array_equal(got.modality_mask, [True, False])
  assert got.label is case.label and got.spacing == case.spacing and got.source == case.source
  # The input is unchanged.
  assert case.image.shape == (4, 5, 3, 3) and case.modalities == ("flair", "t1", "t2")


def test_select_unnamed_case_keeps_default_names():
  case = three_channel_case()
  got = select_modalities(case, [2])
  assert got.modalities == ("channel2",) and got.modality_mask is None
  np.testing.assert_array_equal(got.image[..., 0], case.image[..., 2])


def test_select_only_missing_modalities_is_an_error():
  case = three_channel_case(modality_mask=np.array([True, False, False]))
  with pytest.raises(DataError, match=r"c7\.nii\.gz.*'c7'.*none of the selected"):
    select_modalities(case, (1, 2))
  with pytest.raises(DataError, match=r"c7\.nii\.gz.*out of range"):
    select_modalities(case, (3,))


def multimodal(**changes):
  cfg = config_blocks.data_block()
  cfg.synthetic.num_modalities = 3
  cfg.synthetic.shape = (24, 24, 16)
  cfg.synthetic.num_cases = 3
  cfg.update(changes)
  return cfg


def test_load_cases_selects_before_preprocessing():
  full = sources.load_cases(multimodal())
  kept = sources.load_cases(multimodal(modalities=("channel2", 0)))
  assert len(kept) == len(full) == 3
  for a, b in zip(full, kept):
    np.testing.assert_array_equal(b.image, a.image[..., [2, 0]])
    assert b.modality_names == ("channel2", "channel0")
    np.testing.assert_array_equal(b.label, a.label)
  zscored = sources.load_cases(multimodal(modalities=("channel2", 0), zscore=True))
  for a, b in zip(full, zscored):
    np.testing.assert_allclose(b.image, preprocess.zscore(a.image[..., [2, 0]]), rtol=1e-5,
                               atol=1e-5)


def test_load_cases_unknown_modality():
  with pytest.raises(DataError, match="data.modalities.*'flair'"):
    sources.load_cases(multimodal(modalities=("flair",)))
  with pytest.raises(DataError, match="data.modalities.*index 3"):
    sources.load_cases(multimodal(modalities=(3,)))
