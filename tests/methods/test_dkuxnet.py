"""Tests of jaxseg.methods.dkuxnet (docs/methods/dkuxnet.md) at tiny sizes: 16^3 crops, UX-Net
feature size 4, kMaX with N = 4 centres in groups (2, 2), widths 8 / 4 / 8, 2 heads, FFN 16, and
M = 16 anchors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import jit_init, learnable_batch, prediction_inputs, run_steps
from jaxseg import losses, schedules
from jaxseg.config_blocks import data_block
from jaxseg.data.base import DataError
from jaxseg.methods import base, dkuxnet, peers
from jaxseg.models.kmax import KMaXPredictor
from jaxseg.models.uxnet import GroupedConv

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH = (16, 16, 16)
GROUPS = (2, 2)


def _config(preset: str = "dkux-v1", **method) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = data_block()
  c.data.num_classes = 2
  c.data.patch_size = PATCH
  c.data.batch_labeled = 2
  c.data.batch_unlabeled = 2 if preset == "dkux-v1" else 0
  c.method = dkuxnet.default_config()
  c.method.preset = preset
  c.method.groups = GROUPS
  c.method.num_anchors = 16
  c.method.rampup_block = 10
  c.method.rampup_length = 20
  c.method.model.update(dict(feature_size=4, centre_dim=8, key_dim=4, value_dim=8, num_heads=2,
                             ffn_dim=16))
  c.method.update(method)
  return c


@pytest.fixture(scope="module")
def batch():
  return learnable_batch(PATCH, 2, 2)


@pytest.fixture(scope="module")
def state(batch):
  return jit_init(dkuxnet, _config(), batch)


@pytest.fixture(scope="module")
def supervised_batch():
  return learnable_batch(PATCH, 2, 0)


@pytest.fixture(scope="module")
def supervised_config():
  c = _config("supervised")
  c.method.optimizer.learning_rate = 3e-3
  return c


@pytest.fixture(scope="module")
def supervised_state(supervised_config, supervised_batch):
  return jit_init(dkuxnet, supervised_config, supervised_batch)


# ------------------------------------------------------------------------------------------------
# check_config.


@pytest.mark.parametrize("change, key", [
    (lambda c: setattr(c.method, "preset", "dkux-v2"), "method.preset"),
    (lambda c: setattr(c.method, "groups", (2, 1, 1)), "method.groups"),
    (lambda c: setattr(c.data, "batch_unlabeled", 0), "data.batch_unlabeled"),
    (lambda c: setattr(c.data, "patch_size", (16, 16, 24)), "data.patch_size"),
    (lambda c: setattr(c.method, "negatives", "some"), "method.negatives"),
    (lambda c: setattr(c.method, "temperature", 0.0), "method.temperature"),
    (lambda c: setattr(c.method, "num_anchors", 1), "method.num_anchors"),
])
def test_check_config_names_the_key(change, key):
  config = _config()
  dkuxnet.check_config(config)
  change(config)
  with pytest.raises(DataError, match=key.replace(".", r"\.")):
    dkuxnet.check_config(config)


def test_check_config_other_presets():
  # One network: no unlabeled samples needed, groups free (the released 3 groups on 2 classes).
  dkuxnet.check_config(_config("supervised"))
  dkuxnet.check_config(_config("released", groups=(2, 1, 1)))


# ------------------------------------------------------------------------------------------------
# The networks.


def test_dkux_v1_builds_two_independent_networks(state):
  assert state.nets.names == ("A", "B")
  a, b = state.nets["A"].params, state.nets["B"].params
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert set(a) == {"uxnet", "kmax"}
  assert a["kmax"]["centres"].shape == (sum(GROUPS), 8)
  for path in (("uxnet", "encoder", "stem_conv", "kernel"), ("kmax", "centres"),
               ("uxnet", "head_conv", "kernel")):
    leaf_a, leaf_b = a, b
    for p in path:
      leaf_a, leaf_b = leaf_a[p], leaf_b[p]
    assert not np.allclose(leaf_a, leaf_b), path
  # Independent optimiser states, both at step 0.
  assert int(state.nets["A"].step) == int(state.nets["B"].step) == 0


def test_init_parameter_shapes_do_not_depend_on_the_crop(batch):
  """init builds the networks on a 16^3 input; the shapes are those of the full crop's."""
  config = _config()
  config.data.patch_size = (32, 32, 16)
  big = learnable_batch((32, 32, 16), 2, 2)
  shapes = jax.eval_shape(lambda k: dkuxnet.init(k, config, big), jax.random.key(0))
  module = dkuxnet.network(config)
  direct = jax.eval_shape(lambda k: module.init(k, big.labeled["image"][:1]),
                          jax.random.key(0))
  assert (jax.tree.map(lambda s: s.shape, shapes.nets["A"].params)
          == jax.tree.map(lambda s: s.shape, direct["params"]))


@pytest.mark.parametrize("preset, has_kmax", [("released", True), ("supervised", False)])
def test_one_network_presets(preset, has_kmax, supervised_batch):
  config = _config(preset)
  shapes = jax.eval_shape(lambda k: dkuxnet.init(k, config, supervised_batch), jax.random.key(0))
  assert shapes.nets.names == ("A",)
  assert ("kmax" in shapes.nets["A"].params) == has_kmax
  assert "uxnet" in shapes.nets["A"].params


def test_pixel_head_depthwise_conv_implementations_agree():
  """The kMaX predictor's depthwise 5^3 conv: the CPU block-diagonal form equals the native
  grouped conv, with the parameters (and init) of nn.Conv(feature_group_count=C)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 6, 4)), jnp.float32)
  m = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  outs = []
  for impl in ("native", "stacked2d"):
    head = KMaXPredictor(pixel_head_dim=8, mask_dim=4, conv_impl=impl)
    variables = head.init(jax.random.key(0), x, m)
    outs.append(head.apply(variables, x, m))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  assert variables["params"]["pixel_depthwise"]["kernel"].shape == (5, 5, 5, 1, 4)
  reference = nn.Conv(4, (5, 5, 5), padding=((2, 2),) * 3, feature_group_count=4, use_bias=False,
                      kernel_init=nn.initializers.xavier_uniform())
  conv = GroupedConv(4, 5, groups=4, use_bias=False, kernel_init=nn.initializers.xavier_uniform())
  expected = reference.init(jax.random.key(1), x)
  got = conv.init(jax.random.key(1), x)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# The objective.


def _at_step(nets: peers.Peers, step: int) -> peers.Peers:
  return peers.Peers({n: nets[n].replace(step=jnp.asarray(step, jnp.int32)) for n in nets.names})


def _outputs_and_objective(state, batch, rng):
  """The objective, and each network's train-mode outputs on the batch applied directly."""
  hp = state.hparams

  def run(params, nets):
    total, (metrics, _) = dkuxnet.objective(params, nets, batch, rng, hp)
    images = jnp.concatenate([batch.labeled["image"], batch.unlabeled["image"]])
    outs = {n: base.forward_train(nets[n], params[n], images)[0] for n in nets.names}
    return total, metrics, outs

  nets = _at_step(state.nets, 25)
  return jax.jit(run)(nets.params, nets)


def _recompute(outs, labels, rng, weight):
  """dkux-v1's L from the outputs with losses.* (docs/methods/dkuxnet.md)."""
  nl = labels.shape[0]
  probs = {n: jax.nn.softmax(o["logits"], axis=-1) for n, o in outs.items()}
  groups = {n: losses.group_probabilities(o["mask_logits"], GROUPS) for n, o in outs.items()}
  total, terms = 0.0, {}
  for k, (n, peer) in enumerate((("A", "B"), ("B", "A"))):
    dice_ce = losses.monai_dice_ce_loss(outs[n]["logits"][:nl], labels)
    qd = losses.query_distribution_loss(groups[n][:nl], labels)
    classes = jnp.concatenate([labels > 0, jnp.argmax(probs[peer][nl:], axis=-1) > 0])
    classes = classes.astype(jnp.int32)
    key = jax.random.fold_in(rng, k)
    options = dict(num_anchors=16, temperature=0.1)
    segc = losses.voxel_contrastive_loss(key, probs[n], probs[peer], classes, **options)
    qdc = losses.voxel_contrastive_loss(key, groups[n], groups[peer], classes, **options)
    total = total + dice_ce + 0.1 * qd + weight * (segc + qdc)
    terms.update({f"dice_ce_{n}": dice_ce, f"qd_{n}": qd, f"segc_{n}": segc, f"qdc_{n}": qdc})
  return total, terms


def test_objective_equals_the_losses_of_the_outputs(state, batch):
  rng = jax.random.key(7)
  total, metrics, outs = _outputs_and_objective(state, batch, rng)
  weight = schedules.consistency_weight(25, 0.1, 20, block=10)
  assert 0.0 < weight < 0.1
  np.testing.assert_allclose(metrics["contrast_weight"], weight, rtol=1e-6)
  expected, terms = jax.jit(_recompute, static_argnums=3)(outs, batch.labeled["label"], rng,
                                                          float(weight))
  for name, value in terms.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.isfinite(value) and float(value) > 0.0, name
  np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-6)
  assert set(metrics) == set(terms) | {"contrast_weight"}


def test_peer_receives_no_gradient_from_my_contrastive_terms(state, batch):
  """sg on the peer: d(segc_A)/d(params_B) and d(qdc_A)/d(params_B) are exactly zero, and at the
  output level the terms' gradient reaches only the network's own outputs."""
  hp = state.hparams
  rng = jax.random.key(3)
  images = jnp.concatenate([batch.labeled["image"], batch.unlabeled["image"]])
  labels = batch.labeled["label"]

  def outputs(name, params):
    out = dict(base.forward_train(state.nets[name], params, images)[0])
    out["probs"] = jax.nn.softmax(out["logits"], axis=-1)
    out["groups"] = losses.group_probabilities(out["mask_logits"], GROUPS)
    return out

  def terms_of_a(mine, peer):
    classes = dkuxnet.contrast_classes(labels, peer["probs"][labels.shape[0]:])
    return dkuxnet.contrastive_terms(rng, mine, peer, classes, hp)

  @jax.jit
  def grads_wrt_b(params_a, params_b):
    mine = outputs("A", params_a)
    segc = jax.grad(lambda p: terms_of_a(mine, outputs("B", p))[0])(params_b)
    qdc = jax.grad(lambda p: terms_of_a(mine, outputs("B", p))[1])(params_b)
    return segc, qdc

  for grads in grads_wrt_b(state.nets["A"].params, state.nets["B"].params):
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))

  # Output level: nonzero gradient to the own outputs, exactly zero to the peer's.
  rng_np = np.random.default_rng(0)
  shape = images.shape[:-1]
  fake = lambda: {"probs": jax.nn.softmax(jnp.asarray(rng_np.normal(size=(*shape, 2)),
                                                      jnp.float32)),
                  "groups": jax.nn.softmax(jnp.asarray(rng_np.normal(size=(*shape, 2)),
                                                       jnp.float32))}
  mine, peer = fake(), fake()
  total = lambda m, p: sum(terms_of_a(m, p))
  g_mine, g_peer = jax.jit(jax.grad(total, argnums=(0, 1)))(mine, peer)
  assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(g_mine))
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_peer))


def test_contrast_weight_follows_the_consistency_schedule(state):
  hp = state.hparams
  for step in (0, 9, 10, 55, 199, 200, 1000):
    np.testing.assert_allclose(dkuxnet.contrast_weight(jnp.asarray(step), hp),
                               schedules.consistency_weight(step, 0.1, 20, block=10), rtol=1e-6)
  assert float(dkuxnet.contrast_weight(jnp.asarray(200), hp)) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------
# Training and prediction.


def test_supervised_steps_lower_the_loss(supervised_state, supervised_batch):
  assert "kmax" not in supervised_state.nets["A"].params
  history = run_steps(dkuxnet.train_step, supervised_state, supervised_batch, 6)
  metrics = [m for _, m in history]
  assert set(metrics[0]) == {"loss", "dice_ce_A", "learning_rate"}
  assert all(np.isfinite(m["loss"]) for m in metrics)
  assert metrics[-1]["loss"] < metrics[0]["loss"]
  assert int(history[-1][0].nets["A"].step) == 6


def test_predict_views(state, supervised_state, batch):
  images = batch.labeled["image"]
  predict = jax.jit(dkuxnet.predict)
  probs = predict(state, prediction_inputs(images))
  assert set(probs) == {"A", "B", "avg"}
  for view in probs.values():
    assert view.shape == (*images.shape[:-1], 2)
    np.testing.assert_allclose(np.sum(view, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(probs["avg"], 0.5 * (probs["A"] + probs["B"]), rtol=1e-6)
  assert not np.allclose(probs["A"], probs["B"])
  single = predict(supervised_state, prediction_inputs(images))
  assert set(single) == {"A"}
