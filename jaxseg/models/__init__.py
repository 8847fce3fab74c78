"""Segmenters and critics (flax.linen, architecture only), and a registry by name.

    model = get_model("vnet_sdf")                       # a flax Module; kwargs override its fields
    variables = model.init(rng, x, train=False)         # x: (N, X, Y, Z, C) or (N, H, W, C)
    out, updates = model.apply(variables, x, train=True, rngs={"dropout": key},
                               mutable=["batch_stats"])

| name | module | reference |
|---|---|---|
| `unet` | `UNet` (generic; Duo-SegNet's defaults) | |
| `duo_unet` | `UNet` | Duo-SegNet `model/UNet.py` (31,390,721 params) |
| `unet3d` | `UNet` | SSL4MIS `unet_3D` (5,884,050 params, 2 classes) |
| `unet2d` | `UNet` | SSL4MIS 2D `UNet` (docs/networks.md) |
| `vnet` | `VNet` | UA-MT `vnet.py` (9,448,866 params) |
| `vnet_sdf` | `VNet` | DTC `vnet_sdf.py` (9,448,866 params) |
| `duo_critic` | `PixelCritic` | Duo-SegNet `PixelDiscriminator` (8,704 params) |
| `sassnet_discriminator` | `SDFDiscriminator` | SASSNet `FC3DDiscriminator` (11,020,290 params) |
| `svnet` | `VNet` (`drop_deepest`) | ASDNet's "SVNet" (3,612,706 params) |
| `asdnet_confidence` | `ConfidenceFCN` | ASDNet `Discriminator_my23DLRResFCN` (5,507,970 params, 2 ch in) |
| `hrres_segnet_ds` | `HRResSegNetDS` | ASDNet `HRResSegNet_DS` (4,036,142 params) |
| `nnunet_branch` | `NNUNetBranch` | MAML's branch, nnU-Net v1 `Generic_UNet` (16,593,456 params, 1 channel in, 4 classes) |
| `maml` | `MAML` | `YaoZhang93/MAML` `Generic_MAML` (66,458,128 params, 4 modalities, 4 classes; `released` 66,484,752) |
| `uxnet` | `UXNet` | `MASILab/3DUX-Net` `UXNET` (53,005,922 params, 1 channel in, 2 classes) |
| `dkuxnet` | `DKUXNet` | UX-Net + kMaX decoder, `Rows21/DK-UXNet` (`kmax=False`: the UX-Net alone) |
| `kmax_decoder` | `KMaXDecoder` (pixel features coarse to fine + final features; not a segmenter on its own) | deeplab2 kMaX-DeepLab, `Rows21/DK-UXNet` (docs/networks.md) |
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.asdnet import ConfidenceFCN, HRResSegNetDS, asdnet_confidence, hrres_segnet_ds
from jaxseg.models.critics import PixelCritic, SDFDiscriminator, duo_critic, sassnet_discriminator
from jaxseg.models.dkuxnet import DKUXNet, dkuxnet
from jaxseg.models.kmax import KMaXDecoder
from jaxseg.models.maml import MAML, NNUNetBranch, maml, nnunet_branch
from jaxseg.models.unet import UNet, duo_unet, ssl4mis_unet2d, ssl4mis_unet3d
from jaxseg.models.uxnet import UXNet, uxnet
from jaxseg.models.vnet import VNet, svnet, vnet, vnet_sdf

__all__ = [
    "ConfidenceFCN",
    "DKUXNet",
    "HRResSegNetDS",
    "KMaXDecoder",
    "MAML",
    "MODELS",
    "NNUNetBranch",
    "PixelCritic",
    "SDFDiscriminator",
    "UNet",
    "UXNet",
    "VNet",
    "asdnet_confidence",
    "count_params",
    "dkuxnet",
    "duo_critic",
    "duo_unet",
    "get_model",
    "hrres_segnet_ds",
    "layers",
    "maml",
    "nnunet_branch",
    "sassnet_discriminator",
    "ssl4mis_unet2d",
    "ssl4mis_unet3d",
    "svnet",
    "uxnet",
    "vnet",
    "vnet_sdf",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "unet": UNet,
    "duo_unet": duo_unet,
    "unet3d": ssl4mis_unet3d,
    "unet2d": ssl4mis_unet2d,
    "vnet": vnet,
    "vnet_sdf": vnet_sdf,
    "duo_critic": duo_critic,
    "sassnet_discriminator": sassnet_discriminator,
    "svnet": svnet,
    "asdnet_confidence": asdnet_confidence,
    "hrres_segnet_ds": hrres_segnet_ds,
    "nnunet_branch": nnunet_branch,
    "maml": maml,
    "uxnet": uxnet,
    "dkuxnet": dkuxnet,
    "kmax_decoder": KMaXDecoder,
}


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """The model registered as `name` (see `MODELS`), its fields overridden by `kwargs`."""
  try:
    factory = MODELS[name]
  except KeyError:
    raise ValueError(f"Unknown model {name!r}; expected one of {sorted(MODELS)}.") from None
  return factory(**kwargs)


def count_params(model: nn.Module, input_shape: Sequence[int], dtype: Any = jnp.float32) -> int:
  """Number of trainable parameters (the 'params' collection) for an input of `input_shape`.

  Uses `jax.eval_shape`, so nothing is computed: full-size models are counted instantly. The count
  depends on the input channels (last entry of `input_shape`), not on the spatial sizes.
  """
  x = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype),
                                                train=False))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables.get("params", {})))
