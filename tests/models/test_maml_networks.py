"""Tests of jaxseg.models.maml: MAML's nnU-Net branch and the multi-modal network.

Parameter counts are written out from the layer rules (conv k^d·c_in·c_out + c_out bias; InstanceNorm
affine 2·c; transposed conv 2^d·c_in·c_out, no bias; heads F·K, no bias) and compared with
`jax.eval_shape` counts of the full-size networks on small inputs (counts do not depend on the spatial
size). The forwards are compared with a plain-`lax` re-implementation written from the reference's layer
calls, on tiny 2D and 3D networks.
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
from jaxseg.models import MAML, NNUNetBranch, count_params, get_model, layers, maml, nnunet_branch

# ----------------------------------------------------------------------------------------------------
# Parameter counts from the layer table.


def _conv(k, c_in, c_out, d=3, bias=True):
  return k**d * c_in * c_out + (c_out if bias else 0)


def _cnl(c_in, c_out, d=3):
  """Conv 3 (bias) → InstanceNorm (scale, offset) → LReLU."""
  return _conv(3, c_in, c_out, d) + 2 * c_out


def _branch_table(widths, num_classes, c_in=1, d=3):
  """{module name: parameters} of one branch with level widths f_0 … f_P."""
  num_pools = len(widths) - 1
  table = {}
  for level, f in enumerate(widths):
    previous = c_in if level == 0 else widths[level - 1]
    table[f"enc_{level}"] = _cnl(previous, f, d) + _cnl(f, f, d)
  for level in range(num_pools):
    f = widths[level]
    table[f"up_{level}"] = _conv(2, widths[level + 1], f, d, bias=False)
    table[f"dec_{level}"] = _cnl(2 * f, f, d) + _cnl(f, f, d)  # concat [up, skip]
    table[f"head_{level}"] = _conv(1, f, num_classes, d, bias=False)
  return table


def _shared_table(num_modalities, features, num_classes, ma_kernel, d=3):
  """{module name: parameters} of the fusion, MA modules and joint head."""
  ma = _cnl(2 * features, features, d) + _conv(ma_kernel, features, features, d)
  return {"fusion": _conv(3, num_modalities * features, features, d),
          **{f"ma_{m}": ma for m in range(num_modalities)},
          "joint_head": _conv(1, features, num_classes, d, bias=False)}


BRATS_WIDTHS = (16, 32, 64, 128, 256, 320)
# One BraTS branch (3D, 1 channel in, 4 classes): 16,593,456 parameters.
BRATS_BRANCH = 16_593_456
# Fusion 27·64·16 + 16 = 27,664; MA module 27·32·16 + 16 + 2·16 + k³·16·16 + 16 (×4); head 16·4.
BRATS_SHARED = {1: 27_664 + 4 * 14_144 + 64, 3: 27_664 + 4 * 20_800 + 64}
BRATS_MAML = {k: 4 * BRATS_BRANCH + shared for k, shared in BRATS_SHARED.items()}  # 66,458,128 / 66,484,752


def _shapes(model, shape):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros(shape))


def _subtree_counts(params):
  return {name: sum(math.prod(a.shape) for a in jax.tree.leaves(tree)) for name, tree in params.items()}


def test_branch_parameter_count_from_the_layer_table():
  table = _branch_table(BRATS_WIDTHS, 4)
  assert sum(table.values()) == BRATS_BRANCH
  branch = get_model("nnunet_branch")
  assert branch.widths(3) == BRATS_WIDTHS
  assert count_params(branch, (1, 32, 32, 32, 1)) == BRATS_BRANCH
  assert count_params(nnunet_branch(), (1, 64, 32, 96, 1)) == BRATS_BRANCH  # any divisible size
  params = _shapes(branch, (1, 32, 32, 32, 1))["params"]
  assert _subtree_counts(params) == table
  assert params["enc_1"]["cnl_0"]["conv"]["kernel"].shape == (3, 3, 3, 16, 32)
  assert params["up_4"]["kernel"].shape == (2, 2, 2, 320, 256) and "bias" not in params["up_4"]
  assert params["dec_0"]["cnl_0"]["conv"]["kernel"].shape == (3, 3, 3, 32, 16)
  assert params["head_0"]["kernel"].shape == (1, 1, 1, 16, 4) and "bias" not in params["head_0"]
  assert set(params["enc_0"]["cnl_0"]["norm"]) == {"scale", "bias"}


def test_branch_widths_cap_and_2d():
  # nnU-Net's caps: 320 in 3D, 480 in 2D (released code: max_num_features=None); max_features overrides.
  assert NNUNetBranch().widths(2) == (16, 32, 64, 128, 256, 480)
  assert NNUNetBranch(max_features=320).widths(2) == BRATS_WIDTHS
  assert NNUNetBranch(base_features=32, num_pools=6).widths(3) == (32, 64, 128, 256, 320, 320, 320)
  two_d = _branch_table((16, 32, 64, 128, 256, 480), 4, d=2)
  assert count_params(nnunet_branch(), (1, 32, 32, 1)) == sum(two_d.values())
  tiny = _branch_table((4, 8, 16), 3, c_in=2, d=2)
  assert count_params(NNUNetBranch(3, 4, 2), (1, 8, 8, 2)) == sum(tiny.values())


@pytest.mark.parametrize("ma_kernel", [1, 3])
def test_maml_parameter_count_from_the_layer_table(ma_kernel):
  shared = _shared_table(4, 16, 4, ma_kernel)
  assert sum(shared.values()) == BRATS_SHARED[ma_kernel]
  assert BRATS_MAML[ma_kernel] == {1: 66_458_128, 3: 66_484_752}[ma_kernel]
  preset = {1: "paper", 3: "released"}[ma_kernel]
  model = get_model("maml", preset=preset)
  assert model.ma_kernel == ma_kernel
  assert count_params(model, (1, 32, 32, 32, 4)) == BRATS_MAML[ma_kernel]
  params = _shapes(model, (1, 32, 32, 32, 4))["params"]
  counts = _subtree_counts(params)
  assert counts == {**shared, **{f"branch_{m}": BRATS_BRANCH for m in range(4)}}
  assert params["ma_2"]["conv_1"]["kernel"].shape == (ma_kernel,) * 3 + (16, 16)
  assert params["ma_2"]["conv_0"]["kernel"].shape == (3, 3, 3, 32, 16)
  assert params["fusion"]["kernel"].shape == (3, 3, 3, 64, 16)
  assert "bias" not in params["joint_head"]
  # Tiny 2D config: M = 2, F = 4, 2 poolings, K = 3.
  tiny = MAML(num_classes=3, base_features=4, num_pools=2, ma_kernel=ma_kernel)
  expected = (2 * sum(_branch_table((4, 8, 16), 3, d=2).values())
              + sum(_shared_table(2, 4, 3, ma_kernel, d=2).values()))
  assert count_params(tiny, (1, 8, 8, 2)) == expected


def test_output_shapes_and_deep_supervision_scales():
  for model, shape in ((maml(), (1, 32, 32, 32, 4)),
                       (maml(preset="released", num_classes=3), (2, 64, 96, 2)),
                       (MAML(num_classes=2, base_features=4, num_pools=4), (1, 64, 32, 16, 3)),
                       (MAML(num_classes=2, base_features=4, num_pools=1), (1, 6, 10, 1))):
    variables = _shapes(model, shape)
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, jnp.zeros(shape))
    n, *spatial, num_modalities = shape
    k = model.num_classes
    assert set(out) == {"joint", "branches"}
    assert out["joint"].shape == (n, *spatial, k) and out["joint"].dtype == jnp.float32
    assert len(out["branches"]) == num_modalities
    for scales in out["branches"]:
      assert [y.shape for y in scales] == [(n, *(s >> l for s in spatial), k)
                                           for l in range(model.num_pools)]
      assert all(y.dtype == jnp.float32 for y in scales)
  branch = nnunet_branch(num_classes=2)
  shape = (1, 32, 64, 32, 1)
  out = jax.eval_shape(functools.partial(branch.apply, train=False), _shapes(branch, shape),
                       jnp.zeros(shape))
  assert out["features"].shape == (1, 32, 64, 32, 16)
  assert [y.shape[1:4] for y in out["logits"]] == [(32, 64, 32), (16, 32, 16), (8, 16, 8), (4, 8, 4),
                                                   (2, 4, 2)]


def test_validation_and_mixed_precision():
  with pytest.raises(ValueError, match="divisible by 2\\^num_pools = 32"):
    _shapes(maml(), (1, 48, 32, 32, 4))
  with pytest.raises(ValueError, match="divisible by 2\\^num_pools = 4"):
    _shapes(NNUNetBranch(num_pools=2), (1, 8, 6, 1))
  with pytest.raises(ValueError, match="ma_kernel"):
    _shapes(MAML(ma_kernel=5, num_pools=1), (1, 8, 8, 2))
  with pytest.raises(ValueError, match="shared_init"):
    _shapes(MAML(shared_init="xavier", num_pools=1), (1, 8, 8, 2))
  with pytest.raises(ValueError, match="preset"):
    maml(preset="mine")
  model = maml(dtype=jnp.bfloat16)
  variables = _shapes(model, (1, 32, 32, 32, 2))
  assert {a.dtype for a in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables, jnp.zeros((1, 32, 32, 32, 2)))
  assert {y.dtype for y in jax.tree.leaves(out)} == {jnp.dtype(jnp.float32)}


# ----------------------------------------------------------------------------------------------------
# Forward pass against a plain-lax re-implementation.

_HI = lax.Precision.HIGHEST


def _conv_ref(x, p, stride=1):
  k = p["kernel"]
  pad = k.shape[0] // 2
  d = x.ndim - 2
  y = lax.conv_general_dilated(x, k, (stride,) * d, ((pad, pad),) * d,
                               dimension_numbers=layers.conv_dimension_numbers(x.ndim), precision=_HI)
  return y + p["bias"] if "bias" in p else y


def _instance_norm_ref(x, p):
  axes = tuple(range(1, x.ndim - 1))
  mean = x.mean(axes, keepdims=True)
  var = ((x - mean)**2).mean(axes, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _lrelu(x):
  return jnp.where(x > 0, x, 0.01 * x)


def _stage_ref(x, p, first_stride=1):
  x = _lrelu(_instance_norm_ref(_conv_ref(x, p["cnl_0"]["conv"], first_stride), p["cnl_0"]["norm"]))
  return _lrelu(_instance_norm_ref(_conv_ref(x, p["cnl_1"]["conv"]), p["cnl_1"]["norm"]))


def _up_ref(x, p):
  """Flax/`lax.conv_transpose` semantics of a k2 s2 transposed conv (layers.ConvTranspose2x)."""
  d = x.ndim - 2
  spec = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[d]
  return lax.conv_transpose(x, p["kernel"], (2,) * d, "VALID", dimension_numbers=spec, precision=_HI)


def _branch_ref(p, x, num_pools):
  """Generic_UNet.forward: encoder with strided first convs, decoder cat((up, skip)), a head per level."""
  skips = []
  for level in range(num_pools + 1):
    x = _stage_ref(x, p[f"enc_{level}"], 1 if level == 0 else 2)
    skips.append(x)
  x = skips.pop()
  logits = [None] * num_pools
  for level in reversed(range(num_pools)):
    x = _stage_ref(jnp.concatenate([_up_ref(x, p[f"up_{level}"]), skips[level]], -1), p[f"dec_{level}"])
    logits[level] = _conv_ref(x, p[f"head_{level}"])
  return x, logits


def _maml_ref(params, x, num_pools):
  """Generic_MAML.forward."""
  feats, branches = [], []
  for m in range(x.shape[-1]):
    f, logits = _branch_ref(params[f"branch_{m}"], x[..., m:m + 1], num_pools)
    feats.append(f)
    branches.append(logits)
  fused = _conv_ref(jnp.concatenate(feats, -1), params["fusion"])
  out = 0.0
  for m, f in enumerate(feats):
    p = params[f"ma_{m}"]
    h = _lrelu(_instance_norm_ref(_conv_ref(jnp.concatenate([f, fused], -1), p["conv_0"]), p["norm"]))
    out = out + jax.nn.sigmoid(_conv_ref(h, p["conv_1"])) * f
  return _conv_ref(out, params["joint_head"]), branches


@pytest.mark.parametrize("shape, num_pools, ma_kernel", [((2, 16, 24, 3), 3, 1), ((1, 8, 8, 4, 2), 2, 3)])
def test_forward_matches_reference(shape, num_pools, ma_kernel):
  model = MAML(num_classes=3, base_features=4, num_pools=num_pools, ma_kernel=ma_kernel)
  x = normal(shape, seed=1)
  variables = numpy_variables(model, x, seed=2)
  out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  joint, branches = _maml_ref(variables["params"], x, num_pools)
  np.testing.assert_allclose(out["joint"], joint, rtol=1e-4, atol=1e-4)
  for got, expected in zip(out["branches"], branches):
    for y, y_ref in zip(got, expected, strict=True):
      np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)


def test_branch_m_reads_only_channel_m():
  model = MAML(num_classes=2, base_features=4, num_pools=2)
  x = normal((2, 16, 16, 3), seed=3)
  variables = numpy_variables(model, x, seed=4)
  apply = jax.jit(functools.partial(model.apply, train=False))
  out = apply(variables, x)
  for j in range(3):
    x_j = x.at[..., j].add(normal((2, 16, 16), seed=10 + j))
    out_j = apply(variables, x_j)
    for m in range(3):
      for y, y_j in zip(out["branches"][m], out_j["branches"][m]):
        if m == j:
          assert not np.allclose(y, y_j, atol=1e-3), (m, j)
        else:
          np.testing.assert_array_equal(y, y_j)  # untouched, bit for bit
    assert not np.allclose(out["joint"], out_j["joint"], atol=1e-3), j  # the joint head reads all


# ----------------------------------------------------------------------------------------------------
# Initialisation.


def _he_std(fan_in):
  return math.sqrt(2 / (1 + 0.01**2)) / math.sqrt(fan_in)


@pytest.fixture(scope="module")
def init_params_2d():
  """Initialised 2D MAMLs (M = 2, F = 16, K = 4): 3 poolings (widths 16 … 128) with the released
  shared init, and 1 pooling with `shared_init="he"` (small programs: XLA:CPU compiles the random
  initialisers of every parameter shape)."""
  params = {}
  for shared_init, num_pools, size in (("torch", 3, 16), ("he", 1, 4)):
    model = MAML(num_classes=4, base_features=16, num_pools=num_pools, shared_init=shared_init)
    params[shared_init] = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), jnp.zeros((1, size, size, 2)))["params"]
  return params


def _assert_he(path, w, fan_in):
  """Sample std and mean of N(0, he_std(fan_in)) within 5 standard errors."""
  w = np.asarray(w, np.float64).ravel()
  std = _he_std(fan_in)
  n = w.size
  assert abs(w.std() / std - 1) < 5 / math.sqrt(2 * (n - 1)), (path, w.std(), std)
  assert abs(w.mean()) < 5 * std / math.sqrt(n), path


def test_branch_init_is_he_normal_with_zero_biases(init_params_2d):
  params = init_params_2d["torch"]
  kernels = biases = 0
  for m in range(2):
    for path, leaf in jax.tree_util.tree_leaves_with_path(params[f"branch_{m}"]):
      names = [k.key for k in path]
      if names[-1] == "kernel" and names[0].startswith("up_"):
        # PyTorch's transposed-conv fan_in: C_out·2^d (weight layout (C_in, C_out, *k)).
        _assert_he(names, leaf, leaf.shape[-1] * 4)
        kernels += 1
      elif names[-1] == "kernel":
        _assert_he(names, leaf, math.prod(leaf.shape[:-1]))
        kernels += 1
      elif names[-2] == "norm" and names[-1] == "scale":
        np.testing.assert_array_equal(leaf, 1.0)
      else:
        assert names[-1] == "bias", names
        np.testing.assert_array_equal(leaf, 0.0)
        biases += 1
  # Per branch: 7 stages × 2 convs + 3 transposed convs + 3 heads; biases of 14 convs and 14 norms.
  assert kernels == 2 * 20 and biases == 2 * 28
  # The largest layers pin the gain and the fan: 3·3·128·128 (147,456 samples) and the 128 → 64
  # transposed conv (32,768), whose std with fan C_in·4 instead of C_out·4 would be 29 % smaller.
  assert params["branch_0"]["enc_3"]["cnl_1"]["conv"]["kernel"].shape == (3, 3, 128, 128)
  up = np.asarray(params["branch_0"]["up_2"]["kernel"])
  assert up.shape == (2, 2, 128, 64)
  assert abs(up.std() / _he_std(64 * 4) - 1) < 0.02 and abs(up.std() / _he_std(128 * 4) - 1) > 0.2


def test_shared_init_torch_default_or_he(init_params_2d):
  torch_params, he_params = init_params_2d["torch"], init_params_2d["he"]
  layers_ = (("fusion",), ("ma_0", "conv_0"), ("ma_1", "conv_1"), ("joint_head",))
  for names in layers_:
    p = functools.reduce(lambda tree, key: tree[key], names, torch_params)
    w = np.asarray(p["kernel"])
    bound = 1 / math.sqrt(math.prod(w.shape[:-1]))
    # PyTorch default: U(±1/√fan_in), std bound/√3, biases U(±1/√fan_in) (not zero).
    assert np.abs(w).max() <= bound and abs(w.std() / (bound / math.sqrt(3)) - 1) < 5 / math.sqrt(2 * w.size)
    if "bias" in p:
      b = np.asarray(p["bias"])
      assert np.abs(b).max() <= bound and np.any(b != 0)
    q = functools.reduce(lambda tree, key: tree[key], names, he_params)
    _assert_he(names, q["kernel"], math.prod(w.shape[:-1]))
    if "bias" in q:
      np.testing.assert_array_equal(q["bias"], 0.0)
  np.testing.assert_array_equal(torch_params["ma_0"]["norm"]["scale"], 1.0)
  np.testing.assert_array_equal(torch_params["ma_0"]["norm"]["bias"], 0.0)
