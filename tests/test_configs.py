"""Every config and preset loads; the LA presets carry the LA protocol (docs/la_protocol.md)."""

import pytest

from conftest import CONFIGS_DIR, load_config_file as load

# configs/_*.py are helpers the config files load (e.g. _la_family.py), not config files.
CONFIGS = sorted(p for p in CONFIGS_DIR.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_loads_and_the_docstring_gives_the_command(path):
  module = load(path)
  assert f"python -m jaxseg.main --config configs/{path.name}" in module.__doc__
  for preset in module.PRESETS:
    config = module.get_config(preset)
    assert config.name and config.job
  with pytest.raises(ValueError, match="unknown preset"):
    module.get_config("no_such_preset")


@pytest.mark.parametrize("name", ["duo"])
def test_la_presets_follow_the_protocol(name):
  config = load(CONFIGS_DIR / f"{name}.py").get_config("la")
  assert config.data.source == "la"
  assert (config.data.num_labeled, config.data.num_validation) == (8, 8)
  assert tuple(config.data.patch_size) == (112, 112, 80)
  assert config.train.num_steps == 6000
  assert tuple(config.eval.strides) == (18, 18, 4)
  assert config.data.batch_labeled + config.data.batch_unlabeled == 4


LA_FAMILY = ["supervised_vnet", "dtc", "sassnet", "mean_teacher", "uamt"]


@pytest.mark.parametrize("name", LA_FAMILY)
@pytest.mark.parametrize("preset, labeled", [("la8", 8), ("la16", 16)])
def test_la_family_presets_follow_the_protocol(name, preset, labeled):
  """docs/la_protocol.md: labeled = first N of train.list, validation = last 8, 112x112x80, 2 + 2 (4
  labeled for the supervised baseline), SGD 0.01 momentum 0.9 wd 1e-4 x0.1 every 2500, 6000 steps,
  window strides (18, 18, 4), V-Net of width 16, ramps of 40 blocks of 150 steps."""
  config = load(CONFIGS_DIR / f"{name}.py").get_config(preset)
  assert config.data.source == "la" and config.data.list_name == "train.list"
  assert (config.data.num_labeled, config.data.num_validation) == (labeled, 8)
  assert tuple(config.data.patch_size) == (112, 112, 80)
  assert (config.data.batch_labeled, config.data.batch_unlabeled) == (
      (4, 0) if name == "supervised_vnet" else (2, 2))
  opt = config.method.optimizer
  assert (opt.name, opt.learning_rate, opt.momentum, opt.weight_decay) == ("sgd", 0.01, 0.9, 1e-4)
  assert (opt.decay_every, opt.decay_factor) == (2500, 0.1)
  assert config.train.num_steps == 6000
  assert tuple(config.eval.patch_size) == (112, 112, 80)
  assert tuple(config.eval.strides) == (18, 18, 4) and config.eval.threshold == 0.5
  assert config.method.model.n_filters == 16
  if "rampup_block" in config.method:
    assert (config.method.rampup_block, config.method.consistency_rampup) == (150, 40)
  if "threshold_rampup" in config.method:
    assert config.method.threshold_rampup == 6000


@pytest.mark.parametrize("name", LA_FAMILY)
def test_la_family_default_runs_on_synthetic_data_with_squeezed_ramps(name):
  config = load(CONFIGS_DIR / f"{name}.py").get_config("")
  assert config.data.source == "synthetic" and config.train.num_steps == 400
  if "rampup_block" in config.method:
    assert config.method.rampup_block * config.method.consistency_rampup == 400


def test_la_presets_of_dtc_and_sassnet_are_the_published_settings():
  assert load(CONFIGS_DIR / "dtc.py").get_config("la8").method.preset == "released"
  sassnet = load(CONFIGS_DIR / "sassnet.py")
  assert sassnet.get_config("la8").method.beta_max == 0.015
  assert sassnet.get_config("la16").method.beta_max == 0.01
