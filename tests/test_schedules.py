"""Tests of jaxseg.schedules against the reference `utils/ramps.py` (golden files), by hand and under jit.

Host inputs (Python / NumPy) must reproduce the reference exactly and raise where it asserted; JAX inputs are
evaluated under `jit` in float32 and float64 and give NaN where the reference raised.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import losses, schedules

RAMPS = {
    "sigmoid_rampup": schedules.sigmoid_rampup,
    "linear_rampup": schedules.linear_rampup,
    "cosine_rampdown": schedules.cosine_rampdown,
}


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  """Runs the test body in float32, or in float64 with JAX's x64 mode scoped to this test only."""
  with jax.enable_x64(request.param == "float64"):
    yield jnp.dtype(request.param)


def _tolerance(dtype) -> dict:
  return {"rtol": 1e-10, "atol": 0.0} if dtype == jnp.float64 else {"rtol": 1e-5, "atol": 1e-6}


def _python_scalar(x: float) -> int | float:
  """As the golden generator called the reference: ints where the value is integral."""
  return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------------------------------------------
# Golden values.


@pytest.mark.parametrize("name", sorted(RAMPS))
def test_ramps_host_match_reference_and_raise_where_it_did(golden, name):
  g = golden("dtc_ramps__grid")
  ramp = RAMPS[name]
  for current, length, expected, raises in zip(g["in_current"].ravel(), g["in_length"].ravel(),
                                               g[f"out_{name}"].ravel(), g[f"out_{name}_raises"].ravel()):
    current, length = _python_scalar(current), _python_scalar(length)
    if raises:
      with pytest.raises(ValueError, match=name):
        ramp(current, length)
    else:
      value = ramp(current, length)
      assert isinstance(value, float)
      np.testing.assert_allclose(value, expected, rtol=1e-15, atol=0, err_msg=f"{name}({current}, {length})")


@pytest.mark.parametrize("name", sorted(RAMPS))
def test_ramps_jit_match_reference_with_nan_where_it_raised(golden, name, dtype):
  g = golden("dtc_ramps__grid")
  current = jnp.asarray(g["in_current"], dtype)
  length = jnp.asarray(g["in_length"], dtype)
  value = jax.jit(RAMPS[name])(current, length)
  assert value.dtype == dtype
  np.testing.assert_array_equal(np.isnan(value), g[f"out_{name}_raises"])
  np.testing.assert_allclose(value, g[f"out_{name}"], equal_nan=True, **_tolerance(dtype))


def test_consistency_weight_matches_reference_schedule(golden, dtype):
  g = golden("dtc_consistency_weight_schedule__default")
  max_weight = g["meta"]["params"]["consistency"]
  rampup = g["meta"]["params"]["consistency_rampup"]
  host = [schedules.consistency_weight(int(step), max_weight, rampup) for step in g["in_iter_num"]]
  np.testing.assert_allclose(host, g["out_weight"], rtol=1e-15, atol=0)
  steps = jnp.asarray(g["in_iter_num"], jnp.int32)
  traced = jax.jit(schedules.consistency_weight, static_argnames="block")(steps, max_weight, rampup)
  assert traced.dtype == dtype
  np.testing.assert_allclose(traced, g["out_weight"], **_tolerance(dtype))


# ---------------------------------------------------------------------------------------------------
# By hand and properties.


def test_ramps_by_hand():
  assert schedules.sigmoid_rampup(0, 40) == pytest.approx(math.exp(-5.0), rel=1e-15)
  assert schedules.sigmoid_rampup(20, 40) == pytest.approx(math.exp(-5.0 * 0.25), rel=1e-15)
  assert schedules.sigmoid_rampup(-3, 40) == schedules.sigmoid_rampup(0, 40)  # negative steps clip to 0
  assert schedules.sigmoid_rampup(100, 40) == 1.0
  assert schedules.sigmoid_rampup(7, 0) == 1.0
  assert schedules.linear_rampup(10, 40) == 0.25
  assert schedules.linear_rampup(0, 0) == 1.0
  assert schedules.cosine_rampdown(20, 40) == pytest.approx(0.5, rel=1e-15)
  assert schedules.cosine_rampdown(40, 40) == pytest.approx(0.0, abs=1e-16)


def test_host_inputs_return_floats_or_numpy_arrays():
  assert isinstance(schedules.sigmoid_rampup(np.int64(3), 40.0), float)
  steps = np.arange(0, 50, 10)
  np.testing.assert_allclose(schedules.linear_rampup(steps, 40), [0.0, 0.25, 0.5, 0.75, 1.0])
  with pytest.raises(ValueError, match="linear_rampup"):
    schedules.linear_rampup(np.array([1, -1]), 40)


def test_traced_ramps_are_nan_outside_the_domain_and_finite_gradients_inside():
  assert jnp.isnan(schedules.cosine_rampdown(jnp.asarray(0.0), jnp.asarray(0.0)))
  assert jnp.isnan(schedules.linear_rampup(jnp.asarray(-1.0), jnp.asarray(40.0)))
  # L = 0 takes the constant branch; the guarded division keeps the gradient finite (0), not NaN.
  assert jax.grad(schedules.sigmoid_rampup)(jnp.asarray(3.0), jnp.asarray(0.0)) == 0.0
  assert jax.grad(schedules.linear_rampup)(jnp.asarray(0.0), jnp.asarray(0.0)) == 0.0


def test_consistency_weight_la_convention():
  # Piecewise constant over 150-step blocks; ≈ 0.0067 · w_max at the start, w_max from step 6000 on.
  assert schedules.consistency_weight(0, 0.1, 40) == schedules.consistency_weight(149, 0.1, 40)
  assert schedules.consistency_weight(150, 0.1, 40) > schedules.consistency_weight(149, 0.1, 40)
  assert schedules.consistency_weight(0, 1.0, 40) == pytest.approx(0.006737947, rel=1e-6)
  assert schedules.consistency_weight(5999, 1.0, 40) < 1.0
  assert schedules.consistency_weight(6000, 1.0, 40) == 1.0
  assert schedules.consistency_weight(3000, 1.0, 200, block=1) == schedules.sigmoid_rampup(3000, 200)


def test_ramps_are_reexported_from_losses():
  assert losses.sigmoid_rampup is schedules.sigmoid_rampup
  assert losses.linear_rampup is schedules.linear_rampup
  assert losses.cosine_rampdown is schedules.cosine_rampdown
