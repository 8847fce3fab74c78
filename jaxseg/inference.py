"""Sliding-window inference over whole volumes (docs/evaluation.md, sliding window), jitted end to end.

The reference (`test_single_case` in DTC / UA-MT / SASSNet / SSL4MIS) zero-pads any axis that is smaller
than the patch, visits a regular grid of windows (x outer, ..., z inner), sums the per-window foreground
probabilities into a score map, divides by the per-voxel window count (so it *averages probabilities*),
crops the padding off and thresholds (one channel: `> 0.5`) or takes the argmax (several channels).

Here the window grid is computed on the host (`window_starts`) and passed to one jitted function as an
array (`sliding_window_predict`): the windows are cut with `lax.dynamic_slice`, evaluated in fixed-size
batches (the last batch is padded), and their probabilities and weights are accumulated on the device
with `lax.dynamic_update_slice` inside a `lax.fori_loop`. The volume is zero-padded into a buffer whose
shape may be rounded up (`shape_bucket`), so that volumes of different sizes share one
compilation. Windows are added one at a time in the reference's visiting order, so with uniform
weights the result equals the reference's sequential sum for every batch size (up to the predict
function's own numerics). Options beyond the reference, both off by default: nnU-Net's Gaussian
window weights (`gaussian`) and mirror test-time augmentation (`mirror_axes`).

Conventions: channels-last. A volume is (*spatial, C): (X, Y, Z, C) in 3D, (H, W, C) in 2D. Window
batches are (B, *patch, C); probabilities are (B, *patch, K). Besides the image, a case may bring
further per-voxel inputs (*spatial, ...), windowed alike, and per-case inputs (e.g. its modality
mask), passed to every window (`sliding_window_predict`).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxseg import compiler_options

__all__ = [
    "gaussian_importance_map",
    "bucket_shape",
    "check_mirror_axes",
    "mirror_combinations",
    "sliding_window_jit",
    "sliding_window_predict",
    "window_starts",
]

# Gaussian weights are floored here (relative to a peak of 1) so that no weight underflows to zero.
_MIN_GAUSSIAN_WEIGHT = 1e-30

ArrayLike = Union[jax.Array, np.ndarray]
# The image (*spatial, C), or per-voxel arrays by name {name: (*spatial, ...)}.
Inputs = Union[ArrayLike, Mapping[str, ArrayLike]]
# Window inputs -> probabilities (B, *patch, K); the window inputs are the image windows
# (B, *patch, C), or a dict {name: (B, *patch, ...) windows, name: (B, ...) per-case entries}.
PredictFn = Callable[[Any], jax.Array]


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
    inputs: Inputs,
    patch_size: Sequence[int],
    strides: Sequence[int],
    *,
    per_case: Optional[Mapping[str, ArrayLike]] = None,
    batch_size: int = 8,
    gaussian: bool = False,
    sigma_scale: float = 0.125,
    mirror_axes: Sequence[int] = (),
    mesh: Optional[Mesh] = None,
    shape_bucket: int = 0,
) -> jax.Array:
  """Averaged per-voxel probabilities of a whole volume from overlapping windows (docs/evaluation.md).

  Pads like the reference (`window_starts`), evaluates every window with `predict_fn` in batches of
  `batch_size` (the last batch padded with copies of a valid window whose results are discarded), sums
  weight·probability and the weights per voxel on the device, divides, and crops the padding off. With
  `gaussian=False` (the reference) all weights are 1, i.e. the result is Σ_windows p / count.

  Inputs. `inputs` is either one array (*spatial, C), the image, and then `predict_fn` is called on
  its windows (B, *patch, C); or a dict of per-voxel arrays {name: (*spatial, ...)} sharing the
  spatial shape (e.g. {"image": (*spatial, C), "prior": (*spatial,)}), and then `predict_fn` is
  called on the dict of their windows {name: (B, *patch, ...)} — the same window is cut from every
  entry — together with the per-case entries `per_case` {name: (...)}, which are not windowed but
  broadcast to (B, ...) (e.g. {"modality_mask": (C,) bool}). The reference padding and the shape
  buckets apply to every per-voxel entry alike (zeros).

  Mirroring (`mirror_axes`, nnU-Net's test-time augmentation): each window's probabilities are the
  average of `predict_fn` on the window and on its flips along every non-empty subset of these
  spatial axes, each flipped back (2^n predictions for n axes, added in nnU-Net's order: no flip,
  then the subsets by size). Every per-voxel entry is flipped; per-case entries are not. () (the
  default and the reference) calls `predict_fn` once per window.

  Everything runs in one jitted function; there is no host round trip per window. The window grid
  is computed on the host and passed in as an array, so the compiled function depends on the shape
  of the buffer the volume is padded into, not on the grid: with `shape_bucket = q` the buffer is
  the (reference-padded) volume rounded up to multiples of q per axis, so that volumes of many sizes
  (LA: 78 shapes in 80 volumes) share a few compilations (q = 32: 4 for LA). The extra zeros are
  never inside a window (every window lies in the reference-padded volume), so the result does not
  depend on q. It is compiled once per (input shapes and dtypes, buffer shape, patch, batch_size,
  gaussian, sigma_scale, mirror_axes, mesh, predict_fn). `predict_fn` is passed to `jit` as a
  pytree: a plain function is cached by identity, and a `jax.tree_util.Partial` has its bound
  arguments traced. For a model, pass `jax.tree_util.Partial(apply_probs, variables)` with a fixed
  (e.g. module-level) `apply_probs(variables, windows)`, so new weights reuse the compiled function
  instead of recompiling.

  Args:
    predict_fn: jittable `window inputs -> probabilities (B, *patch, K)` (window inputs as above); it
      must already apply the sigmoid / softmax (eval mode: no dropout, BN running averages). Called
      with B = batch_size.
    inputs: the image (*spatial, C), e.g. (X, Y, Z, 1), or a dict of per-voxel arrays
      {name: (*spatial, ...)}; any dtypes (windows keep them).
    patch_size: window size per spatial axis, e.g. (112, 112, 80).
    strides: window step per spatial axis, e.g. (18, 18, 4) for the LA scripts.
    per_case: per-case arrays {name: (...)} passed to every window, broadcast to (B, ...); only with
      dict `inputs`, names distinct from theirs.
    batch_size: windows per `predict_fn` call.
    gaussian: weight each window by `gaussian_importance_map` (nnU-Net) instead of uniformly.
    sigma_scale: σ / patch size of the Gaussian weights.
    mirror_axes: spatial axes (0-based, e.g. (0, 1, 2)) of the mirror test-time augmentation; ()
      for none.
    mesh: a 1-D device mesh over which each batch of windows is split (batch_size must be a multiple
      of its size; `predict_fn`'s arrays replicated on it); the score map stays replicated. None: the
      default placement (one device).
    shape_bucket: round the padded volume up to multiples of this per axis (0 or 1: exact shapes).

  Returns:
    (*spatial, K) float32 averaged probabilities, same spatial shape as the inputs.

  Raises:
    ValueError: an image that is not (*spatial, C) with one spatial axis per patch entry, per-voxel
      entries of different spatial shapes, per_case with an array image or a name of `inputs`,
      batch_size < 1, bad mirror_axes, or `predict_fn` not returning (B, *patch, K).
  """
  patch_size = tuple(int(p) for p in patch_size)
  strides = tuple(int(s) for s in strides)
  ndim = len(patch_size)
  # Host arrays are padded on the host (no device op compiled per shape).
  as_array = lambda x: x if isinstance(x, jax.Array) else np.asarray(x)
  if isinstance(inputs, Mapping):
    voxel_inputs = {str(k): as_array(v) for k, v in inputs.items()}
    if not voxel_inputs:
      raise ValueError("inputs must hold at least one per-voxel array.")
    spatial_shape = None
    for name, x in voxel_inputs.items():
      if x.ndim < ndim or (spatial_shape is not None and x.shape[:ndim] != spatial_shape):
        raise ValueError(f"input {name!r} of shape {x.shape} must be (*spatial, ...) with the "
                         f"{ndim} spatial axes of patch_size {patch_size} shared by all inputs "
                         f"{ {k: v.shape for k, v in voxel_inputs.items()} }.")
      spatial_shape = x.shape[:ndim]
    case_inputs = {str(k): as_array(v) for k, v in (per_case or {}).items()}
    clash = sorted(set(voxel_inputs) & set(case_inputs))
    if clash:
      raise ValueError(f"per_case names {clash} are also per-voxel inputs.")
  else:
    voxel_inputs = as_array(inputs)
    if voxel_inputs.ndim != ndim + 1:
      raise ValueError(f"volume must be (*spatial, C) with {ndim} spatial axes to match patch_size "
                       f"{patch_size}; got shape {voxel_inputs.shape}.")
    if per_case:
      raise ValueError("per_case inputs need a dict of per-voxel inputs, not a single image array.")
    spatial_shape = voxel_inputs.shape[:ndim]
    case_inputs = {}
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if mesh is not None and batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} must be a multiple of the mesh's {mesh.size} devices.")
  if shape_bucket < 0:
    raise ValueError(f"shape_bucket must be >= 0, got {shape_bucket}.")
  mirror_axes = check_mirror_axes(mirror_axes, ndim)
  if not isinstance(predict_fn, jax.tree_util.Partial):
    predict_fn = jax.tree_util.Partial(predict_fn)

  starts, pad_width = window_starts(spatial_shape, patch_size, strides)
  padded_shape = tuple(s + left + right for s, (left, right) in zip(spatial_shape, pad_width))
  buffer_shape = bucket_shape(padded_shape, shape_bucket)
  # The table's length depends only on the buffer: the window count of the buffer's own grid bounds
  # the count of any volume that fits in it (it grows with the size on every axis).
  capacity = len(window_starts(buffer_shape, patch_size, strides)[0])
  table = np.zeros((math.ceil(capacity / batch_size) * batch_size, ndim), np.int32)
  table[:len(starts)] = starts  # Entries past the windows repeat window 0 and are never added.
  buffer_pad = [(left, right + b - p)
                for (left, right), p, b in zip(pad_width, padded_shape, buffer_shape)]

  def pad(x):
    return (np if isinstance(x, np.ndarray) else jnp).pad(x, (*buffer_pad, *[(0, 0)] * (x.ndim - ndim)))

  buffers = jax.tree_util.tree_map(pad, voxel_inputs)
  arguments = (predict_fn, buffers, case_inputs, jnp.asarray(table), jnp.int32(len(starts)))
  static = dict(patch_size=patch_size, batch_size=int(batch_size), gaussian=bool(gaussian),
                sigma_scale=float(sigma_scale), mirror_axes=mirror_axes, mesh=mesh)
  try:
    averaged = sliding_window_jit(len(patch_size))(*arguments, **static)
  except ValueError as e:
    # Called inside the caller's own jit, which JAX does not let a nested jit give options to: the
    # caller's compilation decides them.
    if "top-level" not in str(e):
      raise
    averaged = sliding_window_jit(None)(*arguments, **static)
  crop = tuple(slice(left, left + size) for (left, _), size in zip(pad_width, spatial_shape))
  return averaged[crop]


def check_mirror_axes(mirror_axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  """`mirror_axes` as a tuple of distinct spatial axes in [0, ndim); ValueError otherwise."""
  try:
    axes = tuple(mirror_axes)
  except TypeError:
    axes = None
  if (axes is None or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
                              and 0 <= a < ndim for a in axes) or len(set(axes)) != len(axes)):
    raise ValueError(f"mirror_axes must be distinct spatial axes in 0..{ndim - 1}, got {mirror_axes!r}.")
  return tuple(int(a) for a in axes)


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
  """The flips of the mirror augmentation besides the identity: every non-empty subset of
  `mirror_axes`, by size then in `itertools.combinations` order (nnU-Net's order)."""
  return [c for r in range(1, len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]


@functools.cache
def sliding_window_jit(spatial_dims: Optional[int]):
  """The jitted body of `sliding_window_predict` for images of `spatial_dims` dimensions (built on
  first use, when the backend is known, with `compiler_options.jit_options`; None: without options,
  for a call inside another jit); its `_cache_size()` counts compilations."""
  return jax.jit(_sliding_window_predict,
                 static_argnames=("patch_size", "batch_size", "gaussian", "sigma_scale", "mirror_axes",
                                  "mesh"),
                 compiler_options=None if spatial_dims is None
                 else compiler_options.jit_options(spatial_dims))


def _sliding_window_predict(
    predict_fn: jax.tree_util.Partial,
    padded: Inputs,
    per_case: dict,
    starts_table: jax.Array,
    num_windows: jax.Array,
    *,
    patch_size: tuple[int, ...],
    batch_size: int,
    gaussian: bool,
    sigma_scale: float,
    mirror_axes: tuple[int, ...],
    mesh: Optional[Mesh],
) -> jax.Array:
  """Jitted body of `sliding_window_predict`: the averaged probabilities over the whole buffer from
  the first `num_windows` windows of `starts_table` (0 where no window reaches). `padded` is the
  image (*buffer, C) or a dict of per-voxel buffers (*buffer, ...); `per_case` a dict (empty with an
  image)."""
  ndim = len(patch_size)
  leaves = jax.tree_util.tree_leaves(padded)
  padded_shape = leaves[0].shape[:ndim]
  is_dict = isinstance(padded, dict)

  def window_inputs(windows):
    """What `predict_fn` takes: the windows, or the dict of windows and broadcast per-case entries."""
    if not is_dict:
      return windows
    return {**windows, **{k: jnp.broadcast_to(v, (batch_size, *jnp.shape(v)))
                          for k, v in per_case.items()}}

  window_spec = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((batch_size, *patch_size, *x.shape[ndim:]), x.dtype), padded)
  probs_spec = jax.eval_shape(lambda windows: predict_fn(window_inputs(windows)), window_spec)
  if (not isinstance(probs_spec, jax.ShapeDtypeStruct) or len(probs_spec.shape) != ndim + 2
      or probs_spec.shape[:-1] != (batch_size, *patch_size)):
    shapes = jax.tree_util.tree_map(lambda x: x.shape, window_spec)
    got = jax.tree_util.tree_map(lambda x: x.shape, probs_spec)
    raise ValueError(f"predict_fn must map windows {shapes} to probabilities "
                     f"{(batch_size, *patch_size)} + (K,); got {got}.")
  num_classes = probs_spec.shape[-1]

  if gaussian:
    weight = gaussian_importance_map(patch_size, sigma_scale)[..., None]  # (*patch, 1)
  else:
    weight = jnp.ones((*patch_size, 1), jnp.float32)

  def cut_window(start):
    def cut(x):
      corner = (*(start[a] for a in range(ndim)), *[0] * (x.ndim - ndim))
      return lax.dynamic_slice(x, corner, (*patch_size, *x.shape[ndim:]))
    return jax.tree_util.tree_map(cut, padded)

  def predict(windows):
    """(B, *patch, K) float32 probabilities of a batch of windows, mirrored if asked."""
    probs = predict_fn(window_inputs(windows)).astype(jnp.float32)
    combinations = mirror_combinations(mirror_axes)
    for axes in combinations:
      batch_axes = tuple(1 + a for a in axes)  # Spatial axis a of a window batch.
      flipped = jax.tree_util.tree_map(lambda x: jnp.flip(x, batch_axes), windows)
      probs = probs + jnp.flip(predict_fn(window_inputs(flipped)).astype(jnp.float32), batch_axes)
    return probs / (len(combinations) + 1) if combinations else probs

  def accumulate_batch(batch_index, totals):
    """Adds one batch of windows to `totals` (*padded, K + 1): Σ weight·p in [..., :K], Σ weight in [..., K]."""
    first = batch_index * batch_size
    batch_starts = lax.dynamic_slice_in_dim(starts_table, first, batch_size)  # (B, d)
    windows = jax.vmap(cut_window)(batch_starts)
    if mesh is not None:  # Each device evaluates B / n windows; the sums are gathered back.
      windows = lax.with_sharding_constraint(windows, NamedSharding(mesh, PartitionSpec(mesh.axis_names)))
    probs = predict(windows)  # (B, *patch, K)
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
