"""Host-side augmentation of the LA family (docs/data.md, batches and augmentation), in numpy, per sample.

1. rotate by k*90 degrees in the (x, y) plane, k ~ U{0..3}, then flip one of the axes 0 or 1 (a flip
   is always applied), exactly like the reference `RandomRotFlip`. Because the flip is never skipped,
   the outputs are the 4 reflections of the square, never the identity or a pure rotation; we keep
   this for parity with the published LA numbers;
2. crop a patch at a uniform offset, after zero-padding with the reference rule when the volume is
   not larger than the patch (`RandomCrop`); or, for foreground oversampling, centred on a given
   voxel and clamped to the (padded) volume (`random_crop_arrays(..., centre=)`).
Images are (*spatial, C), labels (*spatial,); both get the same geometric transform.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jaxseg.data.base import DataError


def draw_rot_flip(rng: np.random.Generator) -> tuple[int, int]:
  """(k, flip axis): k ~ U{0..3} first, then the axis ~ U{0, 1}, in the reference's order."""
  k = int(rng.integers(0, 4))
  return k, int(rng.integers(0, 2))


def draw_crop_offsets(spatial: Sequence[int], patch: Sequence[int],
                      rng: np.random.Generator) -> list[int]:
  """o_i ~ U{0, ..., S_i - P_i - 1} (exclusive upper bound, as the reference); 0 where S_i <= P_i."""
  return [int(rng.integers(0, s - p)) if s > p else 0 for s, p in zip(spatial, patch)]


def rot_flip(array: np.ndarray, k: int, axis: int) -> np.ndarray:
  """`array` (*spatial, ...) rotated by k*90 degrees in the plane of axes (0, 1), then flipped
  along `axis`; a contiguous copy."""
  return np.ascontiguousarray(np.flip(np.rot90(array, k, axes=(0, 1)), axis=axis))


def random_rot_flip(image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator):
  """Rotates by k*90 degrees in the plane of axes (0, 1), then flips along axis 0 or 1.

  The draws are `draw_rot_flip`'s. Returns (image, label) (label None if given None); the arrays
  are contiguous copies.
  """
  k, axis = draw_rot_flip(rng)
  return rot_flip(image, k, axis), None if label is None else rot_flip(label, k, axis)


def crop_padding(spatial_shape: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
  """Per-axis zero padding (both sides) of the reference crop.

  If any axis has size <= patch (equality included), every axis is padded on both sides by
  max((P_i - S_i) // 2 + 3, 0) (floor division toward -inf, so S = P + 3 gives 1). Otherwise none.
  """
  if len(spatial_shape) != len(patch):
    raise ValueError(f"patch {tuple(patch)} and volume {tuple(spatial_shape)} differ in rank")
  if all(s > p for s, p in zip(spatial_shape, patch)):
    return (0,) * len(patch)
  return tuple(max((p - s) // 2 + 3, 0) for s, p in zip(spatial_shape, patch))


def random_crop(image: np.ndarray, label: Optional[np.ndarray], patch: Sequence[int],
                rng: np.random.Generator, *, pad: bool = True, source: str = "<memory>"):
  """Crops `patch` at offset o_i ~ U{0, ..., S_i - P_i - 1} (exclusive upper bound, as the reference).

  With `pad=True` the volume is first zero-padded by `crop_padding`. With `pad=False` a volume
  smaller than the patch is an error; an axis equal to the patch gets offset 0.

  Raises:
    DataError: naming `source`, if the patch does not fit and padding is off.
  """
  arrays = {"image": image} if label is None else {"image": image, "label": label}
  out = random_crop_arrays(arrays, patch, rng, pad=pad, source=source)
  return out["image"], out.get("label")


def centred_offsets(spatial: Sequence[int], patch: Sequence[int],
                    centre: Sequence[int]) -> list[int]:
  """Offsets that put voxel `centre` at index patch // 2 of the crop (o_i = c_i - P_i // 2), clamped
  to {0, ..., max(S_i - P_i, 0)} so that the crop stays inside the volume of shape `spatial`."""
  return [min(max(int(c) - p // 2, 0), max(s - p, 0)) for s, p, c in zip(spatial, patch, centre)]


def random_crop_arrays(arrays: dict[str, np.ndarray], patch: Sequence[int],
                       rng: np.random.Generator, *, pad: bool = True,
                       source: str = "<memory>",
                       centre: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:
  """`random_crop` of several arrays (*spatial, ...) of one spatial shape at the same offset.

  One draw of the offsets (`draw_crop_offsets`), whatever the number of arrays, so the draws do not
  depend on which fields a case has. With `centre` (a voxel of the unpadded arrays) the crop is
  instead placed by `centred_offsets` around that voxel (shifted by the padding) and nothing is
  drawn from `rng` (foreground oversampling, `batches.TwoStreamBatches`).
  """
  patch = tuple(int(p) for p in patch)
  first = next(iter(arrays.values()))
  spatial = first.shape[:len(patch)]
  widths = (0,) * len(patch)
  if pad:
    widths = crop_padding(spatial, patch)
    if any(widths):
      arrays = {name: np.pad(a, [(w, w) for w in widths] + [(0, 0)] * (a.ndim - len(patch)))
                for name, a in arrays.items()}
      spatial = tuple(s + 2 * w for s, w in zip(spatial, widths))
  elif any(s < p for s, p in zip(spatial, patch)):
    raise DataError(f"{source}: patch {patch} is larger than the volume {tuple(spatial)} and "
                    "padding is off (config data.pad_to_patch)")
  if centre is None:
    offsets = draw_crop_offsets(spatial, patch, rng)
  else:
    offsets = centred_offsets(spatial, patch, [int(c) + w for c, w in zip(centre, widths)])
  window = tuple(slice(o, o + p) for o, p in zip(offsets, patch))
  return {name: np.ascontiguousarray(a[window]) for name, a in arrays.items()}
