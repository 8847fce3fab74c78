"""The trainer through the command line: train, resume after kill -9, eval and predict modes."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import jax
import pytest

from conftest import (CONFIGS_DIR, SUBPROCESS_ENV, load_config_file, run_tiny,
                      tiny_run_command)
from jaxseg import train
from jaxseg.data.base import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = SUBPROCESS_ENV
command, run = tiny_run_command, run_tiny


def final_params(workdir, step):
  restored = ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step) /
                                                "state")
  return jax.tree_util.tree_leaves(restored)


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  steps = ["--config.train.num_steps=40", "--config.train.checkpoint_every=10"]
  reference = run(tmp_path / "reference", *steps)
  assert reference.returncode == 0, reference.stderr

  workdir = tmp_path / "killed"
  proc = subprocess.Popen(command(workdir, *steps), cwd=REPO, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (workdir / "checkpoints" / "10").is_dir() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
  assert not (workdir / "checkpoints" / "40").exists()

  resumed = run(workdir, *steps)
  assert resumed.returncode == 0, resumed.stderr
  assert "resuming from the checkpoint of step" in resumed.stdout
  # The training log is appended to, not overwritten: each log line's step once, in order.
  from jaxseg import curves
  assert [r["step"] for r in curves.read_log(workdir / curves.TRAIN_LOG)] == list(range(5, 45, 5))
  want, got = final_params(tmp_path / "reference", 40), final_params(workdir, 40)
  assert len(want) == len(got) and len(want) > 4
  for a, b in zip(want, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_device_resident_data_trains_like_the_host_pipeline(tmp_path):
  """data.on_device cuts the same batches on the device: the run ends at the same parameters."""
  steps = ["--config.train.num_steps=10", "--config.train.checkpoint_every=10"]
  host = run(tmp_path / "host", *steps)
  assert host.returncode == 0, host.stderr
  device = run(tmp_path / "device", *steps, "--config.data.on_device=True")
  assert device.returncode == 0, device.stderr
  assert "training volumes on the device(s)" in device.stdout
  want, got = final_params(tmp_path / "host", 10), final_params(tmp_path / "device", 10)
  assert len(want) == len(got) and len(want) > 4
  for a, b in zip(want, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_writes_logs_and_eval_outputs_then_eval_and_predict_modes(tmp_path):
  from jaxseg import curves
  workdir = tmp_path / "run"
  result = run(workdir, "--config.train.num_steps=10", "--config.train.eval_every=5")
  assert result.returncode == 0, result.stderr
  assert "steps/s" in result.stdout and "ETA" in result.stdout
  assert "validation at step 5" in result.stdout and "validation at step 10" in result.stdout
  for name in ("config.json", "split.json", "data_info.json", "eval/summary.json",
               "eval/metrics.csv", "eval/figure.png", "curves.png"):
    assert (workdir / name).exists(), name
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  # The run ends by saying where its results are.
  assert f"results in {workdir}:" in result.stdout
  assert (f"evaluation: {workdir / 'eval'}/ (metrics.csv, summary.json, figure.png, predictions/ "
          "with 2 files)") in result.stdout
  assert f"training curves: {workdir / 'curves.png'}" in result.stdout
  # One CSV row per progress line (steps 5 and 10) and per evaluation; the curves: train loss,
  # learning rate, validation Dice.
  log_lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
  train_rows = curves.read_log(workdir / curves.TRAIN_LOG)
  assert [r["step"] for r in train_rows] == [5, 10] and len(log_lines) == 2
  assert {"loss", "learning_rate"} <= set(train_rows[0])
  assert [r["step"] for r in curves.read_log(workdir / curves.VALIDATION_LOG)] == [5, 10]
  assert Image.open(workdir / curves.CURVES_PNG).size == curves.curves_size(3)

  evaluated = run(workdir, "--mode", "eval")
  assert evaluated.returncode == 0, evaluated.stderr
  assert (workdir / "eval_step10" / "summary.json").exists()
  assert (f"wrote the evaluation of step 10 to {workdir / 'eval_step10'}/: metrics.csv, "
          "summary.json, figure.png, predictions/ with 2 files") in evaluated.stdout

  images = tmp_path / "inputs" / "images"
  images.mkdir(parents=True)
  Image.fromarray((np.random.default_rng(0).random((40, 36)) * 255).astype(np.uint8)).save(
      images / "scan1.png")
  predicted = run(workdir, "--mode", "predict", "--input", str(images), "--output",
                  str(tmp_path / "masks"))
  assert predicted.returncode == 0, predicted.stderr
  assert np.asarray(Image.open(tmp_path / "masks" / "scan1.png")).shape == (40, 36)
  assert "predicting with view model of the method's views model" in predicted.stdout
  assert f"wrote 1 prediction(s) to {tmp_path / 'masks'}" in predicted.stdout
  unknown = run(workdir, "--mode", "predict", "--input", str(images), "--output",
                str(tmp_path / "masks2"), "--config.eval.view=f2")
  assert unknown.returncode == 2
  assert unknown.stderr.strip().splitlines()[-1].startswith(
      "error: config eval.view = 'f2' is not one of the method's views model")


def test_mode_errors_and_config_mismatch(tmp_path):
  no_run = run(tmp_path / "empty", "--mode", "eval")
  assert no_run.returncode == 2 and "no checkpoint" in no_run.stderr
  no_input = run(tmp_path / "empty", "--mode", "predict")
  assert no_input.returncode == 2 and "--input" in no_input.stderr
  workdir = tmp_path / "run"
  assert run(workdir, "--config.train.num_steps=2").returncode == 0
  other = run(workdir, "--config.train.num_steps=2", "--config.seed=5")
  assert other.returncode == 2 and "another config" in other.stderr and "seed" in other.stderr


def test_duo_folder_preset_trains_on_an_image_folder(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for folder in ("images", "masks"):
    (tmp_path / "data" / folder).mkdir(parents=True)
  for i in range(10):
    mask = np.zeros((40, 40), np.uint8)
    mask[10 + i:25 + i, 8:30] = 255
    image = rng.integers(0, 80, (40, 40, 3)).astype(np.uint8) + (mask[..., None] > 0) * 120
    Image.fromarray(image.astype(np.uint8)).save(tmp_path / "data" / "images" / f"img{i:02d}.png")
    Image.fromarray(mask).save(tmp_path / "data" / "masks" / f"img{i:02d}.png")
  args = ["--config", "configs/duo.py:nuclei", f"--config.data.root={tmp_path / 'data'}",
          "--config.data.image_size=(32,32)", "--config.data.patch_size=(32,32)",
          "--config.method.model.features=(4,8)", "--config.train.num_steps=2",
          "--workdir", str(tmp_path / "run")]
  result = subprocess.run([sys.executable, "-m", "jaxseg.main", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  import json
  split = json.loads((tmp_path / "run" / "split.json").read_text())
  assert split["labeled"] == ["img00", "img01"] and split["validation"] == ["img08", "img09"]
  summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
  assert set(summary["views"]) == {"f1", "f2"} and "views_mean" in summary
  assert "f1_pooled" in summary["views"]["f1"]["raw"]["1"]


def test_evaluation_list_is_only_read_for_the_final_evaluation():
  """eval.case_list (e.g. LA test.list) replaces validation in the final evaluation only: periodic
  evaluations during training never see it, so no checkpoint can be picked on it."""
  import pytest
  from jaxseg import train
  from jaxseg.data import sources
  from jaxseg.data.base import DataError
  config = load_config_file(CONFIGS_DIR / "supervised.py").get_config("synthetic2d")
  config.data.synthetic.num_cases, config.data.synthetic.shape = 6, (16, 16)
  config.data.num_labeled, config.data.num_validation = 2, 2
  dataset = sources.load_dataset(config.data)
  config.eval.case_list = "test.list"
  name, cases = train._evaluation_cases(config, dataset, final=False)
  assert name == "validation" and cases == dataset.validation
  with pytest.raises(DataError, match="eval.case_list"):  # Synthetic data has no list files.
    train._evaluation_cases(config, dataset, final=True)


def test_a_run_started_before_the_optimiser_fields_existed_resumes(tmp_path):
  """config.json of an older version lacks the optimiser fields added since; at the defaults that
  reproduce the old behaviour they do not count as a change of config, set otherwise they do."""
  config = load_config_file(CONFIGS_DIR / "dtc.py").get_config("la8")
  saved = json.loads(config.to_json_best_effort())
  for field in ("schedule", "decay_boundaries", "poly_power", "min_learning_rate", "total_steps",
                "warmup_steps", "lr_multipliers", "weight_decay_mask", "clip_grad_norm"):
    del saved["method"]["optimizer"][field]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  train.check_same_run(config, tmp_path)
  config.method.optimizer.clip_grad_norm = 1.0
  with pytest.raises(DataError, match=r"method.optimizer.clip_grad_norm"):
    train.check_same_run(config, tmp_path)


def test_a_run_started_before_a_data_key_existed_resumes(tmp_path):
  """A data key added since a run started does not block its resumption at its default value (the
  old behaviour), and does when set otherwise."""
  config = load_config_file(CONFIGS_DIR / "supervised.py").get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved["data"]["foreground_oversample"], saved["data"]["modalities"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  train.check_same_run(config, tmp_path)
  config.data.foreground_oversample = 0.33
  with pytest.raises(DataError, match=r"data.foreground_oversample"):
    train.check_same_run(config, tmp_path)


def test_a_run_started_before_a_train_key_existed_resumes(tmp_path):
  """The same for the train block (train.num_epochs, train.compilation_cache, added later); the
  compilation cache's folder may also change between a run and its resumption."""
  config = load_config_file(CONFIGS_DIR / "supervised.py").get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved["train"]["num_epochs"], saved["train"]["compilation_cache"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  train.check_same_run(config, tmp_path)
  config.train.compilation_cache = ""
  train.check_same_run(config, tmp_path)
  config.train.update(num_steps=0, num_epochs=3)
  with pytest.raises(DataError, match=r"train.num_epochs"):
    train.check_same_run(config, tmp_path)


def test_a_run_started_before_a_method_key_existed_resumes(tmp_path):
  """The same for a key of the method's own block (MAML's method.fusion, added later)."""
  config = load_config_file(CONFIGS_DIR / "maml.py").get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved["method"]["fusion"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  train.check_same_run(config, tmp_path)
  config.method.fusion = "early"
  with pytest.raises(DataError, match=r"method.fusion"):
    train.check_same_run(config, tmp_path)
