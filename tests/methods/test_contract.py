"""The method contract: a method kept outside the package, which reads a per-voxel field of its own
and the modality mask, trains, resumes exactly and predicts through the unchanged trainer, data
layer and sliding window (tests/methods/toy_field_method.py)."""

import importlib.util
import pathlib
import sys

import jax
import ml_collections
import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxseg import config_blocks, train
from jaxseg.data import sources

MODULE = "jaxseg_tests.toy_field_method"
SHAPE = (20, 18, 16)


@pytest.fixture
def toy(monkeypatch):
  """The toy method importable as MODULE, and every loaded case given the field "weight" (1 on
  the first half of axis 0, else 0) and two modalities of which odd cases miss the second."""
  spec = importlib.util.spec_from_file_location(
      MODULE, pathlib.Path(__file__).parent / "toy_field_method.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.setitem(sys.modules, MODULE, module)
  load_cases = sources.load_cases

  def with_field(cfg):
    out = []
    for i, case in enumerate(load_cases(cfg)):
      weight = np.zeros(case.spatial_shape, np.float32)
      weight[:case.spatial_shape[0] // 2] = 1.0
      present = np.array([True, i % 2 == 0])
      image = case.image * present.astype(np.float32)  # A missing modality holds zeros.
      out.append(case.replace(image=image, modalities=("t1", "t2"), modality_mask=present,
                              fields={"weight": weight}))
    return out

  monkeypatch.setattr(sources, "load_cases", with_field)
  return module


def toy_config(toy, num_steps: int = 4, on_device: bool = False) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name, c.job, c.seed = "toy", "train", 0
  c.data = config_blocks.data_block()
  c.data.synthetic.num_cases, c.data.synthetic.shape = 8, SHAPE
  c.data.synthetic.num_modalities = 2
  c.data.num_labeled, c.data.num_validation = 2, 2
  c.data.patch_size = (8, 8, 8)
  c.data.on_device = on_device
  c.method = toy.default_config()
  c.method.name = MODULE
  c.train = config_blocks.train_block()
  c.train.num_steps, c.train.checkpoint_every, c.train.log_every = num_steps, 2, 1
  c.eval = config_blocks.eval_block()
  c.eval.lcc = False
  return c


def final_state(workdir: pathlib.Path) -> list[np.ndarray]:
  manager = ocp.CheckpointManager(workdir / "checkpoints")
  restored = manager.restore(manager.latest_step(),
                             args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return [np.asarray(a) for a in jax.tree.leaves(restored.state)]


def test_a_method_with_its_own_field_trains_resumes_and_predicts(toy, tmp_path, capsys):
  straight = tmp_path / "straight"
  train.train_and_evaluate(toy_config(toy), straight)
  log = capsys.readouterr().out
  # The field reached the train step in both streams (weight 1 on half the voxels, up to crops).
  assert "weight_mean" in log and "unlabeled_weight_mean" in log

  # Stopped after 2 steps and resumed: the same parameters and optimiser state, bit for bit.
  resumed = tmp_path / "resumed"
  train.train_and_evaluate(toy_config(toy, num_steps=2), resumed)
  first = final_state(resumed)
  train.train_and_evaluate(toy_config(toy), resumed)
  assert any(not np.array_equal(a, b) for a, b in zip(first, final_state(resumed)))
  for a, b in zip(final_state(straight), final_state(resumed), strict=True):
    np.testing.assert_array_equal(a, b)

  # The device-resident pipeline cuts the same field from the same batches.
  on_device = tmp_path / "on_device"
  train.train_and_evaluate(toy_config(toy, on_device=True), on_device)
  for a, b in zip(final_state(straight), final_state(on_device), strict=True):
    np.testing.assert_array_equal(a, b)

  # The sliding window slid the field with the image and passed each case's modality mask.
  predictions = straight / "eval" / "predictions"
  for index in (6, 7):  # The validation cases (the last 2 of 8).
    case = f"synth_{index:04d}"
    inside = np.zeros(SHAPE, np.uint8)
    inside[:SHAPE[0] // 2] = 1
    labels = {view: np.asarray(nib.load(predictions / f"{case}_{view}.nii.gz").dataobj)
              for view in ("model", "field", "second_modality")}
    np.testing.assert_array_equal(labels["field"], inside)
    assert not labels["model"][SHAPE[0] // 2:].any()
    np.testing.assert_array_equal(labels["second_modality"], int(index % 2 == 0))
