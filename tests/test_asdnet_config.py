"""configs/asdnet.py:msd on a tiny fake Medical Segmentation Decathlon task with 3 foreground
classes: the config checks, the data it loads, the num_classes check against dataset.json, and two
steps of training and the evaluation, with tiny overrides."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from conftest import CONFIGS_DIR, load_config_file, write_msd_task
from jaxseg import config_blocks, train
from jaxseg.data import sources
from jaxseg.data.base import DataError
from jaxseg.methods import asdnet

pytestmark = pytest.mark.usefixtures("fast_compile")

SHAPE = (16, 16, 16)
LABELS = ("background", "liver", "spleen", "kidney")  # 3 foreground classes.
NUM_CASES = 20  # 10 % of the training pool gives the 2 labeled cases of a batch (>= 19).
# Tiny networks and crops, 2 steps: what the test changes of the preset.
TINY = {"data.root": "", "data.num_classes": len(LABELS), "data.patch_size": (16, 16, 16),
        "eval.patch_size": (16, 16, 16), "eval.strides": (8, 8, 8), "eval.num_figure_cases": 0,
        "eval.save_predictions": False, "method.model.n_filters": 2,
        "method.confidence.features": (2, 2, 2, 2), "train.num_steps": 2, "train.log_every": 1,
        "train.checkpoint_every": 2}


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A (X, Y, Z, 2) two-modality image and its label: one box per foreground class, brighter than
  the background."""
  rng = np.random.default_rng(seed)
  label = np.zeros(SHAPE, np.uint8)
  for cls, corner in zip((1, 2, 3), ((1, 1, 1), (9, 2, 3), (3, 9, 8))):
    x, y, z = (c + int(rng.integers(0, 2)) for c in corner)
    label[x:x + 5, y:y + 5, z:z + 5] = cls
  image = rng.normal(size=SHAPE + (2,)).astype(np.float32) * 0.1
  image[..., 0] += label
  image[..., 1] += 100.0 + 2.0 * (label > 0)
  return image, label


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory) -> pathlib.Path:
  """Task99_Fake: NUM_CASES training cases (dataset.json, imagesTr/, labelsTr/), 2 modalities."""
  root = tmp_path_factory.mktemp("msd") / "Task99_Fake"
  return write_msd_task(root, "Fake", "fake", [_case(i) for i in range(NUM_CASES)],
                        np.diag([1.5, 1.5, 2.0, 1.0]), ("CT", "MR"), LABELS)


def msd_config(root: pathlib.Path, **overrides):
  config = load_config_file(CONFIGS_DIR / "asdnet.py").get_config("msd")
  return config_blocks.apply_overrides(config, {"data.root": str(root), **overrides}, "test")


def test_the_msd_preset_is_the_documented_protocol():
  config = load_config_file(CONFIGS_DIR / "asdnet.py").get_config("msd")
  assert config.name == "asdnet_msd" and config.data.source == "msd" and config.data.root == ""
  assert config.data.num_classes == 3
  assert (config.data.labeled_fraction, config.data.validation_fraction) == (0.1, 0.2)
  assert (config.data.batch_labeled, config.data.batch_unlabeled) == (2, 2)
  assert tuple(config.data.patch_size) == (96, 96, 64) == tuple(config.eval.patch_size)
  assert tuple(config.eval.strides) == (48, 48, 32)
  assert config.data.zscore and tuple(config.data.clip_percentiles) == (0.5, 99.5)
  assert config.method.preset == "paper" and config.method.model.to_dict() == dict(
      name="svnet", n_filters=16, dtype="float32")
  assert tuple(config.method.confidence.features) == (32, 64, 128, 256)
  assert config.train.num_steps == 6000
  for key, lr in (("optimizer", 1e-3), ("confidence_optimizer", 1e-4)):
    opt = config.method[key]
    assert (opt.name, opt.learning_rate, opt.weight_decay) == ("adam", lr, 1e-4)
    assert tuple(opt.decay_boundaries) == (2500, 5000)
  # The data root is a flag: the preset alone fails the file checks naming it.
  with pytest.raises(DataError, match="data.root is empty"):
    config_blocks.check_config(config)


def test_the_msd_preset_loads_the_task_and_passes_the_checks(msd_root):
  config = msd_config(msd_root, **{"data.num_classes": len(LABELS)})
  config_blocks.check_config(config)
  asdnet.check_config(config)
  dataset = sources.load_dataset(config.data)
  # 20 cases: validation = round(0.2 * 20) = the last 4, labeled = round(0.1 * 16) = the first 2.
  ids = tuple(f"fake_{i:03d}" for i in range(NUM_CASES))
  assert dataset.split.validation == ids[16:]
  assert dataset.split.labeled == ids[:2]
  assert dataset.split.unlabeled == ids[2:16]
  case = dataset.labeled[0]
  assert case.image.shape == SHAPE + (2,) and set(np.unique(case.label)) == {0, 1, 2, 3}
  # z-scored per modality.
  np.testing.assert_allclose(case.image.reshape(-1, 2).mean(0), 0.0, atol=1e-4)


def test_a_num_classes_other_than_the_manifests_stops_the_load(msd_root):
  config = msd_config(msd_root)  # The preset's 3; the task declares 4 labels.
  with pytest.raises(DataError, match=r"data.num_classes = 3, but .*declares 4 labels"):
    sources.load_dataset(config.data)


def test_two_steps_of_the_msd_preset_train_and_evaluate(msd_root, tmp_path):
  config = msd_config(msd_root, **{**TINY, "data.root": str(msd_root)})
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert json.loads((tmp_path / "run" / "eval" / "summary.json").read_text()) == json.loads(
      json.dumps(summary))
  assert (summary["split"], summary["num_cases"], summary["num_classes"]) == ("validation", 4, 4)
  (rows,) = summary["views"].values()
  scores = rows["raw"]
  assert {"1", "2", "3", "mean"} <= set(scores)
  assert all(scores[k]["num_cases"] == 4 for k in ("1", "2", "3"))
  assert 0.0 <= scores["mean"]["dice_mean"] <= 1.0
