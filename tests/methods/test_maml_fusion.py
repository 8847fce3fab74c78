"""Tests of `method.fusion = "early"` in jaxseg.methods.maml: the nnU-Net baseline on all modalities
stacked as input channels, trained with MAML's loss machinery.

- `losses.deep_supervised_loss` (one network's Σ_s w_s L(z_s, y_s), also every MAML branch's term)
  against the golden weights of `YaoZhang93/MAML` and the golden nnU-Net Dice + CE;
- the early network's parameter count against the 1-channel branch's (3D, shapes only);
- the logged loss against the hand sum of w_s · soft_dice_ce over the scales, predict against the
  softmax of the network applied directly, a few steps lowering the loss, the config errors.

Tiny 2D networks as tests/methods/test_maml.py (3 modalities, 3 classes, base width 2, 3 poolings of
16x16 patches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import jit_init, run_steps, two_stream_batch
from test_maml import CLASSES, MODALITIES, NUM_POOLS, _batch  # The same tiny 2D data.
from test_maml import _config as maml_config
from jaxseg import config_blocks, losses, models
from jaxseg.data.base import DataError
from jaxseg.methods import base, maml

pytestmark = pytest.mark.usefixtures("fast_compile")



def _config(fusion: str = "early", preset: str = "paper", **method) -> ml_collections.ConfigDict:
  """test_maml.py's tiny 2D config with `method.fusion` = `fusion`."""
  return maml_config(preset, fusion=fusion, **method)


@pytest.fixture(scope="module")
def state():
  return jit_init(maml, _config(), _batch())


# ------------------------------------------------------------------------------------------------
# losses.deep_supervised_loss: one implementation for MAML's branches and the early network.


@pytest.mark.parametrize("case", ["pool4_mod2", "pool5_mod4"])
def test_deep_supervised_loss_weighs_the_scales_with_the_golden_weights(golden, case, x64):
  """With L(z, y) = z on scalar "outputs", the gradient of the loss is its weight vector: the
  golden per-branch weights of MAMLTrainerV2 (entries 1 … P of its flattened vector; float64)."""
  g = golden(f"maml_ds_loss_weights__{case}")
  num_pools = int(g["in_net_numpool"])
  grad = jax.grad(lambda z: losses.deep_supervised_loss(
      lambda logits, _: logits, list(z), [None] * num_pools))(jnp.ones(num_pools, jnp.float64))
  np.testing.assert_allclose(grad, g["out_weights"][1:1 + num_pools], rtol=1e-12, atol=0)


def test_deep_supervised_loss_of_one_scale_is_the_golden_dice_ce(golden):
  """One output (weight 1) is nnU-Net's DC_and_CE_loss of it (golden); with a second output the
  coarsest gets weight 0 and is not evaluated (a NaN there does not reach the loss)."""
  g = golden("maml_nnunet_dice_ce__2d_c3")
  logits, label = jnp.asarray(g["in_logits"], jnp.float32), jnp.asarray(g["in_label"], jnp.int32)
  one = losses.deep_supervised_loss(losses.soft_dice_ce_loss, [logits], [label])
  np.testing.assert_allclose(one, g["out_dc_and_ce_f32"], rtol=1e-5)
  two = losses.deep_supervised_loss(losses.soft_dice_ce_loss,
                                    [logits, jnp.full((2, 10, 9, 3), jnp.nan)],
                                    [label, label[:, ::2, ::2]])
  np.testing.assert_allclose(two, one, rtol=1e-7)
  with pytest.raises(ValueError, match="outputs"):
    losses.deep_supervised_loss(losses.soft_dice_ce_loss, [logits], [label, label])


def test_maml_branch_term_is_the_sum_of_the_branches_deep_supervised_losses():
  rng = np.random.default_rng(0)
  labels = [jnp.asarray(rng.integers(0, 3, size=(2, 8 >> s, 8 >> s)), jnp.int32) for s in range(3)]
  branches = [[jnp.asarray(rng.normal(size=(2, 8 >> s, 8 >> s, 3)), jnp.float32) for s in range(3)]
              for _ in range(2)]
  joint = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  _, terms = losses.maml_deep_supervised_terms(losses.soft_dice_ce_loss, joint, branches, labels)
  by_branch = sum(losses.deep_supervised_loss(losses.soft_dice_ce_loss, b, labels)
                  for b in branches)
  np.testing.assert_allclose(terms["loss_branches"], by_branch, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# The early-fusion network.


def _num_params(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_the_early_network_is_one_branch_with_m_input_channels():
  """3D, shapes only (no compilation): the early network's parameters are the 1-channel branch's
  plus (M − 1)·27·F weights of its first convolution, and equal nnunet_branch's on M channels."""
  f, pools, m = 4, 2, 4
  config = _config()
  config.data.patch_size = (8, 8, 8)
  config.method.model.update(base_features=f, num_pools=pools)
  image = np.zeros((1, 8, 8, 8, m), np.float32)
  batch = two_stream_batch(image, np.zeros((1, 8, 8, 8), np.int32), image[:0])
  state = jax.eval_shape(lambda k: maml.init(k, config, batch), jax.random.key(0))
  branch = models.get_model("nnunet_branch", num_classes=CLASSES, base_features=f, num_pools=pools)

  def branch_params(channels):
    return jax.eval_shape(branch.init, jax.random.key(0),
                          jnp.zeros((1, 8, 8, 8, channels)))["params"]

  assert state.net.params["enc_0"]["cnl_0"]["conv"]["kernel"].shape == (3, 3, 3, m, f)
  assert _num_params(state.net.params) == _num_params(branch_params(1)) + (m - 1) * 27 * f
  assert jax.tree.map(lambda a: a.shape, state.net.params) == jax.tree.map(
      lambda a: a.shape, branch_params(m))
  assert state.hparams.fusion == "early"


def test_the_logged_loss_is_the_hand_sum_over_scales(state):
  """Augmentation off: loss = Σ_s w_s soft_dice_ce(z_s, y_s), 3 scales w = [2/3, 1/3, 0], the
  labels resized by nearest neighbour; the metrics are loss and learning_rate only."""
  batch = _batch(1)
  image, labels = jnp.asarray(batch.labeled["image"]), jnp.asarray(batch.labeled["label"])
  _, metrics = jax.jit(maml.train_step)(state, batch, jax.random.key(3))
  out = base.forward_eval(state.net, image)
  assert [o.shape for o in out["logits"]] == [(2, 16, 16, 3), (2, 8, 8, 3), (2, 4, 4, 3)]
  y1 = jax.image.resize(labels, (2, 8, 8), "nearest")
  want = (2 / 3 * losses.soft_dice_ce_loss(out["logits"][0], labels)
          + 1 / 3 * losses.soft_dice_ce_loss(out["logits"][1], y1))
  assert sorted(metrics) == ["learning_rate", "loss"]
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)


def test_predict_is_the_softmax_of_the_full_resolution_output_whatever_the_mask(state):
  image = jnp.asarray(_batch(5).labeled["image"])
  module = models.get_model("nnunet_branch", num_classes=CLASSES, base_features=2,
                            num_pools=NUM_POOLS)
  want = jax.nn.softmax(module.apply({"params": state.net.params}, image)["logits"][0], axis=-1)
  partial = np.array([[True, False, False], [False, True, True]])
  for mask in (np.ones((2, MODALITIES), bool), partial):
    got = maml.predict(state, {"image": image, "modality_mask": mask})
    assert sorted(got) == ["model"]
    np.testing.assert_allclose(got["model"], want, rtol=1e-6, atol=1e-7)


def test_a_few_steps_lower_the_loss():
  batch = _batch(2, num=4)
  state = jit_init(maml, _config(optimizer=dict(momentum=0.9)), batch)
  losses_ = [m["loss"] for _, m in run_steps(maml.train_step, state, batch, 8)]
  assert losses_[-1] < losses_[0] - 0.1, losses_


# ------------------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize("changes, message", [
    ({"method.fusion": "late"}, r"config method.fusion = 'late' is not one of \['maml', 'early'\]"),
    ({"method.preset": "released"},
     r"config method.fusion = 'early' with method.preset = 'released'"),
    ({"method.branch_weight": 0.5},
     r"config method.branch_weight = 0.5 with method.fusion = 'early'"),
])
def test_config_errors_name_the_key(changes, message):
  config = config_blocks.apply_overrides(_config(), changes, "test")
  with pytest.raises(DataError, match=message):
    maml.check_config(config)


def test_the_default_is_maml():
  assert maml.default_config().fusion == "maml" and maml.released_config().fusion == "maml"
  maml.check_config(_config("maml", preset="paper", branch_weight=0.5))
