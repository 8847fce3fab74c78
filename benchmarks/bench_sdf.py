"""Speed and agreement of jaxseg.geometry.signed_distance_map against the reference DTC `compute_sdf`.

Usage:
  python benchmarks/bench_sdf.py [--batch 2] [--shape 112,112,80] [--repeats 7]
                                 [--block-elements 4194304[,16777216,...]]

The input is a DTC/SASSNet labeled batch: --batch crops of --shape, each an LA-like atrium (a bumpy ellipsoid
of ~9 % foreground, thresholded smoothed noise on the radius). Timed, median of --repeats runs:

* reference: the NumPy transcription of `compute_sdf` (HiLab-git/DTC code/utils/util.py), per sample SciPy
  `distance_transform_edt` x2 + skimage `find_boundaries(mode="inner")` + normalisation, float64;
* jax: the jitted `signed_distance_map` on `jax.devices()[0]` (after a warm-up call, with
  `block_until_ready`), once per --block-elements value (the result does not depend on it).

Prints both times, their ratio, the max abs difference to the reference, the compile time and XLA's memory
estimate of the compiled function (arguments + outputs + temporaries), on the device it ran on. Exits with
status 1 if the difference exceeds 1e-5.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import geometry
from jaxseg.bench import la_like_label
from jaxseg.geometry import reference_compute_sdf
from timing import median_seconds  # benchmarks/timing.py, beside this script

AGREEMENT_ATOL = 1e-5



def memory_estimate_bytes(compiled) -> Optional[int]:
  """XLA's estimate of the device memory a compiled call needs (None where the backend gives none)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2, help="labeled samples per batch")
  parser.add_argument("--shape", default="112,112,80", help="crop shape, comma separated")
  parser.add_argument("--foreground", type=float, default=0.09, help="foreground fraction of each crop")
  parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median)")
  parser.add_argument("--block-elements", default=str(geometry.DEFAULT_BLOCK_ELEMENTS),
                      help="comma-separated block_elements values to time (default: the library's)")
  args = parser.parse_args(argv)
  shape = tuple(int(s) for s in args.shape.split(","))
  block_sizes = [int(b) for b in args.block_elements.split(",")]

  labels = np.stack([la_like_label(shape, args.foreground, seed) for seed in range(args.batch)])
  labels = labels.astype(np.uint8)
  device = jax.devices()[0]
  print(f"batch {labels.shape} uint8, foreground {100 * labels.mean():.1f} %, device {device.platform} "
        f"({device.device_kind}), median of {args.repeats}\n")

  t_reference, reference = median_seconds(lambda: reference_compute_sdf(labels), args.repeats)

  header = (f"{'block_elements':>14} {'reference':>10} {'jax':>10} {'ref/jax':>8} {'max |diff|':>10} "
            f"{'compile':>8} {'memory est.':>11}")
  print(header)
  print("-" * len(header))
  all_agree = True
  on_device = jax.device_put(jnp.asarray(labels), device)
  for block_elements in block_sizes:
    fn = jax.jit(lambda m, b=block_elements: geometry.signed_distance_map(m, block_elements=b))
    start = time.perf_counter()
    compiled = fn.lower(on_device).compile()
    t_compile = time.perf_counter() - start
    jax.block_until_ready(compiled(on_device))  # warm-up
    t_jax, ours = median_seconds(lambda: jax.block_until_ready(compiled(on_device)), args.repeats)
    diff = float(np.max(np.abs(np.asarray(ours, np.float64) - reference)))
    all_agree &= diff <= AGREEMENT_ATOL
    memory = memory_estimate_bytes(compiled)
    memory_text = "n/a" if memory is None else f"{memory / 2 ** 20:.0f} MiB"
    print(f"{block_elements:14d} {1e3 * t_reference:7.1f} ms {1e3 * t_jax:7.1f} ms "
          f"{t_reference / t_jax:7.2f}x {diff:10.1e} {t_compile:6.2f} s {memory_text:>11}")
  print(f"\nvalues agree with the reference to {AGREEMENT_ATOL:g}: {'yes' if all_agree else 'NO'}")
  return 0 if all_agree else 1


if __name__ == "__main__":
  sys.exit(main())
