"""ASDNet through the trainer (jaxseg.train) and on several devices, both presets.

- A run resumed from its step-N checkpoint (the newer one deleted, as a run killed there) ends at
  the uninterrupted 2N-step run's state bit for bit: both networks' parameters, BN statistics,
  Adam states and (`released`) the validation Dice that `after_validation` recorded at step N,
  which sets the semi-supervised threshold of steps N+1..2N.
- `released`: a finished N-step run extended to 2N steps equals the uninterrupted 2N-step run: the
  trainer's in-loop validation also runs at the last step of a method with `after_validation`, so
  the finished run's final checkpoint already holds step N's validation Dice.
- One train step sharded over 2 forced host devices equals the step on 1 device (subprocess).
- `maps` and `predict` against the flax modules applied directly to the state's variables.

Tiny 3D networks and volumes. The trainer runs in this process (`train.train_and_evaluate`, what
`python -m jaxseg.main` calls), with its jitted step traced once per preset (`one_trace_per_step`).
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
import orbax.checkpoint as ocp
import pytest

from conftest import _CACHE, CONFIGS_DIR, REPO, jit_init, load_config_file, two_stream_batch
from jaxseg import models, optim, train
from jaxseg.methods import asdnet, base

pytestmark = pytest.mark.usefixtures("fast_compile")

N = 2  # A half run; validation and a checkpoint every N steps.
PRESETS = ("paper", "released")


def tiny_config(preset: str, num_steps: int):
  """configs/asdnet.py's default shrunk: 2 classes, five 24x24x16 volumes (2 labeled, 2 unlabeled,
  1 validation), 16x16x8 crops, networks of widths 2-4; `released`: its method block with 2
  sub-batches of 1 labeled / 1 unlabeled sample."""
  c = load_config_file(CONFIGS_DIR / "asdnet.py").get_config()
  c.data.num_classes = 2
  c.data.synthetic.update(dict(num_cases=5, shape=(24, 24, 16)))
  c.data.update(dict(num_labeled=2, num_validation=1, patch_size=(16, 16, 8),
                     batch_labeled=2, batch_unlabeled=2))
  if preset == "released":
    c.method = asdnet.released_config()
    c.method.model.features = (2, 4, 4, 4)
    c.method.sub_batches = 2
  else:
    c.method.model.n_filters = 2
  c.method.confidence.features = (2, 4, 4, 4)
  c.train.update(dict(num_steps=num_steps, eval_every=N, checkpoint_every=N, log_every=N,
                      keep_checkpoints=10))
  c.eval.update(dict(lcc=False, save_predictions=False, num_figure_cases=0))
  return c


@pytest.fixture(scope="module", autouse=True)
def one_trace_per_step():
  """The trainer's jitted step traced once per preset in this module, not once per run (tracing
  the released step takes about 20 s on a 2-core CPU): the same `_with_finite_flag` wrapper of
  the same train step, and the same flax module and optax objects for equal config blocks (the
  state's treedef holds the module's bound `apply` and the optimiser, compared by identity, so
  new objects per run force a new trace). All are stateless; nothing else changes. T =
  train.num_steps enters only poly and cosine schedules (not asdnet's), so it is part of the
  optimiser's key only for those."""
  wrappers, optimizers, modules = {}, {}, {}
  original_wrapper, original_optimizer = train._with_finite_flag, optim.method_optimizer
  original_model = models.get_model

  def method_optimizer(config, key="optimizer"):
    block = config.method[key]
    total = optim.num_steps(config) if block.get("schedule") in ("poly", "cosine") else None
    cache_key = (key, block.to_json(), total)
    if cache_key not in optimizers:
      optimizers[cache_key] = original_optimizer(config, key)
    return optimizers[cache_key]

  def get_model(name, **kwargs):
    cache_key = (name, repr(sorted(kwargs.items())))
    if cache_key not in modules:
      modules[cache_key] = original_model(name, **kwargs)
    return modules[cache_key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "_with_finite_flag",
               lambda step: wrappers.setdefault(step, original_wrapper(step)))
    mp.setattr(optim, "method_optimizer", method_optimizer)
    mp.setattr(models, "get_model", get_model)
    yield


def run(preset: str, num_steps: int, workdir: pathlib.Path) -> pathlib.Path:
  train.train_and_evaluate(tiny_config(preset, num_steps), workdir)
  return workdir


def checkpoint(workdir: pathlib.Path, step: int) -> dict:
  """{"seg/params/...": array, ...}: every leaf of the state saved at `step`."""
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(restored)}


def assert_same_state(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for net in ("seg", "confidence"):  # Both networks: parameters, BN statistics, Adam moments.
    for part in ("params", "batch_stats", "opt_state"):
      assert sum(k.startswith(f"['{net}']['{part}']") for k in want) > 4, (net, part)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


DICE = "['validation_dice']"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """{preset: workdir of a 2N-step run}, run on first use."""
  runs = {}

  def get(preset: str) -> pathlib.Path:
    if preset not in runs:
      runs[preset] = run(preset, 2 * N, tmp_path_factory.mktemp(preset) / "uninterrupted")
    return runs[preset]
  return get


@pytest.mark.parametrize("preset", PRESETS)
def test_resuming_a_killed_run_reproduces_the_uninterrupted_run(preset, uninterrupted, tmp_path,
                                                                capsys):
  reference = uninterrupted(preset)
  workdir = tmp_path / "killed"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(2 * N))  # As if killed before the last save.
  capsys.readouterr()
  run(preset, 2 * N, workdir)
  out = capsys.readouterr().out
  assert f"resuming from the checkpoint of step {N}" in out
  assert f"validation at step {N}:" not in out and f"validation at step {2 * N}:" in out
  want, got = checkpoint(reference, 2 * N), checkpoint(workdir, 2 * N)
  assert_same_state(got, want)
  # The hook recorded the validation Dice of steps N and 2N (the initial value is 0).
  assert 0 < checkpoint(reference, N)[DICE] < 1 and 0 < want[DICE] < 1


def test_extending_a_finished_released_run_equals_the_longer_run(uninterrupted, tmp_path, capsys):
  """N steps, then the same workdir with num_steps 2N: the N-step run's final checkpoint holds its
  last validation's Dice (not the initial 0), which steps N+1..2N use as their semi threshold."""
  reference = uninterrupted("released")
  workdir = run("released", N, tmp_path / "extended")
  assert_same_state(checkpoint(workdir, N), checkpoint(reference, N))
  assert checkpoint(workdir, N)[DICE] > 0
  capsys.readouterr()
  run("released", 2 * N, workdir)
  out = capsys.readouterr().out
  assert f"resuming from the checkpoint of step {N}" in out
  # Steps N+1..2N used the recorded Dice: the semi threshold logged is below 1 (its initial value).
  threshold = float(out.split("semi_threshold ")[-1].split()[0])
  assert threshold == pytest.approx(1 - float(checkpoint(workdir, N)[DICE]), abs=1e-3) != 1
  assert_same_state(checkpoint(workdir, 2 * N), checkpoint(reference, 2 * N))


# ------------------------------------------------------------------------------------------------
# One step sharded over 2 devices.

SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = ["tests", "tests/methods"]
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jaxseg.data import sources
    from jaxseg.methods import asdnet
    from sharded_step import as_float64, assert_sharded_equals_one_device, traced_once
    from test_asdnet_trainer import tiny_config

    assert len(jax.devices()) == 2
    for preset in ("paper", "released"):
      config = tiny_config(preset, 1)
      config.data.synthetic.num_cases, config.data.num_labeled = 9, 4  # 4 unlabeled
      config.data.batch_labeled = config.data.batch_unlabeled = 4
      batches = sources.make_batches(sources.load_dataset(config.data), config.data)
      batch = as_float64(batches.batch_at(0))
      initial = jax.jit(lambda k: as_float64(asdnet.init(k, config, batch)))(jax.random.PRNGKey(0))
      # asdnet.train_step traced once (the released one takes about 20 s), then its jaxpr jitted
      # for each placement of the inputs: the same program on 1 and on 2 devices.
      step = traced_once(asdnet.train_step, initial, batch, jax.random.PRNGKey(3))

      single, m1, m2, _ = assert_sharded_equals_one_device(
          step, initial, batch, jax.random.PRNGKey(3),
          parts=tuple(f".{net}.{part}" for net in ("seg", "confidence")
                      for part in ("params", "batch_stats", "opt_state")))
      assert all(v.dtype == np.float64 for k, v in single.items() if k.startswith(".seg.params"))
      print("OK", preset, m1["loss"], m2["loss"], m1.get("labeled_sub_batches"))
""")


def test_sharded_step_equals_one_device_step():
  """Both presets: a global batch of 4 + 4 on 1 device and split over 2 forced host devices (BN
  statistics then reduced across them), the same key (for `released` it draws the same L/U
  sequence of its 2 sub-batches of 2 + 2); all state leaves and metrics within test_parallel's
  tolerances.

  In float64 (state and batch cast after init): in float32 the step is not comparable leaf by
  leaf, for a reason of the numerics, not of the sharding. A convolution's bias directly before a
  train-mode BatchNorm has an analytically zero gradient (the BN subtracts the batch mean); what
  is computed is rounding noise (1e-9..1e-7) that depends on the reduction order of the batch
  statistics, and Adam's first update lr·g/(|g| + 1e-8) turns it into a move of up to ±lr, so
  those biases differed by up to 2·lr (3e-3 in `released`, 4e-5 in `paper`'s svnet); in
  `released` (three forwards of S, 1-2-channel BN layers of the tiny widths) Adam's first moments
  also differed by up to 2e-4 relative (BN's backward subtracts means: cancellation). The losses
  agreed in float32. In float64 the noise is ~1e-17 and every leaf agrees."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=_CACHE,
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert [line.split()[:2] for line in lines] == [["OK", "paper"], ["OK", "released"]], lines


# ------------------------------------------------------------------------------------------------
# maps and predict against the networks.

PATCH = (16, 16, 8)


@pytest.mark.parametrize("preset", PRESETS)
def test_maps_and_predict_equal_the_networks_applied_directly(preset):
  """M = softmax(D(softmax(S(x))))[..., REAL], both networks in eval mode (running BN statistics,
  here perturbed away from their initial 0 / 1 so that eval and train mode differ)."""
  config = tiny_config(preset, 1)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, *PATCH, 1)).astype(np.float32)
  batch = two_stream_batch(image, (image[..., 0] > 0.3).astype(np.int32), image)
  state = jit_init(asdnet, config, batch)

  def perturbed(stats):
    return {k: perturbed(v) if isinstance(v, dict) else
            (v + rng.normal(size=v.shape).astype(np.float32) if k == "mean"
             else v * rng.uniform(0.5, 2.0, size=v.shape).astype(np.float32))
            for k, v in stats.items()}

  state = state.replace(
      seg=state.seg.replace(batch_stats=perturbed(state.seg.batch_stats)),
      confidence=state.confidence.replace(batch_stats=perturbed(state.confidence.batch_stats)))
  seg_module = models.get_model(config.method.model.name, num_classes=2,
                                **base.model_kwargs(config.method.model))
  d_module = models.get_model(config.method.confidence.name,
                              **base.model_kwargs(config.method.confidence))

  def apply(module, net, x, train=False):
    variables = {"params": net.params, "batch_stats": net.batch_stats}
    if train:
      return module.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    return module.apply(variables, x, train=False)

  out = apply(seg_module, state.seg, image)
  if preset == "released":
    assert sorted(out) == ["aux1", "aux2", "main"]
    out = out["main"]
  probs = jax.nn.softmax(out, axis=-1)
  want = jax.nn.softmax(apply(d_module, state.confidence, probs), axis=-1)[..., 1]

  inputs = {"image": image, "modality_mask": np.ones((2, 1), bool)}
  got = asdnet.maps(state, inputs)
  assert sorted(got) == ["confidence"] and got["confidence"].shape == (2, *PATCH)
  np.testing.assert_allclose(got["confidence"], want, rtol=1e-6, atol=1e-7)
  predicted = asdnet.predict(state, inputs)
  assert sorted(predicted) == ["model"]
  np.testing.assert_allclose(predicted["model"], probs, rtol=1e-6, atol=1e-7)
  # The comparison can tell: class 0 (FAKE), or D in train mode, gives other maps.
  assert np.abs(np.asarray(want) - 0.5).max() > 1e-3
  train_mode = jax.nn.softmax(apply(d_module, state.confidence, probs, train=True), -1)[..., 1]
  assert np.abs(np.asarray(train_mode) - np.asarray(want)).max() > 1e-3
