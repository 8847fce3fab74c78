"""On-device intensity augmentation of training batches (`data.intensity_augment`), for any method.

Each sample's image (*S, C) gets, in this order, each with its own probability per sample and its
factor drawn per channel:

1. scale:    x * s,                         s ~ U[scale_range)
2. shift:    x + b,                         b ~ U[shift_range), in intensity units (a z-scored
                                            image's standard deviations)
3. contrast: (x - mean) * c + mean, clipped to the channel's [min, max] of before (nnU-Net's
             contrast transform, `nnunet_augment.contrast_change`), c "half below 1" in
             contrast_range (nnU-Net's draw)
4. gamma:    batchgenerators' gamma of the channel's range, its mean and std restored
             (`nnunet_augment.gamma_change`), gamma "half below 1" in gamma_range.

The statistics (mean, min, max, std) are those of the sample's crop, as nnU-Net takes them. The
transforms 3 and 4 and the draws are MAML's nnU-Net augmentation's (`jaxseg.data.nnunet_augment`);
scale is its multiplicative brightness; shift is added here (nnU-Net leaves additive brightness
off). It exists so that a network trained on few cases also sees intensity scales other than
theirs (docs/la_protocol.md, the cases stored with a compressed range).

The trainer wraps the method's train step (`with_intensity_augment`): the batch's images, labeled
and unlabeled streams, are augmented inside the jitted step with keys derived from the step's key
(fold_in(key, KEY_TAG), then the stream, then the sample), so a resumed run draws the same
augmentations. Labels are never changed. Off (the default), the step is the method's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from jaxseg import config_blocks
from jaxseg.data import nnunet_augment
from jaxseg.data.base import DataError

KEY_TAG = 0x1A7E  # Folded into the step's key: the augmentation's draws, apart from the method's.
BLOCK = "data.intensity_augment"


@dataclasses.dataclass(frozen=True)
class IntensityAugmentConfig:
  """The `data.intensity_augment` block: probabilities per sample and (lo, hi) ranges; the
  defaults are `config_blocks.INTENSITY_AUGMENT` (nnU-Net v1's moreDA values for brightness, as
  scale, contrast and gamma; shift p 0.15 in (-0.25, 0.25)). Checked by the config checks'
  entries of the block (one error line naming the key)."""

  enabled: bool = False
  p_scale: float = 0.15
  scale_range: tuple[float, float] = (0.75, 1.25)
  p_shift: float = 0.15
  shift_range: tuple[float, float] = (-0.25, 0.25)
  p_contrast: float = 0.15
  contrast_range: tuple[float, float] = (0.75, 1.25)
  p_gamma: float = 0.3
  gamma_range: tuple[float, float] = (0.7, 1.5)

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if isinstance(v, list):
        object.__setattr__(self, f.name, tuple(v))
      accepts, what = config_blocks.CHECKS[f"{BLOCK}.{f.name}"]
      if not accepts(getattr(self, f.name)):
        config_blocks._fail(f"{BLOCK}.{f.name}", getattr(self, f.name), what)

  @classmethod
  def from_config(cls, block: Optional[Mapping[str, Any]]) -> "IntensityAugmentConfig":
    """From the config block (missing keys at their defaults; unknown ones refused)."""
    block = {} if block is None else dict(block)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(block) - names)
    if unknown:
      raise DataError(f"config {BLOCK}.{unknown[0]}: unknown key; the keys are "
                      f"{', '.join(sorted(names))}")
    return cls(**block)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IntensityParams:
  """One sample's draws: flags () bool, factors (C,)."""

  scale: jax.Array
  scale_factor: jax.Array
  shift: jax.Array
  shift_value: jax.Array
  contrast: jax.Array
  contrast_factor: jax.Array
  gamma: jax.Array
  gamma_value: jax.Array


def draw_params(key: jax.Array, config: IntensityAugmentConfig, channels: int) -> IntensityParams:
  """One sample's parameters from one vector of uniform draws (layout fixed by `channels`)."""
  u = nnunet_augment._Uniforms(key, 4 + 2 * channels + 3 * 2 * channels)
  c = config
  scale = u.coin(c.p_scale)
  scale_factor = jnp.where(scale, u.uniform(*c.scale_range, (channels,)), 1.0)
  shift = u.coin(c.p_shift)
  shift_value = jnp.where(shift, u.uniform(*c.shift_range, (channels,)), 0.0)
  contrast = u.coin(c.p_contrast)
  contrast_factor = jnp.where(contrast, u.half_below_one(*c.contrast_range, (channels,)), 1.0)
  gamma = u.coin(c.p_gamma)
  gamma_value = jnp.where(gamma, u.half_below_one(*c.gamma_range, (channels,)), 1.0)
  return IntensityParams(scale, scale_factor, shift, shift_value, contrast, contrast_factor,
                         gamma, gamma_value)


def apply(image: jax.Array, p: IntensityParams) -> jax.Array:
  """`image` (*S, C) float32 with the transforms of `p` (each kept where its flag is on)."""
  x = image * p.scale_factor
  x = x + p.shift_value
  x = jnp.where(p.contrast, nnunet_augment.contrast_change(x, p.contrast_factor), x)
  x = jnp.where(p.gamma, nnunet_augment.gamma_change(x, p.gamma_value, False, True), x)
  return x.astype(image.dtype)


def augment_images(key: jax.Array, images: jax.Array, config: IntensityAugmentConfig
                   ) -> jax.Array:
  """images (B, *S, C) augmented; sample i uses fold_in(key, i)."""
  if images.shape[0] == 0:
    return images
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
  channels = images.shape[-1]
  return jax.vmap(lambda k, x: apply(x, draw_params(k, config, channels)))(keys, images)


def augment_batch(key: jax.Array, batch, config: IntensityAugmentConfig):
  """`batch` (a `batches.Batch`) with the images of both streams augmented: the labeled stream
  with fold_in(key, 0), the unlabeled one with fold_in(key, 1)."""
  streams = []
  for index, stream in enumerate((batch.labeled, batch.unlabeled)):
    stream = dict(stream)
    stream["image"] = augment_images(jax.random.fold_in(key, index), stream["image"], config)
    streams.append(stream)
  return batch.replace(labeled=streams[0], unlabeled=streams[1])


def with_intensity_augment(train_step: Callable, data_cfg) -> Callable:
  """`train_step(state, batch, key)` whose batch is first augmented (`augment_batch` with
  fold_in(key, KEY_TAG)) when `data.intensity_augment.enabled`; else `train_step` itself."""
  block = data_cfg.get("intensity_augment", None)
  config = IntensityAugmentConfig.from_config(None if block is None else block.to_dict())
  if not config.enabled:
    return train_step

  def step(state, batch, key):
    batch = augment_batch(jax.random.fold_in(key, KEY_TAG), batch, config)
    return train_step(state, batch, key)
  return step
