"""The config blocks and their checks: every bad value fails with one error line naming the key,
before any data is read or anything compiled; the preset tables give the same configs as before.

  python tests/test_config_checks.py   # rewrites tests/golden/configs.json (deliberate changes)
"""

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from conftest import CONFIGS_DIR, REPO, load_config_file
from jaxseg import config_blocks
from jaxseg.data.base import DataError

GOLDEN_CONFIGS = pathlib.Path(__file__).parent / "golden" / "configs.json"
ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def base_config():
  """A small valid config: configs/supervised.py:synthetic2d."""
  return load_config_file(CONFIGS_DIR / "supervised.py").get_config("synthetic2d")


def with_changes(config, changes: dict):
  return config_blocks.apply_overrides(config, changes, "test")


# ---------------------------------------------------------------------------------------------------
# The module and the presets.


def test_config_blocks_imports_no_jax():
  code = "import jaxseg.config_blocks, sys; assert 'jax' not in sys.modules, 'jax imported'"
  result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def _typed(value):
  """`value` with the type of every leaf, so that a tuple turned list is a change."""
  if isinstance(value, dict):
    return {k: _typed(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return {f"<{type(value).__name__}>": [_typed(v) for v in value]}
  return {f"<{type(value).__name__}>": value}


def dump_configs() -> dict:
  """{"<file>:<preset>": the typed config} of every config file and preset. The method's optimiser
  blocks are left out: they are `optim.optimizer_config()`'s, tested with it."""
  out = {}
  for path in sorted(CONFIGS_DIR.glob("[!_]*.py")):
    module = load_config_file(path)
    for preset in module.PRESETS:
      config = module.get_config(preset).to_dict()
      if "method" in config:
        config["method"] = {k: v for k, v in config["method"].items()
                            if not k.endswith("optimizer")}
      out[f"{path.name}:{preset}"] = _typed(config)
  return out


def test_every_config_and_preset_is_the_recorded_one():
  """The preset tables give the configs recorded in tests/golden/configs.json (made by the
  if-chains they replaced); a deliberate change rewrites it with `python tests/<this file>`."""
  want = json.loads(GOLDEN_CONFIGS.read_text())
  got = json.loads(json.dumps(dump_configs()))
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name] == want[name], name


def test_every_key_of_the_shared_blocks_has_a_check():
  def keys(d, prefix):
    for k, v in d.items():
      yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
  blocks = {"data": config_blocks.data_block(), "train": config_blocks.train_block(),
            "eval": config_blocks.eval_block()}
  declared = {k for name, block in blocks.items() for k in keys(block.to_dict(), f"{name}.")}
  assert declared == set(config_blocks.CHECKS)


def test_enumerations_match_the_modules_that_act_on_them():
  from jaxseg import metrics, parallel
  from jaxseg.data import sources, synthetic
  assert config_blocks.EMPTY_POLICIES == metrics.EMPTY_POLICIES
  assert config_blocks.SYNTHETIC_LAYOUTS == synthetic.LAYOUTS
  assert sources.SOURCES == config_blocks.SOURCES
  assert parallel._DISTRIBUTED_MODES == config_blocks.DISTRIBUTED_MODES


def test_a_preset_table_naming_a_missing_key_fails_when_the_config_loads():
  with pytest.raises(KeyError, match="train.stepz"):
    config_blocks.apply_overrides(base_config(), {"train.stepz": 3}, "configs/x.py:p")
  with pytest.raises(KeyError, match="data.seed.x"):
    config_blocks.apply_overrides(base_config(), {"data.seed.x": 3}, "configs/x.py:p")


def test_every_shipped_config_passes_the_checks():
  for path in sorted(CONFIGS_DIR.glob("[!_]*.py")):
    module = load_config_file(path)
    for preset in module.PRESETS:
      config_blocks.check_config(module.get_config(preset), files=False)


# ---------------------------------------------------------------------------------------------------
# One check each: a bad value gives one DataError naming the full key.

BAD_VALUES = [
    ({"train.num_steps": -5}, "config train.num_steps = -5 must be an integer >= 1"),
    ({"train.num_steps": 0}, "config train.num_steps = 0 must be an integer >= 1"),
    ({"train.log_every": 0}, "config train.log_every = 0 must be an integer >= 1"),
    ({"train.checkpoint_every": 0}, "config train.checkpoint_every = 0 must be an integer >= 1"),
    ({"train.eval_every": -1}, "config train.eval_every = -1 must be an integer >= 0"),
    ({"train.keep_checkpoints": 0}, "config train.keep_checkpoints = 0 must be an integer >= 1"),
    ({"train.distributed.mode": "sometimes"}, "config train.distributed.mode = 'sometimes'"),
    ({"train.distributed.num_processes": -1}, "config train.distributed.num_processes = -1"),
    ({"train.distributed.process_id": -2}, "config train.distributed.process_id = -2"),
    ({"data.source": "nifti"}, "config data.source = 'nifti' must be one of"),
    ({"data.num_classes": 1}, "config data.num_classes = 1 must be an integer >= 2"),
    ({"data.batch_labeled": 0}, "config data.batch_labeled = 0 must be an integer >= 1"),
    ({"data.batch_unlabeled": -1}, "config data.batch_unlabeled = -1 must be an integer >= 0"),
    ({"data.num_labeled": 0}, "config data.num_labeled = 0 must be an integer >= 1 (or set "
                              "data.labeled_fraction)"),
    ({"data.num_validation": -1}, "config data.num_validation = -1 must be an integer >= 0"),
    ({"data.labeled_fraction": 1.0}, "config data.labeled_fraction = 1.0 must be a number in "
                                     "[0, 1)"),
    ({"data.labeled_fraction": -0.1}, "config data.labeled_fraction = -0.1"),
    ({"data.validation_fraction": 1.5}, "config data.validation_fraction = 1.5 must be a number "
                                        "in [0, 1)"),
    ({"data.labeled_groups": 0}, "config data.labeled_groups = 0 must be an integer >= 1"),
    ({"data.labeled_groups": 3}, "config data.labeled_groups = 3 must divide data.batch_labeled"),
    ({"data.patch_size": (0, 16)}, "config data.patch_size = (0, 16) must be a tuple of 2 or 3 "
                                   "integers >= 1"),
    ({"data.patch_size": (16,)}, "config data.patch_size = (16,)"),
    ({"data.patch_size": (16, 16, 16)}, "config data.patch_size = (16, 16, 16) has 3 entries, "
                                        "the data of data.source = 'synthetic' have 2 axes"),
    ({"data.seed": -1}, "config data.seed = -1 must be an integer >= 0"),
    ({"data.clip_percentiles": (99.0, 1.0)}, "config data.clip_percentiles = (99.0, 1.0)"),
    ({"data.image_size": (0, 4)}, "config data.image_size = (0, 4) must be () or a tuple of 2"),
    ({"data.channels": 2}, "config data.channels = 2 must be one of (0, 1, 3)"),
    ({"data.list_name": ""}, "config data.list_name = '' must be a file name"),
    ({"data.synthetic.num_cases": 0}, "config data.synthetic.num_cases = 0"),
    ({"data.synthetic.shape": (8,)}, "config data.synthetic.shape = (8,)"),
    ({"data.synthetic.num_modalities": 0}, "config data.synthetic.num_modalities = 0"),
    ({"data.synthetic.layout": "random"}, "config data.synthetic.layout = 'random'"),
    ({"data.synthetic.noise": -0.1}, "config data.synthetic.noise = -0.1 must be a number >= 0"),
    ({"data.synthetic.bias": float("nan")}, "config data.synthetic.bias = nan"),
    ({"data.synthetic.num_distractors": -1}, "config data.synthetic.num_distractors = -1"),
    ({"data.augment": None}, "config data.augment = None must be True or False"),
    ({"eval.batch_size": 0}, "config eval.batch_size = 0 must be an integer >= 1"),
    ({"eval.shape_bucket": -1}, "config eval.shape_bucket = -1 must be an integer >= 0"),
    ({"eval.threshold": 1.0}, "config eval.threshold = 1.0 must be a number in (0, 1)"),
    ({"eval.threshold": 0}, "config eval.threshold = 0.0 must be a number in (0, 1)"),
    ({"eval.empty_policy": "best"}, "config eval.empty_policy = 'best' must be one of ('worst', "
                                    "'reference', 'raise')"),
    ({"eval.patch_size": (0, 8)}, "config eval.patch_size = (0, 8) must be () or a tuple of 2"),
    ({"eval.patch_size": (8, 8, 8)}, "config eval.patch_size = (8, 8, 8) must have one entry per "
                                     "axis of data.patch_size"),
    ({"eval.strides": (4, -1)}, "config eval.strides = (4, -1)"),
    ({"eval.strides": (4, 4, 4)}, "config eval.strides = (4, 4, 4) must have one entry per axis"),
    ({"eval.mirror_axes": (0, 0)}, "config eval.mirror_axes = (0, 0)"),
    ({"eval.mirror_axes": (2,)}, "config eval.mirror_axes = (2,) must name axes of "
                                 "data.patch_size"),
    ({"eval.regions": (("WT", ()),)}, "config eval.regions = (('WT', ()),) must be () or (name, "
                                      "classes) pairs"),
    ({"eval.regions": (("WT", (1,)), ("WT", (1,)))}, "config eval.regions = (('WT', (1,)), ('WT'"),
    ({"eval.regions": (("mean", (1,)),)}, "config eval.regions = (('mean', (1,)),)"),
    ({"eval.regions": (("WT", (1, 1)),)}, "config eval.regions = (('WT', (1, 1)),)"),
    ({"eval.regions": (("WT", (1, 2)),)}, "config eval.regions: region 'WT' names classes (1, 2), "
                                          "beyond data.num_classes = 2"),
    ({"eval.num_figure_cases": -1}, "config eval.num_figure_cases = -1"),
    ({"eval.lcc": None}, "config eval.lcc = None must be True or False"),
    ({"eval.case_list": "test.list"}, "config eval.case_list = 'test.list': evaluation lists are "
                                      "read from the data root of data.source = 'la'"),
]


@pytest.mark.parametrize("changes, message", BAD_VALUES, ids=lambda x: str(x)[:40])
def test_a_bad_value_names_its_key(changes, message):
  config = base_config()
  config_blocks.check_config(config)  # The base passes.
  with pytest.raises(DataError) as raised:
    config_blocks.check_config(with_changes(config, changes))
  assert str(raised.value).startswith(message), str(raised.value)
  assert "\n" not in str(raised.value)


def test_a_fraction_lets_num_labeled_be_zero():
  config = with_changes(base_config(), {"data.num_labeled": 0, "data.labeled_fraction": 0.2})
  config_blocks.check_config(config)


def _la_config(root, **changes):
  config = load_config_file(CONFIGS_DIR / "dtc.py").get_config("la8")
  return with_changes(config, {"data.root": str(root), **changes})


def test_files_named_by_the_config_must_exist(tmp_path):
  with pytest.raises(DataError, match=r"^config data.root is empty: data.source = 'la'"):
    config_blocks.check_config(_la_config(""))
  missing = tmp_path / "missing"
  with pytest.raises(DataError, match=rf"^config data.root = '{missing}': .* is not a folder"):
    config_blocks.check_config(_la_config(missing))
  with pytest.raises(DataError, match=r"^config data.list_name = 'train.list': .* is not a file"):
    config_blocks.check_config(_la_config(tmp_path))
  (tmp_path / "train.list").write_text("case1\n")
  config_blocks.check_config(_la_config(tmp_path))
  with pytest.raises(DataError, match=r"^config eval.case_list = 'test.list': .* is not a file"):
    config_blocks.check_config(_la_config(tmp_path, **{"eval.case_list": "test.list"}))
  (tmp_path / "test.list").write_text("case2\n")
  config_blocks.check_config(_la_config(tmp_path, **{"eval.case_list": "test.list"}))
  # --mode predict reads no data: the files are not checked.
  config_blocks.check_config(_la_config(missing), files=False)
  folders = load_config_file(CONFIGS_DIR / "duo.py").get_config("nuclei")
  with pytest.raises(DataError, match=r"^config data.root is empty: data.source = 'folders2d'"):
    config_blocks.check_config(folders)
  with pytest.raises(DataError, match=r"^config data.num_classes = 3, LA has 2"):
    config_blocks.check_config(_la_config(tmp_path, **{"data.num_classes": 3}))


def test_unknown_override_key_names_the_block_and_the_closest_key():
  config = base_config()
  message = config_blocks.unknown_key_message(config, "train.stepz")
  assert message.startswith("unknown key train.stepz (did you mean train.num_steps?); the keys of "
                            "train are checkpoint_every, compilation_cache, distributed, "
                            "eval_every")
  assert config_blocks.unknown_key_message(config, "train.num_steps") is None
  assert "the top-level keys are data, eval" in config_blocks.unknown_key_message(config, "dat.x")
  assert "data.seed is a value (0)" in config_blocks.unknown_key_message(config, "data.seed.x")
  assert "did you mean" not in config_blocks.unknown_key_message(config, "train.zzzzzz")


# ---------------------------------------------------------------------------------------------------
# The trainer: the checks come first, then the method's, before any data or init.


@pytest.fixture
def no_data_no_init(monkeypatch):
  """Makes reading data or building a state fail the test."""
  from jaxseg import train
  from jaxseg.data import sources

  def forbidden(*args, **kwargs):
    raise AssertionError("data read or state built before the config was checked")
  monkeypatch.setattr(sources, "load_dataset", forbidden)
  monkeypatch.setattr(train, "_initial_state", forbidden)
  return train


def test_every_mode_checks_the_config_before_reading_data(tmp_path, no_data_no_init):
  train = no_data_no_init
  config = with_changes(base_config(), {"train.num_steps": -5, "data.source": "la",
                                        "data.root": str(tmp_path / "missing")})
  message = "config train.num_steps = -5 must be an integer >= 1"
  with pytest.raises(DataError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # Not even the workdir.
  with pytest.raises(DataError, match=message):
    train.evaluate_workdir(config, str(tmp_path / "run"))
  with pytest.raises(DataError, match=message):
    train.predict_workdir(config, str(tmp_path / "run"), str(tmp_path), str(tmp_path / "out"))


def _fake_method(name, check=None):
  from jaxseg.methods import base
  module = types.ModuleType(f"jaxseg.methods.{name}")
  module.REQUIREMENTS = base.Requirements()
  if check is not None:
    module.check_config = check
  return module


def test_the_method_hook_is_required_and_runs():
  from jaxseg.methods import base
  config = base_config()
  # A module without check_config is not a method: the contract requires it.
  with pytest.raises(DataError, match=r"lacks \['check_config'\] of the method contract"):
    base.check_method_config(_fake_method("plain"), config)

  def bad_width(config):
    raise DataError("config method.model.features = (4,) must have 2 entries or more")
  with pytest.raises(DataError, match=r"^config method.model.features"):
    base.check_method_config(_fake_method("x", bad_width), config)

  def plain_value_error(config):
    raise ValueError("loss 'cross' is not one of ce, dice")
  with pytest.raises(DataError, match=r"^config method 'supervised': loss 'cross'"):
    base.check_method_config(_fake_method("x", plain_value_error), config)


def test_the_trainer_calls_the_method_hook_before_reading_data(tmp_path, monkeypatch,
                                                               no_data_no_init):
  train = no_data_no_init
  calls = []

  def check(config):
    calls.append(config.method.name)
    raise DataError("config method.loss = 'cross' must be one of ('ce', 'dice')")
  monkeypatch.setattr(train, "load_method", lambda config: _fake_method("supervised", check))
  with pytest.raises(DataError, match="config method.loss"):
    train.train_and_evaluate(base_config(), str(tmp_path / "run"))
  assert calls == ["supervised"]


def test_a_value_error_of_init_becomes_one_line_naming_the_method():
  from jaxseg import parallel, train

  def init(rng, config, example):
    raise ValueError("model.features must hold at least two widths")
  method = _fake_method("supervised")
  method.init = init
  with pytest.raises(DataError, match=r"^config method 'supervised': model.features must hold"):
    train._initial_state(method, base_config(), 1, parallel.make_mesh())


# ---------------------------------------------------------------------------------------------------
# Through the command line: one `error:` line, exit status 2, nothing read.


def run_main(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "jaxseg.main", *args], cwd=cwd, env=ENV,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    # data.root is missing too: the first failure is reported and the data are never reached.
    (["--config", "configs/dtc.py:la8", "--config.train.num_steps=-5",
      "--config.data.root=/nonexistent/la2018"],
     "error: config train.num_steps = -5 must be an integer >= 1 (or 0 with train.num_epochs >= "
     "1)\n"),
    (["--config", "configs/duo.py", "--config.train.stepz=3"],
     "error: bad config override --config.train.stepz=3: unknown key train.stepz (did you mean "
     "train.num_steps?); the keys of train are checkpoint_every, compilation_cache, distributed, "
     "eval_every, "
     "keep_checkpoints, log_every, num_epochs, num_steps\n"),
    (["--config", "configs/supervised.py", "--mode", "eval", "--config.eval.threshold=1.5"],
     "error: config eval.threshold = 1.5 must be a number in (0, 1)\n"),
], ids=["num_steps", "unknown_key", "eval_threshold"])
def test_command_line_bad_config_is_one_error_line(tmp_path, args, message):
  result = run_main(*args, "--workdir", str(tmp_path / "run"))
  assert (result.returncode, result.stderr) == (2, message)
  assert not (tmp_path / "run").exists()


def test_a_config_loading_a_sibling_parses_from_another_working_directory(tmp_path):
  """configs/dtc.py loads configs/_la_family.py by its own path, not from the working directory."""
  config = os.path.relpath(CONFIGS_DIR / "dtc.py", tmp_path)
  result = run_main("--config", f"{config}:la16", "--config.train.log_every=0",
                    "--workdir", str(tmp_path / "run"), cwd=tmp_path)
  assert (result.returncode, result.stderr) == (
      2, "error: config train.log_every = 0 must be an integer >= 1\n")


if __name__ == "__main__":
  GOLDEN_CONFIGS.write_text(json.dumps(dump_configs(), indent=1, sort_keys=True) + "\n")
  print(f"wrote {GOLDEN_CONFIGS}")
