"""U-Nets for 2D and 3D (docs/networks.md).

One `UNet` module covers the U-Nets of the reference code; the kernel rank comes from the input, so
the same configuration runs on (N, H, W, C) and (N, X, Y, Z, C). The presets reproduce:

* `duo_unet`: Duo-SegNet's `model/UNet.py` (2D, RGB in, one logit out, bilinear align_corners=True
  upsampling, BN, ReLU): 31,390,721 parameters.
* `ssl4mis_unet3d`: SSL4MIS `unet_3D` (filters 16…256, InstanceNorm without affine, trilinear
  align_corners=False upsampling, element-wise Dropout(0.3) after the centre and before the head,
  Kaiming-normal init): 5,884,050 parameters for 1 input channel and 2 classes.
* `ssl4mis_unet2d`: SSL4MIS 2D `UNet` (filters 16…256, BN, LeakyReLU(0.01),
  encoder dropout [0.05, 0.1, 0.2, 0.3, 0.5] inside the blocks, 2×2 s2 transposed-conv upsampling,
  3×3 head).

Architecture (L = len(features) levels):

    x ─ block(f0) ──────────────────────────────────────── concat ─ block(f0) ─ head ─> logits
          └ pool ─ block(f1) ──────────────── concat ─ block(f1) ─ up ┘
                     └ pool ─ … ─ block(f_{L-1}) ─ up ┘

Each `block` is `ConvBlock` (2 × [Conv 3 → norm → activation]); `pool` is a 2× max-pool; `up` is a 2×
upsampling (interpolation, optionally preceded by a 1×1 projection to the skip width, or a k2 s2
transposed convolution to the skip width); the concatenation order is [skip, up]. Modules are
architecture only: they return logits.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models import layers

Array = jax.Array

__all__ = ["UPSAMPLE_MODES", "UNet", "duo_unet", "ssl4mis_unet2d", "ssl4mis_unet3d"]

UPSAMPLE_MODES = ("linear", "linear_align_corners", "nearest", "transpose")


class UNet(nn.Module):
  """A configurable 2D/3D U-Net.

  Attributes:
    num_classes: output channels of the head (logits).
    features: channels per level, from the input level to the bottleneck; depth = len(features).
    norm: one of `layers.NORMS` ("batch", "instance", "instance_affine", "group", "none").
    activation: "relu" or "leaky_relu".
    negative_slope: the LeakyReLU slope.
    upsample: one of `UPSAMPLE_MODES`:
      "linear": bi/trilinear, align_corners=False (PyTorch's default; SSL4MIS `unet_3D`);
      "linear_align_corners": bi/trilinear, align_corners=True (Duo-SegNet);
      "nearest": nearest neighbour;
      "transpose": k2 s2 transposed convolution (dense + depth-to-space) to the skip width.
    up_projection: for the interpolating modes, a 1×1 conv to the skip width before upsampling (SSL4MIS
      `UpBlock(bilinear=True)`); without it the decoder block sees C_skip + C_deeper channels.
    encoder_dropout: per-level element-wise dropout rates between the two convs of each encoder block
      (SSL4MIS 2D), or None for none; decoder blocks have none.
    bottleneck_dropout: element-wise dropout rate after the bottleneck block (`unet_3D`: 0.3).
    head_dropout: element-wise dropout rate before the head (`unet_3D`: 0.3).
    head_kernel_size: kernel of the output conv (1; SSL4MIS 2D: 3).
    num_groups: groups of norm="group".
    weight_init: one of `layers.WEIGHT_INITS`; "torch" (PyTorch default init) unless stated.
    bn_axis_name: BatchNorm cross-device axis name (None: no cross-device sync).
    dtype: the computation dtype (None: float32 from the parameters).
  """
  num_classes: int = 1
  features: Sequence[int] = (64, 128, 256, 512, 1024)
  norm: str = "batch"
  activation: str = "relu"
  negative_slope: float = 0.01
  upsample: str = "linear_align_corners"
  up_projection: bool = False
  encoder_dropout: Optional[Sequence[float]] = None
  bottleneck_dropout: float = 0.0
  head_dropout: float = 0.0
  head_kernel_size: int = 1
  num_groups: int = 16
  weight_init: str = "torch"
  bn_axis_name: Optional[str] = None
  dtype: Optional[Any] = None
  conv_impl: str = "auto"  # layers.Conv.impl of the 3x3(x3) convolutions.

  def _block(self, features: int, dropout_rate: float, name: str) -> layers.ConvBlock:
    return layers.ConvBlock(
        features, num_convs=2, kernel_size=3, norm=self.norm, activation=self.activation,
        negative_slope=self.negative_slope, dropout_rate=dropout_rate, num_groups=self.num_groups,
        weight_init=self.weight_init, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
        conv_impl=self.conv_impl, name=name)

  def _up(self, x: Array, features: int, level: int) -> Array:
    if self.upsample == "transpose":
      return layers.ConvTranspose2x(features, weight_init=self.weight_init, dtype=self.dtype,
                                    name=f"up_{level}")(x)
    if self.up_projection:
      x = layers.Conv(features, 1, weight_init=self.weight_init, dtype=self.dtype,
                      name=f"up_proj_{level}")(x)
    if self.upsample == "linear":
      return layers.upsample_linear(x, 2, align_corners=False)
    if self.upsample == "linear_align_corners":
      return layers.upsample_linear(x, 2, align_corners=True)
    return layers.upsample_nearest(x, 2)

  @nn.compact
  def __call__(self, x: Array, train: bool, dropout: Optional[bool] = None) -> Array:
    """Segments a batch.

    Args:
      x: (N, H, W, C_in) or (N, X, Y, Z, C_in); every spatial size divisible by 2^(depth − 1).
      train: training mode: BatchNorm uses batch statistics and updates `batch_stats` (apply with
        `mutable=["batch_stats"]`); dropout is on. Eval mode uses the running averages.
      dropout: overrides whether dropout is on (default: `train`); needs the 'dropout' RNG when on.

    Returns:
      Logits (N, *spatial, num_classes).
    """
    if self.upsample not in UPSAMPLE_MODES:
      raise ValueError(f"Unknown upsample {self.upsample!r}; expected one of {UPSAMPLE_MODES}.")
    depth = len(self.features)
    enc_dropout = tuple(self.encoder_dropout) if self.encoder_dropout is not None else (0.0,) * depth
    if len(enc_dropout) != depth:
      raise ValueError(f"encoder_dropout has {len(enc_dropout)} rates for {depth} levels.")
    factor = 2**(depth - 1)
    if x.ndim < 3 or any(s % factor for s in x.shape[1:-1]):
      raise ValueError(f"Input {x.shape} must be (N, *spatial, C) with spatial sizes divisible by "
                       f"{factor}.")
    use_dropout = train if dropout is None else dropout

    skips = []
    for level, (f, rate) in enumerate(zip(self.features, enc_dropout)):
      if level > 0:
        x = layers.max_pool(x, 2)
      x = self._block(f, rate, f"enc_{level}")(x, train, use_dropout)
      skips.append(x)
    x = skips.pop()
    if self.bottleneck_dropout > 0:
      x = nn.Dropout(self.bottleneck_dropout, deterministic=not use_dropout)(x)
    for level in reversed(range(depth - 1)):
      skip = skips[level]
      up = self._up(x, skip.shape[-1], level)
      x = jnp.concatenate([skip, up], axis=-1)
      x = self._block(self.features[level], 0.0, f"dec_{level}")(x, train, use_dropout)
    if self.head_dropout > 0:
      x = nn.Dropout(self.head_dropout, deterministic=not use_dropout)(x)
    return layers.at_least_float32(
        layers.Conv(self.num_classes, self.head_kernel_size, padding=self.head_kernel_size // 2,
                    weight_init=self.weight_init, dtype=self.dtype, name="head")(x))


def duo_unet(**overrides: Any) -> UNet:
  """Duo-SegNet's U-Net (`himashi92/Duo-SegNet model/UNet.py`; docs/networks.md).

  Feed RGB (N, H, W, 3) (grayscale replicated to 3 channels); returns one logit (N, H, W, 1).
  Blocks 2 × [Conv 3×3 p1 (bias) → BN → ReLU], filters 64…1024, max-pool 2, bilinear ×2 upsampling with
  align_corners=True, concatenation [skip, up], 1×1 head; PyTorch default init. 31,390,721 parameters.
  """
  config = dict(num_classes=1, features=(64, 128, 256, 512, 1024), norm="batch", activation="relu",
                upsample="linear_align_corners", head_kernel_size=1, weight_init="torch")
  config.update(overrides)
  return UNet(**config)


def ssl4mis_unet3d(num_classes: int = 2, **overrides: Any) -> UNet:
  """SSL4MIS `unet_3D` (`HiLab-git/SSL4MIS code/networks/unet_3D.py`; docs/networks.md).

  Filters [16, 32, 64, 128, 256]; blocks 2 × [Conv 3³ (bias) → InstanceNorm (no affine, ε 1e-5) → ReLU];
  max-pool 2; element-wise Dropout(0.3) after the centre block; trilinear ×2 (align_corners=False),
  concatenation [skip, up], block to C_skip; Dropout(0.3) and a 1³ head; Kaiming-normal init.
  5,884,050 parameters for 1 input channel and 2 classes. (The reference pads the skip when sizes are
  odd; here sizes must be divisible by 16.)
  """
  config = dict(num_classes=num_classes, features=(16, 32, 64, 128, 256), norm="instance",
                activation="relu", upsample="linear", bottleneck_dropout=0.3, head_dropout=0.3,
                head_kernel_size=1, weight_init="kaiming_normal")
  config.update(overrides)
  return UNet(**config)


def ssl4mis_unet2d(num_classes: int = 2, **overrides: Any) -> UNet:
  """SSL4MIS 2D `UNet` (`HiLab-git/SSL4MIS code/networks/unet.py`; docs/networks.md).

  Filters [16, 32, 64, 128, 256]; blocks Conv 3×3 → BN → LeakyReLU(0.01) → Dropout(p) → Conv 3×3 → BN →
  LeakyReLU with encoder p = [0.05, 0.1, 0.2, 0.3, 0.5] and decoder p = 0; up = ConvTranspose 2×2 s2 to
  the skip width, concatenation [skip, up]; a 3×3 head; PyTorch default init. Some SSL4MIS versions
  build `UNet` with `bilinear=True` instead: pass `upsample="linear_align_corners", up_projection=True`.
  """
  config = dict(num_classes=num_classes, features=(16, 32, 64, 128, 256), norm="batch",
                activation="leaky_relu", negative_slope=0.01, upsample="transpose",
                encoder_dropout=(0.05, 0.1, 0.2, 0.3, 0.5), head_kernel_size=3, weight_init="torch")
  config.update(overrides)
  return UNet(**config)
