"""An adversarial pair: a segmenter and a critic trained in turn, each with its own optimiser.

Used by Duo-SegNet (a per-pixel critic of probability maps) and SASSNet (a discriminator of signed
distance maps), and meant for any method with a critic or confidence network:

- `segmenter_step`: one gradient step of the segmenter on an objective that reads the critic; the
  critic's parameters are constants there (`frozen`), so the step never changes them. The critic
  may still run in train mode and move its BatchNorm statistics (as Duo-SegNet's reference does).
- `critic_step`: one gradient step of the critic on its own objective, whose inputs from the
  segmenter (fakes) are stopped: the segmenter never gets a gradient from the critic's loss.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jaxseg.methods import base


def frozen(critic: base.TrainState) -> base.TrainState:
  """`critic` with its parameters as constants (stop-gradient): what the segmenter step sees."""
  return critic.replace(params=jax.lax.stop_gradient(critic.params))


def segmenter_step(seg: Any, critic: base.TrainState, objective: Callable):
  """One gradient step of the segmenter(s) `seg` against a frozen critic.

  Args:
    seg: a `TrainState` or `peers.Peers`.
    critic: the critic, frozen for this step.
    objective: (seg params, frozen critic) -> (loss, (aux, seg batch_stats, critic batch_stats));
      the critic's statistics are those its train-mode calls left (its own when it ran in eval
      mode).

  Returns:
    (seg after the update, critic with the step's BN statistics, loss, aux).
  """
  critic_constants = frozen(critic)

  def loss_fn(params):
    loss, (aux, seg_stats, critic_stats) = objective(params, critic_constants)
    return loss, ((aux, critic_stats), seg_stats)

  seg, loss, (aux, critic_stats) = base.gradient_step(seg, loss_fn)
  return seg, critic.replace(batch_stats=critic_stats), loss, aux


def critic_step(critic: base.TrainState, fakes: Any, objective: Callable):
  """One gradient step of the critic on `objective(params, stop_gradient(fakes))`.

  Args:
    critic: the critic.
    fakes: the segmenter's outputs the critic judges (any pytree); stopped here.
    objective: (critic params, fakes) -> (loss, (aux, critic batch_stats)).

  Returns:
    (critic after the update, loss, aux).
  """
  fakes = jax.lax.stop_gradient(fakes)
  return base.gradient_step(critic, lambda params: objective(params, fakes))
