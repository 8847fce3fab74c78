"""nnU-Net-style ("moreDA") data augmentation on the device, inside a jitted train step.

Pure JAX, channels-last: an image is (*S, C) float32 and its label (*S,) int, with 2 or 3 spatial
axes. The randomness is explicit: `draw_params(key, config, ndim, channels)` draws one sample's
parameters (a pytree, `AugmentParams`), and `apply(image, label, params)` applies them. Nothing
depends on global state, so a step's augmentation is a function of its key (derive it from the
step with `jax.random.fold_in`, and a resumed run draws the same augmentations). `augment_batch`
vmaps both over a batch, one key per sample (`fold_in(key, i)`, so a sample's draw does not depend
on the batch size).

The transforms, in the order nnU-Net v1's "moreDA" pipeline (nnUNetTrainerV2) runs them:

1. spatial: rotation about each axis, isotropic scaling; one affine resampling about the patch
   centre (linear for the image, nearest for the label, 0 outside the input);
2. additive Gaussian noise;                     6. simulated low resolution, per channel;
3. Gaussian blur, per channel;                  7. gamma of the inverted image, per channel;
4. multiplicative brightness, per channel;      8. gamma, per channel;
5. contrast, per channel;                       9. mirroring, each axis independently.

Where we differ from nnU-Net (see docs/data.md, "On-device nnU-Net augmentation"): the image is
resampled linearly (nnU-Net: cubic spline) and the label by nearest neighbour (nnU-Net: linear
interpolation of each label's indicator, thresholded at 0.5); the low-resolution simulation
upsamples linearly (nnU-Net: cubic spline); elastic deformation and additive brightness (both off
in nnUNetTrainerV2), the "dummy 2D" mode for anisotropic 3D data, the nonzero-mask transform and the
cascade transforms are not implemented. Every transform is computed for every sample and kept where
its flag is on (under vmap a branch would be computed anyway).

`reference_spatial` and `reference_apply` reproduce the transforms on the host with NumPy/SciPy
from the same parameters; the tests check the device code against them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_DEG30 = 30.0 / 360.0 * 2.0 * math.pi  # nnU-Net writes its angles as degrees / 360 * 2 pi
_GAMMA_EPS = 1e-7       # batchgenerators' epsilon in the gamma transform's range division
_RETAIN_STD_EPS = 1e-8  # and in its retain-stats standard deviation division
_BLUR_TRUNCATE = 4.0    # scipy.ndimage.gaussian_filter's default kernel truncation (in sigmas)
# A sampling point counts as inside the input up to this far (voxels) beyond the edge: float32
# coordinates of points exactly on the edge (a quarter turn, say) can land 1e-6 outside.
_EDGE_EPS = 1e-4


_RANGE_FIELDS = ("rotation_x", "rotation_y", "rotation_z", "scale_range", "noise_std_range",
                 "blur_sigma_range", "brightness_range", "contrast_range",
                 "low_resolution_zoom_range", "gamma_range")


@dataclasses.dataclass(frozen=True)
class NnUNetAugmentConfig:
  """Probabilities and ranges of the augmentation; the defaults are nnU-Net v1's 3D "moreDA" setup.

  Probabilities are per sample unless named per channel / per axis. "Half below 1" ranges (scale,
  contrast, gamma) are drawn as nnU-Net does: with probability 1/2 (when the range starts below 1)
  uniformly in [lo, 1), else uniformly in [max(lo, 1), hi).

  Where the defaults come from (nnU-Net v1: `default_data_augmentation.py` for the base dictionary,
  `nnUNetTrainerV2.setup_DA_params` for its overrides, `data_augmentation_moreDA.py` for the
  pipeline; batchgenerators for each transform's own defaults):

  Attributes:
    p_rotation: probability of rotating a sample (base dictionary `p_rot` 0.2).
    rotation_x, rotation_y, rotation_z: (lo, hi) angle ranges in radians about spatial axes 0, 1, 2;
      ±30 degrees each (nnUNetTrainerV2 widens the base ±15). A 2D image uses rotation_x only
      (nnU-Net's 2D trainer uses ±180 degrees there; set it for 2D if wanted).
    p_rotation_per_axis: given a rotation, probability that each axis' angle is drawn, else 0
      (base `rotation_p_per_axis` 1).
    p_scale: probability of scaling a sample (base `p_scale` 0.2).
    scale_range: isotropic scale, half below 1 (nnUNetTrainerV2: (0.7, 1.4)). The sampling grid is
      multiplied by the scale, so a scale above 1 shows more of the input (the content shrinks).
    p_noise: probability of additive Gaussian noise (moreDA: 0.1).
    noise_std_range: range of the noise's standard deviation, one per sample for all channels
      (batchgenerators names it `noise_variance`, (0, 0.1), but uses it as the standard deviation).
    p_blur: probability of blurring a sample (moreDA: 0.2).
    p_blur_per_channel: then, probability of blurring each channel (moreDA: 0.5).
    blur_sigma_range: isotropic Gaussian sigma in voxels, drawn per channel (moreDA: (0.5, 1)).
    p_brightness: probability of multiplying a sample's intensities (moreDA: 0.15).
    brightness_range: multiplier range, drawn uniformly per channel (moreDA: (0.75, 1.25)).
    p_contrast: probability of a contrast change (moreDA: 0.15).
    contrast_range: contrast factor, half below 1, per channel (batchgenerators' default
      (0.75, 1.25)); the result is clipped to the channel's range before the change.
    p_low_resolution: probability of simulating a low resolution (moreDA: 0.25).
    p_low_resolution_per_channel: then, per channel (moreDA: 0.5).
    low_resolution_zoom_range: downsampling factor, drawn per channel, the same for all axes
      (moreDA: (0.5, 1)).
    p_gamma_inverted: probability of a gamma change of the negated image (moreDA: 0.1).
    p_gamma: probability of a gamma change (base `p_gamma` 0.3).
    gamma_range: gamma, half below 1, per channel, both gamma transforms (base (0.7, 1.5)).
    gamma_retain_stats: restore each channel's mean and standard deviation after a gamma change
      (base `gamma_retain_stats` True).
    p_mirror_per_axis: probability of mirroring each axis (batchgenerators: 0.5, fixed there).
    mirror_axes: spatial axes that may be mirrored; None = all (base (0, 1, 2)).
  """

  p_rotation: float = 0.2
  rotation_x: tuple[float, float] = (-_DEG30, _DEG30)
  rotation_y: tuple[float, float] = (-_DEG30, _DEG30)
  rotation_z: tuple[float, float] = (-_DEG30, _DEG30)
  p_rotation_per_axis: float = 1.0
  p_scale: float = 0.2
  scale_range: tuple[float, float] = (0.7, 1.4)
  p_noise: float = 0.1
  noise_std_range: tuple[float, float] = (0.0, 0.1)
  p_blur: float = 0.2
  p_blur_per_channel: float = 0.5
  blur_sigma_range: tuple[float, float] = (0.5, 1.0)
  p_brightness: float = 0.15
  brightness_range: tuple[float, float] = (0.75, 1.25)
  p_contrast: float = 0.15
  contrast_range: tuple[float, float] = (0.75, 1.25)
  p_low_resolution: float = 0.25
  p_low_resolution_per_channel: float = 0.5
  low_resolution_zoom_range: tuple[float, float] = (0.5, 1.0)
  p_gamma_inverted: float = 0.1
  p_gamma: float = 0.3
  gamma_range: tuple[float, float] = (0.7, 1.5)
  gamma_retain_stats: bool = True
  p_mirror_per_axis: float = 0.5
  mirror_axes: Optional[tuple[int, ...]] = None

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if isinstance(v, list):
        object.__setattr__(self, f.name, tuple(v))
    for f in dataclasses.fields(self):
      if f.name.startswith("p_"):
        v = getattr(self, f.name)
        if not _is_number(v) or not 0.0 <= v <= 1.0:
          raise ValueError(f"nnunet_augment.{f.name}: a probability in [0, 1], got {v!r}")
    for name in _RANGE_FIELDS:
      v = getattr(self, name)
      if not (isinstance(v, tuple) and len(v) == 2 and all(_is_number(x) for x in v)
              and all(math.isfinite(x) for x in v) and v[0] <= v[1]):
        raise ValueError(f"nnunet_augment.{name}: a (lo, hi) pair of finite numbers with lo <= hi, "
                         f"got {v!r}")
    positive = {"scale_range": "scales > 0", "gamma_range": "gammas > 0",
                "low_resolution_zoom_range": "zooms in (0, 1]"}
    for name, what in positive.items():
      if getattr(self, name)[0] <= 0:
        raise ValueError(f"nnunet_augment.{name}: {what}, got {getattr(self, name)!r}")
    if self.low_resolution_zoom_range[1] > 1:
      raise ValueError("nnunet_augment.low_resolution_zoom_range: zooms in (0, 1], got "
                       f"{self.low_resolution_zoom_range!r}")
    for name in ("noise_std_range", "blur_sigma_range", "brightness_range"):
      if getattr(self, name)[0] < 0:
        raise ValueError(f"nnunet_augment.{name}: values >= 0, got {getattr(self, name)!r}")
    if not isinstance(self.gamma_retain_stats, bool):
      raise ValueError(f"nnunet_augment.gamma_retain_stats: a bool, got {self.gamma_retain_stats!r}")
    axes = self.mirror_axes
    if axes is not None and not (isinstance(axes, tuple) and all(_is_int(a) and 0 <= a <= 2
                                                                  for a in axes)
                                 and len(set(axes)) == len(axes)):
      raise ValueError(f"nnunet_augment.mirror_axes: None or distinct spatial axes in 0..2, got "
                       f"{axes!r}")

  @classmethod
  def from_config(cls, block: Optional[Mapping[str, Any]]) -> "NnUNetAugmentConfig":
    """From a config block (a dict or ml_collections.ConfigDict) of some of the fields; the others
    keep their defaults. Lists become tuples.

    Raises:
      ValueError: naming an unknown field, or a field whose value fails the checks.
    """
    block = {} if block is None else dict(block)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in block:
      if k not in names:
        raise ValueError(f"nnunet_augment.{k}: unknown field; known: {', '.join(sorted(names))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in block.items()})

  def blur_radius(self) -> int:
    """Half width of the (static) blur kernel: SciPy's for the largest sigma."""
    return int(_BLUR_TRUNCATE * self.blur_sigma_range[1] + 0.5)


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@flax.struct.dataclass
class AugmentParams:
  """One sample's drawn parameters. Flags are bool scalars ((C,) per channel, (ndim,) per axis);
  values hold the identity where their flag is off (angle 0, scale 1, ...). Batched by vmap.

  `apply` uses the values only where the flags say so, and returns the input unchanged (bitwise)
  for a transform whose flag is off.
  """
  rotate: jax.Array            # () bool
  angles: jax.Array            # (3,) radians about axes 0, 1, 2 ((1,) in 2D); 0 where not drawn
  scale_on: jax.Array          # () bool
  scale: jax.Array             # () isotropic scale; 1 where off
  noise: jax.Array             # () bool
  noise_std: jax.Array         # ()
  noise_key: jax.Array         # the key of the noise field
  blur: jax.Array              # () bool
  blur_channels: jax.Array     # (C,) bool; only counts where blur
  blur_sigma: jax.Array        # (C,)
  brightness: jax.Array        # () bool
  brightness_factor: jax.Array  # (C,)
  contrast: jax.Array          # () bool
  contrast_factor: jax.Array   # (C,)
  low_res: jax.Array           # () bool
  low_res_channels: jax.Array  # (C,) bool; only counts where low_res
  low_res_zoom: jax.Array      # (C,)
  gamma_inverted: jax.Array    # () bool
  gamma_inverted_value: jax.Array  # (C,)
  gamma: jax.Array             # () bool
  gamma_value: jax.Array       # (C,)
  mirror: jax.Array            # (ndim,) bool
  blur_radius: int = flax.struct.field(pytree_node=False, default=4)
  gamma_retain_stats: bool = flax.struct.field(pytree_node=False, default=True)

  @property
  def spatial(self) -> jax.Array:
    """Whether the affine resampling is applied (a rotation or a scaling was drawn)."""
    return self.rotate | self.scale_on


def identity_params(ndim: int, channels: int, config: Optional[NnUNetAugmentConfig] = None,
                    key: Optional[jax.Array] = None) -> AugmentParams:
  """Parameters that change nothing: every flag off, the values at the identity. Edit them with
  `.replace(...)` to apply chosen transforms (the tests do)."""
  _check_rank(ndim, channels)
  config = NnUNetAugmentConfig() if config is None else config
  f = lambda n=None: jnp.zeros(() if n is None else (n,), jnp.bool_)
  one = lambda n: jnp.ones((n,), jnp.float32)
  return AugmentParams(
      rotate=f(), angles=jnp.zeros((3 if ndim == 3 else 1,), jnp.float32),
      scale_on=f(), scale=jnp.ones((), jnp.float32),
      noise=f(), noise_std=jnp.zeros((), jnp.float32),
      noise_key=jax.random.PRNGKey(0) if key is None else key,
      blur=f(), blur_channels=f(channels), blur_sigma=jnp.full((channels,), 0.5, jnp.float32),
      brightness=f(), brightness_factor=one(channels),
      contrast=f(), contrast_factor=one(channels),
      low_res=f(), low_res_channels=f(channels), low_res_zoom=one(channels),
      gamma_inverted=f(), gamma_inverted_value=one(channels),
      gamma=f(), gamma_value=one(channels),
      mirror=f(ndim),
      blur_radius=config.blur_radius(), gamma_retain_stats=config.gamma_retain_stats)


def _check_rank(ndim: int, channels: int) -> None:
  if ndim not in (2, 3):
    raise ValueError(f"nnunet_augment: 2 or 3 spatial axes, got {ndim}")
  if channels < 1:
    raise ValueError(f"nnunet_augment: at least one channel, got {channels}")


class _Uniforms:
  """Hands out consecutive slices of one vector of U[0, 1) draws: one random-number call per sample
  (each `jax.random` call is a separate hash in the compiled program, and dozens of them made
  compilation slow). The layout is fixed by ndim and channels only, so changing a probability or a
  range changes no other transform's draws."""

  def __init__(self, key: jax.Array, n: int):
    self._u = jax.random.uniform(key, (n,), jnp.float32)
    self._next = 0

  def take(self, shape=()) -> jax.Array:
    size = int(np.prod(shape, dtype=np.int64))
    out = self._u[self._next:self._next + size].reshape(shape)
    self._next += size
    return out

  def coin(self, p: float, shape=()) -> jax.Array:
    return self.take(shape) < p

  def uniform(self, lo: float, hi: float, shape=()) -> jax.Array:
    return lo + self.take(shape) * (hi - lo)

  def half_below_one(self, lo: float, hi: float, shape=()) -> jax.Array:
    """nnU-Net's draw for ranges around 1: with probability 1/2 (if lo < 1) U[lo, 1), else
    U[max(lo, 1), hi); U[lo, hi) when hi <= 1 (nnU-Net would then draw from the empty [1, hi))."""
    pick, u = self.take(shape), self.take(shape)
    if hi <= 1:
      return lo + u * (hi - lo)
    high = max(lo, 1.0) + u * (hi - max(lo, 1.0))
    if lo >= 1:
      return high
    return jnp.where(pick < 0.5, lo + u * (1.0 - lo), high)


def _draw_count(ndim: int, channels: int) -> int:
  angles = 3 if ndim == 3 else 1
  return (1 + 2 * angles) + 3 + 2 + (1 + 2 * channels) + (1 + channels) + (1 + 2 * channels) \
      + (1 + 2 * channels) + 2 * (1 + 2 * channels) + ndim


def draw_params(key: jax.Array, config: NnUNetAugmentConfig, ndim: int,
                channels: int) -> AugmentParams:
  """One sample's random parameters for an image with `ndim` spatial axes and `channels` channels.

  All values come from one vector of uniform draws (`_Uniforms`) whose layout depends on ndim and
  channels only, and the noise field from a second key; so changing one probability or range does
  not change the other transforms' draws. Jittable; vmap over keys for a batch.
  """
  _check_rank(ndim, channels)
  c = config
  k_uniform, k_field = jax.random.split(key)
  u = _Uniforms(k_uniform, _draw_count(ndim, channels))

  # Spatial. Rotation: per sample, then per axis (nnU-Net compares the per-axis draw with <=).
  ranges = (c.rotation_x, c.rotation_y, c.rotation_z)[:3 if ndim == 3 else 1]
  rotate = u.coin(c.p_rotation)
  axis_on = u.take((len(ranges),)) <= c.p_rotation_per_axis
  lo = jnp.asarray([r[0] for r in ranges], jnp.float32)
  hi = jnp.asarray([r[1] for r in ranges], jnp.float32)
  angles = jnp.where(rotate & axis_on, lo + u.take((len(ranges),)) * (hi - lo), 0.0)
  scale_on = u.coin(c.p_scale)
  scale = jnp.where(scale_on, u.half_below_one(*c.scale_range), 1.0)

  noise = u.coin(c.p_noise)
  noise_std = jnp.where(noise, u.uniform(*c.noise_std_range), 0.0)

  blur = u.coin(c.p_blur)
  blur_channels = u.coin(c.p_blur_per_channel, (channels,))
  blur_sigma = u.uniform(*c.blur_sigma_range, (channels,))

  brightness = u.coin(c.p_brightness)
  brightness_factor = jnp.where(brightness, u.uniform(*c.brightness_range, (channels,)), 1.0)

  contrast = u.coin(c.p_contrast)
  contrast_factor = jnp.where(contrast, u.half_below_one(*c.contrast_range, (channels,)), 1.0)

  low_res = u.coin(c.p_low_resolution)
  low_res_channels = u.coin(c.p_low_resolution_per_channel, (channels,))
  low_res_zoom = jnp.where(low_res & low_res_channels,
                           u.uniform(*c.low_resolution_zoom_range, (channels,)), 1.0)

  gamma_inverted = u.coin(c.p_gamma_inverted)
  gamma_inverted_value = jnp.where(gamma_inverted, u.half_below_one(*c.gamma_range, (channels,)),
                                   1.0)
  gamma = u.coin(c.p_gamma)
  gamma_value = jnp.where(gamma, u.half_below_one(*c.gamma_range, (channels,)), 1.0)

  axes = tuple(range(ndim)) if c.mirror_axes is None else tuple(a for a in c.mirror_axes if a < ndim)
  allowed = jnp.asarray([a in axes for a in range(ndim)])
  mirror = u.coin(c.p_mirror_per_axis, (ndim,)) & allowed
  assert u._next == _draw_count(ndim, channels)

  return AugmentParams(
      rotate=rotate, angles=angles, scale_on=scale_on, scale=scale,
      noise=noise, noise_std=noise_std, noise_key=k_field,
      blur=blur, blur_channels=blur_channels, blur_sigma=blur_sigma,
      brightness=brightness, brightness_factor=brightness_factor,
      contrast=contrast, contrast_factor=contrast_factor,
      low_res=low_res, low_res_channels=low_res_channels, low_res_zoom=low_res_zoom,
      gamma_inverted=gamma_inverted, gamma_inverted_value=gamma_inverted_value,
      gamma=gamma, gamma_value=gamma_value, mirror=mirror,
      blur_radius=c.blur_radius(), gamma_retain_stats=c.gamma_retain_stats)


# ----------------------------------------------------------------------------------------------
# Spatial transform


def rotation_matrix(angles, xp=jnp):
  """batchgenerators' rotation: R = Rx(a0) @ Ry(a1) @ Rz(a2) in 3D, [[cos, -sin], [sin, cos]] in 2D.

  The sampling grid is multiplied by R from the right (coordinates as rows), i.e. an output
  voxel's offset from the centre d maps to R.T @ d in the input. `xp` is jnp or np.
  """
  if angles.shape[0] == 1:
    c, s = xp.cos(angles[0]), xp.sin(angles[0])
    return xp.stack([xp.stack([c, -s]), xp.stack([s, c])])
  cx, sx = xp.cos(angles[0]), xp.sin(angles[0])
  cy, sy = xp.cos(angles[1]), xp.sin(angles[1])
  cz, sz = xp.cos(angles[2]), xp.sin(angles[2])
  o, z = xp.ones_like(cx), xp.zeros_like(cx)
  rx = xp.stack([xp.stack([o, z, z]), xp.stack([z, cx, -sx]), xp.stack([z, sx, cx])])
  ry = xp.stack([xp.stack([cy, z, sy]), xp.stack([z, o, z]), xp.stack([-sy, z, cy])])
  rz = xp.stack([xp.stack([cz, -sz, z]), xp.stack([sz, cz, z]), xp.stack([z, z, o])])
  return _matmul(_matmul(rx, ry, xp), rz, xp)


def _matmul(a, b, xp):
  # Full float32 precision: accelerators may otherwise multiply in reduced precision (TF32).
  if xp is jnp:
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  return a @ b


def sampling_matrix(angles, scale, xp=jnp):
  """A with input offset = A @ output offset (both from their patch centres): scale * R.T."""
  return scale * rotation_matrix(angles, xp).T


def _check_out_shape(in_shape: Sequence[int], out_shape: Optional[Sequence[int]]) -> tuple[int, ...]:
  if out_shape is None:
    return tuple(in_shape)
  out_shape = tuple(int(s) for s in out_shape)
  if len(out_shape) != len(in_shape) or any(o > i or (i - o) % 2 for i, o in zip(in_shape, out_shape)):
    raise ValueError(f"nnunet_augment: out_shape {out_shape} must have the input's rank and fit "
                     f"in the input {tuple(in_shape)} with an even margin on each axis")
  return out_shape


def _centre_crop(x: jax.Array, out_shape: Sequence[int]) -> jax.Array:
  starts = [(s - o) // 2 for s, o in zip(x.shape, out_shape)]
  return x[tuple(slice(b, b + o) for b, o in zip(starts, out_shape))]


def _sample_coordinates(in_shape, out_shape, angles, scale) -> tuple[jax.Array, jax.Array]:
  """Input coordinates (ndim, *out_shape) of each output voxel, and whether they lie inside the
  input, [0, S - 1] on every axis (SciPy's mode='constant': 0 outside, no interpolation there),
  up to _EDGE_EPS for float32 rounding."""
  ndim = len(in_shape)
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(o, dtype=jnp.float32) - (o - 1) / 2.0
                                  for o in out_shape], indexing="ij"))
  a = sampling_matrix(angles, scale)
  coords = jnp.tensordot(a, grid, axes=1, precision=jax.lax.Precision.HIGHEST)
  coords = coords + jnp.asarray([(s - 1) / 2.0 for s in in_shape], jnp.float32).reshape(
      (ndim,) + (1,) * ndim)
  inside = jnp.ones(out_shape, jnp.bool_)
  for d in range(ndim):
    inside &= (coords[d] >= -_EDGE_EPS) & (coords[d] <= in_shape[d] - 1 + _EDGE_EPS)
  return coords, inside


def spatial_transform(image: jax.Array, label: Optional[jax.Array], angles: jax.Array,
                      scale: jax.Array, out_shape: Optional[Sequence[int]] = None):
  """Rotates and scales `image` (*S, C) and `label` (*S,) about the centre of the input, onto a grid
  of `out_shape` (default S) centred on it: image linearly, label by nearest neighbour (ties
  rounded up, as SciPy's order 0), both 0 where the sampling point is outside the input."""
  in_shape = image.shape[:-1]
  out_shape = _check_out_shape(in_shape, out_shape)
  coords, inside = _sample_coordinates(in_shape, out_shape, angles, scale)
  cs = [coords[d] for d in range(len(in_shape))]
  resample = lambda ch: jax.scipy.ndimage.map_coordinates(ch, cs, order=1, mode="constant", cval=0.0)
  out = jax.vmap(resample, in_axes=-1, out_axes=-1)(image)
  out = jnp.where(inside[..., None], out, jnp.zeros((), out.dtype))
  if label is None:
    return out, None
  lab = jax.scipy.ndimage.map_coordinates(label, cs, order=0, mode="constant", cval=0)
  lab = jnp.where(inside, lab, jnp.zeros((), label.dtype)).astype(label.dtype)
  return out, lab


# ----------------------------------------------------------------------------------------------
# Intensity transforms (all on (*S, C), per channel where stated)


def _spatial_axes(x) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def gaussian_blur(x: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Per-channel isotropic Gaussian blur of x (*S, C) with sigma (C,), as
  scipy.ndimage.gaussian_filter (mode 'reflect', kernel truncated at int(4 sigma + 0.5) voxels and
  normalised). `radius` (static) must be at least that for the largest sigma."""
  k = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  sig = sigma.astype(jnp.float32)[:, None]
  w = jnp.exp(-0.5 * (k[None, :] / sig) ** 2)
  w = jnp.where(jnp.abs(k)[None, :] <= jnp.floor(_BLUR_TRUNCATE * sig + 0.5), w, 0.0)
  w = w / w.sum(axis=1, keepdims=True)  # (C, 2r + 1)
  ndim, channels = x.ndim - 1, x.shape[-1]
  spec = "".join("DHW"[3 - ndim:])
  dims = (f"N{spec}C", f"{spec}IO", f"N{spec}C")
  out = x[None]
  for axis in range(ndim):
    pad = [(0, 0)] * (ndim + 2)
    pad[axis + 1] = (radius, radius)
    padded = jnp.pad(out, pad, mode="symmetric")  # SciPy's 'reflect': d c b a | a b c d
    shape = [1] * ndim + [1, channels]
    shape[axis] = 2 * radius + 1
    kernel = w.T.reshape(shape)  # depthwise: one 1D kernel per channel along `axis`
    out = jax.lax.conv_general_dilated(padded, kernel, (1,) * ndim, "VALID",
                                       dimension_numbers=dims, feature_group_count=channels,
                                       precision=jax.lax.Precision.HIGHEST)
  return out[0]


def contrast_change(x: jax.Array, factor: jax.Array) -> jax.Array:
  """(x - mean) * factor + mean per channel, clipped to the channel's [min, max] before."""
  ax = _spatial_axes(x)
  mean = x.mean(axis=ax, keepdims=True)
  return jnp.clip((x - mean) * factor + mean, x.min(axis=ax, keepdims=True),
                  x.max(axis=ax, keepdims=True))


def gamma_change(x: jax.Array, gamma: jax.Array, invert: bool, retain_stats: bool) -> jax.Array:
  """batchgenerators' per-channel gamma: ((x - min) / (range + eps))^gamma * (range + eps) + min,
  optionally on -x (and negated back), optionally restoring each channel's mean and std."""
  ax = _spatial_axes(x)
  if invert:
    x = -x
  mean, std = x.mean(axis=ax, keepdims=True), x.std(axis=ax, keepdims=True)
  lo = x.min(axis=ax, keepdims=True)
  rng = x.max(axis=ax, keepdims=True) - lo + _GAMMA_EPS
  y = jnp.power((x - lo) / rng, gamma) * rng + lo
  if retain_stats:
    y = y - y.mean(axis=ax, keepdims=True)
    y = y / (y.std(axis=ax, keepdims=True) + _RETAIN_STD_EPS) * std + mean
  return -y if invert else y


def _low_res_axis(x: jax.Array, axis: int, t: jax.Array) -> jax.Array:
  """Along `axis` of a single-channel x: nearest downsampling to t samples, then linear upsampling
  back, both pixel-edge aligned with edge replication (scipy.ndimage.zoom, grid_mode=True, mode
  'nearest', orders 0 then 1)."""
  n = x.shape[axis]
  t_f = t.astype(jnp.float32)
  pos = (jnp.arange(n, dtype=jnp.float32) + 0.5) * t_f / n - 0.5  # in the coarse grid
  pos = jnp.clip(pos, 0.0, t_f - 1.0)
  j0 = jnp.floor(pos).astype(jnp.int32)
  w = pos - j0
  j1 = jnp.minimum(j0 + 1, t - 1)
  # Coarse sample j takes fine voxel round((j + 0.5) n / t - 0.5), ties up: floor((2j + 1) n / 2t),
  # computed in integers so that ties are exact.
  src = lambda j: jnp.minimum(((2 * j + 1) * n) // (2 * t), n - 1)
  shape = [1] * x.ndim
  shape[axis] = n
  w = w.reshape(shape)
  return (1 - w) * jnp.take(x, src(j0), axis=axis) + w * jnp.take(x, src(j1), axis=axis)


def simulate_low_resolution(x: jax.Array, zoom: jax.Array) -> jax.Array:
  """Per channel: downsample to round(S * zoom) voxels per axis (nearest), upsample back to S
  (linear). x (*S, C), zoom (C,)."""
  spatial = x.shape[:-1]

  def one(ch, z):
    for axis, s in enumerate(spatial):
      t = jnp.maximum(jnp.round(s * z).astype(jnp.int32), 1)  # round half to even, as np.round
      ch = _low_res_axis(ch, axis, t)
    return ch

  return jax.vmap(one, in_axes=(-1, 0), out_axes=-1)(x, zoom)


def mirror(x: jax.Array, flags: jax.Array) -> jax.Array:
  """Reverses spatial axis d of x where flags[d]."""
  for d in range(flags.shape[0]):
    x = jnp.where(flags[d], jnp.flip(x, axis=d), x)
  return x


def noise_field(params: AugmentParams, shape: Sequence[int]) -> jax.Array:
  """The standard normal field that the noise transform scales by noise_std (float32)."""
  return jax.random.normal(params.noise_key, tuple(shape), jnp.float32)


def apply(image: jax.Array, label: Optional[jax.Array], params: AugmentParams,
          out_shape: Optional[Sequence[int]] = None):
  """Augments one sample: image (*S, C) float, label (*S,) int or None; returns (image, label) of
  spatial shape `out_shape` (static; default S), the label's dtype kept.

  A patch smaller than the input is nnU-Net's setup (its loader reads a larger patch so that
  rotated corners hold data): without a spatial transform the output is the centre crop, which
  needs an even margin on each axis. Jittable; vmap over (image, label, params) for a batch.
  """
  ndim = image.ndim - 1
  if ndim not in (2, 3):
    raise ValueError(f"nnunet_augment.apply: image (*S, C) with 2 or 3 spatial axes, got shape "
                     f"{image.shape}")
  if label is not None and label.shape != image.shape[:-1]:
    raise ValueError(f"nnunet_augment.apply: label shape {label.shape} is not the image's spatial "
                     f"shape {image.shape[:-1]}")
  out_shape = _check_out_shape(image.shape[:-1], out_shape)
  image = image.astype(jnp.float32)
  p = params

  warped, warped_label = spatial_transform(image, label, p.angles, p.scale, out_shape)
  x = jnp.where(p.spatial, warped, _centre_crop(image, out_shape))
  if label is not None:
    label = jnp.where(p.spatial, warped_label, _centre_crop(label, out_shape))

  x = jnp.where(p.noise, x + p.noise_std * noise_field(p, x.shape), x)
  x = jnp.where(p.blur & p.blur_channels, gaussian_blur(x, p.blur_sigma, p.blur_radius), x)
  x = jnp.where(p.brightness, x * p.brightness_factor, x)
  x = jnp.where(p.contrast, contrast_change(x, p.contrast_factor), x)
  x = jnp.where(p.low_res & p.low_res_channels, simulate_low_resolution(x, p.low_res_zoom), x)
  x = jnp.where(p.gamma_inverted,
                gamma_change(x, p.gamma_inverted_value, True, p.gamma_retain_stats), x)
  x = jnp.where(p.gamma, gamma_change(x, p.gamma_value, False, p.gamma_retain_stats), x)

  x = mirror(x, p.mirror)
  if label is not None:
    label = mirror(label, p.mirror)
  return x, label


def augment_batch(key: jax.Array, images: jax.Array, labels: Optional[jax.Array],
                  config: NnUNetAugmentConfig, out_shape: Optional[Sequence[int]] = None):
  """Augments a batch: images (B, *S, C), labels (B, *S) or None. Sample i uses the key
  fold_in(key, i). Returns (images, labels, params), the params batched."""
  b, ndim, channels = images.shape[0], images.ndim - 2, images.shape[-1]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))
  params = jax.vmap(lambda k: draw_params(k, config, ndim, channels))(keys)
  if labels is None:
    out, _ = jax.vmap(lambda x, p: apply(x, None, p, out_shape))(images, params)
    return out, None, params
  out, lab = jax.vmap(lambda x, y, p: apply(x, y, p, out_shape))(images, labels, params)
  return out, lab, params


# ----------------------------------------------------------------------------------------------
# Host reference (NumPy / SciPy), from the same parameters


def _host(params: AugmentParams) -> dict[str, Any]:
  """The params as NumPy arrays (float64 values), one sample."""
  out = {}
  for f in dataclasses.fields(params):
    v = getattr(params, f.name)
    if f.name == "noise_key" or not isinstance(v, (jax.Array, np.ndarray)):
      out[f.name] = v
    else:
      a = np.asarray(v)
      out[f.name] = a.astype(np.float64) if a.dtype.kind == "f" else a
  return out


def reference_spatial(image: np.ndarray, label: Optional[np.ndarray], params: AugmentParams,
                      out_shape: Optional[Sequence[int]] = None):
  """The spatial transform with scipy.ndimage.affine_transform in float64: order 1 for the image,
  order 0 for the label, then 0 where the sampling point is outside the input by more than
  _EDGE_EPS (as `apply`; SciPy's own mode='constant' has no such tolerance, and even in float64 a
  quarter turn puts whole edges 1e-16 outside). Without a rotation or scaling, the centre crop."""
  import scipy.ndimage as ndi

  p = _host(params)
  in_shape = image.shape[:-1]
  out_shape = _check_out_shape(in_shape, out_shape)
  if not (p["rotate"] or p["scale_on"]):
    crop = tuple(slice((s - o) // 2, (s - o) // 2 + o) for s, o in zip(in_shape, out_shape))
    return image[crop].astype(np.float32), None if label is None else label[crop]
  a = sampling_matrix(p["angles"], p["scale"], np)
  offset = (np.asarray(in_shape) - 1) / 2.0 - a @ ((np.asarray(out_shape) - 1) / 2.0)
  grid = np.stack(np.meshgrid(*[np.arange(o, dtype=np.float64) for o in out_shape], indexing="ij"))
  coords = np.tensordot(a, grid, axes=1) + offset.reshape((-1,) + (1,) * len(out_shape))
  inside = np.all([(coords[d] >= -_EDGE_EPS) & (coords[d] <= s - 1 + _EDGE_EPS)
                   for d, s in enumerate(in_shape)], axis=0)
  # Inside [0, S - 1], mode 'nearest' interpolates exactly as 'constant'; it also gives the edge
  # value (not 0) to the points within _EDGE_EPS outside.
  out = np.stack([ndi.affine_transform(image[..., c].astype(np.float64), a, offset, out_shape,
                                       order=1, mode="nearest")
                  for c in range(image.shape[-1])], axis=-1)
  out = np.where(inside[..., None], out, 0.0).astype(np.float32)
  if label is None:
    return out, None
  lab = ndi.affine_transform(label, a, offset, out_shape, order=0, mode="nearest")
  return out, np.where(inside, lab, 0).astype(label.dtype)


def reference_low_resolution(channel: np.ndarray, zoom: float) -> np.ndarray:
  """One channel (*S,) through scipy.ndimage.zoom: nearest down to round(S * zoom), linear back."""
  import scipy.ndimage as ndi

  shape = np.asarray(channel.shape)
  target = np.maximum(np.round(shape * zoom).astype(int), 1)
  down = ndi.zoom(channel.astype(np.float64), target / shape, order=0, mode="nearest",
                  grid_mode=True)
  assert down.shape == tuple(target), (down.shape, target)
  return ndi.zoom(down, shape / target, order=1, mode="nearest", grid_mode=True)


def reference_gamma(channel: np.ndarray, gamma: float, invert: bool, retain_stats: bool):
  """batchgenerators' per-channel gamma on one channel, in float64."""
  x = -channel.astype(np.float64) if invert else channel.astype(np.float64)
  mean, std = x.mean(), x.std()
  lo, rng = x.min(), x.max() - x.min() + _GAMMA_EPS
  y = ((x - lo) / rng) ** gamma * rng + lo
  if retain_stats:
    y = (y - y.mean()) / (y.std() + _RETAIN_STD_EPS) * std + mean
  return -y if invert else y


def reference_apply(image: np.ndarray, label: Optional[np.ndarray], params: AugmentParams,
                    out_shape: Optional[Sequence[int]] = None):
  """The whole of `apply` on the host with NumPy/SciPy, in float64 (the noise field is drawn with
  JAX from the params' key, `noise_field`)."""
  import scipy.ndimage as ndi

  p = _host(params)
  x, label = reference_spatial(image, label, params, out_shape)
  x = x.astype(np.float64)
  channels = x.shape[-1]
  if p["noise"]:
    x = x + p["noise_std"] * np.asarray(noise_field(params, x.shape), np.float64)
  if p["blur"]:
    for c in range(channels):
      if p["blur_channels"][c]:
        x[..., c] = ndi.gaussian_filter(x[..., c], p["blur_sigma"][c], mode="reflect",
                                        truncate=_BLUR_TRUNCATE)
  if p["brightness"]:
    x = x * p["brightness_factor"]
  if p["contrast"]:
    for c in range(channels):
      ch = x[..., c]
      x[..., c] = np.clip((ch - ch.mean()) * p["contrast_factor"][c] + ch.mean(), ch.min(), ch.max())
  if p["low_res"]:
    for c in range(channels):
      if p["low_res_channels"][c]:
        x[..., c] = reference_low_resolution(x[..., c], p["low_res_zoom"][c])
  for on, values, invert in ((p["gamma_inverted"], p["gamma_inverted_value"], True),
                             (p["gamma"], p["gamma_value"], False)):
    if on:
      for c in range(channels):
        x[..., c] = reference_gamma(x[..., c], values[c], invert, p["gamma_retain_stats"])
  for d in range(x.ndim - 1):
    if p["mirror"][d]:
      x = np.flip(x, axis=d)
      label = None if label is None else np.flip(label, axis=d)
  return np.ascontiguousarray(x.astype(np.float32)), (None if label is None
                                                       else np.ascontiguousarray(label))
