"""prng_lowering.unrolled_threefry: every method's jitted init gives the same parameters (and
optimiser and BatchNorm states) with the unrolled Threefry lowering as with JAX's rolled CPU one,
and the swap really changes the lowered program (no while loop left) and is undone afterwards.

The rolled reference is what compiles slowly (20-30 s per method at load 6 even with the
`fast_compile` fixture), so the default selection checks the supervised UNet only and the other
methods carry the `slow` marker (`pytest -m slow tests/test_prng_lowering.py`)."""

import importlib

import jax
import ml_collections
import numpy as np
import pytest

from conftest import learnable_batch
from jaxseg import prng_lowering
from jaxseg.config_blocks import data_block

pytestmark = pytest.mark.usefixtures("fast_compile")

# Methods whose networks draw with the default (Threefry) keys, and a crop their networks accept.
# DKUXNet draws with "rbg" keys (methods/dkuxnet.py): no Threefry to swap.
METHODS = {"supervised": (32, 32), "duo": (32, 32), "mean_teacher": (16, 16, 16),
           "uamt": (16, 16, 16), "dtc": (16, 16, 16), "sassnet": (16, 16, 16),
           "asdnet": (16, 16, 16), "maml": (32, 32, 32)}


def _narrow(block: ml_collections.ConfigDict) -> None:
  """Width 4 (and its doublings) for every width key of a network block, for a quick compile."""
  for key in ("n_filters", "ndf", "base_features", "feature_size"):
    if key in block:
      block[key] = 4
  if "features" in block:
    block.features = tuple(4 * 2**i for i in range(len(block.features)))


def _tiny_config(method, patch: tuple) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = data_block()
  c.data.patch_size = patch
  c.data.labeled_groups = method.REQUIREMENTS.labeled_groups
  c.method = method.default_config()
  for value in c.method.values():
    if isinstance(value, ml_collections.ConfigDict) and "name" in value:
      _narrow(value)
    if isinstance(value, ml_collections.ConfigDict) and value.get("total_steps") == 0:
      value.total_steps = 10  # A schedule that needs the run length (maml's poly).
  return c


def _init(method, config, batch) -> tuple[list[np.ndarray], str]:
  """The leaves of the jitted init's state and its lowered program (a new function each call, so
  that nothing is reused from an earlier lowering)."""
  key = jax.random.PRNGKey(3)
  lowered = jax.jit(lambda key: method.init(key, config, batch)).lower(key)
  state = lowered.compile()(key)
  return [np.asarray(leaf) for leaf in jax.tree.leaves(state)], lowered.as_text()


@pytest.mark.parametrize("name", [n if n == "supervised" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(METHODS)])
def test_init_gives_the_same_state_with_the_unrolled_threefry(name):
  method = importlib.import_module(f"jaxseg.methods.{name}")
  config = _tiny_config(method, METHODS[name])
  groups = method.REQUIREMENTS.labeled_groups
  batch = learnable_batch(METHODS[name], b_l=2 * groups, b_u=2)
  rolled, rolled_program = _init(method, config, batch)
  with prng_lowering.unrolled_threefry() as swapped:
    unrolled, unrolled_program = _init(method, config, batch)
  assert swapped
  assert "stablehlo.while" in rolled_program and "stablehlo.while" not in unrolled_program
  assert len(rolled) == len(unrolled) > 2
  for a, b in zip(rolled, unrolled):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_the_swap_is_undone_on_leaving():
  def program():
    draw = lambda key: jax.random.normal(jax.random.fold_in(key, 7), (5, 3))
    return jax.jit(draw).lower(jax.random.PRNGKey(0)).as_text()
  with prng_lowering.unrolled_threefry():
    during = program()
  assert "stablehlo.while" not in during and "stablehlo.while" in program()
