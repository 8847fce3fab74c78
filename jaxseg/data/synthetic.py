"""Embedded synthetic data set: organ-like shapes in textured, noisy, biased volumes.

The default data of every config, so that the library trains end to end in minutes on a laptop
with nothing downloaded. Case `index` of `seed` is drawn from `np.random.default_rng([seed, index])`
alone, so it does not depend on how many cases are requested. 24 volumes of 64x64x48 take about a
second on one CPU core: every smooth random field is a separable Gaussian-kernel interpolation of a
coarse random grid (a few small matrix products, no FFT, no full-resolution filtering).

Generative model, per case (2D and 3D share the code):

1. Anatomy. The main organ (class 1) is an ellipsoid of random volume fraction (5-12%), aspect
   ratios and orientation (within +-40 degrees of the axes), placed near the centre like the left
   atrium in an LA crop. Its surface is deformed by adding low-frequency random noise (two scales,
   zero mean over the ellipsoid) to the implicit function `|R^T (x - c) / r| - 1`; the organ is the
   largest connected component of the negative part, holes filled. Further organs
   (`num_classes > 2`) are `"adjacent"` (placed against an existing organ; a voxel claimed by two
   goes to the one it is deeper inside, so organs touch but never overlap) or `"nested"` (each
   inside the previous one, 2 voxels off its surface, like the tumour sub-regions of BraTS; up to
   about 6 classes fit the default shape).
2. Distractors. Smaller, rounder unlabeled blobs anywhere in the background, with the intensity of
   an organ in modality 0: intensity alone does not find the organ, its shape, size and position do.
3. Appearance, per modality. A fixed class-to-signal table per modality (the "sequence": modality 0
   shows every organ bright, odd modalities show organs dark, modality m shows class m at low
   contrast, so that some classes need several modalities), jittered per case; a tissue texture at
   two scales (shared by the modalities: it is anatomy) and an organ texture; a Gaussian blur
   (partial volume); a smooth multiplicative bias field; Gaussian noise; then a random gamma,
   z-scoring, and a random gain and offset. Noise and bias are independent per modality.

Why unlabeled volumes are informative: every case has its own organ shape, position, contrast,
gamma, gain, bias field and distractors, all drawn from one consistent prior. A handful of labeled
volumes covers a few points of this variability, and a model fitted to them alone overfits their
contrast and distractors; the unlabeled volumes show the rest of the appearance and shape
distribution (what consistency and regularisation terms exploit), the labeled ones fix what the
organ is. The bias field dominates the difficulty of intensity rules: the best global threshold
(chosen with the label) reaches a Dice of about 0.5 on the default spec, about 0.75 without bias.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional

import numpy as np
from scipy import ndimage

from jaxseg.data.base import Case, DataError, check_case

LAYOUTS = ("adjacent", "nested")
MIN_SIZE = 16  # Smallest spatial size: below it organs of a few voxels lose their shape.
MAX_CLASSES = 8  # More organs than this do not fit the default volume with room for distractors.
_MAX_ROTATION = math.radians(40.0)  # Organs keep a rough common orientation, as real anatomy does.
_MAX_ATTEMPTS = 20  # Redraws of one case's anatomy before giving up (only tiny shapes need any).


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """What to generate. Validated on construction; a bad value raises `DataError` naming its field.

  Attributes:
    shape: spatial shape, (H, W) for 2D or (X, Y, Z) for 3D; every size at least `MIN_SIZE`.
    num_classes: number of classes including background 0; 2 is one organ (binary).
    num_modalities: number of co-registered image channels of the same anatomy.
    layout: "adjacent" (organs touch but do not overlap) or "nested" (class k+1 inside class k).
    noise: standard deviation of the Gaussian noise, relative to the background signal (1.0); the
      default organ contrast is about 0.5.
    bias: standard deviation of the log of the multiplicative bias field (0 disables it).
    num_distractors: number of unlabeled organ-like blobs in the background.
  """

  shape: tuple[int, ...] = (64, 64, 48)
  num_classes: int = 2
  num_modalities: int = 1
  layout: str = "adjacent"
  noise: float = 0.1
  bias: float = 0.2
  num_distractors: int = 3

  def __post_init__(self):
    try:
      shape = tuple(operator.index(size) for size in self.shape)
    except TypeError:
      raise DataError(f"SyntheticSpec.shape must be a tuple of ints, got {self.shape!r}") from None
    if len(shape) not in (2, 3):
      raise DataError(f"SyntheticSpec.shape must have 2 (H, W) or 3 (X, Y, Z) entries, got {shape}")
    if min(shape) < MIN_SIZE:
      raise DataError(
          f"SyntheticSpec.shape must be at least {MIN_SIZE} along every axis, got {shape}")
    object.__setattr__(self, "shape", shape)
    _check_int("num_classes", self.num_classes, 2, MAX_CLASSES)
    _check_int("num_modalities", self.num_modalities, 1)
    _check_int("num_distractors", self.num_distractors, 0)
    if self.layout not in LAYOUTS:
      raise DataError(f"SyntheticSpec.layout must be one of {LAYOUTS}, got {self.layout!r}")
    for name in ("noise", "bias"):
      value = getattr(self, name)
      is_number = isinstance(value, (int, float, np.integer, np.floating)) and \
          not isinstance(value, bool)
      if not is_number or not math.isfinite(value) or value < 0:
        raise DataError(f"SyntheticSpec.{name} must be a finite number >= 0, got {value!r}")

  @property
  def ndim(self) -> int:
    return len(self.shape)


def _check_int(name: str, value, low: int, high: Optional[int] = None) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
      (high is not None and value > high):
    bounds = f">= {low}" if high is None else f"in {low}..{high}"
    raise DataError(f"SyntheticSpec.{name} must be an int {bounds}, got {value!r}")


def make_cases(spec: SyntheticSpec, num_cases: int, seed: int = 0) -> list[Case]:
  """Generates cases 0..num_cases-1 of `seed`; case i is the same for every `num_cases` > i."""
  if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 0:
    raise DataError(f"num_cases must be an int >= 0, got {num_cases!r}")
  return [make_case(spec, seed, index) for index in range(num_cases)]


def make_case(spec: SyntheticSpec, seed: int, index: int) -> Case:
  """Generates case `index` of `seed`: image float32 (*spec.shape, num_modalities), label uint8."""
  for name, value in (("seed", seed), ("index", index)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise DataError(f"{name} must be an int >= 0, got {value!r}")
  rng = np.random.default_rng([seed, index])
  grid = np.indices(spec.shape, dtype=np.float32)
  label, main_fraction = _draw_anatomy(rng, spec, grid)
  distractors = _draw_distractors(rng, spec, grid, label, main_fraction)
  textures = _draw_textures(rng, spec)
  channels = [_draw_modality(rng, spec, modality, label, distractors, textures)
              for modality in range(spec.num_modalities)]
  case = Case(case_id=f"synth_{index:04d}", image=np.stack(channels, axis=-1), label=label,
              spacing=(1.0,) * spec.ndim, affine=None,
              source=f"synthetic(seed={seed},index={index})")
  return check_case(case, spec.num_classes)


# --- Smooth random fields -------------------------------------------------------------------------


def _interpolation_matrix(size: int, cell: float) -> np.ndarray:
  """(size, nodes) Gaussian-kernel weights from coarse nodes `cell` voxels apart onto voxels.

  The nodes extend past both ends of the axis so that the field is equally smooth at the borders.
  """
  num_nodes = int(math.ceil(size / cell)) + 3
  first = (size - 1) / 2 - (num_nodes - 1) / 2 * cell
  nodes = first + cell * np.arange(num_nodes)
  voxels = np.arange(size)
  return np.exp(-0.5 * ((voxels[:, None] - nodes[None, :]) / (0.75 * cell)) ** 2).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: float) -> np.ndarray:
  """Zero-mean, unit-std random field of `shape` whose features are about `cell` voxels wide."""
  matrices = [_interpolation_matrix(size, max(cell, 1.0)) for size in shape]
  field = rng.standard_normal([m.shape[1] for m in matrices], dtype=np.float32)
  # One axis at a time, node axis (ijk) to voxel axis (xyz), last axis first (the full-size product
  # then runs over the outer axis, 2-5x faster). einsum rather than tensordot: these products are
  # too small to gain from a multithreaded BLAS, which slows them down 30-fold on a shared CPU.
  axes = list("ijk"[:len(shape)])
  for axis, matrix in reversed(list(enumerate(matrices))):
    before = "".join(axes)
    axes[axis] = "xyz"[axis]
    field = np.einsum(f"{axes[axis]}{before[axis]},{before}->{''.join(axes)}", matrix, field)
  field -= field.mean()
  return field / max(float(field.std()), 1e-6)


# --- Anatomy --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ellipsoid:
  center: np.ndarray  # (d,) voxels
  radii: np.ndarray  # (d,) voxels, along the columns of `rotation`
  rotation: np.ndarray  # (d, d) orthonormal

  def rho(self, points: np.ndarray) -> np.ndarray:
    """Normalised radius |R^T (x - c) / r| of points (d, ...): 1 on the surface."""
    offset = [points[i] - np.float32(self.center[i]) for i in range(len(self.center))]
    squared = 0.0
    for i, radius in enumerate(self.radii):  # Plain sums, no BLAS (see `smooth_noise`).
      local = sum(np.float32(self.rotation[j, i]) * offset[j] for j in range(len(offset)))
      squared = squared + (local / np.float32(radius)) ** 2
    return np.sqrt(squared)

  def reach(self, direction: np.ndarray) -> float:
    """Distance from the centre to the surface along a unit `direction`."""
    return float(1.0 / np.linalg.norm(self.rotation.T @ direction / self.radii))

  def half_extent(self) -> np.ndarray:
    """Half the side of the axis-aligned bounding box, per axis."""
    return np.sqrt(np.sum((self.rotation * self.radii[None, :]) ** 2, axis=1))


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
  """A rotation by at most `_MAX_ROTATION` in each plane of axes (one plane in 2D, three in 3D)."""
  rotation = np.eye(ndim)
  for i in range(ndim):
    for j in range(i + 1, ndim):
      angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
      plane = np.eye(ndim)
      cos, sin = np.cos(angle), np.sin(angle)
      plane[[i, i, j, j], [i, j, i, j]] = [cos, -sin, sin, cos]
      rotation = rotation @ plane
  return rotation


def _random_radii(rng: np.random.Generator, shape: tuple[int, ...], fraction: float,
                  aspect_spread: float) -> np.ndarray:
  """Radii (voxels) of an ellipsoid filling `fraction` of the volume, with random aspect ratios."""
  ndim = len(shape)
  aspect = np.exp(rng.normal(0.0, aspect_spread, ndim))
  aspect /= np.prod(aspect) ** (1.0 / ndim)
  unit_ball = math.pi if ndim == 2 else 4.0 * math.pi / 3.0
  scale = (fraction / unit_ball) ** (1.0 / ndim)
  return scale * aspect * np.asarray(shape, np.float64)


def _clamp_center(center: np.ndarray, blob_extent: np.ndarray,
                  shape: tuple[int, ...]) -> np.ndarray:
  """Moves a centre so that the bounding box stays inside the volume (or centres it if too big)."""
  size = np.asarray(shape, np.float64) - 1.0
  low, high = blob_extent, size - blob_extent
  return np.where(low <= high, np.clip(center, low, high), size / 2)


def _deformed_implicit(rng: np.random.Generator, grid: np.ndarray, blob: _Ellipsoid,
                       amplitude: float) -> np.ndarray:
  """Implicit function of a deformed ellipsoid: negative inside.

  Adding smooth noise to rho - 1 moves the surface by about `amplitude` radii, in lobes about one
  radius wide plus finer bumps a third as wide: smooth, blob-like, never a perfect ellipsoid.
  """
  shape = grid.shape[1:]
  mean_radius = float(np.mean(blob.radii))
  deformation = smooth_noise(rng, shape, max(mean_radius, 3.0))
  deformation += 0.3 * smooth_noise(rng, shape, max(mean_radius / 3.0, 3.0))
  rho = blob.rho(grid)
  # Zero mean over the ellipsoid: the noise reshapes the organ but does not grow or shrink it as a
  # whole, so its size follows the drawn volume fraction.
  inside = rho < 1.0
  if np.any(inside):
    deformation -= deformation[inside].mean()
  return rho - 1.0 + amplitude * deformation


def _largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest connected component of a boolean mask, with its holes filled."""
  components, count = ndimage.label(mask)
  if count == 0:
    return mask
  sizes = np.bincount(components.ravel())
  sizes[0] = 0
  blob = components == np.argmax(sizes)
  # A hole is a background component that does not touch the border of the volume.
  outside, _ = ndimage.label(~blob)
  border = np.zeros(blob.shape, bool)
  for axis in range(blob.ndim):
    border[(slice(None),) * axis + (0,)] = True
    border[(slice(None),) * axis + (-1,)] = True
  return ~np.isin(outside, np.unique(outside[border & ~blob]))


def _draw_anatomy(rng: np.random.Generator, spec: SyntheticSpec,
                  grid: np.ndarray) -> tuple[np.ndarray, float]:
  """Draws the label map, redrawing when a class came out (almost) empty.

  Returns:
    (label, volume fraction drawn for the main organ).
  """
  min_voxels = 2 ** spec.ndim  # A class of fewer voxels than this is no organ.
  for _ in range(_MAX_ATTEMPTS):
    main_fraction = rng.uniform(0.05, 0.12)
    if spec.layout == "nested":
      label = _nested_organs(rng, spec, grid, main_fraction)
    else:
      label = _adjacent_organs(rng, spec, grid, main_fraction)
    counts = np.bincount(label.ravel(), minlength=spec.num_classes)
    if np.all(counts[1:] >= min_voxels):
      return label, main_fraction
  raise DataError(f"SyntheticSpec.num_classes: could not fit {spec.num_classes - 1} organs "
                  f"({spec.layout}) into shape {spec.shape}; use a larger shape or fewer classes")


def _main_organ(rng: np.random.Generator, spec: SyntheticSpec, fraction: float) -> _Ellipsoid:
  shape = np.asarray(spec.shape, np.float64)
  radii = _random_radii(rng, spec.shape, fraction, aspect_spread=0.25)
  rotation = _random_rotation(rng, spec.ndim)
  center = (shape - 1) / 2 + rng.uniform(-0.12, 0.12, spec.ndim) * shape
  blob = _Ellipsoid(center, radii, rotation)
  return dataclasses.replace(blob, center=_clamp_center(center, blob.half_extent(), spec.shape))


def _adjacent_organs(rng: np.random.Generator, spec: SyntheticSpec, grid: np.ndarray,
                     main_fraction: float) -> np.ndarray:
  """Organs placed against each other; a voxel inside several goes to the one it is deepest in."""
  organs = [_main_organ(rng, spec, main_fraction)]
  for _ in range(spec.num_classes - 2):
    # Smaller organs; shrunk further when there are many, so that all fit in ~30% of the volume.
    fraction = main_fraction * rng.uniform(0.3, 0.6) * min(1.0, 3.0 / spec.num_classes)
    radii = _random_radii(rng, spec.shape, fraction, aspect_spread=0.25)
    blob = _Ellipsoid(np.zeros(spec.ndim), radii, _random_rotation(rng, spec.ndim))
    organs.append(_place_adjacent(rng, spec, blob, organs))
  implicit = np.stack([_deformed_implicit(rng, grid, organ, amplitude=0.25) for organ in organs])
  deepest = np.argmin(implicit, axis=0)
  inside = np.min(implicit, axis=0) < 0
  label = np.zeros(spec.shape, np.uint8)
  for k in range(len(organs)):
    region = _largest_component(inside & (deepest == k))
    # Hole filling takes enclosed background only, never another organ's voxels.
    label[region & (~inside | (deepest == k)) & (label == 0)] = k + 1
  return label


def _place_adjacent(rng: np.random.Generator, spec: SyntheticSpec, blob: _Ellipsoid,
                    organs: list[_Ellipsoid]) -> _Ellipsoid:
  """Puts `blob` against a random existing organ, inside the volume and off the other organs."""
  extent = blob.half_extent()
  size = np.asarray(spec.shape, np.float64) - 1.0
  for _ in range(50):
    anchor = organs[rng.integers(len(organs))]
    direction = rng.normal(size=spec.ndim)
    direction /= np.linalg.norm(direction)
    center = anchor.center + direction * 0.95 * (anchor.reach(direction) + blob.reach(direction))
    inside_volume = np.all(center >= extent) and np.all(center <= size - extent)
    clear = all(organ.rho(center[:, None])[0] > 1.3 for organ in organs)
    if inside_volume and clear:
      break
  return dataclasses.replace(blob, center=_clamp_center(center, extent, spec.shape))


def _nested_organs(rng: np.random.Generator, spec: SyntheticSpec, grid: np.ndarray,
                   main_fraction: float) -> np.ndarray:
  """Class k+1 lies inside class k, off-centre (like tumour core inside oedema in BraTS)."""
  parent = _main_organ(rng, spec, main_fraction)
  region = _largest_component(_deformed_implicit(rng, grid, parent, amplitude=0.25) < 0)
  label = region.astype(np.uint8)
  for k in range(2, spec.num_classes):
    offset = rng.normal(size=spec.ndim)
    offset *= rng.uniform(0.0, 0.25) / np.linalg.norm(offset)
    child = _Ellipsoid(center=parent.center + parent.rotation @ (parent.radii * offset),
                       radii=parent.radii * rng.uniform(0.6, 0.8) *
                       np.exp(rng.normal(0.0, 0.1, spec.ndim)),
                       rotation=_random_rotation(rng, spec.ndim))
    # The child keeps 2 voxels off the parent's surface, so that the parent's shell stays one
    # connected piece (in 2D a child reaching both sides would cut it in two).
    interior = ndimage.binary_erosion(label == k - 1, iterations=2)
    inside_child = _deformed_implicit(rng, grid, child, amplitude=0.2) < 0
    region = _largest_component(inside_child & interior)
    region &= interior  # Hole filling must not reach outside the parent.
    label[region] = k
    parent = child
  return label


def _draw_distractors(rng: np.random.Generator, spec: SyntheticSpec, grid: np.ndarray,
                      label: np.ndarray,
                      main_fraction: float) -> list[tuple[np.ndarray, int, float]]:
  """Unlabeled blobs in the background: (mask, class they mimic in modality 0, contrast factor).

  They are smaller and rounder than the organs and anywhere in the volume, so shape, size and
  position tell them apart, not intensity.
  """
  distractors = []
  for _ in range(spec.num_distractors):
    fraction = main_fraction * rng.uniform(0.08, 0.3)
    radii = _random_radii(rng, spec.shape, fraction, aspect_spread=0.1)
    blob = _Ellipsoid(np.zeros(spec.ndim), radii, _random_rotation(rng, spec.ndim))
    center = rng.uniform(0.0, 1.0, spec.ndim) * (np.asarray(spec.shape) - 1)
    blob = dataclasses.replace(blob, center=_clamp_center(center, blob.half_extent(), spec.shape))
    mask = (_deformed_implicit(rng, grid, blob, amplitude=0.15) < 0) & (label == 0)
    mimicked = int(rng.integers(1, spec.num_classes))
    distractors.append((mask, mimicked, float(rng.uniform(0.8, 1.1))))
  return distractors


# --- Intensities ----------------------------------------------------------------------------------


def class_levels(num_classes: int, modality: int) -> np.ndarray:
  """Nominal signal of each class in one modality (background 1.0); the same for every case.

  Modality 0 shows organ k brighter than organ k-1 (contrast 0.5, 0.8, 1.1, ...). Each further
  modality shifts which organ gets which contrast, odd modalities show organs dark instead of bright
  (like T1 vs T2), and modality m (1 <= m < num_classes) shows class m at low contrast.
  """
  contrast = np.roll(0.5 + 0.3 * np.arange(num_classes - 1), modality)
  organs = 1.0 / (1.0 + contrast) if modality % 2 else 1.0 + contrast
  if 1 <= modality < num_classes:
    organs[modality - 1] = 0.95 if modality % 2 else 1.05
  return np.concatenate([[1.0], organs])


def _draw_textures(rng: np.random.Generator, spec: SyntheticSpec) -> dict[str, np.ndarray]:
  """Anatomical textures shared by the modalities: tissue at two scales and organ parenchyma."""
  return {
      "tissue_coarse": smooth_noise(rng, spec.shape, max(spec.shape) / 5.0),
      "tissue_fine": smooth_noise(rng, spec.shape, 3.0),
      "organ": smooth_noise(rng, spec.shape, 4.0),
  }


def _draw_modality(rng: np.random.Generator, spec: SyntheticSpec, modality: int, label: np.ndarray,
                   distractors: list[tuple[np.ndarray, int, float]],
                   textures: dict[str, np.ndarray]) -> np.ndarray:
  """One channel: class levels, textures, blur, bias field, noise, then a random contrast change."""
  nominal = class_levels(spec.num_classes, modality)
  # Per-case contrast of each organ: the same organ is not equally bright in every scan.
  jitter = np.concatenate([[1.0], rng.uniform(0.75, 1.25, spec.num_classes - 1)])
  levels = 1.0 + (nominal - 1.0) * jitter
  signal = levels.astype(np.float32)[label]
  for mask, mimicked, factor in distractors:
    # A distractor looks like an organ in modality 0 only; elsewhere it has a contrast of its own,
    # so that the other modalities help to tell it apart.
    contrast = (nominal[mimicked] - 1.0) * factor if modality == 0 else rng.uniform(-0.4, 0.4)
    signal[mask] = 1.0 + contrast
  sign = -1.0 if modality % 2 else 1.0
  signal += sign * (0.08 * textures["tissue_coarse"] + 0.05 * textures["tissue_fine"])
  signal += (0.06 * textures["organ"]) * (label > 0)
  signal = ndimage.gaussian_filter(signal, 0.8)  # Partial volume at the edges, as a scanner's PSF.
  if spec.bias > 0:
    signal *= np.exp(spec.bias * smooth_noise(rng, spec.shape, max(spec.shape) / 1.5))
  signal += spec.noise * rng.standard_normal(spec.shape, dtype=np.float32)
  return _random_contrast(rng, signal)


def _random_contrast(rng: np.random.Generator, signal: np.ndarray) -> np.ndarray:
  """Random gamma, z-scoring, then a random gain and offset: roughly z-scored, never exactly."""
  low, high = float(signal.min()), float(signal.max())
  unit = (signal - low) / max(high - low, 1e-6)
  unit **= np.float32(np.exp(rng.uniform(math.log(0.7), math.log(1.4))))
  scored = (unit - unit.mean()) / max(float(unit.std()), 1e-6)
  gain = np.exp(rng.uniform(math.log(0.8), math.log(1.25)))
  return (scored * gain + rng.normal(0.0, 0.2)).astype(np.float32)
