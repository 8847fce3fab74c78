"""Data parallelism: a train step sharded over 2 or 4 devices equals the step on 1 device."""

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
    from jaxseg import parallel
    from jaxseg.data import sources
    from jaxseg.methods import supervised

    import os
    assert len(jax.devices()) == int(os.environ["NUM_DEVICES"])
    config = ml_collections.ConfigDict()
    config.data = sources.data_config()
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
