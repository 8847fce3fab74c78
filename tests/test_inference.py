"""Tests of jaxseg.inference: the reference window grid, the fake-network outputs of DTC and SSL4MIS
`test_single_case` (golden files), batch-size invariance, Gaussian weighting, 2D, compilation reuse,
input pytrees (per-voxel fields windowed alike, per-case entries broadcast) and mirror test-time
augmentation.

Tolerances: averaged probabilities atol 1e-6 (float32; jnp vs torch sigmoid/softmax differ by an ulp);
label maps and window grids exactly.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_golden
from jaxseg import inference, postprocess

WINDOW_CASES = [
    "v100x120x70_p112x112x80_s18_4",
    "v112x112x80_p112x112x80_s18_4",
    "v15x40x9_p16x16x12_s16_12",
    "v183x140x88_p112x112x80_s18_4",
    "v40x33x25_p16x16x12_s7_5",
]

# ---------------------------------------------------------------------------------------------------
# Fake networks of the golden files (tests/golden/README: "Sliding-window inference"), jittable.


def _patch_cosines(patch_size, frequencies=(1, 1, 1)):
  """cos(π f_a n_a / (P_a − 1)) per axis, float32, broadcastable to (*patch)."""
  factors = []
  for axis, (size, freq) in enumerate(zip(patch_size, frequencies)):
    index = jnp.arange(size, dtype=jnp.float32)
    shape = [1] * len(patch_size)
    shape[axis] = size
    factors.append(jnp.cos(np.float32(math.pi * freq) * index / (size - 1)).reshape(shape))
  return factors


def dtc_fake_probs(windows):
  """(B, px, py, pz, 1) -> σ(4·tanh(x) + 2·cos·cos·cos − 0.5), (B, px, py, pz, 1)."""
  x = windows[..., 0]
  cos_i, cos_j, cos_k = _patch_cosines(x.shape[1:])
  logit = 4 * jnp.tanh(x) + 2 * cos_i * cos_j * cos_k - 0.5
  return jax.nn.sigmoid(logit)[..., None]


def ssl4mis_fake_probs(windows, num_classes):
  """(B, px, py, pz, 1) -> (B, px, py, pz, C) softmax over c of the logits

  (c − 1)·2·tanh(x) + cos(π(c+1)i/(px−1))·cos(πj/(py−1))·cos(π(c+1)k/(pz−1)).
  """
  x = windows[..., 0]
  logits = []
  for c in range(num_classes):
    cos_i, cos_j, cos_k = _patch_cosines(x.shape[1:], (c + 1, 1, c + 1))
    logits.append((c - 1) * 2 * jnp.tanh(x) + cos_i * cos_j * cos_k)
  return jax.nn.softmax(jnp.stack(logits, axis=-1), axis=-1)


def _golden_strides(case):
  stride_xy, stride_z = int(case["in_stride_xy"]), int(case["in_stride_z"])
  return (stride_xy, stride_xy, stride_z)


def _naive_sliding_window(predict_fn, volume, patch_size, strides, weight=None):
  """Loop-over-windows NumPy reference: pad, add weight·p and weight window by window, divide, crop."""
  starts, pad_width = inference.window_starts(volume.shape[:-1], patch_size, strides)
  padded = np.pad(volume, (*pad_width, (0, 0)))
  weight = np.ones(patch_size, np.float32) if weight is None else np.asarray(weight)
  totals, counts = None, np.zeros(padded.shape[:-1], np.float32)
  for start in starts:
    region = tuple(slice(s, s + p) for s, p in zip(start, patch_size))
    probs = np.asarray(predict_fn(jnp.asarray(padded[region][None])))[0]
    if totals is None:
      totals = np.zeros((*padded.shape[:-1], probs.shape[-1]), np.float32)
    totals[region] += weight[..., None] * probs
    counts[region] += weight
  crop = tuple(slice(left, left + size) for (left, _), size in zip(pad_width, volume.shape[:-1]))
  return (totals / counts[..., None])[crop]


# ---------------------------------------------------------------------------------------------------
# Window grid.


@pytest.mark.parametrize("name", WINDOW_CASES)
def test_window_starts_matches_reference(name):
  case = load_golden(f"dtc_sliding_window_windows__{name}")
  volume_shape = tuple(case["in_volume_shape"])
  patch_size = tuple(case["in_patch_size"])
  strides = (int(case["in_stride_xy"]),) * 2 + (int(case["in_stride_z"]),)
  starts, pad_width = inference.window_starts(volume_shape, patch_size, strides)

  np.testing.assert_array_equal(starts, case["out_window_starts"])
  np.testing.assert_array_equal(np.array(pad_width), case["out_pad_width"])
  padded_shape = [s + left + right for s, (left, right) in zip(volume_shape, pad_width)]
  np.testing.assert_array_equal(padded_shape, case["out_padded_shape"])
  windows_per_axis = [len(np.unique(starts[:, a])) for a in range(3)]
  np.testing.assert_array_equal(windows_per_axis, case["out_n_windows_per_axis"])
  assert len(starts) == np.prod(case["out_n_windows_per_axis"])


def test_window_starts_la_size_gives_45_windows():
  starts, pad_width = inference.window_starts((183, 140, 88), (112, 112, 80), (18, 18, 4))
  assert starts.shape == (45, 3) and pad_width == ((0, 0),) * 3


def test_window_starts_2d():
  starts, pad_width = inference.window_starts((10, 5), (4, 8), (3, 2))
  # Axis 0: n = ceil(6/3) + 1 = 3 starts 0, 3, 6; axis 1 padded 5 -> 8 by (1, 2): one start.
  np.testing.assert_array_equal(starts, [[0, 0], [3, 0], [6, 0]])
  assert pad_width == ((0, 0), (1, 2))


def test_window_starts_rejects_bad_arguments():
  with pytest.raises(ValueError):
    inference.window_starts((10, 10, 10), (4, 4), (2, 2, 2))
  with pytest.raises(ValueError):
    inference.window_starts((10, 10), (4, 4), (0, 2))


# ---------------------------------------------------------------------------------------------------
# Golden outputs of the reference test_single_case with fake networks.


@pytest.mark.parametrize("name", ["small", "padded"])
def test_dtc_test_single_case(name):
  case = load_golden(f"dtc_test_single_case__{name}")
  image = case["in_image"][..., None]
  scores = inference.sliding_window_predict(dtc_fake_probs, image, tuple(case["in_patch_size"]),
                                            _golden_strides(case), batch_size=8)
  assert scores.shape == (*image.shape[:-1], 1) and scores.dtype == jnp.float32
  # Reference quirk: num_classes = 2 with a one-channel net broadcasts the same sigmoid into both channels.
  for channel in range(2):
    np.testing.assert_allclose(np.asarray(scores[..., 0]), case["out_score_map"][..., channel], rtol=0,
                               atol=1e-6)
  labels = postprocess.probabilities_to_labels(scores)
  np.testing.assert_array_equal(np.asarray(labels), case["out_label_map"])


@pytest.mark.parametrize("name", ["c3", "c2_padded"])
def test_ssl4mis_test_single_case(name):
  case = load_golden(f"ssl4mis_test_single_case__{name}")
  num_classes = int(case["in_num_classes"])
  image = case["in_image"][..., None]
  scores = inference.sliding_window_predict(lambda w: ssl4mis_fake_probs(w, num_classes), image,
                                            tuple(case["in_patch_size"]), _golden_strides(case),
                                            batch_size=8)
  assert scores.shape == (*image.shape[:-1], num_classes)
  np.testing.assert_allclose(np.asarray(scores.sum(-1)), 1.0, atol=1e-6)
  labels = postprocess.probabilities_to_labels(scores)
  np.testing.assert_array_equal(np.asarray(labels), case["out_label_map"])


# ---------------------------------------------------------------------------------------------------
# Properties.


def test_batch_size_invariance_and_naive_loop():
  case = load_golden("dtc_test_single_case__padded")
  image = case["in_image"][..., None]
  patch, strides = tuple(case["in_patch_size"]), _golden_strides(case)
  expected = _naive_sliding_window(dtc_fake_probs, image, patch, strides)
  for batch_size in (1, 3, 8):
    scores = inference.sliding_window_predict(dtc_fake_probs, image, patch, strides, batch_size=batch_size)
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=0, atol=1e-6, err_msg=f"B={batch_size}")


def test_gaussian_weighting_of_constant_prediction_is_constant():
  volume = np.random.default_rng(0).normal(size=(21, 18, 13, 1)).astype(np.float32)
  constant = jnp.array([0.3, 0.7], jnp.float32)

  def predict_constant(windows):
    return jnp.broadcast_to(constant, (*windows.shape[:-1], 2))

  scores = inference.sliding_window_predict(predict_constant, volume, (8, 8, 6), (5, 5, 4), batch_size=4,
                                            gaussian=True)
  np.testing.assert_allclose(np.asarray(scores), np.broadcast_to(constant, scores.shape), atol=1e-6)


def test_gaussian_weighting_matches_naive_loop():
  volume = np.random.default_rng(1).normal(size=(17, 15, 1)).astype(np.float32)
  patch, strides = (8, 6), (3, 4)

  def predict(windows):
    return jax.nn.sigmoid(windows * jnp.arange(windows.shape[2], dtype=jnp.float32)[:, None])

  weight = inference.gaussian_importance_map(patch, 0.125)
  assert weight.shape == patch and float(weight.max()) <= 1.0 and float(weight.min()) > 0
  expected = _naive_sliding_window(predict, volume, patch, strides, weight)
  scores = inference.sliding_window_predict(predict, volume, patch, strides, batch_size=4, gaussian=True)
  np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-6, atol=1e-6)
  uniform = inference.sliding_window_predict(predict, volume, patch, strides, batch_size=4)
  assert not np.allclose(np.asarray(scores), np.asarray(uniform), atol=1e-4)


def test_2d_with_padding_matches_naive_loop():
  image = np.random.default_rng(2).normal(size=(11, 30, 2)).astype(np.float32)  # axis 0 padded to 16.
  patch, strides = (16, 12), (4, 5)

  def predict(windows):  # position-dependent, 3 classes.
    rows = jnp.arange(patch[0], dtype=jnp.float32)[:, None, None] / patch[0]
    logits = jnp.stack([windows[..., 0], windows[..., 1] * rows[..., 0], rows[..., 0] + 0 * windows[..., 0]],
                       axis=-1)
    return jax.nn.softmax(logits, axis=-1)

  expected = _naive_sliding_window(predict, image, patch, strides)
  scores = inference.sliding_window_predict(predict, image, patch, strides, batch_size=3)
  assert scores.shape == (11, 30, 3)
  np.testing.assert_allclose(np.asarray(scores), expected, rtol=0, atol=1e-6)


def test_one_compilation_per_shape_and_weights_are_traced():
  """New volumes or new weights (bound via Partial) of the same shape reuse the compiled function."""

  def apply_probs(params, windows):
    return jax.nn.sigmoid(params["scale"] * windows + params["bias"])

  rng = np.random.default_rng(3)
  volumes = [rng.normal(size=(9, 10, 7, 1)).astype(np.float32) for _ in range(3)]
  params = [{"scale": jnp.float32(s), "bias": jnp.float32(-0.1 * s)} for s in (1.0, 2.0, 3.0)]
  compiled_before = inference.sliding_window_jit(3)._cache_size()
  for volume, p in zip(volumes, params):
    scores = inference.sliding_window_predict(jax.tree_util.Partial(apply_probs, p), volume, (6, 6, 4),
                                              (3, 3, 2), batch_size=4)
    expected = _naive_sliding_window(lambda w: apply_probs(p, w), volume, (6, 6, 4), (3, 3, 2))
    np.testing.assert_allclose(np.asarray(scores), expected, atol=1e-6)
  assert inference.sliding_window_jit(3)._cache_size() == compiled_before + 1


def test_shape_buckets_share_one_compilation_and_change_nothing():
  """Volumes of 4 sizes (one needing the reference's padding) padded into one 16-voxel bucket: one
  compilation, and bit for bit the probabilities of the exact-shape runs."""

  def apply_probs(params, windows):
    return jax.nn.sigmoid(params["scale"] * windows + params["bias"])

  p = {"scale": jnp.float32(1.5), "bias": jnp.float32(-0.2)}
  fn = jax.tree_util.Partial(apply_probs, p)
  rng = np.random.default_rng(4)
  shapes = [(13, 11, 9), (16, 12, 10), (14, 15, 12), (5, 16, 9)]  # x = 5 < patch 6: padded to 6.
  volumes = [rng.normal(size=(*shape, 1)).astype(np.float32) for shape in shapes]
  compiled_before = inference.sliding_window_jit(3)._cache_size()
  for volume in volumes:
    bucketed = inference.sliding_window_predict(fn, volume, (6, 6, 4), (3, 4, 2), batch_size=4,
                                                shape_bucket=16)
    assert bucketed.shape == (*volume.shape[:-1], 1)
    expected = _naive_sliding_window(lambda w: apply_probs(p, w), volume, (6, 6, 4), (3, 4, 2))
    np.testing.assert_allclose(np.asarray(bucketed), expected, atol=1e-6)
    exact = inference.sliding_window_predict(fn, volume, (6, 6, 4), (3, 4, 2), batch_size=4)
    np.testing.assert_array_equal(np.asarray(bucketed), np.asarray(exact))
  # 1 bucketed (16, 16, 16) + 4 exact shapes.
  assert inference.sliding_window_jit(3)._cache_size() == compiled_before + 5
  assert inference.bucket_shape((13, 16, 17), 16) == (16, 16, 32)
  assert inference.bucket_shape((13, 16, 17), 0) == (13, 16, 17)


def test_sliding_window_rejects_bad_shapes():
  volume = np.zeros((8, 8, 8, 1), np.float32)
  with pytest.raises(ValueError):
    inference.sliding_window_predict(dtc_fake_probs, volume[..., 0], (4, 4, 4), (2, 2, 2))
  with pytest.raises(ValueError):  # Wrong output spatial shape.
    inference.sliding_window_predict(lambda w: w[:, :2], volume, (4, 4, 4), (2, 2, 2))


# ---------------------------------------------------------------------------------------------------
# Input pytrees and mirroring.


def _naive_inputs_window(predict_fn, inputs, per_case, patch_size, strides, weight=None,
                         mirror_axes=()):
  """Loop-over-windows NumPy reference for dict inputs: every per-voxel entry padded and cut alike,
  per-case entries given a batch axis; with `mirror_axes`, each window's probabilities are the mean
  over every subset of those axes (the empty one first) of the flipped-back predictions."""
  spatial = next(iter(inputs.values())).shape[:len(patch_size)]
  starts, pad_width = inference.window_starts(spatial, patch_size, strides)
  padded = {k: np.pad(v, (*pad_width, *[(0, 0)] * (v.ndim - len(patch_size)))) for k, v in inputs.items()}
  weight = np.ones(patch_size, np.float32) if weight is None else np.asarray(weight)
  subsets = [()] + [c for r in range(1, len(mirror_axes) + 1)
                    for c in itertools.combinations(mirror_axes, r)]
  totals, counts = None, np.zeros(tuple(s + l + r for s, (l, r) in zip(spatial, pad_width)), np.float32)
  for start in starts:
    region = tuple(slice(s, s + p) for s, p in zip(start, patch_size))
    window = {k: v[region][None] for k, v in padded.items()}
    predictions = []
    for axes in subsets:
      flip = tuple(1 + a for a in axes)
      flipped = {k: np.flip(v, flip) for k, v in window.items()}
      probs = np.asarray(predict_fn({**flipped, **{k: np.asarray(v)[None] for k, v in per_case.items()}}))
      predictions.append(np.flip(probs, flip)[0])
    probs = sum(predictions[1:], predictions[0]) / len(predictions)
    if totals is None:
      totals = np.zeros((*counts.shape, probs.shape[-1]), np.float32)
    totals[region] += weight[..., None] * probs
    counts[region] += weight
  crop = tuple(slice(left, left + size) for (left, _), size in zip(pad_width, spatial))
  return (totals / counts[..., None])[crop]


def _position_dependent(inputs):
  """Not flip-equivariant: a ramp along every window axis, the image, a per-voxel prior, a
  (..., 2)-valued field and the per-case mask; 2 classes."""
  image = inputs["image"][..., 0]
  ramp = sum(jnp.arange(n, dtype=jnp.float32).reshape([n if i == a else 1 for i in range(image.ndim - 1)])
             / n * (a + 1) for a, n in enumerate(image.shape[1:]))
  mask = inputs["modality_mask"].astype(jnp.float32)  # (B, C)
  logit = (image * ramp + inputs["prior"] - 0.5 * inputs["vector"][..., 1]
           + mask[:, 1].reshape((-1,) + (1,) * (image.ndim - 1)))
  return jax.nn.softmax(jnp.stack([jnp.zeros_like(logit), logit], axis=-1), axis=-1)


def _inputs_case(shape, seed=5):
  rng = np.random.default_rng(seed)
  return ({"image": rng.normal(size=(*shape, 1)).astype(np.float32),
           "prior": rng.uniform(size=shape).astype(np.float32),
           "vector": rng.normal(size=(*shape, 2)).astype(np.float32)},
          {"modality_mask": np.array([True, False, True])})


def test_inputs_dict_windows_every_field_alike_and_broadcasts_per_case():
  inputs, per_case = _inputs_case((13, 9, 7))  # x = 13 < 16: every field padded alike.
  patch, strides = (16, 6, 4), (5, 2, 3)
  seen = {}

  def predict(window_inputs):
    seen.update(jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), window_inputs))
    return _position_dependent(window_inputs)

  scores = inference.sliding_window_predict(predict, inputs, patch, strides, per_case=per_case,
                                            batch_size=3, shape_bucket=8)
  assert seen == {"image": ((3, *patch, 1), jnp.float32), "prior": ((3, *patch), jnp.float32),
                  "vector": ((3, *patch, 2), jnp.float32), "modality_mask": ((3, 3), jnp.bool_)}
  expected = _naive_inputs_window(_position_dependent, inputs, per_case, patch, strides)
  assert scores.shape == (13, 9, 7, 2)
  np.testing.assert_allclose(np.asarray(scores), expected, rtol=0, atol=1e-6)


def test_mirroring_averages_the_flipped_back_predictions():
  """Exactly nnU-Net's mirroring: one window (the whole volume), flips along axes 0 and 2."""
  inputs, per_case = _inputs_case((6, 5, 4), seed=6)
  patch = (6, 5, 4)
  scores = inference.sliding_window_predict(_position_dependent, inputs, patch, patch,
                                            per_case=per_case, batch_size=2, mirror_axes=(0, 2))
  batch = {**{k: v[None] for k, v in inputs.items()}, **{k: v[None] for k, v in per_case.items()}}

  def flipped(axes):  # Prediction of the input flipped along `axes`, flipped back.
    flip = tuple(1 + a for a in axes)
    x = {k: (np.flip(v, flip) if k in inputs else v) for k, v in batch.items()}
    return np.flip(np.asarray(_position_dependent(x)), flip)[0]

  by_hand = (flipped(()) + flipped((0,)) + flipped((2,)) + flipped((0, 2))) / 4
  assert not np.allclose(flipped(()), flipped((0,)), atol=1e-3)  # Not flip-equivariant.
  np.testing.assert_allclose(np.asarray(scores), by_hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize("gaussian", [False, True])
def test_mirroring_with_overlapping_windows_matches_naive_loop(gaussian):
  inputs, per_case = _inputs_case((11, 10, 9), seed=7)
  patch, strides = (6, 6, 4), (3, 4, 2)
  weight = inference.gaussian_importance_map(patch) if gaussian else None
  expected = _naive_inputs_window(_position_dependent, inputs, per_case, patch, strides, weight,
                                  mirror_axes=(0, 1, 2))
  scores = inference.sliding_window_predict(_position_dependent, inputs, patch, strides,
                                            per_case=per_case, batch_size=4, gaussian=gaussian,
                                            mirror_axes=(0, 1, 2))
  np.testing.assert_allclose(np.asarray(scores), expected, rtol=0, atol=1e-6)
  plain = inference.sliding_window_predict(_position_dependent, inputs, patch, strides,
                                           per_case=per_case, batch_size=4, gaussian=gaussian)
  assert not np.allclose(np.asarray(scores), np.asarray(plain), atol=1e-4)


def test_mirroring_off_changes_nothing_bit_for_bit():
  case = load_golden("dtc_test_single_case__padded")
  image = case["in_image"][..., None]
  patch, strides = tuple(case["in_patch_size"]), _golden_strides(case)
  default = inference.sliding_window_predict(dtc_fake_probs, image, patch, strides, batch_size=3)
  off = inference.sliding_window_predict(dtc_fake_probs, image, patch, strides, batch_size=3,
                                         mirror_axes=())
  as_dict = inference.sliding_window_predict(lambda x: dtc_fake_probs(x["image"]), {"image": image},
                                             patch, strides, batch_size=3, mirror_axes=[],
                                             per_case={"modality_mask": np.ones(1, bool)})
  np.testing.assert_array_equal(np.asarray(off), np.asarray(default))
  np.testing.assert_array_equal(np.asarray(as_dict), np.asarray(default))
  np.testing.assert_array_equal(np.asarray(postprocess.probabilities_to_labels(off)),
                                case["out_label_map"])


def test_mirror_combinations_follow_nnunet_order():
  assert inference.mirror_combinations((0, 1, 2)) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2),
                                                      (0, 1, 2)]
  assert inference.mirror_combinations(()) == []


def test_inputs_and_mirror_axes_are_checked():
  inputs, per_case = _inputs_case((8, 8, 8))
  with pytest.raises(ValueError, match="mirror_axes"):
    inference.sliding_window_predict(_position_dependent, inputs, (4, 4, 4), (2, 2, 2),
                                     per_case=per_case, mirror_axes=(0, 3))
  with pytest.raises(ValueError, match="mirror_axes"):
    inference.sliding_window_predict(_position_dependent, inputs, (4, 4, 4), (2, 2, 2),
                                     per_case=per_case, mirror_axes=(1, 1))
  with pytest.raises(ValueError, match="spatial axes"):
    inference.sliding_window_predict(_position_dependent, {**inputs, "prior": np.zeros((8, 8, 7))},
                                     (4, 4, 4), (2, 2, 2), per_case=per_case)
  with pytest.raises(ValueError, match="also per-voxel"):
    inference.sliding_window_predict(_position_dependent, inputs, (4, 4, 4), (2, 2, 2),
                                     per_case={"prior": np.ones(())})
  with pytest.raises(ValueError, match="per_case"):
    inference.sliding_window_predict(dtc_fake_probs, inputs["image"], (4, 4, 4), (2, 2, 2),
                                     per_case=per_case)
