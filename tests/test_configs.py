"""Every config and preset loads; the LA presets carry the LA protocol (METHODS.md §1)."""

import importlib.util
import pathlib

import pytest

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_loads_and_the_docstring_gives_the_command(path):
  module = load(path)
  assert f"python -m jaxseg.main --config configs/{path.name}" in module.__doc__
  for preset in module.PRESETS:
    config = module.get_config(preset)
    assert config.name and config.job
  with pytest.raises(ValueError, match="unknown preset"):
    module.get_config("no_such_preset")


@pytest.mark.parametrize("name", ["duo", "supervised"])
def test_la_presets_follow_the_protocol(name):
  config = load(pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py").get_config(
      "la")
  assert config.data.source == "la"
  assert (config.data.num_labeled, config.data.num_validation) == (8, 8)
  assert tuple(config.data.patch_size) == (112, 112, 80)
  assert config.train.num_steps == 6000
  assert tuple(config.eval.strides) == (18, 18, 4)
  assert config.data.batch_labeled + config.data.batch_unlabeled == 4
