"""Device mesh and shardings: data parallelism with `jax.jit` over all devices.

The batch is sharded along its leading axis over the mesh axis "data"; states are replicated. Under
jit, XLA computes BatchNorm statistics over the global batch (GSPMD inserts the reductions), so a
run on N devices matches a run on one device with the same global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxseg.data.base import DataError

DATA_AXIS = "data"


def make_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the devices."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_fits_mesh(data_cfg: Any, mesh: Mesh) -> None:
  """Each stream of the batch must split evenly over the devices (checked at config time)."""
  n = mesh.size
  for key in ("batch_labeled", "batch_unlabeled"):
    value = data_cfg[key]
    if value % n:
      raise DataError(f"config data.{key} = {value} is not divisible by the {n} devices")
