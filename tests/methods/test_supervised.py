"""Tests of jaxseg.methods.supervised, the baseline: init, both loss forms against hand computation,
one train step at step 3000 against the written-out step, predict, config errors.

The train step is checked for both forms: "bce" on the U-Net of configs/supervised.py (one logit,
head dropout on so that the dropout key matters) and "ce_dice" on the V-Net of
configs/supervised_vnet.py with its LA optimiser block (SGD, coupled weight decay, x0.1 at 2500).
Both on 2D patches (the models are dimension-agnostic; XLA:CPU compiles 2D convolutions in
seconds), in float64 (`written_out`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import written_out as wo
from conftest import (CONFIGS_DIR, jit_init, load_config_file, predict_probs, small_config,
                      two_stream_batch)
from jaxseg import losses
from jaxseg.data.base import DataError
from jaxseg.methods import supervised

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH = (16, 16)
UNET = dict(name="unet", features=(4, 8), norm="batch", upsample="linear_align_corners",
            head_dropout=0.2, dtype="float32")
VNET = dict(name="vnet", n_filters=4, dtype="float32")


def _config(loss: str, num_classes: int = 2) -> ml_collections.ConfigDict:
  c = small_config(supervised, num_classes, loss=loss)
  if loss == "bce":
    c.method.model = ml_collections.ConfigDict(UNET)
  else:
    c.method.model = ml_collections.ConfigDict(VNET)
    c.method.optimizer = load_config_file(
        CONFIGS_DIR / "supervised_vnet.py").get_config("la8").method.optimizer
  return c


def _arrays(seed: int = 0, num_labeled: int = 3):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(num_labeled + 1, *PATCH, 1))
  label = (image[:num_labeled, ..., 0] > 0.3).astype(np.int32)
  return image[:num_labeled], label, image[num_labeled:]


# ------------------------------------------------------------------------------------------------
# The loss forms against NumPy.


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _dice_sq(p, y):
  return 1 - (2 * np.sum(p * y) + 1e-5) / (np.sum(p * p) + np.sum(y * y) + 1e-5)


def test_loss_forms_equal_hand_computation():
  rng = np.random.default_rng(0)
  # bce: PyTorch BCELoss of σ(logit), log clamped at −100 (a logit of −200 saturates σ to 0).
  logits = rng.normal(size=(2, 5, 4, 1)) * 3
  labels = rng.integers(0, 2, size=(2, 5, 4))
  logits[0, 0, 0, 0], labels[0, 0, 0] = -200.0, 1
  p = 1 / (1 + np.exp(-logits[..., 0]))
  with np.errstate(divide="ignore"):
    bce = -np.mean(labels * np.maximum(np.log(p), -100)
                   + (1 - labels) * np.maximum(np.log(1 - p), -100))
  with jax.enable_x64(True):
    got = supervised.supervised_loss(jnp.asarray(logits), jnp.asarray(labels), "bce", 2)
    np.testing.assert_allclose(got, bce, rtol=1e-12)
    # ce_dice, K = 2: 0.5·(CE + squared Dice of class 1).
    logits2 = rng.normal(size=(2, 5, 4, 2)) * 2
    probs = _softmax(logits2)
    ce = -np.mean(np.log(np.take_along_axis(probs, labels[..., None], -1)))
    got = supervised.supervised_loss(jnp.asarray(logits2), jnp.asarray(labels), "ce_dice", 2)
    np.testing.assert_allclose(got, 0.5 * (ce + _dice_sq(probs[..., 1], labels)), rtol=1e-12)
    # ce_dice, K = 3: the Dice is the mean over the 3 classes, background included.
    logits3 = rng.normal(size=(2, 5, 4, 3)) * 2
    labels3 = rng.integers(0, 3, size=(2, 5, 4))
    probs = _softmax(logits3)
    ce = -np.mean(np.log(np.take_along_axis(probs, labels3[..., None], -1)))
    dice = np.mean([_dice_sq(probs[..., c], labels3 == c) for c in range(3)])
    got = supervised.supervised_loss(jnp.asarray(logits3), jnp.asarray(labels3), "ce_dice", 3)
    np.testing.assert_allclose(got, 0.5 * (ce + dice), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Init, one step at step 3000, predict.


def _expected_step(state, loss_form, trace, lr, momentum, weight_decay, image_l, label_l, key):
  seg = state.seg

  def loss_fn(params):
    logits, updates = seg.apply_fn({"params": params, "batch_stats": seg.batch_stats}, image_l,
                                   train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    if loss_form == "bce":
      target = label_l.astype(logits.dtype)
      loss = losses.binary_cross_entropy(jax.nn.sigmoid(logits[..., 0]), target)
    else:
      loss = 0.5 * (losses.cross_entropy(logits, label_l)
                    + losses.dice_loss(jax.nn.softmax(logits)[..., 1], label_l))
    return loss, (loss, updates["batch_stats"])

  grads, (loss, stats) = jax.grad(loss_fn, has_aux=True)(seg.params)
  params, _ = wo.sgd(seg.params, grads, trace, lr, momentum, weight_decay)
  return params, stats, dict(loss=loss, learning_rate=lr)


@pytest.fixture(scope="module", params=["bce", "ce_dice"])
def run(request):
  loss_form = request.param
  config = _config(loss_form)
  opt = config.method.optimizer
  lr = wo.step_learning_rate(opt.learning_rate, wo.LATE_STEP, opt.decay_every, opt.decay_factor)
  with jax.enable_x64(True):
    image_l, label_l, image_u = _arrays()
    batch = two_stream_batch(image_l, label_l, image_u[:0])
    state = wo.to_float64(jit_init(supervised, config, batch))
    seg, buffers = wo.at_step(state.seg, wo.LATE_STEP, seed=1)
    seg = seg.replace(batch_stats=jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 if path[-1].key == "mean" else a * 2.0, seg.batch_stats))
    state = state.replace(seg=seg)
    key = jax.random.key(5)
    new, metrics = jax.jit(supervised.train_step)(state, batch, key)
    expected = jax.jit(_expected_step, static_argnums=(1, 3, 4, 5))(
        state, loss_form, buffers["trace"], lr, opt.momentum, opt.weight_decay, image_l, label_l,
        key)
    probs = predict_probs(supervised, new, image_u)
    logits = new.seg.apply_fn({"params": new.seg.params, "batch_stats": new.seg.batch_stats},
                              image_u, train=False)
    direct = jax.nn.sigmoid(logits) if loss_form == "bce" else jax.nn.softmax(logits, axis=-1)
  return loss_form, state, new, metrics, expected, probs, direct, lr


def test_init_builds_the_documented_head(run):
  loss_form, state, _, _, _, probs, _, _ = run
  assert dict(state.hparams) == dict(loss=loss_form, num_classes=2)
  # One logit for bce (sigmoid), num_classes logits for ce_dice (softmax).
  assert supervised.output_channels(loss_form, 2) == (1 if loss_form == "bce" else 2)
  assert probs["model"].shape == (1, *PATCH, supervised.output_channels(loss_form, 2))
  assert int(state.seg.step) == wo.LATE_STEP


def test_train_step_at_step_3000_equals_the_written_out_step(run):
  _, state, new, metrics, (params, stats, expected_metrics), _, _, lr = run
  assert int(new.seg.step) == wo.LATE_STEP + 1
  wo.assert_updates_close(state.seg.params, new.seg.params, params, rtol=1e-10, what="params")
  wo.assert_trees_close(new.seg.batch_stats, stats, rtol=1e-10, what="batch_stats")
  wo.assert_metrics_equal(metrics, expected_metrics, rtol=1e-6)


def test_predict_is_sigmoid_or_softmax_of_the_network(run):
  loss_form, _, _, _, _, probs, direct, _ = run
  assert set(probs) == {"model"}
  np.testing.assert_allclose(probs["model"], direct, rtol=1e-12)
  if loss_form == "ce_dice":
    np.testing.assert_allclose(np.asarray(probs["model"]).sum(-1), 1.0, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Config errors.


def test_config_errors():
  image_l, label_l, image_u = _arrays()
  batch = two_stream_batch(image_l.astype(np.float32), label_l, image_u[:0].astype(np.float32))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="method.loss = 'bce' is binary.*data.num_classes = 3"):
    supervised.init(key, _config("bce", num_classes=3), batch)
  with pytest.raises(ValueError, match="method.loss = 'dice' is not one of"):
    supervised.init(key, _config("dice"), batch)
  config = _config("bce")
  config.method.model.dtype = "float16"
  with pytest.raises(DataError, match="dtype of model 'unet' is 'float16'"):
    supervised.init(key, config, batch)
