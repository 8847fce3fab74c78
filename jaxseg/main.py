"""Command line: parses flags and hands the config to the trainer (or the job it names).

  python -m jaxseg.main --config configs/duo.py                      # train, then evaluate
  python -m jaxseg.main --config configs/duo.py --mode eval           # evaluate the workdir's run
  python -m jaxseg.main --config configs/duo.py --mode predict --input scans/ --output masks/
  python -m jaxseg.main --config configs/data_demo.py                # data and metrics demo

Bad input (an unknown preset, a typo in a `--config.x` override, a missing data root, a bad file)
ends the run with one line `error: ...` naming the key or file, and exit status 2.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

from absl import app, flags, logging
from ml_collections import config_flags

from jaxseg import config_blocks, demo, train
from jaxseg.data.base import DataError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/<name>.py[:preset].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config name>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"],
                          "train (resumes an existing workdir), eval, or predict.")
_INPUT = flags.DEFINE_string("input", None, "--mode predict: a scan file or a folder of scans.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode predict: folder for the predicted masks.")


def _train_job(config, workdir):
  if _MODE.value == "train":
    return train.train_and_evaluate(config, workdir)
  if _MODE.value == "eval":
    return train.evaluate_workdir(config, workdir)
  if not _INPUT.value or not _OUTPUT.value:
    _fail("--mode predict needs --input (a file or folder) and --output (a folder)")
  return train.predict_workdir(config, workdir, _INPUT.value, _OUTPUT.value)


# Jobs by `config.job`.
_JOBS = {"train": _train_job, "data_demo": demo.run}


def _fail(message: str) -> None:
  # After a failed checkpoint save, orbax's writer loop can be torn down at exit with write
  # coroutines never scheduled; their "never awaited" warnings would bury the one error line.
  warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                          category=RuntimeWarning)
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_path(argv: list[str]) -> Optional[str]:
  """The value of --config in `argv` (with its preset), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _fail_unknown_override(argv: list[str]) -> None:
  """Fails naming the first `--config.x` override whose key the config lacks ("unknown key
  train.stepz", the closest key and the keys of its block); returns if every key exists or the
  config does not load (the caller then reports the original error)."""
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  try:
    # An override that fails while config_flags parses --config leaves the flag unset: load the
    # file again (it loaded once already, so this is quick).
    config = flags.FLAGS["config"].value
    path = _config_path(argv[1:])
    if config is None and path:
      config = flags.FLAGS["config"].parser.parse(path)
    if config is None:
      return
    for arg in overrides:
      key = arg[len("--config."):].split("=", 1)[0]
      message = config_blocks.unknown_key_message(config, key)
      if message:
        _fail(f"bad config override {arg}: {message}")
  except (OSError, AttributeError, KeyError, TypeError, ValueError):
    return  # The config file itself failed to load: reported as it is.


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags; turns config and override errors into one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # An unknown `--config.x` key can surface as an unknown flag.
    _fail_unknown_override(argv)
    # config_flags embeds the config file's traceback in the message: keep its last line.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(f"{lines[0].split(':')[0]}: {lines[-1]}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # A `--config.x` override naming a key the config lacks, or a value of the wrong type.
    _fail_unknown_override(argv)
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    # ml_collections nests a KeyError's repr in the message: undo its escapes.
    message = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\'", "'")
    _fail(f"bad config override {' '.join(overrides)}: {message}")


def main(argv):
  # orbax logs every checkpoint step at INFO; the progress line is what a user wants to see.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    _fail("--config is required, e.g. --config configs/data_demo.py")
  try:
    config.job  # config_flags loads lazily: a missing or broken file surfaces here.
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(f"cannot load --config: {lines[-1]}")
  if config.job not in _JOBS:
    _fail(f"config.job = {config.job!r} is not one of {sorted(_JOBS)}")
  workdir = _WORKDIR.value or f"runs/{config.name}"
  train.use_compilation_cache(config_blocks.compilation_cache_dir(config, os.environ))
  try:
    _JOBS[config.job](config, workdir)
  except DataError as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
