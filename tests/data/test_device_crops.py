"""Device-resident crops equal the host pipeline's batches bit for bit."""

import jax
import numpy as np
import pytest

from jaxseg.data import device_crops
from jaxseg.data.base import Case, DataError
from jaxseg.data.batches import TwoStreamBatches


@pytest.mark.parametrize("ndim", [2, 3])
def test_transform_is_rot90_then_flip(ndim):
  v = np.random.default_rng(0).standard_normal((5, 7, 3)[:ndim] + (2,))
  for k in range(4):
    for axis in (None, 0, 1):
      perm, reverse = device_crops.transform(k, axis, ndim)
      expected = np.rot90(v, k, axes=(0, 1))
      if axis is not None:
        expected = np.flip(expected, axis)
      got = np.transpose(v, (*perm, ndim))
      got = np.flip(got, tuple(a for a in range(ndim) if reverse[a])) if any(reverse) else got
      np.testing.assert_array_equal(got, expected)


def test_window_start_maps_a_crop_back_to_the_original_volume():
  v = np.arange(6 * 9 * 4).reshape(6, 9, 4)
  patch, offset = (3, 3, 2), (2, 1, 1)
  for k in range(4):
    for axis in (0, 1):
      perm, reverse = device_crops.transform(k, axis, 3)
      moved = np.flip(np.rot90(v, k, axes=(0, 1)), axis)
      crop = moved[tuple(slice(o, o + p) for o, p in zip(offset, patch))]
      start = device_crops.window_start(v.shape, perm, reverse, offset, patch)
      size = [patch[perm.index(a)] for a in range(3)]
      window = v[tuple(slice(s, s + n) for s, n in zip(start, size))]
      window = np.transpose(window, perm)
      window = np.flip(window, tuple(a for a in range(3) if reverse[a])) if any(reverse) else window
      np.testing.assert_array_equal(window, crop)


def _cases(shapes, labeled=True, seed=0):
  rng = np.random.default_rng(seed)
  return [Case(f"c{i}", rng.standard_normal((*s, 2)).astype(np.float32),
               rng.integers(0, 3, s).astype(np.uint8) if labeled else None, (1.0,) * len(s))
          for i, s in enumerate(shapes)]


@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("patch, shapes", [
    ((8, 8, 6), [(12, 10, 9), (9, 14, 7), (8, 11, 6), (13, 9, 10)]),  # Two need the padding rule.
    ((6, 5), [(9, 11), (10, 7), (12, 12)]),  # 2D, non-square patch, no padding.
])
def test_device_batches_equal_host_batches(augment, patch, shapes):
  labeled, unlabeled = _cases(shapes), _cases(shapes[::-1], labeled=False, seed=1)
  batches = TwoStreamBatches(labeled, unlabeled, batch_labeled=2, batch_unlabeled=3,
                             patch_size=patch, seed=5, augment=augment)
  kw = dict(pad_to_patch=True, augment_on=augment)
  stack_l = device_crops.stack_volumes(labeled, patch, with_labels=True, **kw)
  stack_u = device_crops.stack_volumes(unlabeled, patch, with_labels=False, **kw)
  on_device = jax.device_put({"labeled": stack_l.arrays, "unlabeled": stack_u.arrays})
  assemble = jax.jit(device_crops.assemble, static_argnums=(2,))
  branches = set()
  for step in range(6):
    plan = device_crops.plan_batch(batches, stack_l.shapes, stack_u.shapes, step)
    branches.update(plan["branch_l"].tolist() + plan["branch_u"].tolist())
    got = jax.device_get(assemble(on_device, plan, patch))
    want = batches.batch_at(step)
    assert got.labeled["label"].dtype == want.labeled["label"].dtype == np.int32
    assert jax.tree.structure(got) == jax.tree.structure(want)
    flat_got, flat_want = (jax.tree_util.tree_flatten_with_path(b)[0] for b in (got, want))
    for (path, got_leaf), (want_path, want_leaf) in zip(flat_got, flat_want, strict=True):
      assert path == want_path
      np.testing.assert_array_equal(got_leaf, want_leaf, err_msg=f"{path} {step}")
  # Six batches of five samples exercise several branches (augmentation on) or the identity only.
  assert len(branches) >= 4 if augment else branches == {device_crops.IDENTITY}


def test_no_unlabeled_stream():
  labeled = _cases([(10, 10, 8), (11, 9, 8)])
  batches = TwoStreamBatches(labeled, [], batch_labeled=2, batch_unlabeled=0, patch_size=(8, 8, 6),
                             seed=0)
  stack = device_crops.stack_volumes(labeled, (8, 8, 6), pad_to_patch=True, augment_on=True,
                                     with_labels=True)
  plan = device_crops.plan_batch(batches, stack.shapes, np.zeros((0, 3), np.int64), 3)
  got = device_crops.assemble({"labeled": stack.arrays, "unlabeled": None}, plan, (8, 8, 6))
  assert got.unlabeled["image"].shape == (0, 8, 8, 6, 2)
  np.testing.assert_array_equal(got.labeled["image"], batches.batch_at(3).labeled["image"])


def test_padding_with_a_non_square_patch_and_rotation_is_refused():
  with pytest.raises(DataError, match="data.on_device"):
    device_crops.stack_volumes(_cases([(6, 12, 8)]), (8, 6, 6), pad_to_patch=True,
                               augment_on=True, with_labels=True)
  device_crops.stack_volumes(_cases([(6, 12, 8)]), (8, 6, 6), pad_to_patch=True,
                             augment_on=False, with_labels=True)  # Without rotation it is fine.
