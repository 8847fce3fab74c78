"""Tests of jaxseg.geometry: the jitted exact EDT and DTC `compute_sdf` (golden outputs, SciPy /
skimage on random masks, properties, jit / vmap). The largest connected component: test_postprocess.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage import segmentation

from conftest import load_golden
from jaxseg import geometry
from jaxseg.geometry import reference_compute_sdf

# ---------------------------------------------------------------------------------------------------
# Signed distance map (docs/methods/dtc.md): exact EDT in JAX.

SDF_CASES = ["blobs", "border", "single_voxel", "empty_and_blob"]
SDF_ATOL = 1e-5  # float32 computation against the float64 reference

# (B, *spatial) shapes: non-cubic, and axes of size 1 and 2.
RANDOM_SHAPES = [(2, 9, 14, 5), (3, 1, 12, 7), (2, 2, 11, 6), (3, 13, 21), (2, 1, 9), (2, 2, 15)]


def spatial_axes(shape) -> tuple[int, ...]:
  return tuple(range(1, len(shape)))


@functools.partial(jax.jit, static_argnames=("axes", "block_elements"))
def jitted_sdt(target, axes=None, block_elements=geometry.DEFAULT_BLOCK_ELEMENTS):
  return geometry.squared_distance_transform(target, axes, block_elements=block_elements)


jitted_sdf = jax.jit(geometry.signed_distance_map)
jitted_inner_boundary = jax.jit(geometry.inner_boundary, static_argnames="axes")


def scipy_squared_distances(target: np.ndarray) -> np.ndarray:
  """Exact integer squared distances to the nearest True element, from SciPy's nearest-feature indices."""
  indices = ndimage.distance_transform_edt(~target, return_distances=False, return_indices=True)
  grid = np.indices(target.shape)
  return np.sum((indices - grid).astype(np.int64) ** 2, axis=0)



def random_masks(shape, seed: int) -> np.ndarray:
  """One mask per sample, cycling through sparse points, a smooth blob and a dense field."""
  rng = np.random.default_rng(seed)
  masks = []
  for b in range(shape[0]):
    kind = (b + seed) % 3
    if kind == 0:
      mask = rng.random(shape[1:]) < 0.06
    elif kind == 1:
      mask = ndimage.gaussian_filter(rng.standard_normal(shape[1:]), 1.5) > 0.1
    else:
      mask = rng.random(shape[1:]) < 0.85
    mask.flat[rng.integers(mask.size)] = True  # every sample has a target (SciPy needs one)
    masks.append(mask)
  return np.stack(masks)


def blob_masks(shape=(3, 20, 17, 12), seed=0) -> np.ndarray:
  """Smooth blobs with an interior (non-boundary) foreground and a background in every sample."""
  rng = np.random.default_rng(seed)
  field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape[1:]), 2.5) for _ in range(shape[0])])
  masks = field > 0.0
  assert all(m.any() and not m.all() and ndimage.binary_erosion(m).any() for m in masks)
  return masks


@pytest.mark.parametrize("name", SDF_CASES)
def test_signed_distance_map_matches_reference(name):
  case = load_golden(f"dtc_compute_sdf__{name}")
  sdf = jitted_sdf(case["in_mask"])
  assert sdf.dtype == jnp.float32 and sdf.shape == case["out_sdf"].shape
  np.testing.assert_allclose(np.asarray(sdf), case["out_sdf"], rtol=0, atol=SDF_ATOL)


@pytest.mark.parametrize("shape", RANDOM_SHAPES)
def test_squared_distance_transform_equals_scipy_exactly(shape):
  target = random_masks(shape, seed=len(shape) + shape[1])
  squared = np.asarray(jitted_sdt(target, axes=spatial_axes(shape)))
  expected = np.stack([scipy_squared_distances(t) for t in target])
  assert squared.dtype == np.float32
  np.testing.assert_array_equal(squared, expected.astype(np.float32))
  np.testing.assert_array_equal(squared.astype(np.int64), expected)


@pytest.mark.parametrize("shape", RANDOM_SHAPES)
def test_signed_distance_map_matches_transcribed_reference(shape):
  mask = random_masks(shape, seed=2 * shape[-1] + 1)
  expected = reference_compute_sdf(mask.astype(np.uint8))
  assert not np.isnan(expected).any()
  np.testing.assert_allclose(np.asarray(jitted_sdf(mask)), expected, rtol=0, atol=SDF_ATOL)


def test_squared_distance_transform_in_blocks_equals_scipy():
  # Passes along axes 1 (n = 9, 70 lines per sample) and 3 (n = 5, 126 lines): blocks of 4 and 15 lines of
  # both samples, several lax.map steps, the last block padded.
  target = random_masks((2, 9, 14, 5), seed=3)
  blocked = jitted_sdt(target, axes=(1, 2, 3), block_elements=2 * 4 * 9 * 9 + 5)
  expected = np.stack([scipy_squared_distances(t) for t in target])
  np.testing.assert_array_equal(np.asarray(blocked).astype(np.int64), expected)


@pytest.mark.parametrize("block_elements", [geometry.DEFAULT_BLOCK_ELEMENTS, 30])
def test_squared_distance_transform_batch_axes_and_empty_samples(block_elements):
  target = np.zeros((5, 3, 6), bool)  # samples are target[:, s, :] (axes 0 and 2)
  target[1, 0, 4] = True
  target[4, 0, 0] = True  # sample 0: two points
  target[2, 2, 3] = True  # sample 2: one point; sample 1 has none
  squared = np.asarray(jitted_sdt(target, axes=(0, 2), block_elements=block_elements))
  for s in (0, 2):
    np.testing.assert_array_equal(squared[:, s, :], scipy_squared_distances(target[:, s, :]))
  assert np.isposinf(squared[:, 1, :]).all()
  # Default axes: the whole array is one sample.
  np.testing.assert_array_equal(np.asarray(jitted_sdt(target)), scipy_squared_distances(target))


def test_squared_distance_transform_hand_computed():
  target = np.zeros((4, 5), bool)
  target[0, 0] = True
  expected = np.add.outer(np.arange(4) ** 2, np.arange(5) ** 2)  # (i - 0)^2 + (j - 0)^2
  np.testing.assert_array_equal(np.asarray(jitted_sdt(target)), expected)
  # Numeric input: nonzero is a target.
  np.testing.assert_array_equal(np.asarray(jitted_sdt(target.astype(np.int32) * 7)), expected)


def test_min_plus_pass_is_exact_at_the_size_limit():
  # The longest line allowed, (n - 1)^2 < 2^23: sums _FAR + (i - j)^2 < 2^24 stay exact in float32.
  n = 2897
  line = np.full((1, n), geometry.MAX_SQUARED_EXTENT, np.float32)
  line[0, 0] = 0.0
  line[0, 1000] = 5.0
  min_plus_pass = geometry._min_plus_pass  # pylint: disable=protected-access
  out = np.asarray(jax.jit(lambda g: min_plus_pass(g, 1, 2 ** 20))(line))
  i = np.arange(n, dtype=np.int64)
  np.testing.assert_array_equal(out[0].astype(np.int64), np.minimum(i ** 2, 5 + (i - 1000) ** 2))


def test_squared_distance_transform_rejects_shapes_beyond_exactness():
  def trace(shape, axes=None):  # shapes only: nothing is allocated
    return jax.eval_shape(functools.partial(geometry.squared_distance_transform, axes=axes),
                          jax.ShapeDtypeStruct(shape, jnp.bool_))

  assert trace((2897,)).shape == (2897,)  # (n - 1)^2 = 2896^2 < 2^23
  assert trace((3, 1673, 1673, 1673), axes=(1, 2, 3)).dtype == jnp.float32  # 3 * 1672^2 < 2^23
  with pytest.raises(ValueError, match="exact"):
    trace((2898,))
  with pytest.raises(ValueError, match="exact"):
    trace((3, 1674, 1674, 1674), axes=(1, 2, 3))
  with pytest.raises(ValueError, match="repeated"):
    trace((3, 4), axes=(1, -1))
  with pytest.raises(ValueError, match="out of range"):
    trace((3, 4), axes=(2,))


@pytest.mark.parametrize("shape", [(2, 9, 14, 5), (3, 1, 12, 7), (2, 2, 15)])
def test_inner_boundary_equals_skimage(shape):
  mask = random_masks(shape, seed=5)
  boundary = np.asarray(jitted_inner_boundary(mask, axes=spatial_axes(shape)))
  expected = np.stack([segmentation.find_boundaries(m, mode="inner") for m in mask])
  np.testing.assert_array_equal(boundary, expected)


def test_inner_boundary_array_edge_is_not_background():
  mask = np.ones((3, 4), bool)
  mask[2, 3] = False
  expected = np.zeros((3, 4), bool)
  expected[1, 3] = expected[2, 2] = True  # only the face neighbours of the one background pixel
  np.testing.assert_array_equal(np.asarray(jitted_inner_boundary(mask)), expected)


def test_signed_distance_map_properties():
  mask = blob_masks()
  sdf = np.asarray(jitted_sdf(mask))
  boundary = np.stack([segmentation.find_boundaries(m, mode="inner") for m in mask])
  interior = mask & ~boundary
  assert (sdf[interior] < 0).all() and (sdf[~mask] > 0).all() and (sdf[boundary] == 0).all()
  assert sdf.min() >= -1 and sdf.max() <= 1
  for b in range(mask.shape[0]):  # each side reaches its extreme (the deepest / farthest voxel)
    assert np.isclose(sdf[b].min(), -1, rtol=0, atol=1e-6)
    assert np.isclose(sdf[b].max(), 1, rtol=0, atol=1e-6)
    deepest = np.unravel_index(np.argmax(ndimage.distance_transform_edt(mask[b])), mask[b].shape)
    assert sdf[b][deepest] == sdf[b].min()


def test_signed_distance_map_degenerate_samples():
  mask = blob_masks((4, 20, 17, 12), seed=1).astype(np.int32)
  mask[0] = 0  # empty: zeros, as the reference
  mask[2] = 1  # full: the reference gives NaN, jaxseg zeros
  sdf = np.asarray(jitted_sdf(mask))
  expected = reference_compute_sdf(mask)
  assert (sdf[0] == 0).all() and (expected[0] == 0).all()
  assert (sdf[2] == 0).all() and np.isnan(expected[2]).all()
  np.testing.assert_allclose(sdf[[1, 3]], expected[[1, 3]], rtol=0, atol=SDF_ATOL)
  assert int(jax.jit(geometry.count_degenerate_masks)(mask)) == 1
  mask[0] = 2  # nonzero labels count as foreground
  count = jax.jit(geometry.count_degenerate_masks)(mask)
  assert count.dtype == jnp.int32 and count.shape == () and int(count) == 2
  assert int(jax.jit(geometry.count_degenerate_masks)(np.zeros((3, 4, 5), bool))) == 0


def test_signed_distance_map_under_jit_and_vmap_in_a_train_step_like_loss():
  labels = jnp.asarray(np.stack([blob_masks((2, 12, 10, 8), seed=s) for s in range(3)]).astype(np.int32))
  expected = np.stack([reference_compute_sdf(np.asarray(l)) for l in labels])

  @jax.jit
  def loss(level_set, label):  # DTC's L_LSF on labels that arrive as int32 inside the step
    sdf = jax.lax.stop_gradient(geometry.signed_distance_map(label))
    return jnp.mean((level_set - sdf) ** 2)

  level_set = jnp.zeros(labels.shape[1:], jnp.float32)
  np.testing.assert_allclose(float(loss(level_set, labels[0])), np.mean(expected[0] ** 2), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(loss)(level_set, labels[0]), -2 * expected[0] / expected[0].size,
                             rtol=1e-5, atol=1e-9)
  # vmap over an extra leading axis, with small blocks so lax.map itself is batched.
  vmapped = jax.jit(jax.vmap(functools.partial(geometry.signed_distance_map, block_elements=300)))
  np.testing.assert_allclose(np.asarray(vmapped(labels)), expected, rtol=0, atol=SDF_ATOL)
