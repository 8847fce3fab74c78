"""jaxseg.analyse (the per-case table of an evaluated run), the intensity statistics and the
label-free rescale of jaxseg/data/intensity.py, and eval.intensity_rescale in the trainer."""

import csv
import json
import math
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import REPO
from jaxseg import analyse, config_blocks, train
from jaxseg.data import intensity, synthetic
from jaxseg.data.base import Case, DataError
from jaxseg.data.splits import Split


def test_intensity_stats_by_hand():
  image = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)[..., None]
  label = np.array([[0, 0], [0, 1]], np.uint8)
  s = intensity.intensity_stats(image, label)
  assert (s.mean, s.mean_foreground, s.mean_background) == (1.5, 3.0, 1.0)
  assert s.std == pytest.approx(math.sqrt(1.25), rel=1e-12)
  # np.percentile, linear: position 0.995 * 3 = 2.985 between 2 and 3.
  assert s.p99_5 == pytest.approx(2.985, rel=1e-12)
  # (3 - 1) / std(0, 1, 2) = 2 / sqrt(2 / 3).
  assert s.contrast == pytest.approx(2.0 / math.sqrt(2.0 / 3.0), rel=1e-12)
  # No label, an empty one, a constant background: no contrast.
  assert intensity.intensity_stats(image, None).contrast is None
  assert intensity.intensity_stats(image, np.zeros((2, 2))).mean_foreground is None
  flat = np.array([[1.0, 1.0], [1.0, 5.0]], np.float32)[..., None]
  assert intensity.intensity_stats(flat, label).contrast is None
  with pytest.raises(DataError, match="channel 1 is out of range"):
    intensity.intensity_stats(image, label, channel=1)


def case(case_id, image, label=None):
  return Case(case_id=case_id, image=np.asarray(image, np.float32), label=label,
              spacing=(1.0,) * (np.ndim(image) - 1))


def test_rescale_to_the_reference_statistics():
  a = case("a", np.array([[0.0, 2.0], [4.0, 6.0]])[..., None])   # mean 3, std sqrt(5)
  b = case("b", np.array([[1.0, 1.0], [3.0, 3.0]])[..., None])   # mean 2, std 1
  mean, std = intensity.reference_stats([a, b])
  np.testing.assert_allclose(mean, [2.5])
  np.testing.assert_allclose(std, [(math.sqrt(5.0) + 1.0) / 2])
  dark = case("d", np.array([[0.1, 0.2], [0.3, 0.6]])[..., None], np.ones((2, 2), np.uint8))
  out = intensity.rescaled(dark, mean, std)
  x = np.array([0.1, 0.2, 0.3, 0.6])
  want = (x - x.mean()) / x.std() * std[0] + mean[0]
  np.testing.assert_allclose(out.image.reshape(-1), want, rtol=1e-6)
  assert out.label is dark.label
  with pytest.raises(DataError, match="case 'b' has a constant channel"):
    intensity.rescaled(case("b", np.ones((2, 2, 1))), mean, std)


# ---------------------------------------------------------------------------------------------------
# A tiny synthetic workdir: config.json, split.json and eval/metrics.csv written as a run writes
# them, with known Dice values.

DICE = {"synth_0004": (0.9, 0.92, 0), "synth_0005": (0.0, 0.0, 1), "synth_0003": (0.5, 0.6, 0)}


def make_workdir(path, views=("model",)):
  data = config_blocks.data_block("synthetic3d")
  data.synthetic.update(dict(num_cases=6, shape=(16, 16, 16)))
  data.update(dict(num_labeled=2, num_validation=3))
  (path / "eval").mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({"data": data.to_dict()}))
  (path / "split.json").write_text(json.dumps({"labeled": ["synth_0000", "synth_0001"],
                                               "unlabeled": ["synth_0002"],
                                               "validation": list(DICE)}))
  lines = ["case,view,postprocess,class,dice,jaccard,hd95,asd,pred_empty,gt_empty"]
  for view in views:
    for case_id, (raw, lcc, empty) in DICE.items():
      lines.append(f"{case_id},{view},raw,1,{raw},0,0,0,{empty},0")
      lines.append(f"{case_id},{view},lcc,1,{lcc},0,0,0,{empty},0")
  (path / "eval" / "metrics.csv").write_text("\n".join(lines) + "\n")
  spec = synthetic.SyntheticSpec(num_classes=2, shape=(16, 16, 16))
  return {c.case_id: c for c in synthetic.make_cases(spec, 6, seed=0)}


def test_table_sorted_by_dice_with_stored_intensities(tmp_path):
  cases = make_workdir(tmp_path / "run")
  out, rows, view, folder = analyse.analyse(str(tmp_path / "run"))
  assert (out, view, folder) == (tmp_path / "run" / "eval" / analyse.ANALYSIS_CSV, "model",
                                 tmp_path / "run" / "eval")
  assert [(r["case"], r["role"]) for r in rows] == [
      ("synth_0005", "evaluated"), ("synth_0003", "evaluated"), ("synth_0004", "evaluated"),
      ("synth_0000", "labeled"), ("synth_0001", "labeled")]
  assert [(r["dice_raw"], r["dice_lcc"], r["prediction_empty"]) for r in rows[:3]] == [
      (0.0, 0.0, 1), (0.5, 0.6, 0), (0.9, 0.92, 0)]
  for r in rows:
    x = cases[r["case"]].image[..., 0].astype(np.float64)
    fg = cases[r["case"]].label > 0
    assert r["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert r["std"] == pytest.approx(x.std(), rel=1e-12)
    assert r["p99_5"] == pytest.approx(np.percentile(x, 99.5), rel=1e-12)
    assert r["contrast"] == pytest.approx((x[fg].mean() - x[~fg].mean()) / x[~fg].std(),
                                          rel=1e-12)
  with open(out) as f:
    written = list(csv.DictReader(f))
  assert [w["case"] for w in written] == [r["case"] for r in rows]
  assert written[0]["prediction_empty"] == "1" and written[3]["dice_raw"] == ""
  lines = analyse.table_lines(rows)
  assert lines[1].split()[:5] == ["synth_0005", "evaluated", "0.0", "0.0", "yes"]
  assert lines[-1].startswith("labeled cases (2): mean ")


def test_command_line_and_its_errors(tmp_path, capsys):
  make_workdir(tmp_path / "run", views=("f1", "f2"))
  command = [sys.executable, "-m", "jaxseg.analyse", "--workdir", str(tmp_path / "run"),
             "--view", "f2", "--output", str(tmp_path / "t.csv")]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "view 'f2', 3 cases sorted by raw Dice" in result.stdout
  assert (tmp_path / "t.csv").is_file()
  with pytest.raises(DataError, match=r"metrics.csv: no rows of view 'f3'; its views are "
                                      r"\['f1', 'f2'\]"):
    analyse.analyse(str(tmp_path / "run"), view="f3")
  with pytest.raises(DataError, match="holds no evaluation"):
    analyse.analyse(str(tmp_path))
  (tmp_path / "bare").mkdir()
  (tmp_path / "bare" / "eval_step5").mkdir()
  (tmp_path / "bare" / "eval_step5" / "metrics.csv").write_text("case,view\n")
  with pytest.raises(DataError, match="eval_step5/metrics.csv: expected the columns"):
    analyse.analyse(str(tmp_path / "bare"))
  assert analyse.main(["--workdir", str(tmp_path / "none")]) == 2
  assert capsys.readouterr().err == f"error: workdir {tmp_path / 'none'} is not a folder\n"


def test_la_run_made_elsewhere_names_data_root_and_the_flag(tmp_path):
  make_workdir(tmp_path / "run")
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  config["data"].update(source="la", root=str(tmp_path / "elsewhere"))
  (tmp_path / "run" / "config.json").write_text(json.dumps(config))
  with pytest.raises(DataError, match=r"config data.root = .*elsewhere.* is not a folder \(a run "
                                      r"made elsewhere: give --data_root\)"):
    analyse.analyse(str(tmp_path / "run"))


def test_validation_rescales_the_evaluated_cases_only_when_asked(monkeypatch):
  """eval.intensity_rescale = "labeled": the trainer hands evaluate the validation images mapped
  to the labeled images' mean and std; "none" hands them unchanged."""
  seen = {}

  def fake_evaluate(predict_fn, cases, eval_cfg, num_classes, out_dir, **kwargs):
    seen["cases"] = list(cases)
    return {"num_cases": len(seen["cases"])}

  monkeypatch.setattr(train.evaluate, "evaluate", fake_evaluate)
  labeled = (case("a", np.array([[0.0, 2.0], [4.0, 6.0]])[..., None], np.eye(2, dtype=np.uint8)),
             case("b", np.array([[1.0, 1.0], [3.0, 3.0]])[..., None], np.eye(2, dtype=np.uint8)))
  dark = case("v", np.array([[0.1, 0.2], [0.3, 0.6]])[..., None], np.eye(2, dtype=np.uint8))
  dataset = train.sources.Dataset(split=Split(("a", "b"), (), ("v",)), labeled=labeled, unlabeled=(), validation=(dark,),
                                  num_classes=2)
  config = ml_collections.ConfigDict({"eval": config_blocks.eval_block(),
                                      "data": {"patch_size": (2, 2)}})
  method = type("M", (), {"predict": staticmethod(lambda state, x: x)})
  train._validate(method, {}, dataset, config, None, final=False)
  assert seen["cases"][0] is dark
  config.eval.intensity_rescale = "labeled"
  train._validate(method, {}, dataset, config, None, final=False)
  mean, std = intensity.reference_stats(labeled)
  got = seen["cases"][0].image.reshape(-1).astype(np.float64)
  assert got.mean() == pytest.approx(mean[0], rel=1e-6)
  assert got.std() == pytest.approx(std[0], rel=1e-6)
  with pytest.raises(DataError, match="config eval.intensity_rescale = 'test' must be one of"):
    config_blocks.check_config(ml_collections.ConfigDict(
        {"eval": dict(config_blocks.eval_block().to_dict(), intensity_rescale="test")}))
