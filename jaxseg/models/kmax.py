"""The kMaX (k-means mask transformer) decoder: learnable cluster centres refined over pixel features.

References: `google-research/deeplab2` kMaX-DeepLab (`model/transformer_decoder/kmax.py`,
`model/layers/dual_path_transformer.py`), its PyTorch port `bytedance/kmax-deeplab`, and the 3D
version in `Rows21/DK-UXNet` (`networks/DKUNet/transformer_decoder.py`), which runs two layers on each
of the UX-Net decoder features at 1/8, 1/4 and 1/2 resolution and the final predictor on the
full-resolution decoder output. Everything here is channels-last and works for any spatial rank.

N centres Z (N × D, D = 256, truncated normal σ = 1) are shared by the batch. One kMaX layer on pixel
features X (B, *S, C_x) and centres Z (B, N, D):

    P = GELU(BN(W_p GELU(X)))                 (B, *S, 256)  pixel "bottleneck"
    Q = GELU(BN(W_q Z))                       (B, N, 256)   centre bottleneck (before the update)
    V = BN(W_v P)                             (B, *S, 256)  pixel values
    E-step:  S = predictor(P, Q)              (B, *S, N)    logits;  A = one_hot(argmax_N S), no gradient
    M-step:  Z ← Z + BN₀(W_m BN(Aᵀ V))        Aᵀ V is a sum over the voxels assigned to each centre
    attention (from Q):  q, k, v = split(BN(W_qkv Q));  8 heads, key depth 128, value depth 256
             O = GELU(BN(softmax_keys(BN_heads(q·kᵀ)) v));   Z ← GELU(Z + BN₀(W_o O))
    FFN:     Z ← GELU(Z + BN₀(W_2 GELU(BN(W_1 Z))))           hidden 2048

The predictor (used inside each layer, and once at the end) maps pixel features F and a mask embedding
E (B, N, 256) to logits:

    f̂ = L2-normalise(BN(W_2 GELU(BN(W_1 GELU(BN(depthwise-conv 5^d F)))) + b))   (B, *S, 128)
    m = BN(W_m E)                                                                  (B, N, 128)
    S = BN₁(f̂ · mᵀ)       a BatchNorm over one singleton channel (one γ, initialised to 0.1, one β)

After the layers (coarse to fine), the final predictor runs on the full-resolution features with the mask
embedding GELU(BN(W_e Z)); its logits (B, *S, N) are the output (the caller takes a softmax over N). The
class head and the released code's centre MLP are not built (they do not reach the mask logits).

Conventions kept from the released code: every projection is a bias-free 1×1 convolution (a `Dense`
over the channel axis here), except the last pixel-head convolution (bias); BatchNorm ε = 1e-3 and
PyTorch momentum 0.01 (Flax `momentum=0.99`); "BN₀" has γ initialised to 0 so each residual branch starts
as the identity; exact GELU; no 1/√d scaling of the attention logits (their BatchNorm normalises them);
the centre update sum and the softmax in float32. Initialisers: truncated normal (cut at ±2σ, σ of the
untruncated normal) with σ = √(2/C_in) ("he_normal"), σ = 256^-½ for the qkv and value projections,
σ = 0.01 for the last pixel-head convolution; Xavier-uniform for the depthwise convolution; biases 0.

Memory: the final logits have B·N·V elements (V voxels of the final features), float32: 128 M (512 MB)
at B = 4, N = 32 and V = 112·112·80, and the same again for the softmax the caller takes.

Differences from PyTorch: Flax's running variance is the biased batch variance (PyTorch keeps
the unbiased one), which only affects eval mode.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models.uxnet import GroupedConv

Array = jax.Array
Dtype = Any

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # PyTorch's momentum 0.01.


# ----------------------------------------------------------------------------------------------------
# Pure pieces.


def hard_assignment(logits: Array) -> Array:
  """One-hot of the argmax over the last (centre) axis, with no gradient.

  Ties go to the first index, as `jnp.argmax` (and PyTorch's `max`). (B, *S, N) -> (B, *S, N), in the
  logits' dtype.
  """
  logits = jax.lax.stop_gradient(logits)
  index = jnp.argmax(logits, axis=-1)
  return jax.lax.stop_gradient(jax.nn.one_hot(index, logits.shape[-1], dtype=logits.dtype))


def centre_update_sum(assignment: Array, values: Array) -> Array:
  """Aᵀ V: for each centre, the sum of the values of the voxels assigned to it, in float32.

  Args:
    assignment: (B, *S, N), a (one-hot) assignment of voxels to centres.
    values: (B, *S, C).

  Returns:
    (B, N, C) float32 (at least).
  """
  b, n, c = assignment.shape[0], assignment.shape[-1], values.shape[-1]
  dtype = jnp.promote_types(jnp.promote_types(assignment.dtype, values.dtype), jnp.float32)
  a = assignment.reshape(b, -1, n).astype(dtype)
  v = values.reshape(b, -1, c).astype(dtype)
  return jnp.einsum("bvn,bvc->bnc", a, v)


def attention_logits(q: Array, k: Array, num_heads: int) -> Array:
  """Per-head dot products (no scaling): (B, L, D_k), (B, M, D_k) -> (B, L, M, heads).

  Channels are split head-major (channel h·(D_k/heads) + j is dimension j of head h), as the released
  code's reshape. The heads are last so that a BatchNorm over the channel axis normalises per head.
  """
  b, l, dk = q.shape
  m = k.shape[1]
  qh = q.reshape(b, l, num_heads, dk // num_heads)
  kh = k.reshape(b, m, num_heads, dk // num_heads)
  return jnp.einsum("blhd,bmhd->blmh", qh, kh)


def attend(weights: Array, v: Array, num_heads: int) -> Array:
  """Retrieves values with per-head weights: (B, L, M, heads), (B, M, D_v) -> (B, L, D_v), head-major."""
  b, m, dv = v.shape
  vh = v.reshape(b, m, num_heads, dv // num_heads)
  out = jnp.einsum("blmh,bmhd->blhd", weights.astype(vh.dtype), vh)
  return out.reshape(b, out.shape[1], dv)


def multi_head_attention(q: Array,
                         k: Array,
                         v: Array,
                         num_heads: int,
                         normalise_logits: Optional[Callable[[Array], Array]] = None) -> Array:
  """The attention core: softmax over the keys of (normalised) per-head logits, then the values.

  Args:
    q: (B, L, D_k) queries.
    k: (B, M, D_k) keys.
    v: (B, M, D_v) values.
    num_heads: heads; D_k and D_v must be divisible by it.
    normalise_logits: applied to the (B, L, M, heads) logits before the softmax (the kMaX layer passes
      a BatchNorm over the heads); None: the identity.

  Returns:
    (B, L, D_v) in v's dtype; the softmax is computed in float32 (at least).
  """
  if q.shape[-1] % num_heads or v.shape[-1] % num_heads:
    raise ValueError(f"key depth {q.shape[-1]} and value depth {v.shape[-1]} must be divisible by "
                     f"num_heads={num_heads}.")
  logits = attention_logits(q, k, num_heads)
  if normalise_logits is not None:
    logits = normalise_logits(logits)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  weights = jax.nn.softmax(logits, axis=2)
  return attend(weights, v, num_heads)


def l2_normalise(x: Array, epsilon: float = 1e-12) -> Array:
  """x / max(‖x‖₂, ε) over the last axis (PyTorch `F.normalize`)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, epsilon)


def _gelu(x: Array) -> Array:
  return nn.gelu(x, approximate=False)


def _he_normal(fan_in: int) -> Callable:
  """Truncated normal (±2σ) with σ = √(2 / fan_in), the released code's "he_normal"."""
  return nn.initializers.truncated_normal(stddev=math.sqrt(2.0 / fan_in))


def _batch_norm(train: bool,
                dtype: Optional[Dtype],
                axis_name: Optional[str],
                name: str,
                scale: float = 1.0) -> nn.BatchNorm:
  """BatchNorm over the last axis, ε = 1e-3, PyTorch momentum 0.01, γ initialised to `scale`."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      axis_name=axis_name, use_fast_variance=False, dtype=dtype,
                      scale_init=nn.initializers.constant(scale), name=name)


# ----------------------------------------------------------------------------------------------------
# Modules.


class KMaXPredictor(nn.Module):
  """Pixel head + mask kernel -> logits (B, *S, N) (float32) of voxel-to-centre similarity.

  Attributes:
    pixel_head_dim: the pixel head's hidden width (256).
    mask_dim: the embedding width of pixels and mask kernels (128).
    dtype: the computation dtype (None: from inputs and parameters); the logits are float32.
    bn_axis_name: BatchNorm cross-device axis name.
    conv_impl: `uxnet.GroupedConv.impl` of the depthwise 5^d conv ("auto": a block-diagonal dense
      conv on the CPU backend, the native grouped conv on GPU/TPU).
  """
  pixel_head_dim: int = 256
  mask_dim: int = 128
  dtype: Optional[Dtype] = None
  bn_axis_name: Optional[str] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, pixel_features: Array, mask_embeddings: Array, train: bool = False) -> Array:
    """(B, *S, C) pixel features, (B, N, E) mask embeddings -> (B, *S, N) float32 logits."""
    bn = functools.partial(_batch_norm, train, self.dtype, self.bn_axis_name)
    c = pixel_features.shape[-1]
    d = pixel_features.ndim - 2
    # The parameters of nn.Conv(c, (5,)*d, feature_group_count=c, use_bias=False) with
    # Xavier-uniform init; on CPU it runs as a block-diagonal dense conv (uxnet.GroupedConv).
    f = GroupedConv(c, 5, groups=c, use_bias=False, dtype=self.dtype, impl=self.conv_impl,
                    kernel_init=nn.initializers.xavier_uniform(),
                    name="pixel_depthwise")(pixel_features)
    f = _gelu(bn("pixel_depthwise_bn")(f))
    f = nn.Dense(self.pixel_head_dim, use_bias=False, kernel_init=_he_normal(c), dtype=self.dtype,
                 name="pixel_conv1")(f)
    f = _gelu(bn("pixel_conv1_bn")(f))
    f = nn.Dense(self.mask_dim, use_bias=True,
                 kernel_init=nn.initializers.truncated_normal(stddev=0.01), dtype=self.dtype,
                 name="pixel_conv2")(f)
    f = bn("pixel_conv2_bn")(f)
    f = l2_normalise(f.astype(jnp.promote_types(f.dtype, jnp.float32)))
    self.sow("intermediates", "pixel_embedding", f)

    m = nn.Dense(self.mask_dim, use_bias=False, kernel_init=_he_normal(mask_embeddings.shape[-1]),
                 dtype=self.dtype, name="mask_head")(mask_embeddings)
    m = bn("mask_head_bn")(m)
    m = m.astype(f.dtype)
    self.sow("intermediates", "mask_kernel", m)
    logits = jnp.einsum("b...c,bnc->b...n", f, m)
    logits = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                          axis_name=self.bn_axis_name, use_fast_variance=False, dtype=f.dtype,
                          scale_init=nn.initializers.constant(0.1),
                          name="logits_bn")(logits[..., None])
    return logits[..., 0]


class KMaXLayer(nn.Module):
  """One kMaX layer: E-step (hard assignment), M-step (sum update), centre self-attention, FFN.

  Attributes:
    centre_dim: D, the centre width (256).
    bottleneck_dim: the width of P and Q (256).
    key_dim: total key depth of the self-attention (128).
    value_dim: total value depth of the self-attention and of the pixel values V (256).
    num_heads: attention heads (8).
    ffn_dim: the FFN's hidden width (2048).
    pixel_head_dim, mask_dim: the predictor's widths (256, 128).
    dtype: the computation dtype (None: from inputs and parameters).
    bn_axis_name: BatchNorm cross-device axis name.
    conv_impl: the predictor's depthwise conv implementation (`KMaXPredictor.conv_impl`).

  Apply with `mutable=["intermediates"]` to get P, Q, V, the logits S, the assignment A and the
  M-step update (the "intermediates" collection).
  """
  centre_dim: int = 256
  bottleneck_dim: int = 256
  key_dim: int = 128
  value_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  pixel_head_dim: int = 256
  mask_dim: int = 128
  dtype: Optional[Dtype] = None
  bn_axis_name: Optional[str] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, pixel_features: Array, centres: Array, train: bool = False) -> Array:
    """(B, *S, C_x) pixel features, (B, N, D) centres -> updated centres (B, N, D), float32."""
    bn = functools.partial(_batch_norm, train, self.dtype, self.bn_axis_name)
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    z = centres.astype(jnp.promote_types(centres.dtype, jnp.float32))
    c_x = pixel_features.shape[-1]
    init_std = self.bottleneck_dim**-0.5

    p = dense(self.bottleneck_dim, kernel_init=_he_normal(c_x), name="pixel_proj")(
        _gelu(pixel_features))
    p = _gelu(bn("pixel_proj_bn")(p))
    q = dense(self.bottleneck_dim, kernel_init=_he_normal(self.centre_dim), name="query_proj")(z)
    q = _gelu(bn("query_proj_bn")(q))
    v = dense(self.value_dim, kernel_init=nn.initializers.truncated_normal(init_std),
              name="value_proj")(p)
    v = bn("value_proj_bn")(v)
    self.sow("intermediates", "pixel_space", p)
    self.sow("intermediates", "query_space", q)
    self.sow("intermediates", "pixel_values", v)

    # E-step.
    logits = KMaXPredictor(self.pixel_head_dim, self.mask_dim, dtype=self.dtype,
                           bn_axis_name=self.bn_axis_name, conv_impl=self.conv_impl,
                           name="predictor")(p, q, train)
    assignment = hard_assignment(logits)
    self.sow("intermediates", "mask_logits", logits)
    self.sow("intermediates", "assignment", assignment)

    # M-step.
    u = centre_update_sum(assignment, v)
    u = bn("kmeans_sum_bn")(u)
    u = dense(self.centre_dim, kernel_init=_he_normal(self.value_dim), name="kmeans_out")(u)
    u = bn("kmeans_out_bn", scale=0.0)(u)
    self.sow("intermediates", "kmeans_update", u)
    z = z + u.astype(z.dtype)

    # Centre self-attention, from the pre-update Q.
    qkv = dense(2 * self.key_dim + self.value_dim,
                kernel_init=nn.initializers.truncated_normal(init_std), name="qkv")(q)
    qkv = bn("qkv_bn")(qkv)
    aq, ak, av = jnp.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)
    o = multi_head_attention(aq, ak, av, self.num_heads,
                             normalise_logits=bn("attention_logits_bn"))
    o = _gelu(bn("attention_values_bn")(o))
    o = dense(self.centre_dim, kernel_init=_he_normal(self.value_dim), name="attention_out")(o)
    o = bn("attention_out_bn", scale=0.0)(o)
    z = _gelu(z + o.astype(z.dtype))

    # FFN.
    h = dense(self.ffn_dim, kernel_init=_he_normal(self.centre_dim), name="ffn1")(z)
    h = _gelu(bn("ffn1_bn")(h))
    h = dense(self.centre_dim, kernel_init=_he_normal(self.ffn_dim), name="ffn2")(h)
    h = bn("ffn2_bn", scale=0.0)(h)
    return _gelu(z + h.astype(z.dtype))


class KMaXDecoder(nn.Module):
  """The kMaX decoder: centres refined by kMaX layers on each pixel-feature map, then mask logits.

    decoder = KMaXDecoder(num_centres=32)
    out = decoder.apply(variables, [x8, x4, x2], x1, train=True, mutable=["batch_stats"])
    out["mask_logits"]  # (B, *S, N) float32 on x1's grid; R = softmax(out["mask_logits"], -1)
    out["centres"]      # (B, N, D) float32

  Attributes:
    num_centres: N, the learnable centres (DK-UXNet: 128).
    centre_dim: D (256).
    bottleneck_dim, key_dim, value_dim, num_heads, ffn_dim: the kMaX layers' widths (256, 128, 256, 8,
      2048).
    pixel_head_dim, mask_dim: the predictors' widths (256, 128).
    layers_per_scale: kMaX layers on each pixel-feature map (2).
    dtype: the computation dtype (None: float32 from the parameters); parameters, BatchNorm
      statistics, the centre stream and all logits are float32.
    bn_axis_name: BatchNorm cross-device axis name (None: no cross-device sync).
    conv_impl: the predictors' depthwise conv implementation (`KMaXPredictor.conv_impl`).

  BatchNorm uses batch statistics and updates `batch_stats` when `train` (apply with
  `mutable=["batch_stats"]`); running averages otherwise.
  """
  num_centres: int = 128
  centre_dim: int = 256
  bottleneck_dim: int = 256
  key_dim: int = 128
  value_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  pixel_head_dim: int = 256
  mask_dim: int = 128
  layers_per_scale: int = 2
  dtype: Optional[Dtype] = None
  bn_axis_name: Optional[str] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, pixel_features: Sequence[Array], final_features: Array,
               train: bool = False) -> dict[str, Array]:
    """Runs the decoder.

    Args:
      pixel_features: the pixel-feature maps (B, *S_i, C_i), coarsest first (any sizes and widths).
      final_features: (B, *S, C) the full-resolution features the final predictor runs on.
      train: training mode (BatchNorm batch statistics, `batch_stats` updated).

    Returns:
      {"mask_logits": (B, *S, N) float32, "centres": (B, N, D) float32}.
    """
    b = final_features.shape[0]
    centres = self.param("centres", nn.initializers.truncated_normal(stddev=1.0),
                         (self.num_centres, self.centre_dim), jnp.float32)
    z = jnp.broadcast_to(centres[None], (b,) + centres.shape)
    for i, x in enumerate(pixel_features):
      for j in range(self.layers_per_scale):
        z = KMaXLayer(centre_dim=self.centre_dim, bottleneck_dim=self.bottleneck_dim,
                      key_dim=self.key_dim, value_dim=self.value_dim, num_heads=self.num_heads,
                      ffn_dim=self.ffn_dim, pixel_head_dim=self.pixel_head_dim,
                      mask_dim=self.mask_dim, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                      conv_impl=self.conv_impl, name=f"layer_{i}_{j}")(x, z, train)
    e = nn.Dense(self.centre_dim, use_bias=False, kernel_init=_he_normal(self.centre_dim),
                 dtype=self.dtype, name="mask_embedding")(z)
    e = _gelu(_batch_norm(train, self.dtype, self.bn_axis_name, "mask_embedding_bn")(e))
    logits = KMaXPredictor(self.pixel_head_dim, self.mask_dim, dtype=self.dtype,
                           bn_axis_name=self.bn_axis_name, conv_impl=self.conv_impl,
                           name="predictor")(final_features, e, train)
    return {"mask_logits": logits.astype(jnp.promote_types(logits.dtype, jnp.float32)),
            "centres": z}
