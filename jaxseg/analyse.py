"""Per-case analysis of an evaluated run: why a case fails, in one table.

  python -m jaxseg.analyse --workdir runs/dtc_la8                  # the newest evaluation
  python -m jaxseg.analyse --workdir runs/dtc_la8 --eval eval_step6000 --data_root /path/to/la2018

For each case of the evaluation's metrics.csv (one view: --view, else the method's first): its
Dice (raw and, where scored, LCC; the mean over the foreground classes of multi-class tasks),
whether the raw prediction is empty, and the intensity statistics of its image as stored (before
the run's normalisation, channel --channel): mean, standard deviation, 99.5th percentile and the
contrast of the label against the background, (mean_fg - mean_bg) / std_bg. The rows are sorted
by raw Dice, worst first; the labeled cases of the run (split.json) follow with their intensity
statistics, as the scale the network learned. Printed, and written to case_analysis.csv in the
evaluation folder (or --output).

The data are read with the run's config.json (its data block; --data_root replaces data.root when
the run was made on another machine). Bad input ends in one line `error: ...` naming the file.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib
import sys
from typing import Optional, Sequence

import ml_collections
import numpy as np

from jaxseg import config_blocks
from jaxseg.data import intensity, la, sources
from jaxseg.data.base import Case, DataError
from jaxseg.writers import write_table_csv

ANALYSIS_CSV = "case_analysis.csv"
EVALUATED, LABELED = "evaluated", "labeled"
STAT_COLUMNS = ("mean", "std", "p99_5", "mean_foreground", "mean_background", "contrast")


@dataclasses.dataclass(frozen=True)
class CaseScores:
  """One case's scores of one view, from metrics.csv."""

  case_id: str
  dice_raw: float
  dice_lcc: Optional[float]
  prediction_empty: bool


def newest_evaluation(workdir: pathlib.Path) -> pathlib.Path:
  """The evaluation folder of `workdir` (eval/, eval_step<N>/, ...) whose metrics.csv is newest."""
  found = sorted((p.stat().st_mtime, p.parent) for p in workdir.glob("eval*/metrics.csv"))
  if not found:
    raise DataError(f"workdir {workdir} holds no evaluation (no eval*/metrics.csv): train or run "
                    "--mode eval first")
  return found[-1][1]


def read_scores(metrics_csv: pathlib.Path, view: str = "") -> tuple[str, list[CaseScores]]:
  """(view, each case's `CaseScores`) of metrics.csv, in file order. Classes (not regions) are
  averaged; a case counts as predicted empty when every class of its raw prediction is empty.

  Raises:
    DataError: naming the file, when it is missing, lacks a column, or has no row of `view`.
  """
  try:
    with open(metrics_csv, newline="") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise DataError(f"{metrics_csv}: cannot read ({e.strerror or e})") from None
  needed = {"case", "view", "postprocess", "class", "dice", "pred_empty"}
  if not rows or not needed <= set(rows[0]):
    raise DataError(f"{metrics_csv}: expected the columns {sorted(needed)} and at least one row")
  views = list(dict.fromkeys(r["view"] for r in rows))
  view = view or views[0]
  if view not in views:
    raise DataError(f"{metrics_csv}: no rows of view {view!r}; its views are {views}")
  by_case: dict[str, dict[str, list[dict]]] = {}
  for r in rows:
    if r["view"] == view and r["class"].isdigit():
      by_case.setdefault(r["case"], {}).setdefault(r["postprocess"], []).append(r)
  scores = []
  for case_id, posts in by_case.items():
    dice = {post: float(np.mean([float(r["dice"]) for r in group])) for post, group in posts.items()}
    empty = all(r["pred_empty"] in ("1", "True", "true") for r in posts["raw"])
    scores.append(CaseScores(case_id, dice["raw"], dice.get("lcc"), empty))
  return view, scores


def load_run_config(workdir: pathlib.Path, data_root: str = "") -> ml_collections.ConfigDict:
  """The data block of the run's config.json, data.root replaced by `data_root` when given."""
  path = workdir / "config.json"
  try:
    config = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot read the run's config ({e})") from None
  data = ml_collections.ConfigDict(config["data"])
  if data_root:
    data.root = data_root
  return data


def read_stored_cases(data: ml_collections.ConfigDict, ids: Sequence[str]) -> dict[str, Case]:
  """The cases `ids` as stored (no normalisation): LA reads only these files (any list), the
  other sources read every case and keep these."""
  if data.source == "la":
    root = config_blocks.data_root(data)
    return {c.case_id: c for c in la.load_la(root, list_name=None, ids=list(ids))}
  wanted = set(ids)
  cases = {c.case_id: c for c in sources.read_cases(data) if c.case_id in wanted}
  missing = [i for i in ids if i not in cases]
  if missing:
    raise DataError(f"config data.source = {data.source!r}: cases {missing[:5]} not found")
  return cases


def analysis_rows(scores: Sequence[CaseScores], evaluated: dict[str, Case],
                  labeled: dict[str, Case], channel: int = 0) -> list[dict]:
  """The table: evaluated cases sorted by raw Dice (worst first; ties in file order), then the
  labeled cases in split order, each with its `IntensityStats` of channel `channel`."""
  rows = []
  for s in sorted(scores, key=lambda s: s.dice_raw):
    case = evaluated[s.case_id]
    stats = intensity.intensity_stats(case.image, case.label, channel)
    rows.append({"case": s.case_id, "role": EVALUATED, "dice_raw": s.dice_raw,
                 "dice_lcc": s.dice_lcc, "prediction_empty": int(s.prediction_empty),
                 **stats.to_dict()})
  for case_id, case in labeled.items():
    stats = intensity.intensity_stats(case.image, case.label, channel)
    rows.append({"case": case_id, "role": LABELED, "dice_raw": None, "dice_lcc": None,
                 "prediction_empty": None, **stats.to_dict()})
  return rows


def table_lines(rows: Sequence[dict]) -> list[str]:
  """The printed table of `analysis_rows`, Dice in %, then one line of the labeled cases' ranges."""
  def number(v, scale=1.0, digits=3):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{scale * v:.{digits}f}"

  header = ["case", "role", "Dice raw %", "Dice LCC %", "empty", "mean", "std", "p99.5",
            "mean fg", "mean bg", "contrast"]
  table = [header] + [
      [r["case"], r["role"], number(r["dice_raw"], 100, 1), number(r["dice_lcc"], 100, 1),
       "" if r["prediction_empty"] is None else ("yes" if r["prediction_empty"] else "no")]
      + [number(r[k]) for k in STAT_COLUMNS] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(header))]
  lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
  labeled = [r for r in rows if r["role"] == LABELED]
  if labeled:
    ranges = []
    for k in ("mean", "std", "p99_5", "contrast"):
      values = [r[k] for r in labeled if r[k] is not None]
      if values:
        ranges.append(f"{k} {min(values):.3f} to {max(values):.3f}")
    lines.append(f"labeled cases ({len(labeled)}): " + ", ".join(ranges))
  return lines


def analyse(workdir: str, eval_dir: str = "", data_root: str = "", view: str = "",
            channel: int = 0, output: str = ""
            ) -> tuple[pathlib.Path, list[dict], str, pathlib.Path]:
  """Writes the per-case table of `workdir`'s evaluation `eval_dir` (a folder name under it or a
  path; "" = the newest); returns (the CSV path, the rows, the view, the evaluation folder)."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise DataError(f"workdir {workdir} is not a folder")
  if eval_dir:
    folder = pathlib.Path(eval_dir)
    folder = folder if folder.is_dir() else workdir / eval_dir
  else:
    folder = newest_evaluation(workdir)
  view, scores = read_scores(folder / "metrics.csv", view)
  data = load_run_config(workdir, data_root)
  labeled_ids: list[str] = []
  split_path = workdir / "split.json"
  if split_path.is_file():
    labeled_ids = list(json.loads(split_path.read_text())["labeled"])
  ids = [s.case_id for s in scores]
  try:
    cases = read_stored_cases(data, ids + [i for i in labeled_ids if i not in set(ids)])
  except DataError as e:
    hint = "" if data_root else " (a run made elsewhere: give --data_root)"
    raise DataError(f"{e}{hint}") from None
  rows = analysis_rows(scores, {i: cases[i] for i in ids}, {i: cases[i] for i in labeled_ids},
                       channel)
  out = pathlib.Path(output) if output else folder / ANALYSIS_CSV
  write_table_csv(out, rows)
  return out, rows, view, folder


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxseg.analyse", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the run's folder (config.json, eval*/)")
  parser.add_argument("--eval", default="", help="evaluation folder (default: the newest)")
  parser.add_argument("--data_root", default="", help="replaces the run's data.root")
  parser.add_argument("--view", default="", help="the view to analyse (default: the first)")
  parser.add_argument("--channel", type=int, default=0, help="the image channel described")
  parser.add_argument("--output", default="", help=f"CSV path (default: <eval>/{ANALYSIS_CSV})")
  args = parser.parse_args(argv)
  try:
    out, rows, view, folder = analyse(args.workdir, args.eval, args.data_root, args.view,
                                      args.channel, args.output)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{folder}: view {view!r}, {sum(r['role'] == EVALUATED for r in rows)} cases sorted by "
        "raw Dice (worst first); intensities of the images as stored")
  print("\n".join(table_lines(rows)))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
