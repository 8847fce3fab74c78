"""Ramp-up / ramp-down schedules of the LA family (docs/la_protocol.md, training: ramps).

Ports of `utils/ramps.py`, byte-identical in UA-MT, DTC, SASSNet and SSL4MIS, plus the LA consistency-weight
convention w(t) = w_max · sigmoid_rampup(⌊t / 150⌋, 40).

Every function takes either host values (Python / NumPy numbers or arrays) or JAX values (arrays, tracers):

* **Host values** are evaluated in NumPy float64, exactly like the reference, and return a Python `float`
  (0-d input) or a NumPy array. Inputs the reference rejects (its `assert`s, and the `ZeroDivisionError` of
  `cosine_rampdown(0, 0)`) raise `ValueError`.
* **JAX values** are evaluated with `jax.numpy`, so the functions can be called inside `jit` on a traced step.
  Nothing can be raised there: inputs the reference rejects give **NaN** instead (the same positions the
  golden files mark as `*_raises`), so a bad schedule poisons the loss loudly rather than silently.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

# The reference's Gaussian warm-up constant: exp(-5 (1 - t)^2), so the ramp starts at exp(-5) ≈ 0.0067.
_SIGMOID_RAMPUP_SHARPNESS = 5.0

# The LA scripts update the consistency weight once per 150 iterations (`iter_num // 150`).
LA_CONSISTENCY_BLOCK = 150

_HOST_TYPES = (int, float, np.ndarray, np.generic)


def _is_host(*values: Any) -> bool:
  """True when every value is a Python / NumPy number or array (never a JAX array or tracer)."""
  return all(isinstance(v, _HOST_TYPES) for v in values)


def _host_result(value: np.ndarray) -> float | np.ndarray:
  """A 0-d NumPy result as a Python float (as the reference returns); arrays unchanged."""
  return float(value) if np.ndim(value) == 0 else value


def _jax_floats(current: Any, length: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Both arguments as JAX arrays of a common float dtype (the default float for integer steps)."""
  current, length = jnp.asarray(current), jnp.asarray(length)
  dtype = jnp.result_type(current, length, float)
  return current.astype(dtype), length.astype(dtype)


def sigmoid_rampup(current: Any, rampup_length: Any) -> Any:
  """Gaussian warm-up: 1 if L = 0, else exp(-5 (1 - clip(current, 0, L) / L)²).

  Negative `current` is clipped to 0 (the ramp's start value exp(-5)); `current` ≥ L gives 1. The reference
  accepts every input, so nothing raises.

  Args:
    current: step (or block index); any shape, broadcast against `rampup_length`.
    rampup_length: L, in the same unit as `current`.

  Returns:
    Ramp value(s) in [exp(-5), 1], same broadcast shape as the inputs (a float for scalar host inputs).
  """
  if _is_host(current, rampup_length):
    current = np.asarray(current, np.float64)
    length = np.asarray(rampup_length, np.float64)
    safe_length = np.where(length == 0, 1.0, length)
    phase = 1.0 - np.clip(current, 0.0, length) / safe_length
    value = np.where(length == 0, 1.0, np.exp(-_SIGMOID_RAMPUP_SHARPNESS * phase * phase))
    return _host_result(value)
  current, length = _jax_floats(current, rampup_length)
  # Dividing by a safe length keeps the untaken L = 0 branch finite (NaNs there would leak into gradients).
  safe_length = jnp.where(length == 0, 1.0, length)
  phase = 1.0 - jnp.clip(current, 0.0, length) / safe_length
  return jnp.where(length == 0, 1.0, jnp.exp(-_SIGMOID_RAMPUP_SHARPNESS * phase * phase))


def linear_rampup(current: Any, rampup_length: Any) -> Any:
  """Linear warm-up: 1 if current ≥ L, else current / L.

  The reference asserts current ≥ 0 and L ≥ 0: host inputs outside that domain raise `ValueError`, JAX inputs
  give NaN there.

  Args:
    current: step; any shape, broadcast against `rampup_length`.
    rampup_length: L ≥ 0 (L = 0 gives 1 for every valid `current`).

  Returns:
    Ramp value(s) in [0, 1], same broadcast shape as the inputs (a float for scalar host inputs).
  """
  if _is_host(current, rampup_length):
    current = np.asarray(current, np.float64)
    length = np.asarray(rampup_length, np.float64)
    if np.any(current < 0) or np.any(length < 0):
      raise ValueError(
          f"linear_rampup needs current >= 0 and rampup_length >= 0, got {current!r} and {length!r}.")
    safe_length = np.where(length == 0, 1.0, length)
    return _host_result(np.where(current >= length, 1.0, current / safe_length))
  current, length = _jax_floats(current, rampup_length)
  safe_length = jnp.where(length == 0, 1.0, length)
  value = jnp.where(current >= length, 1.0, current / safe_length)
  return jnp.where((current < 0) | (length < 0), jnp.nan, value)


def cosine_rampdown(current: Any, rampdown_length: Any) -> Any:
  """Cosine ramp-down: ½ (cos(π current / L) + 1), from 1 at current = 0 to 0 at current = L.

  The reference asserts 0 ≤ current ≤ L, and `cosine_rampdown(0, 0)` divides 0 by 0: host inputs outside that
  domain raise `ValueError`, JAX inputs give NaN there.

  Args:
    current: step; any shape, broadcast against `rampdown_length`.
    rampdown_length: L > 0.

  Returns:
    Ramp value(s) in [0, 1], same broadcast shape as the inputs (a float for scalar host inputs).
  """
  if _is_host(current, rampdown_length):
    current = np.asarray(current, np.float64)
    length = np.asarray(rampdown_length, np.float64)
    if np.any(current < 0) or np.any(current > length) or np.any(length == 0):
      raise ValueError(
          "cosine_rampdown needs 0 <= current <= rampdown_length and rampdown_length > 0, got "
          f"{current!r} and {length!r}.")
    return _host_result(0.5 * (np.cos(np.pi * current / length) + 1.0))
  current, length = _jax_floats(current, rampdown_length)
  safe_length = jnp.where(length == 0, 1.0, length)
  value = 0.5 * (jnp.cos(jnp.pi * current / safe_length) + 1.0)
  return jnp.where((current < 0) | (current > length) | (length == 0), jnp.nan, value)


def consistency_weight(step: Any, max_weight: Any, rampup_length: Any,
                       block: int = LA_CONSISTENCY_BLOCK) -> Any:
  """LA consistency weight: max_weight · sigmoid_rampup(step // block, rampup_length).

  As `get_current_consistency_weight(iter_num // 150)` in the DTC / UA-MT / SASSNet scripts: the weight is
  piecewise constant over `block`-step blocks, starts at ≈ 0.0067 · max_weight and reaches max_weight at
  step = block · rampup_length (6000 for the LA defaults 150 and 40). SSL4MIS uses rampup_length = 200.

  Args:
    step: completed optimizer steps (integer; a Python int or a traced integer array).
    max_weight: the weight reached at the end of the ramp (`--consistency`).
    rampup_length: ramp length in blocks (`--consistency_rampup`).
    block: steps per block (150 in every LA script).

  Returns:
    The weight (a float for host inputs, a JAX array otherwise).
  """
  if _is_host(step):
    block_index = np.floor_divide(step, block)
  else:
    block_index = jnp.floor_divide(step, block)
  return max_weight * sigmoid_rampup(block_index, rampup_length)
