"""The pieces every method shares (the optimisers, formerly tested here: tests/test_optim.py)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxseg import optim
from jaxseg.data.base import DataError
from jaxseg.methods import base


def test_model_kwargs_maps_the_compute_dtype_and_lists_to_tuples():
  cfg = ml_collections.ConfigDict(dict(name="vnet", n_filters=4, dtype="bfloat16",
                                       strides=[2, 2, 1]))
  assert base.model_kwargs(cfg) == dict(n_filters=4, dtype=jnp.bfloat16, strides=(2, 2, 1))
  cfg.dtype = "float32"
  assert base.model_kwargs(cfg)["dtype"] is None  # The model's own default: float32.


def test_model_kwargs_rejects_an_unknown_dtype_naming_the_key():
  cfg = ml_collections.ConfigDict(dict(name="vnet", dtype="float16"))
  with pytest.raises(DataError, match=r"config method\.\*\.dtype of model 'vnet' is 'float16'"):
    base.model_kwargs(cfg)


def test_scalar_metrics_are_float32_scalars():
  metrics = base.scalar_metrics(loss=jnp.asarray(1.5, jnp.bfloat16), step=3)
  assert {k: (v.dtype, v.shape) for k, v in metrics.items()} == {
      "loss": (np.float32, ()), "step": (np.float32, ())}


def test_check_method_config_checks_the_optimiser_blocks_before_the_method_hook():
  class Method:  # A method whose own check would pass.
    REQUIREMENTS = None  # Only present: check_config would read it.

    @staticmethod
    def check_config(config):
      pass
  config = ml_collections.ConfigDict(dict(method=dict(
      name="x", discriminator_optimizer=optim.optimizer_config("adam", 1e-4, beta2=1.0))))
  with pytest.raises(DataError, match=r"^config method\.discriminator_optimizer\.beta2 = 1\.0 "):
    base.check_method_config(Method, config)


def test_crop_sizes_are_checked_for_training_and_evaluation_windows():
  config = ml_collections.ConfigDict(dict(
      data=dict(patch_size=(32, 32, 16)), eval=dict(patch_size=None)))
  base.check_crop_sizes(config, 8, "three halvings")  # Divisible: no error.
  config.data.patch_size = (32, 36, 16)
  with pytest.raises(DataError, match=r"^config data.patch_size = \(32, 36, 16\): every size must "
                     r"be divisible by 8 \(three halvings\)$"):
    base.check_crop_sizes(config, 8, "three halvings")
  config.data.patch_size = (32, 32, 16)
  config.eval.patch_size = (64, 64, 20)
  with pytest.raises(DataError, match=r"^config eval.patch_size = \(64, 64, 20\)"):
    base.check_crop_sizes(config, 8, "three halvings")
  base.check_crop_sizes(config, 4, "two halvings")
