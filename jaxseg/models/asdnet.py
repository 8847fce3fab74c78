"""ASDNet's confidence network (`ginobilinie/asdnet`, `Discriminator_my23DLRResFCN`; docs/networks.md).

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

__all__ = ["CONFIDENCE_DECODERS", "ConfidenceFCN", "ConvTranspose4x2", "asdnet_confidence"]

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
    a, s, t = string.ascii_lowercase[:d], string.ascii_lowercase[8:8 + d], string.ascii_lowercase[16:16 + d]
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
  """`BaseResUpUnit`: ConvTranspose k4 s2 p1 → BN → ReLU, + bridge, ReLU: (N, *S, C) -> (N, *2S, features)."""
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
