"""The configuration shared by the LA family: supervised V-Net, Mean Teacher, UA-MT, DTC, SASSNet.

Not a config file itself (hence the underscore): each of
`configs/{supervised_vnet,mean_teacher,uamt,dtc,sassnet}.py` loads it by path,
`config_blocks.load_sibling(__file__, "_la_family")`, calls `la_family_config` with its method block
and preset, then sets what is its own. Presets (docs/la_protocol.md):

- "" (default): the embedded synthetic 3D data (24 volumes of 64x64x48; labeled = first 4,
  validation = last 4, unlabeled = the other 16), 32^3 crops, 2 labeled + 2 unlabeled per batch,
  a V-Net of base width 8, SGD 0.01, 400 steps. Minutes on a CPU.
- "la8" / "la16": the LA 2018 protocol: labeled = the first 8 / 16 of train.list, validation = 8
  cases drawn from the others (data.validation = "random", seed 0), unlabeled = the rest; 112x112x80 crops, 2 + 2 per batch; the V-Net of base
  width 16; SGD 0.01 (momentum 0.9, coupled weight decay 1e-4) x0.1 every 2500 steps; 6000 steps;
  sliding window 112x112x80 with strides (18, 18, 4), threshold 0.5, raw and LCC rows.
  The data root is a flag: --config.data.root=/path/to/la2018. To evaluate the standard test
  split where it exists, add --config.eval.case_list=test.list (cases read from the same root;
  with --config.data.num_validation=0 the unlabeled set is all of train.list but the labeled
  cases, as in the literature).
- "la8_robust" / "la16_robust": "la8" / "la16" (with the config file's own overrides of them) plus
  per-case z-scoring of each volume (data.zscore) and the on-device intensity augmentation
  (data.intensity_augment: scale, shift, contrast, gamma), so that a validation volume stored with
  another intensity scale than the labeled ones is not read as background (docs/la_protocol.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import ml_collections

from jaxseg import config_blocks, optim

LA_NUM_STEPS = 6000
SYNTHETIC_NUM_STEPS = 400

_LA = {
    **config_blocks.data_overrides("la"),
    "method.model.n_filters": 16,
    "train.num_steps": LA_NUM_STEPS,
    "train.checkpoint_every": 1000,
    "eval.patch_size": (112, 112, 80),
    "eval.strides": (18, 18, 4),
}

# {preset: overrides of the config}.
PRESETS = {
    "": {
        **config_blocks.data_overrides("synthetic3d"),
        "method.model.n_filters": 8,
        "train.num_steps": SYNTHETIC_NUM_STEPS,
        "train.checkpoint_every": 200,
    },
    "la8": {**_LA, "data.num_labeled": 8},
    "la16": {**_LA, "data.num_labeled": 16},
}
# The intensity-robust variants: {preset: the preset it extends}.
ROBUST_BASE = {"la8_robust": "la8", "la16_robust": "la16"}
ROBUST = {"data.zscore": True, "data.intensity_augment.enabled": True}
PRESETS.update({robust: {**PRESETS[base], **ROBUST} for robust, base in ROBUST_BASE.items()})

# {preset: overrides of the ramps of the methods that have them} (a method without the key keeps
# none). The LA ramps span the 6000 steps (40 blocks of 150 steps); squeezed into the 400 steps of
# the synthetic default (40 blocks of 10), so that the consistency terms reach full weight within
# the run.
RAMPS = {
    "": {"rampup_block": 10, "threshold_rampup": SYNTHETIC_NUM_STEPS},
    "la8": {},
    "la16": {},
    "la8_robust": {},
    "la16_robust": {},
}


def la_family_config(name: str, method: ml_collections.ConfigDict, preset: str = "",
                     config_file: str = "",
                     own_presets: Optional[Mapping[str, Mapping[str, Any]]] = None
                     ) -> ml_collections.ConfigDict:
  """The full config of an LA-family method.

  Args:
    name: the run name ("dtc", ...); the preset is appended.
    method: the method's `default_config()`; its `model` block's name is kept, its width and
      optimiser are set here per preset.
    preset: a key of PRESETS.
    config_file: for the error message on an unknown preset.
    own_presets: the config file's own {preset: overrides}, applied after the family's (a preset
      it does not name has none; a robust variant gets those of the preset it extends, then its
      own).

  Raises:
    ValueError: unknown preset.
  """
  config_blocks.check_preset(preset, PRESETS, config_file or name)
  c = ml_collections.ConfigDict()
  c.name = name + (f"_{preset}" if preset else "")
  c.job = "train"
  c.seed = 0
  c.method = method
  c.train = config_blocks.train_block()
  c.eval = config_blocks.eval_block()
  c.method.optimizer = optim.optimizer_config(
      "sgd", 0.01, momentum=0.9, weight_decay=1e-4, decay_every=2500, decay_factor=0.1)
  c.data = config_blocks.data_block()
  c.data.batch_labeled, c.data.batch_unlabeled = 2, 2
  own = own_presets or {}
  base = ROBUST_BASE.get(preset, preset)
  overrides = {**PRESETS[preset], **own.get(base, {}), **own.get(preset, {})}
  config_blocks.apply_overrides(c, overrides, f"{config_file or name}:{preset}")
  for key, value in RAMPS[preset].items():
    if key in c.method:
      c.method[key] = value
  return c
