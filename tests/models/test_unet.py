"""Tests of jaxseg.models.unet and the model registry: parameter counts, shapes, modes, gradients.

XLA's CPU compilation of `model.init` (threefry random bits for every parameter shape, plus the forward
pass) costs seconds per configuration, so the tests build variables with `numpy_variables` (shapes from
`jax.eval_shape`, values from NumPy), jit `apply`, and draw dropout masks from "rbg" keys. Init itself
is tested on single layers in test_layers.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg import models
from model_testing import normal, numpy_variables, rbg_key

pytestmark = pytest.mark.usefixtures("fast_compile")
from jaxseg.models import UNet, count_params, duo_unet, get_model, ssl4mis_unet2d, ssl4mis_unet3d

TINY = (4, 8, 16)


def _ssl4mis_unet2d_torch_count(c_in: int, num_classes: int) -> int:
  """Parameter count of SSL4MIS `UNet(bilinear=False)`, summed from its PyTorch layer list."""
  f = [16, 32, 64, 128, 256]
  conv = lambda i, o, k: k * k * i * o + o
  block = lambda i, o: conv(i, o, 3) + 2 * o + conv(o, o, 3) + 2 * o
  total = block(c_in, f[0]) + sum(block(f[i - 1], f[i]) for i in range(1, 5))
  for deep, skip in zip(f[:0:-1], f[-2::-1]):
    total += 4 * deep * skip + skip + block(2 * skip, skip)  # ConvTranspose2d(deep, skip, 2, 2) + block.
  return total + conv(f[0], num_classes, 3)


def test_parameter_counts():
  # The counts of docs/networks.md; eval_shape only, so full-size models cost nothing.
  assert count_params(duo_unet(), (1, 256, 256, 3)) == 31_390_721
  assert count_params(get_model("duo_unet"), (1, 32, 32, 3)) == 31_390_721
  assert count_params(ssl4mis_unet3d(num_classes=2), (1, 112, 112, 80, 1)) == 5_884_050
  assert count_params(get_model("unet3d"), (1, 16, 16, 16, 1)) == 5_884_050
  assert count_params(ssl4mis_unet2d(num_classes=4), (1, 256, 256, 1)) == (
      _ssl4mis_unet2d_torch_count(1, 4))


def test_registry():
  assert set(models.MODELS) >= {"unet", "duo_unet", "unet3d", "unet2d", "vnet", "vnet_sdf", "duo_critic"}
  model = get_model("unet", features=TINY, num_classes=3)
  assert isinstance(model, UNet) and model.num_classes == 3 and tuple(model.features) == TINY
  assert get_model("duo_unet", features=TINY).upsample == "linear_align_corners"
  with pytest.raises(ValueError, match="Unknown model"):
    get_model("no_such_model")


def test_duo_unet_preset_and_tree():
  model = duo_unet()
  assert (model.num_classes, model.norm, model.upsample, model.head_kernel_size) == (
      1, "batch", "linear_align_corners", 1)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                train=False))
  params = variables["params"]
  assert set(params) == {f"enc_{i}" for i in range(5)} | {f"dec_{i}" for i in range(4)} | {"head"}
  assert params["dec_3"]["Conv_0"]["kernel"].shape == (3, 3, 512 + 1024, 512)
  assert params["head"]["kernel"].shape == (1, 1, 64, 1)
  assert "batch_stats" in variables


def _jit_apply(model):
  return jax.jit(model.apply, static_argnames=("train", "dropout", "mutable"))


@pytest.mark.parametrize("upsample", ["linear", "linear_align_corners", "nearest", "transpose"])
def test_output_shape_2d(upsample):
  model = UNet(num_classes=2, features=TINY, upsample=upsample)
  x = normal((2, 16, 12, 3))
  assert _jit_apply(model)(numpy_variables(model, x), x, train=False).shape == (2, 16, 12, 2)


def test_output_shape_3d_unet3d_and_2d_ssl4mis():
  model = ssl4mis_unet3d(num_classes=2, features=TINY)
  x = normal((1, 16, 8, 12, 1))
  variables = numpy_variables(model, x)
  assert "batch_stats" not in variables  # InstanceNorm, no running statistics.
  y = _jit_apply(model)(variables, x, train=True, rngs={"dropout": rbg_key(1)})
  assert y.shape == (1, 16, 8, 12, 2)

  model = ssl4mis_unet2d(num_classes=4, features=TINY, encoder_dropout=(0.05, 0.1, 0.2))
  x = normal((2, 16, 16, 1))
  variables = numpy_variables(model, x)
  assert _jit_apply(model)(variables, x, train=False).shape == (2, 16, 16, 4)
  assert variables["params"]["head"]["kernel"].shape == (3, 3, 4, 4)
  assert variables["params"]["up_0"]["kernel"].shape == (2, 2, 8, 4)  # ConvTranspose deep -> skip.


def test_rejects_indivisible_input():
  model = UNet(features=TINY)
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.ones((1, 10, 16, 3)))


def test_gradient_finite_and_sgd_step_changes_params():
  model = UNet(num_classes=1, features=TINY, upsample="linear_align_corners")
  x = normal((2, 16, 16, 3))
  y = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 16, 16, 1)) > 0.5, jnp.float32)
  variables = numpy_variables(model, x)
  params, batch_stats = variables["params"], variables["batch_stats"]

  @jax.jit
  def loss_and_grad(params, batch_stats):

    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
      return optax.sigmoid_binary_cross_entropy(logits, y).mean(), updates

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, updates), grads = loss_and_grad(params, batch_stats)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  opt = optax.sgd(0.1)
  new_params = optax.apply_updates(params, opt.update(grads, opt.init(params), params)[0])
  flat_old = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, new in jax.tree_util.tree_leaves_with_path(new_params):
    name = jax.tree_util.keystr(path)
    if "Conv_" in name and name.endswith("['bias']"):
      # A conv bias right before a train-mode BatchNorm cancels out: (near-)zero gradient.
      assert float(jnp.abs(new - flat_old[path]).max()) < 1e-6, name
    else:
      assert bool(jnp.any(new != flat_old[path])), name
  stats_changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), batch_stats, updates["batch_stats"])
  assert all(jax.tree.leaves(stats_changed))


def test_train_vs_eval_batch_norm_and_dropout():
  model = UNet(num_classes=2, features=TINY, upsample="transpose", encoder_dropout=(0.1, 0.2, 0.5))
  x = normal((3, 16, 16, 1))
  variables = numpy_variables(model, x)
  apply = _jit_apply(model)

  x_other = x.at[1:].set(normal((2, 16, 16, 1), seed=5))  # same sample 0, other batch mates

  # Eval: running averages (a sample's output does not depend on its batch), no dropout, no RNG.
  y_eval = apply(variables, x, train=False)
  np.testing.assert_allclose(apply(variables, x_other, train=False)[0], y_eval[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(apply(variables, x, train=False), y_eval)

  # Train without dropout: batch statistics, so the output depends on the batch mates.
  y_train, _ = apply(variables, x, train=True, dropout=False, mutable=("batch_stats",))
  y_train_other, _ = apply(variables, x_other, train=True, dropout=False, mutable=("batch_stats",))
  assert not np.allclose(y_train[0], y_train_other[0], atol=1e-3)
  assert not np.allclose(y_train, y_eval, atol=1e-3)

  # Train with dropout: different 'dropout' RNGs give different outputs.
  y1, _ = apply(variables, x, train=True, mutable=("batch_stats",), rngs={"dropout": rbg_key(2)})
  y2, _ = apply(variables, x, train=True, mutable=("batch_stats",), rngs={"dropout": rbg_key(3)})
  assert not np.allclose(y1, y2, atol=1e-4)
