"""ASDNet: a segmenter (svnet) and a per-voxel confidence network, docs/methods/asdnet.md.

  python -m jaxseg.main --config configs/asdnet.py
  python -m jaxseg.main --config configs/asdnet.py:la8 --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/asdnet.py:la16 --config.data.root=/path/to/la2018
  (add --config.eval.case_list=test.list --config.data.num_validation=0 to evaluate the standard
   test split where it exists)
  python -m jaxseg.main --config configs/asdnet.py:msd --config.data.root=/path/to/Task05_Prostate \
    --config.data.num_classes=3
  python -m jaxseg.main --config configs/asdnet.py:released      # the authors' code, synthetic
  python -m jaxseg.main --config configs/asdnet.py:la8_released --config.data.root=/path/to/la2018
  python -m jaxseg.main --config configs/asdnet.py:la16_released --config.data.root=/path/to/la2018

Default: the embedded synthetic 3D data with three organs (data.num_classes = 4, "adjacent"
layout; 24 volumes of 64x64x48, labeled = first 4, validation = last 4, unlabeled = the 16 between),
32x32x16 crops (also the validation window, strides 16x16x8), 2 labeled + 2 unlabeled per batch,
svnet of base width 8 and a confidence net of widths (8, 16, 32, 64) (the paper's
(32, 64, 128, 256) on the LA presets), 400 steps (the lr decays at 2500 and 5000 do not occur). On
XLA:CPU the confidence net's strided and transposed 3D convolutions dominate the step: on the
2-core CPU (other jobs running) one step took about 3.7-6.7 s with 32^3 crops and 1.6-1.8 s with
32x32x16 crops (jitted `asdnet.train_step`; D's forward and backward on the 4 maps: about 1.6-3.2 s
and 0.8 s; S's: 0.4-0.6 s and 0.2 s), so the default takes the thinner crops (the organs span
about 20-35 voxels per axis; a crop holds parts of them, as a 32^3 one does).
The `paper` preset: λ₁ = 0.03, λ₂ = 0.3, β = 2, γ = 0.5, Adam with coupled weight decay 1e-4, lr
1e-3 (S) and 1e-4 (D). :la8 / :la16 are the LA protocol of configs/_la_family.py (C = 2, 112x112x80
crops, 6000 steps, width 16) with the method's own Adam optimisers instead of the family's SGD.
:msd is any Medical Segmentation Decathlon task (jaxseg/data/msd.py: dataset.json, imagesTr/,
labelsTr/) read from --config.data.root. data.num_classes must be the number of labels that
dataset.json declares, background included (3 by default: Hippocampus, Prostate, Liver, Pancreas,
HepaticVessel; 4 for BrainTumour; 2 for the single-organ tasks): another value stops the run when
the data load, naming both counts. Split in manifest order: validation = the last 20 % of the
cases, labeled = the first 10 % of the others, unlabeled = the rest (a task of fewer than 19
training cases gives fewer than the batch's 2 labeled cases, which stops the run: raise
--config.data.labeled_fraction); every modality of the task is an input channel. Each case is
clipped to its 0.5-99.5 intensity percentiles and z-scored per modality. 96x96x64 crops (smaller
volumes are zero-padded, e.g. Hippocampus: override data.patch_size and eval.patch_size, multiples
of 8), 2 + 2 per batch, svnet of width 16, the paper's confidence net (32, 64, 128, 256), 6000 steps
(lr x0.1 at 2500 and 5000), sliding window 96x96x64 with strides (48, 48, 32) (half the window, as
nnU-Net's). Not run on a real MSD task yet (tests/test_asdnet_config.py trains 2 steps on a fake
one).

Measured (commit 9e411ee, seed 0, last iteration, validation = the last 4 synthetic volumes, raw
predictions, distances in voxels; 2-core CPU shared with other jobs, load average 1.7-2.9;
benchmarks/results/asdnet_synthetic_cpu.md):
- default, `python -m jaxseg.main --config configs/asdnet.py`: 16 min 11 s for the whole command
  (steps 1-100 at about 0.25 steps/s while other jobs ran, then 0.55-0.59 steps/s); Dice per organ
  31.3 / 13.6 / 8.6 %, mean 17.8 %; 95HD 34.9, ASD 18.1 (means over the organs). Last log line
  (steps 351-400): mask_fraction 0.057 (0.55 at steps 1-50, falling throughout), d_real 0.66,
  d_fake 0.34.
- the supervised baseline with the same data, labeled crops (2 per step, 32x32x16), svnet of width
  8, Adam (lr 1e-3, coupled decay 1e-4), 400 steps, but its own loss 0.5 (CE + Dice):
  `python -m jaxseg.main --config configs/supervised_vnet.py --config.data.num_classes=4
  --config.data.batch_labeled=2 --config.data.patch_size="(32, 32, 16)"
  --config.method.model.name=svnet --config.method.model.n_filters=8
  --config.method.optimizer.name=adam --config.method.optimizer.learning_rate=0.001
  --config.method.optimizer.decay_every=0
  --config.method.optimizer.decay_boundaries="(2500, 5000)"`: 1 min 09 s; Dice 32.4 / 1.1 /
  0.04 %, mean 11.2 % (organs 2 and 3 predicted empty in 1 and 2 of the 4 cases); 95HD 49.9,
  ASD 37.6.
One seed, 4 validation volumes: the organs 2 and 3 are barely learned by either run in 400 steps.
- released, `python -m jaxseg.main --config configs/asdnet.py:released` (commit eb1b84d, three
  other jobs running, load average 4-5.8): 1 h 33 min, five validations of 2-5 min included; Dice
  per organ 0.0 / 0.0 / 5.0 %, mean 1.7 % (organ 1 predicted empty in every case); mask_fraction 0
  throughout (the threshold 1 - validation Dice stays about 0.98). It learns almost nothing, as
  expected: its labeled sub-batches back-propagate no Dice (docs/methods/asdnet.md).
"""

import ml_collections

from jaxseg import config_blocks
from jaxseg.methods import asdnet

# configs/ is no package: the shared LA-family helper is loaded by path, next to this file.
la_family = config_blocks.load_sibling(__file__, "_la_family")


# Overrides of the family's defaults per preset (the family's presets are all the file's but "msd").
OWN_PRESETS = {
    # Several organs (the method handles any number of classes) and a narrower confidence net, so
    # that the default trains on a CPU.
    # 32x32x16 crops: the step costs about half of a 32^3 crop's on a CPU.
    "": {"data.num_classes": 4, "method.confidence.features": (8, 16, 32, 64),
         "data.patch_size": (32, 32, 16)},
}


# Any MSD task with several classes: applied to the family's default (every key it sets for the
# synthetic data is set again here).
MSD = {
    "data.source": "msd",
    "data.num_classes": 3,  # The user's flag; must match dataset.json's labels (checked at load).
    "data.labeled_fraction": 0.1,
    "data.validation_fraction": 0.2,
    "data.num_validation": 0,  # validation_fraction decides.
    "data.clip_percentiles": (0.5, 99.5),
    "data.zscore": True,
    "data.patch_size": (96, 96, 64),
    "method.model.n_filters": 16,
    "method.confidence.features": (32, 64, 128, 256),
    "train.num_steps": la_family.LA_NUM_STEPS,
    "train.checkpoint_every": 1000,
    "eval.patch_size": (96, 96, 64),
    "eval.strides": (48, 48, 32),
}

# The `released` method preset (the authors' code, docs/methods/asdnet.md) on the family's data:
# {preset: (the data preset it runs on, overrides after the released method block)}. Its batch is
# 3 sub-batches drawn from either stream, so 3 labeled + 3 unlabeled crops make sub-batches of 1
# on the synthetic data, and 9 + 9 the code's 3 patches of 16x64x64 (here 64x64x16, channels last)
# on LA. The threshold of its semi term reads the last validation Dice, so it validates in the
# run: every 100 of the 400 synthetic steps, every 1000 on LA (as the code does, on the
# validation split here, never test).
_RELEASED_SYNTHETIC = {
    "data.batch_labeled": 3, "data.batch_unlabeled": 3,
    "method.model.features": (8, 16, 32, 64),
    "method.confidence.features": (8, 16, 32, 64),
    "train.eval_every": 100,
}
_RELEASED_LA = {
    "data.batch_labeled": 9, "data.batch_unlabeled": 9,
    "data.patch_size": (64, 64, 16),
    "train.eval_every": 1000,
}
RELEASED = {
    "released": ("", _RELEASED_SYNTHETIC),
    "la8_released": ("la8", _RELEASED_LA),
    "la16_released": ("la16", _RELEASED_LA),
}

PRESETS = {**la_family.PRESETS, "msd": MSD, **{p: v for p, (_, v) in RELEASED.items()}}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config_blocks.check_preset(preset, PRESETS, "configs/asdnet.py")
  if preset == "msd":
    c = la_family.la_family_config("asdnet", asdnet.default_config(), "", "configs/asdnet.py")
    c.name = "asdnet_msd"
    config_blocks.apply_overrides(c, MSD, "configs/asdnet.py:msd")
    c.method.optimizer = asdnet.default_config().optimizer  # The method's Adam, not the family's SGD.
  elif preset in RELEASED:
    data_preset, overrides = RELEASED[preset]
    c = la_family.la_family_config("asdnet", asdnet.default_config(), data_preset,
                                   "configs/asdnet.py", OWN_PRESETS)
    c.name = f"asdnet_{preset}"
    c.method = asdnet.released_config()  # Its own segmenter and optimisers.
    config_blocks.apply_overrides(c, overrides, f"configs/asdnet.py:{preset}")
  else:
    c = la_family.la_family_config("asdnet", asdnet.default_config(), preset, "configs/asdnet.py",
                                   OWN_PRESETS)
    # The family sets its SGD; ASDNet trains S with its own Adam (both optimisers are the
    # method's).
    c.method.optimizer = asdnet.default_config().optimizer
  return c
