"""Seconds from the launch of `python -m jaxseg.main` to its first progress line ("step 1/..."),
then stops the run: the time to first step, compilation included.

  python benchmarks/time_to_first_step.py --cache '' --label cold          # cache off
  python benchmarks/time_to_first_step.py --cache /tmp/xla --label warm    # run twice: the second is warm
  python benchmarks/time_to_first_step.py --cache - --checkout /tmp/old --label before   # an older
      # checkout (git archive <commit> | tar -x -C /tmp/old) that lacks train.compilation_cache

Alternate the cases in rounds (the machine's load moves between runs) and compare medians. Prints
one line: label, seconds, 1-minute load average.
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/supervised.py")
  parser.add_argument("--cache", default="",
                      help="train.compilation_cache ('' = off); '-' passes no such key")
  parser.add_argument("--checkout", default=str(REPO), help="the repository to run")
  parser.add_argument("--label", default="run")
  args = parser.parse_args()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  workdir = pathlib.Path("/tmp") / f"time_to_first_step_{args.label}"
  shutil.rmtree(workdir, ignore_errors=True)
  command = [sys.executable, "-u", "-m", "jaxseg.main", "--config", args.config,
             "--workdir", str(workdir), "--config.train.log_every=1"]
  if args.cache != "-":
    command.append(f"--config.train.compilation_cache={args.cache}")
  start = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env, cwd=args.checkout)
  seconds = None
  for line in process.stdout:
    if line.startswith("step 1/"):
      seconds = time.perf_counter() - start
      break
  process.kill()
  process.wait()
  shutil.rmtree(workdir, ignore_errors=True)
  if seconds is None:
    sys.exit(f"error: {args.label}: the run ended before its first progress line")
  print(f"{args.label} {seconds:.1f} s load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
  main()
