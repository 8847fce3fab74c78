"""DKUXNet's network: a 3D UX-Net whose decoder features also feed a kMaX decoder.

    net = DKUXNet(num_classes=2, num_centres=32)
    out = net.apply(variables, x, train=True, mutable=["batch_stats"])
    out["logits"]       # (B, *S, K) the UX-Net's conv head
    out["mask_logits"]  # (B, *S, N) the kMaX decoder's final mask logits (absent with kmax=False)

The kMaX decoder runs 2 layers on each of the UX-Net decoder outputs at 1/8, 1/4 and 1/2 of the
input size (8·fs, 4·fs, 2·fs channels) and its final predictor on the full-resolution output (fs
channels), as `Rows21/DK-UXNet` wires them; its mask logits do not feed the conv head. With
`kmax=False` it is the UX-Net alone (the supervised baseline).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax

from jaxseg.models.kmax import KMaXDecoder
from jaxseg.models.uxnet import UXNet

Array = jax.Array


class DKUXNet(nn.Module):
  """UX-Net + kMaX decoder (module docstring).

  Attributes:
    num_classes: K of the conv head.
    feature_size: the UX-Net's fs (48 in the reference: widths 48/96/192/384, bottleneck 768).
    kmax: build the kMaX decoder (False: the UX-Net alone, no "mask_logits").
    num_centres: N, the kMaX centres.
    centre_dim, key_dim, value_dim, num_heads, ffn_dim: the kMaX layers' widths (256, 128, 256,
      8, 2048 in the reference).
    dtype: the computation dtype (None: float32); parameters, norms' statistics and every logit are
      float32.
  """
  num_classes: int = 2
  feature_size: int = 48
  kmax: bool = True
  num_centres: int = 32
  centre_dim: int = 256
  key_dim: int = 128
  value_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    out = UXNet(num_classes=self.num_classes, feature_size=self.feature_size, dtype=self.dtype,
                name="uxnet")(x, train)
    result = {"logits": out["logits"]}
    if self.kmax:
      features = out["features"]
      decoder = KMaXDecoder(num_centres=self.num_centres, centre_dim=self.centre_dim,
                            bottleneck_dim=self.centre_dim, key_dim=self.key_dim,
                            value_dim=self.value_dim, num_heads=self.num_heads,
                            ffn_dim=self.ffn_dim, pixel_head_dim=self.centre_dim,
                            mask_dim=self.key_dim, dtype=self.dtype, name="kmax")
      decoded = decoder([features["d3"], features["d2"], features["d1"]], features["d0"], train)
      result["mask_logits"] = decoded["mask_logits"]
    return result


def dkuxnet(num_classes: int = 2, **overrides: Any) -> DKUXNet:
  """DKUXNet at the reference widths (UX-Net fs 48; kMaX 256 / 128 / 256, 8 heads, FFN 2048) with
  N = 32 centres (jaxseg's LA setting; the released code's 128 with num_centres=128)."""
  return DKUXNet(num_classes=num_classes, **overrides)
