"""MAML through the trainer (jaxseg.train) and on several devices, with the on-device nnU-Net
augmentation on (its randomness comes from the step's key, so both must reproduce it).

- A run resumed from its step-N checkpoint (the newer one deleted, as a run killed there) ends at
  the uninterrupted 2N-step run's state bit for bit: parameters, the SGD momentum, the step.
- One train step with the batch split over 2 forced host devices equals the step on 1 device
  (subprocess), within tests/test_parallel.py's tolerances in float32.
- Both for `method.fusion = "maml"` and, shorter, `"early"`.

Tiny 3D networks and volumes (2 modalities, 3 nested classes, base width 2, 3 poolings: deep
supervision weights [2/3, 1/3, 0], 16x16x8 crops), as tests/methods/test_asdnet_trainer.py: the
trainer runs in this process (`train.train_and_evaluate`), its jitted step traced once per fusion
(that module's `one_trace_per_step`). About 40 s with a warm compilation cache, 80 s cold.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import _CACHE, CONFIGS_DIR, REPO, load_config_file
from jaxseg import train
from test_asdnet_trainer import checkpoint  # Every leaf of a saved state.
from test_asdnet_trainer import one_trace_per_step  # noqa: F401  (autouse, module scope)

pytestmark = pytest.mark.usefixtures("fast_compile")

N = 2  # A half run; a checkpoint every N steps.
FUSIONS = ("maml", "early")


def tiny_config(fusion: str, num_steps: int):
  """configs/maml.py's default shrunk: 3 nested classes, 2 modalities, four 16x16x16 volumes (3
  labeled, 1 validation), 2 crops of 16x16x8 per batch, branches of base width 2 with 3
  poolings; the on-device augmentation on (the default), evaluation only at the end."""
  c = load_config_file(CONFIGS_DIR / "maml.py").get_config()
  c.data.num_classes = 3
  c.data.synthetic.update(dict(num_cases=4, shape=(16, 16, 16), num_modalities=2))
  c.data.update(dict(num_labeled=3, num_validation=1, patch_size=(16, 16, 8), batch_labeled=2))
  c.method.fusion = fusion
  c.method.model.update(dict(base_features=2, num_pools=3))
  assert c.method.augment
  c.train.update(dict(num_steps=num_steps, eval_every=0, checkpoint_every=N, log_every=N,
                      keep_checkpoints=10))
  c.eval.update(dict(regions=(), lcc=False, save_predictions=False, num_figure_cases=0))
  return c


def run(fusion: str, num_steps: int, workdir: pathlib.Path) -> pathlib.Path:
  train.train_and_evaluate(tiny_config(fusion, num_steps), workdir)
  return workdir


@pytest.mark.parametrize("fusion", FUSIONS)
def test_resuming_a_killed_run_reproduces_the_uninterrupted_run(fusion, tmp_path, capsys):
  reference = run(fusion, 2 * N, tmp_path / "uninterrupted")
  workdir = tmp_path / "killed"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(2 * N))  # As if killed before the last save.
  capsys.readouterr()
  run(fusion, 2 * N, workdir)
  assert f"resuming from the checkpoint of step {N}" in capsys.readouterr().out
  want, got = checkpoint(reference, 2 * N), checkpoint(workdir, 2 * N)
  assert sorted(got) == sorted(want)
  for part in ("params", "opt_state"):  # The SGD momentum is in opt_state.
    assert sum(k.startswith(f"['net']['{part}']") for k in want) > 4, part
  assert int(want["['net']['step']"]) == 2 * N
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # The steps moved the parameters (the comparison can tell).
  before = checkpoint(reference, N)
  assert any(not np.array_equal(before[k], want[k]) for k in want if "['params']" in k)


# ------------------------------------------------------------------------------------------------
# One step sharded over 2 devices.

SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = ["tests", "tests/methods"]
    import jax, jax.numpy as jnp, numpy as np
    from jaxseg.data import sources
    from jaxseg.methods import maml
    from sharded_step import assert_sharded_equals_one_device
    from test_maml_trainer import tiny_config

    assert len(jax.devices()) == 2
    for fusion in ("maml", "early"):
      config = tiny_config(fusion, 1)
      config.data.synthetic.num_cases, config.data.num_labeled = 5, 4
      config.data.batch_labeled = 4
      batches = sources.make_batches(sources.load_dataset(config.data), config.data)
      batch = batches.batch_at(0)
      initial = jax.jit(lambda k: maml.init(k, config, batch))(jax.random.PRNGKey(0))
      assert initial.hparams.augment and initial.hparams.batch_dice
      step = jax.jit(maml.train_step)
      _, m1, m2, worst = assert_sharded_equals_one_device(
          step, initial, batch, jax.random.PRNGKey(3), parts=(".net.params", ".net.opt_state"))
      print("OK", fusion, m1["loss"], m2["loss"], worst)
""")


def test_sharded_step_equals_one_device_step():
  """Both fusions: a global batch of 4 augmented crops on 1 device and split over 2 forced host
  devices, the same key; every state leaf and metric within test_parallel's tolerances, in
  float32. The augmentation draws the same per-sample transforms on either placement (its
  randomness is a function of the key, not of the layout), instance norm has no batch statistics,
  and the batch Dice (`batch_dice`) pools over the global batch: under jit the loss is one
  computation on the global batch whose sums XLA reduces across the devices."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=_CACHE,
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert [line.split()[:2] for line in lines] == [["OK", "maml"], ["OK", "early"]], lines
