"""3D UX-Net (Lee et al., "3D UX-Net: a large kernel volumetric ConvNet modernizing hierarchical
transformer for medical image segmentation"; released as `MASILab/3DUX-Net`, `networks/UXNet_3D/`),
architecture only (docs/networks.md). Registry name `uxnet`.

A ConvNeXt-like encoder with large depthwise kernels feeds a MONAI-style (UNETR) convolutional decoder.
With fs = `feature_size` (48 in the reference) the encoder widths are d_i = fs·2^i, i = 0 … 3, and the
spatial size halves at every stage (S/2, S/4, S/8, S/16).

Encoder (conv biases on):

    stem        Conv 7 stride 2 pad 3 (C_in → d_0) → LN
    down_i      LN → Conv 2 stride 2 (d_{i−1} → d_i)                         i = 1, 2, 3
    stage_i     2 × ux_block(d_i)
    out_i       LN, applied to a copy only: the next stage reads the un-normalised stage output

    ux_block(d) = x + γ ⊙ pw2(GELU(pw1(LN(dw(x)))))
      dw   depthwise Conv 7 pad 3 (one 7^3 filter per channel, d groups)
      pw1  Conv 1, d → 4d, d groups: each channel j feeds its own 4 hidden channels 4j … 4j+3
      pw2  Conv 1, 4d → d, d groups: hidden channels 4j … 4j+3 give channel j back
      γ    layer scale, one value per channel, initialised to 1e-6

LN is a LayerNorm over the channel axis (ε 1e-6, learned scale and offset); in the channels-last layout
that is an ordinary LayerNorm over the last axis. GELU is the exact (erf) form. pw1 and pw2 together are
a separate 1 → 4 → 1 MLP per channel, not the dense d → 4d → d MLP of ConvNeXt.

Decoder (MONAI `UnetrBasicBlock` / `UnetResBlock` / `UnetrUpBlock` with instance norm; no conv biases):

    res(i, o)   Conv 3 → IN → LReLU → Conv 3 → IN, + shortcut (Conv 1 → IN if i ≠ o, else identity),
                then LReLU
    up(i, o)    ConvTranspose 2 stride 2 (i → o), concat [up, skip], res(2o, o)

    block  op                        output
    e1     res(C_in, fs) on x        fs     @ S
    e2     res(fs, 2fs) on out_0     2fs    @ S/2
    e3     res(2fs, 4fs) on out_1    4fs    @ S/4
    e4     res(4fs, 8fs) on out_2    8fs    @ S/8
    e5     res(8fs, 16fs) on out_3   16fs   @ S/16
    d3     up(16fs, 8fs), skip e4    8fs    @ S/8
    d2     up(8fs, 4fs), skip e3     4fs    @ S/4
    d1     up(4fs, 2fs), skip e2     2fs    @ S/2
    d0     up(2fs, fs), skip e1      fs     @ S
    head   res(fs, fs), Conv 1 (bias) fs → K

IN is InstanceNorm without affine parameters (ε 1e-5); LReLU has slope 0.01. With fs = 48, one input
channel and K = 2 the network has 53,005,922 parameters (1,311,936 in the encoder).

Init: PyTorch's defaults, U(±1/√fan_in) for kernels and biases, with the grouped fan-in
(C_in/groups)·k^d (343 for the depthwise conv, 1 for pw1, 4 for pw2); LayerNorms start at scale 1 and
offset 0 and γ at 1e-6.

Parameter layout: kernels (*k, C_in/groups, C_out) as `flax.linen.Conv` with `feature_group_count`, so a
PyTorch weight (C_out, C_in/groups, *k) ports as `w.transpose(2, …, 1, 0)` (grouped ones included: both
frameworks order a group's output channels contiguously); transposed convolutions as
`layers.ConvTranspose2x`. The concatenation order [upsampled, skip] is the reference's.

Arrays are channels-last and the rank comes from the input; the reference is 3D, (N, X, Y, Z, C). Every
spatial size must be divisible by 16.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxseg.models import layers

Array = jax.Array

__all__ = [
    "DOWNSAMPLING",
    "GroupedConv",
    "LAYER_SCALE_INIT",
    "LN_EPSILON",
    "UXBlock",
    "UXNet",
    "UXNetEncoder",
    "UXResBlock",
    "UXUpBlock",
    "uxnet",
]

# Channel LayerNorm ε of the encoder.
LN_EPSILON = 1e-6
# Initial value of the layer scale γ.
LAYER_SCALE_INIT = 1e-6
# LeakyReLU slope of the MONAI decoder blocks.
NEGATIVE_SLOPE = 0.01
# Total downsampling: the stride-2 stem and three stride-2 downsampling convs.
DOWNSAMPLING = 16


def _compute_dtype(dtype: Any) -> Any:
  """None / "float32" -> None (float32 from the parameters); "bfloat16" or a dtype -> that dtype."""
  if dtype is None or (isinstance(dtype, str) and dtype == "float32"):
    return None
  return jnp.dtype(dtype)


def channel_layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
  """LayerNorm over the channel (last) axis, ε 1e-6, affine, two-pass variance (statistics in at
  least float32, as flax computes them)."""
  return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, use_fast_variance=False, name=name)


class GroupedConv(nn.Module):
  """A grouped channels-last convolution, stride 1, padding k // 2, with PyTorch's default init.

  `layers.Conv` has no groups; this module adds them with the same conventions. Parameters are those of
  `flax.linen.Conv(features, (k,)*d, feature_group_count=groups)`: "kernel" (*k, C_in/groups, C_out) and
  "bias" (C_out,); group g reads input channels [g·C_in/groups, (g+1)·C_in/groups) and writes output
  channels [g·C_out/groups, (g+1)·C_out/groups), as in PyTorch. Init U(±1/√fan_in) with
  fan_in = (C_in/groups)·k^d (PyTorch's).

  A 1^d kernel is computed as a broadcast multiply-add per group (no convolution op): for the per-channel
  MLPs of the UX block (1 → 4 and 4 → 1 per channel) that is an element-wise map.

  Larger kernels: XLA:CPU runs grouped 3D convolutions through a slow generic path (a depthwise 7^3
  conv on 16 channels at 32×32×24, forward + backward: ≈7 s). impl "stacked2d" instead convolves with
  the equivalent dense block-diagonal kernel (C_in, C_out), zero across groups, through
  `layers.conv3d_as_stacked2d`: ≈40× faster there although it does C_in/groups× the multiply-adds, and
  equal up to float summation order (the parameters are still the grouped kernel; the zero blocks get
  no gradient). GPU and TPU keep the native grouped convolution.

  Attributes:
    features: C_out (divisible by groups).
    kernel_size: k, odd.
    groups: the number of groups (C_in must be divisible by it).
    use_bias: whether to add a bias.
    dtype: the computation dtype (None: from the inputs and parameters).
    impl: for k > 1: "native" (one grouped XLA convolution), "stacked2d" (the block-diagonal dense
      kernel; as `layers.Conv`'s stacked 2D convolution in 3D, a dense XLA convolution in other ranks),
      or "auto": stacked2d on the CPU backend, native otherwise.
    kernel_init: the kernel's initialiser, called on the grouped kernel shape (*k, C_in/groups, C_out)
      as `flax.linen.Conv` calls it (None: PyTorch's U(±1/√fan_in)); the kMaX pixel head passes
      Xavier-uniform.
  """
  features: int
  kernel_size: int
  groups: int
  use_bias: bool = True
  dtype: Optional[Any] = None
  impl: str = "auto"
  kernel_init: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(N, *S, C_in) -> (N, *S, features)."""
    d = x.ndim - 2
    c_in, g, k = x.shape[-1], self.groups, self.kernel_size
    if c_in % g or self.features % g:
      raise ValueError(f"GroupedConv: C_in = {c_in} and C_out = {self.features} must be divisible by "
                       f"groups = {g}.")
    if k % 2 != 1:
      raise ValueError(f"GroupedConv: kernel_size must be odd, got {k}.")
    i_per, o_per = c_in // g, self.features // g
    kernel_init, bias_init = layers.initializers("torch", i_per * k**d)
    if self.kernel_init is not None:
      kernel_init = self.kernel_init
    kernel = self.param("kernel", kernel_init, (k,) * d + (i_per, self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if k == 1:
      # (i_per, g·o_per) -> (g, i_per, o_per); y[..., g, o] = Σ_i x[..., g, i]·w[g, i, o].
      w = kernel.reshape(i_per, g, o_per).transpose(1, 0, 2)
      xg = x.reshape(*x.shape[:-1], g, i_per, 1)
      y = jnp.sum(xg * w, axis=-2).reshape(*x.shape[:-1], self.features)
    else:
      if self.impl not in ("auto", "native", "stacked2d"):
        raise ValueError(f"GroupedConv impl {self.impl!r} is not one of auto, native, stacked2d.")
      padding = ((k // 2, k // 2),) * d
      dense = self.impl == "stacked2d" or (self.impl == "auto" and jax.default_backend() == "cpu")
      if dense and g > 1:
        # dense[..., h·i_per + i, g·o_per + o] = kernel[..., i, g·o_per + o] if h == g else 0.
        w = kernel.reshape(*kernel.shape[:-2], 1, i_per, g, o_per)
        w = w * jnp.eye(g, dtype=w.dtype).reshape(g, 1, g, 1)
        kernel, g = w.reshape(*kernel.shape[:-2], c_in, self.features), 1
      if d == 3 and g == 1:
        y = layers.conv3d_as_stacked2d(x, kernel, padding)
      else:
        y = lax.conv_general_dilated(x, kernel, window_strides=(1,) * d, padding=padding,
                                     dimension_numbers=layers.conv_dimension_numbers(x.ndim),
                                     feature_group_count=g)
    return y if bias is None else y + bias


class UXBlock(nn.Module):
  """The UX block: x + γ ⊙ pw2(GELU(pw1(LN(dw7(x))))) (module docstring), (N, *S, d) -> (N, *S, d).

  Attributes:
    kernel_size: the depthwise kernel (7).
    expansion: hidden channels per channel of the grouped MLP (4).
    layer_scale_init: the initial γ (1e-6).
    dtype: the computation dtype.
    conv_impl: `GroupedConv.impl` of the depthwise convolution.
  """
  kernel_size: int = 7
  expansion: int = 4
  layer_scale_init: float = LAYER_SCALE_INIT
  dtype: Optional[Any] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    y = GroupedConv(d, self.kernel_size, groups=d, dtype=self.dtype, impl=self.conv_impl,
                    name="dwconv")(x)
    y = channel_layer_norm(self.dtype, "norm")(y)
    y = GroupedConv(self.expansion * d, 1, groups=d, dtype=self.dtype, name="pwconv1")(y)
    y = nn.gelu(y, approximate=False)
    y = GroupedConv(d, 1, groups=d, dtype=self.dtype, name="pwconv2")(y)
    gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (d,), jnp.float32)
    y, gamma = nn.dtypes.promote_dtype(y, gamma, dtype=self.dtype)
    return x + gamma * y


class UXNetEncoder(nn.Module):
  """The UX-Net encoder: stem, 3 downsamplings and 4 stages of UX blocks (module docstring).

  Attributes:
    dims: the stage widths d_0 … d_3.
    depths: UX blocks per stage.
    layer_scale_init: the initial γ of every block.
    dtype: the computation dtype.
    conv_impl: `GroupedConv.impl` of the depthwise convolutions.
  """
  dims: Sequence[int] = (48, 96, 192, 384)
  depths: Sequence[int] = (2, 2, 2, 2)
  layer_scale_init: float = LAYER_SCALE_INIT
  dtype: Optional[Any] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, ...]:
    """(N, *S, C_in) -> the LN'd stage outputs, stage i at (N, *(S/2^(i+1)), d_i)."""
    if len(self.dims) != len(self.depths):
      raise ValueError(f"dims {tuple(self.dims)} and depths {tuple(self.depths)} differ in length.")
    outs = []
    for i, (dim, depth) in enumerate(zip(self.dims, self.depths)):
      if i == 0:
        x = layers.Conv(dim, 7, strides=2, padding=3, dtype=self.dtype, name="stem_conv")(x)
        x = channel_layer_norm(self.dtype, "stem_norm")(x)
      else:
        x = channel_layer_norm(self.dtype, f"down_{i}_norm")(x)
        x = layers.Conv(dim, 2, strides=2, padding=0, dtype=self.dtype, name=f"down_{i}_conv")(x)
      for j in range(depth):
        x = UXBlock(layer_scale_init=self.layer_scale_init, dtype=self.dtype, conv_impl=self.conv_impl,
                    name=f"stage_{i}_block_{j}")(x)
      outs.append(channel_layer_norm(self.dtype, f"out_norm_{i}")(x))
    return tuple(outs)


def _instance_norm(dtype: Any, name: str):
  return layers.norm_layer("instance", train=False, dtype=dtype, name=name)


class UXResBlock(nn.Module):
  """MONAI's `UnetResBlock` (stride 1, instance norm): Conv 3 → IN → LReLU → Conv 3 → IN, plus the
  shortcut Conv 1 → IN when C_in ≠ features (identity otherwise), add, LReLU. No conv biases.

  Attributes:
    features: C_out.
    dtype: the computation dtype.
    conv_impl: `layers.Conv.impl` of the 3^d convolutions.
  """
  features: int
  dtype: Optional[Any] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(N, *S, C_in) -> (N, *S, features)."""
    act = lambda v: nn.leaky_relu(v, NEGATIVE_SLOPE)
    conv = dict(use_bias=False, dtype=self.dtype)
    y = layers.Conv(self.features, 3, padding=1, impl=self.conv_impl, name="conv1", **conv)(x)
    y = act(_instance_norm(self.dtype, "norm1")(y))
    y = layers.Conv(self.features, 3, padding=1, impl=self.conv_impl, name="conv2", **conv)(y)
    y = _instance_norm(self.dtype, "norm2")(y)
    if x.shape[-1] != self.features:
      x = layers.Conv(self.features, 1, name="conv3", **conv)(x)
      x = _instance_norm(self.dtype, "norm3")(x)
    return act(y + x)


class UXUpBlock(nn.Module):
  """MONAI's `UnetrUpBlock` (residual): ConvTranspose 2 stride 2 (no bias) to `features`, concat
  [upsampled, skip], `UXResBlock(features)`.

  Attributes:
    features: C_out (the skip has this width too in UX-Net).
    dtype: the computation dtype.
    conv_impl: `layers.Conv.impl` of the 3^d convolutions.
  """
  features: int
  dtype: Optional[Any] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, skip: Array) -> Array:
    """(N, *S, C_in), (N, *(2S), C_skip) -> (N, *(2S), features)."""
    up = layers.ConvTranspose2x(self.features, use_bias=False, dtype=self.dtype, name="transp_conv")(x)
    up, skip = nn.dtypes.promote_dtype(up, skip, dtype=self.dtype)
    return UXResBlock(self.features, self.dtype, self.conv_impl, name="res")(
        jnp.concatenate([up, skip], axis=-1))


class UXNet(nn.Module):
  """3D UX-Net: the UX-Net encoder and the MONAI conv decoder (module docstring).

  Attributes:
    num_classes: K, the channels of the logits.
    feature_size: fs; the encoder widths are fs·(1, 2, 4, 8) and the bottleneck block e5 has 16·fs
      channels (48 and 768 in the reference).
    depths: UX blocks per encoder stage ((2, 2, 2, 2)).
    layer_scale_init: the initial layer scale γ (1e-6).
    dtype: the computation dtype: None or "float32" (float32), or bfloat16 (mixed precision: parameters
      stay float32, the norms compute their statistics in float32, logits are returned in float32).
    conv_impl: `layers.Conv.impl` of the stride-1 3^d decoder convolutions and `GroupedConv.impl` of the
      depthwise encoder convolutions ("auto": stacked 2D convolutions on the CPU backend, native XLA
      convolutions on GPU/TPU).
  """
  num_classes: int = 2
  feature_size: int = 48
  depths: Sequence[int] = (2, 2, 2, 2)
  layer_scale_init: float = LAYER_SCALE_INIT
  dtype: Optional[Any] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Any]:
    """Segments x.

    Args:
      x: (N, *S, C_in), every spatial size divisible by 16.
      train: accepted for the common model interface; there is no BatchNorm or dropout, so train and
        eval modes are the same.

    Returns:
      {"logits": (N, *S, K) float32;
       "features": the decoder outputs {"d3": (N, *(S/8), 8·fs), "d2": (N, *(S/4), 4·fs),
         "d1": (N, *(S/2), 2·fs), "d0": (N, *S, fs)}, in the compute dtype}.
    """
    del train
    if x.ndim < 3 or any(s % DOWNSAMPLING for s in x.shape[1:-1]):
      raise ValueError(f"UXNet input {x.shape} must be (N, *spatial, C) with every spatial size divisible "
                       f"by {DOWNSAMPLING} (a stride-2 stem and three stride-2 downsamplings).")
    if len(self.depths) != 4:
      raise ValueError(f"UXNet has 4 encoder stages; depths {tuple(self.depths)} has {len(self.depths)}.")
    dtype = _compute_dtype(self.dtype)
    fs = self.feature_size
    dims = tuple(fs * 2**i for i in range(4))
    outs = UXNetEncoder(dims, tuple(self.depths), self.layer_scale_init, dtype, self.conv_impl,
                        name="encoder")(x)

    res = lambda o, name: UXResBlock(o, dtype, self.conv_impl, name=name)
    up = lambda o, name: UXUpBlock(o, dtype, self.conv_impl, name=name)
    e1 = res(fs, "e1")(x)
    e2 = res(2 * fs, "e2")(outs[0])
    e3 = res(4 * fs, "e3")(outs[1])
    e4 = res(8 * fs, "e4")(outs[2])
    e5 = res(16 * fs, "e5")(outs[3])
    d3 = up(8 * fs, "d3")(e5, e4)
    d2 = up(4 * fs, "d2")(d3, e3)
    d1 = up(2 * fs, "d1")(d2, e2)
    d0 = up(fs, "d0")(d1, e1)
    h = res(fs, "head_res")(d0)
    logits = layers.Conv(self.num_classes, 1, dtype=dtype, name="head_conv")(h)
    return {"logits": layers.at_least_float32(logits),
            "features": {"d3": d3, "d2": d2, "d1": d1, "d0": d0}}


def uxnet(num_classes: int = 2, **overrides: Any) -> UXNet:
  """3D UX-Net as released (`MASILab/3DUX-Net` `UXNET`): feature size 48, depths (2, 2, 2, 2),
  bottleneck 768; 53,005,922 parameters for 1 input channel and 2 classes."""
  config: dict[str, Any] = dict(num_classes=num_classes, feature_size=48, depths=(2, 2, 2, 2))
  config.update(overrides)
  return UXNet(**config)
