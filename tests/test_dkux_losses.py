"""Tests of the DKUXNet losses in jaxseg.losses: NumPy references, the anchor sampler's rule, the contrastive
loss against a naive double loop at fixed anchors, stop-gradient and finite-difference gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxseg import losses

# ---------------------------------------------------------------------------------------------------
# NumPy references.


def _np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _np_monai_dice_per_class(logits, labels, smooth_nr=1e-5, smooth_dr=1e-5):
  """(B, K) Dice losses, written out voxel by voxel."""
  probs = _np_softmax(logits.astype(np.float64))
  batch, num_classes = logits.shape[0], logits.shape[-1]
  p = probs.reshape(batch, -1, num_classes)
  y = labels.reshape(batch, -1)
  out = np.zeros((batch, num_classes))
  for b in range(batch):
    for k in range(num_classes):
      inter = sum(p[b, v, k] for v in range(p.shape[1]) if y[b, v] == k)
      out[b, k] = 1.0 - (2.0 * inter + smooth_nr) / (p[b, :, k].sum() + (y[b] == k).sum() + smooth_dr)
  return out


def _np_ce(logits, labels):
  logp = np.log(_np_softmax(logits.astype(np.float64)))
  flat = logp.reshape(-1, logits.shape[-1])
  return -np.mean(flat[np.arange(flat.shape[0]), labels.reshape(-1)])


def _np_contrastive(e, f, idx, cls, temperature, negatives, include_positive, similarity):
  """Naive double loop over the anchors; e, f: (B, V, F), idx, cls: (B, M)."""
  total, count = 0.0, 0
  for b in range(idx.shape[0]):
    ea, fa = e[b, idx[b]].astype(np.float64), f[b, idx[b]].astype(np.float64)
    if similarity == "cosine":
      ea = ea / np.maximum(np.linalg.norm(ea, axis=-1, keepdims=True), 1e-12)
      fa = fa / np.maximum(np.linalg.norm(fa, axis=-1, keepdims=True), 1e-12)
    m = idx.shape[1]
    for i in range(m):
      negs = [j for j in range(m) if j != i and (negatives == "all" or cls[b, j] != cls[b, i])]
      if not negs:
        continue
      den = negs + ([i] if include_positive else [])
      s = lambda j: ea[i] @ fa[j] / temperature  # noqa: E731
      total += -np.log(np.exp(s(i)) / sum(np.exp(s(j)) for j in den))
      count += 1
  return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------
# monai_dice_ce_loss.


@pytest.mark.parametrize("num_classes", [2, 3])
def test_monai_dice_ce_matches_numpy(num_classes):
  rng = np.random.default_rng(num_classes)
  logits = rng.normal(size=(2, 3, 4, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(2, 3, 4))
  expected = _np_monai_dice_per_class(logits, labels).mean() + _np_ce(logits, labels)
  got = losses.monai_dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_monai_dice_absent_class_with_empty_prediction_is_about_zero():
  labels = np.array([[[0, 1, 1, 0], [0, 0, 1, 1]]])  # class 2 absent
  logits = np.zeros((1, 2, 4, 3), np.float32)
  logits[..., 2] = -30.0  # Σ p_2 ≈ 8·e^-30 ≈ 7.5e-13
  per_class = _np_monai_dice_per_class(logits, labels)
  # 1 − 1e-5 / (7.5e-13 + 1e-5) ≈ 7.5e-8: an empty prediction of an absent class costs nothing ...
  assert 0.0 < per_class[0, 2] < 1e-7
  # ... whereas a class present in the labels keeps a large loss at these uniform logits.
  assert per_class[0, 1] > 0.3
  expected = per_class.mean() + _np_ce(logits, labels)
  got = losses.monai_dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # A non-empty prediction of the absent class gives d ≈ 1 for it.
  logits[..., 2] = 0.0
  assert _np_monai_dice_per_class(logits, labels)[0, 2] > 0.999


def test_monai_dice_ce_gradient_matches_finite_differences(x64):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 3, 3, 3)), jnp.float64)
  labels = jnp.asarray(rng.integers(0, 3, size=(2, 3, 3)))
  fn = jax.jit(lambda x: losses.monai_dice_ce_loss(x, labels))
  check_grads(fn, (logits,), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


def test_monai_dice_ce_rejects_one_class():
  with pytest.raises(ValueError, match="K ≥ 2"):
    losses.monai_dice_ce_loss(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2), jnp.int32))


# ---------------------------------------------------------------------------------------------------
# Query distributions.


def test_group_probabilities_matches_numpy():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(2, 3, 2, 6)).astype(np.float32)
  r = _np_softmax(q.astype(np.float64))
  expected = np.stack([r[..., :2].sum(-1), r[..., 2:3].sum(-1), r[..., 3:].sum(-1)], -1)
  got = losses.group_probabilities(jnp.asarray(q), (2, 1, 3))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)
  released = losses.group_probabilities(jnp.zeros((1, 2, 128)), (16, 4, 108))
  np.testing.assert_allclose(np.asarray(released[0, 0]), [16 / 128, 4 / 128, 108 / 128], rtol=1e-6)
  with pytest.raises(ValueError, match="sum to"):
    losses.group_probabilities(jnp.zeros((1, 2, 6)), (2, 2))


def test_query_distribution_loss_matches_numpy_and_clips():
  rng = np.random.default_rng(2)
  d = _np_softmax(rng.normal(size=(2, 4, 3)))
  d[0, 0] = [0.0, 0.0, 1.0]  # label 0 has D = 0: clipped to 1e-6
  labels = rng.integers(0, 3, size=(2, 4))
  labels[0, 0] = 0
  clipped = np.clip(d, 1e-6, 1.0)
  expected = -np.mean([np.log(clipped[b, v, labels[b, v]]) for b in range(2) for v in range(4)])
  got = losses.query_distribution_loss(jnp.asarray(d, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  assert np.isfinite(float(got))
  grad = jax.grad(losses.query_distribution_loss)(jnp.asarray(d, jnp.float32), jnp.asarray(labels))
  assert np.isfinite(np.asarray(grad)).all() and float(grad[0, 0, 0]) == 0.0


def test_released_query_distribution_loss_matches_numpy_and_clamps_labels():
  rng = np.random.default_rng(3)
  d = _np_softmax(rng.normal(size=(2, 5, 3)))
  labels = rng.integers(0, 5, size=(2, 5))  # 3 and 4 are clamped to group 2
  labels[0, :2] = [3, 4]
  clamped = np.minimum(labels, 2)
  expected = -np.mean([sum(np.log(d[b, v, clamped[b, v]]) for v in range(5)) for b in range(2)])
  got = losses.released_query_distribution_loss(jnp.asarray(d, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  assert np.isfinite(float(got))
  # Released behaviour, no ε: a zero probability anywhere poisons the sum.
  d[0, 0] = [0.0, 0.5, 0.5]
  poisoned = losses.released_query_distribution_loss(jnp.asarray(d, jnp.float32), jnp.asarray(labels))
  assert not np.isfinite(float(poisoned))


# ---------------------------------------------------------------------------------------------------
# stratified_anchors.

_anchors = jax.jit(losses.stratified_anchors, static_argnums=2)


def _class_map():
  """Sample 0: 20 of 40 voxels foreground (plentiful); 1: 3 foreground (short for M/2 = 8);
  2: all background (class 1 absent); 3: all foreground (class 0 absent)."""
  c = np.zeros((4, 40), np.int32)
  c[0, ::2] = 1
  c[1, [5, 17, 30]] = 1
  c[3] = 1
  return c


def test_stratified_anchors_rule():
  c = _class_map()
  idx, cls = map(np.asarray, _anchors(jax.random.PRNGKey(0), jnp.asarray(c), 16))
  assert idx.shape == cls.shape == (4, 16) and idx.dtype == cls.dtype == np.int32
  np.testing.assert_array_equal(cls, np.take_along_axis(c, idx, 1))
  # Plentiful: 8 / 8, all distinct.
  assert (cls[0] == 1).sum() == 8 and len(set(idx[0])) == 16
  # Short class 1 (3 voxels for 8 slots): every voxel at least once, the rest with replacement.
  fg = idx[1][cls[1] == 1]
  assert len(fg) == 8 and set(fg) == {5, 17, 30}
  assert len(set(idx[1][cls[1] == 0])) == 8
  # One class absent: all 16 from the other, without replacement.
  assert (cls[2] == 0).all() and len(set(idx[2])) == 16
  assert (cls[3] == 1).all() and len(set(idx[3])) == 16


def test_stratified_anchors_deterministic_and_key_dependent():
  c = jnp.asarray(_class_map())
  a = np.asarray(_anchors(jax.random.PRNGKey(5), c, 16)[0])
  b = np.asarray(_anchors(jax.random.PRNGKey(5), c, 16)[0])
  other = np.asarray(_anchors(jax.random.PRNGKey(6), c, 16)[0])
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, other)
  np.testing.assert_array_equal(a, np.asarray(losses.stratified_anchors(jax.random.PRNGKey(5), c, 16)[0]))


def test_stratified_anchors_more_anchors_than_voxels():
  c = jnp.asarray([[0, 1, 0, 1, 1]])
  idx, cls = map(np.asarray, _anchors(jax.random.PRNGKey(1), c, 8))
  assert (cls[0] == 0).sum() == 4 and set(idx[0][cls[0] == 0]) == {0, 2}
  assert set(idx[0][cls[0] == 1]) == {1, 3, 4}


# ---------------------------------------------------------------------------------------------------
# Contrastive loss.

_CASES = [
    dict(negatives="other_class", include_positive_in_denominator=False, similarity="cosine"),
    dict(negatives="all", include_positive_in_denominator=False, similarity="cosine"),
    dict(negatives="other_class", include_positive_in_denominator=True, similarity="cosine"),
    dict(negatives="all", include_positive_in_denominator=True, similarity="dot"),
]


def _contrastive_inputs():
  rng = np.random.default_rng(4)
  e = rng.uniform(size=(3, 4, 5, 2))  # probability-like 2-vectors, 20 voxels
  f = rng.uniform(size=(3, 4, 5, 2))
  idx = np.stack([rng.choice(20, 6, replace=False) for _ in range(3)])
  cls = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 1]])  # sample 1: one class
  return e, f, idx, cls


@pytest.mark.parametrize("case", range(len(_CASES)))
def test_contrastive_loss_at_matches_naive_loop(case):
  opts = _CASES[case]
  e, f, idx, cls = _contrastive_inputs()
  expected = _np_contrastive(e.reshape(3, 20, 2), f.reshape(3, 20, 2), idx, cls, 0.1, opts["negatives"],
                             opts["include_positive_in_denominator"], opts["similarity"])
  got = losses.contrastive_loss_at(jnp.asarray(e, jnp.float32), jnp.asarray(f, jnp.float32),
                                   jnp.asarray(idx), jnp.asarray(cls), temperature=0.1, **opts)
  np.testing.assert_allclose(float(got), expected, rtol=2e-5)


def test_contrastive_loss_single_class_sample_has_zero_weight():
  e, f, idx, cls = _contrastive_inputs()
  call = functools.partial(losses.contrastive_loss_at, temperature=0.1)
  full = call(jnp.asarray(e, jnp.float32), jnp.asarray(f, jnp.float32), jnp.asarray(idx), jnp.asarray(cls))
  keep = [0, 2]
  without = call(jnp.asarray(e[keep], jnp.float32), jnp.asarray(f[keep], jnp.float32),
                 jnp.asarray(idx[keep]), jnp.asarray(cls[keep]))
  np.testing.assert_allclose(float(full), float(without), rtol=1e-6)
  alone = call(jnp.asarray(e[1:2], jnp.float32), jnp.asarray(f[1:2], jnp.float32), jnp.asarray(idx[1:2]),
               jnp.asarray(cls[1:2]))
  assert float(alone) == 0.0
  assert np.all(np.asarray(jax.grad(lambda x: call(x, jnp.asarray(f[1:2]), jnp.asarray(idx[1:2]),
                                                    jnp.asarray(cls[1:2])))(jnp.asarray(e[1:2]))) == 0.0)


def test_contrastive_gradients(x64):
  e, f, idx, cls = _contrastive_inputs()
  e, f = jnp.asarray(e, jnp.float64), jnp.asarray(f, jnp.float64)
  idx, cls = jnp.asarray(idx), jnp.asarray(cls)
  fn = jax.jit(lambda a, b: losses.contrastive_loss_at(a, b, idx, cls, temperature=0.5,
                                                       include_positive_in_denominator=True))
  peer_grad = jax.grad(fn, argnums=1)(e, f)
  assert np.all(np.asarray(peer_grad) == 0.0)
  check_grads(lambda a: fn(a, f), (e,), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_voxel_contrastive_loss_uses_stratified_anchors():
  rng = np.random.default_rng(5)
  feats = jnp.asarray(rng.uniform(size=(2, 4, 5, 2)), jnp.float32)
  peer = jnp.asarray(rng.uniform(size=(2, 4, 5, 2)), jnp.float32)
  classes = jnp.asarray(rng.integers(0, 2, size=(2, 4, 5)))
  key = jax.random.PRNGKey(3)
  got = jax.jit(functools.partial(losses.voxel_contrastive_loss, num_anchors=8))(key, feats, peer, classes)
  idx, cls = losses.stratified_anchors(key, classes.reshape(2, -1), 8)
  np.testing.assert_allclose(float(got), float(losses.contrastive_loss_at(feats, peer, idx, cls)), rtol=1e-6)
  assert np.isfinite(float(got))
  with pytest.raises(ValueError, match="negatives"):
    losses.voxel_contrastive_loss(key, feats, peer, classes, negatives="same")
