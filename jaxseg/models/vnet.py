"""The V-Net of the LA family (docs/networks.md): UA-MT `code/networks/vnet.py`, DTC `vnet_sdf.py`.

Not Milletari's V-Net: no residuals, 3^d kernels, ReLU, skips added (not concatenated). With base width
n = 16 and BatchNorm it has 9,448,866 parameters with either head set (`vnet`: one 16→2 head;
`vnet_sdf`: two 16→1 heads).

    stage  layers                      channels      (at 112×112×80)
    1      cb(1); Down                 C_in→n → 2n   → 56×56×40
    2      cb(2); Down                 2n → 4n       → 28×28×20
    3      cb(3); Down                 4n → 8n       → 14×14×10
    4      cb(3); Down                 8n → 16n      → 7×7×5
    5      cb(3), Dropout; Up, + x4    16n → 8n      → 14×14×10
    6      cb(3); Up, + x3             8n → 4n       → 28×28×20
    7      cb(3); Up, + x2             4n → 2n       → 56×56×40
    8      cb(2); Up, + x1             2n → n        → 112×112×80
    9      cb(1), Dropout; heads       n

cb(k) = k × [Conv 3 p1 (bias) → norm → ReLU]; Down = Conv k2 s2 (bias) → norm → ReLU; Up = ConvTranspose
k2 s2 (bias) → norm → ReLU, computed as dense + depth-to-space (`layers.ConvTranspose2x`). Dropout is
channel-wise (PyTorch `Dropout3d(0.5)`), on in training only. Spatial sizes must be divisible by 16.

`svnet` (ASDNet's "SVNet", `drop_deepest=True`) removes the deepest level: no stage-4 Down, no block
five and no block-five Up; block four, then the dropout, feeds block six, and sizes need only be
divisible by 8.

Parameter names follow the PyTorch attribute names (`block_one`, `block_one_dw`, …, `block_five_up`, …)
so that reference weights map one-to-one; the heads are named after their outputs.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models import layers

Array = jax.Array
HeadSpec = tuple[str, int, Optional[str]]

__all__ = ["HEAD_ACTIVATIONS", "VNet", "svnet", "vnet", "vnet_sdf"]

HEAD_ACTIVATIONS = (None, "none", "tanh", "sigmoid")
_NAMES = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Convs per block, blocks one … nine.
_STAGES = (1, 2, 3, 3, 3, 3, 3, 2, 1)


class _DownBlock(nn.Module):
  """Conv k2 s2 p0 → norm → ReLU: (N, *S, C) -> (N, *S/2, features)."""
  features: int
  norm: str
  num_groups: int
  weight_init: str
  bn_axis_name: Optional[str]
  dtype: Optional[Any]

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = layers.Conv(self.features, 2, strides=2, padding=0, weight_init=self.weight_init,
                    dtype=self.dtype)(x)
    x = layers.norm_layer(self.norm, train=train, axis_name=self.bn_axis_name,
                          num_groups=self.num_groups, dtype=self.dtype)(x)
    return nn.relu(x)


class _UpBlock(nn.Module):
  """ConvTranspose k2 s2 p0 → norm → ReLU: (N, *S, C) -> (N, *2S, features)."""
  features: int
  norm: str
  num_groups: int
  weight_init: str
  bn_axis_name: Optional[str]
  dtype: Optional[Any]

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = layers.ConvTranspose2x(self.features, weight_init=self.weight_init, dtype=self.dtype)(x)
    x = layers.norm_layer(self.norm, train=train, axis_name=self.bn_axis_name,
                          num_groups=self.num_groups, dtype=self.dtype)(x)
    return nn.relu(x)


class VNet(nn.Module):
  """The LA-family V-Net with configurable output heads, 2D or 3D.

  Attributes:
    heads: (name, channels, activation) per output head, each a 1^d conv (bias) on block nine;
      activation ∈ {None, "none", "tanh", "sigmoid"}. `vnet`: (("seg", 2, None),); `vnet_sdf`:
      (("sdf", 1, "tanh"), ("seg", 1, None)).
    n_filters: base width n (16).
    norm: one of `layers.NORMS`; the reference uses "batch" ("instance" is its InstanceNorm3d without
      affine, "group" its GroupNorm(16)).
    dropout_rate: channel-wise dropout rate after blocks five and nine (0: the reference's
      has_dropout=False).
    num_groups: groups of norm="group".
    weight_init: one of `layers.WEIGHT_INITS`; "torch" (PyTorch default init) as in the reference.
    bn_axis_name: BatchNorm cross-device axis name (None: no cross-device sync).
    dtype: the computation dtype (None: float32 from the parameters).
    drop_deepest: remove the deepest level (block four's Down, block five, block five's Up): block
      four, followed by the dropout, feeds block six. ASDNet's "SVNet" (`svnet`); spatial sizes
      need only be divisible by 8.
  """
  heads: Sequence[HeadSpec] = (("seg", 2, None),)
  n_filters: int = 16
  norm: str = "batch"
  dropout_rate: float = 0.5
  num_groups: int = 16
  weight_init: str = "torch"
  bn_axis_name: Optional[str] = None
  dtype: Optional[Any] = None
  conv_impl: str = "auto"  # layers.Conv.impl of the 3x3x3 convolutions.
  drop_deepest: bool = False

  def _common(self) -> dict:
    return dict(norm=self.norm, num_groups=self.num_groups, weight_init=self.weight_init,
                bn_axis_name=self.bn_axis_name, dtype=self.dtype)

  @nn.compact
  def __call__(self, x: Array, train: bool,
               dropout: Optional[bool] = None) -> Union[Array, dict[str, Array]]:
    """Runs the network.

    Args:
      x: (N, X, Y, Z, C_in) or (N, H, W, C_in); spatial sizes divisible by 16 (8 with
        `drop_deepest`).
      train: training mode: BatchNorm uses batch statistics and updates `batch_stats` (apply with
        `mutable=["batch_stats"]`); dropout is on. Eval mode uses the running averages.
      dropout: overrides whether dropout is on (default: `train`; the reference's `turnoff_drop=True`
        is `dropout=False`); needs the 'dropout' RNG when on.

    Returns:
      With one head, its output (N, *spatial, channels); with several, a dict name -> output, in head
      order. Heads without activation return logits.
    """
    factor = 8 if self.drop_deepest else 16
    if x.ndim < 3 or any(s % factor for s in x.shape[1:-1]):
      raise ValueError(f"Input {x.shape} must be (N, *spatial, C) with spatial sizes divisible by "
                       f"{factor}.")
    heads = tuple(self.heads)
    names = [h[0] for h in heads]
    if not heads or len(set(names)) != len(names):
      raise ValueError(f"heads must be non-empty with unique names, got {heads}.")
    for _, _, act in heads:
      if act not in HEAD_ACTIVATIONS:
        raise ValueError(f"Unknown head activation {act!r}; expected one of {HEAD_ACTIVATIONS}.")
    use_dropout = (train if dropout is None else dropout) and self.dropout_rate > 0
    n = self.n_filters
    widths = (n, 2 * n, 4 * n, 8 * n, 16 * n, 8 * n, 4 * n, 2 * n, n)

    def block(i: int, h: Array) -> Array:
      return layers.ConvBlock(widths[i], num_convs=_STAGES[i], kernel_size=3, activation="relu",
                              name=f"block_{_NAMES[i]}", conv_impl=self.conv_impl,
                              **self._common())(h, train)

    def dropout_(h: Array) -> Array:
      return layers.channel_dropout(self.dropout_rate, not use_dropout, h) if use_dropout else h

    # Encoder.
    skips = []
    for i in range(3 if self.drop_deepest else 4):
      x = block(i, x)
      skips.append(x)
      x = _DownBlock(widths[i + 1], name=f"block_{_NAMES[i]}_dw", **self._common())(x, train)
    if self.drop_deepest:
      # Block four is the bottleneck: it takes block five's dropout and feeds block six directly
      # (both have 8n channels), so there is neither a stage-4 skip nor an Up to add it to.
      x = block(5, dropout_(block(3, x)))
      first_up = 5
    else:
      x = dropout_(block(4, x))
      first_up = 4
    # Decoder: up to the skip's width, add the skip.
    for i in range(first_up, 8):
      skip = skips[7 - i]
      x = _UpBlock(skip.shape[-1], name=f"block_{_NAMES[i]}_up", **self._common())(x, train)
      x = block(i + 1, x + skip)
    x = dropout_(x)

    outputs = {}
    for name, channels, act in heads:
      y = layers.at_least_float32(layers.Conv(channels, 1, weight_init=self.weight_init,
                                              dtype=self.dtype, name=f"head_{name}")(x))
      if act == "tanh":
        y = jnp.tanh(y)
      elif act == "sigmoid":
        y = nn.sigmoid(y)
      outputs[name] = y
    return outputs[names[0]] if len(heads) == 1 else outputs


def vnet(num_classes: int = 2, **overrides: Any) -> VNet:
  """`vnet` (UA-MT / MT / supervised): one head "seg" of `num_classes` logits (softmax outside).

  The reference trains it as VNet(n_channels=1, n_classes=2, normalization="batchnorm",
  has_dropout=True): base width 16, BN, Dropout3d(0.5), PyTorch default init; 9,448,866 parameters.
  """
  config: dict[str, Any] = dict(heads=(("seg", num_classes, None),), n_filters=16, norm="batch",
                                dropout_rate=0.5, weight_init="torch")
  config.update(overrides)
  return VNet(**config)


def vnet_sdf(num_classes: int = 1, **overrides: Any) -> VNet:
  """`vnet_sdf` (DTC, SASSNet): heads "sdf" (Conv 1 → tanh, the level set) and "seg" (logits).

  DTC's `out_conv` (tanh) and `out_conv2` (segmentation) both have n_classes = 1 channels; 9,448,866
  parameters with base width 16 and BN. Returns {"sdf": (N, *S, 1) in [−1, 1], "seg": (N, *S, 1)}.
  """
  config: dict[str, Any] = dict(heads=(("sdf", num_classes, "tanh"), ("seg", num_classes, None)),
                                n_filters=16, norm="batch", dropout_rate=0.5, weight_init="torch")
  config.update(overrides)
  return VNet(**config)


def svnet(num_classes: int = 2, **overrides: Any) -> VNet:
  """`svnet` (ASDNet's segmenter "SVNet"): the `vnet` without its deepest level, Xavier init.

  ASDNet describes SVNet only as a V-Net with the internal pool-conv-deconv layers removed; here that is
  `drop_deepest=True`: block four's Down, block five and its Up go, block four (then the channel
  dropout that followed block five) feeds block six. One head "seg" of `num_classes` logits. ASDNet
  initialises every layer Xavier-uniform with gain √2 and zero biases (`weight_init="xavier_uniform"`).
  Base width 16, BN, 1 input channel, 2 classes: 3,612,706 parameters, the `vnet`'s 9,448,866 less
  the removed 5,836,160 (tests/models/test_vnet.py writes the sums out).
  """
  config: dict[str, Any] = dict(heads=(("seg", num_classes, None),), n_filters=16, norm="batch",
                                dropout_rate=0.5, weight_init="xavier_uniform", drop_deepest=True)
  config.update(overrides)
  return VNet(**config)
