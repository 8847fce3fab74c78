"""Evaluation reports raw and largest-connected-component scores side by side, mean ± std over the
n scored cases, in the summary ("raw_lcc") and the printed table; and records how the validation
cases were chosen."""

import csv
import json

import jax
import numpy as np
import pytest

from jaxseg import evaluate as ev
from jaxseg.config_blocks import eval_block

from test_evaluate import PATCH, cases3d, two_views


def stats(n, empty, dice, jaccard=0.5, hd95=3.0, asd=1.0, std=0.1):
  out = {"num_cases": n, "num_empty_predictions": empty, "num_empty_gt_excluded": 0}
  for name, mean in (("dice", dice), ("jaccard", jaccard), ("hd95", hd95), ("asd", asd)):
    out[f"{name}_mean"], out[f"{name}_std"] = mean, std
  return out


def test_rows_put_raw_and_lcc_side_by_side():
  summary = {"split": "validation", "num_cases": 8,
             "units": {"distances": "units of the case spacing: voxels"},
             "views": {"model": {"raw": {"1": stats(8, 1, 0.7)}, "lcc": {"1": stats(8, 1, 0.72)}}},
             "validation_split": {"validation_rule": "random", "validation_seed": 0}}
  rows = ev.raw_lcc_rows(summary)
  assert len(rows) == 1
  row = rows[0]
  assert (row["view"], row["class"], row["num_cases"], row["num_empty_predictions"]) == (
      "model", "1", 8, 1)
  assert (row["dice_raw_mean"], row["dice_lcc_mean"], row["dice_raw_std"]) == (0.7, 0.72, 0.1)
  assert row["hd95_lcc_mean"] == 3.0 and row["asd_raw_std"] == 0.1
  lines = ev.raw_lcc_table_lines(summary)
  assert lines[0].startswith("validation (validation: random, seed 0): 8 cases; mean ± std")
  assert lines[0].endswith("95HD, ASD in units of the case spacing")
  header, line = lines[1].split(), lines[2]
  assert header[:6] == ["view", "class", "n", "empty", "Dice", "raw"]
  # Dice raw then LCC in %, then Jaccard; distances as they are.
  assert "70.00 ± 10.00  72.00 ± 10.00  50.00 ± 10.00  50.00 ± 10.00  3.00 ± 0.10" in line
  assert line.split()[:4] == ["model", "1", "8", "1"]


def test_without_lcc_only_raw_columns_and_class_mean_without_std():
  mean = {f"{m}_mean": 0.5 for m in ("dice", "jaccard", "hd95", "asd")}
  summary = {"split": "test", "num_cases": 2, "units": {"distances": "voxels"},
             "views": {"m": {"raw": {"1": stats(2, 0, 0.4), "2": stats(1, 1, 0.6), "mean": mean}}}}
  rows = ev.raw_lcc_rows(summary)
  assert [r["class"] for r in rows] == ["1", "2", "mean"]
  assert "dice_lcc_mean" not in rows[0] and rows[2]["dice_raw_std"] is None
  lines = ev.raw_lcc_table_lines(summary)
  assert lines[0].startswith("test: 2 cases;") and "LCC" not in lines[1]
  assert lines[4].split()[:4] == ["m", "mean", "50.00", "50.00"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  out = tmp_path_factory.mktemp("raw_lcc")
  summary = ev.evaluate(jax.tree_util.Partial(two_views), cases3d(), eval_block(), 2, out,
                        patch_size=PATCH, split_record={"validation_rule": "random",
                                                        "validation_seed": 3})
  return summary, out


def test_summary_table_is_the_mean_and_std_of_the_case_rows(evaluated):
  """Against metrics.csv: each view's raw and LCC Dice over the cases whose ground truth is not
  empty, population std, and the count of empty predictions."""
  summary, out = evaluated
  assert json.loads((out / "summary.json").read_text()) == summary
  assert summary["validation_split"] == {"validation_rule": "random", "validation_seed": 3}
  with open(out / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  table = {(r["view"], r["class"]): r for r in summary["raw_lcc"]}
  assert set(table) == {("f1", "1"), ("f2", "1")}
  for view in ("f1", "f2"):
    row = table[(view, "1")]
    for post in ("raw", "lcc"):
      scored = [r for r in rows if r["view"] == view and r["postprocess"] == post
                and r["gt_empty"] == "0"]
      for name in ("dice", "jaccard", "hd95", "asd"):
        values = np.array([float(r[name]) for r in scored])
        np.testing.assert_allclose(row[f"{name}_{post}_mean"], values.mean(), rtol=1e-12)
        np.testing.assert_allclose(row[f"{name}_{post}_std"], values.std(), rtol=1e-12)
      assert row["num_cases"] == len(scored) == 3  # c3 has an empty ground truth.
    assert row["num_empty_predictions"] == sum(r["pred_empty"] == "1" for r in rows
                                               if r["view"] == view and r["postprocess"] == "raw"
                                               and r["gt_empty"] == "0")
  # The old keys stay.
  assert summary["views"]["f1"]["lcc"]["1"]["dice_mean"] == table[("f1", "1")]["dice_lcc_mean"]
  lines = ev.raw_lcc_table_lines(summary)
  assert lines[0].startswith("validation (validation: random, seed 3): 4 cases")
  assert [line.split()[0] for line in lines[2:]] == ["f1", "f2"]
