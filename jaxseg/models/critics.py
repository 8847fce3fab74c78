"""Critics (discriminators) of the adversarial methods.

`PixelCritic` is Duo-SegNet's per-pixel critic (`himashi92/Duo-SegNet model/model_discriminator.py`
`PixelDiscriminator(input_nc=1, ndf=64, norm_layer=nn.BatchNorm2d)`; docs/networks.md): all 1×1 convs,

    Conv 1→64 (bias) → LReLU(0.2) → Conv 64→128 (no bias) → BN → LReLU(0.2) → Conv 128→1 (no bias)

8,704 parameters. It reads a probability map or mask only (no image) and returns a per-pixel logit; the
sigmoid is applied outside (the reference builds it with use_sigmoid=False and applies `torch.sigmoid`
in the loss). Being 1×1, it is rank-generic (2D and 3D).

`SDFDiscriminator` is SASSNet's image-level discriminator (`kleinzcy/SASSnet
code/networks/discriminator.py` `FC3DDiscriminator(num_classes=1, ndf=64, n_channel=1)`;
docs/networks.md): it scores a (signed distance map, image) pair as coming from a labeled (class 1) or an
unlabeled (class 0) sample. All convs are k4 s2 p1 with bias, no normalisation:

    conv0(SDM) 1→ndf + conv1(image) C→ndf → LReLU(0.2) → Dropout3d(0.5)
    → conv2 ndf→2ndf → LReLU → Dropout3d → conv3 2ndf→4ndf → LReLU → Dropout3d
    → conv4 4ndf→8ndf → LReLU → global mean pool → Linear 8ndf→2 (logits)

11,020,290 parameters at ndf = 64 with a 1-channel image. The reference pools with AvgPool3d(7, 7,
5), which is global only at 112×112×80 (the feature size there after four stride-2 convs); here
the pool is global at every input size, so the module is rank-generic (2D and 3D) and any crop size works.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models import layers

Array = jax.Array

__all__ = ["PixelCritic", "SDFDiscriminator", "duo_critic", "sassnet_discriminator"]


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
    return layers.at_least_float32(conv(1, later_bias, "conv_2")(x))


def duo_critic(**overrides: Any) -> PixelCritic:
  """Duo-SegNet's critic, `PixelDiscriminator(input_nc=1, ndf=64)` with BatchNorm: 8,704 parameters."""
  config: dict[str, Any] = dict(ndf=64, norm="batch", negative_slope=0.2, weight_init="torch")
  config.update(overrides)
  return PixelCritic(**config)


class SDFDiscriminator(nn.Module):
  """SASSNet's discriminator of (SDM, image) pairs: strided k4 convs, global pool, 2 logits.

  Attributes:
    ndf: width of the stems (64); the later convs have 2·ndf, 4·ndf, 8·ndf.
    negative_slope: the LeakyReLU slope (0.2).
    dropout_rate: channel-wise dropout (PyTorch `Dropout3d(0.5)`) after the first three stages, in
      train mode only.
    weight_init: one of `layers.WEIGHT_INITS`; "torch" (PyTorch default init) as in the reference,
      also for the classifier (`nn.Linear`: kernel and bias U(±1/√fan_in)).
    dtype: the computation dtype (None: float32 from the parameters).
  """
  ndf: int = 64
  negative_slope: float = 0.2
  dropout_rate: float = 0.5
  weight_init: str = "torch"
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, sdm: Array, image: Array, train: bool) -> Array:
    """Classifies each sample.

    Args:
      sdm: signed distance maps (N, *spatial, 1) (the segmenter's tanh head), 2D or 3D.
      image: the images (N, *spatial, C) the maps were predicted from.
      train: training mode: channel dropout is on (apply with `rngs={"dropout": key}`); eval mode
        is deterministic.

    Returns:
      Logits (N, 2): class 1 = "from a labeled sample", class 0 = "from an unlabeled sample".
    """
    if sdm.shape[:-1] != image.shape[:-1] or sdm.ndim < 3:
      raise ValueError(f"SDFDiscriminator: sdm {sdm.shape} and image {image.shape} must be "
                       "(N, *spatial, C) with the same N and spatial sizes.")
    d = sdm.ndim - 2
    # PyTorch's k4 s2 p1 pads one voxel on both sides of every axis (not Flax's asymmetric "SAME").
    conv = lambda features, name: layers.Conv(features, 4, strides=2, padding=((1, 1),) * d,
                                              weight_init=self.weight_init, dtype=self.dtype,
                                              name=name)
    act = lambda x: nn.leaky_relu(x, self.negative_slope)
    dropout = lambda x: layers.channel_dropout(self.dropout_rate, not train, x)

    x = conv(self.ndf, "conv0")(sdm) + conv(self.ndf, "conv1")(image)
    x = dropout(act(x))
    x = dropout(act(conv(2 * self.ndf, "conv2")(x)))
    x = dropout(act(conv(4 * self.ndf, "conv3")(x)))
    x = act(conv(8 * self.ndf, "conv4")(x))
    x = jnp.mean(x, axis=tuple(range(1, d + 1)))
    kernel_init, bias_init = layers.initializers(self.weight_init, x.shape[-1])
    return layers.at_least_float32(nn.Dense(2, kernel_init=kernel_init, bias_init=bias_init,
                                            dtype=self.dtype, name="classifier")(x))


def sassnet_discriminator(**overrides: Any) -> SDFDiscriminator:
  """SASSNet's `FC3DDiscriminator(num_classes=1, ndf=64)`: 11,020,290 parameters (1-channel
  image)."""
  config: dict[str, Any] = dict(ndf=64, negative_slope=0.2, dropout_rate=0.5, weight_init="torch")
  config.update(overrides)
  return SDFDiscriminator(**config)
