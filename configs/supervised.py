"""Supervised baseline: the segmenter trained on the labeled cases only.

  python -m jaxseg.main --config configs/supervised.py
  python -m jaxseg.main --config configs/supervised.py:synthetic2d     # the wider UNet
  python -m jaxseg.main --config configs/supervised.py:synthetic3d     # the embedded 3D volumes

Default: the embedded synthetic 2D data (100 images of 128x128, labeled = the first 10, validation =
the last 20), 96x96 crops, 2 labeled crops per step, the UNet of widths (8, 16, 32, 64), 400 steps:
the same data, labeled images, backbone and steps as `configs/duo.py`, so the two compare directly
(each preset matches the preset of the same name there). The V-Net baseline of the LA family (and
its LA presets) is `configs/supervised_vnet.py`.
Measured (commit 05dd8a4, seed 0, last iteration, on a quiet 2-core CPU): 44 s for the whole
command (400 steps, compilation and evaluation); validation Dice 92.2 %, 95HD 7.8 pixels.
`:synthetic3d` (the 3D default before, commit 67451fe): 25.2 % in 2 min 04 s. GPU: not measured yet
(no GPU was lent to the task that measured this).
"""

import ml_collections

from jaxseg import config_blocks
from jaxseg.methods import supervised

# {preset: overrides of the config}.
PRESETS = {
    # configs/duo.py's quick start: 2D synthetic images, UNet widths (8, 16, 32, 64), 400 steps.
    "": config_blocks.data_overrides("synthetic2d"),
    "synthetic2d": {**config_blocks.data_overrides("synthetic2d"),
                    "method.model.features": (16, 32, 64, 128)},
    # The embedded 3D volumes (the default before the 2D quick start), 32^3 crops.
    "synthetic3d": config_blocks.data_overrides("synthetic3d"),
}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config_blocks.check_preset(preset, PRESETS, "configs/supervised.py")
  c = ml_collections.ConfigDict()
  c.name = "supervised" + (f"_{preset}" if preset else "")
  c.job = "train"
  c.seed = 0
  c.data = config_blocks.data_block()
  c.data.batch_unlabeled = 0  # Labeled data only.
  c.method = supervised.default_config()
  c.train = config_blocks.train_block()
  c.eval = config_blocks.eval_block()
  c.train.num_steps = 400
  return config_blocks.apply_overrides(c, PRESETS[preset], f"configs/supervised.py:{preset}")
