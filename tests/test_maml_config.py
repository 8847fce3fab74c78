"""configs/maml.py: the default (synthetic, 4 modalities, fully supervised) and the :brats preset,
whose data protocol is checked on a tiny fake Task01_BrainTumour (4D NIfTI, 4 modalities, labels
1 edema, 2 non-enhancing, 3 enhancing) written here, then trained for 2 steps and evaluated on the
WT / TC / ET regions with tiny overrides."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from conftest import CONFIGS_DIR, load_config_file, write_msd_task
from jaxseg import config_blocks, train
from jaxseg.data import sources
from jaxseg.data.base import DataError
from jaxseg.methods import maml

pytestmark = pytest.mark.usefixtures("fast_compile")

SHAPE = (8, 8, 8)
MODALITIES = ("FLAIR", "T1w", "t1gd", "T2w")
LABELS = ("background", "edema", "non-enhancing tumor", "enhancing tumour")
NUM_CASES = 6
REGIONS = (("WT", (1, 2, 3)), ("TC", (2, 3)), ("ET", (3,)))
# Tiny networks and crops, 2 steps: what the test changes of the preset.
TINY = {"data.num_labeled": 4, "data.num_validation": 2, "data.patch_size": SHAPE,
        "eval.patch_size": SHAPE, "eval.strides": (4, 4, 4), "eval.shape_bucket": 0,
        "eval.num_figure_cases": 0, "eval.save_predictions": False,
        "method.model.base_features": 2, "method.model.num_pools": 2, "train.num_steps": 2,
        "train.log_every": 1, "train.checkpoint_every": 2}


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A (X, Y, Z, 4) image with a nested tumour (edema ⊃ non-enhancing ⊃ enhancing) and a brain
  region of non-zero intensities in a zero background."""
  rng = np.random.default_rng(seed)
  label = np.zeros(SHAPE, np.uint8)
  o = int(rng.integers(0, 2))
  label[1 + o:7, 1:7, 1:7] = 1
  label[2 + o:6, 2:6, 2:6] = 2
  label[3 + o:5, 3:5, 3:5] = 3
  image = np.zeros(SHAPE + (4,), np.float32)
  image[1:7, 0:8, 0:8] = 100.0 + rng.normal(size=(6, 8, 8, 4)) * 5
  for m in range(4):
    image[..., m] += 20.0 * (label == (m % 3) + 1)
  return image, label


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> pathlib.Path:
  """Task01_BrainTumour's layout with NUM_CASES cases of SHAPE."""
  root = tmp_path_factory.mktemp("msd") / "Task01_BrainTumour"
  return write_msd_task(root, "BRATS", "BRATS", [_case(i) for i in range(NUM_CASES)],
                        np.diag([1.0, 1.0, 1.0, 1.0]), MODALITIES, LABELS)


def _config(preset: str = "", **overrides):
  config = load_config_file(CONFIGS_DIR / "maml.py").get_config(preset)
  return config_blocks.apply_overrides(config, overrides, "test")


def test_the_default_is_the_synthetic_multi_modal_fully_supervised_run():
  config = _config()
  data = config.data
  assert config.name == "maml" and data.source == "synthetic"
  assert (data.num_classes, data.synthetic.num_modalities, data.synthetic.layout) == (
      4, 4, "nested")
  assert tuple(data.synthetic.shape) == (64, 64, 48) and data.synthetic.num_cases == 24
  # Every case but the 4 validation ones is labeled: no unlabeled cases, none in the batches.
  assert (data.num_labeled, data.num_validation, data.labeled_fraction) == (20, 4, 0.0)
  assert (data.batch_labeled, data.batch_unlabeled) == (2, 0)
  assert tuple(data.patch_size) == (32, 32, 16) and not data.augment
  assert data.foreground_oversample == 0.33 and not data.on_device
  assert config.method.preset == "paper" and config.method.augment
  assert (config.method.model.base_features, config.method.model.num_pools) == (8, 3)
  assert config.train.num_steps == 300 and config.seed == 0
  assert tuple(config.eval.regions) == REGIONS and tuple(config.eval.patch_size) == ()
  config_blocks.check_config(config)
  maml.check_config(config)
  dataset = sources.load_dataset(config.data)
  assert (len(dataset.labeled), len(dataset.unlabeled), len(dataset.validation)) == (20, 0, 4)
  assert dataset.labeled[0].image.shape == (64, 64, 48, 4)


def test_the_brats_preset_is_the_documented_protocol():
  config = _config("brats")
  data = config.data
  assert config.name == "maml_brats" and data.source == "msd" and data.root == ""
  assert (data.num_classes, data.num_labeled, data.num_validation) == (4, 387, 97)
  assert (data.labeled_fraction, data.validation_fraction) == (0.0, 0.0)
  assert (data.batch_labeled, data.batch_unlabeled) == (2, 0)
  assert data.zscore and data.zscore_nonzero and tuple(data.clip_percentiles) == ()
  assert data.foreground_oversample == 0.33
  assert tuple(data.patch_size) == (128, 128, 128) == tuple(config.eval.patch_size)
  assert tuple(config.eval.strides) == (64, 64, 64) and config.eval.gaussian
  assert tuple(config.eval.regions) == REGIONS and tuple(config.eval.mirror_axes) == ()
  assert config.method.model.to_dict() == dict(name="maml", base_features=16, num_pools=5,
                                               shared_init="torch", dtype="float32")
  opt = config.method.optimizer
  assert (opt.name, opt.learning_rate, opt.momentum, opt.nesterov, opt.weight_decay) == (
      "sgd", 0.01, 0.99, True, 3e-5)
  assert (opt.schedule, opt.clip_grad_norm) == ("poly", 12.0)
  assert config.train.num_steps == 250000
  maml.check_config(config)
  with pytest.raises(DataError, match="data.root is empty"):
    config_blocks.check_config(config)


def test_the_brats_preset_loads_the_task(brats_root):
  config = _config("brats", **{**TINY, "data.root": str(brats_root)})
  config_blocks.check_config(config)
  maml.check_config(config)
  dataset = sources.load_dataset(config.data)
  ids = tuple(f"BRATS_{i:03d}" for i in range(NUM_CASES))
  assert dataset.split.labeled == ids[:4] and dataset.split.validation == ids[4:]
  assert dataset.split.unlabeled == ()
  case = dataset.labeled[0]
  assert case.image.shape == SHAPE + (4,) and set(np.unique(case.label)) == {0, 1, 2, 3}
  # z-scored per modality over the non-zero voxels (the "brain" block _case fills), the
  # background set to 0, as nnU-Net normalises MR.
  brain = np.zeros(SHAPE, bool)
  brain[1:7, 0:8, 0:8] = True
  np.testing.assert_allclose(case.image[brain].mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(case.image[brain].std(0), 1.0, rtol=1e-4)
  assert np.all(case.image[~brain] == 0)


def test_two_steps_of_the_brats_preset_train_and_evaluate_the_regions(brats_root, tmp_path):
  config = _config("brats", **{**TINY, "data.root": str(brats_root)})
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert (summary["split"], summary["num_cases"], summary["num_classes"]) == ("validation", 2, 4)
  (rows,) = summary["views"].values()
  scores = rows["raw"]
  assert {"1", "2", "3", "WT", "TC", "ET", "mean"} <= set(scores)
  assert all(0.0 <= scores[k]["dice_mean"] <= 1.0 for k in ("WT", "TC", "ET"))


def test_mode_eval_scores_every_modality_subset_and_predict_takes_one(brats_root, tmp_path,
                                                                        capsys):
  """--mode eval with eval.modalities = "subsets": the 15 subsets of the 4 named modalities as
  views, modality_subsets.csv and the printed table; --mode predict with two named modalities."""
  config = _config("brats", **{**TINY, "data.root": str(brats_root)})
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  config.eval.modalities = "subsets"
  summary = train.evaluate_workdir(config, str(workdir))
  assert len(summary["modality_subsets"]) == 15
  assert summary["modality_subsets"][0] == "FLAIR"
  assert summary["modality_subsets"][-1] == "FLAIR+T1w+t1gd+T2w"
  assert summary["view_names"] == [f"model:{s}" for s in summary["modality_subsets"]]
  table = (workdir / "eval_step2" / "modality_subsets.csv").read_text().splitlines()
  assert table[0] == "view,modalities,num_modalities,1,2,3,mean,WT,TC,ET" and len(table) == 16
  printed = capsys.readouterr().out
  assert "Dice in % of each modality subset" in printed and "FLAIR+T1w+t1gd+T2w" in printed

  with pytest.raises(DataError, match="eval.modalities = 'subsets'"):
    train.predict_workdir(config, str(workdir), str(brats_root / "imagesTr" / "BRATS_004.nii.gz"),
                          str(tmp_path / "out"))
  config.eval.modalities = "flair,T2w"
  written = train.predict_workdir(config, str(workdir),
                                  str(brats_root / "imagesTr" / "BRATS_004.nii.gz"),
                                  str(tmp_path / "out"))
  assert [p.name for p in map(pathlib.Path, written)] == ["BRATS_004.nii.gz"]
  config.eval.modalities = "t3"
  with pytest.raises(DataError, match="unknown modality 't3'"):
    train.predict_workdir(config, str(workdir), str(brats_root / "imagesTr" / "BRATS_004.nii.gz"),
                          str(tmp_path / "out"))


def test_the_baseline_presets_change_only_the_network_and_the_channels():
  default = _config()
  early, single = _config("early_fusion"), _config("single_modality")
  assert (early.method.fusion, single.method.fusion) == ("early", "early")
  assert tuple(early.data.modalities) == () and tuple(single.data.modalities) == (0,)
  for config in (early, single):  # Everything else as the MAML run: data, loss, sampler, steps.
    for block in ("data", "train", "eval"):
      mine, theirs = config[block].to_dict(), default[block].to_dict()
      mine.pop("modalities", None), theirs.pop("modalities", None)
      assert mine == theirs
    assert config.method.optimizer.to_dict() == default.method.optimizer.to_dict()
    config_blocks.check_config(config)
    maml.check_config(config)
  cases = sources.load_cases(_config("single_modality", **{"data.synthetic.num_cases": 2}).data)
  assert cases[0].image.shape == (64, 64, 48, 1) and cases[0].modality_names == ("channel0",)
