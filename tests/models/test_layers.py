"""Tests of jaxseg.models.layers: transposed conv as dense + depth-to-space, interpolation, norms, init.

Random inputs come from NumPy and PRNG keys are "rbg" keys: XLA's CPU compilation of threefry for every
new shape would dominate the run time.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import layers

TOL = dict(rtol=1e-5, atol=1e-5)


def rbg_key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl="rbg")


def normal(shape, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _random_params(params, seed: int = 0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)


# ----------------------------------------------------------------------------------------------------
# ConvTranspose2x.


@pytest.mark.parametrize("shape", [(2, 5, 6, 3), (2, 3, 4, 5, 3)], ids=["2d", "3d"])
def test_conv_transpose_2x_equals_lax_and_flax(shape):
  x = normal(shape, 1)
  d = x.ndim - 2
  module = layers.ConvTranspose2x(4)
  variables = _random_params(module.init(rbg_key(0), x))
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  assert kernel.shape == (2,) * d + (3, 4)
  y = module.apply(variables, x)
  assert y.shape == (shape[0],) + tuple(2 * s for s in shape[1:-1]) + (4,)

  y_lax = jax.lax.conv_transpose(x, kernel, (2,) * d, "VALID",
                                 dimension_numbers=layers.conv_dimension_numbers(x.ndim)) + bias
  np.testing.assert_allclose(y, y_lax, **TOL)
  y_flax = nn.ConvTranspose(4, (2,) * d, strides=(2,) * d, padding="VALID").apply(variables, x)
  np.testing.assert_allclose(y, y_flax, **TOL)

  # Same gradients (w.r.t. input and kernel) as the input-dilated form.
  cotangent = normal(y.shape, 2)
  f_dense = lambda x, k: jnp.vdot(module.apply({"params": {"kernel": k, "bias": bias}}, x), cotangent)
  f_lax = lambda x, k: jnp.vdot(
      jax.lax.conv_transpose(x, k, (2,) * d, "VALID",
                             dimension_numbers=layers.conv_dimension_numbers(x.ndim)) + bias,
      cotangent)
  for g_dense, g_lax in zip(jax.grad(f_dense, (0, 1))(x, kernel), jax.grad(f_lax, (0, 1))(x, kernel)):
    np.testing.assert_allclose(g_dense, g_lax, rtol=1e-4, atol=1e-4)


def test_conv_transpose_2x_dense_view_and_torch_porting():
  """The layer is depth_to_space(x @ W); a PyTorch weight (C_in, C_out, 2, 2) ports by transpose + flip."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 3, 2, 5)).astype(np.float32)
  w_torch = rng.normal(size=(5, 4, 2, 2)).astype(np.float32)
  b = rng.normal(size=(4,)).astype(np.float32)
  # PyTorch's definition: out[2i + a, 2j + b] = Σ_c x[i, j, c] w[c, :, a, b] + bias.
  expected = np.zeros((1, 6, 4, 4), np.float32)
  for i in range(3):
    for j in range(2):
      for a in range(2):
        for bb in range(2):
          expected[0, 2 * i + a, 2 * j + bb] = x[0, i, j] @ w_torch[:, :, a, bb] + b
  kernel = np.flip(w_torch.transpose(2, 3, 0, 1), axis=(0, 1))
  y = layers.ConvTranspose2x(4).apply({"params": {"kernel": kernel, "bias": b}}, x)
  np.testing.assert_allclose(y, expected, **TOL)
  # Dense view: W[c, (a, b, o)] = w_torch[c, o, a, b].
  w_dense = w_torch.transpose(0, 2, 3, 1).reshape(5, 16)
  np.testing.assert_allclose(layers.depth_to_space(x @ w_dense) + b, expected, **TOL)


def test_depth_to_space_small_case():
  x = jnp.arange(8.0).reshape(1, 1, 2, 4)  # (N, H, W, 2·2·1): per pixel, channels (a, b).
  y = layers.depth_to_space(x)
  np.testing.assert_array_equal(y[0, ..., 0], [[0, 1, 4, 5], [2, 3, 6, 7]])
  with pytest.raises(ValueError):
    layers.depth_to_space(jnp.zeros((1, 2, 2, 3)))


# ----------------------------------------------------------------------------------------------------
# Conv, init.


@pytest.mark.parametrize("kernel_size,strides,padding", [(3, 1, 1), (2, 2, 0), (1, 1, 0)])
def test_conv_equals_flax_conv_with_explicit_padding(kernel_size, strides, padding):
  x = normal((2, 8, 6, 4, 3), 0)
  module = layers.Conv(5, kernel_size, strides=strides, padding=padding)
  variables = _random_params(module.init(rbg_key(1), x))
  ref = nn.Conv(5, (kernel_size,) * 3, strides=(strides,) * 3, padding=((padding, padding),) * 3)
  np.testing.assert_allclose(module.apply(variables, x), ref.apply(variables, x), **TOL)


def test_torch_default_init_bounds():
  # Conv: fan_in = C_in·k^d; ConvTranspose: fan_in = C_out·2^d (PyTorch's weight layout).
  x = jnp.zeros((1, 4, 4, 4, 32))
  conv = layers.Conv(64, 3).init(rbg_key(0), x)["params"]
  bound = 1 / math.sqrt(32 * 27)
  for leaf in (conv["kernel"], conv["bias"]):
    assert float(jnp.abs(leaf).max()) <= bound
  assert float(jnp.abs(conv["kernel"]).max()) > 0.99 * bound
  assert float(jnp.std(conv["kernel"])) == pytest.approx(bound / math.sqrt(3), rel=0.02)
  # = variance_scaling(1/3, "fan_in", "uniform").
  ref = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")(rbg_key(0), (3, 3, 3, 32, 64))
  assert float(jnp.abs(ref).max()) <= bound

  up = layers.ConvTranspose2x(16).init(rbg_key(1), x)["params"]
  bound_t = 1 / math.sqrt(16 * 8)
  assert float(jnp.abs(up["kernel"]).max()) <= bound_t
  assert float(jnp.abs(up["kernel"]).max()) > 0.99 * bound_t
  assert float(jnp.abs(up["bias"]).max()) <= bound_t

  kaiming = layers.Conv(64, 3, weight_init="kaiming_normal").init(rbg_key(2), x)["params"]
  assert float(jnp.std(kaiming["kernel"])) == pytest.approx(math.sqrt(2 / (32 * 27)), rel=0.02)
  with pytest.raises(ValueError):
    layers.Conv(4, 3, weight_init="bogus").init(rbg_key(0), x)


# ----------------------------------------------------------------------------------------------------
# Interpolation.


def _torch_linear_1d(v: np.ndarray, n_out: int, align_corners: bool) -> np.ndarray:
  """`torch.nn.functional.interpolate(mode="linear")` on a 1-d signal, transcribed from ATen."""
  n_in = len(v)
  out = np.empty(n_out)
  for i in range(n_out):
    if align_corners:
      src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
      src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = int(src)
    i1 = i0 + (1 if i0 < n_in - 1 else 0)
    lam = src - i0
    out[i] = (1 - lam) * v[i0] + lam * v[i1]
  return out


def test_align_corners_hand_computed():
  x = jnp.array([0.0, 1.0]).reshape(1, 2, 1)
  np.testing.assert_allclose(layers.upsample_linear(x, 2, align_corners=True)[0, :, 0],
                             [0, 1 / 3, 2 / 3, 1], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(layers.upsample_linear(x, 2, align_corners=False)[0, :, 0],
                             [0, 0.25, 0.75, 1], rtol=1e-6, atol=1e-7)
  x = jnp.array([0.0, 1.0, 4.0]).reshape(1, 3, 1)
  np.testing.assert_allclose(layers.resize_linear(x, (5,), align_corners=True)[0, :, 0],
                             [0, 0.5, 1, 2.5, 4], rtol=1e-6, atol=1e-7)
  # 2D: separable, i.e. the outer product of the 1-d interpolations.
  img = jnp.array([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 2, 2, 1)
  t = np.array([0, 1 / 3, 2 / 3, 1])
  np.testing.assert_allclose(layers.upsample_linear(img, 2, align_corners=True)[0, ..., 0],
                             2 * t[:, None] + t[None, :], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("align_corners", [True, False])
def test_interpolation_matrix_equals_torch_formula(align_corners):
  rng = np.random.default_rng(0)
  for n_in, n_out in [(1, 4), (2, 4), (3, 7), (5, 10), (8, 3), (7, 1), (4, 4)]:
    v = rng.normal(size=n_in)
    m = layers.interpolation_matrix(n_in, n_out, align_corners)
    np.testing.assert_allclose(m.sum(1), 1.0)
    np.testing.assert_allclose(m @ v, _torch_linear_1d(v, n_out, align_corners), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 6, 3), (1, 3, 4, 5, 2)], ids=["2d", "3d"])
def test_linear_half_pixel_equals_jax_image_resize(shape):
  x = normal(shape, 0)
  out_shape = (shape[0],) + tuple(2 * s for s in shape[1:-1]) + (shape[-1],)
  np.testing.assert_allclose(layers.upsample_linear(x, 2, align_corners=False),
                             jax.image.resize(x, out_shape, "linear"), rtol=1e-5, atol=1e-6)
  assert layers.upsample_nearest(x, 2).shape == out_shape
  every_other = (slice(None),) + (slice(None, None, 2),) * (x.ndim - 2)
  np.testing.assert_array_equal(layers.upsample_nearest(x, 2)[every_other], x)


# ----------------------------------------------------------------------------------------------------
# Normalisation, dropout, blocks.


class _Norm(nn.Module):
  kind: str

  @nn.compact
  def __call__(self, x, train: bool):
    return layers.norm_layer(self.kind, train=train, num_groups=2)(x)


def test_batch_norm_momentum_and_eps():
  x = normal((4, 3, 5, 2), 0) * 3.0 + 1.0
  module = _Norm("batch")
  variables = module.init(rbg_key(1), x, train=False)
  y, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
  xs = np.asarray(x, np.float64)
  mean, var = xs.mean((0, 1, 2)), xs.var((0, 1, 2))
  np.testing.assert_allclose(y, (xs - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
  stats = updates["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-4, atol=1e-5)  # PyTorch momentum 0.1.
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-5)
  # Eval uses the running averages.
  y_eval = module.apply({**variables, **updates}, x, train=False)
  np.testing.assert_allclose(y_eval, (xs - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize("kind,num_params", [("instance", 0), ("instance_affine", 4), ("group", 4),
                                             ("none", 0)])
def test_instance_group_norms(kind, num_params):
  x = normal((2, 3, 4, 5, 2), 0) * 2.0 + 3.0
  module = _Norm(kind)
  variables = module.init(rbg_key(1), x, train=True)
  assert sum(a.size for a in jax.tree.leaves(variables.get("params", {}))) == num_params
  assert "batch_stats" not in variables
  y = module.apply(variables, x, train=True)
  xs = np.asarray(x, np.float64)
  if kind == "none":
    expected = xs
  else:  # Per sample and channel over space (with 2 channels, "group" has 2 groups of 1 channel).
    expected = (xs - xs.mean((1, 2, 3), keepdims=True)) / np.sqrt(xs.var((1, 2, 3), keepdims=True) + 1e-5)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError):
    _Norm("bogus").init(rbg_key(1), x, train=True)


class _ChannelDropout(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    return layers.channel_dropout(0.5, not train, x)


def test_channel_dropout_drops_whole_channels():
  x = jnp.ones((3, 4, 4, 4, 16))
  y = _ChannelDropout().apply({}, x, train=True, rngs={"dropout": rbg_key(0)})
  per_channel = np.asarray(y).reshape(3, -1, 16)
  assert np.all(per_channel.min(1) == per_channel.max(1))  # constant over space per (sample, channel)
  assert set(np.unique(per_channel)) == {0.0, 2.0}
  np.testing.assert_array_equal(_ChannelDropout().apply({}, x, train=False), x)


def test_conv_block_dropout_train_vs_eval():
  block = layers.ConvBlock(4, norm="none", activation="leaky_relu", dropout_rate=0.5)
  x = normal((1, 8, 8, 2), 0)
  variables = block.init(rbg_key(1), x, train=False)
  y_eval = block.apply(variables, x, train=False)
  np.testing.assert_array_equal(y_eval, block.apply(variables, x, train=True, dropout=False))
  y1 = block.apply(variables, x, train=True, rngs={"dropout": rbg_key(2)})
  y2 = block.apply(variables, x, train=True, rngs={"dropout": rbg_key(3)})
  assert not np.allclose(y1, y2)


@pytest.mark.parametrize("kernel_size, padding", [(3, ((1, 1),) * 3), (3, ((0, 0),) * 3),
                                                  (2, ((1, 0), (0, 1), (1, 0))), (1, ((0, 0),) * 3)])
def test_conv3d_as_stacked2d_equals_the_native_convolution(kernel_size, padding):
  rng = np.random.default_rng(kernel_size)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 5, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size,) * 3 + (3, 4)), jnp.float32)

  def native(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), padding,
                                        dimension_numbers=layers.conv_dimension_numbers(5))

  def stacked(x, kernel):
    return layers.conv3d_as_stacked2d(x, kernel, padding)

  np.testing.assert_allclose(stacked(x, kernel), native(x, kernel), rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1))(x, kernel)
           for f in (native, stacked)]
  for want, got in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, kernel_size", [((2, 7, 6, 5, 3), 2), ((1, 6, 9, 4, 3), 3),
                                                ((2, 5, 4, 3, 3), 1), ((2, 9, 7, 3), 2)],
                         ids=["3d-k2-odd", "3d-k3", "3d-k1", "2d-k2-odd"])
def test_conv_as_patch_dot_equals_the_strided_convolution(shape, kernel_size):
  # Stride = kernel, no padding: odd sizes drop their trailing voxels as the convolution does.
  rng = np.random.default_rng(kernel_size)
  d = len(shape) - 2
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size,) * d + (shape[-1], 4)), jnp.float32)

  def native(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (kernel_size,) * d, ((0, 0),) * d,
                                        dimension_numbers=layers.conv_dimension_numbers(d + 2))

  want = native(x, kernel)
  got = layers.conv_as_patch_dot(x, kernel)
  assert got.shape == want.shape == (shape[0], *(s // kernel_size for s in shape[1:-1]), 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1))(x, kernel)
           for f in (native, layers.conv_as_patch_dot)]
  for want, got in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl, kernel_size, strides, padding",
                         [("stacked2d", 3, 1, 1), ("patches", 2, 2, 0)])
def test_conv_impls_agree_inside_a_layer(impl, kernel_size, strides, padding):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 6, 4, 2)), jnp.float32)
  shape = dict(features=3, kernel_size=kernel_size, strides=strides, padding=padding)
  native = layers.Conv(**shape, impl="native")
  variables = native.init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(layers.Conv(**shape, impl=impl).apply(variables, x),
                             native.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_conv_impl_patches_where_it_does_not_apply():
  x = jnp.zeros((1, 6, 6, 4, 2), jnp.float32)
  with pytest.raises(ValueError, match="kernel_size == strides and no padding"):
    layers.Conv(features=3, kernel_size=3, padding=1, impl="patches").init(jax.random.PRNGKey(0), x)
