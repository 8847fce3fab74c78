"""The benchmark harness (`python -m jaxseg.bench`) on a tiny config: it measures, it does not assert speed."""

import math
import subprocess
import sys

import pytest

from conftest import CONFIGS_DIR, REPO, load_config_file
from jaxseg import bench


def _tiny_config():
  config = load_config_file(CONFIGS_DIR / "supervised_vnet.py").get_config("")
  config.method.model.n_filters = 4
  config.data.patch_size = (16, 16, 16)
  config.data.batch_labeled = 2
  return config


def test_run_reports_finite_positive_figures():
  result = bench.run(_tiny_config(), steps=2, warmup=1, eval_volume="20,20,20", name="tiny",
                     eval_sweep=3)
  assert result.global_batch == 2 and result.patch == (16, 16, 16) and result.num_devices == 1
  for value in (result.compile_s, result.step_median_s, result.samples_per_s, result.voxels_per_s,
                result.eval_s, result.eval_windows_per_s):
    assert math.isfinite(value) and value > 0
  assert result.step_min_s <= result.step_median_s <= result.step_max_s
  assert result.samples_per_s == pytest.approx(2 / result.step_median_s)
  assert result.voxels_per_s == pytest.approx(2 * 16 ** 3 / result.step_median_s)
  assert result.step_flops > 0  # XLA:CPU reports a cost analysis.
  assert result.achieved_flops == pytest.approx(result.step_flops / result.step_median_s)
  # Eval windows: half-patch strides (8) over 20 voxels give ceil((20 - 16) / 8) + 1 = 2 per axis.
  assert result.eval_volume == (20, 20, 20) and result.eval_windows == 8
  # Three LA-like sizes scaled to the 16^3 patch (about 21-35 x 19-23 x 18): one 32-voxel bucket.
  assert result.sweep_volumes == 3 and result.sweep_s > 0 and result.sweep_compilations == 1
  report = bench.format_result(result)
  assert "train step" in report and "GFLOP/step" in report and "8 windows" in report
  assert "3 volumes of LA-like sizes, 1 new compilation(s)" in report


def test_sweep_shapes_scale_the_la_range_to_the_patch():
  shapes = bench.sweep_shapes(50, (112, 112, 80))
  assert len(set(shapes)) > 40
  for x, y, z in shapes:
    assert 148 <= x <= 244 and 132 <= y <= 160 and z == 88
  half = bench.sweep_shapes(5, (56, 56, 40))
  assert all(74 <= x <= 122 and 66 <= y <= 80 and z == 44 for x, y, z in half)


def test_random_batch_has_the_configured_shapes_and_label_range():
  config = _tiny_config()
  config.data.num_classes = 3
  batch = bench.random_batch(config, channels=2)
  assert batch.labeled["image"].shape == (2, 16, 16, 16, 2) and batch.unlabeled["image"].shape == (0, 16, 16, 16, 2)
  assert batch.labeled["label"].min() >= 0 and batch.labeled["label"].max() == 2


def test_bad_eval_volume_is_one_error_line():
  result = subprocess.run(
      [sys.executable, "-m", "jaxseg.bench", "--config", "configs/supervised_vnet.py",
       "--config.method.model.n_filters=4", "--config.data.patch_size=(16,16,16)", "--steps=1",
       "--warmup=0", "--eval_volume=20,20"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: --eval_volume '20,20' has 2 axes")


def test_la_like_label_has_the_requested_foreground_away_from_the_edges():
  label = bench.la_like_label((40, 36, 24), foreground=0.09)
  assert label.dtype == bool and abs(label.mean() - 0.09) < 0.005
  for axis in range(3):
    assert not label.take(0, axis).any() and not label.take(-1, axis).any()


def test_metrics_agree_with_medpy_and_are_timed():
  pytest.importorskip("medpy")
  result = bench.BenchResult(config="", device="", num_devices=1, global_batch=1, patch=(1,),
                             compile_s=1.0, step_median_s=1.0, step_min_s=1.0, step_max_s=1.0,
                             samples_per_s=1.0, voxels_per_s=1.0, step_flops=None,
                             achieved_flops=None, peak_flops=None)
  bench.compare_metrics_with_medpy(result, repeats=1)
  assert result.metrics_max_rel_diff < 1e-6
  assert result.metrics_s > 0 and result.medpy_metrics_s > 0
  assert "metrics vs medpy" in bench.format_result(result)


def test_torch_comparison_alternates_the_same_vnet_step():
  pytest.importorskip("torch")
  config = _tiny_config()
  partner = bench.torch_partner(config, channels=1)
  assert partner.iteration == "supervised V-Net step" and partner.device.startswith("torch ")
  result = bench.run(config, steps=3, warmup=1, eval_volume="none", name="tiny", partner=partner)
  assert result.torch_step_min_s <= result.torch_step_median_s <= result.torch_step_max_s
  assert result.ratio_min <= result.ratio_median <= result.ratio_max and result.ratio_min > 0
  assert len(result.load_average) == 2
  report = bench.format_result(result)
  assert "PyTorch / JAX" in report and "median of the alternated pairs" in report
  config.method.model.name = "unet"
  with pytest.raises(ValueError, match="method.model.name is 'unet'"):
    bench.torch_partner(config, channels=1)


def test_dtc_partner_is_the_whole_dtc_iteration():
  pytest.importorskip("torch")
  pytest.importorskip("skimage")
  config = load_config_file(CONFIGS_DIR / "dtc.py").get_config("")
  config.method.model.n_filters = 4
  config.data.patch_size = (16, 16, 16)
  partner = bench.torch_partner(config, channels=1)
  assert partner.iteration == "DTC iteration with the host SDF, beta 1.0"
  partner.step()
  partner.step()


def test_alternation_swaps_the_order_every_pair():
  calls = []
  ours, theirs = _alternated_pair(calls)
  ours_times, theirs_times = bench._alternated(ours, theirs, 3)
  assert calls == ["ours", "theirs", "theirs", "ours", "ours", "theirs"]
  assert len(ours_times) == len(theirs_times) == 3
  assert all(t >= 0 for t in ours_times + theirs_times)


def _alternated_pair(calls: list):
  def ours():
    calls.append("ours")
    return 0
  def theirs():
    calls.append("theirs")
  return ours, theirs
