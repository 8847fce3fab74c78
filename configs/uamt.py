"""UA-MT: Mean Teacher with the consistency restricted to voxels the teacher is certain about.

  python -m jaxseg.main --config configs/uamt.py
  python -m jaxseg.main --config configs/uamt.py:la8 --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/uamt.py:la16 --config.data.root=/path/to/la2018
  (add --config.method.preset=released for the released code's ln 2 and factor 2 whatever the
   number of classes; the same for 2 classes)

Default: the embedded synthetic 3D data (labeled = first 4 of 24 volumes, validation = last 4,
unlabeled = the other 16), 32^3 crops, 2 labeled + 2 unlabeled per batch, a V-Net of base width 8,
400 steps, the consistency ramp squeezed into them (40 blocks of 10 steps) and the uncertainty
threshold ramped over the 400 steps. `:la8` / `:la16` follow the LA 2018 protocol (docs/la_protocol.md,
docs/methods/uamt.md): labeled = the first 8 / 16 of train.list, 112x112x80 crops, base width 16, SGD 0.01 x0.1
every 2500 steps, 6000 steps, T = 8 teacher passes, threshold ramp over 6000 steps, w(t) =
0.1·sigmoid_rampup(t // 150, 40), EMA 0.99. The student is evaluated.

Measured (seed 0, last iteration, raw predictions, commit b88f739): default, 2-core CPU, 8 min 44 s;
validation (last 4 synthetic volumes) Dice 33.6 %, Jaccard 20.2 %, 95HD 29.3, ASD 13.6 voxels
(supervised V-Net: 39.4 %). :la8 not yet run on a GPU (published: 84.25 % on the test split).
"""

import ml_collections

from jaxseg import config_blocks
from jaxseg.methods import uamt

# configs/ is no package: the shared LA-family helper is loaded by path, next to this file.
la_family = config_blocks.load_sibling(__file__, "_la_family")
PRESETS = la_family.PRESETS


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  return la_family.la_family_config("uamt", uamt.default_config(), preset, "configs/uamt.py")
