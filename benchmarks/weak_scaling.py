"""Weak scaling of the data-parallel train step: 1, 2, 4, 8 devices, the same batch per device.

  python benchmarks/weak_scaling.py [--devices 1,2,4,8] [--per_device 1,1] [--steps 10]
      [--config configs/supervised_vnet.py] [-- --config.method.model.n_filters=8 ...]

Runs `python -m jaxseg.bench` once per device count, in a fresh process each, with the global batch
(data.batch_labeled, data.batch_unlabeled) = devices x --per_device, and prints the median step
time, samples/s and the weak-scaling efficiency t(1 device) / t(n devices) (1.0 = perfect).

On a CPU the devices are forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=n):
they share the machine's cores, so the efficiency there measures what partitioning costs (the
collectives, the per-device programs) with the total compute growing n times on fixed cores, not
what n real chips would give. Set --real_devices to use the machine's own devices (GPUs, TPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def bench_once(config: str, devices: int, per_device: tuple[int, int], steps: int, warmup: int,
               extra: list[str], real_devices: bool) -> dict:
  env = dict(os.environ)
  if not real_devices:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "bench.json"
    command = [sys.executable, "-m", "jaxseg.bench", "--config", config,
               f"--config.data.batch_labeled={devices * per_device[0]}",
               f"--config.data.batch_unlabeled={devices * per_device[1]}",
               f"--steps={steps}", f"--warmup={warmup}", "--eval_volume=none", f"--json={out}",
               *extra]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
      raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/supervised_vnet.py")
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--per_device", default="1,0",
                      help="labeled,unlabeled samples per device per step")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--real_devices", action="store_true")
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  per_device = tuple(int(v) for v in args.per_device.split(","))
  counts = [int(v) for v in args.devices.split(",")]
  print(f"{args.config} {' '.join(extra)}: {per_device[0]} labeled + {per_device[1]} unlabeled "
        f"per device, median of {args.steps} steps")
  print(f"{'devices':>7} {'global batch':>12} {'step ms':>9} {'samples/s':>9} {'efficiency':>10}")
  base = None
  for n in counts:
    r = bench_once(args.config, n, per_device, args.steps, args.warmup, extra, args.real_devices)
    assert r["num_devices"] == n, r
    base = base if base is not None else r["step_median_s"]
    print(f"{n:7d} {r['global_batch']:12d} {1e3 * r['step_median_s']:9.1f} "
          f"{r['samples_per_s']:9.2f} {base / r['step_median_s']:10.2f}", flush=True)
  print(f"device: {r['device']}")


if __name__ == "__main__":
  main()
