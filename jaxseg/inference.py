"""Sliding-window inference over whole volumes (METHODS §1.6), jitted end to end.

The reference (`test_single_case` in DTC / UA-MT / SASSNet / SSL4MIS) zero-pads any axis that is smaller
than the patch, visits a regular grid of windows (x outer, ..., z inner), sums the per-window foreground
probabilities into a score map, divides by the per-voxel window count (so it *averages probabilities*),
crops the padding off and thresholds (one channel: `> 0.5`) or takes the argmax (several channels).

Here the window grid is computed on the host (`window_starts`) and passed to one jitted function as an
array (`sliding_window_predict`): the windows are cut with `lax.dynamic_slice`, evaluated in fixed-size
batches (the last batch is padded), and their probabilities and weights are accumulated on the device
with `lax.dynamic_update_slice` inside a `lax.fori_loop`. The volume is zero-padded into a buffer whose
shape may be rounded up (`shape_bucket`), so that volumes of different sizes share one compilation. Windows are added one at a time in the reference's visiting order, so with uniform
weights the result equals the reference's sequential sum for every batch size (up to the predict
function's own numerics).

Conventions: channels-last. A volume is (*spatial, C): (X, Y, Z, C) in 3D, (H, W, C) in 2D. Window
batches are (B, *patch, C); probabilities are (B, *patch, K).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "gaussian_importance_map",
    "bucket_shape",
    "probabilities_to_labels",
    "sliding_window_predict",
    "window_starts",
]

# Gaussian weights are floored here (relative to a peak of 1) so that no weight underflows to zero.
_MIN_GAUSSIAN_WEIGHT = 1e-30

PredictFn = Callable[[jax.Array], jax.Array]


def window_starts(
    volume_shape: Sequence[int],
    patch_size: Sequence[int],
    strides: Sequence[int],
) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
  """The reference window grid: where each window starts in the padded volume, and the padding.

  Rule (DTC `test_single_case`, per axis i, with S_i the volume size, P_i the patch, s_i the stride):

  * if S_i < P_i (strict), zero-pad by P_i − S_i, ⌊(P_i − S_i)/2⌋ on the left and the rest on the right;
    S_i is then the padded size;
  * n_i = ⌈(S_i − P_i)/s_i⌉ + 1 windows, window j starting at min(s_i·j, S_i − P_i);
  * visiting order: the first axis outermost, the last innermost (x, y, z nested loops).

  Args:
    volume_shape: spatial shape of the volume, (X, Y, Z) or (H, W) (no channel axis).
    patch_size: window size, one entry per spatial axis.
    strides: window step, one positive entry per spatial axis; the reference uses
      (stride_xy, stride_xy, stride_z), e.g. (18, 18, 4).

  Returns:
    starts: (K, d) int64, the start of every window in the *padded* volume, in visiting order.
    pad_width: ((left, right), ...) one pair per spatial axis, as for `np.pad` ((0, 0) where unpadded).

  Raises:
    ValueError: mismatched lengths, or a non-positive patch size or stride.
  """
  volume_shape = tuple(int(s) for s in volume_shape)
  patch_size = tuple(int(p) for p in patch_size)
  strides = tuple(int(s) for s in strides)
  if not len(volume_shape) == len(patch_size) == len(strides):
    raise ValueError(f"volume_shape {volume_shape}, patch_size {patch_size} and strides {strides} must have "
                     "one entry per spatial axis.")
  if min(patch_size) < 1 or min(strides) < 1:
    raise ValueError(f"patch_size {patch_size} and strides {strides} must be positive.")

  pad_width = []
  starts_per_axis = []
  for size, patch, stride in zip(volume_shape, patch_size, strides):
    shortfall = max(patch - size, 0)
    pad_width.append((shortfall // 2, shortfall - shortfall // 2))
    span = size + shortfall - patch  # >= 0: the last admissible start.
    num_windows = -(-span // stride) + 1  # ceil(span / stride) + 1
    starts_per_axis.append([min(stride * j, span) for j in range(num_windows)])

  grid = np.meshgrid(*starts_per_axis, indexing="ij")
  starts = np.stack([g.reshape(-1) for g in grid], axis=-1).astype(np.int64)
  return starts, tuple(pad_width)


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125) -> jax.Array:
  """nnU-Net-style importance weights for one window: a Gaussian centred on the patch, peak 1.

  σ_i = sigma_scale · P_i per axis, centred at (P_i − 1)/2 (the exact centre; nnU-Net centres on P_i//2 and
  truncates its Gaussian filter at 4σ, which differs by at most a half-voxel shift). Each 1-D profile is
  normalised to a maximum of 1, so the map peaks at 1 (exactly, for odd sizes). Weights are floored at
  1e-30 so that every voxel of a window keeps a positive weight (nnU-Net raises zeros to the smallest
  positive weight for the same reason).

  Args:
    patch_size: window size, one entry per spatial axis.
    sigma_scale: σ as a fraction of the patch size.

  Returns:
    (*patch_size,) float32 weights in (0, 1]. Built from 1-D profiles, so it is cheap inside `jit`.
  """
  if sigma_scale <= 0:
    raise ValueError(f"sigma_scale must be positive, got {sigma_scale}.")
  weights = jnp.ones((), jnp.float32)
  for axis, size in enumerate(patch_size):
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    profile = np.exp(-0.5 * (offsets / (sigma_scale * size))**2)
    profile = (profile / profile.max()).astype(np.float32)
    shape = [1] * len(patch_size)
    shape[axis] = size
    weights = weights * jnp.asarray(profile).reshape(shape)
  return jnp.maximum(weights, _MIN_GAUSSIAN_WEIGHT)


def bucket_shape(shape: Sequence[int], bucket: int) -> tuple[int, ...]:
  """`shape` rounded up per axis to a multiple of `bucket` (unchanged for bucket <= 1)."""
  if bucket <= 1:
    return tuple(int(s) for s in shape)
  return tuple(-(-int(s) // bucket) * bucket for s in shape)


def sliding_window_predict(
    predict_fn: PredictFn,
    volume: jax.Array,
    patch_size: Sequence[int],
    strides: Sequence[int],
    *,
    batch_size: int = 8,
    gaussian: bool = False,
    sigma_scale: float = 0.125,
    mesh: Optional[Mesh] = None,
    shape_bucket: int = 0,
) -> jax.Array:
  """Averaged per-voxel probabilities of a whole volume from overlapping windows (METHODS §1.6).

  Pads like the reference (`window_starts`), evaluates every window with `predict_fn` in batches of
  `batch_size` (the last batch padded with copies of a valid window whose results are discarded), sums
  weight·probability and the weights per voxel on the device, divides, and crops the padding off. With
  `gaussian=False` (the reference) all weights are 1, i.e. the result is Σ_windows p / count.

  Everything runs in one jitted function; there is no host round trip per window. The window grid
  is computed on the host and passed in as an array, so the compiled function depends on the shape
  of the buffer the volume is padded into, not on the grid: with `shape_bucket = q` the buffer is
  the (reference-padded) volume rounded up to multiples of q per axis, so that volumes of many sizes
  (LA: 78 shapes in 80 volumes) share a few compilations (q = 32: 4 for LA). The extra zeros are
  never inside a window (every window lies in the reference-padded volume), so the result does not
  depend on q. It is compiled once per (buffer shape, dtype, patch, batch_size, gaussian,
  sigma_scale, mesh, predict_fn). `predict_fn` is passed to `jit` as a pytree: a plain function is
  cached by identity, and a `jax.tree_util.Partial` has its bound arguments traced. For a model,
  pass `jax.tree_util.Partial(apply_probs, variables)` with a fixed (e.g. module-level)
  `apply_probs(variables, windows)`, so new weights reuse the compiled function instead of
  recompiling.

  Args:
    predict_fn: jittable `windows (B, *patch, C) -> probabilities (B, *patch, K)`; it must already apply
      the sigmoid / softmax (eval mode: no dropout, BN running averages). Called with B = batch_size.
    volume: (*spatial, C) image, e.g. (X, Y, Z, 1); any float dtype (windows keep it).
    patch_size: window size per spatial axis, e.g. (112, 112, 80).
    strides: window step per spatial axis, e.g. (18, 18, 4) for the LA scripts.
    batch_size: windows per `predict_fn` call.
    gaussian: weight each window by `gaussian_importance_map` (nnU-Net) instead of uniformly.
    sigma_scale: σ / patch size of the Gaussian weights.
    mesh: a 1-D device mesh over which each batch of windows is split (batch_size must be a multiple
      of its size; `predict_fn`'s arrays replicated on it); the score map stays replicated. None: the
      default placement (one device).
    shape_bucket: round the padded volume up to multiples of this per axis (0 or 1: exact shapes).

  Returns:
    (*spatial, K) float32 averaged probabilities, same spatial shape as `volume`.

  Raises:
    ValueError: `volume` is not (*spatial, C) with one spatial axis per patch entry, batch_size < 1, or
      `predict_fn` does not return (B, *patch, K).
  """
  # Host arrays are padded on the host (no device op compiled per shape).
  volume = volume if isinstance(volume, jax.Array) else np.asarray(volume)
  patch_size = tuple(int(p) for p in patch_size)
  strides = tuple(int(s) for s in strides)
  if volume.ndim != len(patch_size) + 1:
    raise ValueError(f"volume must be (*spatial, C) with {len(patch_size)} spatial axes to match patch_size "
                     f"{patch_size}; got shape {volume.shape}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if mesh is not None and batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} must be a multiple of the mesh's {mesh.size} devices.")
  if shape_bucket < 0:
    raise ValueError(f"shape_bucket must be >= 0, got {shape_bucket}.")
  if not isinstance(predict_fn, jax.tree_util.Partial):
    predict_fn = jax.tree_util.Partial(predict_fn)

  spatial_shape = volume.shape[:-1]
  starts, pad_width = window_starts(spatial_shape, patch_size, strides)
  padded_shape = tuple(s + left + right for s, (left, right) in zip(spatial_shape, pad_width))
  buffer_shape = bucket_shape(padded_shape, shape_bucket)
  # The table's length depends only on the buffer: the window count of the buffer's own grid bounds
  # the count of any volume that fits in it (it grows with the size on every axis).
  capacity = len(window_starts(buffer_shape, patch_size, strides)[0])
  table = np.zeros((math.ceil(capacity / batch_size) * batch_size, len(patch_size)), np.int32)
  table[:len(starts)] = starts  # Entries past the windows repeat window 0 and are never added.
  buffer_pad = [(left, right + b - p)
                for (left, right), p, b in zip(pad_width, padded_shape, buffer_shape)]
  buffer = (np if isinstance(volume, np.ndarray) else jnp).pad(volume, (*buffer_pad, (0, 0)))
  averaged = _sliding_window_predict(predict_fn, buffer, jnp.asarray(table), jnp.int32(len(starts)),
                                     patch_size=patch_size, batch_size=int(batch_size),
                                     gaussian=bool(gaussian), sigma_scale=float(sigma_scale),
                                     mesh=mesh)
  crop = tuple(slice(left, left + size) for (left, _), size in zip(pad_width, spatial_shape))
  return averaged[crop]


@functools.partial(jax.jit, static_argnames=("patch_size", "batch_size", "gaussian", "sigma_scale",
                                             "mesh"))
def _sliding_window_predict(
    predict_fn: jax.tree_util.Partial,
    padded: jax.Array,
    starts_table: jax.Array,
    num_windows: jax.Array,
    *,
    patch_size: tuple[int, ...],
    batch_size: int,
    gaussian: bool,
    sigma_scale: float,
    mesh: Optional[Mesh],
) -> jax.Array:
  """Jitted body of `sliding_window_predict`: the averaged probabilities over the whole buffer
  `padded` (*buffer, C) from the first `num_windows` windows of `starts_table` (0 where no window
  reaches)."""
  padded_shape, num_channels = padded.shape[:-1], padded.shape[-1]
  ndim = len(padded_shape)

  window_shape = (*patch_size, num_channels)
  probs_spec = jax.eval_shape(predict_fn, jax.ShapeDtypeStruct((batch_size, *window_shape), padded.dtype))
  if probs_spec.ndim != ndim + 2 or probs_spec.shape[:-1] != (batch_size, *patch_size):
    raise ValueError(f"predict_fn must map windows {(batch_size, *window_shape)} to probabilities "
                     f"{(batch_size, *patch_size)} + (K,); got {probs_spec.shape}.")
  num_classes = probs_spec.shape[-1]

  if gaussian:
    weight = gaussian_importance_map(patch_size, sigma_scale)[..., None]  # (*patch, 1)
  else:
    weight = jnp.ones((*patch_size, 1), jnp.float32)

  def cut_window(start):
    return lax.dynamic_slice(padded, (*(start[a] for a in range(ndim)), 0), window_shape)

  def accumulate_batch(batch_index, totals):
    """Adds one batch of windows to `totals` (*padded, K + 1): Σ weight·p in [..., :K], Σ weight in [..., K]."""
    first = batch_index * batch_size
    batch_starts = lax.dynamic_slice_in_dim(starts_table, first, batch_size)  # (B, d)
    windows = jax.vmap(cut_window)(batch_starts)
    if mesh is not None:  # Each device evaluates B / n windows; the sums are gathered back.
      windows = lax.with_sharding_constraint(windows, NamedSharding(mesh, PartitionSpec(mesh.axis_names)))
    probs = predict_fn(windows).astype(jnp.float32)  # (B, *patch, K)
    if mesh is not None:
      probs = lax.with_sharding_constraint(probs, NamedSharding(mesh, PartitionSpec()))
    contributions = jnp.concatenate(
        [probs * weight, jnp.broadcast_to(weight, (batch_size, *patch_size, 1))], axis=-1)

    def add_window(i, totals):
      corner = (*(batch_starts[i, a] for a in range(ndim)), 0)
      region = lax.dynamic_slice(totals, corner, (*patch_size, num_classes + 1))
      return lax.dynamic_update_slice(totals, region + contributions[i], corner)

    num_valid = jnp.minimum(batch_size, num_windows - first)
    return lax.fori_loop(0, num_valid, add_window, totals)

  totals = jnp.zeros((*padded_shape, num_classes + 1), jnp.float32)
  num_batches = (num_windows + batch_size - 1) // batch_size
  totals = lax.fori_loop(0, num_batches, accumulate_batch, totals)
  weights = totals[..., num_classes:]
  # Buffer voxels outside every window (the bucket's margin) have no weight: 0 there, not 0 / 0.
  return totals[..., :num_classes] / jnp.where(weights > 0, weights, 1.0)


def probabilities_to_labels(probs: jax.Array, threshold: float = 0.5) -> jax.Array:
  """The references' decision rule (METHODS §1.6) on (..., K) probabilities.

  * K = 1 (one sigmoid foreground channel): label = probs[..., 0] > threshold (strict, so exactly 0.5 is
    background).
  * K >= 2 (softmax): label = argmax over K, ties to the first (lowest) class; for K = 2 this is
    p₁ > p₀, i.e. p₁ > 0.5 with ties to background. `threshold` is ignored.

  Args:
    probs: (..., K) probabilities, e.g. the (X, Y, Z, K) output of `sliding_window_predict`.
    threshold: foreground threshold for K = 1.

  Returns:
    (...) int32 label map.
  """
  probs = jnp.asarray(probs)
  if probs.ndim < 1 or probs.shape[-1] < 1:
    raise ValueError(f"probs must be (..., K) with K >= 1; got shape {probs.shape}.")
  if probs.shape[-1] == 1:
    return (probs[..., 0] > threshold).astype(jnp.int32)
  return jnp.argmax(probs, axis=-1).astype(jnp.int32)
