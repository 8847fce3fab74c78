"""Command line: parses flags and hands the config to the job it names.

  python -m jaxseg.main --config configs/data_demo.py --workdir runs/demo
  python -m jaxseg.main --config configs/data_demo.py:synthetic2d --config.data.seed 3
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from jaxseg import demo

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/<name>.py[:preset].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config name>).")

# Jobs by `config.job`. The trainer (`train`) joins with the first method.
_JOBS = {"data_demo": demo.run}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/data_demo.py")
  if config.job not in _JOBS:
    raise app.UsageError(f"config.job = {config.job!r} is not one of {sorted(_JOBS)}")
  workdir = _WORKDIR.value or f"runs/{config.name}"
  _JOBS[config.job](config, workdir)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
