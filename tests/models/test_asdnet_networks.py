"""Tests of jaxseg.models.asdnet: ASDNet's confidence FCN (both decoders), its k4 s2 p1 transposed conv,
and the Xavier-uniform (gain √2) initialisation.

Counts use `jax.eval_shape`; the forwards run on small widths (XLA:CPU compiles 3D convs slowly).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from model_testing import normal, numpy_variables

pytestmark = pytest.mark.usefixtures("fast_compile")
from jaxseg.models import ConfidenceFCN, asdnet_confidence, count_params, get_model, layers
from jaxseg.models.asdnet import ConvTranspose4x2

# (name, kind, C_in, C_out, k): the reference's Discriminator_my23DLRResFCN(2, 2, nd=3).
CONFIDENCE_LAYERS = (
    ("conv1", "conv", 2, 32, 3),
    ("conv2", "conv", 32, 64, 4),
    ("conv3", "conv", 64, 128, 4),
    ("conv4", "conv", 128, 256, 4),
    ("upconv3", "up+bn", 256, 128, 4),
    ("upconv2", "up+bn", 128, 64, 4),
    ("upconv1", "up+bn", 64, 32, 4),
    ("convX", "conv", 32, 2, 1),
)


def _count(table, d: int = 3) -> int:
  """Σ k^d·in·out + bias (out) + BN scale and offset (2·out) for the up units."""
  return sum(k**d * c_in * c_out + c_out + (2 * c_out if kind == "up+bn" else 0)
             for _, kind, c_in, c_out, k in table)


def _shapes(model, shape):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jnp.zeros(shape))


def test_confidence_parameter_count_from_the_layer_table():
  assert _count(CONFIDENCE_LAYERS) == 5_507_970
  for decoder in ("repaired", "as_coded"):  # the unused layers of "as_coded" still exist
    assert count_params(asdnet_confidence(decoder=decoder), (1, 16, 16, 16, 2)) == 5_507_970
  assert count_params(get_model("asdnet_confidence"), (1, 64, 64, 16, 2)) == 5_507_970
  # C classes in: only conv1 changes; 2D: k^2 instead of k^3.
  assert count_params(asdnet_confidence(), (1, 16, 16, 16, 4)) == 5_507_970 + 27 * 2 * 32
  assert count_params(asdnet_confidence(), (1, 16, 16, 2)) == _count(CONFIDENCE_LAYERS, d=2)
  variables = _shapes(asdnet_confidence(), (1, 16, 16, 16, 2))
  params = variables["params"]
  assert set(params) == {name for name, *_ in CONFIDENCE_LAYERS}
  for name, kind, c_in, c_out, k in CONFIDENCE_LAYERS:
    conv = params[name]["up"] if kind == "up+bn" else params[name]
    assert conv["kernel"].shape == (k, k, k, c_in, c_out), name
    assert conv["bias"].shape == (c_out,)
  assert set(variables["batch_stats"]) == {"upconv3", "upconv2", "upconv1"}


def test_conv_transpose_4x2_matches_input_dilated_conv_and_pytorch():
  for d, size in ((1, 5), (2, 4), (3, 3)):
    x = normal((2,) + (size,) * d + (3,), seed=d)
    model = ConvTranspose4x2(4, weight_init="torch")
    variables = model.init(jax.random.key(d), x)
    y = jax.jit(model.apply)(variables, x)
    kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
    ref = lax.conv_general_dilated(x, kernel, (1,) * d, ((2, 2),) * d, lhs_dilation=(2,) * d,
                                   dimension_numbers=layers.conv_dimension_numbers(x.ndim),
                                   precision=lax.Precision.HIGHEST) + bias
    assert y.shape == (2,) + (2 * size,) * d + (4,)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # 1D PyTorch ConvTranspose1d(k=4, s=2, p=1): out[2i − 1 + t] += x[i]·w[t], with w = flip(kernel).
  x = np.asarray(normal((1, 5, 3), seed=7), np.float64)
  model = ConvTranspose4x2(2, weight_init="torch")
  variables = model.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
  w = np.flip(np.asarray(variables["params"]["kernel"], np.float64), 0)
  out = np.zeros((1, 12, 2))  # 10 outputs plus one voxel of padding on each side
  for i in range(5):
    for t in range(4):
      out[:, 2 * i - 1 + t + 1] += x[:, i] @ w[t]
  expected = out[:, 1:-1] + np.asarray(variables["params"]["bias"])
  np.testing.assert_allclose(model.apply(variables, jnp.asarray(x, jnp.float32)), expected,
                             rtol=1e-5, atol=1e-5)


def test_down_conv_padding_equals_pytorch_padding_two_then_crop():
  x = normal((2, 16, 8, 3), seed=3)
  conv = layers.Conv(5, 4, strides=2, padding=((2, 1), (2, 1)))
  variables = conv.init(jax.random.key(0), x)
  y = conv.apply(variables, x)
  full = lax.conv_general_dilated(x, variables["params"]["kernel"], (2, 2), ((2, 2), (2, 2)),
                                  dimension_numbers=layers.conv_dimension_numbers(4))
  assert y.shape == (2, 8, 4, 5) and full.shape == (2, 9, 5, 5)
  np.testing.assert_allclose(y, full[:, :-1, :-1] + variables["params"]["bias"], rtol=1e-5, atol=1e-5)


def _perturb(variables, names, seed=1):
  rng = np.random.default_rng(seed)
  params = dict(variables["params"])
  for name in names:
    params[name] = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape), a.dtype),
                                params[name])
  return {**variables, "params": params}


@pytest.mark.parametrize("decoder", ["as_coded", "repaired"])
def test_which_layers_reach_the_output(decoder):
  """As coded, conv3, conv4, upconv3 and upconv2 never reach the output; repaired, they all do."""
  model = asdnet_confidence(features=(4, 8, 8, 16), decoder=decoder)
  p = jax.nn.softmax(normal((2, 16, 16, 16, 2)), axis=-1)
  variables = numpy_variables(model, p)
  apply = jax.jit(functools.partial(model.apply, train=False))
  y = apply(variables, p)
  assert y.shape == (2, 16, 16, 16, 2) and y.dtype == jnp.float32
  for names in (("conv3",), ("conv4",), ("upconv3", "upconv2")):
    y_other = apply(_perturb(variables, names), p)
    if decoder == "as_coded":
      np.testing.assert_array_equal(y_other, y)
    else:
      assert not np.allclose(y_other, y, atol=1e-4), names
  for names in (("conv1",), ("conv2",), ("upconv1",), ("convX",)):  # on the path in both
    assert not np.allclose(apply(_perturb(variables, names), p), y, atol=1e-4), names


def _confidence_reference(variables, p, decoder):
  """Discriminator_my23DLRResFCN.forward in eval mode, written from the PyTorch layer calls with XLA's
  plain convolutions: padding 2 then a crop for conv2-4, input dilation for the transposed convs."""
  params, stats = variables["params"], variables["batch_stats"]
  d = p.ndim - 2
  dn = layers.conv_dimension_numbers(p.ndim)
  hi = lax.Precision.HIGHEST
  lrelu = lambda x: jnp.where(x > 0, x, 0.2 * x)
  crop = lambda x: x[(slice(None),) + (slice(0, -1),) * d]

  def conv(name, x, stride=1, pad=0):
    w = params[name]
    return lax.conv_general_dilated(x, w["kernel"], (stride,) * d, ((pad, pad),) * d,
                                    dimension_numbers=dn, precision=hi) + w["bias"]

  def up(name, x, bridge):
    w, bn, st = params[name]["up"], params[name]["bn"], stats[name]["bn"]
    y = lax.conv_general_dilated(x, w["kernel"], (1,) * d, ((2, 2),) * d, lhs_dilation=(2,) * d,
                                 dimension_numbers=dn, precision=hi) + w["bias"]
    y = (y - st["mean"]) / jnp.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"]
    return jax.nn.relu(jax.nn.relu(y) + bridge)

  conv1 = lrelu(conv("conv1", p, pad=1))
  conv2 = lrelu(crop(conv("conv2", conv1, 2, 2)))
  conv3 = lrelu(crop(conv("conv3", conv2, 2, 2)))
  conv4 = lrelu(crop(conv("conv4", conv3, 2, 2)))
  if decoder == "as_coded":
    u = lrelu(up("upconv1", conv2, conv1))
  else:
    u = lrelu(up("upconv1", lrelu(up("upconv2", lrelu(up("upconv3", conv4, conv3)), conv2)), conv1))
  return conv("convX", u)


@pytest.mark.parametrize("decoder", ["as_coded", "repaired"])
def test_confidence_eval_mode_matches_reference_2d(decoder):
  model = asdnet_confidence(features=(4, 8, 8, 16), decoder=decoder)
  p = jax.nn.softmax(normal((2, 16, 24, 2), seed=5), axis=-1)
  variables = numpy_variables(model, p, seed=3)
  y = jax.jit(functools.partial(model.apply, train=False))(variables, p)
  np.testing.assert_allclose(y, _confidence_reference(variables, p, decoder), rtol=1e-4, atol=1e-4)


def test_as_coded_still_updates_every_batch_norm_in_train_mode():
  model = asdnet_confidence(features=(4, 8, 8, 16), decoder="as_coded")
  p = jax.nn.softmax(normal((2, 16, 16, 2), seed=2), axis=-1)  # 2D: same code, faster compile
  variables = numpy_variables(model, p)
  _, updates = model.apply(variables, p, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         updates["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_validation_and_mixed_precision():
  with pytest.raises(ValueError, match="divisible by 8"):
    _shapes(asdnet_confidence(), (1, 12, 16, 16, 2))
  with pytest.raises(ValueError, match="decoder"):
    _shapes(asdnet_confidence(decoder="fixed"), (1, 16, 16, 16, 2))
  model = ConfidenceFCN(dtype=jnp.bfloat16)
  variables = _shapes(model, (1, 16, 16, 16, 2))
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables,
                       jnp.zeros((1, 16, 16, 16, 2)))
  assert out.shape == (1, 16, 16, 16, 2) and out.dtype == jnp.float32
  assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32


def test_xavier_uniform_gain_sqrt2_and_zero_bias():
  """xavier_uniform_(w, gain=√2): U(±√2·√(6/(fan_in + fan_out))), fan = channels·∏k."""
  kernel_init, bias_init = layers.initializers("xavier_uniform", 0)
  shape = (3, 3, 3, 16, 32)
  w = np.asarray(kernel_init(jax.random.key(0), shape))
  bound = math.sqrt(2) * math.sqrt(6 / (27 * 16 + 27 * 32))
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.98 * bound
  np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.02)
  assert not np.any(np.asarray(bias_init(jax.random.key(1), (32,))))
  # The model's layers use it by default: transposed conv fans 4^d·(C_in + C_out), biases zero.
  model = asdnet_confidence(features=(4, 8, 8, 16))
  params = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0),
                                                               jnp.zeros((1, 16, 16, 2)))["params"]
  for leaf, fans in ((params["conv2"]["kernel"], 16 * (4 + 8)),
                     (params["upconv3"]["up"]["kernel"], 16 * (16 + 8)),
                     (params["convX"]["kernel"], 4 + 2)):
    bound = math.sqrt(2) * math.sqrt(6 / fans)
    assert bound * 0.5 < float(jnp.abs(leaf).max()) <= bound
  biases = [v for path, v in jax.tree_util.tree_leaves_with_path(params)
            if path[-1].key == "bias" and path[-2].key != "bn"]
  assert len(biases) == 8 and not any(np.any(np.asarray(b)) for b in biases)


# ----------------------------------------------------------------------------------------------------
# HRResSegNet_DS.


def _cbr(c_in, c_out, k):
  """Conv k (bias) + BN (scale, offset)."""
  return k**3 * c_in * c_out + c_out + 2 * c_out


def _res3(c_in, c_out, projection=True):
  """cbr 1 (→ o/2), cbr 3, Conv 1 + BN (→ o), and the Conv 1 + BN projection shortcut."""
  mid = c_out // 2
  return (_cbr(c_in, mid, 1) + _cbr(mid, mid, 3) + _cbr(mid, c_out, 1)
          + (_cbr(c_in, c_out, 1) if projection else 0))


def _res_up(c_in, c_out):
  """ConvTranspose 4 + BN, res3 (identity shortcut), res3 (projection)."""
  return _cbr(c_in, c_out, 4) + _res3(c_out, c_out, False) + _res3(c_out, c_out, True)


HRRES_LAYERS = {
    "conv_block1_32": _cbr(1, 32, 3),
    "conv_block32_32": _res3(32, 32),
    "conv_block32_64": _res3(32, 64),
    "conv_block64_128": _res3(64, 128),
    "conv_block128_256": _res3(128, 256),  # dilation changes no shape
    **{f"hr_block{i}": 2 * _cbr(32, 32, 3) for i in (1, 2, 3, 4)},  # a and b, each used twice
    "up_block256_128": _res_up(256, 128),
    "up_block128_64": _res_up(128, 64),
    "up_block64_32": _res_up(64, 32),
    "last_main": 32 * 2 + 2,
    "conv_path1": _cbr(64, 2, 1),
    "conv_path2": _cbr(128, 2, 1),
}


def test_hrres_segnet_ds_parameter_count_from_the_layer_table():
  assert sum(HRRES_LAYERS.values()) == 4_036_142
  assert count_params(get_model("hrres_segnet_ds"), (1, 16, 64, 64, 1)) == 4_036_142
  params = _shapes(get_model("hrres_segnet_ds"), (1, 16, 16, 16, 1))["params"]
  counts = {name: sum(math.prod(a.shape) for a in jax.tree.leaves(tree)) for name, tree in params.items()}
  assert counts == HRRES_LAYERS
  # Identity shortcut in the first res3 of each up unit, projection in the second and in the encoder.
  assert "convX_bn" not in params["up_block64_32"]["conv"]
  assert "convX_bn" in params["up_block64_32"]["conv2"] and "convX_bn" in params["conv_block32_32"]
  assert set(params["hr_block1"]) == {"conv1_bn_relu", "conv2_bn_relu"}
  assert params["conv_block128_256"]["conv2_bn_relu"]["conv"]["kernel"].shape == (3, 3, 3, 128, 128)


def test_hrres_segnet_ds_outputs_and_dropout():
  model = get_model("hrres_segnet_ds", features=(4, 8, 8, 16), num_classes=3)
  x = normal((2, 8, 16, 16, 1))
  variables = numpy_variables(model, x)
  apply = jax.jit(model.apply, static_argnames=("train", "dropout", "mutable"))
  out = apply(variables, x, train=False)
  assert set(out) == {"main", "aux1", "aux2"}
  for y in out.values():
    assert y.shape == (2, 8, 16, 16, 3) and y.dtype == jnp.float32
  # Train mode: channel dropout after the pools needs the 'dropout' RNG and is random.
  y1, updates = apply(variables, x, train=True, mutable=("batch_stats",),
                      rngs={"dropout": jax.random.key(1)})
  y2, _ = apply(variables, x, train=True, mutable=("batch_stats",), rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(y1["main"], y2["main"], atol=1e-4)
  assert set(updates["batch_stats"]) == set(variables["batch_stats"])
  with pytest.raises(ValueError, match="divisible by 8"):
    _shapes(model, (1, 12, 16, 16, 1))
  # bf16 compute: float32 parameters and outputs.
  mixed = get_model("hrres_segnet_ds", dtype=jnp.bfloat16)
  shapes = _shapes(mixed, (1, 8, 16, 16, 1))
  assert {a.dtype for a in jax.tree.leaves(shapes["params"])} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(functools.partial(mixed.apply, train=False), shapes, jnp.zeros((1, 8, 16, 16, 1)))
  assert {y.dtype for y in out.values()} == {jnp.dtype(jnp.float32)}


def test_dilated_conv_matches_a_zero_inserted_kernel():
  """Dilation 2 with padding 2 = the same kernel spread over 5^d with zeros in between, padding 2."""
  from jaxseg.models.asdnet import _DilatedConv
  x = normal((1, 8, 8, 3), seed=4)
  model = _DilatedConv(4, 3, 2, "xavier_uniform", None)
  variables = model.init(jax.random.key(0), x)
  kernel = variables["params"]["kernel"]
  spread = jnp.zeros((5, 5, 3, 4)).at[::2, ::2].set(kernel)
  expected = lax.conv_general_dilated(x, spread, (1, 1), ((2, 2), (2, 2)),
                                      dimension_numbers=layers.conv_dimension_numbers(4))
  np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
