"""The optimisers match PyTorch's update rules, and expose their learning rate."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg.methods import base


def run(cfg, grads, steps=3):
  tx = base.optimizer(cfg)
  params = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(params)
  for g in grads[:steps]:
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params["w"]), state


GRADS = [np.array([0.5, -1.0]), np.array([0.25, 0.5]), np.array([-1.0, 2.0])]


def test_sgd_momentum_coupled_weight_decay_as_torch():
  cfg = base.optimizer_config("sgd", 0.1, momentum=0.9, weight_decay=0.01)
  got, _ = run(cfg, GRADS)
  # torch.optim.SGD: d = g + wd * p; buf = momentum * buf + d; p -= lr * buf.
  p, buf = np.array([1.0, -2.0]), np.zeros(2)
  for g in GRADS:
    buf = 0.9 * buf + (g + 0.01 * p)
    p = p - 0.1 * buf
  np.testing.assert_allclose(got, p, rtol=1e-6)


def test_rmsprop_eps_outside_the_square_root_as_torch():
  cfg = base.optimizer_config("rmsprop", 0.01, alpha=0.99, eps=1e-8)
  got, _ = run(cfg, GRADS)
  p, v = np.array([1.0, -2.0]), np.zeros(2)
  for g in GRADS:
    v = 0.99 * v + 0.01 * g * g
    p = p - 0.01 * g / (np.sqrt(v) + 1e-8)
  np.testing.assert_allclose(got, p, rtol=1e-6)


def test_step_decay_and_the_logged_learning_rate():
  cfg = base.optimizer_config("sgd", 0.01, decay_every=2, decay_factor=0.1)
  schedule = base.learning_rate_schedule(cfg)
  assert [float(schedule(t)) for t in range(5)] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4])
  tx = base.optimizer(cfg)
  state = base.TrainState.create(apply_fn=None, params={"w": jnp.zeros(2)}, tx=tx)
  for t in range(5):
    before = np.asarray(state.params["w"])
    state = state.apply_gradients(grads={"w": jnp.ones(2)})
    # The rate step t used, both as logged and as applied (plain SGD with momentum, grad 1).
    assert float(base.learning_rate(state)) == pytest.approx(float(schedule(t)))
    if t == 0:
      np.testing.assert_allclose(np.asarray(state.params["w"]), before - float(schedule(0)))
