"""Training volumes on the device: rotation, flip and crop inside the jitted step.

The host pipeline (`batches.TwoStreamBatches`) rotates, flips and crops every sample in NumPy and
copies the batch to the device each step. Here the volumes are stacked once (zero-padded to a common
shape) and live on the device; per step the host draws the same random numbers as the host pipeline
(a few integers per sample: which volume, which rotation/flip, where the window starts) and the device
cuts the windows. The batches are bit-identical to `TwoStreamBatches.batch_at(step)`.

How: `np.rot90(v, k, axes=(0, 1))` followed by `np.flip(., a)` is a transpose of axes 0 and 1 (odd k)
and a reversal of some axes. A crop of the transformed volume is therefore the same transform applied
to a window of the original volume, whose start the host computes (`plan_batch`). The device takes the
window with `lax.dynamic_slice` and applies the transform statically, in one of 9 branches (4 rotations
x 2 flip axes, and the identity when augmentation is off) chosen by `lax.switch`.

Limitation: with augmentation on, a volume that needs the reference's padding (an axis not larger
than the patch) requires patch[0] == patch[1], so that padding commutes with the rotation;
`stack_volumes` refuses otherwise (the host pipeline handles that case). Foreground oversampling
(`data.foreground_oversample > 0`) needs each label on the host after augmentation, so
`plan_batch` and `DeviceData` refuse it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.data import augment
from jaxseg.data.base import Case, DataError
from jaxseg.data.batches import Batch, TwoStreamBatches

IDENTITY = 8  # Branch of augmentation off; branches 0..7 are 2 * k + flip_axis.


def transform(k: int, flip_axis: Optional[int], ndim: int) -> tuple[tuple[int, ...], tuple[bool, ...]]:
  """(perm, reverse) with flip(rot90(v, k, axes=(0, 1)), flip_axis) == reversed(v.transpose(perm)).

  Axis j of the result is axis perm[j] of v, read backwards where reverse[j]. flip_axis None: no flip.
  """
  perm, reverse = list(range(ndim)), [False] * ndim
  for _ in range(k % 4):  # np.rot90(m, 1, axes=(0, 1)) == np.flip(np.swapaxes(m, 0, 1), 0).
    perm[0], perm[1] = perm[1], perm[0]
    reverse[0], reverse[1] = reverse[1], reverse[0]
    reverse[0] = not reverse[0]
  if flip_axis is not None:
    reverse[flip_axis] = not reverse[flip_axis]
  return tuple(perm), tuple(reverse)


def _branch_transform(branch: int, ndim: int):
  if branch == IDENTITY:
    return transform(0, None, ndim)
  return transform(branch // 2, branch % 2, ndim)


def window_start(shape: Sequence[int], perm: Sequence[int], reverse: Sequence[bool],
                 offset: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
  """Start, in the original volume of spatial `shape`, of the window that the transform maps onto
  the crop at `offset` of the transformed volume."""
  start = [0] * len(shape)
  for j, source in enumerate(perm):
    start[source] = (shape[source] - offset[j] - patch[j]) if reverse[j] else offset[j]
  return tuple(start)


@dataclasses.dataclass
class VolumeStack:
  """Volumes zero-padded (at the end of each axis) to one shape, field by field.

  Attributes:
    arrays: "image" (N, *max_shape, C) float32; "label" (N, *max_shape) uint8 (int32 if a class
      index exceeds 255), only when labeled; every per-voxel field of the cases (N, *max_shape,
      ...); "modality_mask" (N, C) bool (not spatial: indexed, never cropped).
    shapes: (N, d) spatial shapes after the reference padding (what the windows may cover).
  """
  arrays: dict[str, np.ndarray]
  shapes: np.ndarray

  @property
  def images(self) -> np.ndarray:
    return self.arrays["image"]

  @property
  def labels(self) -> Optional[np.ndarray]:
    return self.arrays.get("label")


def stack_volumes(cases: Sequence[Case], patch: Sequence[int], *, pad_to_patch: bool,
                  augment_on: bool, with_labels: bool) -> VolumeStack:
  """Stacks `cases` (reference crop padding applied) for the device."""
  patch = tuple(int(p) for p in patch)
  ndim = len(patch)
  per_case, shapes = [], []
  for case in cases:
    arrays = {"image": case.image.astype(np.float32, copy=False)}
    if with_labels:
      arrays["label"] = case.label
    arrays.update(case.fields)
    spatial = case.image.shape[:ndim]
    widths = augment.crop_padding(spatial, patch) if pad_to_patch else (0,) * ndim
    if any(widths) and augment_on and patch[0] != patch[1]:
      raise DataError(f"{case.source}: case {case.case_id!r} needs padding to the patch {patch}, "
                      "which the device-resident data support only for patch[0] == patch[1] "
                      "(config data.on_device = False uses the host pipeline)")
    if not pad_to_patch and any(s < p for s, p in zip(spatial, patch)):
      raise DataError(f"{case.source}: patch {patch} is larger than the volume {tuple(spatial)} "
                      "and padding is off (config data.pad_to_patch)")
    if any(widths):
      arrays = {name: np.pad(a, [(w, w) for w in widths] + [(0, 0)] * (a.ndim - ndim))
                for name, a in arrays.items()}
    per_case.append(arrays)
    shapes.append(arrays["image"].shape[:ndim])
  shapes = np.asarray(shapes, np.int64)
  top = shapes.max(axis=0)

  def padded(a):
    return np.pad(a, [(0, int(t - s)) for t, s in zip(top, a.shape[:ndim])]
                  + [(0, 0)] * (a.ndim - ndim))

  stacked = {name: np.stack([padded(arrays[name]) for arrays in per_case]) for name in per_case[0]}
  if with_labels:
    # uint8 where the classes fit (a quarter of the memory); `assemble` casts crops to int32.
    dtype = np.uint8 if max(int(a["label"].max(initial=0)) for a in per_case) < 256 else np.int32
    stacked["label"] = stacked["label"].astype(dtype)
  stacked["modality_mask"] = np.stack([case.present for case in cases])
  return VolumeStack(stacked, shapes)


def _refuse_oversampling(batches: TwoStreamBatches) -> None:
  """The device pipeline cannot centre crops on foreground voxels (it never sees the labels)."""
  if batches.foreground_oversample > 0:
    raise DataError(f"config data.foreground_oversample = {batches.foreground_oversample} needs the "
                    "host pipeline (data.on_device = False)")


def plan_batch(batches: TwoStreamBatches, shapes_l: np.ndarray, shapes_u: np.ndarray,
               step: int) -> dict[str, np.ndarray]:
  """The random draws of batch `step`, as `batches.batch_at(step)` makes them, without the crops.

  Returns int32 arrays: index_l, branch_l (B_l,), start_l (B_l, d), and the same for `_u`.

  Raises:
    DataError: `batches` oversamples the foreground (the host pipeline only).
  """
  _refuse_oversampling(batches)
  patch = batches.patch_size
  out = {}
  streams = (("l", batches.labeled_indices(step), shapes_l, 0),
             ("u", batches.unlabeled_indices(step), shapes_u, batches.batch_labeled))
  for name, indices, shapes, first_slot in streams:
    branch, start = [], []
    for slot, i in enumerate(indices):
      rng = batches.sample_rng(step, first_slot + slot)
      shape = tuple(int(s) for s in shapes[i])
      if batches.augment:
        k, axis = augment.draw_rot_flip(rng)
        b = 2 * k + axis
      else:
        b = IDENTITY
      perm, reverse = _branch_transform(b, len(patch))
      offset = augment.draw_crop_offsets(tuple(shape[p] for p in perm), patch, rng)
      branch.append(b)
      start.append(window_start(shape, perm, reverse, offset, patch))
    out[f"index_{name}"] = np.asarray(indices, np.int32)
    out[f"branch_{name}"] = np.asarray(branch, np.int32)
    out[f"start_{name}"] = np.asarray(start, np.int32).reshape(len(indices), len(patch))
  return out


def _crop(stack: jax.Array, index: jax.Array, branch: jax.Array, start: jax.Array,
          patch: tuple[int, ...]) -> jax.Array:
  """One sample: the window of volume `index` at `start`, transformed by `branch`."""
  ndim = len(patch)
  trailing = stack.shape[1 + ndim:]  # (C,) for images, () for labels.

  def make(b):
    perm, reverse = _branch_transform(b, ndim)
    size = [0] * ndim
    for j, source in enumerate(perm):
      size[source] = patch[j]

    def cut(stack, index, start):
      corner = (index, *[start[a] for a in range(ndim)]) + (0,) * len(trailing)
      window = jax.lax.dynamic_slice(stack, corner, (1, *size, *trailing))[0]
      window = jnp.transpose(window, (*perm, *range(ndim, ndim + len(trailing))))
      flips = tuple(a for a in range(ndim) if reverse[a])
      return jnp.flip(window, flips) if flips else window
    return cut

  return jax.lax.switch(branch, [make(b) for b in range(IDENTITY + 1)], stack, index, start)


def assemble(stacks: dict, plan: dict, patch: Sequence[int]) -> Batch:
  """The batch of `plan` cut from device-resident stacks (jittable; a Python loop over the samples,
  so that each `lax.switch` runs one branch).

  Args:
    stacks: {"labeled": VolumeStack.arrays, "unlabeled": VolumeStack.arrays or None}, on device.
    plan: `plan_batch`'s draws of one batch.
    patch: the crop size.
  """
  patch = tuple(int(p) for p in patch)

  def stream(arrays, name, empty):
    count = plan[f"index_{name}"].shape[0]
    if not count:
      return empty
    out = {}
    for field, stack in arrays.items():
      index = plan[f"index_{name}"]
      if field == "modality_mask":  # Per sample, not spatial.
        out[field] = stack[index]
        continue
      out[field] = jnp.stack([_crop(stack, index[i], plan[f"branch_{name}"][i],
                                    plan[f"start_{name}"][i], patch) for i in range(count)])
    if "label" in out:
      out["label"] = out["label"].astype(jnp.int32)
    return out

  labeled = stacks["labeled"]
  # The 0-sample unlabeled stream: the labeled stream's fields without the label.
  empty_u = {field: jnp.zeros((0, *a.shape[1:]), a.dtype) if field == "modality_mask" else
             jnp.zeros((0, *patch, *a.shape[1 + len(patch):]), a.dtype)
             for field, a in labeled.items() if field != "label"}
  return Batch(labeled=stream(labeled, "l", None),
               unlabeled=stream(stacks.get("unlabeled"), "u", empty_u))


class DeviceData:
  """The training volumes on the devices (replicated) and the host-side planner of the batches.

  Use in place of iterating `batches`: `next_plan()` advances `batches` like `next(batches)` does,
  so checkpoints record the same iterator state and a resumed run continues the same sequence.
  """

  def __init__(self, batches: TwoStreamBatches, sharding: jax.sharding.Sharding):
    _refuse_oversampling(batches)  # Before stacking the volumes.
    kw = dict(pad_to_patch=batches.pad_to_patch, augment_on=batches.augment)
    labeled = stack_volumes(batches.labeled, batches.patch_size, with_labels=True, **kw)
    self.batches = batches
    self.shapes_l = labeled.shapes
    self.shapes_u = np.zeros((0, len(batches.patch_size)), np.int64)
    stacks = {"labeled": labeled.arrays, "unlabeled": None}
    if batches.unlabeled:
      unlabeled = stack_volumes(batches.unlabeled, batches.patch_size, with_labels=False, **kw)
      self.shapes_u, stacks["unlabeled"] = unlabeled.shapes, unlabeled.arrays
    self.arrays = jax.device_put(stacks, sharding)
    self.nbytes = sum(a.nbytes for a in jax.tree.leaves(stacks))

  def next_plan(self) -> dict[str, np.ndarray]:
    plan = plan_batch(self.batches, self.shapes_l, self.shapes_u, self.batches.step)
    self.batches.step += 1
    return plan
