"""ASDNet: a segmenter (svnet) and a per-voxel confidence network, docs/methods/asdnet.md.

  python -m jaxseg.main --config configs/asdnet.py
  python -m jaxseg.main --config configs/asdnet.py:la8 --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/asdnet.py:la16 --config.data.root=/path/to/la2018
  (add --config.eval.case_list=test.list --config.data.num_validation=0 to evaluate the standard
   test split where it exists)

Default: the embedded synthetic 3D data with three organs (data.num_classes = 4, "adjacent"
layout; 24 volumes of 64x64x48, labeled = first 4, validation = last 4, unlabeled = the 16 between),
32x32x16 crops (also the validation window, strides 16x16x8), 2 labeled + 2 unlabeled per batch,
svnet of base width 8 and a confidence net of widths (8, 16, 32, 64) (the paper's
(32, 64, 128, 256) on the LA presets), 400 steps (the lr decays at 2500 and 5000 do not occur). On
XLA:CPU the confidence net's strided and transposed 3D convolutions dominate the step: on the
2-core CPU (other jobs running) one step took about 3.7-6.7 s with 32^3 crops and 1.6-1.8 s with
32x32x16 crops (jitted `asdnet.train_step`; D's forward and backward on the 4 maps: about 1.6-3.2 s
and 0.8 s; S's: 0.4-0.6 s and 0.2 s), so the default takes the thinner crops (the organs span
about 20-35 voxels per axis; a crop holds parts of them, as a 32^3 one does).
The `paper` preset: λ₁ = 0.03, λ₂ = 0.3, β = 2, γ = 0.5, Adam with coupled weight decay 1e-4, lr
1e-3 (S) and 1e-4 (D). :la8 / :la16 are the LA protocol of configs/_la_family.py (C = 2, 112x112x80
crops, 6000 steps, width 16) with the method's own Adam optimisers instead of the family's SGD.

Measured: not measured yet (neither the default on CPU nor :la8 / :la16 on a GPU).
"""

import ml_collections

from jaxseg import config_blocks
from jaxseg.methods import asdnet

# configs/ is no package: the shared LA-family helper is loaded by path, next to this file.
la_family = config_blocks.load_sibling(__file__, "_la_family")
PRESETS = la_family.PRESETS


# The family's presets plus these: {preset: overrides}.
OWN_PRESETS = {
    # Several organs (the method handles any number of classes) and a narrower confidence net, so
    # that the default trains on a CPU.
    # 32x32x16 crops: the step costs about half of a 32^3 crop's on a CPU.
    "": {"data.num_classes": 4, "method.confidence.features": (8, 16, 32, 64),
         "data.patch_size": (32, 32, 16)},
}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  c = la_family.la_family_config("asdnet", asdnet.default_config(), preset, "configs/asdnet.py",
                                 OWN_PRESETS)
  # The family sets its SGD; ASDNet trains S with its own Adam (both optimisers are the method's).
  c.method.optimizer = asdnet.default_config().optimizer
  return c
