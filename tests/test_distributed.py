"""Several processes: two processes on localhost (jax.distributed over 127.0.0.1, launched by
launch/localhost.sh) train the tiny config to completion, agree on the state, write the logs and
reports once, end where one process with two devices ends for the same global batch, and resume
from their checkpoints (with device-resident data) to the same state bit for bit."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import _CACHE
from jaxseg import config_blocks, parallel
from jaxseg.data.base import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
# Two labeled and two unlabeled samples per step: one of each per process. (The supervised method
# ignores the unlabeled stream; it is drawn here to exercise its split over the processes.)
TINY = ["-m", "jaxseg.main", "--config", "configs/supervised.py:synthetic2d",
        "--config.data.synthetic.num_cases=9", "--config.data.synthetic.shape=(32,32)",
        "--config.data.num_labeled=3", "--config.data.num_validation=3",
        "--config.data.batch_unlabeled=2",
        "--config.data.patch_size=(16,16)", "--config.method.model.features=(4,8)",
        "--config.train.num_steps=6", "--config.train.checkpoint_every=3",
        "--config.train.log_every=3", "--config.eval.num_figure_cases=1"]
ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PLATFORMS="cpu",
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")


def _params(workdir: pathlib.Path, step: int) -> list:
  """The saved state's leaves, restored onto this process's one device (saved from two)."""
  path = workdir / "checkpoints" / str(step) / "state"
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      checkpointer.metadata(path).item_metadata.tree)
  return jax.tree_util.tree_leaves(checkpointer.restore(path, target))


def _two_processes(workdir: pathlib.Path, logs: pathlib.Path, *extra: str) -> tuple[str, str]:
  """Runs the tiny config in 2 processes (launch/localhost.sh); returns their console logs."""
  run = subprocess.run(
      ["bash", "launch/localhost.sh", "2", sys.executable, *TINY, "--workdir", str(workdir), *extra],
      cwd=REPO, env=dict(ENV, LOG_DIR=str(logs)), capture_output=True, text=True, timeout=400)
  log0, log1 = ((logs / f"process_{i}.log").read_text() for i in (0, 1))
  assert run.returncode == 0, log0[-3000:] + log1[-3000:]
  return log0, log1


def _state_digest(log: str) -> str:
  return re.search(r"state replicas agree on all 2 processes \(sha256 (\w+)\)", log).group(1)


def test_two_processes_train_agree_and_match_one_process(tmp_path):
  log0, log1 = _two_processes(tmp_path / "two", tmp_path / "logs")
  assert "on 2 cpu device(s) in 2 processes" in log0
  assert "state replicas agree on all 2 processes" in log0  # The trainer compares the copies.
  assert "step 6/6" in log0 and "step 6/6" not in log1  # One console log.
  assert "validation at step 6" in log0

  one = subprocess.run(
      [sys.executable, *TINY, "--workdir", str(tmp_path / "one")], cwd=REPO, capture_output=True,
      text=True, timeout=300,
      env=dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert one.returncode == 0, one.stderr[-3000:]
  assert "on 2 cpu device(s)" in one.stdout

  # The same global batches and the same step: equal up to the order of the float reductions.
  for step in (3, 6):
    want, got = _params(tmp_path / "one", step), _params(tmp_path / "two", step)
    assert len(want) == len(got) > 4
    for a, b in zip(want, got):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  # The evaluation shared out over the processes scores every case once, in the list's order.
  rows = [(tmp_path / run / "eval" / "metrics.csv").read_text().splitlines() for run in ("one", "two")]
  cases = [line.split(",")[0] for line in rows[1][1:]]
  assert cases == [line.split(",")[0] for line in rows[0][1:]] and len(set(cases)) == 3
  summaries = [json.loads((tmp_path / run / "eval" / "summary.json").read_text())
               for run in ("one", "two")]
  dice = [s["views"]["model"]["raw"]["1"]["dice_mean"] for s in summaries]
  np.testing.assert_allclose(dice[1], dice[0], rtol=1e-6)
  assert sorted(p.name for p in (tmp_path / "two" / "eval" / "predictions").iterdir()) == \
      sorted(p.name for p in (tmp_path / "one" / "eval" / "predictions").iterdir())

  # Stopped at step 3 and resumed to 6 with the training volumes on the devices: the same state,
  # bit for bit (the processes restore their checkpoint parts and cut the same crops on the device).
  _two_processes(tmp_path / "resumed", tmp_path / "logs_a", "--config.train.num_steps=3")
  resumed, _ = _two_processes(tmp_path / "resumed", tmp_path / "logs_b", "--config.data.on_device=True")
  assert "resuming from the checkpoint of step 3" in resumed
  assert "training volumes on the device(s)" in resumed
  assert _state_digest(resumed) == _state_digest(log0)


def _distributed_cfg(**kw):
  cfg = config_blocks.distributed_block()
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize("cfg, env, message", [
    (dict(mode="sometimes"), {}, "train.distributed.mode"),
    (dict(coordinator_address="127.0.0.1:1"), {}, "train.distributed.num_processes"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), {},
     "process_id 2 is not in"),
    (dict(), {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two",
              "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two'"),
])
def test_distributed_config_errors_name_the_key(monkeypatch, cfg, env, message):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(DataError, match=message):
    parallel.initialize_distributed(_distributed_cfg(**cfg))


def test_one_process_without_a_job_in_the_environment(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed(_distributed_cfg()) is False
  assert parallel.initialize_distributed(_distributed_cfg(mode="off")) is False
  assert not jax.distributed.is_initialized()


def test_allgather_json_one_process_and_local_rows():
  assert parallel.allgather_json({"a": [1.5, float("nan")]})[0]["a"][0] == 1.5
  mesh = parallel.make_mesh()
  assert parallel.local_rows(parallel.data_sharding(mesh), 4) == (0, 4)
  assert parallel.local_rows(parallel.data_sharding(mesh), 0) == (0, 0)


SLURM_SCRIPT = """
import jax
from jaxseg import config_blocks, parallel
assert parallel.initialize_distributed(config_blocks.distributed_block())
print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count())
"""


def test_an_srun_step_of_two_tasks_joins_one_job(tmp_path):
  """mode "auto" inside `srun -n 2` (its environment faked on localhost): JAX reads the SLURM job."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in ENV.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC",
                                                            "JAX_PROCESS_ID", "SLURM_", "OMPI_"))}
  env.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
             SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID="0", JAX_COORDINATOR_PORT=str(port))
  procs = [subprocess.Popen([sys.executable, "-c", SLURM_SCRIPT], cwd=REPO, text=True,
                            env=dict(env, SLURM_PROCID=str(i)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE) for i in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-2000:]
  assert [out.strip() for out, _ in outputs] == [f"process {i} of 2 devices 2" for i in range(2)]
