"""Tests of ASDNet's `released` preset (jaxseg.methods.asdnet; docs/methods/asdnet.md).

The released code (`ginobilinie/asdnet`, runGAN.py `trainSemiSupervisedNet`) draws 3 sub-batches per
iteration, each labeled with probability 1/2, back-propagates running sums of loss terms after each
one, and steps D and S once. Its gradient is therefore Σ multiplicity × gradient of each term, the
multiplicities depending on the L/U sequence. Here:

- the multiplicities against a table computed by hand for all 8 sequences, and against a literal
  transcription of the code's running sums and backward calls (autodiff of toy terms);
- the gradient of both networks for fixed sequences against the written-out sum (losses written
  here with plain jnp, multiplicities from the hand table), with and without the Dice fix: the fake
  term reaches S (not detached), the adversarial terms reach D (the leak), the GDL reaches S only
  with `released_fix_dice_backward`;
- the labels give S no gradient unless the fix is set;
- the semi threshold follows the validation Dice recorded by `after_validation`;
- a few train steps, and the config checks.

2D networks (both are dimension-agnostic; XLA:CPU compiles 2D convolutions in seconds), dropout off
so that the three forwards of a labeled sub-batch are equal, float64.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (CONFIGS_DIR, jit_init, load_config_file, small_config, two_stream_batch)
from jaxseg.data.base import DataError
from jaxseg.methods import asdnet

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH = (16, 16)
C = 3
N = 3  # sub-batches
WIDTHS = (4, 8, 8, 8)
LAMBDA_ADV, LAMBDA_SEMI, AUX = 0.05, 0.5, (0.4, 0.2)

# Hand-computed multiplicities (see the module docstring of asdnet's released section): per
# sequence, (adversarial, semi, dice) by sub-batch.
#   G: running sum back-propagated after every sub-batch; a labeled sub-batch adds its A_m to G, an
#   unlabeled one adds A_m to G_U and sets G = G_U + Semi_m. T: the GDL running sum, back-propagated
#   after each labeled sub-batch (with the fix only), never reset.
HAND = {
    "LLL": ((3, 2, 1), (0, 0, 0), (3, 2, 1)),
    "UUU": ((3, 2, 1), (1, 1, 1), (0, 0, 0)),
    "LUL": ((1, 2, 1), (0, 2, 0), (2, 0, 1)),
    "ULU": ((3, 1, 1), (2, 0, 1), (0, 1, 0)),
    "LLU": ((2, 1, 1), (0, 0, 1), (2, 1, 0)),
    "UUL": ((3, 2, 1), (1, 2, 0), (0, 0, 1)),
    "LUU": ((1, 2, 1), (0, 1, 1), (1, 0, 0)),
    "ULL": ((3, 2, 1), (3, 0, 0), (0, 2, 1)),
}


def _labeled(sequence: str) -> jnp.ndarray:
  return jnp.asarray([c == "L" for c in sequence])


def test_hand_table_covers_every_sequence():
  assert sorted(HAND) == sorted("".join(s) for s in itertools.product("LU", repeat=3))


@pytest.mark.parametrize("sequence", sorted(HAND))
def test_multiplicities_equal_the_hand_computation(sequence):
  got = asdnet.released_multiplicities(_labeled(sequence))
  adversarial, semi, dice = HAND[sequence]
  np.testing.assert_array_equal(got.adversarial, adversarial)
  np.testing.assert_array_equal(got.semi, semi)
  np.testing.assert_array_equal(got.dice, dice)


def _transcribed_gradient(sequence: str) -> np.ndarray:
  """The released loop, transcribed: terms A_m = θ[m], Semi_m = θ[N + m], Dice_m = θ[2N + m]; each
  `.backward()` adds the gradient of the running sum it is called on."""
  theta = jnp.zeros(3 * N)
  grad = np.zeros(3 * N)
  lossG_D = lambda t: 0.0  # noqa: E731  (the code's variable names)
  lossG_D_ADV = lambda t: 0.0  # noqa: E731
  loss_dice = lambda t: 0.0  # noqa: E731
  for m, kind in enumerate(sequence):
    if kind == "L":
      lossG_D = (lambda prev, m: lambda t: prev(t) + t[m])(lossG_D, m)
      grad += np.asarray(jax.grad(lossG_D)(theta))  # lossG_D.backward(retain_graph=True)
      loss_dice = (lambda prev, m: lambda t: prev(t) + t[2 * N + m])(loss_dice, m)
      grad += np.asarray(jax.grad(loss_dice)(theta))  # the fix: loss_dice.backward(...)
    else:
      lossG_D_ADV = (lambda prev, m: lambda t: prev(t) + t[m])(lossG_D_ADV, m)
      lossG_D = (lambda adv, m: lambda t: adv(t) + t[N + m])(lossG_D_ADV, m)  # + LGsemi
      grad += np.asarray(jax.grad(lossG_D)(theta))
  return grad


@pytest.mark.parametrize("sequence", sorted(HAND))
def test_multiplicities_equal_the_transcribed_running_sums(sequence):
  got = asdnet.released_multiplicities(_labeled(sequence))
  np.testing.assert_array_equal(np.concatenate([got.adversarial, got.semi, got.dice]),
                                _transcribed_gradient(sequence))


# ------------------------------------------------------------------------------------------------
# The gradient of one iteration, written out.


def _config(fix: bool = False):
  c = small_config(asdnet, num_classes=C)
  c.method = asdnet.released_config()
  c.method.model.features = WIDTHS
  c.method.model.encoder_dropout = 0.0  # the three forwards of a labeled sub-batch are then equal
  c.method.confidence.features = WIDTHS
  c.method.released_fix_dice_backward = fix
  c.data.patch_size = PATCH
  c.data.batch_labeled = c.data.batch_unlabeled = N
  return c


def _batch(dtype=np.float32, label_shift: int = 0):
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2 * N, *PATCH, 1))
  label = (image[:N, ..., 0] > -0.2).astype(np.int32) + (image[:N, ..., 0] > 0.8)
  label = (label + label_shift) % C
  return two_stream_batch(image[:N].astype(dtype), label.astype(np.int32),
                          image[N:].astype(dtype))


def _as_float64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                      if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def _ce(logits, cls):
  return jnp.mean(-jax.nn.log_softmax(logits, axis=-1)[..., cls])


def _gdl(logits, labels):
  """1 − 2Σ_c w_c Σ p t / Σ_c [w_c (Σp + Σt) + 2e-6], w_c = 1/((Σt_c)² + 1e-6) or 0 if absent."""
  p = jax.nn.softmax(logits, axis=-1)
  t = jax.nn.one_hot(labels, C, dtype=p.dtype)
  axes = tuple(range(p.ndim - 1))
  count = jnp.sum(t, axes)
  w = jnp.where(count > 0, 1.0 / (count ** 2 + 1e-6), 0.0)
  return 1 - 2 * jnp.sum(w * jnp.sum(p * t, axes)) / jnp.sum(
      w * (jnp.sum(p, axes) + count) + 2e-6)


def _semi(logits, confidence, threshold):
  mask = (confidence > threshold).astype(logits.dtype)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_p, jnp.argmax(logits, -1)[..., None], -1)[..., 0]
  return -jnp.sum(mask * picked) / jnp.maximum(jnp.sum(mask), 1.0)


def _written_out_objective(params, state, batch, sequence: str, fix: bool):
  """Σ multiplicity × term, the multiplicities from HAND; train-mode forwards (batch statistics:
  the running ones do not enter the values)."""
  adversarial, semi, dice = HAND[sequence]
  threshold = 1.0 - state.validation_dice

  def seg(x):
    variables = {"params": params["seg"], "batch_stats": state.seg.batch_stats}
    return state.seg.apply_fn(variables, x, train=True, mutable=["batch_stats"])[0]

  def judge(maps):
    variables = {"params": params["confidence"], "batch_stats": state.confidence.batch_stats}
    return state.confidence.apply_fn(variables, maps, train=True, mutable=["batch_stats"])[0]

  total = 0.0
  for m, kind in enumerate(sequence):
    if kind == "L":
      x, y = batch.labeled["image"][m:m + 1], batch.labeled["label"][m:m + 1]
      out = seg(x)
      p = jax.nn.softmax(out["main"], axis=-1)
      total += _ce(judge(jax.nn.one_hot(y, C, dtype=p.dtype)), 1) + _ce(judge(p), 0)
      total += LAMBDA_ADV * adversarial[m] * _ce(judge(p), 1)
      if fix:
        total += dice[m] * (_gdl(out["main"], y) + AUX[0] * _gdl(out["aux1"], y)
                            + AUX[1] * _gdl(out["aux2"], y))
    else:
      u = batch.unlabeled["image"][m:m + 1]
      s = seg(u)["main"]
      d = judge(jax.nn.softmax(s, axis=-1))
      confidence = jax.nn.softmax(jax.lax.stop_gradient(d), axis=-1)[..., 1]
      total += LAMBDA_ADV * adversarial[m] * _ce(d, 1)
      total += LAMBDA_SEMI * semi[m] * _semi(s, confidence, threshold)
  return total


@pytest.fixture(scope="module")
def released_states():
  """{fix: float64 state}; the validation Dice set so that the threshold splits the voxels."""
  batch = _batch()
  states = {}
  for fix in (False, True):
    state = jit_init(asdnet, _config(fix), batch)
    states[fix] = state
  return states


def _threshold_splitting(state, batch) -> float:
  """A validation Dice whose threshold 1 − dice is the median of D's confidence on the first
  unlabeled sample (train mode), so the semi mask selects about half of its voxels."""
  out, _ = asdnet.base.forward_train(state.seg, state.seg.params, batch.unlabeled["image"][:1])
  d, _ = asdnet.base.forward_train(state.confidence, state.confidence.params,
                                   jax.nn.softmax(out["main"], axis=-1))
  return 1.0 - float(np.median(np.asarray(asdnet.confidence_map(d))))


# Every sequence and both settings of the fix in the default tier (one case each, 4-5 minutes of
# cold compilation together); the other three pairs in the slow tier (`pytest -m slow`), for CI's
# time budget.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("sequence, fix", [
    ("ULU", False), ("LLU", True), ("UUL", True),
    pytest.param("ULU", True, marks=_SLOW), pytest.param("LLU", False, marks=_SLOW),
    pytest.param("UUL", False, marks=_SLOW)])
def test_iteration_gradient_equals_the_written_out_sum(released_states, sequence, fix, x64):
  batch = _as_float64(_batch())
  state = _as_float64(released_states[fix])
  state = state.replace(validation_dice=jnp.asarray(_threshold_splitting(state, batch)))
  params = {"seg": state.seg.params, "confidence": state.confidence.params}
  (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(asdnet.released_objective,
                                                           has_aux=True))(
      params, state, batch, _labeled(sequence), jax.random.key(3))
  want_loss, want = jax.value_and_grad(_written_out_objective)(params, state, batch, sequence, fix)
  assert float(loss) == pytest.approx(float(want_loss), rel=1e-10)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
  # Both networks get a gradient (D through the real/fake terms and the leaked adversarial ones).
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads["confidence"])[:2])
  if "U" in sequence:
    assert 0 < float(metrics["mask_fraction"]) < 1  # the semi term is exercised
    assert float(metrics["loss_semi"]) > 0


def test_labels_give_s_a_gradient_only_with_the_dice_fix(released_states):
  """Without the fix S's gradient does not depend on the labels (the GDL is never back-propagated;
  the labels reach only D's real term); with it, it does."""
  for fix, depends in ((False, False), (True, True)):
    state = released_states[fix]
    params = {"seg": state.seg.params, "confidence": state.confidence.params}
    grad_fn = jax.jit(jax.grad(lambda p, b: asdnet.released_objective(
        p, state, b, _labeled("LLL"), jax.random.key(1))[0]))
    g1 = grad_fn(params, _batch())["seg"]
    g2 = grad_fn(params, _batch(label_shift=1))["seg"]
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))
    assert same != depends


def test_semi_threshold_follows_the_validation_dice(released_states):
  state = released_states[False]
  summary = {"view_names": ["model"], "classes": [1, 2], "views": {"model": {"raw": {
      "1": {"dice_mean": 0.8, "jaccard_mean": 0.7, "hd95_mean": 1.0, "asd_mean": 0.5},
      "2": {"dice_mean": 0.6, "jaccard_mean": 0.5, "hd95_mean": 2.0, "asd_mean": 1.0}}}}}
  updated = asdnet.after_validation(state, summary)
  assert float(updated.validation_dice) == pytest.approx(0.7)
  assert updated.seg is state.seg and updated.confidence is state.confidence
  _, metrics = jax.jit(asdnet.train_step)(updated, _batch(), jax.random.key(0))
  assert float(metrics["semi_threshold"]) == pytest.approx(0.3)
  # Before any validation nothing is selected: the threshold is 1.
  _, metrics = jax.jit(asdnet.train_step)(state, _batch(), jax.random.key(0))
  assert float(metrics["semi_threshold"]) == 1.0 and float(metrics["mask_fraction"]) == 0.0
  # A Dice that is not a number keeps the previous value.
  nan_summary = jax.tree.map(lambda v: v, summary)
  nan_summary["views"]["model"]["raw"]["1"]["dice_mean"] = None
  assert float(asdnet.after_validation(updated, nan_summary).validation_dice) == pytest.approx(0.7)


def test_a_few_train_steps_draw_sequences_and_update_both_networks(released_states):
  state = released_states[True]
  step = jax.jit(asdnet.train_step)
  counts = []
  first = state
  for t in range(6):
    state, metrics = step(state, _batch(), jax.random.key(20 + t))
    counts.append(float(metrics["labeled_sub_batches"]))
    assert all(np.isfinite(float(v)) for v in metrics.values())
  assert len(set(counts)) > 1  # the L/U sequence is drawn per step
  assert int(state.seg.step) == int(state.confidence.step) == 6
  for net in ("seg", "confidence"):
    before, after = jax.tree.leaves(getattr(first, net).params), jax.tree.leaves(
        getattr(state, net).params)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
  assert float(metrics["learning_rate"]) == pytest.approx(2e-3)
  assert float(metrics["learning_rate_confidence"]) == pytest.approx(1e-4)


def test_released_config_and_its_errors(released_states):
  c = asdnet.released_config()
  assert (c.preset, c.lambda_adv, c.lambda_semi, c.sub_batches, c.labeled_probability,
          tuple(c.aux_weights), c.released_fix_dice_backward) == (
              "released", 0.05, 0.5, 3, 0.5, (0.4, 0.2), False)
  assert c.model.name == "hrres_segnet_ds" and c.confidence.decoder == "as_coded"
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay,
          c.optimizer.decay_every, c.optimizer.decay_factor) == ("adam", 2e-3, 0.0, 10000, 0.1)
  assert (c.confidence_optimizer.name, c.confidence_optimizer.learning_rate,
          c.confidence_optimizer.weight_decay) == ("adam", 1e-4, 0.0)
  config = _config()
  config.data.batch_unlabeled = 6
  with pytest.raises(DataError, match="data.batch_labeled"):
    asdnet.check_config(config)
  config = _config()
  config.data.batch_labeled = config.data.batch_unlabeled = 4
  with pytest.raises(DataError, match="sub_batches"):
    asdnet.check_config(config)
  config = _config()
  config.method.model = small_config(asdnet).method.model  # svnet: no deep supervision
  with pytest.raises(DataError, match="method.model.name"):
    asdnet.init(jax.random.key(0), config, _batch())
