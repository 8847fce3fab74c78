"""Critics (discriminators) of the adversarial methods.

`PixelCritic` is Duo-SegNet's per-pixel critic (`himashi92/Duo-SegNet model/model_discriminator.py`
`PixelDiscriminator(input_nc=1, ndf=64, norm_layer=nn.BatchNorm2d)`, METHODS §9.4): all 1×1 convs,

    Conv 1→64 (bias) → LReLU(0.2) → Conv 64→128 (no bias) → BN → LReLU(0.2) → Conv 128→1 (no bias)

8,704 parameters. It reads a probability map or mask only (no image) and returns a per-pixel logit; the
sigmoid is applied outside (the reference builds it with use_sigmoid=False and applies `torch.sigmoid`
in the loss). Being 1×1, it is rank-generic (2D and 3D).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax

from jaxseg.models import layers

Array = jax.Array

__all__ = ["PixelCritic", "duo_critic"]


class PixelCritic(nn.Module):
  """Per-pixel critic: 1×1 convs, norm, LeakyReLU.

  Attributes:
    ndf: width of the first conv (64); the second has 2·ndf.
    norm: one of `layers.NORMS`. "batch" is the reference; with "instance"/"instance_affine" the two
      later convs get a bias, as in the reference's `use_bias = norm_layer == InstanceNorm2d`.
    negative_slope: the LeakyReLU slope (0.2).
    weight_init: one of `layers.WEIGHT_INITS`; "torch" (PyTorch default init) as in the reference.
    bn_axis_name: BatchNorm cross-device axis name (None: no cross-device sync).
    dtype: the computation dtype (None: float32 from the parameters).
  """
  ndf: int = 64
  norm: str = "batch"
  negative_slope: float = 0.2
  weight_init: str = "torch"
  bn_axis_name: Optional[str] = None
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, p: Array, train: bool) -> Array:
    """Scores each pixel.

    Args:
      p: probability maps or masks, (N, H, W, C) or (N, X, Y, Z, C) (C = 1 in Duo-SegNet).
      train: training mode: BatchNorm uses batch statistics and updates `batch_stats` (apply with
        `mutable=["batch_stats"]`); eval mode uses the running averages.

    Returns:
      Logits (N, *spatial, 1); σ(logit) is the critic's probability.
    """
    later_bias = self.norm in ("instance", "instance_affine")
    conv = lambda f, bias, name: layers.Conv(f, 1, use_bias=bias, weight_init=self.weight_init,
                                              dtype=self.dtype, name=name)
    x = conv(self.ndf, True, "conv_0")(p)
    x = nn.leaky_relu(x, self.negative_slope)
    x = conv(2 * self.ndf, later_bias, "conv_1")(x)
    x = layers.norm_layer(self.norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype,
                          name="norm_1")(x)
    x = nn.leaky_relu(x, self.negative_slope)
    return conv(1, later_bias, "conv_2")(x)


def duo_critic(**overrides: Any) -> PixelCritic:
  """Duo-SegNet's critic, `PixelDiscriminator(input_nc=1, ndf=64)` with BatchNorm: 8,704 parameters."""
  config: dict[str, Any] = dict(ndf=64, norm="batch", negative_slope=0.2, weight_init="torch")
  config.update(overrides)
  return PixelCritic(**config)
