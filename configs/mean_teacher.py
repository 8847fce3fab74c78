"""Mean Teacher: an EMA teacher's noisy predictions as consistency targets for a V-Net student.

  python -m jaxseg.main --config configs/mean_teacher.py
  python -m jaxseg.main --config configs/mean_teacher.py:la8 --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/mean_teacher.py:la16 --config.data.root=/path/to/la2018

Default: the embedded synthetic 3D data (labeled = first 4 of 24 volumes, validation = last 4,
unlabeled = the other 16), 32^3 crops, 2 labeled + 2 unlabeled per batch, a V-Net of base width 8,
400 steps, the consistency ramp squeezed into them (40 blocks of 10 steps). `:la8` / `:la16` follow
the LA 2018 protocol (docs/la_protocol.md, docs/methods/mean_teacher.md): labeled = the first 8 / 16
of train.list, 112x112x80 crops, base width 16, SGD 0.01 x0.1 every 2500 steps, 6000 steps,
w(t) = 0.1·sigmoid_rampup(t // 150, 40), EMA 0.99. The student is evaluated.

Measured (seed 0, last iteration, raw predictions, commit b88f739): default, 2-core CPU, 5 min 40 s;
validation (last 4 synthetic volumes) Dice 37.0 %, Jaccard 22.7 %, 95HD 29.3, ASD 13.3 voxels
(supervised V-Net: 39.4 %). :la8 not yet run on a GPU.
"""

import ml_collections

from jaxseg import config_blocks
from jaxseg.methods import mean_teacher

# configs/ is no package: the shared LA-family helper is loaded by path, next to this file.
la_family = config_blocks.load_sibling(__file__, "_la_family")
PRESETS = la_family.PRESETS


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  return la_family.la_family_config("mean_teacher", mean_teacher.default_config(), preset,
                                    "configs/mean_teacher.py")
