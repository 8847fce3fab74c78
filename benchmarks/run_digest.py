"""Fingerprints of short training runs, to show that a refactor keeps every method's behaviour.

  python benchmarks/run_digest.py --out digest.json [--steps 6] [configs/duo.py ...]

Runs each config (default: every method config's default preset) for `--steps` steps in a fresh
workdir, then records the sha256 of every array of the final checkpoint (sorted, so that a renamed
or regrouped state with the same values gives the same list), the progress lines' metrics and the
final validation summary's headline scores. Two checkouts whose digests are equal train the same
parameters and report the same metrics for the same seed.

  python benchmarks/run_digest.py --out before.json   # at the old commit
  python benchmarks/run_digest.py --out after.json    # at the new one
  python benchmarks/run_digest.py --compare before.json after.json

Kept in benchmarks/results/: run_digest_b49fc15.json (before the method contract v2) and
run_digest_05dd8a4.json (after it; the old duo/supervised defaults are their `:synthetic3d`
presets there): equal for all seven configs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import pathlib
import re
import sys
import tempfile
import time

CONFIGS = ("configs/supervised.py", "configs/duo.py", "configs/supervised_vnet.py",
           "configs/dtc.py", "configs/mean_teacher.py", "configs/uamt.py", "configs/sassnet.py")


def load_config(path: str):
  file, _, preset = path.partition(":")
  spec = importlib.util.spec_from_file_location(pathlib.Path(file).stem, file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def leaf_digests(checkpoint_dir: pathlib.Path) -> list[str]:
  import numpy as np
  import orbax.checkpoint as ocp
  import jax
  manager = ocp.CheckpointManager(checkpoint_dir)
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  out = []
  for leaf in jax.tree.leaves(restored.state):
    a = np.asarray(leaf)
    out.append(f"{a.dtype}{list(a.shape)}:{hashlib.sha256(a.tobytes()).hexdigest()[:16]}")
  return sorted(out)


def run(path: str, steps: int) -> dict:
  from jaxseg import train
  config = load_config(path)
  config.train.num_steps = steps
  config.train.log_every = 1
  config.train.checkpoint_every = steps
  config.eval.save_predictions = False
  with tempfile.TemporaryDirectory() as workdir:
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
      summary = train.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    digests = leaf_digests(pathlib.Path(workdir) / "checkpoints")
  progress = [re.sub(r" \| [0-9.]+ steps/s.*", "", line) for line in out.getvalue().splitlines()
              if line.startswith("step ")]
  from jaxseg import evaluate
  return {"state": digests, "progress": progress,
          "validation": {k: float(v) for k, v in evaluate.headline(summary).items()},
          "seconds": round(seconds, 1)}


def compare(a_path: str, b_path: str) -> int:
  a, b = (json.loads(pathlib.Path(p).read_text()) for p in (a_path, b_path))
  status = 0
  for name in sorted(set(a) | set(b)):
    if name not in a or name not in b:
      print(f"{name}: only in one file")
      status = 1
      continue
    # The state's arrays as a set: a regrouped state (e.g. one optimiser state per peer network
    # instead of one for both) holds the same values, some of them twice.
    same = {"state": set(a[name]["state"]) == set(b[name]["state"]),
            **{k: a[name][k] == b[name][k] for k in ("progress", "validation")}}
    print(f"{name}: " + ", ".join(f"{k} {'equal' if v else 'DIFFERENT'}" for k, v in same.items())
          + f"; validation {b[name]['validation']}")
    status |= not all(same.values())
  return status


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("configs", nargs="*", default=CONFIGS)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--out", default="")
  parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
  args = parser.parse_args()
  if args.compare:
    return compare(*args.compare)
  results = {}
  for path in args.configs:
    results[path] = run(path, args.steps)
    print(f"{path}: {results[path]['seconds']} s, validation {results[path]['validation']}",
          file=sys.stderr, flush=True)
    if args.out:
      pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
