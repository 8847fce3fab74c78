"""DKUXNet through the trainer (jaxseg.train) and on several devices.

- A run resumed from its step-N checkpoint (the newer one deleted, as a run killed there) ends at
  the uninterrupted 2N-step run's state bit for bit: both networks' parameters, AdamW moments and
  BatchNorm statistics, and the step. The contrastive terms are on from the first step (their
  anchors come from the step's key, so resume must reproduce them).
- One train step sharded over 2 forced host devices equals the step on 1 device (subprocess).
- dkux-v1 steps on a fixed batch and key, λ_c held at its full value, lower the loss.

Tiny networks and volumes (configs/dkuxnet.py's default shrunk: UX-Net feature size 2, kMaX with
4 centres in groups 2 + 2 and widths 8 / 4 / 8, 16^3 crops, 16 anchors), no validation cases (the
trainer then skips evaluation: the sliding window is not compiled here), run in this process with
its jitted step traced once (tests/methods/test_asdnet_trainer.py's `one_trace_per_step`).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import _CACHE, CONFIGS_DIR, REPO, jit_init, load_config_file
from jaxseg import train
from jaxseg.data import sources
from jaxseg.methods import dkuxnet
from test_asdnet_trainer import checkpoint  # Every leaf of a saved state.
from test_asdnet_trainer import one_trace_per_step  # noqa: F401  (autouse, module scope)

# Slow: about 9 minutes of XLA:CPU compilation on 2 cores with a cold cache (the two networks'
# step is a large program: tracing ~12 s, lowering ~25 s, compiling ~75 s, in float32 and again in
# float64 on 1 and 2 devices); `pytest -m slow` runs them, .ci/run does not.
pytestmark = [pytest.mark.usefixtures("fast_compile"), pytest.mark.slow]

N = 2  # A half run; a checkpoint every N steps.


def tiny_config(num_steps: int, num_unlabeled: int = 1, batch: int = 1):
  c = load_config_file(CONFIGS_DIR / "dkuxnet.py").get_config()
  c.data.synthetic.update(dict(num_cases=2 * batch + num_unlabeled, shape=(16, 16, 16)))
  c.data.update(dict(num_labeled=2 * batch, num_validation=0, patch_size=(16, 16, 16),
                     batch_labeled=batch, batch_unlabeled=batch))
  c.method.update(dict(groups=(2, 2), num_anchors=16, rampup_block=1, rampup_length=2))
  c.method.model.update(dict(feature_size=2, centre_dim=8, key_dim=4, value_dim=8, num_heads=2,
                             ffn_dim=16))
  c.train.update(dict(num_steps=num_steps, eval_every=0, checkpoint_every=N, log_every=N,
                      keep_checkpoints=10))
  c.eval.update(dict(lcc=False, save_predictions=False, num_figure_cases=0))
  return c


def run(num_steps: int, workdir: pathlib.Path) -> pathlib.Path:
  train.train_and_evaluate(tiny_config(num_steps), workdir)
  return workdir


def test_resuming_a_killed_run_reproduces_the_uninterrupted_run(tmp_path, capsys):
  reference = run(2 * N, tmp_path / "uninterrupted")
  workdir = tmp_path / "killed"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(2 * N))  # As if killed before the last save.
  capsys.readouterr()
  run(2 * N, workdir)
  assert f"resuming from the checkpoint of step {N}" in capsys.readouterr().out
  want, got = checkpoint(reference, 2 * N), checkpoint(workdir, 2 * N)
  assert sorted(got) == sorted(want)
  for net in ("A", "B"):
    for part in ("params", "opt_state", "batch_stats"):
      assert sum(f"'{net}'" in k and part in k for k in want) > 2, (net, part)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # The steps moved both networks' parameters (the comparison can tell).
  before = checkpoint(reference, N)
  for net in ("A", "B"):
    assert any(not np.array_equal(before[k], want[k]) for k in want
               if f"'{net}'" in k and "params" in k), net


def test_dkux_v1_steps_lower_the_loss():
  """Six AdamW steps of both networks on one batch with one key (the same anchors every step), the
  contrastive weight at its full λ from the first step (a ramp of length 0): the objective is then
  one fixed function of the parameters and the steps lower it; every term is finite and both
  networks move."""
  config = tiny_config(6)
  config.method.rampup_length = 0
  batch = sources.make_batches(sources.load_dataset(config.data), config.data).batch_at(0)
  state = first = jit_init(dkuxnet, config, batch)
  step = jax.jit(dkuxnet.train_step)
  history = []
  for _ in range(6):
    state, metrics = step(state, batch, jax.random.key(7))
    history.append({k: float(v) for k, v in metrics.items()})
  assert all(np.isfinite(v) for m in history for v in m.values()), history
  assert history[0]["contrast_weight"] == pytest.approx(config.method.contrast_weight)
  assert {"segc_A", "segc_B", "qdc_A", "qdc_B", "qd_A", "dice_ce_B"} <= set(history[0])
  assert history[-1]["loss"] < history[0]["loss"], [m["loss"] for m in history]
  for net in ("A", "B"):
    assert int(state.nets[net].step) == 6
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(first.nets[net].params), jax.tree.leaves(state.nets[net].params)))


# ------------------------------------------------------------------------------------------------
# One step sharded over 2 devices.

SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = ["tests", "tests/methods"]
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jaxseg.data import sources
    from jaxseg.methods import dkuxnet
    from sharded_step import as_float64, assert_sharded_equals_one_device, traced_once
    from test_dkuxnet_trainer import tiny_config

    assert len(jax.devices()) == 2
    config = tiny_config(1, num_unlabeled=2, batch=2)  # a global batch of 2 + 2
    batches = sources.make_batches(sources.load_dataset(config.data), config.data)
    batch = as_float64(batches.batch_at(0))
    initial = jax.jit(lambda k: as_float64(dkuxnet.init(k, config, batch)))(jax.random.PRNGKey(0))
    # The step traced once, its jaxpr jitted for each placement of the inputs: the same program
    # on 1 and on 2 devices.
    step = traced_once(dkuxnet.train_step, initial, batch, jax.random.PRNGKey(3))

    single, m1, m2, _ = assert_sharded_equals_one_device(
        step, initial, batch, jax.random.PRNGKey(3),
        parts=tuple(f"'{net}'].{part}" for net in ("A", "B")
                    for part in ("params", "batch_stats", "opt_state")))
    assert all(v.dtype == np.float64 for k, v in single.items() if "].params[" in k)
    assert m1["contrast_weight"] > 0 and all(np.isfinite(v) for v in m1.values()), m1
    print("OK", m1["loss"], m2["loss"])
""")


def test_sharded_step_equals_one_device_step():
  """A global batch of 2 + 2 on 1 device and split over 2 forced host devices (BN statistics then
  reduced across them), the same key (the same anchors); every state leaf and metric within
  test_parallel's tolerances. In float64, as tests/methods/test_asdnet_trainer.py's sharded test
  and for its reason (in float32 a convolution bias directly before a train-mode norm has an
  analytically zero gradient whose rounding noise depends on the reduction order, and AdamW's
  first update lr·g/(|g| + eps) turns that noise into a move of up to lr)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=_CACHE,
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[:1] == ["OK"], result.stdout
