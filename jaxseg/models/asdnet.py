"""ASDNet's networks (`ginobilinie/asdnet`; docs/networks.md): the confidence network
`Discriminator_my23DLRResFCN` (`asdnet_confidence`) and the released segmenter `HRResSegNet_DS`
(`hrres_segnet_ds`, documented on `HRResSegNetDS`). The paper's segmenter "SVNet" is `svnet` in vnet.py.

Confidence network:

A small fully convolutional encoder-decoder that reads a C-channel probability map (or a one-hot label)
and returns 2 logits per voxel; softmax(·)[…, 1] is the confidence that the voxel's map is "real"
(a label). LeakyReLU(0.2) after every encoder conv; biases on; BatchNorm only in the up units.

    layer     op                                              channels     size
    conv1     Conv 3 p1 → LReLU                               C → 32       S
    conv2     Conv 4 s2 p2, drop the last voxel → LReLU       32 → 64      S/2
    conv3     Conv 4 s2 p2, drop the last voxel → LReLU       64 → 128     S/4
    conv4     Conv 4 s2 p2, drop the last voxel → LReLU       128 → 256    S/8
    upconv3   up unit (bridge conv3)                          256 → 128    S/4
    upconv2   up unit (bridge conv2)                          128 → 64     S/2
    upconv1   up unit (bridge conv1)                          64 → 32      S
    convX     LReLU → Conv 1                                  32 → 2       S

Up unit (`BaseResUpUnit`) = ConvTranspose k4 s2 p1 (bias) → BN → ReLU, + bridge, ReLU.

The reference's decoder is miswired: it calls upconv2 on conv3 and upconv1 on conv2, so the output only
depends on conv1 → conv2 → upconv1 → convX. `decoder="as_coded"` keeps that wiring (every layer is still
built and run, so the parameter tree, the count and the BatchNorm statistics updates are the
reference's; conv3, conv4, upconv3 and upconv2 just never reach the output). `decoder="repaired"` (the
default) chains the decoder as its layer sizes intend: upconv3(conv4, conv3) → upconv2(·, conv2) →
upconv1(·, conv1).

Conv k4 s2 p2 followed by dropping the last output voxel on every axis is the same as padding (2, 1):
both keep the first S/2 windows. Spatial sizes must be divisible by 8.

Init: every conv and transposed conv Xavier-uniform with gain √2 and zero bias
(`weight_init="xavier_uniform"`), as the reference's units do; BN scale 1, offset 0.
"""

from __future__ import annotations

import string
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseg.models import layers

Array = jax.Array

__all__ = ["CONFIDENCE_DECODERS", "ConfidenceFCN", "ConvTranspose4x2", "HRResSegNetDS", "asdnet_confidence",
           "hrres_segnet_ds"]

CONFIDENCE_DECODERS = ("repaired", "as_coded")

# _TAPS[a, s, t] = 1 when output parity a of a k4 s2 p1 transposed conv reads input offset s − 1 through
# kernel tap t (Flax orientation: the unflipped kernel slides over the 2-dilated input, padded by 2):
# out[2i] = x[i−1]·k[0] + x[i]·k[2], out[2i+1] = x[i]·k[1] + x[i+1]·k[3].
_TAPS = np.zeros((2, 3, 4), np.float32)
_TAPS[0, 0, 0] = _TAPS[0, 1, 2] = _TAPS[1, 1, 1] = _TAPS[1, 2, 3] = 1.0


class ConvTranspose4x2(nn.Module):
  """Transposed convolution, kernel 4, stride 2, padding 1 (PyTorch), without input dilation.

  Equal to `lax.conv_general_dilated(x, kernel, 1, ((2, 2),)*d, lhs_dilation=(2,)*d)` (Flax's
  `ConvTranspose(features, 4, strides=2, padding=((2, 2),)*d)`): (N, *S, C_in) -> (N, *(2S), C_out).
  Each output parity a ∈ {0, 1}^d reads a 2^d sub-kernel over the input neighbours {i−1, i, i+1}, so
  the layer is one stride-1 3^d convolution to 2^d·C_out channels (the sub-kernels scattered into a
  3^d kernel, zeros elsewhere) followed by depth-to-space. This avoids XLA's input-dilated convolution,
  whose gradient is ≈30× slower (jax-ml/jax#31662). A PyTorch weight w (C_in, C_out, *k) ports as
  `kernel = flip(w.transpose(2, …, d + 1, 0, 1), spatial axes)`, as for `layers.ConvTranspose2x`.

  Attributes:
    features: C_out.
    use_bias: whether to add a bias.
    weight_init: one of `layers.WEIGHT_INITS` (PyTorch fan_in = C_out·4^d for "torch").
    dtype: the computation dtype.
    param_dtype: the parameter dtype.
  """
  features: int
  use_bias: bool = True
  weight_init: str = "xavier_uniform"
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.ndim - 2
    if not 1 <= d <= 3:
      raise ValueError(f"ConvTranspose4x2 expects (N, *spatial, C) with 1-3 spatial axes, got {x.shape}.")
    c_in, c_out = x.shape[-1], self.features
    kernel_init, bias_init = layers.initializers(self.weight_init, c_out * 4**d)
    kernel = self.param("kernel", kernel_init, (4,) * d + (c_in, c_out), self.param_dtype)
    bias = self.param("bias", bias_init, (c_out,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # w3[s_1..s_d, ci, a_1..a_d, co] = Σ_t Π_j TAPS[a_j, s_j, t_j] · kernel[t_1..t_d, ci, co].
    letters = string.ascii_lowercase
    a, s, t = letters[:d], letters[8:8 + d], letters[16:16 + d]
    operands = [jnp.asarray(_TAPS, kernel.dtype)] * d + [kernel]
    spec = ",".join(f"{a[j]}{s[j]}{t[j]}" for j in range(d)) + f",{t}xy->{s}x{a}y"
    w3 = jnp.einsum(spec, *operands).reshape((3,) * d + (c_in, 2**d * c_out))
    y = lax.conv_general_dilated(x, w3, window_strides=(1,) * d, padding=((1, 1),) * d,
                                 dimension_numbers=layers.conv_dimension_numbers(x.ndim))
    y = layers.depth_to_space(y, 2)
    if bias is not None:
      y = y + bias
    return y


class _ResUpUnit(nn.Module):
  """`BaseResUpUnit`: ConvTranspose k4 s2 p1 → BN → ReLU, + bridge, ReLU.

  (N, *S, C), bridge (N, *2S, features) -> (N, *2S, features).
  """
  features: int
  weight_init: str
  bn_axis_name: Optional[str]
  dtype: Optional[Any]

  @nn.compact
  def __call__(self, x: Array, bridge: Array, train: bool) -> Array:
    up = ConvTranspose4x2(self.features, weight_init=self.weight_init, dtype=self.dtype, name="up")(x)
    up = layers.norm_layer("batch", train=train, axis_name=self.bn_axis_name, dtype=self.dtype,
                           name="bn")(up)
    return nn.relu(nn.relu(up) + bridge)


class ConfidenceFCN(nn.Module):
  """ASDNet's confidence FCN: per-voxel 2-class logits from a C-channel probability map, 2D or 3D.

  Attributes:
    features: widths of conv1 … conv4 (32, 64, 128, 256); the up units mirror them.
    num_outputs: logits per voxel (2: class 1 = "real", i.e. a label).
    decoder: "repaired" (default; upconv3 → upconv2 → upconv1 chained, every encoder level reaches the
      output) or "as_coded" (the reference's wiring: only conv1 → conv2 → upconv1 reaches the output;
      the other layers are still created and run, so parameters and BN updates match the reference).
    negative_slope: the LeakyReLU slope (0.2).
    weight_init: one of `layers.WEIGHT_INITS`; "xavier_uniform" (gain √2, zero bias) as the reference.
    bn_axis_name: BatchNorm cross-device axis name (None: no cross-device sync).
    dtype: the computation dtype (None: float32 from the parameters); the logits are float32.
  """
  features: Sequence[int] = (32, 64, 128, 256)
  num_outputs: int = 2
  decoder: str = "repaired"
  negative_slope: float = 0.2
  weight_init: str = "xavier_uniform"
  bn_axis_name: Optional[str] = None
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, p: Array, train: bool) -> Array:
    """Scores each voxel.

    Args:
      p: probability maps or one-hot labels, (N, X, Y, Z, C) or (N, H, W, C); spatial sizes divisible
        by 8.
      train: training mode: BatchNorm uses batch statistics and updates `batch_stats` (apply with
        `mutable=["batch_stats"]`); eval mode uses the running averages.

    Returns:
      Logits (N, *spatial, num_outputs), float32.
    """
    if self.decoder not in CONFIDENCE_DECODERS:
      raise ValueError(f"Unknown decoder {self.decoder!r}; expected one of {CONFIDENCE_DECODERS}.")
    if p.ndim < 3 or any(s % 8 for s in p.shape[1:-1]):
      raise ValueError(f"Input {p.shape} must be (N, *spatial, C) with spatial sizes divisible by 8.")
    if len(self.features) != 4:
      raise ValueError(f"features must have 4 widths, got {tuple(self.features)}.")
    d = p.ndim - 2
    f1, f2, f3, f4 = self.features
    act = lambda x: nn.leaky_relu(x, self.negative_slope)
    conv = lambda f, k, pad, stride, name: layers.Conv(f, k, strides=stride, padding=pad,
                                                       weight_init=self.weight_init, dtype=self.dtype,
                                                       name=name)
    up = lambda f, name: _ResUpUnit(f, weight_init=self.weight_init, bn_axis_name=self.bn_axis_name,
                                    dtype=self.dtype, name=name)
    # k4 s2 with PyTorch padding 2 and the last voxel dropped = padding (2, 1): size S -> S/2.
    down = ((2, 1),) * d

    conv1 = act(conv(f1, 3, 1, 1, "conv1")(p))
    conv2 = act(conv(f2, 4, down, 2, "conv2")(conv1))
    conv3 = act(conv(f3, 4, down, 2, "conv3")(conv2))
    conv4 = act(conv(f4, 4, down, 2, "conv4")(conv3))
    if self.decoder == "repaired":
      u = act(up(f3, "upconv3")(conv4, conv3, train))
      u = act(up(f2, "upconv2")(u, conv2, train))
      u = act(up(f1, "upconv1")(u, conv1, train))
    else:
      # The reference's calls: upconv3's and upconv2's outputs are discarded (still computed, so that
      # their BatchNorm running statistics move as in the reference).
      act(up(f3, "upconv3")(conv4, conv3, train))
      act(up(f2, "upconv2")(conv3, conv2, train))
      u = act(up(f1, "upconv1")(conv2, conv1, train))
    # The reference applies its LeakyReLU to upconv1 (after the unit's ReLU, so an identity), then convX.
    return layers.at_least_float32(conv(self.num_outputs, 1, 0, 1, "convX")(u))


def asdnet_confidence(**overrides: Any) -> ConfidenceFCN:
  """ASDNet's confidence network `Discriminator_my23DLRResFCN(C, 2, nd=3)`, repaired decoder by default
  (`decoder="as_coded"` for the reference's wiring). 5,507,970 parameters for a 2-channel input."""
  config: dict[str, Any] = dict(features=(32, 64, 128, 256), num_outputs=2, decoder="repaired",
                                negative_slope=0.2, weight_init="xavier_uniform")
  config.update(overrides)
  return ConfidenceFCN(**config)


# ----------------------------------------------------------------------------------------------------
# The released segmenter, HRResSegNet_DS.


class _DilatedConv(nn.Module):
  """Conv k (bias) with dilation `dilation` and padding dilation·(k − 1)/2 (size kept), PyTorch style.

  `layers.Conv` has no dilation; with dilation 1 this defers to it (its fast CPU path)."""
  features: int
  kernel_size: int
  dilation: int
  weight_init: str
  dtype: Optional[Any]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, dil = self.kernel_size, self.dilation
    if dil == 1 or k == 1:
      return layers.Conv(self.features, k, padding=k // 2, weight_init=self.weight_init,
                         dtype=self.dtype, name="conv")(x)
    d = x.ndim - 2
    kernel_init, bias_init = layers.initializers(self.weight_init, x.shape[-1] * k**d)
    # Same parameter layout as layers.Conv, under the same name, so both paths look alike.
    kernel = self.param("kernel", kernel_init, (k,) * d + (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pad = dil * (k - 1) // 2
    y = lax.conv_general_dilated(x, kernel, (1,) * d, ((pad, pad),) * d, rhs_dilation=(dil,) * d,
                                 dimension_numbers=layers.conv_dimension_numbers(x.ndim))
    return y + bias


class _ConvBN(nn.Module):
  """`conv23D_bn_relu_Unit` / `conv23D_bn_Unit`: Conv k (bias, dilation) → BN (→ ReLU)."""
  features: int
  kernel_size: int = 3
  dilation: int = 1
  relu: bool = True
  weight_init: str = "xavier_uniform"
  bn_axis_name: Optional[str] = None
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = _DilatedConv(self.features, self.kernel_size, self.dilation, self.weight_init, self.dtype,
                     name="conv")(x)
    x = layers.norm_layer("batch", train=train, axis_name=self.bn_axis_name, dtype=self.dtype,
                          name="bn")(x)
    return nn.relu(x) if self.relu else x


class _Res3(nn.Module):
  """`residualUnit3`, a bottleneck: cbr 1 (→ o/2) → cbr 3 (dilation) → Conv 1 + BN (→ o), plus the
  shortcut (a Conv 1 + BN projection, or the identity when `projection` is False), then ReLU."""
  features: int
  dilation: int = 1
  projection: bool = True
  weight_init: str = "xavier_uniform"
  bn_axis_name: Optional[str] = None
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    o = self.features
    common = dict(weight_init=self.weight_init, bn_axis_name=self.bn_axis_name, dtype=self.dtype)
    y = _ConvBN(o // 2, 1, name="conv1_bn_relu", **common)(x, train)
    y = _ConvBN(o // 2, 3, self.dilation, name="conv2_bn_relu", **common)(y, train)
    y = _ConvBN(o, 1, relu=False, name="conv3_bn", **common)(y, train)
    if self.projection:
      x = _ConvBN(o, 1, relu=False, name="convX_bn", **common)(x, train)
    elif x.shape[-1] != o:
      raise ValueError(f"An identity shortcut needs {o} input channels, got {x.shape[-1]}.")
    return nn.relu(y + x)


class _DilatedResUnit(nn.Module):
  """`DilatedResUnit`: two cbr 3 (dilation) a, b, each applied twice with the same weights:
  o₁ = x + b(a(x)); out = a(o₁) + b(a(o₁)) (no final ReLU)."""
  features: int
  dilation: int
  weight_init: str = "xavier_uniform"
  bn_axis_name: Optional[str] = None
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    common = dict(weight_init=self.weight_init, bn_axis_name=self.bn_axis_name, dtype=self.dtype)
    a = _ConvBN(self.features, 3, self.dilation, name="conv1_bn_relu", **common)
    b = _ConvBN(self.features, 3, self.dilation, name="conv2_bn_relu", **common)
    # A train-mode call updates the BN running statistics each time, as PyTorch does on reuse.
    out1 = x + b(a(x, train), train)
    h = a(out1, train)
    return h + b(h, train)


class _ResUpUnit2(nn.Module):
  """`ResUpUnit`: ConvTranspose k4 s2 p1 → BN → ReLU, + bridge (optionally channel-dropped), ReLU,
  res3 (identity shortcut), res3 (projection shortcut)."""
  features: int
  bridge_dropout: float = 0.0
  weight_init: str = "xavier_uniform"
  bn_axis_name: Optional[str] = None
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, bridge: Array, train: bool, dropout: bool) -> Array:
    common = dict(weight_init=self.weight_init, bn_axis_name=self.bn_axis_name, dtype=self.dtype)
    up = ConvTranspose4x2(self.features, weight_init=self.weight_init, dtype=self.dtype, name="up")(x)
    up = nn.relu(layers.norm_layer("batch", train=train, axis_name=self.bn_axis_name,
                                   dtype=self.dtype, name="up_bn")(up))
    if self.bridge_dropout > 0:
      bridge = layers.channel_dropout(self.bridge_dropout, not dropout, bridge)
    x = nn.relu(up + bridge)
    x = _Res3(self.features, projection=False, name="conv", **common)(x, train)
    return _Res3(self.features, projection=True, name="conv2", **common)(x, train)


class HRResSegNetDS(nn.Module):
  """ASDNet's released segmenter `HRResSegNet_DS`: residual encoder-decoder with a high-resolution
  dilated lateral path and two deeply supervised auxiliary heads, 2D or 3D.

      layer              op                                                 channels     size
      conv_block1_32     cbr 3                                              C_in → 32    S
      conv_block32_32    res3                                               32 → 32      S
      pool, drop         MaxPool k3 s2 p1, channel dropout                               S/2
      conv_block32_64    res3                                               32 → 64      S/2
      pool, drop                                                                         S/4
      conv_block64_128   res3                                               64 → 128     S/4
      pool, drop                                                                         S/8
      conv_block128_256  res3, 3^d conv dilation 2                          128 → 256    S/8
      hr_block1..4       DilatedResUnit, dilations 2, 3, 4, 5 (on conv_block32_32)  32   S
      up_block256_128    ResUpUnit, bridge conv_block64_128                 256 → 128    S/4
      up_block128_64     ResUpUnit, bridge conv_block32_64                  128 → 64     S/2
      up_block64_32      ResUpUnit, bridge hr_block4                        64 → 32      S
      last_main          Conv 1                                             32 → C       S    "main"
      conv_path1         cbr 1, linear ×2 (on up_block128_64)               64 → C       S    "aux1"
      conv_path2         cbr 1, linear ×4 (on up_block256_128)              128 → C      S    "aux2"

  cbr = Conv (bias) → BN → ReLU; every res3 of the encoder has a projection shortcut (the reference
  builds them with isEmptyBranch1=False); all convs Xavier-uniform (gain √2) with zero bias.

  Attributes:
    num_classes: C.
    features: the four level widths (32, 64, 128, 256).
    hr_dilations: dilations of the four high-resolution units.
    deepest_dilation: dilation of the deepest res3's 3^d conv (the reference's isViewExpansion: 2).
    encoder_dropout: channel-dropout rate after each pool (isSpatialDropOut with dropoutRate; 0.2).
    bridge_dropout: channel-dropout rates of the three decoder bridges (isResidualEnhancement: 0.1,
      0.05, 0.01; off by default).
    align_corners: the auxiliary heads' linear-upsampling convention (False, PyTorch's default).
    weight_init, bn_axis_name, dtype: as the other models.
  """
  num_classes: int = 2
  features: Sequence[int] = (32, 64, 128, 256)
  hr_dilations: Sequence[int] = (2, 3, 4, 5)
  deepest_dilation: int = 2
  encoder_dropout: float = 0.2
  bridge_dropout: Sequence[float] = (0.0, 0.0, 0.0)
  align_corners: bool = False
  weight_init: str = "xavier_uniform"
  bn_axis_name: Optional[str] = None
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, train: bool, dropout: Optional[bool] = None) -> dict[str, Array]:
    """Segments x.

    Args:
      x: (N, X, Y, Z, C_in) or (N, H, W, C_in); spatial sizes divisible by 8.
      train: training mode: BatchNorm uses batch statistics and updates `batch_stats` (apply with
        `mutable=["batch_stats"]`); dropout is on.
      dropout: overrides whether dropout is on (default: `train`); needs the 'dropout' RNG when on.

    Returns:
      {"main", "aux1", "aux2"}: logits (N, *spatial, num_classes), float32, all at full resolution.
    """
    if x.ndim < 3 or any(s % 8 for s in x.shape[1:-1]):
      raise ValueError(f"Input {x.shape} must be (N, *spatial, C) with spatial sizes divisible by 8.")
    if len(self.features) != 4 or len(self.hr_dilations) != 4 or len(self.bridge_dropout) != 3:
      raise ValueError("features and hr_dilations need 4 entries, bridge_dropout 3.")
    use_dropout = train if dropout is None else dropout
    d = x.ndim - 2
    f1, f2, f3, f4 = self.features
    common = dict(weight_init=self.weight_init, bn_axis_name=self.bn_axis_name, dtype=self.dtype)

    def pool(h: Array) -> Array:
      # MaxPool k3 s2 p1 (−∞ padding, as PyTorch): S -> S/2 for even S.
      h = nn.max_pool(h, (3,) * d, strides=(2,) * d, padding=((1, 1),) * d)
      if self.encoder_dropout > 0 and use_dropout:
        h = layers.channel_dropout(self.encoder_dropout, False, h)
      return h

    block0 = _ConvBN(f1, 3, name="conv_block1_32", **common)(x, train)
    block1 = _Res3(f1, name="conv_block32_32", **common)(block0, train)
    block2 = _Res3(f2, name="conv_block32_64", **common)(pool(block1), train)
    block3 = _Res3(f3, name="conv_block64_128", **common)(pool(block2), train)
    block4 = _Res3(f4, dilation=self.deepest_dilation, name="conv_block128_256",
                   **common)(pool(block3), train)
    hr = block1
    for i, dil in enumerate(self.hr_dilations):
      hr = _DilatedResUnit(f1, dil, name=f"hr_block{i + 1}", **common)(hr, train)
    up2 = _ResUpUnit2(f3, self.bridge_dropout[0], name="up_block256_128", **common)(
        block4, block3, train, use_dropout)
    up3 = _ResUpUnit2(f2, self.bridge_dropout[1], name="up_block128_64", **common)(
        up2, block2, train, use_dropout)
    up4 = _ResUpUnit2(f1, self.bridge_dropout[2], name="up_block64_32", **common)(
        up3, hr, train, use_dropout)

    main = layers.Conv(self.num_classes, 1, weight_init=self.weight_init, dtype=self.dtype,
                       name="last_main")(up4)
    aux1 = _ConvBN(self.num_classes, 1, name="conv_path1", **common)(up3, train)
    aux2 = _ConvBN(self.num_classes, 1, name="conv_path2", **common)(up2, train)
    # The auxiliary heads are upsampled in float32 (they are outputs).
    aux1 = layers.upsample_linear(layers.at_least_float32(aux1), 2, self.align_corners)
    aux2 = layers.upsample_linear(layers.at_least_float32(aux2), 4, self.align_corners)
    return {"main": layers.at_least_float32(main), "aux1": aux1, "aux2": aux2}


def hrres_segnet_ds(num_classes: int = 2, **overrides: Any) -> HRResSegNetDS:
  """ASDNet's released segmenter `HRResSegNet_DS(1, 2, nd=3)` with view expansion (deepest dilation 2)
  and spatial dropout 0.2: 4,036,142 parameters for 1 input channel and 2 classes."""
  config: dict[str, Any] = dict(num_classes=num_classes, features=(32, 64, 128, 256),
                                hr_dilations=(2, 3, 4, 5), deepest_dilation=2, encoder_dropout=0.2,
                                bridge_dropout=(0.0, 0.0, 0.0), weight_init="xavier_uniform")
  config.update(overrides)
  return HRResSegNetDS(**config)
