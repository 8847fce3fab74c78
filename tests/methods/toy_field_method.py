"""A toy method for the contract tests: it reads a per-voxel field ("weight") and the modality mask
from the batch and the prediction inputs, which the data layer, the trainer and the sliding window
carry without knowing of them.

Model: one 3x3x3 convolution of the image times its modality mask (a missing modality contributes
nothing). Loss: the voxel-weighted binary cross-entropy of the labeled samples,
mean(weight · bce(σ(z), y)). Prediction, three views: "model" = σ(z) where weight > 0, else 0;
"field" = 1[weight > 0]; "second_modality" = whether the second modality is present. The last two
show, in the saved label maps of an evaluation, that the field and the mask reached `predict`
window by window.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from jaxseg import losses, optim
from jaxseg.methods import base

FIELD = "weight"
REQUIREMENTS = base.Requirements(classes="binary")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "toy_field_method"
  c.optimizer = optim.optimizer_config("sgd", 0.1, momentum=0.9)
  return c


def check_config(config: ml_collections.ConfigDict) -> None:
  base.check_requirements(config, REQUIREMENTS)


class OneConv(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Conv(1, (3,) * (x.ndim - 2))(x)


@flax.struct.dataclass
class State:
  net: base.TrainState


def masked_image(inputs: dict) -> jax.Array:
  """The image with its missing modalities zeroed: (B, *spatial, C) · mask (B, C)."""
  mask = inputs["modality_mask"].astype(inputs["image"].dtype)
  return inputs["image"] * mask.reshape(mask.shape[0], *(1,) * (inputs["image"].ndim - 2), -1)


def init(rng, config, example_batch) -> State:
  check_config(config)
  x = jnp.asarray(example_batch.labeled["image"][:1])
  return State(net=base.create_train_state(OneConv(), optim.method_optimizer(config), rng, x))


def weighted_bce(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> jax.Array:
  """mean(weight · bce(σ(z), y)) over samples and voxels; logits (B, *S, 1), labels, weight (B, *S)."""
  per_voxel = losses.binary_cross_entropy_map(jax.nn.sigmoid(logits[..., 0]),
                                              labels.astype(jnp.float32))
  return jnp.mean(weight * per_voxel)


def train_step(state: State, batch, rng):
  labeled = batch.labeled

  def objective(params):
    logits = state.net.apply_fn({"params": params}, masked_image(labeled))
    return weighted_bce(logits, labeled["label"], labeled[FIELD]), (None, state.net.batch_stats)

  net, loss, _ = base.gradient_step(state.net, objective)
  return state.replace(net=net), base.scalar_metrics(
      loss=loss, weight_mean=jnp.mean(labeled[FIELD]),
      unlabeled_weight_mean=jnp.mean(batch.unlabeled[FIELD]))


def predict(state: State, inputs: dict) -> dict:
  logits = base.forward_eval(state.net, masked_image(inputs))
  inside = (inputs[FIELD][..., None] > 0).astype(jnp.float32)
  present = inputs["modality_mask"][:, 1].astype(jnp.float32)
  return {"model": jax.nn.sigmoid(logits) * inside, "field": inside,
          "second_modality": jnp.broadcast_to(present.reshape(-1, *(1,) * (logits.ndim - 1)),
                                              logits.shape)}
