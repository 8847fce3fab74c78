"""The configuration shared by the LA family: supervised V-Net, Mean Teacher, UA-MT, DTC, SASSNet.

Each of `configs/{supervised_vnet,mean_teacher,uamt,dtc,sassnet}.py` calls `la_family_config` with its
method block and preset, then sets what is its own. Presets (METHODS.md §1):

- "" (default): the embedded synthetic 3D data (24 volumes of 64x64x48; labeled = first 4,
  validation = last 4, unlabeled = the other 16), 32^3 crops, 2 labeled + 2 unlabeled per batch,
  a V-Net of base width 8, SGD 0.01, 400 steps. Minutes on a CPU.
- "la8" / "la16": the LA 2018 protocol: labeled = the first 8 / 16 of train.list, validation = the
  last 8 of train.list, unlabeled = the rest; 112x112x80 crops, 2 + 2 per batch; the V-Net of base
  width 16; SGD 0.01 (momentum 0.9, coupled weight decay 1e-4) x0.1 every 2500 steps; 6000 steps;
  sliding window 112x112x80 with strides (18, 18, 4), threshold 0.5, raw and LCC rows.
  The data root is a flag: --config.data.root=/path/to/la2018. To evaluate the standard test
  split where it exists, add --config.eval.case_list=test.list (cases read from the same root;
  with --config.data.num_validation=0 the unlabeled set is all of train.list but the labeled
  cases, as in the literature).
"""

from __future__ import annotations

import ml_collections

from jaxseg import evaluate, train
from jaxseg.data.sources import protocol_data_config
from jaxseg.methods import base

PRESETS = ("", "la8", "la16")
LA_NUM_STEPS = 6000


def la_family_config(name: str, method: ml_collections.ConfigDict, preset: str = "",
                     config_file: str = "") -> ml_collections.ConfigDict:
  """The full config of an LA-family method.

  Args:
    name: the run name ("dtc", ...); the preset is appended.
    method: the method's `default_config()`; its `model` block's name is kept, its width and
      optimiser are set here per preset.
    preset: one of PRESETS.
    config_file: for the error message on an unknown preset.

  Raises:
    ValueError: unknown preset.
  """
  if preset not in PRESETS:
    raise ValueError(f"{config_file or name}: unknown preset {preset!r}, expected one of "
                     f"{[p for p in PRESETS if p]}")
  c = ml_collections.ConfigDict()
  c.name = name + (f"_{preset}" if preset else "")
  c.job = "train"
  c.seed = 0
  c.method = method
  c.train = train.train_config()
  c.eval = evaluate.eval_config()
  c.method.optimizer = base.optimizer_config(
      "sgd", 0.01, momentum=0.9, weight_decay=1e-4, decay_every=2500, decay_factor=0.1)
  if not preset:
    c.data = protocol_data_config("synthetic3d")
    c.method.model.n_filters = 8
    c.train.num_steps = 400
    c.train.checkpoint_every = 200
    # The LA ramps span the 6000 steps (40 blocks of 150 steps); squeezed into the 400 steps here
    # (40 blocks of 10), so that the consistency terms reach full weight within the run.
    if "rampup_block" in c.method:
      c.method.rampup_block = 10
    if "threshold_rampup" in c.method:
      c.method.threshold_rampup = c.train.num_steps
  else:
    c.data = protocol_data_config("la")
    c.data.num_labeled = 8 if preset == "la8" else 16
    c.method.model.n_filters = 16
    c.train.num_steps = LA_NUM_STEPS
    c.train.checkpoint_every = 1000
    c.eval.patch_size = (112, 112, 80)
    c.eval.strides = (18, 18, 4)
  c.data.batch_labeled, c.data.batch_unlabeled = 2, 2
  return c
