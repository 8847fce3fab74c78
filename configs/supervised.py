"""Supervised baseline: the segmenter trained on the labeled cases only.

  python -m jaxseg.main --config configs/supervised.py
  python -m jaxseg.main --config configs/supervised.py:synthetic2d

Default: the embedded synthetic 3D data (labeled = first 4 of 24 volumes, validation = last 4), the
same small 3D UNet and labeled cases as `configs/duo.py`, so the two compare directly. The V-Net baseline
of the LA family (and its LA presets) is `configs/supervised_vnet.py`.
Measured (commit 67451fe, 2-core CPU, seed 0): 2 min 04 s for 400 steps + evaluation; validation
Dice 25.2 %, 95HD 31.0 voxels. GPU: not measured yet (no GPU was lent to the task that built this).
"""

import ml_collections

from jaxseg import evaluate, train
from jaxseg.data.sources import protocol_data_config
from jaxseg.methods import supervised

PRESETS = ("", "synthetic2d")


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"configs/supervised.py: unknown preset {preset!r}, expected one of "
                     f"{[p for p in PRESETS if p]}")
  c = ml_collections.ConfigDict()
  c.name = "supervised" + (f"_{preset}" if preset else "")
  c.job = "train"
  c.seed = 0
  c.data = protocol_data_config(preset or "synthetic3d")
  c.data.batch_unlabeled = 0  # Labeled data only.
  c.method = supervised.default_config()
  c.train = train.train_config()
  c.eval = evaluate.eval_config()
  c.train.num_steps = 400
  if preset == "synthetic2d":
    c.method.model.features = (16, 32, 64, 128)
  return c
