"""train.compilation_cache: the folder of JAX's persistent cache that `python -m jaxseg.main` uses
(config_blocks.compilation_cache_dir, train.use_compilation_cache)."""

import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.experimental.compilation_cache import compilation_cache

from jaxseg import config_blocks, train
from jaxseg.data.base import DataError


def _config(**train) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = config_blocks.train_block()
  c.train.update(train)
  return c


def test_the_folder_by_key_and_environment():
  home = os.path.expanduser("~")
  default = _config()
  assert default.train.compilation_cache == "~/.cache/jaxseg/xla"
  assert config_blocks.compilation_cache_dir(default, {}) == f"{home}/.cache/jaxseg/xla"
  # JAX's own variable names the folder when the key is left at its default...
  assert config_blocks.compilation_cache_dir(
      default, {"JAX_COMPILATION_CACHE_DIR": "/tmp/jaxcache"}) == "/tmp/jaxcache"
  # ...an explicit folder wins over it, and "" turns the cache off whatever the environment says.
  assert config_blocks.compilation_cache_dir(
      _config(compilation_cache="~/xla"), {"JAX_COMPILATION_CACHE_DIR": "/tmp/j"}) == f"{home}/xla"
  assert config_blocks.compilation_cache_dir(
      _config(compilation_cache=""), {"JAX_COMPILATION_CACHE_DIR": "/tmp/j"}) is None
  # A config without a train block (configs/data_demo.py) gets the default.
  assert config_blocks.compilation_cache_dir(ml_collections.ConfigDict(), {}) == (
      f"{home}/.cache/jaxseg/xla")


def test_a_non_string_folder_is_refused_naming_the_key():
  config = ml_collections.ConfigDict()
  # A ConfigDict keeps a key's type: a block built with a number stands for a hand-written config.
  config.train = ml_collections.ConfigDict({**config_blocks.train_block().to_dict(),
                                            "compilation_cache": 3})
  with pytest.raises(DataError, match=r"config train.compilation_cache = 3 must be a string"):
    config_blocks.check_config(config, files=False)


@pytest.fixture
def restore_cache_settings():
  names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs")
  saved = {n: getattr(jax.config, n) for n in names}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # Back to the tests' cache (conftest.py).


def _compile_something(scale: float) -> None:
  jax.jit(lambda x: jnp.tanh(x * scale) + 1.0)(jnp.ones((3, 5))).block_until_ready()


def test_programs_are_written_to_the_folder_and_not_when_off(tmp_path, restore_cache_settings):
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  on = tmp_path / "on"
  train.use_compilation_cache(str(on))
  _compile_something(2.5)
  assert on.is_dir() and any(on.iterdir())
  train.use_compilation_cache(None)
  assert not jax.config.jax_enable_compilation_cache
  entries = set(pathlib.Path(on).iterdir())
  _compile_something(3.5)
  assert set(pathlib.Path(on).iterdir()) == entries
