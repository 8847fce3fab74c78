"""Data parallelism: a train step sharded over 2 or 4 devices equals the step on 1 device; so does
the sliding-window evaluation with its windows spread over 4 devices."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from conftest import _CACHE

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    import ml_collections
    from jaxseg import config_blocks, parallel
    from jaxseg.data import sources
    from jaxseg.methods import supervised

    import os
    assert len(jax.devices()) == int(os.environ["NUM_DEVICES"])
    config = ml_collections.ConfigDict()
    config.data = config_blocks.data_block()
    config.data.update(dict(source="synthetic", num_labeled=4, num_validation=0,
                            batch_labeled=4, batch_unlabeled=0, patch_size=(32, 32)))
    config.data.synthetic.update(dict(num_cases=6, shape=(40, 40)))
    config.method = supervised.default_config()
    config.method.model.features = (4, 8)
    batch = sources.make_batches(sources.load_dataset(config.data), config.data).batch_at(0)

    def one_step(devices):
      mesh = parallel.make_mesh(devices)
      state = jax.jit(lambda k: supervised.init(k, config, batch),
                      out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
      sharded = jax.device_put(batch, parallel.data_sharding(mesh))
      new_state, metrics = jax.jit(supervised.train_step)(state, sharded, jax.random.PRNGKey(1))
      assert new_state.seg.params["head"]["kernel"].sharding.is_fully_replicated
      return jax.device_get((new_state.seg.params, new_state.seg.batch_stats, metrics["loss"]))

    single, sharded = one_step(jax.devices()[:1]), one_step(jax.devices())
    for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    print("OK", float(single[2]), float(sharded[2]))
""")


@pytest.mark.parametrize("num_devices", [2, 4])
def test_sharded_step_equals_one_device_step(num_devices):
  """The same global batch of 4 on 1 and on `num_devices` forced host devices (2 or 1 per device)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
             NUM_DEVICES=str(num_devices), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=_CACHE)
  result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("OK")


EVAL_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jaxseg import inference, parallel
    from jaxseg.models import get_model

    assert len(jax.devices()) == 4
    model = get_model("unet", num_classes=2, features=(4, 8))
    volume = np.random.default_rng(0).normal(size=(29, 23, 17, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), volume[None, :16, :16, :8], train=False)

    def probs(variables, windows):
      return jax.nn.softmax(model.apply(variables, windows, train=False), axis=-1)

    def predict(mesh):
      v = jax.device_put(variables, parallel.replicated(mesh)) if mesh else variables
      fn = jax.tree_util.Partial(probs, v)
      return np.asarray(inference.sliding_window_predict(
          fn, volume, (16, 16, 8), (5, 6, 3), batch_size=8, mesh=mesh))

    one, four = predict(None), predict(parallel.make_mesh())
    np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-6)
    # Really split: each device convolves 2 of the 8 windows and the results are gathered.
    mesh = parallel.make_mesh()
    fn = jax.tree_util.Partial(probs, jax.device_put(variables, parallel.replicated(mesh)))
    compiled = jax.jit(lambda v: inference.sliding_window_predict(
        fn, v, (16, 16, 8), (5, 6, 3), batch_size=8, mesh=mesh)).lower(volume).compile().as_text()
    assert "all-gather" in compiled
    assert one.shape == (29, 23, 17, 2)
    try:
      inference.sliding_window_predict(jax.tree_util.Partial(probs, variables), volume, (16, 16, 8),
                                       (5, 6, 3), batch_size=6, mesh=parallel.make_mesh())
      raise AssertionError("batch 6 on 4 devices was accepted")
    except ValueError as e:
      assert "multiple of the mesh's 4 devices" in str(e)
    print("OK")
""")


def test_sliding_window_over_four_devices_equals_one_device():
  """Evaluation: each batch of 8 windows split over 4 forced host devices, the same probabilities."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=_CACHE)
  result = subprocess.run([sys.executable, "-c", EVAL_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("OK")
