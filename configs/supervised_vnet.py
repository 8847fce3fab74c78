"""Supervised V-Net: the baseline of every LA table (labeled data only), docs/methods/supervised.md.

  python -m jaxseg.main --config configs/supervised_vnet.py
  python -m jaxseg.main --config configs/supervised_vnet.py:la8 --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/supervised_vnet.py:la16 --config.data.root=/path/to/la2018
  (add --config.eval.case_list=test.list --config.data.num_validation=0 to evaluate the standard test
   split where it exists)

As UA-MT's `train_LA.py`: the V-Net with dropout, batches of 4 labeled samples, loss 0.5 (CE + Dice),
the LA schedule (configs/_la_family.py). Default: the embedded synthetic 3D data (labeled = first 4 of 24
volumes, validation = last 4), a V-Net of base width 8, 400 steps: the baseline of `configs/dtc.py`,
`configs/sassnet.py`, `configs/mean_teacher.py` and `configs/uamt.py`, which train the same V-Net on the
same labeled volumes plus the unlabeled ones.

Measured (seed 0, last iteration, raw predictions; distances in voxels):
- default, 2-core CPU, commit b88f739: 5 min 37 s; validation (last 4 synthetic volumes) Dice 39.4 %,
  Jaccard 25.9 %, 95HD 30.2, ASD 14.5.
- :la8, one H200 (jax 0.11.2), commit b88f739: 6000 steps at 23.8 steps/s, about 5 min 20 s with
  loading and evaluation; validation = the last 8 of train.list: Dice 70.0 % (std 29.8; one case
  predicted empty, scored 0 and the image diagonal), Jaccard 60.2 %, 95HD 50.7, ASD 39.1. One seed on
  8 validation cases; the published 79.99 % (the V-Net row of the SASSNet and DTC papers' LA tables,
  Li et al. 2020, Luo et al. 2021; docs/la_protocol.md) is on the 20-case test split.
"""

import ml_collections

from jaxseg import config_blocks
from jaxseg.methods import supervised

# configs/ is no package: the shared LA-family helper is loaded by path, next to this file.
la_family = config_blocks.load_sibling(__file__, "_la_family")
PRESETS = la_family.PRESETS


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  method = supervised.default_config()
  method.loss = "ce_dice"
  method.model = ml_collections.ConfigDict(dict(name="vnet", n_filters=16, dtype="float32"))
  c = la_family.la_family_config("supervised_vnet", method, preset, "configs/supervised_vnet.py")
  c.data.batch_labeled, c.data.batch_unlabeled = 4, 0  # train_LA.py: 4 labeled samples per batch.
  return c
