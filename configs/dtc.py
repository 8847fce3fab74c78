"""DTC: dual-task consistency (segmentation + level-set heads of one V-Net), docs/methods/dtc.md.

  python -m jaxseg.main --config configs/dtc.py
  python -m jaxseg.main --config configs/dtc.py:la8 --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/dtc.py:la16 --config.data.root=/path/to/la2018
  (add --config.eval.case_list=test.list --config.data.num_validation=0 to evaluate the standard test
   split where it exists; --config.method.preset=paper for the paper's beta = 1)

Default: the embedded synthetic 3D data (labeled = first 4 of 24 volumes, validation = last 4), a V-Net
of base width 8, 2 + 2 samples per batch, 400 steps, the `paper` preset (beta = 1). Compare with
`configs/supervised_vnet.py`, the same V-Net on the same labeled volumes.
:la8 / :la16 are the LA protocol (configs/_la_family.py) with the `released` preset (beta = 0.3), which
produced the published LA numbers (DTC README: 87.51 Dice with 8 labels, 89.42 with 16, test split).

Measured (seed 0, last iteration, raw predictions; distances in voxels):
- default, 2-core CPU, commit b88f739: 5 min 18 s; validation (last 4 synthetic volumes) Dice 22.3 %,
  Jaccard 12.8 %, 95HD 30.9, ASD 14.9 (the supervised V-Net, 4 labeled crops per step against 2 here:
  39.4 %; 400 steps show that the method runs, not what it reaches).
- :la8, one H200 (jax 0.11.2), commit b88f739: 5 min 21 s for the whole run (6000 steps at 22.9
  steps/s, the signed distance maps computed inside the jitted step); validation = the last 8 of
  train.list: Dice 68.9 % (std 33.8), Jaccard 60.8 %, 95HD 21.5, ASD 3.9. One seed on 8 validation
  cases, below the published 87.5 % on the test split; see the README.
"""

import ml_collections

from jaxseg import config_blocks
from jaxseg.methods import dtc

# configs/ is no package: the shared LA-family helper is loaded by path, next to this file.
la_family = config_blocks.load_sibling(__file__, "_la_family")
PRESETS = la_family.PRESETS


# The family's presets plus these: {preset: overrides}.
OWN_PRESETS = {
    # beta = 0.3: the setting behind the published LA numbers.
    "la8": {"method.preset": "released"},
    "la16": {"method.preset": "released"},
}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  return la_family.la_family_config("dtc", dtc.default_config(), preset, "configs/dtc.py",
                                    OWN_PRESETS)
