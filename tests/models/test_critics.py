"""Tests of jaxseg.models.critics: Duo-SegNet's pixel critic and SASSNet's discriminator against
NumPy transcriptions of the references."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import (PixelCritic, SDFDiscriminator, count_params, duo_critic, get_model,
                           sassnet_discriminator)


def _variables(model, x, seed: int = 0) -> dict:
  """Random variables (shapes from eval_shape, values from NumPy), BN statistics non-trivial."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    lo, hi = (0.5, 1.5) if path[-1].key in ("scale", "var") else (-0.5, 0.5)
    return jnp.asarray(rng.uniform(lo, hi, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(value, shapes)


def _leaky(x, slope=0.2):
  return np.where(x >= 0, x, slope * x)


def _reference(variables, p, bn_mean, bn_var):
  """PixelDiscriminator.forward with the given BN statistics, in float64."""
  params = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in variables["params"].items()}
  x = np.asarray(p, np.float64)
  x = _leaky(x @ params["conv_0"]["kernel"][0, 0] + params["conv_0"]["bias"])
  x = x @ params["conv_1"]["kernel"][0, 0]
  x = (x - bn_mean) / np.sqrt(bn_var + 1e-5) * params["norm_1"]["scale"] + params["norm_1"]["bias"]
  return _leaky(x) @ params["conv_2"]["kernel"][0, 0]


def test_parameter_count_and_layout():
  assert count_params(duo_critic(), (1, 256, 256, 1)) == 8_704
  assert count_params(get_model("duo_critic"), (1, 8, 8, 1)) == 8_704
  variables = jax.eval_shape(functools.partial(duo_critic().init, train=False), jax.random.key(0),
                             jnp.zeros((1, 8, 8, 1)))
  params = jax.tree.map(lambda a: a.shape, variables["params"])
  assert params == {
      "conv_0": {"kernel": (1, 1, 1, 64), "bias": (64,)},
      "conv_1": {"kernel": (1, 1, 64, 128)},
      "norm_1": {"scale": (128,), "bias": (128,)},
      "conv_2": {"kernel": (1, 1, 128, 1)},
  }
  # With InstanceNorm the reference gives the later convs a bias (and the norm has no parameters).
  assert count_params(PixelCritic(norm="instance"), (1, 8, 8, 1)) == 128 + (64 * 128 + 128) + (128 + 1)


def test_matches_reference_in_eval_and_train_mode():
  model = duo_critic()
  p = jnp.asarray(np.random.default_rng(1).uniform(size=(3, 8, 6, 1)), jnp.float32)
  variables = _variables(model, p)
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))

  stats = variables["batch_stats"]["norm_1"]
  y_eval = apply(variables, p, train=False)
  assert y_eval.shape == (3, 8, 6, 1)
  np.testing.assert_allclose(y_eval, _reference(variables, p, np.asarray(stats["mean"]),
                                                np.asarray(stats["var"])), rtol=1e-4, atol=1e-5)

  y_train, updates = apply(variables, p, train=True, mutable=("batch_stats",))
  params = variables["params"]
  h = np.asarray(p, np.float64) @ np.asarray(params["conv_0"]["kernel"][0, 0], np.float64)
  h = _leaky(h + np.asarray(params["conv_0"]["bias"], np.float64)) @ np.asarray(
      params["conv_1"]["kernel"][0, 0], np.float64)
  mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
  np.testing.assert_allclose(y_train, _reference(variables, p, mean, var), rtol=1e-4, atol=1e-5)
  new = updates["batch_stats"]["norm_1"]
  np.testing.assert_allclose(new["mean"], 0.9 * np.asarray(stats["mean"]) + 0.1 * mean, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * np.asarray(stats["var"]) + 0.1 * var, rtol=1e-5, atol=1e-6)


def test_rank_generic_and_gradient():
  model = duo_critic(ndf=8)
  p = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 4, 4, 4, 1)), jnp.float32)
  variables = _variables(model, p)
  grads = jax.jit(jax.grad(lambda q: model.apply(variables, q, train=False).sum()))(p)
  assert grads.shape == p.shape and bool(jnp.all(jnp.isfinite(grads)))
  # Real init (cheap here: three 1×1 convs): PyTorch default bounds.
  params = model.init(jax.random.key(0), p, train=False)["params"]
  assert float(jnp.abs(params["conv_1"]["kernel"]).max()) <= 1 / np.sqrt(8)


@pytest.mark.parametrize("norm", ["none", "group", "instance_affine"])
def test_norm_options(norm):
  model = PixelCritic(ndf=16, norm=norm)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 4, 4, 1)))
  assert ("norm_1" in shapes["params"]) == (norm != "none")
  assert "batch_stats" not in shapes


# ------------------------------------------------------------------------------------------------
# SASSNet's discriminator (docs/networks.md).


def _conv_k4_s2_p1(x, kernel, bias):
  """PyTorch Conv{2,3}d(kernel_size=4, stride=2, padding=1) in NumPy float64, channels-last."""
  d = x.ndim - 2
  padded = np.pad(x, [(0, 0)] + [(1, 1)] * d + [(0, 0)])
  out_shape = [s // 2 for s in x.shape[1:-1]]  # ⌊(S + 2 − 4) / 2⌋ + 1
  out = np.zeros((x.shape[0], *out_shape, kernel.shape[-1]))
  for offset in itertools.product(range(4), repeat=d):
    window = tuple(slice(o, o + 2 * n - 1, 2) for o, n in zip(offset, out_shape))
    out += padded[(slice(None), *window)] @ kernel[offset]
  return out + bias


def _sdf_discriminator_reference(params, sdm, image, keep=(None, None, None), rate=0.5):
  """FC3DDiscriminator.forward in float64; `keep` holds per-(sample, channel) dropout masks."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  conv = lambda x, name: _conv_k4_s2_p1(x, p[name]["kernel"], p[name]["bias"])
  d = sdm.ndim - 2

  def dropout(x, mask):
    if mask is None:
      return x
    return x * mask.reshape(mask.shape[0], *(1,) * d, mask.shape[1]) / (1 - rate)

  x = conv(np.asarray(sdm, np.float64), "conv0") + conv(np.asarray(image, np.float64), "conv1")
  x = dropout(_leaky(x), keep[0])
  x = dropout(_leaky(conv(x, "conv2")), keep[1])
  x = dropout(_leaky(conv(x, "conv3")), keep[2])
  x = _leaky(conv(x, "conv4")).mean(axis=tuple(range(1, d + 1)))
  return x @ p["classifier"]["kernel"] + p["classifier"]["bias"]


def _sdf_inputs(shape, channels: int = 1, seed: int = 0):
  rng = np.random.default_rng(seed)
  sdm = jnp.asarray(np.tanh(rng.normal(size=(*shape, 1))), jnp.float32)
  image = jnp.asarray(rng.normal(size=(*shape, channels)), jnp.float32)
  return sdm, image


def _sdf_shapes(model, sdm_shape, image_shape):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jnp.zeros(sdm_shape), jnp.zeros(image_shape))


def _sdf_variables(model, sdm, image, seed: int = 0) -> dict:
  """Random variables without compiling init: kernels U(±1/√fan_in), biases U(±0.1)."""
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    bound = 1 / math.sqrt(math.prod(leaf.shape[:-1])) if path[-1].key == "kernel" else 0.1
    return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(value, _sdf_shapes(model, sdm.shape, image.shape))


def test_sdf_discriminator_parameter_count_and_layout():
  n_params = lambda v: sum(math.prod(a.shape) for a in jax.tree.leaves(v["params"]))
  full = (1, 112, 112, 80)
  variables = _sdf_shapes(sassnet_discriminator(), (*full, 1), (*full, 1))
  assert n_params(variables) == 11_020_290  # docs/networks.md
  assert set(variables) == {"params"}  # no normalisation, no BN statistics
  assert jax.tree.map(lambda a: a.shape, variables["params"]) == {
      "conv0": {"kernel": (4, 4, 4, 1, 64), "bias": (64,)},
      "conv1": {"kernel": (4, 4, 4, 1, 64), "bias": (64,)},
      "conv2": {"kernel": (4, 4, 4, 64, 128), "bias": (128,)},
      "conv3": {"kernel": (4, 4, 4, 128, 256), "bias": (256,)},
      "conv4": {"kernel": (4, 4, 4, 256, 512), "bias": (512,)},
      "classifier": {"kernel": (512, 2), "bias": (2,)},
  }
  # With the segmenter: 20,469,156 (the 20.46 M that DTC's comparison tables give SASSNet).
  assert n_params(variables) + count_params(get_model("vnet_sdf"), (*full, 1)) == 20_469_156
  # The registry builds the same module; the image stem follows the image channels.
  two_channels = _sdf_shapes(get_model("sassnet_discriminator"), (1, 16, 16, 16, 1),
                             (1, 16, 16, 16, 2))
  assert n_params(two_channels) == 11_020_290 + 4**3 * 64
  logits = jax.eval_shape(functools.partial(SDFDiscriminator().apply, train=False), variables,
                          jnp.zeros((3, *full[1:], 1)), jnp.zeros((3, *full[1:], 1)))
  assert logits.shape == (3, 2)


@pytest.mark.parametrize("shape", [(3, 32, 32, 16), (2, 32, 16)], ids=["3d", "2d"])
def test_sdf_discriminator_eval_mode_matches_reference(shape):
  model = sassnet_discriminator(ndf=4)
  sdm, image = _sdf_inputs(shape)
  variables = _sdf_variables(model, sdm, image)
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, sdm, image)
  assert logits.shape == (shape[0], 2)
  np.testing.assert_allclose(logits, _sdf_discriminator_reference(variables["params"], sdm, image),
                             rtol=1e-4, atol=1e-5)


def test_sdf_discriminator_train_mode_drops_whole_channels():
  model = sassnet_discriminator(ndf=4)
  sdm, image = _sdf_inputs((3, 16, 16, 16), seed=1)
  variables = _sdf_variables(model, sdm, image, seed=1)

  @jax.jit
  def train_apply(key):
    return model.apply(variables, sdm, image, train=True, rngs={"dropout": key},
                       capture_intermediates=True, mutable=["intermediates"])

  logits, state = train_apply(jax.random.key(0))
  captured = state["intermediates"]
  # Each Dropout3d zeroes whole (sample, channel) maps, about half of them, and doubles the rest.
  keep = []
  for i in range(3):
    out = np.asarray(captured[f"Dropout_{i}"]["__call__"][0])
    kept = np.any(out != 0, axis=(1, 2, 3))
    assert 0 < kept.mean() < 1, kept
    keep.append(kept.astype(np.float64))
  np.testing.assert_allclose(
      logits, _sdf_discriminator_reference(variables["params"], sdm, image, tuple(keep)),
      rtol=1e-4, atol=1e-5)
  # The first mask also matches the stem output elementwise: kept maps are exactly 2x the input.
  stem = np.asarray(captured["conv0"]["__call__"][0] + captured["conv1"]["__call__"][0])
  np.testing.assert_allclose(np.asarray(captured["Dropout_0"]["__call__"][0]),
                             _leaky(stem) * 2 * keep[0][:, None, None, None, :], rtol=1e-5,
                             atol=1e-6)
  # Dropout is random in train mode (a new key, new masks), off in eval mode (no key needed).
  other, _ = train_apply(jax.random.key(1))
  assert not np.allclose(logits, other)
  eval_logits = model.apply(variables, sdm, image, train=False)
  np.testing.assert_allclose(eval_logits,
                             _sdf_discriminator_reference(variables["params"], sdm, image),
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="same N and spatial"):
    model.apply(variables, sdm, image[:, :8], train=False)


def test_sdf_discriminator_init_is_pytorch_default():
  model = sassnet_discriminator(ndf=4)
  sdm, image = _sdf_inputs((1, 16, 16, 16))
  params = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), sdm, image)[
      "params"]
  for name, fan_in in (("conv0", 64), ("conv2", 4 * 64), ("conv4", 16 * 64), ("classifier", 32)):
    for leaf in params[name].values():
      bound = 1 / math.sqrt(fan_in)
      assert float(jnp.abs(leaf).max()) <= bound
      assert float(jnp.abs(leaf).max()) > 0.5 * bound  # uniform over the whole range
