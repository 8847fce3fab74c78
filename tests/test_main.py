"""The command line as a user runs it: one subprocess per call."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.data.synthetic.num_cases=8", "--config.data.synthetic.shape=(24,24,16)",
        "--config.data.num_labeled=2", "--config.data.num_validation=2",
        "--config.data.patch_size=(16,16,12)", "--config.num_batches=2"]


def run_main(*args):
  return subprocess.run([sys.executable, "-m", "jaxseg.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_demo_writes_config_split_and_metrics(tmp_path):
  result = run_main("--config", "configs/data_demo.py", "--workdir", str(tmp_path), *TINY)
  assert result.returncode == 0, result.stderr
  assert "validation" in result.stdout
  split = json.loads((tmp_path / "split.json").read_text())
  assert split["labeled"] == ["synth_0000", "synth_0001"]
  assert split["validation"] == ["synth_0006", "synth_0007"]
  summary = json.loads((tmp_path / "metrics.json").read_text())
  assert summary["split"] == "validation" and summary["num_cases"] == 2
  assert 0.0 <= summary["dice_mean"] <= 1.0
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["data"]["synthetic"]["num_cases"] == 8


@pytest.mark.parametrize("args, words", [
    (["--config", "configs/data_demo.py", "--config.data.sed=3"],
     "unknown key data.sed (did you mean data.seed?); the keys of data are augment, batch_labeled"),
    (["--config", "configs/supervised.py", "--config.train.stepz", "3"],
     "unknown key train.stepz (did you mean train.num_steps?); the keys of train are "
     "checkpoint_every, compilation_cache, distributed, eval_every, keep_checkpoints, log_every, "
     "num_epochs, "
     "num_steps\n"),
    (["--config", "configs/data_demo.py", "--config.train.num_steps=3"],
     "unknown key train.num_steps; the top-level keys are data, empty_policy, job, name"),
    (["--config", "configs/data_demo.py", "--config.data.batch_labeled=0"],
     "config data.batch_labeled = 0 must be an integer >= 1"),
    (["--config", "configs/data_demo.py:nope"], "unknown preset 'nope'"),
    (["--config", "configs/missing.py"], "configs/missing.py"),
    (["--config", "configs/data_demo.py:la"], "data.root"),
    (["--config", "configs/data_demo.py", "--config.data.num_labeled=40"], "data.num_labeled"),
])
def test_bad_input_gives_one_clear_error(tmp_path, args, words):
  result = run_main(*args, "--workdir", str(tmp_path / "run"))
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and words in result.stderr
  assert "Traceback" not in result.stderr
