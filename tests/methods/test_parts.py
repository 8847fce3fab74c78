"""The shared method parts: gradient step, peer networks, adversarial pair, EMA teacher, and the
requirement checks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxseg.data.base import DataError
from jaxseg.config_blocks import data_block
from jaxseg.methods import adversarial, base, ema, peers


def linear_state(seed: int, tx=None) -> base.TrainState:
  """A TrainState of params {"w": (3,)} whose `apply_fn` is x·w (no BN statistics)."""
  w = jax.random.normal(jax.random.key(seed), (3,))
  return base.TrainState.create(apply_fn=lambda v, x: x @ v["params"]["w"], params={"w": w},
                                tx=tx or optax.sgd(0.1, momentum=0.9), batch_stats={})


X = jnp.array([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0]])


def test_gradient_step_is_value_and_grad_then_the_update():
  state = linear_state(0)

  def objective(params):
    loss = jnp.sum(jnp.square(X @ params["w"] - 1.0))
    return loss, ({"aux": 2 * loss}, {"stats": jnp.ones(1)})

  new, loss, aux = base.gradient_step(state, objective)
  (want_loss, _), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  want = state.apply_gradients(grads=grads)
  np.testing.assert_array_equal(new.params["w"], want.params["w"])
  assert float(loss) == float(want_loss) and float(aux["aux"]) == 2 * float(want_loss)
  assert new.batch_stats == {"stats": jnp.ones(1)} and int(new.step) == 1


def test_peers_each_apply_their_own_optimiser_as_one_sgd_over_both():
  nets = peers.create_peers(("a", "b"), lambda key: linear_state(int(jax.random.key_data(key)[-1])),
                            jax.random.split(jax.random.key(1)))
  assert nets.names == ("a", "b")
  joint = base.TrainState.create(apply_fn=None, params=nets.params, tx=optax.sgd(0.1, momentum=0.9))

  def coupled(params):  # Each peer fits the other's stopped output: the gradients differ per peer.
    ya, yb = X @ params["a"]["w"], X @ params["b"]["w"]
    loss = jnp.sum((ya - jax.lax.stop_gradient(yb) - 1.0) ** 2) + jnp.sum((yb - 0.5 * ya) ** 2)
    return loss, (None, {"a": {}, "b": {}})

  for _ in range(3):
    nets, _, _ = base.gradient_step(nets, coupled)
    grads = jax.grad(lambda p: coupled(p)[0])(joint.params)
    joint = joint.apply_gradients(grads=grads)
  for name in ("a", "b"):
    np.testing.assert_allclose(nets[name].params["w"], joint.params[name]["w"], rtol=1e-6)
    assert int(nets[name].step) == 3  # Each peer keeps its own optimiser state.


def test_adversarial_segmenter_step_never_changes_the_critic_and_critic_step_stops_fakes():
  seg, critic = linear_state(2), linear_state(3, optax.adam(1e-2))
  critic = critic.replace(batch_stats={"seen": jnp.zeros(())})

  def seg_objective(params, frozen_critic):
    fake = X * (X @ params["w"])[:, None]
    loss = jnp.sum(jax.nn.softplus(-frozen_critic.apply_fn({"params": frozen_critic.params}, fake)))
    return loss, ({}, {}, {"seen": jnp.ones(())})

  new_seg, new_critic, _, _ = adversarial.segmenter_step(seg, critic, seg_objective)
  assert not np.array_equal(new_seg.params["w"], seg.params["w"])
  np.testing.assert_array_equal(new_critic.params["w"], critic.params["w"])
  assert int(new_critic.step) == 0 and float(new_critic.batch_stats["seen"]) == 1.0
  # Through the frozen critic, no gradient reaches the critic's parameters.
  grads = jax.grad(lambda c: seg_objective(seg.params, adversarial.frozen(critic.replace(
      params=c)))[0])(critic.params)
  assert not np.any(grads["w"])

  def critic_objective(params, fakes):
    return jnp.sum(critic.apply_fn({"params": params}, fakes) ** 2), ({}, critic.batch_stats)

  def critic_loss_of_seg(seg_params):
    fakes = X * (X @ seg_params["w"])[:, None]
    return adversarial.critic_step(critic, fakes, critic_objective)[1]

  assert not np.any(jax.grad(critic_loss_of_seg)(seg.params)["w"])  # Fakes are stopped.
  new_critic, _, _ = adversarial.critic_step(critic, X, critic_objective)
  assert not np.array_equal(new_critic.params["w"], critic.params["w"])


def test_ema_teacher_follows_the_student():
  teacher = ema.Teacher(params={"w": jnp.zeros(2)}, batch_stats={})
  student = {"w": jnp.array([1.0, 2.0])}
  first, decay = ema.follow(teacher, student, jnp.int32(0), 0.99, {})
  assert float(decay) == 0.0  # α_0 = 0: the teacher becomes the student.
  np.testing.assert_array_equal(first.params["w"], student["w"])
  later, decay = ema.follow(teacher, student, jnp.int32(999), 0.99, {"s": 1})
  assert float(decay) == pytest.approx(0.99)  # min(1 - 1/1000, 0.99).
  np.testing.assert_allclose(later.params["w"], 0.01 * student["w"], rtol=1e-6)
  assert later.batch_stats == {"s": 1}


def _config(**data) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = data_block()
  c.data.update(data)
  c.method = ml_collections.ConfigDict(dict(name="m", k=3, w=0.5, choice="a"))
  return c


@pytest.mark.parametrize("needs, data, key", [
    (base.Requirements(classes="binary"), dict(num_classes=3), "data.num_classes"),
    (base.Requirements(), dict(num_classes=1), "data.num_classes"),
    (base.Requirements(labeled_groups=2), dict(labeled_groups=1), "data.labeled_groups"),
    (base.Requirements(labeled_groups=2), dict(labeled_groups=2, batch_labeled=3),
     "data.batch_labeled"),
    (base.Requirements(unlabeled=True), dict(batch_unlabeled=0), "data.batch_unlabeled"),
])
def test_requirements_name_the_data_key(needs, data, key):
  with pytest.raises(DataError, match=f"config {key} = .*: m "):
    base.check_requirements(_config(**data), needs)
  base.check_requirements(_config(), base.Requirements(
      classes=needs.classes, unlabeled=needs.unlabeled))  # The defaults satisfy them.


def test_requirements_of_the_example_batch():
  one_channel = base.Requirements(modalities="one")
  batch = type("B", (), dict(labeled={"image": np.zeros((2, 4, 4, 2))},
                             unlabeled={"image": np.zeros((0, 4, 4, 2))}))
  with pytest.raises(DataError, match="2 channels"):
    base.check_example_batch(batch, one_channel, "m")
  with pytest.raises(DataError, match="data.batch_unlabeled = 0"):
    base.check_example_batch(batch, base.Requirements(unlabeled=True), "m")
  with pytest.raises(ValueError, match="classes"):
    base.Requirements(classes="many")


def test_method_key_checks():
  block = _config().method
  base.check_count(block, "k")
  base.check_positive(block, "w")
  base.check_choice(block, "choice", ("a", "b"))
  for check, value, message in [(base.check_count, 0, "method.k = 0 must be an integer >= 1"),
                                (base.check_count, 2.5, "method.k = 2.5 must be an integer"),
                                (base.check_positive, -1.0, "method.k = -1.0 must be a number >= 0"),
                                (base.check_choice, "c", "method.k = 'c' is not one of")]:
    block = ml_collections.ConfigDict(dict(k=value))
    with pytest.raises(DataError, match=message):
      check(block, "k", *(("a", "b"),) if check is base.check_choice else ())
