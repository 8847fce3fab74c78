"""Tests of jaxseg.models.uxnet: the 3D UX-Net (encoder of UX blocks, MONAI-style conv decoder).

Parameter counts are written out per layer from the layer table and compared with `jax.eval_shape`
counts (which do not depend on the spatial size). Forwards run on tiny widths (feature size 2-4) at
16^3-32^3 and are compared with a plain-lax re-implementation and NumPy.
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
from jaxseg.models import UXNet, count_params, get_model, layers, uxnet
from jaxseg.models.uxnet import GroupedConv, UXBlock, UXResBlock, channel_layer_norm

# ----------------------------------------------------------------------------------------------------
# Parameter counts from the layer table.


def _ln(d):
  """Channel LayerNorm: scale and offset."""
  return 2 * d


def _ux_block(d):
  dwconv = d * 7**3 + d        # depthwise 7^3: one 1-channel filter per channel, bias d
  norm = _ln(d)
  pwconv1 = 4 * d * 1 + 4 * d  # grouped 1^3 d -> 4d, groups d: kernel (1, 1, 1, 1, 4d), bias 4d
  pwconv2 = d * 4 + d          # grouped 1^3 4d -> d, groups d: kernel (1, 1, 1, 4, d), bias d
  gamma = d
  return dwconv + norm + pwconv1 + pwconv2 + gamma


def _encoder_table(fs, c_in):
  dims = [fs, 2 * fs, 4 * fs, 8 * fs]
  table = {"stem_conv": 7**3 * c_in * dims[0] + dims[0], "stem_norm": _ln(dims[0])}
  for i in (1, 2, 3):
    table[f"down_{i}_norm"] = _ln(dims[i - 1])
    table[f"down_{i}_conv"] = 2**3 * dims[i - 1] * dims[i] + dims[i]
  for i, d in enumerate(dims):
    for j in range(2):
      table[f"stage_{i}_block_{j}"] = _ux_block(d)
    table[f"out_norm_{i}"] = _ln(d)
  return table


def _res(i, o):
  """UnetResBlock: two 3^3 convs without bias, InstanceNorm without affine, 1^3 shortcut if i != o."""
  return 27 * i * o + 27 * o * o + (i * o if i != o else 0)


def _up(i, o):
  """UnetrUpBlock: transposed conv 2^3 without bias, then res(2o, o) on [up, skip]."""
  return 8 * i * o + _res(2 * o, o)


def _uxnet_table(fs, c_in, k):
  return {
      "encoder": sum(_encoder_table(fs, c_in).values()),
      "e1": _res(c_in, fs), "e2": _res(fs, 2 * fs), "e3": _res(2 * fs, 4 * fs),
      "e4": _res(4 * fs, 8 * fs), "e5": _res(8 * fs, 16 * fs),
      "d3": _up(16 * fs, 8 * fs), "d2": _up(8 * fs, 4 * fs), "d1": _up(4 * fs, 2 * fs),
      "d0": _up(2 * fs, fs),
      "head_res": _res(fs, fs), "head_conv": fs * k + k,
  }


UXNET_PARAMS = 53_005_922  # feature size 48, 1 channel in, K = 2


def _shapes(model, shape, dtype=jnp.float32):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jnp.zeros(shape, dtype))


def _layer_variables(module, x, seed=0):
  """`numpy_variables` for a layer whose __call__ takes no `train` (same value rules)."""
  return numpy_variables(module, x, seed, takes_train=False)


def _count(tree):
  return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def test_parameter_count_from_the_layer_table():
  table = _uxnet_table(48, 1, 2)
  assert table["encoder"] == 1_311_936 and table["e5"] == 24_182_784 and table["d3"] == 14_598_144
  assert sum(table.values()) == UXNET_PARAMS
  model = get_model("uxnet")
  assert model.feature_size == 48 and tuple(model.depths) == (2, 2, 2, 2)
  assert count_params(model, (1, 16, 16, 16, 1)) == UXNET_PARAMS
  params = _shapes(model, (1, 16, 16, 16, 1))["params"]
  assert {name: _count(tree) for name, tree in params.items()} == table
  assert {name: _count(tree) for name, tree in params["encoder"].items()} == _encoder_table(48, 1)
  block = params["encoder"]["stage_3_block_1"]
  assert block["dwconv"]["kernel"].shape == (7, 7, 7, 1, 384)
  assert block["pwconv1"]["kernel"].shape == (1, 1, 1, 1, 4 * 384)
  assert block["pwconv2"]["kernel"].shape == (1, 1, 1, 4, 384)
  assert block["gamma"].shape == (384,)
  assert params["e5"]["conv1"]["kernel"].shape == (3, 3, 3, 384, 768) and "bias" not in params["e5"]["conv1"]
  assert params["e5"]["conv3"]["kernel"].shape == (1, 1, 1, 384, 768) and "bias" not in params["e5"]["conv3"]
  assert "norm1" not in params["e5"]  # InstanceNorm without affine parameters
  assert "conv3" not in params["head_res"]  # 48 -> 48: identity shortcut
  assert params["d3"]["transp_conv"]["kernel"].shape == (2, 2, 2, 768, 384)
  assert "bias" not in params["d3"]["transp_conv"]
  assert params["d3"]["res"]["conv1"]["kernel"].shape == (3, 3, 3, 768, 384)
  assert params["head_conv"]["bias"].shape == (2,)


def test_parameter_count_small_width():
  for fs, c_in, k in ((8, 2, 3), (12, 1, 2)):
    expected = sum(_uxnet_table(fs, c_in, k).values())
    assert count_params(uxnet(num_classes=k, feature_size=fs), (1, 16, 16, 16, c_in)) == expected
  assert sum(_uxnet_table(8, 2, 3).values()) == 1_550_259


def test_validation():
  with pytest.raises(ValueError, match="divisible by 16"):
    _shapes(uxnet(feature_size=4), (1, 32, 24, 32, 1))
  with pytest.raises(ValueError, match="divisible by 16"):
    _shapes(uxnet(feature_size=4), (1, 8, 8, 8, 1))
  with pytest.raises(ValueError, match="4 encoder stages"):
    _shapes(UXNet(feature_size=4, depths=(2, 2, 2)), (1, 16, 16, 16, 1))


# ----------------------------------------------------------------------------------------------------
# Layers against NumPy / lax.


def test_channel_layer_norm_matches_numpy_channels_first():
  rng = np.random.default_rng(0)
  x_cf = rng.normal(size=(2, 5, 3, 4, 2)) * 0.5 + 3.0  # (N, C, X, Y, Z), |mean| > std
  scale, bias = rng.uniform(0.5, 1.5, 5), rng.uniform(-0.1, 0.1, 5)
  u = x_cf.mean(1, keepdims=True)
  s = ((x_cf - u)**2).mean(1, keepdims=True)
  expected = scale[:, None, None, None] * (x_cf - u) / np.sqrt(s + 1e-6) + bias[:, None, None, None]
  norm = channel_layer_norm(None, "ln")
  variables = {"params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}
  y = norm.apply(variables, jnp.asarray(np.moveaxis(x_cf, 1, -1), jnp.float32))
  np.testing.assert_allclose(np.moveaxis(np.asarray(y), -1, 1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c_in,c_out,groups,k,impl", [
    (3, 12, 3, 1, "auto"), (12, 3, 3, 1, "auto"), (6, 4, 2, 1, "auto"),
    (4, 4, 4, 3, "native"), (4, 4, 4, 3, "stacked2d"), (6, 4, 2, 3, "stacked2d"), (4, 4, 4, 3, "auto")])
def test_grouped_conv_matches_lax_feature_groups(c_in, c_out, groups, k, impl):
  conv = GroupedConv(c_out, k, groups, impl=impl)
  for shape in ((2, 5, 4, 3, c_in), (1, 6, 5, c_in)):
    x = normal(shape)
    variables = _layer_variables(conv, x)
    d = x.ndim - 2
    assert variables["params"]["kernel"].shape == (k,) * d + (c_in // groups, c_out)
    y = conv.apply(variables, x)
    p = variables["params"]
    expected = lax.conv_general_dilated(x, p["kernel"], (1,) * d, ((k // 2, k // 2),) * d,
                                        dimension_numbers=layers.conv_dimension_numbers(x.ndim),
                                        feature_group_count=groups, precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(y, expected + p["bias"], rtol=1e-5, atol=1e-5)


def test_grouped_conv_dense_path_gradient_stays_grouped():
  # The block-diagonal kernel of impl="stacked2d" gives the same gradients as the grouped convolution.
  x = normal((1, 6, 5, 4, 4))
  grads = {}
  for impl in ("native", "stacked2d"):
    conv = GroupedConv(4, 3, 4, impl=impl)
    variables = _layer_variables(conv, x)
    grads[impl] = jax.grad(lambda v: jnp.sum(jnp.sin(conv.apply(v, x))))(variables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads["native"],
               grads["stacked2d"])


def test_grouped_conv_init_uses_the_grouped_fan_in():
  d = 64
  variables = GroupedConv(4 * d, 1, d).init(jax.random.key(0), jnp.zeros((1, 2, 2, 2, d)))
  kernel = np.asarray(variables["params"]["kernel"])
  assert np.abs(kernel).max() <= 1.0 and np.abs(kernel).max() > 0.9  # U(±1/√1), fan_in = 1
  variables = GroupedConv(d, 7, d).init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, d)))
  bound = 1 / math.sqrt(343)
  assert np.abs(np.asarray(variables["params"]["kernel"])).max() <= bound


def _mlp(p, y):
  d = y.shape[-1]
  h = GroupedConv(4 * d, 1, d).apply({"params": p["pwconv1"]}, y)
  return GroupedConv(d, 1, d).apply({"params": p["pwconv2"]}, nn_gelu(h))


def nn_gelu(x):
  return jax.nn.gelu(x, approximate=False)


def test_ux_block_mlp_is_per_channel():
  d = 6
  x = normal((1, 4, 4, 4, d))
  p = _layer_variables(UXBlock(), x)["params"]
  y = normal((1, 4, 4, 4, d), seed=1)
  base = _mlp(p, y)
  for j in (0, 3, 5):
    changed = np.asarray(_mlp(p, y.at[..., j].add(1.0)) - base)
    assert np.abs(changed[..., j]).max() > 1e-4
    assert np.abs(np.delete(changed, j, axis=-1)).max() == 0.0


def test_ux_block_matches_numpy():
  d = 2
  x = normal((1, 5, 4, 3, d))
  p = jax.tree.map(np.asarray, _layer_variables(UXBlock(), x)["params"])
  p["gamma"] = np.array([3.0, -2.0], np.float32)  # a visible residual branch
  y = UXBlock().apply({"params": jax.tree.map(jnp.asarray, p)}, x)
  xn = np.asarray(x, np.float64)
  # Depthwise 7^3, padding 3, as a sum of shifted copies.
  pad = np.pad(xn, ((0, 0), (3, 3), (3, 3), (3, 3), (0, 0)))
  w = p["dwconv"]["kernel"][:, :, :, 0, :]
  h = np.zeros_like(xn)
  for a in range(7):
    for b in range(7):
      for c in range(7):
        h += pad[:, a:a + 5, b:b + 4, c:c + 3, :] * w[a, b, c]
  h += p["dwconv"]["bias"]
  u = h.mean(-1, keepdims=True)
  s = ((h - u)**2).mean(-1, keepdims=True)
  h = (h - u) / np.sqrt(s + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
  # pw1: channel j -> hidden 4j … 4j+3; pw2: hidden 4j … 4j+3 -> channel j.
  w1, b1 = p["pwconv1"]["kernel"].reshape(4 * d), p["pwconv1"]["bias"]
  hidden = np.repeat(h, 4, axis=-1) * w1 + b1
  hidden = np.asarray(jax.nn.gelu(jnp.asarray(hidden), approximate=False), np.float64)
  w2, b2 = p["pwconv2"]["kernel"].reshape(4, d), p["pwconv2"]["bias"]
  out = np.stack([hidden[..., 4 * j:4 * j + 4] @ w2[:, j] for j in range(d)], -1) + b2
  expected = xn + p["gamma"] * out
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------------
# The whole network.

FS = 4
SHAPE = (1, 32, 32, 32, 1)


@pytest.fixture(scope="module")
def tiny_forward():
  model = uxnet(num_classes=3, feature_size=FS)
  x = normal(SHAPE, seed=3)
  variables = numpy_variables(model, x)  # layer scales γ ~ U(±0.1), not 1e-6: the UX blocks count
  out = jax.jit(functools.partial(model.apply, train=True))(variables, x)
  return model, variables, x, out


def test_output_and_feature_shapes(tiny_forward):
  _, _, _, out = tiny_forward
  assert set(out) == {"logits", "features"}
  assert out["logits"].shape == (1, 32, 32, 32, 3) and out["logits"].dtype == jnp.float32
  assert {k: v.shape for k, v in out["features"].items()} == {
      "d3": (1, 4, 4, 4, 8 * FS), "d2": (1, 8, 8, 8, 4 * FS), "d1": (1, 16, 16, 16, 2 * FS),
      "d0": (1, 32, 32, 32, FS)}
  assert np.isfinite(np.asarray(out["logits"])).all()
  # Anisotropic sizes, 2D, through eval_shape.
  model = uxnet(feature_size=FS)
  for shape in ((2, 16, 48, 32, 2), (1, 32, 16, 1)):
    out = jax.eval_shape(functools.partial(model.apply, train=False), _shapes(model, shape),
                         jnp.zeros(shape))
    assert out["logits"].shape == (*shape[:-1], 2)
    assert out["features"]["d3"].shape == (shape[0], *(s // 8 for s in shape[1:-1]), 8 * FS)


_HI = lax.Precision.HIGHEST


def _conv_ref(x, p, stride=1, pad=None, groups=1):
  k = p["kernel"]
  pad = k.shape[0] // 2 if pad is None else pad
  y = lax.conv_general_dilated(x, k, (stride,) * 3, ((pad, pad),) * 3,
                               dimension_numbers=layers.conv_dimension_numbers(5),
                               feature_group_count=groups, precision=_HI)
  return y + p["bias"] if "bias" in p else y


def _ln_ref(x, p):
  u = x.mean(-1, keepdims=True)
  s = ((x - u)**2).mean(-1, keepdims=True)
  return (x - u) / jnp.sqrt(s + 1e-6) * p["scale"] + p["bias"]


def _in_ref(x):
  u = x.mean((1, 2, 3), keepdims=True)
  s = ((x - u)**2).mean((1, 2, 3), keepdims=True)
  return (x - u) / jnp.sqrt(s + 1e-5)


def _lrelu(x):
  return jnp.where(x > 0, x, 0.01 * x)


def _res_ref(x, p):
  y = _lrelu(_in_ref(_conv_ref(x, p["conv1"])))
  y = _in_ref(_conv_ref(y, p["conv2"]))
  shortcut = _in_ref(_conv_ref(x, p["conv3"])) if "conv3" in p else x
  return _lrelu(y + shortcut)


def _up_ref(x, skip, p):
  # Transposed conv k2 s2: out[2i + a] = x[i] · kernel[1 − a] (Flax orientation, layers.ConvTranspose2x).
  k = p["transp_conv"]["kernel"]
  up = lax.conv_transpose(x, k, (2, 2, 2), "VALID", dimension_numbers=("NXYZC", "XYZIO", "NXYZC"),
                          precision=_HI)
  return _res_ref(jnp.concatenate([up, skip], -1), p["res"])


def _block_ref(x, p):
  d = x.shape[-1]
  h = _ln_ref(_conv_ref(x, p["dwconv"], groups=d), p["norm"])
  h = jax.nn.gelu(_conv_ref(h, p["pwconv1"], groups=d), approximate=False)
  return x + p["gamma"] * _conv_ref(h, p["pwconv2"], groups=d)


def _uxnet_ref(x, p):
  e = p["encoder"]
  outs = []
  h = _ln_ref(_conv_ref(x, e["stem_conv"], stride=2, pad=3), e["stem_norm"])
  for i in range(4):
    if i:
      h = _conv_ref(_ln_ref(h, e[f"down_{i}_norm"]), e[f"down_{i}_conv"], stride=2, pad=0)
    for j in range(2):
      h = _block_ref(h, e[f"stage_{i}_block_{j}"])
    outs.append(_ln_ref(h, e[f"out_norm_{i}"]))
  e1 = _res_ref(x, p["e1"])
  e2, e3, e4, e5 = (_res_ref(o, p[f"e{i + 2}"]) for i, o in enumerate(outs))
  d3 = _up_ref(e5, e4, p["d3"])
  d2 = _up_ref(d3, e3, p["d2"])
  d1 = _up_ref(d2, e2, p["d1"])
  d0 = _up_ref(d1, e1, p["d0"])
  logits = _conv_ref(_res_ref(d0, p["head_res"]), p["head_conv"])
  return logits, {"d3": d3, "d2": d2, "d1": d1, "d0": d0}


def test_forward_matches_plain_lax_reference(tiny_forward):
  _, variables, x, out = tiny_forward
  logits, features = _uxnet_ref(x, variables["params"])
  np.testing.assert_allclose(out["logits"], logits, rtol=2e-4, atol=2e-4)
  for name, value in features.items():
    np.testing.assert_allclose(out["features"][name], value, rtol=2e-4, atol=2e-4, err_msg=name)


def test_res_block_identity_and_projection_shortcuts():
  x = normal((1, 4, 4, 4, 3))
  for features in (3, 5):
    block = UXResBlock(features)
    variables = _layer_variables(block, x)
    assert ("conv3" in variables["params"]) == (features != 3)
    np.testing.assert_allclose(block.apply(variables, x), _res_ref(x, variables["params"]),
                               rtol=1e-4, atol=1e-4)


def test_bfloat16_forward_is_finite():
  model = uxnet(feature_size=FS, dtype=jnp.bfloat16)
  shape = (1, 16, 16, 16, 1)
  variables = _shapes(model, shape)
  assert {a.dtype for a in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
  x = normal(shape, seed=4)
  variables = numpy_variables(model, x)
  out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert out["logits"].dtype == jnp.float32
  assert out["features"]["d0"].dtype == jnp.bfloat16
  logits = np.asarray(out["logits"].astype(jnp.float32))
  assert np.isfinite(logits).all() and np.abs(logits).max() > 0
  reference = jax.jit(uxnet(feature_size=FS).apply)(variables, x)["logits"]
  np.testing.assert_allclose(logits, reference, atol=0.25 * np.abs(np.asarray(reference)).max() + 0.05)
