"""eval.batchnorm = "per_image" (jaxseg/eval_batchnorm.py): each evaluated window normalised by its
own BatchNorm statistics equals a batch-1 train-mode forward, in the sliding window, in evaluate()
and in --mode predict (predict_files); refused for a network without BatchNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxseg import config_blocks, eval_batchnorm, evaluate
from jaxseg.data.base import Case, DataError

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH, STRIDES = (8, 8), (4, 4)


class _TinyBN(nn.Module):
  """Conv -> BatchNorm -> ReLU -> Conv -> BatchNorm (no scale) -> one logit: two BN layers, the
  second with the call-time `use_running_average` form."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(3, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
    x = nn.Conv(2, (3, 3))(x)
    x = nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_scale=False)(x, use_running_average=not train)
    return nn.Conv(1, (1, 1))(x)


class _NoBN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Conv(1, (3, 3))(x)


def _variables(model, channels=1):
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *PATCH, channels)), train=False)
  if "batch_stats" in v:
    # Running statistics far from any image's own, so that the two modes differ.
    v = {"params": v["params"],
         "batch_stats": jax.tree.map(lambda a: a + 0.7, v["batch_stats"])}
  return v


MODEL = _TinyBN()
VARIABLES = _variables(MODEL)


def _running(inputs):
  """A method's predict function: eval-mode probabilities."""
  return {"m": jax.nn.sigmoid(MODEL.apply(VARIABLES, inputs["image"], train=False))}


def _batch1_train_mode(inputs):
  """The reference: each window alone (batch 1) through the train-mode network."""
  x = inputs["image"]
  outs = [MODEL.apply(VARIABLES, x[i:i + 1], train=True, mutable=["batch_stats"])[0]
          for i in range(x.shape[0])]
  return {"m": jax.nn.sigmoid(jnp.concatenate(outs))}


def _eval_cfg(**kw):
  cfg = config_blocks.eval_block()
  cfg.update({**dict(batch_size=3, shape_bucket=0, lcc=False, num_figure_cases=0,
                     save_predictions=False), **kw})
  return cfg


def _image(seed=1, shape=(12, 16)):
  return np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), (*shape, 1)), np.float32)


def test_per_image_equals_batch1_train_mode_forward():
  x = jnp.asarray(np.stack([_image(s, PATCH) for s in range(3)]))
  per_image = jax.jit(eval_batchnorm.with_batchnorm(jax.tree_util.Partial(_running), "per_image"))
  got = np.asarray(per_image({"image": x})["m"])
  want = np.asarray(_batch1_train_mode({"image": x})["m"])
  np.testing.assert_allclose(got, want, atol=2e-6)
  # Running statistics give something else, and "running" is the predict function itself.
  assert np.abs(np.asarray(_running({"image": x})["m"]) - want).max() > 1e-2
  assert eval_batchnorm.with_batchnorm(_running, "running") is _running


def test_per_image_in_the_sliding_window():
  """12x16 image, 8x8 windows at stride 4: 6 windows in 2 calls of 3 (and a padded last call);
  every window is normalised alone, whatever the batch it is computed in."""
  image = _image()
  per_image = eval_batchnorm.with_batchnorm(_running, "per_image")
  got = evaluate.predict_views(per_image, image, _eval_cfg(), PATCH, STRIDES)["m"]
  want = evaluate.predict_views(_batch1_train_mode, image, _eval_cfg(batch_size=1), PATCH,
                                STRIDES)["m"]
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_evaluate_scores_per_image_predictions():
  cases = []
  for seed in (3, 4):
    image = _image(seed)
    label = (image[..., 0] > 0.5).astype(np.uint8)
    cases.append(Case(case_id=f"c{seed}", image=image, label=label, spacing=(1.0, 1.0)))
  got = evaluate.evaluate(_running, cases, _eval_cfg(batchnorm="per_image"), 2,
                          patch_size=PATCH)
  want = evaluate.evaluate(_batch1_train_mode, cases, _eval_cfg(batch_size=1), 2,
                           patch_size=PATCH)
  running = evaluate.evaluate(_running, cases, _eval_cfg(), 2, patch_size=PATCH)
  assert got["batchnorm"] == "per_image" and "batchnorm" not in running
  assert got["views"] == want["views"]
  assert got["views"] != running["views"]


def test_predict_files_per_image(tmp_path):
  image = _image(5)
  Image.fromarray((image[..., 0] * 255).round().astype(np.uint8)).save(tmp_path / "a.png")
  read = np.asarray(Image.open(tmp_path / "a.png"), np.float32)[..., None] / 255.0
  data_cfg = config_blocks.data_block()
  data_cfg.patch_size = PATCH
  written = evaluate.predict_files(_running, tmp_path / "a.png", tmp_path / "out",
                                   _eval_cfg(batchnorm="per_image"), patch_size=PATCH,
                                   data_cfg=data_cfg, log=None)
  probs = evaluate.predict_views(_batch1_train_mode, read, _eval_cfg(batch_size=1), PATCH,
                                 STRIDES)["m"]
  want = np.where(probs[..., 0] > 0.5, 255, 0)
  np.testing.assert_array_equal(np.asarray(Image.open(written[0])), want)


def test_per_image_refused_without_batchnorm():
  variables = _variables(_NoBN())
  no_bn = lambda inputs: {"m": jax.nn.sigmoid(_NoBN().apply(variables, inputs["image"],
                                                                train=False))}
  case = Case(case_id="c", image=_image(), label=np.zeros((12, 16), np.uint8), spacing=(1.0, 1.0))
  with pytest.raises(DataError, match="eval.batchnorm = 'per_image'.*no BatchNorm"):
    evaluate.evaluate(no_bn, [case], _eval_cfg(batchnorm="per_image"), 2, patch_size=PATCH)
  spec = {"image": jax.ShapeDtypeStruct((1, *PATCH, 1), jnp.float32)}
  assert not eval_batchnorm.runs_batchnorm(no_bn, spec)
  assert eval_batchnorm.runs_batchnorm(_running, spec)


def test_config_check():
  cfg = config_blocks.eval_block()
  assert cfg.batchnorm == "running"
  c = ml_collections.ConfigDict({"eval": cfg})
  cfg.batchnorm = "train"
  with pytest.raises(DataError, match=r"eval\.batchnorm = 'train' must be one of"):
    config_blocks.check_config(c)


def test_the_trainer_refuses_per_image_before_training():
  """train.py checks eval.batchnorm on the initial state, before any step."""
  import types
  from jaxseg import train
  variables = _variables(_NoBN())
  method = types.SimpleNamespace(
      predict=lambda state, inputs: {"m": _NoBN().apply(state, inputs["image"], train=False)})
  case = Case(case_id="c", image=_image(), label=np.zeros((12, 16), np.uint8), spacing=(1.0, 1.0))
  dataset = types.SimpleNamespace(labeled=(case,))
  config = ml_collections.ConfigDict({"eval": _eval_cfg(batchnorm="per_image"),
                                      "data": config_blocks.data_block()})
  config.data.patch_size = PATCH
  with pytest.raises(DataError, match="eval.batchnorm = 'per_image'"):
    train._check_eval_batchnorm(method, variables, config, dataset)
  config.eval.batchnorm = "running"
  train._check_eval_batchnorm(method, variables, config, dataset)
  bn_method = types.SimpleNamespace(
      predict=lambda state, inputs: {"m": MODEL.apply(state, inputs["image"], train=False)})
  config.eval.batchnorm = "per_image"
  train._check_eval_batchnorm(bn_method, VARIABLES, config, dataset)
