"""Peer networks: several segmenters trained side by side, each with its own optimiser state.

Used by Duo-SegNet (segmenters F₁, F₂ on two views) and meant for any method whose networks learn
from each other (e.g. cross supervision): one objective couples the peers (each usually reads the
others' outputs under stop-gradient), one gradient of it is taken with respect to all peers'
parameters, and each peer applies its own part with its own optimiser.

`Peers` has `params` and `batch_stats` ({name: ...}) like a `TrainState` over a dict of networks,
so `base.gradient_step` trains it like one network.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax

from jaxseg.methods import base


@flax.struct.dataclass
class Peers:
  """Named networks, each a `base.TrainState` with its own parameters and optimiser state."""

  nets: dict[str, base.TrainState]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.nets)

  @property
  def params(self) -> dict[str, Any]:
    return {name: net.params for name, net in self.nets.items()}

  @property
  def batch_stats(self) -> dict[str, Any]:
    return {name: net.batch_stats for name, net in self.nets.items()}

  def __getitem__(self, name: str) -> base.TrainState:
    return self.nets[name]

  def updated(self, grads: dict[str, Any], batch_stats: dict[str, Any]) -> "Peers":
    """Each peer updated with its part of `grads` by its own optimiser, and its BN statistics."""
    return Peers({name: net.updated(grads[name], batch_stats[name])
                  for name, net in self.nets.items()})


def create_peers(names: Sequence[str], create: Callable[[jax.Array], base.TrainState],
                 keys: Sequence[jax.Array]) -> Peers:
  """Peers `names`, peer i = `create(keys[i])` (independent initialisations)."""
  return Peers({name: create(key) for name, key in zip(names, keys, strict=True)})
