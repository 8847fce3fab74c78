"""Intensity robustness: data.percentile_scale (robust per-case scaling), data.intensity_augment
(on-device scale, shift, contrast, gamma for any method), the la*_robust presets; and one tiny run
through the command line with all of it on, a seeded random validation split and the per-case
analysis of its workdir."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from conftest import CONFIGS_DIR, load_config_file, run_tiny
from jaxseg import analyse, config_blocks, train
from jaxseg.data import intensity, intensity_augment as ia, nnunet_augment, preprocess
from jaxseg.data.base import Case, DataError
from jaxseg.data.batches import Batch


def case(image, case_id="c", mask=None):
  image = np.asarray(image, np.float32)
  return Case(case_id=case_id, image=image, label=None, spacing=(1.0,) * (image.ndim - 1),
              modality_mask=mask)


# ---------------------------------------------------------------------------------------------------
# data.percentile_scale


def test_percentile_scale_by_hand():
  x = np.arange(5.0).reshape(5, 1, 1)  # 0..4: median 2; 25th, 75th percentiles 1, 3.
  out = intensity.percentile_scaled(case(x), 25.0, 75.0).image
  np.testing.assert_allclose(out.reshape(-1), [-1.0, -0.5, 0.0, 0.5, 1.0])
  out = intensity.percentile_scaled(case(x), 0.0, 100.0).image
  np.testing.assert_allclose(out.reshape(-1), [-0.5, -0.25, 0.0, 0.25, 0.5])
  # One scale per channel; an absent channel is 0 and never divided.
  two = np.stack([np.arange(5.0), np.zeros(5)], -1).reshape(5, 1, 2)
  out = intensity.percentile_scaled(case(two, mask=np.array([True, False])), 0.0, 100.0).image
  np.testing.assert_allclose(out[..., 1], 0.0)
  with pytest.raises(DataError, match="case 'c', channel 1: its 0.0th and 100.0th percentiles are "
                                      "equal"):
    intensity.percentile_scaled(case(two), 0.0, 100.0)


def test_normalised_applies_the_key_alike_everywhere():
  """preprocess.normalised is the one path of training, evaluation lists and --mode predict."""
  x = np.random.default_rng(0).normal(3.0, 2.0, (6, 5, 4, 1))
  d = config_blocks.data_block()
  assert preprocess.normalised([case(x)], d)[0].image is not None
  np.testing.assert_array_equal(preprocess.normalised([case(x)], d)[0].image, case(x).image)
  d.percentile_scale = (0.5, 99.5)
  lo, med, hi = np.percentile(x.astype(np.float32).astype(np.float64), [0.5, 50, 99.5])
  np.testing.assert_allclose(preprocess.normalised([case(x)], d)[0].image,
                             (x.astype(np.float32) - med) / (hi - lo), rtol=1e-5, atol=1e-6)
  d.zscore = True
  with pytest.raises(DataError, match="config data.percentile_scale = .* and data.zscore = True"):
    preprocess.normalised([case(x)], d)


def test_predict_inputs_are_scaled_like_the_training_cases(tmp_path):
  """--mode predict reads its files through the same preprocessing (data/readers.py)."""
  import h5py
  from jaxseg.data import readers
  x = np.random.default_rng(1).gamma(2.0, 1.0, (8, 7, 6)).astype(np.float32)
  with h5py.File(tmp_path / "scan.h5", "w") as f:
    f["image"] = x
  d = config_blocks.data_block()
  d.percentile_scale = (1.0, 99.0)
  got = readers.read_input(tmp_path / "scan.h5", d).case.image
  np.testing.assert_array_equal(got, intensity.percentile_scaled(case(x[..., None]), 1.0,
                                                                 99.0).image)
  lo, med, hi = np.percentile(x.astype(np.float64), [1.0, 50.0, 99.0])
  np.testing.assert_allclose(got[..., 0], (x - med) / (hi - lo), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("changes, message", [
    ({"percentile_scale": (50.0, 50.0)}, "config data.percentile_scale = (50.0, 50.0) must be () "
                                         "or (lower, upper) with 0 <= lower < upper <= 100"),
    ({"percentile_scale": (1.0, 99.0), "zscore": True},
     "config data.percentile_scale = (1.0, 99.0) and data.zscore = True: choose one"),
    ({"intensity_augment.p_gamma": 1.5},
     "config data.intensity_augment.p_gamma = 1.5 must be a number in [0, 1]"),
    ({"intensity_augment.gamma_range": (0.0, 1.5)},
     "config data.intensity_augment.gamma_range = (0.0, 1.5) must be (lo, hi) with 0 < lo <= hi"),
    ({"intensity_augment.shift_range": (0.2, -0.2)},
     "config data.intensity_augment.shift_range = (0.2, -0.2) must be (lo, hi) with lo <= hi"),
])
def test_bad_values_name_their_key(changes, message):
  d = config_blocks.data_block("synthetic3d")
  config_blocks.apply_overrides(d, changes, "test")
  with pytest.raises(DataError) as e:
    config_blocks.check_config(ml_collections.ConfigDict({"data": d}))
  assert str(e.value).startswith(message)


# ---------------------------------------------------------------------------------------------------
# data.intensity_augment


def test_defaults_agree_and_the_class_checks_like_the_config():
  assert ia.IntensityAugmentConfig().__dict__ == config_blocks.INTENSITY_AUGMENT
  assert config_blocks.data_block().intensity_augment.to_dict() == config_blocks.INTENSITY_AUGMENT
  with pytest.raises(DataError, match="config data.intensity_augment.p_scale = -0.1 must be"):
    ia.IntensityAugmentConfig(p_scale=-0.1)
  with pytest.raises(DataError, match="config data.intensity_augment.enabled = 1 must be True or "
                                      "False"):
    ia.IntensityAugmentConfig(enabled=1)
  with pytest.raises(DataError, match="config data.intensity_augment.p_blur: unknown key"):
    ia.IntensityAugmentConfig.from_config({"p_blur": 0.1})


def reference(image, p):
  """The transforms written out in float64 with NumPy (nnU-Net's contrast; batchgenerators' gamma
  through nnunet_augment.reference_gamma)."""
  x = np.asarray(image, np.float64)
  p = jax.tree.map(np.asarray, p)
  out = x * p.scale_factor + p.shift_value
  for c in range(out.shape[-1]):
    ch = out[..., c]
    if p.contrast:
      ch = np.clip((ch - ch.mean()) * p.contrast_factor[c] + ch.mean(), ch.min(), ch.max())
    if p.gamma:
      ch = nnunet_augment.reference_gamma(ch, float(p.gamma_value[c]), False, True)
    out[..., c] = ch
  return out


def test_apply_matches_the_numpy_reference_and_draws_in_range():
  config = ia.IntensityAugmentConfig(enabled=True, p_scale=1, p_shift=1, p_contrast=1, p_gamma=1)
  image = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 4, 2)) + 1.0
  apply, draw = jax.jit(ia.apply), jax.jit(ia.draw_params, static_argnums=(1, 2))
  for seed in range(4):
    p = draw(jax.random.PRNGKey(seed), config, 2)
    assert bool(p.scale) and bool(p.gamma)
    assert np.all((0.75 <= p.scale_factor) & (p.scale_factor < 1.25))
    assert np.all((-0.25 <= p.shift_value) & (p.shift_value < 0.25))
    assert np.all((0.7 <= p.gamma_value) & (p.gamma_value < 1.5))
    np.testing.assert_allclose(apply(image, p), reference(image, p), rtol=2e-5, atol=2e-5)
  never = ia.IntensityAugmentConfig(p_scale=0, p_shift=0, p_contrast=0, p_gamma=0)
  p = ia.draw_params(jax.random.PRNGKey(0), never, 2)
  np.testing.assert_array_equal(ia.apply(image, p), image)


def test_a_sample_draw_depends_on_its_index_not_the_batch():
  config = ia.IntensityAugmentConfig(enabled=True, p_scale=1, p_shift=1, p_contrast=0.5,
                                     p_gamma=0.5)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 1))
  key = jax.random.PRNGKey(7)
  augment = jax.jit(ia.augment_images, static_argnums=2)
  all3 = augment(key, images, config)
  first2 = augment(key, images[:2], config)
  np.testing.assert_array_equal(all3[:2], first2)
  p1 = ia.draw_params(jax.random.fold_in(key, 1), config, 1)
  np.testing.assert_allclose(all3[1], jax.jit(ia.apply)(images[1], p1), rtol=1e-5, atol=1e-6)
  assert ia.augment_images(key, images[:0], config).shape == (0, 4, 4, 1)


def test_the_trainer_wraps_the_step_only_when_enabled():
  def method_step(state, batch, key):
    return batch, key

  d = config_blocks.data_block()
  assert ia.with_intensity_augment(method_step, d) is method_step  # Off: the method's own step.
  d.intensity_augment.enabled = True
  d.intensity_augment.p_scale = 1.0
  step = ia.with_intensity_augment(method_step, d)
  rng = np.random.default_rng(0)
  batch = Batch(labeled={"image": rng.normal(size=(2, 4, 4, 1)).astype(np.float32),
                         "label": rng.integers(0, 2, (2, 4, 4)).astype(np.int32)},
                unlabeled={"image": rng.normal(size=(1, 4, 4, 1)).astype(np.float32)})
  key = jax.random.PRNGKey(3)
  seen, seen_key = jax.jit(step)(None, batch, key)
  assert seen_key is not None and np.array_equal(seen_key, key)  # The method's key is unchanged.
  np.testing.assert_array_equal(seen.labeled["label"], batch.labeled["label"])
  config = ia.IntensityAugmentConfig.from_config(d.intensity_augment.to_dict())
  want = ia.augment_batch(jax.random.fold_in(key, ia.KEY_TAG), batch, config)
  for stream in ("labeled", "unlabeled"):
    # Jitted against op by op: float32 rounding of the fused gamma.
    np.testing.assert_allclose(getattr(seen, stream)["image"], getattr(want, stream)["image"],
                               rtol=1e-5, atol=1e-6)
  assert not np.allclose(seen.labeled["image"], batch.labeled["image"])  # p_scale = 1.


def test_a_run_of_before_the_keys_resumes(tmp_path):
  config = load_config_file(CONFIGS_DIR / "supervised.py").get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved["data"]["intensity_augment"], saved["data"]["percentile_scale"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  train.check_same_run(config, tmp_path)
  config.data.intensity_augment.p_gamma = 0.5
  with pytest.raises(DataError, match=r"data.intensity_augment.p_gamma"):
    train.check_same_run(config, tmp_path)


LA_CONFIGS = ["supervised_vnet", "dtc", "sassnet", "mean_teacher", "uamt", "asdnet", "dkuxnet"]


def flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


@pytest.mark.parametrize("name", LA_CONFIGS)
def test_robust_presets_are_la8_plus_zscore_and_augmentation(name):
  module = load_config_file(CONFIGS_DIR / f"{name}.py")
  robust, base = flat(module.get_config("la8_robust").to_dict()), flat(
      module.get_config("la8").to_dict())
  assert {k for k in robust if robust[k] != base.get(k)} == {
      "name", "data.zscore", "data.intensity_augment.enabled"}
  assert robust["data.zscore"] and robust["data.intensity_augment.enabled"]
  assert not base["data.zscore"] and not base["data.intensity_augment.enabled"]
  assert robust["name"] == f"{name}_la8_robust"


# ---------------------------------------------------------------------------------------------------
# End to end.


def test_tiny_run_with_everything_on_then_the_analysis(tmp_path):
  workdir = tmp_path / "run"
  result = run_tiny(workdir, "--config.train.num_steps=2", "--config.data.validation=random",
                    "--config.data.validation_seed=5", "--config.data.percentile_scale=(0.5,99.5)",
                    "--config.data.intensity_augment.enabled=True",
                    "--config.data.intensity_augment.p_gamma=1.0")
  assert result.returncode == 0, result.stderr
  split = json.loads((workdir / "split.json").read_text())
  assert (split["validation_rule"], split["validation_seed"]) == ("random", 5)
  summary = json.loads((workdir / "eval" / "summary.json").read_text())
  assert summary["validation_split"] == {"validation_rule": "random", "validation_seed": 5}
  assert summary["raw_lcc"][0]["num_cases"] == 2
  assert "validation (validation: random, seed 5): 2 cases; mean ± std" in result.stdout
  out, rows, view, _ = analyse.analyse(str(workdir))
  assert [r["case"] for r in rows if r["role"] == "evaluated"] == sorted(
      split["validation"], key=lambda i: [r["dice_raw"] for r in rows if r["case"] == i][0])
  assert {r["case"] for r in rows if r["role"] == "labeled"} == set(split["labeled"])
  assert out.is_file()
