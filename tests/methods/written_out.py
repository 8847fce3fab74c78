"""Helpers of the step-recomputation tests (tests/methods/test_*.py): a TrainState moved to a late
step, the PyTorch optimiser updates written out, and tree comparisons.

The recomputation tests run one method `train_step` from a state at step 3000 (learning-rate
schedule, ramps and EMA decay all away from their start values, optimiser buffers non-zero) and
compare it with the same step computed in the test from the written-out losses and these updates.
They run in float64 (`jax.enable_x64`): the method and the test then agree to ~1e-12, so that
the parameter UPDATES (not only the parameters, which a step moves by ~1e-4 relative) can be
compared tightly and a wrong loss weight, key or network shows. The optimiser state holds its
hyperparameters (momentum, betas, alpha, eps) in float32, and optax's step decay computes the rate
in float32 (a constant rate is used as given), so the updates below use those values rounded to
float32 (`as_stored`): 0.9 is 0.899999976 there, 1e-3 is 1.00000005e-3, 1 − 0.99 is off by 1e-6.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Steps of the late-step tests: past the first x0.1 decay of the LA schedule (every 2500 steps).
LATE_STEP = 3000


def to_float64(tree: Any) -> Any:
  """Every floating leaf as float64 (keys and integers unchanged); call under enable_x64."""
  def cast(a):
    if isinstance(a, (jax.Array, np.ndarray)) and jnp.issubdtype(a.dtype, jnp.floating):
      return jnp.asarray(a, jnp.float64)
    return a
  return jax.tree.map(cast, tree)


def _field(path) -> str:
  """The last attribute name on a pytree path (the optimiser state's field: count, trace, mu, nu)."""
  names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
  return names[-1] if names else ""


def at_step(state, step: int, seed: int, scale: float = 1e-2):
  """`state` (a base.TrainState) as if `step` updates had been made, with non-zero buffers.

  Sets TrainState.step and every `count` of the optimiser state (the schedule's and Adam's bias
  correction), and fills the momentum / moment buffers with deterministic values: trace (SGD
  momentum) and mu (Adam's first moment) ~ N(0, scale²); nu (Adam's and RMSprop's second moments)
  = (N(0, scale²))² + scale² > 0.

  Returns:
    (the new state, {field: buffer tree} of the buffers set, e.g. {"trace": ...}).
  """
  rng = np.random.default_rng(seed)
  buffers: dict[str, list] = {}

  def fill(path, leaf):
    field = _field(path)
    if field == "count":
      return jnp.asarray(step, leaf.dtype)
    if field in ("trace", "mu", "nu"):
      value = scale * rng.standard_normal(leaf.shape)
      if field == "nu":
        value = value * value + scale * scale
      value = jnp.asarray(value, leaf.dtype)
      buffers.setdefault(field, []).append(value)
      return value
    return leaf

  opt_state = jax.tree_util.tree_map_with_path(fill, state.opt_state)
  params_def = jax.tree.structure(state.params)
  trees = {k: jax.tree.unflatten(params_def, v) for k, v in buffers.items()}
  return state.replace(step=jnp.asarray(step, jnp.int32), opt_state=opt_state), trees


def as_stored(value: float) -> float:
  """A hyperparameter as the optimiser state holds it: rounded to float32."""
  return float(np.float32(value))


def step_learning_rate(lr: float, t: int, decay_every: int = 0, factor: float = 0.1) -> float:
  """torch StepLR: lr·factor^⌊t / decay_every⌋ (constant when decay_every = 0), as the optimiser
  computes it: in float32 when it decays (optax.exponential_decay), as given when constant."""
  return as_stored(lr * factor ** (t // decay_every)) if decay_every else lr


def sgd(params, grads, trace, lr: float, momentum: float, weight_decay: float):
  """torch.optim.SGD: d = g + wd·p; buf = m·buf + d; p -= lr·buf. Returns (params, buf)."""
  momentum = as_stored(momentum)
  buf = jax.tree.map(lambda p, g, b: momentum * b + (g + weight_decay * p), params, grads, trace)
  return jax.tree.map(lambda p, b: p - lr * b, params, buf), buf


def adam(params, grads, mu, nu, count: int, lr: float, beta1: float, beta2: float, eps: float,
         weight_decay: float = 0.0):
  """torch.optim.Adam (coupled decay): g += wd·p; m = β₁m + (1−β₁)g; v = β₂v + (1−β₂)g²;
  p -= lr·m̂ / (√v̂ + eps), m̂ = m / (1 − β₁^k), v̂ = v / (1 − β₂^k), k = count + 1 (this update)."""
  k = count + 1
  beta1, beta2, eps = as_stored(beta1), as_stored(beta2), as_stored(eps)
  g = jax.tree.map(lambda p, g: g + weight_decay * p, params, grads)
  mu = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, mu, g)
  nu = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, nu, g)
  new = jax.tree.map(
      lambda p, m, v: p - lr * (m / (1 - beta1 ** k)) / (jnp.sqrt(v / (1 - beta2 ** k)) + eps),
      params, mu, nu)
  return new, mu, nu


def rmsprop(params, grads, nu, lr: float, alpha: float, eps: float, weight_decay: float = 0.0):
  """torch.optim.RMSprop without momentum: v = αv + (1−α)g²; p -= lr·g / (√v + eps)."""
  alpha, eps = as_stored(alpha), as_stored(eps)
  g = jax.tree.map(lambda p, g: g + weight_decay * p, params, grads)
  nu = jax.tree.map(lambda v, g: alpha * v + (1 - alpha) * g * g, nu, g)
  return jax.tree.map(lambda p, g, v: p - lr * g / (jnp.sqrt(v) + eps), params, g, nu), nu


def _named_leaves(tree):
  return [(jax.tree_util.keystr(path), np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def assert_trees_close(actual, expected, rtol: float, atol: float = 0.0, what: str = ""):
  """Leaf by leaf, same structure; the message names the leaf."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  for (name, a), (_, b) in zip(_named_leaves(actual), _named_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{what}{name}")


def assert_updates_close(before, actual, expected, rtol: float, what: str = ""):
  """actual − before ≈ expected − before, leaf by leaf, to rtol of each leaf's largest update.

  A step moves parameters by ~1e-4 of their size: comparing the parameters themselves would hide
  a wrong gradient; comparing the updates does not.
  """
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  for (name, p0), (_, a), (_, b) in zip(_named_leaves(before), _named_leaves(actual),
                                        _named_leaves(expected)):
    want = b - p0
    scale = np.abs(want).max()
    assert scale > 0, f"{what}{name}: the expected update is zero"
    np.testing.assert_allclose(a - p0, want, rtol=rtol, atol=rtol * scale, err_msg=f"{what}{name}")


def assert_metrics_equal(metrics: dict, expected: dict, rtol: float):
  """The logged metrics: exactly the expected keys, each value to rtol (metrics are float32)."""
  assert set(metrics) == set(expected), sorted(set(metrics) ^ set(expected))
  for key, value in expected.items():
    np.testing.assert_allclose(float(metrics[key]), float(value), rtol=rtol, err_msg=key)


def sdf_method_arrays(patch, seed: int = 0):
  """DTC's and SASSNet's step inputs: 3 labeled (the last all foreground: T(y) = 0 there,
  sdf_full_masks = 1) + 2 unlabeled images (patch + (1,)), float64."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(5, *patch, 1))
  label = (image[:3, ..., 0] > 0.3).astype(np.int32)
  label[2] = 1
  return image[:3], label, image[3:]


def blocked_rampup(step: int, maximum: float, rampup: float, block: int) -> float:
  """maximum · exp(−5 (1 − min(⌊step/block⌋, rampup)/rampup)²), written out."""
  fraction = min(step // block, rampup) / rampup
  return maximum * math.exp(-5 * (1 - fraction) ** 2)
