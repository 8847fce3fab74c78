"""Tests of jaxseg.models.critics: Duo-SegNet's pixel critic against a NumPy transcription."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import PixelCritic, count_params, duo_critic, get_model


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
