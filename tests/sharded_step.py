"""One train step on 1 device and sharded over all devices, compared leaf by leaf: the body of the
method trainer tests' sharded-step scripts (run in a subprocess with 2 forced host devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import parallel


def as_float64(tree):
  """`tree` with every floating leaf cast to float64 (jax_enable_x64 must be on)."""
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                      if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def traced_once(train_step, state, batch, key):
  """`train_step` traced once on these inputs, its jaxpr jitted: the same program for each
  placement of the inputs (1 or 2 devices), without tracing a large step twice."""
  traced, out_shape = jax.make_jaxpr(train_step, return_shape=True)(state, batch, key)
  return jax.jit(lambda *args: jax.tree.unflatten(
      jax.tree.structure(out_shape),
      jax.core.eval_jaxpr(traced.jaxpr, traced.consts, *jax.tree.leaves(args))))


def step_on(devices, step, initial, batch, key) -> tuple[dict, dict]:
  """({leaf path: array} of the new state, {metric: float}) of `step(initial, batch, key)` with
  the state replicated over `devices` and the batch split over them."""
  mesh = parallel.make_mesh(devices)
  state = jax.device_put(initial, parallel.replicated(mesh))
  sharded = jax.device_put(batch, parallel.data_sharding(mesh))
  assert len(sharded.labeled["image"].sharding.device_set) == len(devices)
  new_state, metrics = step(state, sharded, key)
  leaves = jax.tree_util.tree_leaves_with_path(new_state)
  assert all(leaf.sharding.is_fully_replicated for _, leaf in leaves)
  return ({jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in leaves},
          {k: float(v) for k, v in metrics.items()})


def assert_sharded_equals_one_device(step, initial, batch, key, parts: tuple[str, ...],
                                     rtol: float = 2e-5, atol: float = 1e-6):
  """The step on the first device and on all devices: the same leaves, each within test_parallel's
  tolerances, and the same metrics. Each of `parts` (e.g. ".seg.params") must name more than 4
  leaves, so that the comparison covers them.

  Returns:
    (1-device state leaves, 1-device metrics, all-device metrics, largest leaf difference).
  """
  assert len(jax.devices()) == 2
  (single, m1), (sharded, m2) = (step_on(jax.devices()[:1], step, initial, batch, key),
                                 step_on(jax.devices(), step, initial, batch, key))
  assert sorted(single) == sorted(sharded)
  for part in parts:
    assert sum(part in k for k in single) > 4, part
  worst = 0.0
  for k in single:
    np.testing.assert_allclose(sharded[k], single[k], rtol=rtol, atol=atol, err_msg=k)
    worst = max(worst, float(np.max(np.abs(sharded[k] - single[k]), initial=0.0)))
  assert sorted(m1) == sorted(m2)
  for k in m1:
    np.testing.assert_allclose(m2[k], m1[k], rtol=rtol, atol=atol, err_msg=k)
  return single, m1, m2, worst
