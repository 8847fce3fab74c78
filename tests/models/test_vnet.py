"""Tests of jaxseg.models.vnet: the 9,448,866-parameter configuration, heads, shapes, modes, gradients.

As in test_unet.py, variables come from `jax.eval_shape` + NumPy (XLA's CPU compile of `model.init` is
slow), `apply` is jitted and dropout masks come from "rbg" keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model_testing import normal, numpy_variables, rbg_key

pytestmark = pytest.mark.usefixtures("fast_compile")
from jaxseg.models import VNet, count_params, get_model, svnet, vnet, vnet_sdf

VNET_PARAMS = 9_448_866
# 2 · Σ BN channels: blocks 16·1 + 32·2 + 64·3 + 128·3 + 256·3 + 128·3 + 64·3 + 32·2 + 16·1 = 2080,
# Down 32 + 64 + 128 + 256 = 480, Up 128 + 64 + 32 + 16 = 240.
VNET_BN_PARAMS = 2 * (2080 + 480 + 240)


def _jit_apply(model):
  return jax.jit(model.apply, static_argnames=("train", "dropout", "mutable"))


def test_parameter_count_pins_the_reference_configuration():
  """9,448,866 = 1 input channel, base width 16, BatchNorm (affine), biases on every conv."""
  la_patch = (1, 112, 112, 80, 1)
  assert count_params(vnet(), la_patch) == VNET_PARAMS
  assert count_params(get_model("vnet", num_classes=2), (1, 16, 16, 16, 1)) == VNET_PARAMS
  assert count_params(vnet_sdf(), la_patch) == VNET_PARAMS
  assert count_params(get_model("vnet_sdf"), (1, 16, 16, 16, 1)) == VNET_PARAMS
  # GroupNorm(16) is affine too; without normalisation (or InstanceNorm without affine) the BN
  # scale/bias are missing; a 3-channel input (the PyTorch default n_channels=3) adds 2·27·16.
  assert count_params(vnet(norm="group"), la_patch) == VNET_PARAMS
  assert count_params(vnet(norm="none"), la_patch) == VNET_PARAMS - VNET_BN_PARAMS == 9_443_266
  assert count_params(vnet(norm="instance"), la_patch) == VNET_PARAMS - VNET_BN_PARAMS
  assert count_params(vnet(), (1, 112, 112, 80, 3)) == VNET_PARAMS + 2 * 27 * 16


def test_parameter_tree_mirrors_reference_names():
  variables = jax.eval_shape(functools.partial(vnet_sdf().init, train=False), jax.random.key(0),
                             jnp.zeros((1, 16, 16, 16, 1)))
  params = variables["params"]
  names = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
  expected = {f"block_{n}" for n in names} | {f"block_{n}_dw" for n in names[:4]}
  expected |= {f"block_{n}_up" for n in names[4:8]} | {"head_sdf", "head_seg"}
  assert set(params) == expected
  assert [k for k in params["block_three"] if k.startswith("Conv")] == ["Conv_0", "Conv_1", "Conv_2"]
  assert params["block_one_dw"]["Conv_0"]["kernel"].shape == (2, 2, 2, 16, 32)
  assert params["block_five_up"]["ConvTranspose2x_0"]["kernel"].shape == (2, 2, 2, 256, 128)
  assert params["head_sdf"]["kernel"].shape == (1, 1, 1, 16, 1)
  assert params["head_seg"]["kernel"].shape == (1, 1, 1, 16, 1)


def test_output_shapes_3d_and_2d():
  x = normal((1, 16, 16, 32, 1))
  model = vnet(n_filters=4)
  y = _jit_apply(model)(numpy_variables(model, x), x, train=False)
  assert y.shape == (1, 16, 16, 32, 2)

  model = vnet_sdf(n_filters=4)
  x = normal((2, 32, 16, 1))
  out = _jit_apply(model)(numpy_variables(model, x), x, train=False)
  assert list(out) == ["sdf", "seg"]
  assert out["sdf"].shape == out["seg"].shape == (2, 32, 16, 1)
  assert float(jnp.abs(out["sdf"]).max()) <= 1.0


def test_configurable_heads_and_validation():
  model = VNet(heads=(("seg", 3, None), ("prob", 1, "sigmoid")), n_filters=4, norm="instance")
  shapes = jax.eval_shape(functools.partial(model.apply, train=False),
                          numpy_variables(model, jnp.zeros((1, 16, 16, 1))), jnp.zeros((1, 16, 16, 1)))
  assert shapes["seg"].shape == (1, 16, 16, 3) and shapes["prob"].shape == (1, 16, 16, 1)
  with pytest.raises(ValueError, match="divisible by 16"):
    jax.eval_shape(functools.partial(vnet(n_filters=4).init, train=False), jax.random.key(0),
                   jnp.zeros((1, 24, 16, 1)))
  with pytest.raises(ValueError, match="activation"):
    jax.eval_shape(functools.partial(VNet(heads=(("x", 1, "relu6"),)).init, train=False),
                   jax.random.key(0), jnp.zeros((1, 16, 16, 1)))


def test_train_vs_eval_dropout_and_batch_norm():
  model = vnet_sdf(n_filters=4)
  x = normal((2, 16, 32, 1))  # 2D: the same code as 3D, compiled faster
  x_other = x.at[1].set(normal((16, 32, 1), seed=5))  # same sample 0, another batch mate
  variables = numpy_variables(model, x)
  apply = _jit_apply(model)
  # Eval: deterministic, no RNG needed, running averages (a sample ignores its batch mates).
  y_eval = apply(variables, x, train=False)
  np.testing.assert_array_equal(apply(variables, x, train=False)["seg"], y_eval["seg"])
  np.testing.assert_allclose(apply(variables, x_other, train=False)["seg"][0], y_eval["seg"][0],
                             rtol=1e-5, atol=1e-5)
  # Train: channel dropout (different masks, different outputs), batch statistics (sample 0 depends on
  # its batch mate) and updated running averages.
  y1, upd = apply(variables, x, train=True, mutable=("batch_stats",), rngs={"dropout": rbg_key(1)})
  y2, _ = apply(variables, x, train=True, mutable=("batch_stats",), rngs={"dropout": rbg_key(2)})
  assert not np.allclose(y1["seg"], y2["seg"], atol=1e-4)
  y3, _ = apply(variables, x_other, train=True, mutable=("batch_stats",), rngs={"dropout": rbg_key(1)})
  assert not np.allclose(y1["seg"][0], y3["seg"][0], atol=1e-4)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         upd["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_gradient_finite_and_sgd_step_changes_params():
  model = vnet_sdf(n_filters=4)
  x = normal((2, 32, 16, 1))  # 2D: the same code as 3D, compiled faster (3D gradients: test_layers.py)
  y = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 32, 16, 1)) > 0.5, jnp.float32)
  variables = numpy_variables(model, x)
  params = variables["params"]

  @jax.jit
  def grads_fn(params):

    def loss_fn(params):
      out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                           dropout=False, mutable=["batch_stats"])
      return (optax.sigmoid_binary_cross_entropy(out["seg"], y).mean()
              + jnp.mean((out["sdf"] - (1 - 2 * y)) ** 2))

    return jax.value_and_grad(loss_fn)(params)

  loss, grads = grads_fn(params)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  opt = optax.sgd(0.1)
  new_params = optax.apply_updates(params, opt.update(grads, opt.init(params), params)[0])
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new_params)):
    name = jax.tree_util.keystr(path)
    if name.endswith("['bias']") and not name.startswith("['head"):
      continue  # conv biases before a train-mode BatchNorm have zero gradient
    assert bool(jnp.any(new != old)), name


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
  """Mixed precision: bf16 convolutions, float32 parameters, BN statistics and head outputs."""
  x = normal((2, 16, 16, 16, 1))
  full, mixed = vnet_sdf(n_filters=4), vnet_sdf(n_filters=4, dtype=jnp.bfloat16)
  variables = jax.jit(functools.partial(full.init, train=False))(jax.random.key(0), x)
  mixed_variables = jax.jit(functools.partial(mixed.init, train=False))(jax.random.key(0), x)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(mixed_variables)):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)  # Same initialisation: parameters are created in float32.
  want, got = _jit_apply(full)(variables, x, train=False), _jit_apply(mixed)(variables, x, train=False)
  for name in ("seg", "sdf"):
    assert got[name].dtype == jnp.float32
    # bf16 keeps 8 bits of mantissa: a few 1e-3 relative through ~20 layers.
    scale = float(jnp.abs(want[name]).max())
    assert float(jnp.abs(got[name] - want[name]).max()) < 5e-2 * scale
    assert float(jnp.abs(got[name] - want[name]).max()) > 0  # It did compute in bf16.


# svnet (ASDNet's "SVNet"): the layers the deepest level adds, as (name, kind, C_in, C_out, k) with
# n = 16: block four's Down (128 → 256, k2), block five (3 × Conv 3, 256 → 256) and its Up (256 → 128).
SVNET_REMOVED = (
    ("block_four_dw", "conv+bn", 128, 256, 2),
    ("block_five", "conv+bn", 256, 256, 3),
    ("block_five", "conv+bn", 256, 256, 3),
    ("block_five", "conv+bn", 256, 256, 3),
    ("block_five_up", "conv+bn", 256, 128, 2),
)


def test_svnet_is_vnet_less_its_deepest_level():
  """Σ k³·in·out + bias + BN scale and offset over the removed layers = 5,836,160."""
  removed = sum(k**3 * c_in * c_out + c_out + 2 * c_out for _, _, c_in, c_out, k in SVNET_REMOVED)
  assert removed == 5_836_160
  assert count_params(svnet(), (1, 112, 112, 80, 1)) == VNET_PARAMS - removed == 3_612_706
  assert count_params(get_model("svnet"), (1, 16, 16, 16, 1)) == 3_612_706
  # The same tree minus exactly the removed modules, every other shape unchanged.
  shapes = lambda model: jax.tree.map(lambda a: a.shape, jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 16, 16, 16, 1))))
  full, small = shapes(vnet()), shapes(svnet())
  gone = {name for name, *_ in SVNET_REMOVED}
  for collection in ("params", "batch_stats"):
    assert set(full[collection]) - set(small[collection]) == gone
    assert {k: v for k, v in full[collection].items() if k not in gone} == small[collection]
  # vnet's fields are unchanged by the option; svnet is Xavier-initialised (ASDNet).
  assert not vnet().drop_deepest and svnet().weight_init == "xavier_uniform"


def test_svnet_shapes_and_divisibility():
  model = svnet(n_filters=4, num_classes=3)
  x = normal((1, 8, 16, 24, 1))  # divisible by 8, not by 16
  y = _jit_apply(model)(numpy_variables(model, x), x, train=False)
  assert y.shape == (1, 8, 16, 24, 3) and y.dtype == jnp.float32
  with pytest.raises(ValueError, match="divisible by 8"):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                   jnp.zeros((1, 12, 16, 1)))
  with pytest.raises(ValueError, match="divisible by 16"):
    jax.eval_shape(functools.partial(vnet(n_filters=4).init, train=False), jax.random.key(0),
                   jnp.zeros((1, 8, 16, 1)))
