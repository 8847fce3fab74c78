"""Speed and agreement of jaxseg.metrics against medpy.metric.binary (hd95 + asd + assd).

Usage:
  python benchmarks/bench_metrics.py [--la-root /path/to/la2018] [--cases 3] [--repeats 3]

With --la-root, the ground truth is a real LA label (`<root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5`,
key `label`, the first --cases IDs of train.list) and the predictions are perturbed copies; otherwise a
synthetic 183x140x88 blob (~9 % foreground) is used. For every pair, medpy's `hd95`, `asd` and `assd`
(three calls, as an evaluator calls them) are timed against `jaxseg.metrics.surface_metrics` (one call
that yields all three), median over --repeats runs, with unit spacing and with --spacing. The values
must agree to 1e-6 relative; the script exits with status 1 if any does not.

medpy is a benchmark-only dependency: `pip install -e .[bench]`.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
from typing import Iterator, Optional

import numpy as np
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from jaxseg import metrics
from jaxseg.bench import LA_SHAPE, dilate_and_shift, la_like_label
from timing import median_seconds  # benchmarks/timing.py, beside this script

AGREEMENT_RTOL = 1e-6



def medpy_values(pred, gt, spacing) -> tuple[float, float, float]:
  return (medpy_binary.hd95(pred, gt, voxelspacing=spacing),
          medpy_binary.asd(pred, gt, voxelspacing=spacing),
          medpy_binary.assd(pred, gt, voxelspacing=spacing))


def our_values(pred, gt, spacing) -> tuple[float, float, float]:
  surface = metrics.surface_metrics(pred, gt, spacing)
  return surface.hd95, surface.asd, surface.assd


def our_values_three_calls(pred, gt, spacing) -> tuple[float, float, float]:
  """The same values through the single-metric functions (each recomputes the distances)."""
  return (metrics.hd95(pred, gt, spacing), metrics.asd(pred, gt, spacing),
          metrics.assd(pred, gt, spacing))


# ---------------------------------------------------------------------------------------------------
# Predictions: realistic perturbations of a ground-truth mask.


def erode_and_shift(gt: np.ndarray) -> np.ndarray:
  """Under-segmentation by 1 voxel, displaced by (-2, 2, 0) voxels."""
  return np.roll(ndimage.binary_erosion(gt, iterations=1), (-2, 2), axis=(0, 1))


def noisy_boundary(gt: np.ndarray, seed: int = 0) -> np.ndarray:
  """Smooth random errors near the boundary: gt xor a blob-like field within 3 voxels of it."""
  near_boundary = ndimage.binary_dilation(gt, iterations=3) & ~ndimage.binary_erosion(gt, iterations=3)
  field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(gt.shape), 1.5)
  return gt ^ (near_boundary & (field > 0.15))


PERTURBATIONS = {"dilate2+shift": dilate_and_shift, "erode1+shift": erode_and_shift,
                 "noisy boundary": noisy_boundary}


# ---------------------------------------------------------------------------------------------------
# Ground truths.


def la_labels(root: pathlib.Path, num_cases: int) -> Iterator[tuple[str, np.ndarray]]:
  import h5py  # only needed for real data
  case_ids = [line.strip() for line in (root / "train.list").read_text().splitlines() if line.strip()]
  for case_id in case_ids[:num_cases]:
    with h5py.File(root / "2018LA_Seg_Training Set" / case_id / "mri_norm2.h5", "r") as f:
      yield case_id[:8], f["label"][:].astype(bool)



# ---------------------------------------------------------------------------------------------------


def max_relative_difference(ours, theirs) -> float:
  return max(abs(a - b) / max(abs(b), 1e-300) for a, b in zip(ours, theirs))


def run(ground_truths, spacing: tuple[float, ...], repeats: int) -> bool:
  header = (f"{'case':<10} {'prediction':<15} {'spacing':<17} {'fg %':>5} {'surf vox':>9} "
            f"{'medpy 3 calls':>13} {'ours 1 call':>11} {'ours 3 calls':>12} {'speed-up':>8} "
            f"{'max rel diff':>12}")
  print(header)
  print("-" * len(header))
  ratios = {"unit": [], "spacing": []}
  all_agree = True
  for name, gt in ground_truths:
    for kind, perturb in PERTURBATIONS.items():
      pred = perturb(gt)
      surface_voxels = sum(int(np.count_nonzero(m ^ ndimage.binary_erosion(m, border_value=0)))
                           for m in (pred, gt))
      for label, sp in (("unit", None), ("spacing", spacing)):
        t_medpy, reference = median_seconds(lambda: medpy_values(pred, gt, sp), repeats)
        t_ours, ours = median_seconds(lambda: our_values(pred, gt, sp), repeats)
        t_ours3, ours3 = median_seconds(lambda: our_values_three_calls(pred, gt, sp), repeats)
        diff = max(max_relative_difference(ours, reference), max_relative_difference(ours3, reference))
        all_agree &= diff <= AGREEMENT_RTOL
        ratios[label].append(t_medpy / t_ours)
        sp_text = "unit" if sp is None else ",".join(f"{s:g}" for s in sp)
        print(f"{name:<10} {kind:<15} {sp_text:<17} {100 * gt.mean():5.1f} {surface_voxels:9d} "
              f"{1e3 * t_medpy:10.1f} ms {1e3 * t_ours:8.1f} ms {1e3 * t_ours3:9.1f} ms "
              f"{t_medpy / t_ours:7.1f}x {diff:12.1e}")
  print()
  for label, values in ratios.items():
    spacing_text = "unit spacing" if label == "unit" else f"spacing {spacing}"
    print(f"speed-up ({spacing_text}): median {statistics.median(values):.1f}x, "
          f"min {min(values):.1f}x, max {max(values):.1f}x over {len(values)} pairs")
  print(f"values agree with medpy to {AGREEMENT_RTOL:g} relative: {'yes' if all_agree else 'NO'}")
  return all_agree


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--la-root", type=pathlib.Path, default=None,
                      help="LA 2018 root (train.list + '2018LA_Seg_Training Set/'); synthetic if unset")
  parser.add_argument("--cases", type=int, default=3, help="number of LA labels (first of train.list)")
  parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
  parser.add_argument("--spacing", type=str, default="0.625,0.625,2.5",
                      help="voxel spacing of the 'with spacing' runs, comma separated")
  args = parser.parse_args(argv)
  spacing = tuple(float(s) for s in args.spacing.split(","))
  if args.la_root is not None:
    ground_truths = la_labels(args.la_root, args.cases)
    print(f"LA labels from {args.la_root} (first {args.cases} of train.list)")
  else:
    ground_truths = [("synthetic", la_like_label())]
    print(f"synthetic {LA_SHAPE} blob")
  print(f"timings: median of {args.repeats}; medpy = hd95 + asd + assd (3 calls); "
        f"ours 1 call = surface_metrics; ours 3 calls = hd95 + asd + assd\n")
  return 0 if run(ground_truths, spacing, args.repeats) else 1


if __name__ == "__main__":
  sys.exit(main())
