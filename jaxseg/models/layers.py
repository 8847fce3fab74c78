"""Building blocks shared by the segmenters and critics (docs/networks.md, PyTorch conventions).

Every layer is rank-generic: the number of spatial dimensions d is taken from the input, which is
channels-last, (N, *spatial, C): (N, H, W, C) in 2D and (N, X, Y, Z, C) in 3D. The same module code
therefore serves 2D and 3D models.

PyTorch conventions reproduced here:

* **Padding** is symmetric and explicit (`padding=p` means p voxels on both sides of every spatial
  axis), never Flax's asymmetric `"SAME"`.
* **Init** `weight_init="torch"` (the default) is PyTorch's default for `Conv*d` / `ConvTranspose*d`:
  weights U(±1/√fan_in), i.e. `variance_scaling(1/3, "fan_in", "uniform")`, and biases U(±1/√fan_in).
  fan_in = C_in·∏k for a convolution and C_out·∏k for a transposed convolution (PyTorch computes it
  from the weight layout (C_in, C_out, *k)). `"kaiming_normal"` is `kaiming_normal_(mode="fan_in")`
  (N(0, 2/fan_in), the SSL4MIS `init_weights(..., "kaiming")`) with PyTorch default biases; `"flax"` is
  Flax's default (LeCun normal, zero bias); `"xavier_uniform"` is ASDNet's `xavier_uniform_(gain=√2)`
  with zero biases.
* **Normalisation** (`norm_layer`): BatchNorm with Flax momentum 0.9 (= PyTorch 0.1) and ε = 1e-5;
  Instance/GroupNorm with PyTorch's ε = 1e-5 (Flax's default is 1e-6); InstanceNorm without affine
  parameters unless asked (PyTorch's `InstanceNorm*d` default); two-pass variance, as PyTorch (Flax's
  default one-pass E[x²] − E[x]² loses accuracy in float32 when |mean| ≫ std).
* **Transposed convolution k2 s2 p0** (`ConvTranspose2x`) is a per-voxel dense layer
  C_in → 2^d·C_out followed by depth-to-space, not XLA's input-dilated convolution, whose backward pass
  is ≈30× slower (jax-ml/jax#31662, openxla/xla#34273). It is numerically `nn.ConvTranspose(strides=2, padding="VALID")`.
* **CPU forms of convolutions** (`Conv.impl="auto"`, the default; GPU and TPU keep XLA's
  convolution): a stride-1 3D convolution runs as one 2D convolution over z-stacked channels
  (`conv3d_as_stacked2d`); a convolution whose stride equals its kernel size, without padding (the
  V-Net's and UX-Net's k2 s2 down-sampling, every 1x1 convolution), as space-to-depth + one matmul
  (`conv_as_patch_dot`), whose gradients are matmuls too. Both equal the convolution up to float
  summation order.
* **Linear interpolation** (`resize_linear`, `upsample_linear`) by per-axis interpolation matrices,
  with both `align_corners` conventions of `torch.nn.functional.interpolate`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
PaddingLike = Union[int, Sequence[tuple[int, int]]]

__all__ = [
    "ACTIVATIONS",
    "BN_EPSILON",
    "BN_MOMENTUM",
    "Conv",
    "ConvBlock",
    "ConvTranspose2x",
    "NORMS",
    "NORM_EPSILON",
    "WEIGHT_INITS",
    "activation_fn",
    "channel_dropout",
    "conv3d_as_stacked2d",
    "conv_as_patch_dot",
    "conv_dimension_numbers",
    "depth_to_space",
    "initializers",
    "interpolation_matrix",
    "max_pool",
    "norm_layer",
    "resize_linear",
    "torch_bias_init",
    "upsample_linear",
    "upsample_nearest",
]

# Flax BatchNorm momentum equal to PyTorch's default momentum 0.1 (Flax keeps `m·old + (1 − m)·new`).
BN_MOMENTUM = 0.9
# ε of PyTorch's BatchNorm / InstanceNorm / GroupNorm.
BN_EPSILON = 1e-5
NORM_EPSILON = 1e-5

NORMS = ("batch", "instance", "instance_affine", "group", "none")
WEIGHT_INITS = ("torch", "kaiming_normal", "flax", "xavier_uniform")
ACTIVATIONS = ("relu", "leaky_relu")


# ----------------------------------------------------------------------------------------------------
# Initialisation.


def _uniform(bound: float) -> Initializer:

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _normal(std: float) -> Initializer:

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)

  return init


def torch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default bias init of conv / linear layers: U(±1/√fan_in) (0 when fan_in = 0)."""
  return _uniform(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def initializers(scheme: str, fan_in: int) -> tuple[Initializer, Initializer]:
  """(kernel_init, bias_init) of a weight-init scheme for a layer with the given fan-in.

  Args:
    scheme: one of `WEIGHT_INITS`:
      "torch": PyTorch default, kernel U(±√(1/fan_in)) (= `variance_scaling(1/3, "fan_in",
        "uniform")`), bias U(±1/√fan_in);
      "kaiming_normal": kernel N(0, 2/fan_in) (`kaiming_normal_(a=0, mode="fan_in")`, not truncated),
        bias as "torch";
      "flax": LeCun normal (truncated, Flax's default) kernel, zero bias;
      "xavier_uniform": `xavier_uniform_(w, gain=√2)` and zero bias, as ASDNet codes every layer:
        U(±√2·√(6/(fan_in + fan_out))) = `variance_scaling(2, "fan_avg", "uniform")`, the fans read from
        the kernel shape (*k, C_in, C_out), so `fan_in` is not used. The sum fan_in + fan_out is the
        same in PyTorch's (C_in, C_out, *k) transposed-convolution layout.
    fan_in: the PyTorch fan-in: C_in·∏k for convolutions, C_out·∏k for transposed convolutions.

  Returns:
    Two initialisers with the `(key, shape, dtype)` signature.
  """
  if scheme == "torch":
    return _uniform(math.sqrt(1.0 / fan_in)), torch_bias_init(fan_in)
  if scheme == "kaiming_normal":
    return _normal(math.sqrt(2.0 / fan_in)), torch_bias_init(fan_in)
  if scheme == "flax":
    return nn.initializers.lecun_normal(), nn.initializers.zeros
  if scheme == "xavier_uniform":
    return nn.initializers.variance_scaling(2.0, "fan_avg", "uniform"), nn.initializers.zeros
  raise ValueError(f"Unknown weight_init {scheme!r}; expected one of {WEIGHT_INITS}.")


# ----------------------------------------------------------------------------------------------------
# Convolutions.


def conv_dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
  """Dimension numbers of a channels-last convolution with kernel (*k, C_in, C_out), for `ndim`-d input."""
  spatial = tuple(range(1, ndim - 1))
  lhs = (0, ndim - 1) + spatial
  rhs = (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
  return lax.ConvDimensionNumbers(lhs_spec=lhs, rhs_spec=rhs, out_spec=lhs)


def _padding_pairs(padding: PaddingLike, d: int) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, int):
    return ((padding, padding),) * d
  pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pairs) != d:
    raise ValueError(f"padding {padding!r} has {len(pairs)} pairs for {d} spatial dimensions.")
  return pairs


class Conv(nn.Module):
  """A channels-last convolution of any spatial rank with PyTorch padding and init.

  Parameters are laid out as in `flax.linen.Conv` ("kernel" (*k, C_in, C_out), "bias" (C_out,)), so
  the two are interchangeable. A PyTorch weight (C_out, C_in, *k) ports as `w.transpose(2, …, 1, 0)`.

  Attributes:
    features: C_out.
    kernel_size: k, the same along every spatial axis.
    strides: the stride along every spatial axis.
    padding: p (symmetric, on every axis, PyTorch's `padding=p`) or d explicit (lo, hi) pairs.
    use_bias: whether to add a bias.
    weight_init: one of `WEIGHT_INITS` (see `initializers`).
    dtype: the computation dtype (None: from the inputs and parameters).
    param_dtype: the parameter dtype.
    impl: "native" (one XLA convolution), "stacked2d" (3D only, see `conv3d_as_stacked2d`),
      "patches" (kernel = stride, no padding: see `conv_as_patch_dot`), or "auto": on the CPU
      backend patches where it applies (1x1 convolutions and the non-overlapping strided ones) and
      stacked2d for the other stride-1 3D convolutions; native otherwise and on GPU/TPU.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: PaddingLike = 0
  use_bias: bool = True
  weight_init: str = "torch"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Convolves (N, *S, C_in) to (N, *S', C_out), S' = ⌊(S + p_lo + p_hi − k) / stride⌋ + 1."""
    d = x.ndim - 2
    if d < 1:
      raise ValueError(f"Conv expects (N, *spatial, C) input, got shape {x.shape}.")
    c_in = x.shape[-1]
    kernel_shape = (self.kernel_size,) * d + (c_in, self.features)
    kernel_init, bias_init = initializers(self.weight_init, c_in * self.kernel_size**d)
    kernel = self.param("kernel", kernel_init, kernel_shape, self.param_dtype)
    bias = self.param("bias", bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    padding = _padding_pairs(self.padding, d)
    if self.impl not in ("auto", "native", "stacked2d", "patches"):
      raise ValueError(f"Conv impl {self.impl!r} is not one of auto, native, stacked2d, patches.")
    on_cpu = self.impl == "auto" and jax.default_backend() == "cpu"
    patches = self.kernel_size == self.strides and all(p == (0, 0) for p in padding)
    if self.impl == "patches" and not patches:
      raise ValueError(f"Conv impl 'patches' needs kernel_size == strides and no padding, got "
                       f"kernel {self.kernel_size}, strides {self.strides}, padding {padding}.")
    stacked = self.impl == "stacked2d" or (on_cpu and self.kernel_size > 1)
    if patches and (self.impl == "patches" or on_cpu):
      y = conv_as_patch_dot(x, kernel)
    elif d == 3 and self.strides == 1 and stacked:
      y = conv3d_as_stacked2d(x, kernel, padding)
    else:
      y = lax.conv_general_dilated(
          x,
          kernel,
          window_strides=(self.strides,) * d,
          padding=padding,
          dimension_numbers=conv_dimension_numbers(x.ndim))
    if bias is not None:
      y = y + bias
    return y


def conv3d_as_stacked2d(x: Array, kernel: Array, padding: Sequence[tuple[int, int]]) -> Array:
  """A stride-1 3D convolution computed as one 2D convolution over (x, y).

  The k shifted copies of the input along z are stacked on the channel axis (C -> k*C) and z is
  folded into the batch, so XLA:CPU runs its fast 2D convolution instead of its generic 3D one:
  5-7x faster forward+backward for the small-channel 3x3x3 convolutions of our models on CPU,
  equal up to float summation order. GPU and TPU backends keep the native 3D convolution.

  Args:
    x: (N, X, Y, Z, C).
    kernel: (kx, ky, kz, C, O).
    padding: three (lo, hi) pairs.

  Returns:
    (N, X', Y', Z', O), as `lax.conv_general_dilated` with the same arguments.
  """
  n, _, _, z, c = x.shape
  kz, out = kernel.shape[2], kernel.shape[-1]
  (z_lo, z_hi) = padding[2]
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (z_lo, z_hi), (0, 0)))
  z_out = z + z_lo + z_hi - kz + 1
  stacked = jnp.concatenate([x[:, :, :, dz:dz + z_out, :] for dz in range(kz)], axis=-1)
  planes = jnp.moveaxis(stacked, 3, 1).reshape(n * z_out, *stacked.shape[1:3], kz * c)
  y = lax.conv_general_dilated(planes, kernel.reshape(*kernel.shape[:2], kz * c, out),
                               window_strides=(1, 1), padding=tuple(padding[:2]),
                               dimension_numbers=conv_dimension_numbers(4))
  return jnp.moveaxis(y.reshape(n, z_out, *y.shape[1:3], out), 1, 3)


def conv_as_patch_dot(x: Array, kernel: Array) -> Array:
  """A convolution whose stride equals its kernel size k, without padding, as one matmul.

  The k^d input voxels under each output voxel do not overlap, so the convolution is a
  space-to-depth (each k^d block to k^d·C channels, in the kernel's (a_1, …, a_d, c) order) and a
  per-voxel dense layer k^d·C -> O: k = 1 is a plain dense layer. On XLA:CPU the kernel gradient of
  the strided convolution runs as a generic windowed convolution, ~1 s for a V-Net's first
  16 -> 32 down-sampling at batch 2 of 64x64x48; as a matmul it takes milliseconds.
  Trailing voxels that do not fill a block are dropped, as the convolution drops them.

  Args:
    x: (N, *S, C).
    kernel: (k,)*d + (C, O).

  Returns:
    (N, *⌊S / k⌋, O), as `lax.conv_general_dilated` with stride k and no padding.
  """
  n, *spatial, c = x.shape
  d, k, out = len(spatial), kernel.shape[0], kernel.shape[-1]
  blocks = [s // k for s in spatial]
  if k > 1:
    x = x[(slice(None), *(slice(0, b * k) for b in blocks))]
    x = x.reshape(n, *(v for b in blocks for v in (b, k)), c)
    # (N, B_1, a_1, …, B_d, a_d, C) -> (N, B_1, …, B_d, a_1, …, a_d, C).
    x = x.transpose([0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1])
    x = x.reshape(n, *blocks, k**d * c)
  return jnp.dot(x, kernel.reshape(k**d * c, out))


def depth_to_space(x: Array, block: int = 2) -> Array:
  """Moves a (block,)*d sub-grid from the channel axis into the spatial axes.

  Args:
    x: (N, *S, block^d·C), channels ordered as (a_1, …, a_d, c) in C (row-major) order.

  Returns:
    (N, *(block·S), C) with out[n, block·i_1 + a_1, …, block·i_d + a_d, c] = x[n, i_1, …, i_d, (a, c)].
  """
  n, *spatial, channels = x.shape
  d = len(spatial)
  if channels % block**d:
    raise ValueError(f"{channels} channels are not divisible by block^d = {block**d}.")
  c = channels // block**d
  x = x.reshape(n, *spatial, *(block,) * d, c)
  # (N, S_1, …, S_d, a_1, …, a_d, C) -> (N, S_1, a_1, …, S_d, a_d, C).
  perm = [0] + [ax for i in range(d) for ax in (1 + i, 1 + d + i)] + [1 + 2 * d]
  return x.transpose(perm).reshape(n, *(block * s for s in spatial), c)


class ConvTranspose2x(nn.Module):
  """Transposed convolution, kernel 2, stride 2, padding 0, as a dense layer plus depth-to-space.

  Equal to `nn.ConvTranspose(features, (2,)*d, strides=(2,)*d, padding="VALID")` with the same
  parameters ("kernel" (2,)*d + (C_in, C_out), "bias" (C_out,)), and to PyTorch's
  `ConvTranspose{d}d(C_in, C_out, 2, stride=2)`. Each input voxel i writes the 2^d output voxels 2i + a
  (a ∈ {0, 1}^d), so the layer is a per-voxel matmul (C_in → 2^d·C_out) and a depth-to-space; this avoids
  XLA's input-dilated convolution, whose gradient is ≈30× slower (jax-ml/jax#31662).

  Orientation: Flax (like `lax.conv_transpose(..., transpose_kernel=False)`) applies the kernel
  unflipped to the dilated input, so out[2i + a] = x[i] · kernel[1 − a]. A PyTorch weight w
  (C_in, C_out, *k) computes out[2i + a] = x[i] · w[:, :, a], so it ports as
  `kernel = flip(w.transpose(2, …, d + 1, 0, 1), spatial axes)`.

  Init: `weight_init="torch"` uses PyTorch's fan_in = C_out·2^d for both kernel and bias.

  Attributes:
    features: C_out.
    use_bias: whether to add a bias.
    weight_init: one of `WEIGHT_INITS`.
    dtype: the computation dtype (None: from the inputs and parameters).
    param_dtype: the parameter dtype.
  """
  features: int
  use_bias: bool = True
  weight_init: str = "torch"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Upsamples (N, *S, C_in) to (N, *(2·S), C_out)."""
    d = x.ndim - 2
    if d < 1:
      raise ValueError(f"ConvTranspose2x expects (N, *spatial, C) input, got shape {x.shape}.")
    c_in, c_out = x.shape[-1], self.features
    kernel_init, bias_init = initializers(self.weight_init, c_out * 2**d)
    kernel = self.param("kernel", kernel_init, (2,) * d + (c_in, c_out), self.param_dtype)
    bias = self.param("bias", bias_init, (c_out,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # (a_1, …, a_d, C_in, C_out), flipped to output-offset order, -> (C_in, a_1, …, a_d, C_out).
    w = jnp.flip(kernel, axis=tuple(range(d)))
    w = jnp.moveaxis(w, d, 0).reshape(c_in, 2**d * c_out)
    y = depth_to_space(jnp.dot(x, w), 2)
    if bias is not None:
      y = y + bias
    return y


def max_pool(x: Array, window: int = 2) -> Array:
  """Max pooling with a `window`^d window and stride `window`, no padding: (N, *S, C) -> (N, *S//w, C)."""
  d = x.ndim - 2
  return nn.max_pool(x, (window,) * d, strides=(window,) * d, padding="VALID")


# ----------------------------------------------------------------------------------------------------
# Interpolation.


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
  """The (n_out, n_in) matrix of 1-d linear interpolation, as in `torch.nn.functional.interpolate`.

  Output sample i reads source coordinate
    align_corners=True:  s = i·(n_in − 1)/(n_out − 1)   (s = 0 when n_out = 1);
    align_corners=False: s = max((i + ½)·n_in/n_out − ½, 0)
  and blends x[⌊s⌋] and x[min(⌊s⌋ + 1, n_in − 1)] with weights (1 − frac(s), frac(s)). For an integer
  scale factor n_out = f·n_in this equals PyTorch's `scale_factor=f`.

  Returns:
    A float64 NumPy array whose rows sum to 1.
  """
  if n_in < 1 or n_out < 1:
    raise ValueError(f"Sizes must be positive, got n_in={n_in}, n_out={n_out}.")
  i = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(i)
  else:
    src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = src - i0
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
  np.add.at(m, (np.arange(n_out), i1), w1)
  return m


def resize_linear(x: Array, shape: Sequence[int], align_corners: bool = False) -> Array:
  """(Bi/tri)linear resize of the spatial axes, one interpolation matrix per axis.

  align_corners=False equals `jax.image.resize(..., "linear")` when upsampling (and PyTorch's
  `interpolate(mode="bilinear"/"trilinear")`); align_corners=True, which `jax.image.resize` lacks,
  equals PyTorch's `align_corners=True` (Duo-SegNet's `nn.Upsample`).

  Args:
    x: (N, *S, C).
    shape: the d output spatial sizes.
    align_corners: the PyTorch convention (see `interpolation_matrix`).

  Returns:
    (N, *shape, C), in x's dtype.
  """
  d = x.ndim - 2
  if len(shape) != d:
    raise ValueError(f"shape {tuple(shape)} does not match the {d} spatial axes of {x.shape}.")
  for axis, (n_in, n_out) in enumerate(zip(x.shape[1:-1], shape), start=1):
    if n_in == n_out:
      continue
    m = jnp.asarray(interpolation_matrix(n_in, int(n_out), align_corners), x.dtype)
    x = jnp.tensordot(x, m, axes=((axis,), (1,)), precision=lax.Precision.HIGHEST)
    x = jnp.moveaxis(x, -1, axis)
  return x


def upsample_linear(x: Array, factor: int = 2, align_corners: bool = False) -> Array:
  """Linear upsampling by an integer factor: (N, *S, C) -> (N, *(factor·S), C); see `resize_linear`."""
  return resize_linear(x, [factor * s for s in x.shape[1:-1]], align_corners)


def upsample_nearest(x: Array, factor: int = 2) -> Array:
  """Nearest-neighbour upsampling by an integer factor: (N, *S, C) -> (N, *(factor·S), C)."""
  for axis in range(1, x.ndim - 1):
    x = jnp.repeat(x, factor, axis=axis)
  return x


# ----------------------------------------------------------------------------------------------------
# Normalisation, activations, dropout.


def norm_layer(kind: str,
               *,
               train: bool,
               axis_name: Optional[str] = None,
               num_groups: int = 16,
               dtype: Optional[Dtype] = None,
               fast_variance: bool = False,
               name: Optional[str] = None) -> Callable[[Array], Array]:
  """A normalisation over the channel (last) axis, created in the calling module's scope.

  Must be called inside a compact method. Kinds (`NORMS`):
    "batch": `nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
      axis_name=axis_name)`, PyTorch's `BatchNorm*d` defaults. In train mode the batch statistics are
      used and the running averages in `batch_stats` are updated (apply with `mutable=["batch_stats"]`);
      in eval mode the running averages are used. `axis_name` synchronises the statistics across a
      `pmap` / `shard_map` axis (under `jit` with a sharded batch they are global anyway).
    "instance": per-sample, per-channel normalisation over the spatial axes, ε = 1e-5, no affine
      parameters (`InstanceNorm*d` default; SSL4MIS `unet_3D`, UA-MT's V-Net option).
    "instance_affine": the same with a learned scale and bias (nnU-Net).
    "group": `GroupNorm(num_groups, affine)`, ε = 1e-5 (the V-Net option uses 16 groups).
    "none": the identity.

  Args:
    kind: the normalisation kind.
    train: whether the model runs in training mode (only "batch" depends on it).
    axis_name: the BatchNorm cross-device axis name, or None.
    num_groups: the number of groups of "group".
    dtype: the computation dtype.
    fast_variance: Flax's one-pass variance E[x²] − E[x]² instead of the two-pass E[(x − E[x])²]
      (PyTorch's accuracy); the one-pass form loses ~20× accuracy in float32 when |mean| ≫ std.
    name: the submodule name (None: Flax's automatic name, e.g. "BatchNorm_0").

  Returns:
    A function (N, *S, C) -> (N, *S, C).
  """
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        axis_name=axis_name, use_fast_variance=fast_variance, dtype=dtype,
                        name=name)
  if kind in ("instance", "instance_affine"):
    affine = kind == "instance_affine"
    return nn.GroupNorm(num_groups=None, group_size=1, epsilon=NORM_EPSILON, use_bias=affine,
                        use_scale=affine, use_fast_variance=fast_variance, dtype=dtype, name=name)
  if kind == "group":
    return nn.GroupNorm(num_groups=num_groups, epsilon=NORM_EPSILON, use_fast_variance=fast_variance,
                        dtype=dtype, name=name)
  if kind == "none":
    return lambda x: x
  raise ValueError(f"Unknown norm {kind!r}; expected one of {NORMS}.")


def activation_fn(name: str, negative_slope: float = 0.01) -> Callable[[Array], Array]:
  """"relu", or "leaky_relu" with the given negative slope (PyTorch's default slope is 0.01)."""
  if name == "relu":
    return nn.relu
  if name == "leaky_relu":
    return lambda x: nn.leaky_relu(x, negative_slope)
  raise ValueError(f"Unknown activation {name!r}; expected one of {ACTIVATIONS}.")


def channel_dropout(rate: float, deterministic: bool, x: Array) -> Array:
  """PyTorch `Dropout2d/3d`: drops whole channels of each sample, (N, *S, C) -> (N, *S, C).

  Uses the 'dropout' RNG stream; must be called inside a compact method.
  """
  return nn.Dropout(rate, broadcast_dims=tuple(range(1, x.ndim - 1)), deterministic=deterministic)(x)


class ConvBlock(nn.Module):
  """`num_convs` × [Conv k (padding k//2) → norm → activation], optionally with dropout in between.

  This is the V-Net `ConvBlock` (k = 3, BN, ReLU, no dropout), the U-Net double conv of Duo-SegNet and
  SSL4MIS `unet_3D`, and the SSL4MIS 2D `ConvBlock` (LeakyReLU and element-wise dropout after the
  first conv). All but the first conv map `features` → `features`.

  Attributes:
    features: output channels of every conv.
    num_convs: number of conv/norm/activation stages.
    kernel_size: conv kernel size (odd; padded by kernel_size // 2).
    norm: one of `NORMS`.
    activation: one of `ACTIVATIONS`.
    negative_slope: the LeakyReLU slope.
    dropout_rate: element-wise dropout after every stage but the last (0: none).
    num_groups: groups of norm="group".
    weight_init: one of `WEIGHT_INITS`.
    bn_axis_name: BatchNorm cross-device axis name.
    dtype: the computation dtype.
    conv_impl: the `Conv.impl` of the block's convolutions.
  """
  features: int
  num_convs: int = 2
  kernel_size: int = 3
  norm: str = "batch"
  activation: str = "relu"
  negative_slope: float = 0.01
  dropout_rate: float = 0.0
  num_groups: int = 16
  weight_init: str = "torch"
  bn_axis_name: Optional[str] = None
  dtype: Optional[Dtype] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, train: bool, dropout: Optional[bool] = None) -> Array:
    """(N, *S, C_in) -> (N, *S, features). Dropout runs iff `dropout` (default: `train`)."""
    act = activation_fn(self.activation, self.negative_slope)
    use_dropout = train if dropout is None else dropout
    for i in range(self.num_convs):
      x = Conv(self.features, self.kernel_size, padding=self.kernel_size // 2,
               weight_init=self.weight_init, dtype=self.dtype, impl=self.conv_impl)(x)
      x = norm_layer(self.norm, train=train, axis_name=self.bn_axis_name, num_groups=self.num_groups,
                     dtype=self.dtype)(x)
      x = act(x)
      if self.dropout_rate > 0 and i < self.num_convs - 1:
        x = nn.Dropout(self.dropout_rate, deterministic=not use_dropout)(x)
    return x


def at_least_float32(x: Array) -> Array:
  """A network output in float32 (or float64 under x64): a bf16 compute dtype (mixed precision)
  stops at the output, so that losses and metrics run in full precision."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))
