"""Tests of jaxseg.methods.maml: init, the labels per scale, the deep-supervised loss of both
presets against the written-out sum, a few training steps, the missing-modality predictions, the
on-device augmentation inside the step, and the config errors.

Tiny 2D networks (the MAML network is dimension-agnostic; XLA:CPU compiles 2D convolutions in
seconds): 3 modalities, 3 classes, base width 2, 3 poolings of 16x16 patches.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import jit_init, run_steps, two_stream_batch
from jaxseg import config_blocks, losses
from jaxseg.data import nnunet_augment
from jaxseg.data.base import DataError
from jaxseg.methods import base, maml

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH = (16, 16)
MODALITIES = 3
CLASSES = 3
NUM_POOLS = 3


def _config(preset: str = "paper", augment: bool = False, **method) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = config_blocks.data_block()
  c.data.num_classes = CLASSES
  c.data.batch_unlabeled = 0
  c.data.patch_size = PATCH
  c.method = maml.default_config() if preset == "paper" else maml.released_config()
  c.method.model.base_features = 2
  c.method.model.num_pools = NUM_POOLS
  c.method.augment = augment
  c.method.update(method)
  c.train = config_blocks.train_block()
  c.train.num_steps = 50
  return c


def _batch(seed: int = 0, num: int = 2):
  """Labeled images (num, 16, 16, 3) whose classes need two modalities: class 1 where modality 0 is
  high and modality 1 low, class 2 where both are high."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(num, *PATCH, MODALITIES)).astype(np.float32)
  high0, high1 = image[..., 0] > 0.0, image[..., 1] > 0.0
  label = np.where(high0 & high1, 2, np.where(high0, 1, 0)).astype(np.int32)
  return two_stream_batch(image, label, np.zeros((0, *PATCH, MODALITIES), np.float32))


@pytest.fixture(scope="module")
def states():
  """{preset: initial state} on `_batch()`."""
  return {p: jit_init(maml, _config(p), _batch()) for p in maml.PRESETS}


# ------------------------------------------------------------------------------------------------
# Init and the labels per scale.


def test_init_builds_one_branch_per_modality_and_the_preset_ma_kernel(states):
  for preset, state in states.items():
    params = state.net.params
    assert set(params) == ({f"branch_{m}" for m in range(MODALITIES)}
                           | {f"ma_{m}" for m in range(MODALITIES)} | {"fusion", "joint_head"})
    k = {"paper": 1, "released": 3}[preset]
    assert params["ma_0"]["conv_1"]["kernel"].shape == (k, k, 2, 2)
    assert params["joint_head"]["kernel"].shape == (1, 1, 2, CLASSES)
    # Branch m reads modality m only: its first conv has one input channel.
    assert params["branch_1"]["enc_0"]["cnl_0"]["conv"]["kernel"].shape == (3, 3, 1, 2)
    out = base.forward_eval(state.net, _batch().labeled["image"])
    assert out["joint"].shape == (2, *PATCH, CLASSES)
    assert [o.shape for o in out["branches"][2]] == [(2, 16, 16, 3), (2, 8, 8, 3), (2, 4, 4, 3)]
    assert state.hparams.preset == preset and state.augment == nnunet_augment.NnUNetAugmentConfig()


@pytest.mark.parametrize("shape", [(2, 16, 16), (1, 16, 8, 32)])
def test_labels_per_scale_are_the_nearest_neighbour_resize(shape):
  """The strided slices equal jax.image.resize(method="nearest") to each scale's shape (the
  half-pixel convention of nnU-Net's order-0 resizing), and scale 0 is the label itself."""
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 4, size=shape), jnp.int32)
  scales = maml.labels_per_scale(labels, 4)
  assert scales[0] is labels
  for s, y in enumerate(scales):
    target = (shape[0],) + tuple(n // 2**s for n in shape[1:])
    np.testing.assert_array_equal(y, jax.image.resize(labels, target, "nearest"))
  # Written out for one axis: voxel i of scale 2 is input voxel 4i + 2.
  rest = (0,) * (len(shape) - 2)
  np.testing.assert_array_equal(scales[2][(0, slice(None)) + rest],
                                labels[(0, slice(2, None, 4)) + (2,) * len(rest)])


# ------------------------------------------------------------------------------------------------
# The loss and the step.


def _written_out_loss(outputs, labels, preset, branch_weight):
  """The deep-supervised sum, every weight written out: 3 scales give w = [2/3, 1/3, 0]."""
  w = [2 / 3, 1 / 3, 0.0]
  y = [labels, jax.image.resize(labels, (labels.shape[0], 8, 8), "nearest"),
       jax.image.resize(labels, (labels.shape[0], 4, 4), "nearest")]
  joint = losses.soft_dice_ce_loss(outputs["joint"], labels)
  branches = sum(w[s] * losses.soft_dice_ce_loss(outputs["branches"][m][s], y[s])
                 for m in range(MODALITIES) for s in range(2))
  total = joint + branch_weight * branches if preset == "paper" else w[0] * joint + branches
  return total, joint, branches


@pytest.mark.parametrize("preset, branch_weight", [("paper", 1.0), ("paper", 0.5),
                                                   ("released", 1.0)])
def test_the_step_descends_the_written_out_deep_supervised_loss(states, preset, branch_weight):
  """Augmentation off: the logged loss and its parts equal the written-out sum, the library's
  `maml_deep_supervised_loss` gives the same total, and the update is the optimiser's step on the
  gradient of the written-out loss."""
  state = states[preset]
  state = state.replace(hparams=ml_collections.FrozenConfigDict(
      {**state.hparams.to_dict(), "branch_weight": branch_weight}))
  batch = _batch(1)
  image, labels = jnp.asarray(batch.labeled["image"]), jnp.asarray(batch.labeled["label"])
  new, metrics = jax.jit(maml.train_step)(state, batch, jax.random.key(3))

  def objective(params):
    outputs, _ = base.forward_train(state.net, params, image)
    return _written_out_loss(outputs, labels, preset, branch_weight)[0], outputs

  @jax.jit
  def written_out(params):
    (total, outputs), grads = jax.value_and_grad(objective, has_aux=True)(params)
    _, joint, branches = _written_out_loss(outputs, labels, preset, branch_weight)
    library = losses.maml_deep_supervised_loss(
        losses.soft_dice_ce_loss, outputs["joint"], outputs["branches"],
        [labels] + [jax.image.resize(labels, (2, n, n), "nearest") for n in (8, 4)], preset,
        branch_weight)
    return total, joint, branches, library, grads

  total, joint, branches, library, grads = written_out(state.net.params)
  np.testing.assert_allclose(library, total, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], total, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_joint"], joint, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_branches"], branches, rtol=1e-5)
  np.testing.assert_allclose(metrics["learning_rate"], 0.01, rtol=1e-6)  # lr(0) of the poly.
  # The updates (not the parameters, which one step barely moves) against the optimiser's step on
  # the written-out gradient; each leaf to 1e-3 of its largest update. Biases ahead of an instance
  # norm get no gradient and start at 0: their update is exactly 0 in both.
  expected = state.net.apply_gradients(grads=grads)
  for p0, got, want in zip(jax.tree.leaves(state.net.params), jax.tree.leaves(new.net.params),
                           jax.tree.leaves(expected.params)):
    update = np.asarray(want) - np.asarray(p0)
    scale = np.abs(update).max()
    np.testing.assert_allclose(np.asarray(got) - np.asarray(p0), update, rtol=1e-3,
                               atol=1e-3 * scale)
  assert int(new.net.step) == 1


def test_a_few_steps_lower_the_loss():
  config = _config(optimizer=dict(momentum=0.9))
  batch = _batch(2, num=4)
  state = jit_init(maml, config, batch)
  losses_ = [m["loss"] for _, m in run_steps(maml.train_step, state, batch, 8)]
  assert losses_[-1] < losses_[0] - 0.1, losses_


def test_the_augmentation_changes_the_step_deterministically(states):
  """With `augment` on, the step trains on augment_batch(split(rng)[0], ...) of the batch: the same
  as the step without augmentation on that augmented batch; the same key gives the same step,
  another key another one."""
  off = states["paper"]
  on = off.replace(hparams=ml_collections.FrozenConfigDict({**off.hparams.to_dict(),
                                                            "augment": True}))
  batch, key = _batch(4), jax.random.key(11)
  step = jax.jit(maml.train_step)
  s_on, m_on = step(on, batch, key)
  s_again, m_again = step(on, batch, key)
  _, m_off = step(off, batch, key)
  _, m_other = step(on, batch, jax.random.key(12))
  assert float(m_on["loss"]) != float(m_off["loss"])
  assert float(m_on["loss"]) != float(m_other["loss"])
  for a, b in zip(jax.tree.leaves(s_on.net.params), jax.tree.leaves(s_again.net.params)):
    np.testing.assert_array_equal(a, b)
  assert {k: float(v) for k, v in m_on.items()} == {k: float(v) for k, v in m_again.items()}
  images, labels, _ = nnunet_augment.augment_batch(
      jax.random.split(key)[0], jnp.asarray(batch.labeled["image"]),
      jnp.asarray(batch.labeled["label"]), nnunet_augment.NnUNetAugmentConfig())
  assert not np.array_equal(images, batch.labeled["image"])
  by_hand = two_stream_batch(np.asarray(images), np.asarray(labels),
                             batch.unlabeled["image"])
  _, m_hand = step(off, by_hand, key)
  np.testing.assert_allclose(m_hand["loss"], m_on["loss"], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Missing modalities.


def test_predict_uses_the_joint_head_a_branch_or_the_mean_of_branches(states):
  """One sample per modality subset (and the empty one), in one call: every prediction equals, bit
  for bit, the joint softmax (all present, none present), the present branch's full-resolution
  softmax (one present) or the mean of the present branches' softmaxes (two of three)."""
  state = states["released"]
  subsets = [s for n in range(MODALITIES + 1) for s in itertools.combinations(range(MODALITIES), n)]
  image = np.repeat(_batch(5, num=1).labeled["image"], len(subsets), axis=0)
  image = image * np.arange(1, len(subsets) + 1, dtype=np.float32)[:, None, None, None]
  mask = np.array([[m in s for m in range(MODALITIES)] for s in subsets])
  probs = maml.predict(state, {"image": jnp.asarray(image), "modality_mask": mask})["model"]
  out = base.forward_eval(state.net, jnp.asarray(image))
  joint = jax.nn.softmax(out["joint"], axis=-1)
  branch = [jax.nn.softmax(out["branches"][m][0], axis=-1) for m in range(MODALITIES)]
  for b, subset in enumerate(subsets):
    if len(subset) in (0, MODALITIES):
      want = joint[b]
    elif len(subset) == 1:
      want = branch[subset[0]][b]
    else:
      want = branch[subset[0]][b]
      for m in subset[1:]:
        want = want + branch[m][b]
      want = want / len(subset)
    np.testing.assert_array_equal(probs[b], want, err_msg=str(subset))
  assert not np.allclose(branch[0], joint) and not np.allclose(branch[0], branch[1])
  np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Config errors.


@pytest.mark.parametrize("changes, message", [
    ({"method.preset": "paperz"}, r"method.preset = 'paperz' is not one of"),
    ({"method.branch_weight": -1.0}, r"method.branch_weight = -1.0 must be a number >= 0"),
    ({"method.preset": "released", "method.branch_weight": 0.5},
     r"method.branch_weight = 0.5: the released loss has no branch weight"),
    ({"method.nnunet_augment.p_rotation": 2.0}, r"config method.nnunet_augment.p_rotation: a "
                                                r"probability in \[0, 1\]"),
    ({"method.nnunet_augment.scale_range": (1.4, 0.7)}, r"method.nnunet_augment.scale_range"),
    ({"method.model.name": "unet"}, r"method.model.name = 'unet' is not one of \['maml'\]"),
    ({"method.model.num_pools": 0}, r"method.model.num_pools = 0 must be an integer >= 1"),
    ({"data.patch_size": (16, 12)}, r"data.patch_size = \(16, 12\): .* divisible by 8"),
    ({"data.num_classes": 1}, r"data.num_classes = 1"),
    ({"data.labeled_groups": 2}, r"data.labeled_groups = 2"),
])
def test_config_errors_name_the_key(changes, message):
  config = config_blocks.apply_overrides(_config(), changes, "test")
  with pytest.raises(DataError, match=message):
    maml.check_config(config)


@pytest.mark.parametrize("key, value", [("augment", 1), ("batch_dice", "yes")])
def test_switches_must_be_booleans(key, value):
  config = _config()
  config.method = ml_collections.ConfigDict({**config.method.to_dict(), key: value})
  with pytest.raises(DataError, match=f"config method.{key} = {value!r} must be True or False"):
    maml.check_config(config)


def test_the_default_block_is_nnunets_setup():
  c = maml.default_config()
  assert (c.name, c.preset, c.branch_weight, c.augment, c.batch_dice) == (
      "maml", "paper", 1.0, True, True)
  assert maml.released_config().preset == "released"
  assert nnunet_augment.NnUNetAugmentConfig.from_config(c.nnunet_augment.to_dict()) == (
      nnunet_augment.NnUNetAugmentConfig())
  opt = c.optimizer
  assert (opt.name, opt.learning_rate, opt.momentum, opt.nesterov, opt.weight_decay) == (
      "sgd", 0.01, 0.99, True, 3e-5)
  assert (opt.schedule, opt.poly_power, opt.total_steps, opt.clip_grad_norm) == (
      "poly", 0.9, 0, 12.0)
  assert c.model.to_dict() == dict(name="maml", base_features=16, num_pools=5,
                                   shared_init="torch", dtype="float32")
  assert maml.REQUIREMENTS == base.Requirements(classes="any", unlabeled=False, modalities="any")
