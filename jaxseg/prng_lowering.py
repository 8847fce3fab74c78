"""Faster XLA:CPU compilation of the random draws of a network's initialisation, same bits.

A jitted `method.init` is mostly random draws: the forward pass that flax traces to find the shapes
is dropped before compilation (its outputs are unused), and what remains is one Threefry-2x32 hash
per parameter and per `fold_in` of the path keys. JAX lowers that hash on CPU as a rolled loop
(`fori_loop` over the 5 blocks of 4 rounds), and XLA:CPU compiles the resulting dozens of while
loops slowly: ~30 s for the 2D UNet of configs/supervised.py against ~8 s with the unrolled form
(the lowering JAX itself uses on GPU and TPU). The hash is integer arithmetic, so both forms give
the same bits, hence the same parameters (tests/test_prng_lowering.py checks every method's init).

`unrolled_threefry()` swaps the CPU lowering for the unrolled one while a function is lowered, and
restores JAX's rule afterwards. It touches JAX internals: if they are not where this module looks
(another JAX version), it does nothing and the initialisation compiles as before.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


def _internals():
  """(mlir module, threefry primitive, unrolled rule), or None if this JAX lacks them."""
  try:
    from jax._src.interpreters import mlir  # pylint: disable=import-outside-toplevel
    from jax._src.random import threefry2x32  # pylint: disable=import-outside-toplevel
    table = mlir._platform_specific_lowerings  # pylint: disable=protected-access
    entry_type = mlir.LoweringRuleEntry
    rule = threefry2x32._threefry2x32_lowering_rule  # pylint: disable=protected-access
    primitive = threefry2x32.threefry2x32_p
  except (ImportError, AttributeError):
    return None
  return table, entry_type, primitive, rule


@contextlib.contextmanager
def unrolled_threefry() -> Iterator[bool]:
  """While active, jitted functions lowered for CPU hash with the unrolled Threefry; yields
  whether the swap took place (False on a JAX whose internals differ)."""
  found = _internals()
  if found is None:
    yield False
    return
  table, entry_type, primitive, rule = found
  cpu_rules = table["cpu"]
  previous = cpu_rules.get(primitive)
  # Emitted out of line, as JAX's default (non-CPU) rule is: one function for all calls of a shape.
  cpu_rules[primitive] = entry_type(rule, False)
  try:
    yield True
  finally:
    if previous is None:
      cpu_rules.pop(primitive, None)
    else:
      cpu_rules[primitive] = previous
