"""MAML's networks (modality-aware mutual learning, Zhang et al.; released as `YaoZhang93/MAML`, built on
nnU-Net v1; docs/networks.md): the nnU-Net-style U-Net branch (`NNUNetBranch`, registry name
`nnunet_branch`) and the multi-modal network (`MAML`, registry name `maml`).

MAML is fully supervised and multi-modal. Each of the M input channels (e.g. the four BraTS MR sequences,
or the arterial and venous CT phases) has its own U-Net branch with its own weights. The last decoder
features of the branches are fused, each modality gets a voxel- and channel-wise attention map from its
own features and the fused ones, and a joint head segments the attention-weighted sum of the branch
features. Every branch keeps its deep-supervision heads, so it can also segment its modality alone (the
missing-modality use).

Branch (nnU-Net v1's `Generic_UNet` as the released trainer builds it: strided-conv pooling,
transposed-conv upsampling, deep supervision, no dropout), with P = `num_pools` and f_l the width of
level l, f_l = min(base_features·2^l, max_features):

    level   op                                                        channels            size
    enc_0   2 × cnl                                                   C_in → f_0 → f_0    S
    enc_l   cnl (stride 2), cnl                      (l = 1 … P)      f_{l−1} → f_l       S/2^l
    up_l    ConvTranspose k2 s2, no bias             (l = P−1 … 0)    f_{l+1} → f_l       S/2^l
    dec_l   concat [up_l, enc_l], 2 × cnl                              2·f_l → f_l         S/2^l
    head_l  Conv 1, no bias                                           f_l → K             S/2^l

cnl = Conv 3 (bias, padding 1) → InstanceNorm (ε 1e-5, affine) → LeakyReLU(0.01). enc_P is the
bottleneck. The typical BraTS plan (base 16, 5 poolings) has widths 16/32/64/128/256/320. The branch
returns its dec_0 features (f_0 channels, full resolution) and the P logits head_0 … head_{P−1}, full
resolution first (nnU-Net's deep-supervision order).

MAML on top of M branches (F = base_features, branch m reads input channel m):

    fusion      Conv 3 (bias), no norm, no activation                      M·F → F
    ma_m        Conv 3 (bias) → IN(affine) → LReLU → Conv k (bias) → sigmoid    2·F → F → F   = A_m
    joint_head  Conv 1, no bias, on Σ_m A_m ⊙ feat_m                       F → K

ma_m reads concat [feat_m, fused]. A_m weighs every voxel and channel of feat_m; the maps are not
normalised across modalities. k = `ma_kernel`: 1 in the paper's description of the MA module ("Conv
3×3×3 + conv 1×1×1", preset "paper"), 3 in the released code (preset "released").

Init: the branches use nnU-Net's `InitWeights_He(1e-2)`, i.e. PyTorch's `kaiming_normal_(w, a=0.01)`:
N(0, 2/((1 + 0.01²)·fan_in)) with PyTorch's fan_in (C_in·k^d for a conv, C_out·k^d for a transposed
conv), and zero biases; InstanceNorm starts at scale 1, offset 0. The released code applies that
initialiser inside each branch only: the fusion, MA and joint-head convolutions keep PyTorch's default
init (U(±1/√fan_in) kernels and biases), which `shared_init="torch"` (the default) reproduces;
`shared_init="he"` uses the branch init for them too.

Parameters are laid out as `layers.Conv` (kernel (*k, C_in, C_out)), so a PyTorch conv weight ports as
`w.transpose(2, …, 1, 0)` and a transposed-conv weight as `layers.ConvTranspose2x` documents. The only
layout difference from the reference is the concatenation order, which is kept: [upsampled, skip] in the
decoder and [feat_m, fused] in the MA modules, so ported weights need no channel permutation.

Arrays are channels-last and the dimension comes from the input: (N, X, Y, Z, C) runs the 3D network,
(N, H, W, C) the 2D one. Spatial sizes must be divisible by 2^num_pools.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxseg.models import layers

Array = jax.Array

__all__ = [
    "MAML",
    "MAML_PRESETS",
    "MA_KERNELS",
    "NNUNET_MAX_FEATURES",
    "NNUNetBranch",
    "NNUNetConv",
    "NNUNetUpConv",
    "SHARED_INITS",
    "he_normal_std",
    "level_widths",
    "maml",
    "nnunet_branch",
]

# nnU-Net v1's caps on the widths (Generic_UNet.MAX_NUM_FILTERS_3D / MAX_FILTERS_2D), used when
# `max_features` is None.
NNUNET_MAX_FEATURES = {3: 320, 2: 480}
# LeakyReLU slope of nnU-Net, also the `a` of its He init.
NNUNET_NEGATIVE_SLOPE = 1e-2
MA_KERNELS = (1, 3)
SHARED_INITS = ("torch", "he")
# Preset -> the MA module's second kernel.
MAML_PRESETS = {"paper": 1, "released": 3}


def he_normal_std(fan_in: int, negative_slope: float = NNUNET_NEGATIVE_SLOPE) -> float:
  """The std of PyTorch's `kaiming_normal_(w, a=negative_slope, mode="fan_in")`:
  √(2 / (1 + a²)) / √fan_in (nnU-Net's `InitWeights_He`)."""
  return math.sqrt(2.0 / (1.0 + negative_slope**2)) / math.sqrt(fan_in)


def _he_normal(fan_in: int, negative_slope: float):

  std = he_normal_std(fan_in, negative_slope)

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)

  return init


def _initializers(scheme: str, fan_in: int, negative_slope: float):
  """(kernel_init, bias_init): "he" = nnU-Net's He normal and zero bias; "torch" = PyTorch's default."""
  if scheme == "he":
    return _he_normal(fan_in, negative_slope), nn.initializers.zeros
  if scheme == "torch":
    return layers.initializers("torch", fan_in)
  raise ValueError(f"Unknown init {scheme!r}; expected one of {SHARED_INITS}.")


def level_widths(base_features: int, num_pools: int, max_features: int) -> tuple[int, ...]:
  """The widths of the num_pools + 1 levels: f_l = min(base_features·2^l, max_features), computed as
  nnU-Net does (each level rounds 2× the previous one, then caps it)."""
  widths = [base_features]
  for _ in range(num_pools):
    widths.append(min(int(round(widths[-1] * 2)), max_features))
  return tuple(widths)


def _check_divisible(x: Array, num_pools: int, what: str) -> None:
  factor = 2**num_pools
  if x.ndim < 3 or any(s % factor for s in x.shape[1:-1]):
    raise ValueError(f"{what} input {x.shape} must be (N, *spatial, C) with every spatial size divisible "
                     f"by 2^num_pools = {factor} (num_pools = {num_pools}).")


class NNUNetConv(nn.Module):
  """A channels-last convolution (padding k // 2) with nnU-Net's He init or PyTorch's default init.

  The parameters are `layers.Conv`'s ("kernel" (*k, C_in, C_out), "bias" (C_out,)); `layers.Conv` is not
  used directly because its init schemes have no He normal with a LeakyReLU gain and zero biases.

  Attributes:
    features: C_out.
    kernel_size: k on every spatial axis (odd).
    strides: the stride on every axis (2 halves even sizes with k = 3, padding 1).
    use_bias: whether to add a bias.
    weight_init: "he" (N(0, 2/((1 + a²)·C_in·k^d)), zero bias) or "torch" (U(±1/√fan_in) kernel and bias).
    negative_slope: the `a` of the He init.
    dtype: the computation dtype (None: from the inputs and parameters).
    impl: as `layers.Conv.impl` ("auto": 3D stride-1 convs as stacked 2D convs on CPU).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  use_bias: bool = True
  weight_init: str = "he"
  negative_slope: float = NNUNET_NEGATIVE_SLOPE
  dtype: Optional[Any] = None
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(N, *S, C_in) -> (N, *S', C_out) with S' = ⌈S / strides⌉ for padding k // 2."""
    d = x.ndim - 2
    k = self.kernel_size
    c_in = x.shape[-1]
    kernel_init, bias_init = _initializers(self.weight_init, c_in * k**d, self.negative_slope)
    kernel = self.param("kernel", kernel_init, (k,) * d + (c_in, self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    padding = ((k // 2, k // 2),) * d
    if self.impl not in ("auto", "native", "stacked2d"):
      raise ValueError(f"Conv impl {self.impl!r} is not one of auto, native, stacked2d.")
    stacked = self.impl == "stacked2d" or (self.impl == "auto" and jax.default_backend() == "cpu" and k > 1)
    if d == 3 and self.strides == 1 and stacked:
      y = layers.conv3d_as_stacked2d(x, kernel, padding)
    else:
      y = lax.conv_general_dilated(x, kernel, window_strides=(self.strides,) * d, padding=padding,
                                   dimension_numbers=layers.conv_dimension_numbers(x.ndim))
    return y if bias is None else y + bias


class NNUNetUpConv(nn.Module):
  """ConvTranspose kernel 2, stride 2, no bias, He init with PyTorch's transposed-conv fan_in C_out·2^d.

  Computed as `layers.ConvTranspose2x` (a per-voxel dense layer and depth-to-space), with the same
  parameter layout and orientation: (N, *S, C_in) -> (N, *(2S), C_out).
  """
  features: int
  negative_slope: float = NNUNET_NEGATIVE_SLOPE
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.ndim - 2
    c_in, c_out = x.shape[-1], self.features
    kernel = self.param("kernel", _he_normal(c_out * 2**d, self.negative_slope), (2,) * d + (c_in, c_out),
                        jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    w = jnp.flip(kernel, axis=tuple(range(d)))
    w = jnp.moveaxis(w, d, 0).reshape(c_in, 2**d * c_out)
    return layers.depth_to_space(jnp.dot(x, w), 2)


class _ConvNormAct(nn.Module):
  """nnU-Net's `ConvDropoutNormNonlin` without dropout: Conv 3 (bias) → InstanceNorm(affine) → LReLU."""
  features: int
  strides: int = 1
  weight_init: str = "he"
  negative_slope: float = NNUNET_NEGATIVE_SLOPE
  dtype: Optional[Any] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = NNUNetConv(self.features, 3, self.strides, weight_init=self.weight_init,
                   negative_slope=self.negative_slope, dtype=self.dtype, impl=self.conv_impl,
                   name="conv")(x)
    x = layers.norm_layer("instance_affine", train=False, dtype=self.dtype, name="norm")(x)
    return nn.leaky_relu(x, self.negative_slope)


class _Stage(nn.Module):
  """Two `_ConvNormAct` (`StackedConvLayers`), the first with stride `first_stride`."""
  features: int
  first_stride: int = 1
  negative_slope: float = NNUNET_NEGATIVE_SLOPE
  dtype: Optional[Any] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    common = dict(negative_slope=self.negative_slope, dtype=self.dtype, conv_impl=self.conv_impl)
    x = _ConvNormAct(self.features, self.first_stride, name="cnl_0", **common)(x)
    return _ConvNormAct(self.features, 1, name="cnl_1", **common)(x)


class NNUNetBranch(nn.Module):
  """The nnU-Net v1 `Generic_UNet` of MAML's branches (module docstring), 2D or 3D.

  Attributes:
    num_classes: K, the logits of every deep-supervision head.
    base_features: f_0 (16 in the released MAML plan: half the plan's 32).
    num_pools: P, the number of stride-2 levels (5 in the typical BraTS plan).
    max_features: the width cap; None: nnU-Net's default for the input's dimension (320 in 3D, 480 in 2D).
    negative_slope: the LeakyReLU slope, also the He init's `a` (0.01).
    dtype: the computation dtype (None: float32 from the parameters); outputs are float32.
    conv_impl: `layers.Conv.impl` of the stride-1 3^d convolutions.
  """
  num_classes: int = 4
  base_features: int = 16
  num_pools: int = 5
  max_features: Optional[int] = None
  negative_slope: float = NNUNET_NEGATIVE_SLOPE
  dtype: Optional[Any] = None
  conv_impl: str = "auto"

  def widths(self, ndim: int) -> tuple[int, ...]:
    """The level widths f_0 … f_P for `ndim` spatial dimensions."""
    cap = self.max_features if self.max_features is not None else NNUNET_MAX_FEATURES.get(ndim, 320)
    return level_widths(self.base_features, self.num_pools, cap)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Any]:
    """Segments x.

    Args:
      x: (N, *S, C_in) (C_in = 1 in MAML), every spatial size divisible by 2^num_pools.
      train: accepted for the common model interface; the branch has no dropout or BatchNorm, so train
        and eval modes are the same.

    Returns:
      {"features": the last decoder features (N, *S, f_0); "logits": a tuple of P logit maps, level l at
      (N, *(S/2^l), K), full resolution first}. Logits are float32; features in the compute dtype.
    """
    del train
    if self.num_pools < 1:
      raise ValueError(f"num_pools must be ≥ 1, got {self.num_pools}.")
    _check_divisible(x, self.num_pools, "NNUNetBranch")
    widths = self.widths(x.ndim - 2)
    common = dict(negative_slope=self.negative_slope, dtype=self.dtype, conv_impl=self.conv_impl)

    skips = []
    for level, f in enumerate(widths):
      x = _Stage(f, 1 if level == 0 else 2, name=f"enc_{level}", **common)(x)
      skips.append(x)
    logits = [None] * self.num_pools
    x = skips.pop()
    for level in reversed(range(self.num_pools)):
      up = NNUNetUpConv(widths[level], self.negative_slope, self.dtype, name=f"up_{level}")(x)
      x = _Stage(widths[level], name=f"dec_{level}", **common)(jnp.concatenate([up, skips[level]], -1))
      head = NNUNetConv(self.num_classes, 1, use_bias=False, negative_slope=self.negative_slope,
                        dtype=self.dtype, name=f"head_{level}")(x)
      logits[level] = layers.at_least_float32(head)
    return {"features": x, "logits": tuple(logits)}


class _MAModule(nn.Module):
  """The modality-aware module: concat [feat_m, fused] → Conv 3 (2F → F, bias) → IN(affine) → LReLU →
  Conv k (F → F, bias) → sigmoid = A_m, voxel- and channel-wise."""
  features: int
  ma_kernel: int
  weight_init: str
  negative_slope: float
  dtype: Optional[Any]
  conv_impl: str

  @nn.compact
  def __call__(self, feat: Array, fused: Array) -> Array:
    common = dict(weight_init=self.weight_init, negative_slope=self.negative_slope, dtype=self.dtype,
                  impl=self.conv_impl)
    h = NNUNetConv(self.features, 3, name="conv_0", **common)(jnp.concatenate([feat, fused], -1))
    h = layers.norm_layer("instance_affine", train=False, dtype=self.dtype, name="norm")(h)
    h = nn.leaky_relu(h, self.negative_slope)
    h = NNUNetConv(self.features, self.ma_kernel, name="conv_1", **common)(h)
    return nn.sigmoid(h)


class MAML(nn.Module):
  """MAML's network: M `NNUNetBranch`es, a fusion conv, M modality-aware modules and a joint head.

  Attributes:
    num_classes: K (4 for BraTS with the background).
    base_features: F, every branch's f_0 and the width of the fusion and MA modules (16).
    num_pools: P of every branch (5).
    max_features: the branches' width cap (None: 320 in 3D, 480 in 2D, nnU-Net's defaults).
    ma_kernel: the kernel of the MA module's second conv, 1 (paper) or 3 (released code).
    shared_init: init of the fusion, MA and joint-head convs: "torch" (PyTorch's default, as released:
      the He initialiser is applied inside the branches only) or "he".
    negative_slope: the LeakyReLU slope and the He init's `a` (0.01).
    dtype: the computation dtype (None: float32); outputs are float32.
    conv_impl: `layers.Conv.impl` of the stride-1 3^d convolutions.
  """
  num_classes: int = 4
  base_features: int = 16
  num_pools: int = 5
  max_features: Optional[int] = None
  ma_kernel: int = 1
  shared_init: str = "torch"
  negative_slope: float = NNUNET_NEGATIVE_SLOPE
  dtype: Optional[Any] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Any]:
    """Segments a multi-modal batch.

    Args:
      x: (N, *S, M), channel m = modality m; every spatial size divisible by 2^num_pools.
      train: accepted for the common model interface (no dropout or BatchNorm: both modes are equal).

    Returns:
      {"joint": (N, *S, K) logits of the joint head;
       "branches": a tuple of M tuples, branches[m][l] = branch m's level-l logits
         (N, *(S/2^l), K), l = 0 (full resolution) … P − 1}. All float32.
      The released loss is w_0·L(joint) + Σ_m Σ_l w_l·L(branches[m][l]) (`losses.maml_loss_weights`);
      a single modality is segmented by branches[m][0].
    """
    del train
    if self.ma_kernel not in MA_KERNELS:
      raise ValueError(f"ma_kernel must be one of {MA_KERNELS}, got {self.ma_kernel}.")
    if self.shared_init not in SHARED_INITS:
      raise ValueError(f"Unknown shared_init {self.shared_init!r}; expected one of {SHARED_INITS}.")
    _check_divisible(x, self.num_pools, "MAML")
    num_modalities = x.shape[-1]
    f = self.base_features
    feats, branch_logits = [], []
    for m in range(num_modalities):
      out = NNUNetBranch(self.num_classes, f, self.num_pools, self.max_features, self.negative_slope,
                         self.dtype, self.conv_impl, name=f"branch_{m}")(x[..., m:m + 1])
      feats.append(out["features"])
      branch_logits.append(out["logits"])
    common = dict(weight_init=self.shared_init, negative_slope=self.negative_slope, dtype=self.dtype)
    fused = NNUNetConv(f, 3, impl=self.conv_impl, name="fusion", **common)(jnp.concatenate(feats, -1))
    weighted = None
    for m in range(num_modalities):
      attention = _MAModule(f, self.ma_kernel, self.shared_init, self.negative_slope, self.dtype,
                            self.conv_impl, name=f"ma_{m}")(feats[m], fused)
      weighted = attention * feats[m] if weighted is None else weighted + attention * feats[m]
    joint = NNUNetConv(self.num_classes, 1, use_bias=False, name="joint_head", **common)(weighted)
    return {"joint": layers.at_least_float32(joint), "branches": tuple(branch_logits)}


def nnunet_branch(num_classes: int = 4, **overrides: Any) -> NNUNetBranch:
  """One MAML branch as released for the typical BraTS plan: base 16, 5 poolings, widths
  16/32/64/128/256/320 (3D); 1 input channel, K logits per deep-supervision head."""
  config: dict[str, Any] = dict(num_classes=num_classes, base_features=16, num_pools=5)
  config.update(overrides)
  return NNUNetBranch(**config)


def maml(num_classes: int = 4, preset: str = "paper", **overrides: Any) -> MAML:
  """MAML's network for the typical BraTS plan (F = 16, 5 poolings); the number of modalities is the
  number of input channels. `preset` sets `ma_kernel`: "paper" 1, "released" 3."""
  if preset not in MAML_PRESETS:
    raise ValueError(f"Unknown MAML preset {preset!r}; expected one of {sorted(MAML_PRESETS)}.")
  config: dict[str, Any] = dict(num_classes=num_classes, base_features=16, num_pools=5,
                                ma_kernel=MAML_PRESETS[preset], shared_init="torch")
  config.update(overrides)
  return MAML(**config)
