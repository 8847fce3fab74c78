"""Runs that meet a fault end with one `error:` (or `warning:`) line and a usable workdir: a
diverging run, a damaged newest checkpoint, a workdir that cannot be written, a full disk."""

import contextlib
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import run_tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = ["--config.train.num_steps=20", "--config.train.checkpoint_every=10"]
run = run_tiny


def one_line(result, prefix: str) -> str:
  """The whole of stderr, which must be one line starting with `prefix`."""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
  return lines[0]


def params(workdir, step):
  restored = ocp.StandardCheckpointer().restore(
      pathlib.Path(workdir) / "checkpoints" / str(step) / "state")
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(restored)]


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, options: str):
  """A tmpfs mounted at `path` (skips the test where mounting is not allowed)."""
  path.mkdir(parents=True, exist_ok=True)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                           capture_output=True, text=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here (needs root outside a locked-down container): "
                f"{mounted.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --- divergence -----------------------------------------------------------------------------------

def test_diverging_run_stops_before_saving_and_keeps_the_last_good_checkpoint(tmp_path):
  """The learning rate jumps to 1e30 at step 13 (a step decay by 1e32 every 12 steps): the loss
  is NaN at step 14; the run stops there, with checkpoint 10 its last and still finite."""
  workdir = tmp_path / "run"
  result = run(workdir, *STEPS, "--config.method.optimizer.schedule=step",
               "--config.method.optimizer.decay_every=12",
               "--config.method.optimizer.decay_factor=1e32")
  assert result.returncode == 2
  line = one_line(result, "error: training diverged at step 14/20: loss is nan")
  assert f"the last good checkpoint is {workdir / 'checkpoints' / '10'}" in line
  assert "step 10/20" in result.stdout and "step 15/20" not in result.stdout
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10"]
  assert all(np.isfinite(x).all() for x in params(workdir, 10))


def test_finite_flag_names_the_state_and_costs_no_extra_compilation():
  """A step whose metrics are finite but whose new state is not (BCE's log clamp keeps the loss
  at 100): "the parameters/state"; the flag rides in the one jitted step (one compilation)."""
  from jaxseg import train
  from jaxseg.data.base import DataError

  def train_step(state, scale):
    new = dict(state, w=state["w"] * scale, count=state["count"] + 1)
    return new, {"loss": jnp.minimum(new["w"].sum(), 100.0), "lr": jnp.float32(0.1)}

  jitted = jax.jit(train._with_finite_flag(train_step), donate_argnums=(0,))
  state = {"w": jnp.ones(3), "count": jnp.zeros((), jnp.int32), "key": jax.random.key(0)}
  unchecked = []
  for done, scale in enumerate([1.0, 2.0, np.inf, 1.0], start=1):
    state, metrics, finite = jitted(state, scale)
    unchecked.append((done, metrics, finite))
  assert jitted._cache_size() == 1

  class NoCheckpoint:
    def latest_step(self):
      return None
  with pytest.raises(DataError, match=r"^training diverged at step 3/4: the parameters/state are "
                     r"not finite \(the metrics are\); stopped without saving it, no checkpoint"):
    train._check_finite(unchecked, 4, NoCheckpoint())
  unchecked = [(1, {"lr": 0.1, "loss_dice": jnp.float32(np.nan)}, jnp.bool_(False))]
  with pytest.raises(DataError, match="at step 1/4: loss_dice is nan"):
    train._check_finite(unchecked, 4, NoCheckpoint())


# --- damaged checkpoints --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 20-step run with checkpoints 10 and 20 (never modified: tests damage copies)."""
  workdir = tmp_path_factory.mktemp("faults") / "trained"
  result = run(workdir, *STEPS)
  assert result.returncode == 0, result.stderr
  return workdir


def damaged_copy(trained, tmp_path, damage: str, step: int = 20) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  state = workdir / "checkpoints" / str(step) / "state"
  largest = max((state / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
  if damage == "truncated data file":
    os.truncate(largest, 100)
  elif damage == "deleted data file":
    largest.unlink()
  elif damage == "missing metadata":
    (state / "_METADATA").unlink()
  elif damage == "empty metadata":
    (state / "_METADATA").write_bytes(b"")
  return workdir


DAMAGES = ["truncated data file", "deleted data file", "missing metadata", "empty metadata"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_eval_falls_back_from_a_damaged_newest_checkpoint(trained, tmp_path, damage):
  workdir = damaged_copy(trained, tmp_path, damage)
  result = run(workdir, *STEPS, "--mode", "eval")
  assert result.returncode == 0, result.stderr
  line = one_line(result, f"warning: checkpoint {workdir / 'checkpoints' / '20'} cannot be read (")
  assert line.endswith("; using step 10")
  if "metadata" in damage:
    assert f"(state/_METADATA is {damage.split()[0]})" in line
  assert (workdir / "eval_step10" / "summary.json").exists()
  assert (workdir / "checkpoints" / "20").is_dir()  # Left in place by eval.


def test_resumed_training_redoes_the_lost_steps_bit_for_bit(trained, tmp_path):
  workdir = damaged_copy(trained, tmp_path, "truncated data file")
  result = run(workdir, *STEPS)
  assert result.returncode == 0, result.stderr
  aside = workdir / "unreadable_checkpoints" / "20"
  one_line(result, f"warning: checkpoint {workdir / 'checkpoints' / '20'} cannot be read (")
  assert result.stderr.strip().endswith(f"; using step 10; moved to {aside}")
  assert "resuming from the checkpoint of step 10" in result.stdout
  assert (aside / "state").is_dir()  # Kept for inspection, never deleted.
  want, got = params(trained, 20), params(workdir, 20)
  assert len(want) == len(got) > 4
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)


def test_no_readable_checkpoint_is_one_error(trained, tmp_path):
  workdir = damaged_copy(trained, tmp_path, "empty metadata")
  (workdir / "checkpoints" / "10" / "state" / "_METADATA").unlink()
  result = run(workdir, *STEPS, "--mode", "eval")
  assert result.returncode == 2
  assert one_line(result, "error: ") == (
      f"error: no checkpoint in {workdir / 'checkpoints'} can be read: 20 (state/_METADATA is "
      "empty); 10 (state/_METADATA is missing)")


# --- file systems ---------------------------------------------------------------------------------

def test_unusable_workdirs_fail_at_once_with_one_line(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  result = run(afile, *STEPS)
  assert result.returncode == 2
  assert one_line(result, "error: ") == (
      f"error: workdir {afile} is a file, not a folder: use another --workdir")
  result = run(afile / "run", *STEPS)
  assert one_line(result, "error: ") == (
      f"error: workdir {afile / 'run'} cannot be created (Not a directory)")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").write_text("x")
  for mode in ("train", "eval"):
    result = run(tmp_path / "run", *STEPS, "--mode", mode)
    assert result.returncode == 2
    assert one_line(result, "error: ") == (
        f"error: checkpoint folder {tmp_path / 'run' / 'checkpoints'} is a file: move it away or "
        "use another --workdir")
  assert not (tmp_path / "run" / "split.json").exists()  # Nothing read or written before.


def test_read_only_workdir_fails_before_any_data_are_read(tmp_path):
  with tmpfs(tmp_path / "ro", "size=1m") as mount:
    (mount / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    result = run(mount / "run", *STEPS)
    assert result.returncode == 2
    assert one_line(result, "error: ") == (
        f"error: workdir {mount / 'run'} is not writable (Read-only file system)")
    result = run(mount / "new", *STEPS)
    assert one_line(result, "error: ") == (
        f"error: workdir {mount / 'new'} cannot be created (Read-only file system)")


def test_full_disk_stops_at_the_failed_save_and_keeps_the_last_good_checkpoint(tmp_path):
  """The save of step 100 fails in orbax's background thread (no space left); the run notices it
  after a few steps, well before the next save at 150, and checkpoint 50 stays readable."""
  with tmpfs(tmp_path / "disk", "size=1m") as disk:
    workdir = disk / "run"
    steps = ["--config.train.checkpoint_every=50", "--config.train.log_every=1"]
    first = run(workdir, *steps, "--config.train.num_steps=50")
    assert first.returncode == 0, first.stderr
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # Room for logs, not a checkpoint.
    result = run(workdir, *steps, "--config.train.num_steps=150")
    assert result.returncode == 2
    ckpts = workdir / "checkpoints"
    assert one_line(result, "error: ") == (
        f"error: checkpoint {ckpts / '100'} could not be saved (No space left on device); "
        f"training stopped, the last good checkpoint is {ckpts / '50'}")
    last = [line for line in result.stdout.splitlines() if line.startswith("step ")][-1]
    assert 100 <= int(last.split()[1].split("/")[0]) < 150, last
    assert sorted(p.name for p in ckpts.iterdir()) == ["50"]  # The partial folder is removed.
    assert all(np.isfinite(x).all() for x in params(workdir, 50))
