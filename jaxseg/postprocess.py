"""From probabilities to the label maps that are scored and saved: the decision rule and the
largest-connected-component post-processing.

Host side (NumPy/SciPy) except `probabilities_to_labels`, which is jnp and jittable. Label maps are
integer arrays (*spatial,) of class indices, 2D (H, W) or 3D (X, Y, Z).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from jaxseg import geometry

__all__ = [
    "LCC",
    "RAW",
    "largest_connected_component",
    "postprocess_labels",
    "postprocesses",
    "probabilities_to_labels",
]

# The rows of an evaluation: raw labels, and the largest connected component (binary tasks).
RAW, LCC = "raw", "lcc"


def probabilities_to_labels(probs: jax.Array, threshold: float = 0.5) -> jax.Array:
  """The references' decision rule on (..., K) probabilities.

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


def largest_connected_component(mask: np.ndarray) -> np.ndarray:
  """Keeps only the largest connected foreground component (DTC `getLargestCC`).

  Components use full connectivity (26 in 3D, 8 in 2D), as skimage `label` does by default. Among
  components of equal, maximal size the one whose first voxel comes first in C (raster) order wins, as in
  the reference (`argmax` of the sizes of skimage's raster-ordered labels).

  Unlike the reference, which asserts that the mask is not empty, an all-background mask is returned
  unchanged (all False): the evaluator reports the empty prediction instead of crashing.

  Args:
    mask: (X, Y, Z) or (H, W) binary mask; nonzero voxels are foreground.

  Returns:
    bool array of the same shape: True exactly on the largest component.
  """
  foreground = np.asarray(mask) != 0
  labels, num_components = ndimage.label(foreground,
                                         structure=geometry.full_connectivity(foreground.ndim))
  if num_components == 0:
    return np.zeros(foreground.shape, dtype=bool)
  sizes = np.bincount(labels.ravel(), minlength=num_components + 1)[1:]
  candidates = np.flatnonzero(sizes == sizes.max()) + 1
  if candidates.size > 1:
    # Tie: the component met first in raster order (do not rely on scipy's label numbering).
    flat_labels = labels.ravel()
    first_voxel = np.array([np.argmax(flat_labels == c) for c in candidates])
    keep = candidates[np.argmin(first_voxel)]
  else:
    keep = candidates[0]
  return labels == keep


def postprocesses(num_classes: int, lcc: bool) -> tuple[str, ...]:
  """The post-processings an evaluation reports: raw, and LCC for binary tasks when `lcc` is set.

  LCC means "keep the largest foreground component" (DTC `getLargestCC`), which is defined for one
  foreground class only, so multi-class tasks get raw rows alone.
  """
  return (RAW, LCC) if lcc and num_classes == 2 else (RAW,)


def postprocess_labels(labels: np.ndarray, postprocess: str) -> np.ndarray:
  """`labels` (*spatial,) as they are (RAW), or only their largest foreground component (LCC,
  binary labels), in the same dtype. An empty prediction stays empty (the reference asserts there),
  so that its LCC row equals its raw row and raw and LCC means cover the same cases.
  """
  if postprocess not in (RAW, LCC):
    raise ValueError(f"postprocess must be {RAW!r} or {LCC!r}, got {postprocess!r}")
  if postprocess == RAW or not labels.any():
    return labels
  return largest_connected_component(labels).astype(labels.dtype)
