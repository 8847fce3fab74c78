"""Supervised V-Net: the baseline of every LA table (labeled data only), METHODS.md §6.1.

  python -m jaxseg.main --config configs/supervised_vnet.py
  python -m jaxseg.main --config configs/supervised_vnet.py:la8 --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/supervised_vnet.py:la16 --config.data.root=/path/to/la2018
  (add --config.eval.case_list=test.list --config.data.num_validation=0 to evaluate the standard test
   split where it exists)

As UA-MT's `train_LA.py`: the V-Net with dropout, batches of 4 labeled samples, loss 0.5 (CE + Dice),
the LA schedule (jaxseg/la_family.py). Default: the embedded synthetic 3D data (labeled = first 4 of 24
volumes, validation = last 4), a V-Net of base width 8, 400 steps: the baseline of `configs/dtc.py`,
`configs/sassnet.py`, `configs/mean_teacher.py` and `configs/uamt.py`, which train the same V-Net on the
same labeled volumes plus the unlabeled ones.
"""

import ml_collections

from jaxseg import la_family
from jaxseg.methods import supervised

PRESETS = la_family.PRESETS


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  method = supervised.default_config()
  method.loss = "ce_dice"
  method.model = ml_collections.ConfigDict(dict(name="vnet", n_filters=16))
  c = la_family.la_family_config("supervised_vnet", method, preset, "configs/supervised_vnet.py")
  c.data.batch_labeled, c.data.batch_unlabeled = 4, 0  # train_LA.py: 4 labeled samples per batch.
  return c
