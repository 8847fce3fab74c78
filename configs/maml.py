"""MAML: modality-aware mutual learning, multi-modal and fully supervised, docs/methods/maml.md.

  python -m jaxseg.main --config configs/maml.py
  python -m jaxseg.main --config configs/maml.py --config.method.preset=released  # MA 3³, w₀·L
  python -m jaxseg.main --config configs/maml.py --mode eval --config.eval.modalities=subsets
  python -m jaxseg.main --config configs/maml.py:early_fusion    # nnU-Net, modalities as channels
  python -m jaxseg.main --config configs/maml.py:single_modality  # nnU-Net on channel 0 alone
  python -m jaxseg.main --config configs/maml.py:brats \
    --config.data.root=/path/to/Task01_BrainTumour

Default: the embedded synthetic 3D data with 4 modalities and 3 nested structures (data.num_classes
= 4, "nested" layout, like the tumour sub-regions of BraTS; modality m shows class m at a low
contrast, so the classes need several modalities); 24 volumes of 64x64x48, fully supervised:
labeled = the first 20, validation = the last 4, no unlabeled cases. 32x32x16 crops, 2 per batch
(the second centred on a foreground voxel: nnU-Net's oversampling of a third, round(2 · 0.67) = 1
uniform crop), the on-device nnU-Net augmentation, 4 branches of base width 8 with 3 poolings (widths
8/16/32/64), SGD 0.01 (Nesterov momentum 0.99, weight decay 3e-5, poly over the run, gradient
norm clipped to 12), 300 steps. Sliding window 32x32x16 (strides half of it). Scored per class and
on the regions WT = {1, 2, 3}, TC = {2, 3}, ET = {3} (the nested classes as BraTS's).

:brats is the Medical Segmentation Decathlon's Task01_BrainTumour (jaxseg/data/msd.py: 4D NIfTI,
modalities FLAIR, T1w, t1gd, T2w as channels 0-3; labels 1 edema, 2 non-enhancing tumour,
3 enhancing tumour) read from --config.data.root; regions WT = {1, 2, 3}, TC = {2, 3}, ET = {3}.
Each modality is z-scored over the voxels where some modality is non-zero (the brain, holes
filled) and the background set to 0, as nnU-Net normalises MR (data.zscore_nonzero). Split in
manifest order:
validation = the last 97 of the 484 cases (20 %), labeled = the other 387. 128³ crops, 2 per
batch, the released plan's branches (base 16, 5 poolings: 16/32/64/128/256/320), 250000 steps
(nnU-Net's 1000 epochs of 250 iterations), sliding window 128³ with strides 64 (half the window)
and Gaussian weights, as nnU-Net's (flip test-time augmentation off). Not run on the real task yet
(tests/test_maml_config.py trains 2 steps on a tiny fake one).

Measured (commit 65ccb1f, seed 0, last iteration, validation = the last 4 volumes, raw predictions;
2-core CPU shared with other jobs, load 1.2-4.3; benchmarks/maml_synthetic_cpu.sh,
benchmarks/results/maml_synthetic_cpu.md): the default command in 587 s (0.5-0.8 steps/s, the
final evaluation included), Dice with all 4 modalities: classes 56.7 / 52.2 / 47.0 %, mean 52.0 %;
WT 59.0, TC 52.6, ET 47.0 %. `--mode eval --config.eval.modalities=subsets` (498 s) scores every
subset: with 3 of the 4 modalities 17.0-37.0 % mean Dice, with one 11.3-22.6 %. :early_fusion
(312 s): 49.0 % mean with all modalities (WT 59.3, TC 43.6, ET 43.9). :single_modality on channel
0 / 1 / 2 / 3 (3-4 min each): 27.5 / 9.3 / 19.8 / 22.0 % mean.
"""

import ml_collections

from jaxseg import config_blocks
from jaxseg.methods import maml

# BraTS's nested tumour regions; the synthetic "nested" layout nests its classes the same way.
REGIONS = (("WT", (1, 2, 3)), ("TC", (2, 3)), ("ET", (3,)))

# {preset: overrides of the default config below}.
PRESETS = {
    "": {},
    # The nnU-Net baselines of the paper's tables, with this config's data, loss, augmentation,
    # sampler, optimiser and steps: one network on the 4 modalities stacked as channels...
    "early_fusion": {"method.fusion": "early"},
    # ...and one network on one modality (channel 0; another with --config.data.modalities='(2,)').
    "single_modality": {"method.fusion": "early", "data.modalities": (0,)},
    "brats": {
        "data.source": "msd",
        "data.num_classes": 4,
        # Task01_BrainTumour's 484 training cases: validation = the last 97 (20 %), labeled = the
        # 387 others (a copy with fewer cases stops the run naming data.num_labeled).
        "data.num_labeled": 387,
        "data.num_validation": 97,
        "data.zscore": True,
        "data.zscore_nonzero": True,  # nnU-Net's MR normalisation: the brain, not the background.
        "data.patch_size": (128, 128, 128),
        "method.model.base_features": 16,
        "method.model.num_pools": 5,
        "train.num_steps": 250000,
        "train.log_every": 250,
        "train.checkpoint_every": 5000,
        "eval.patch_size": (128, 128, 128),
        "eval.strides": (64, 64, 64),
        "eval.gaussian": True,
    },
}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config_blocks.check_preset(preset, PRESETS, "configs/maml.py")
  c = ml_collections.ConfigDict()
  c.name = "maml" + (f"_{preset}" if preset else "")
  c.job = "train"
  c.seed = 0
  c.data = config_blocks.data_block()
  c.data.num_classes = 4
  c.data.synthetic.num_modalities = 4
  c.data.synthetic.layout = "nested"
  c.data.num_labeled = 20  # Fully supervised: every training case is labeled.
  c.data.num_validation = 4
  c.data.batch_labeled, c.data.batch_unlabeled = 2, 0
  c.data.patch_size = (32, 32, 16)
  c.data.augment = False  # The method augments on the device (moreDA, mirroring included).
  c.data.foreground_oversample = 0.33  # nnU-Net's sampler: the last third centred on foreground.
  c.method = maml.default_config()
  c.method.model.base_features = 8
  c.method.model.num_pools = 3
  c.train = config_blocks.train_block()
  c.train.num_steps = 300
  c.train.checkpoint_every = 100
  c.eval = config_blocks.eval_block()
  c.eval.regions = REGIONS
  config_blocks.apply_overrides(c, PRESETS[preset], f"configs/maml.py:{preset}")
  return c
