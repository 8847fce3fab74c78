"""DKUXNet: two UX-Net + kMaX networks with dual contrastive learning, docs/methods/dkuxnet.md.

  python -m jaxseg.main --config configs/dkuxnet.py
  python -m jaxseg.main --config configs/dkuxnet.py:supervised     # one UX-Net, dice+CE only
  python -m jaxseg.main --config configs/dkuxnet.py:la8 --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/dkuxnet.py:la4 --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/dkuxnet.py:la16 --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/dkuxnet.py:la8_released --config.data.root=/path/to/la2018

Default: the embedded synthetic 3D data, one organ (data.num_classes = 2; 24 volumes of 64x64x48,
labeled = the first 4, validation = the last 4, unlabeled = the 16 between), 32^3 crops, 2 labeled
+ 2 unlabeled per batch, networks A and B of UX-Net feature size 8 (widths 8/16/32/64) with a kMaX
decoder of N = 8 centres (groups 4 + 4) and narrow widths (centres 32, keys 16, values 32, 2
heads, FFN 64), AdamW 1e-4 (weight decay 0.01), 200 steps, λ_c ramped over 13 blocks of 10 steps
(the LA ramp of 40 blocks of 150 steps squeezed into the first two thirds of the run). Sliding
window 32^3, strides 16. Time on the 2-core CPU: 13 min in all when quiet (801 s), 33 min at
load 4-7 (init compile ≈50 s, step compile 60-200 s, 2.9-3.7 s per step when quiet, validation
≈40 s); 200 steps rather than 300 for that reason (UX-Net feature size 4 gave 3.2 s per step
against 3.7 s, a narrower kMaX nothing measurable). Result (last iteration, validation Dice of the
A/B average, seeds 0 / 1 / 2): 41.4 / 42.0 / 42.5 %. :supervised is the same with one network and dice+CE
only (the baseline with the same labels, batches and steps; 0.45 s per step, 2-6 min in all):
41.5 / 41.9 / 42.7 %.

:la4 / :la8 / :la16: LA 2018 with 4 / 8 / 16 of the 80 train.list volumes labeled (5 / 10 / 20 %,
the poster's table), validation = 8 of the other train.list volumes drawn with seed 0 (the LA
protocol's data.validation = random), unlabeled = the rest, 112x112x80 crops,
2 + 2 per batch, the full networks (UX-Net feature size 48, 53.0 M parameters at 2 classes; kMaX
with N = 32 centres in groups 16 + 16, widths 256 / 128 / 256, 8 heads, FFN 2048), 15000 steps,
λ_c = 0.1 · sigmoid_rampup(⌊t/150⌋, 40), sliding window 112x112x80 with strides (18, 18, 4).
:la8_released is the released training script's loss on one network (groups 16 / 4 / 108 of 128
centres, the voxel-summed query distribution loss) on the :la8 data. Not run on LA yet.
"""

import ml_collections

from jaxseg import config_blocks
from jaxseg.methods import dkuxnet

# The CPU-sized networks of the synthetic default.
_SMALL_NETWORKS = {
    "method.groups": (4, 4),
    "method.model.feature_size": 8,
    "method.model.centre_dim": 32,
    "method.model.key_dim": 16,
    "method.model.value_dim": 32,
    "method.model.num_heads": 2,
    "method.model.ffn_dim": 64,
}
_SYNTHETIC = {
    **config_blocks.data_overrides("synthetic3d"),
    **_SMALL_NETWORKS,
    "method.rampup_block": 10,
    "method.rampup_length": 13,
    "train.num_steps": 200,
    "train.checkpoint_every": 100,
}
_LA = {
    **config_blocks.data_overrides("la"),
    "train.num_steps": 15000,
    "train.checkpoint_every": 1000,
    "eval.patch_size": (112, 112, 80),
    "eval.strides": (18, 18, 4),
}

PRESETS = {
    "": _SYNTHETIC,
    "supervised": {**_SYNTHETIC, "method.preset": "supervised", "data.batch_unlabeled": 0},
    "la4": {**_LA, "data.num_labeled": 4},
    "la8": {**_LA, "data.num_labeled": 8},
    "la16": {**_LA, "data.num_labeled": 16},
    # la8 + per-case z-score + on-device intensity augmentation (configs/_la_family.py).
    "la8_robust": {**_LA, "data.num_labeled": 8, "data.zscore": True,
                   "data.intensity_augment.enabled": True},
    "la8_released": {**_LA, "data.num_labeled": 8, "method.preset": "released",
                     "method.groups": (16, 4, 108), "data.batch_unlabeled": 0},
}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config_blocks.check_preset(preset, PRESETS, "configs/dkuxnet.py")
  c = ml_collections.ConfigDict()
  c.name = "dkuxnet" + (f"_{preset}" if preset else "")
  c.job = "train"
  c.seed = 0
  c.data = config_blocks.data_block()
  c.data.batch_labeled, c.data.batch_unlabeled = 2, 2
  c.method = dkuxnet.default_config()
  c.train = config_blocks.train_block()
  c.eval = config_blocks.eval_block()
  config_blocks.apply_overrides(c, PRESETS[preset], f"configs/dkuxnet.py:{preset}")
  return c
