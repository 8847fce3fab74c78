import os

import numpy as np
import pytest

from conftest import require_la_data
from jaxseg import config_blocks
from jaxseg.data import la, sources
from jaxseg.data.base import DataError


def tiny_synthetic(**changes):
  cfg = config_blocks.data_block()
  cfg.synthetic.num_cases = 8
  cfg.synthetic.shape = (24, 24, 16)
  cfg.num_labeled, cfg.num_validation = 2, 2
  cfg.patch_size = (16, 16, 12)
  cfg.update(changes)
  return cfg


def test_synthetic_dataset_split_and_batches():
  cfg = tiny_synthetic()
  ds = sources.load_dataset(cfg)
  assert ds.split.labeled == ("synth_0000", "synth_0001")
  assert ds.split.validation == ("synth_0006", "synth_0007")
  assert len(ds.unlabeled) == 4 and all(c.label is None for c in ds.unlabeled)
  assert all(c.label is not None for c in ds.labeled + ds.validation)
  batch = next(sources.make_batches(ds, cfg))
  assert batch.labeled["image"].shape == (2, 16, 16, 12, 1) and batch.unlabeled["image"].shape == (2, 16, 16, 12, 1)


def test_run_seed_does_not_change_the_synthetic_data():
  a = sources.load_dataset(tiny_synthetic(seed=0))
  b = sources.load_dataset(tiny_synthetic(seed=1))
  np.testing.assert_array_equal(a.labeled[0].image, b.labeled[0].image)


def test_labeled_fraction_and_preprocessing():
  cfg = tiny_synthetic(labeled_fraction=0.5, zscore=True, clip_percentiles=(1.0, 99.0))
  ds = sources.load_dataset(cfg)
  assert len(ds.labeled) == 3  # half of the 6 cases left after validation
  image = ds.labeled[0].image[..., 0]
  assert abs(image.mean()) < 1e-4 and abs(image.std() - 1) < 1e-3


@pytest.mark.parametrize("changes, words", [
    (dict(source="nifti"), "data.source"),
    (dict(source="la"), "data.root"),
    (dict(source="msd", root="/nonexistent/msd"), "data.root"),
    (dict(num_labeled=7), "data.num_labeled"),
    (dict(labeled_fraction=2.0), "data.labeled_fraction"),
    (dict(zscore_nonzero=True), "data.zscore_nonzero = True needs data.zscore = True"),
])
def test_bad_data_config(changes, words):
  with pytest.raises(DataError, match=words):
    sources.load_dataset(tiny_synthetic(**changes))


def test_la_protocol_split_on_real_data(tmp_path):
  la_root = require_la_data()
  # A 6-case copy of the layout (links to the real files) keeps this test light.
  ids = la.read_case_list(la_root / "train.list")[:6]
  (tmp_path / "train.list").write_text("\n".join(ids) + "\n")
  (tmp_path / la.CASES_DIR).mkdir()
  for i in ids:
    os.symlink(la_root / la.CASES_DIR / i, tmp_path / la.CASES_DIR / i)
  cfg = config_blocks.data_block("la")
  cfg.update(dict(root=str(tmp_path), num_labeled=2, num_validation=2, validation="last",
                  patch_size=(112, 112, 80)))
  ds = sources.load_dataset(cfg)
  assert ds.split.labeled == tuple(ids[:2]) and ds.split.validation == tuple(ids[-2:])
  batch = next(sources.make_batches(ds, cfg))
  assert batch.labeled["image"].shape == (2, 112, 112, 80, 1)
  assert set(np.unique(batch.labeled["label"])) <= {0, 1}
  with pytest.raises(DataError, match="data.num_classes"):
    cfg.num_classes = 3
    sources.load_dataset(cfg)


def test_validation_fraction():
  ds = sources.load_dataset(tiny_synthetic(validation_fraction=0.25))
  assert ds.split.validation == ("synth_0006", "synth_0007")
  with pytest.raises(DataError, match="data.validation_fraction"):
    sources.load_dataset(tiny_synthetic(validation_fraction=1.0))


def _fake_la_root(tmp_path, train_ids, test_ids):
  import h5py
  root = tmp_path / "la"
  rng = np.random.default_rng(0)
  for case_id in (*train_ids, *test_ids):
    path = la.case_path(root, case_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
      f.create_dataset("image", data=rng.normal(size=(8, 8, 8)).astype(np.float32))
      f.create_dataset("label", data=(rng.random((8, 8, 8)) > 0.7).astype(np.uint8))
  (root / "train.list").write_text("\n".join(train_ids))
  (root / "test.list").write_text("\n".join(test_ids))
  return root


def test_evaluation_list_is_read_from_the_root_and_must_not_hold_training_cases(tmp_path):
  root = _fake_la_root(tmp_path, ["T1", "T2", "T3", "T4"], ["E1", "E2"])
  cfg = config_blocks.data_block()
  cfg.source = "la"
  cfg.root, cfg.num_labeled, cfg.num_validation = str(root), 1, 1
  ds = sources.load_dataset(cfg)
  cases = sources.load_evaluation_cases(cfg, "test.list", ds)
  assert [c.case_id for c in cases] == ["E1", "E2"] and all(c.label is not None for c in cases)
  # The validation case (T4) may be listed; a training case may not.
  (root / "leaky.list").write_text("E1\nT4\nT2\n")
  with pytest.raises(DataError, match=r"eval.case_list.*\['T2'\]"):
    sources.load_evaluation_cases(cfg, "leaky.list", ds)
  with pytest.raises(DataError, match="case list not found"):
    sources.load_evaluation_cases(cfg, "nope.list", ds)
  synthetic = tiny_synthetic()
  with pytest.raises(DataError, match="eval.case_list"):
    sources.load_evaluation_cases(synthetic, "test.list", sources.load_dataset(synthetic))
