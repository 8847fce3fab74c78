"""Helpers shared by the model tests: variables without compiling init, inputs, keys."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np



def numpy_variables(model, x, seed: int = 0, takes_train: bool = True) -> dict:
  """Variables of `model` for input `x`, without compiling its init (`takes_train`: whether its
  __call__ has the `train` argument; a layer's may not).

  Kernels U(±1/√fan_in); biases, BN offsets and running means U(±0.1); scales and running variances
  U(0.5, 1.5).
  """
  init = functools.partial(model.init, train=False) if takes_train else model.init
  shapes = jax.eval_shape(init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = path[-1].key
    if name == "kernel":
      bound = 1 / math.sqrt(math.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)
    if name in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.uniform(-0.1, 0.1, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(value, shapes)


def normal(shape, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def rbg_key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl="rbg")
