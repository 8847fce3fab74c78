"""SASSNet: a two-head V-Net and a discriminator of its signed distance maps, docs/methods/sassnet.md.

  python -m jaxseg.main --config configs/sassnet.py
  python -m jaxseg.main --config configs/sassnet.py:la8 --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/sassnet.py:la16 --config.data.root=/path/to/la2018
  (add --config.eval.case_list=test.list --config.data.num_validation=0 to evaluate the standard
   test split where it exists)

Default: the embedded synthetic 3D data (labeled = first 4 of 24 volumes, validation = last 4),
32^3 crops, a V-Net of base width 8 and a discriminator of width ndf = 16, 2 + 2 samples per batch,
400 steps with the adversarial ramp squeezed into them (40 blocks of 10 steps), beta_max = 0.01.
Compare with `configs/supervised_vnet.py` (the same V-Net on the same labeled volumes) and
`configs/dtc.py` (the same two-head V-Net, a consistency term instead of the discriminator).
:la8 / :la16 are the LA protocol (configs/_la_family.py) with the reference's discriminator (ndf = 64,
Adam 1e-4, betas (0.9, 0.99)) and beta_max = 0.015 / 0.01 (the SASSNet README's settings for 8 / 16
labels); the `paper` and `released` presets are the same for SASSNet.

Measured (seed 0, last iteration, raw predictions, commit b88f739): default, 2-core CPU, 18 min 22 s
(the discriminator's strided 3D convolutions are slow on XLA:CPU); validation (last 4 synthetic
volumes) Dice 32.0 %, Jaccard 19.1 %, 95HD 30.0, ASD 13.5 voxels (supervised V-Net: 39.4 %). :la8 not
yet run on a GPU (published: 87.32 % on the test split).
"""

import ml_collections

from jaxseg import config_blocks
from jaxseg.methods import sassnet

# configs/ is no package: the shared LA-family helper is loaded by path, next to this file.
la_family = config_blocks.load_sibling(__file__, "_la_family")
PRESETS = la_family.PRESETS


# The family's presets plus these: {preset: overrides}.
OWN_PRESETS = {
    "": {"method.discriminator.ndf": 16},  # The small synthetic default: a narrower discriminator.
    "la8": {"method.beta_max": 0.015},  # SASSNet README: 0.015 with 8 labels, 0.01 with 16.
}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  return la_family.la_family_config("sassnet", sassnet.default_config(), preset,
                                    "configs/sassnet.py", OWN_PRESETS)
