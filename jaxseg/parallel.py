"""Device mesh and shardings: data parallelism with `jax.jit` over all devices of all processes.

The batch is sharded along its leading axis over the mesh axis "data"; states are replicated. Under
jit, XLA computes BatchNorm statistics over the global batch (GSPMD inserts the reductions), so a
run on N devices matches a run on one device with the same global batch.

Several processes (hosts, or one process per GPU): `initialize_distributed` joins the job; every
process runs the same program on the global mesh, builds only its own rows of each global batch
(`local_rows`, `global_array`), and process 0 alone writes logs and reports (`is_primary`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxseg import config_blocks
from jaxseg.data.base import DataError

DATA_AXIS = "data"


def make_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes), process by process, so that
  each process holds one contiguous block of every batch (`local_rows`)."""
  devices = jax.devices() if devices is None else devices
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
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


# ---------------------------------------------------------------------------------------------------
# Several processes (hosts): `jax.distributed`.

# The `config.train.distributed` block is config_blocks.distributed_block().
_DISTRIBUTED_MODES = config_blocks.DISTRIBUTED_MODES


def _int_from(value: int, unset: int, env_name: str, key: str) -> Optional[int]:
  if value != unset:
    return int(value)
  text = os.environ.get(env_name, "")
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise DataError(f"environment variable {env_name}={text!r} is not an integer "
                    f"(or set config {key})") from None


def _cluster_launch() -> bool:
  """An `srun` step of several tasks, or an `mpirun` of several ranks (JAX reads both itself)."""
  return (int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1
          or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)


def initialize_distributed(cfg: ml_collections.ConfigDict) -> bool:
  """Joins the multi-process job that `cfg` (`config.train.distributed`) or the environment names.

  Must run before anything touches a device. Returns True when this is a multi-process run. Calling
  it again in the same process does nothing (JAX allows one initialisation per process).
  """
  if cfg.mode not in _DISTRIBUTED_MODES:
    raise DataError(f"config train.distributed.mode = {cfg.mode!r} is not one of "
                    f"{_DISTRIBUTED_MODES}")
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if cfg.mode == "off":
    return False
  address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = _int_from(cfg.num_processes, 0, "JAX_NUM_PROCESSES",
                            "train.distributed.num_processes")
  process_id = _int_from(cfg.process_id, -1, "JAX_PROCESS_ID", "train.distributed.process_id")
  if cfg.mode == "auto" and not address and not _cluster_launch():
    return False
  if address and (num_processes is None or process_id is None) and not _cluster_launch():
    raise DataError(f"coordinator address {address!r} given, but not the process count and index: "
                    "set config train.distributed.num_processes and .process_id (or "
                    "JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise DataError(f"config train.distributed: process_id {process_id} is not in "
                    f"[0, num_processes = {num_processes})")
  jax.distributed.initialize(coordinator_address=address or None, num_processes=num_processes,
                             process_id=process_id)
  return jax.process_count() > 1


def is_primary() -> bool:
  """Process 0: the one that writes logs, configs and reports."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def local_rows(sharding: NamedSharding, num_rows: int) -> tuple[int, int]:
  """[first, last) rows of a (num_rows, ...) array sharded by `sharding` held by this process.

  `make_mesh` lists the devices process by process, so each process holds one contiguous block.
  """
  if num_rows == 0:
    return 0, 0
  index_map = sharding.addressable_devices_indices_map((num_rows,))
  bounds = [index[0].indices(num_rows)[:2] for index in index_map.values()]
  first, last = min(b[0] for b in bounds), max(b[1] for b in bounds)
  if sum(b[1] - b[0] for b in set(bounds)) != last - first:
    raise ValueError(f"the rows of this process are not contiguous: {sorted(set(bounds))}")
  return first, last


def global_array(local: np.ndarray, first_row: int, global_shape: tuple[int, ...],
                 sharding: NamedSharding) -> jax.Array:
  """The global array of which this process holds rows [first_row, first_row + len(local))."""
  def rows(index):
    start, stop, _ = index[0].indices(global_shape[0])
    return local[start - first_row:stop - first_row]
  return jax.make_array_from_callback(global_shape, sharding, rows)


def local_replica(tree: Any, mesh: Mesh) -> Any:
  """A replicated (over all processes) pytree as arrays replicated over the process-local `mesh`."""
  sharding = replicated(mesh)

  def localize(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return jax.device_put(x, sharding)
  return jax.tree_util.tree_map(localize, tree)


def local_mesh() -> Mesh:
  """A 1-D mesh over the devices of this process."""
  return make_mesh(jax.local_devices())


def allgather_json(value: Any) -> list:
  """[value of process 0, value of process 1, ...] for a JSON-serialisable `value`."""
  if jax.process_count() == 1:
    return [value]
  # NumPy scalars (np.bool_, np.float32, ...) become Python numbers; NaN and inf survive.
  data = np.frombuffer(json.dumps(value, default=lambda x: x.item()).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int64)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]


def replica_digest(tree: Any) -> str:
  """sha256 of this process's copy of a replicated pytree (bytes of every leaf, in tree order)."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array):
      leaf = leaf.addressable_data(0)
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()
