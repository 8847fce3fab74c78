"""The trainer's optional method hook `after_validation(state, summary)` (jaxseg.train
`_after_validation`): called after each validation during training with that validation's
summary, before the step's checkpoint is saved, so the state it returns is what is checkpointed
and trained on; a hook that changes a state entry's shape stops the run with one ValueError.

A 2D toy method (one 3x3 convolution, binary) whose state records the hook's calls.
"""

from __future__ import annotations

import re
import sys
import types

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxseg import config_blocks, curves, evaluate, losses, optim, train
from jaxseg.methods import base

MODULE = "jaxseg_tests.hooked_toy"
NUM_STEPS, EVAL_EVERY = 6, 2


class OneConv(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Conv(1, (3,) * (x.ndim - 2))(x)


@flax.struct.dataclass
class State:
  net: base.TrainState
  dice: jax.Array  # The Dice of the latest validation the hook saw, -1 before the first.
  calls: jax.Array  # How often the hook ran.


def toy_method(after_validation=None) -> types.ModuleType:
  """The method module MODULE, with `after_validation` as its hook if given."""
  method = types.ModuleType(MODULE)
  method.REQUIREMENTS = base.Requirements(classes="binary")

  def default_config():
    c = ml_collections.ConfigDict()
    c.name = MODULE
    c.optimizer = optim.optimizer_config("sgd", 0.1, momentum=0.9)
    return c

  def check_config(config):
    base.check_requirements(config, method.REQUIREMENTS)

  def init(rng, config, example_batch):
    x = jnp.asarray(example_batch.labeled["image"][:1])
    net = base.create_train_state(OneConv(), optim.method_optimizer(config), rng, x)
    return State(net=net, dice=jnp.full((), -1.0, jnp.float32), calls=jnp.zeros((), jnp.int32))

  def train_step(state, batch, rng):
    labeled = batch.labeled

    def objective(params):
      logits = state.net.apply_fn({"params": params}, labeled["image"])
      labels = labeled["label"].astype(jnp.float32)
      loss = jnp.mean(losses.binary_cross_entropy_map(jax.nn.sigmoid(logits[..., 0]), labels))
      return loss, (None, state.net.batch_stats)

    net, loss, _ = base.gradient_step(state.net, objective)
    return state.replace(net=net), base.scalar_metrics(loss=loss)

  def predict(state, inputs):
    return {"model": jax.nn.sigmoid(base.forward_eval(state.net, inputs["image"]))}

  method.default_config, method.check_config, method.init = default_config, check_config, init
  method.train_step, method.predict = train_step, predict
  if after_validation is not None:
    method.after_validation = after_validation
  return method


def toy_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name, c.job, c.seed = "hooked_toy", "train", 0
  c.data = config_blocks.data_block()
  c.data.synthetic.num_cases, c.data.synthetic.shape = 6, (24, 24)
  c.data.num_labeled, c.data.num_validation = 2, 2
  c.data.batch_unlabeled = 0
  c.data.patch_size = (16, 16)
  c.method = toy_method().default_config()
  c.train = config_blocks.train_block()
  c.train.update(dict(num_steps=NUM_STEPS, eval_every=EVAL_EVERY, checkpoint_every=1,
                      log_every=1, keep_checkpoints=NUM_STEPS))
  c.eval = config_blocks.eval_block()
  c.eval.update(dict(lcc=False, save_predictions=False, num_figure_cases=0))
  return c


def checkpoint(workdir, step: int) -> dict:
  return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def test_hook_sees_each_validation_and_its_state_is_checkpointed(tmp_path, monkeypatch):
  calls = []

  def after_validation(state, summary):
    dice = evaluate.headline(summary)["model/dice"]
    calls.append((int(state.net.step), dice, summary))
    return state.replace(dice=jnp.asarray(dice, jnp.float32), calls=state.calls + 1)

  monkeypatch.setitem(sys.modules, MODULE, toy_method(after_validation))
  workdir = tmp_path / "run"
  final = train.train_and_evaluate(toy_config(), workdir)

  # After each in-loop validation (the last step's too: the method has the hook), with the state
  # trained to that step; never with the final evaluation's summary.
  assert [step for step, _, _ in calls] == list(range(EVAL_EVERY, NUM_STEPS + 1, EVAL_EVERY))
  assert all(summary is not final for _, _, summary in calls)
  # Each call's summary is that step's validation: the Dice logged for it.
  logged = {}
  for row in curves.read_log(workdir / curves.VALIDATION_LOG):
    logged.setdefault(row["step"], row["validation/model/dice"])
  assert sorted(logged) == [step for step, _, _ in calls]
  for step, dice, summary in calls:
    assert summary["split"] == "validation" and summary["num_cases"] == 2
    assert 0 < dice < 1 and dice == pytest.approx(logged[step], rel=1e-6)
  assert len({dice for _, dice, _ in calls}) > 1  # The steps' validations differ.

  # The checkpoint of step t holds what the hook returned at the latest validation <= t (at an
  # evaluation step: the hook ran before the save).
  for t in range(1, NUM_STEPS + 1):
    seen = [dice for step, dice, _ in calls if step <= t]
    saved = checkpoint(workdir, t)
    assert int(saved["net"]["step"]) == t
    assert int(saved["calls"]) == len(seen)
    assert float(saved["dice"]) == np.float32(seen[-1] if seen else -1.0)


def test_hook_that_changes_a_shape_stops_the_run_before_the_save(tmp_path, monkeypatch):
  def after_validation(state, summary):
    return state.replace(dice=jnp.zeros((2,), jnp.float32))

  monkeypatch.setitem(sys.modules, MODULE, toy_method(after_validation))
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=re.escape(
      f"{MODULE}.after_validation changed a state entry's shape () to (2,)")):
    train.train_and_evaluate(toy_config(), workdir)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
