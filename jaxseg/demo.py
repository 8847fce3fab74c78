"""The data and metrics demo: what `python -m jaxseg.main --config configs/data_demo.py` runs.

It exercises the foundation end to end, without a network: loads the configured data (the embedded
synthetic set by default), splits it, writes the config and the split into the workdir, draws
two-stream training batches, then fits the simplest possible segmenter -- one global intensity
threshold chosen on the labeled cases -- and scores it on the validation cases with the medpy-equal
metrics. The threshold baseline shows how far intensity alone gets on the data; the trainer replaces
this job with real methods.
"""

from __future__ import annotations

import json
import pathlib
import time

import ml_collections
import numpy as np

from jaxseg import config_blocks, metrics
from jaxseg.data import sources
from jaxseg.data.base import Case


def best_threshold(cases: tuple[Case, ...], candidates: int = 64) -> float:
  """The intensity threshold of channel 0 with the best Dice pooled over `cases` (image > t = organ)."""
  intensities = np.concatenate([c.image[..., 0].ravel() for c in cases])
  foreground = np.concatenate([(c.label > 0).ravel() for c in cases])
  thresholds = np.quantile(intensities, np.linspace(0.5, 0.995, candidates))
  dices = [2 * np.sum(foreground & (intensities > t)) / (np.sum(foreground) + np.sum(intensities > t))
           for t in thresholds]
  return float(thresholds[int(np.argmax(dices))])


def score_threshold(cases: tuple[Case, ...], threshold: float, empty: str) -> list[dict]:
  """Per-case metrics of `image > threshold` against the foreground of each label."""
  rows = []
  for case in cases:
    pred = case.image[..., 0] > threshold
    values = metrics.case_metrics(pred.astype(np.uint8), (case.label > 0).astype(np.uint8),
                                  spacing=case.spacing, classes=(1,), empty=empty)[1]
    rows.append({"case": case.case_id, **values})
  return rows


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the demo; writes config.json, split.json and metrics.json into `workdir`; returns the summary."""
  config_blocks.check_config(config)  # Before any data is read.
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(config.to_json_best_effort(indent=1))

  start = time.perf_counter()
  dataset = sources.load_dataset(config.data)
  load_seconds = time.perf_counter() - start
  dataset.split.write(out / "split.json")
  print(f"data: {config.data.source}, {len(dataset.labeled)} labeled / {len(dataset.unlabeled)} "
        f"unlabeled / {len(dataset.validation)} validation cases, loaded in {load_seconds:.2f} s")

  batches = sources.make_batches(dataset, config.data)
  start = time.perf_counter()
  for _ in range(config.num_batches):
    batch = next(batches)
  batch_seconds = (time.perf_counter() - start) / config.num_batches
  shapes = {f"{stream}/{name}": a.shape for stream, fields in (("labeled", batch.labeled),
                                                                ("unlabeled", batch.unlabeled))
            for name, a in fields.items()}
  print(f"batches: {shapes}; {1 / batch_seconds:.1f} batches/s on the host")

  threshold = best_threshold(dataset.labeled)
  rows = score_threshold(dataset.validation, threshold, config.empty_policy)
  print(f"intensity-threshold baseline (t = {threshold:.3f}, fitted on the labeled cases), "
        "validation:")
  print(f"  {'case':<22}{'Dice %':>8}{'Jacc %':>8}{'95HD':>8}{'ASD':>8}")
  for r in rows:
    print(f"  {r['case']:<22}{100 * r['dice']:8.2f}{100 * r['jaccard']:8.2f}{r['hd95']:8.2f}"
          f"{r['asd']:8.2f}")
  scored = [r for r in rows if not r["gt_empty"]]
  summary = {
      "split": "validation", "threshold": threshold, "empty_policy": config.empty_policy,
      "num_cases": len(scored), "num_empty_predictions": sum(r["pred_empty"] for r in scored),
      **{f"{m}_mean": float(np.mean([r[m] for r in scored])) for m in ("dice", "jaccard", "hd95", "asd")},
      **{f"{m}_std": float(np.std([r[m] for r in scored])) for m in ("dice", "jaccard", "hd95", "asd")},
      "host_batches_per_s": 1 / batch_seconds, "cases": rows}
  print(f"  mean: Dice {100 * summary['dice_mean']:.2f} +- {100 * summary['dice_std']:.2f} %, "
        f"95HD {summary['hd95_mean']:.2f}, ASD {summary['asd_mean']:.2f} (voxels)")
  (out / "metrics.json").write_text(json.dumps(summary, indent=1))
  print(f"wrote {out}/config.json, split.json, metrics.json")
  return summary
