"""The released Duo-SegNet protocol switches (docs/methods/duo.md, presets), each against a
hand-built case: separate BatchNorm calls (method.separate_bn_calls), soft masks
(data.soft_masks), the epoch length (train.num_epochs), the RGB / ImageNet input (data.input); and
the configs/duo.py presets that turn them on. Per-image BatchNorm at evaluation is
tests/test_eval_batchnorm.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from conftest import CONFIGS_DIR, learnable_batch
from jaxseg import config_blocks, models, train
from jaxseg.config_blocks import data_block
from jaxseg.data import batches as batches_lib
from jaxseg.data import folders2d, preprocess, sources
from jaxseg.data.base import Case, DataError
from jaxseg.methods import base, duo, peers, supervised

pytestmark = pytest.mark.usefixtures("fast_compile")

PATCH = (16, 16)


def _method_config(**method) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = data_block()
  c.data.labeled_groups = 2
  c.data.patch_size = PATCH
  c.method = duo.default_config()
  c.method.model.features = (4, 8)
  c.method.critic.ndf = 8
  c.method.update(method)
  return c


# ------------------------------------------------------------------------------------------------
# method.separate_bn_calls


def _two_segmenters(config, x):
  """Peers f1, f2 of the configured UNet: one jitted init (f2's parameters are f1's scaled and
  its running statistics shifted, so that the two networks differ), cheaper to compile than
  duo.init with its critic."""
  unet = models.get_model("unet", num_classes=1, **base.model_kwargs(config.method.model))
  variables = jax.jit(lambda key: unet.init(key, x[:1], train=False))(jax.random.key(0))
  nets = {}
  for view, scale, shift in (("f1", 1.0, 0.0), ("f2", 1.3, 0.2)):
    nets[view] = base.TrainState.create(
        apply_fn=unet.apply, tx=optax.sgd(0.1),
        params=jax.tree.map(lambda a: a * scale, variables["params"]),
        batch_stats=jax.tree.map(lambda a: a + shift, variables["batch_stats"]))
  return unet, peers.Peers(nets=nets)


def test_separate_bn_calls_thread_the_state_through_four_calls():
  config = _method_config(separate_bn_calls=True)
  assert duo.apply_preset(config.method).separate_bn_calls
  batch = learnable_batch(PATCH, 2, 1, seed=3)
  unet, seg = _two_segmenters(config, batch.labeled["image"])
  (x1, x2), _ = duo.split_views(batch)
  u = batch.unlabeled["image"]
  params = seg.params
  rng = jax.random.key(5)
  probs, unlabeled, stats = jax.jit(duo.segment_views_separately)(seg, params, (x1, x2), u, rng)

  # By hand: model.apply in train mode, F1(X1), F2(X2), F1(U), F2(U), each network's statistics
  # passed from its first call to its second.
  @jax.jit
  def apply_train(net_params, x, stats_in):
    out, updated = unet.apply({"params": net_params, "batch_stats": stats_in}, x, train=True,
                              mutable=["batch_stats"])
    return jax.nn.sigmoid(out), updated["batch_stats"]

  def call(view, x, stats_in):
    return apply_train(params[view], x, stats_in)

  p1, s1 = call("f1", x1, seg["f1"].batch_stats)
  p2, s2 = call("f2", x2, seg["f2"].batch_stats)
  u1, s1 = call("f1", u, s1)
  u2, s2 = call("f2", u, s2)
  for got, want in zip((*probs, *unlabeled), (p1, p2, u1, u2)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  for view, want in (("f1", s1), ("f2", s2)):
    for g, w in zip(jax.tree.leaves(stats[view]), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)

  # The default joint call normalises concat(X^i, U) together: other maps.
  joint, _, _ = jax.jit(duo.segment_views)(seg, params, (x1, x2), u, rng)
  assert np.abs(np.asarray(joint[0]) - np.asarray(p1)).max() > 1e-3


def test_separate_bn_calls_must_be_a_bool():
  method = ml_collections.ConfigDict({**duo.default_config().to_dict(), "separate_bn_calls": 1})
  with pytest.raises(DataError, match="method.separate_bn_calls = 1 must be True or False"):
    duo.apply_preset(method)
  assert not duo.apply_preset(_method_config().method).separate_bn_calls


# ------------------------------------------------------------------------------------------------
# data.soft_masks


def _write_folder(root, masks):
  """images/ and masks/ with one 2x2 image per mask (values in 0..255)."""
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  for i, mask in enumerate(masks):
    image = np.full((2, 2), 40 * (i + 1), np.uint8)
    Image.fromarray(image).save(root / "images" / f"c{i}.png")
    Image.fromarray(np.asarray(mask, np.uint8)).save(root / "masks" / f"c{i}.png")


def test_soft_mask_is_the_bilinear_mask(tmp_path):
  """A 2x2 mask with its right column foreground, resized to 4x4: PIL's bilinear filter samples
  at x = -0.25, 0.25, 0.75, 1.25 (weights clipped at the border), so each row is
  [0, 0.25, 0.75, 1]; its ground truth (> 0.5) keeps the right half."""
  _write_folder(tmp_path, [[[0, 255], [0, 255]]])
  soft = folders2d.soft_mask(tmp_path, "c0", (4, 4))
  np.testing.assert_allclose(soft, np.tile([0.0, 0.25, 0.75, 1.0], (4, 1)), atol=1e-6)
  np.testing.assert_array_equal(folders2d.soft_mask(tmp_path, "c0"), [[0, 1], [0, 1]])


def test_soft_masks_in_the_dataset_and_batches(tmp_path):
  masks = [[[0, 255], [0, 255]], [[255, 255], [0, 0]], [[0, 0], [0, 255]], [[255, 0], [0, 0]],
           [[0, 255], [255, 255]]]
  _write_folder(tmp_path, masks)
  cfg = data_block()
  cfg.update(dict(source="folders2d", root=str(tmp_path), image_size=(4, 4), patch_size=(4, 4),
                  num_labeled=2, num_validation=2, labeled_groups=2, batch_unlabeled=1,
                  augment=False, pad_to_patch=False, soft_masks=True))
  dataset = sources.load_dataset(cfg)
  want = [folders2d.soft_mask(tmp_path, f"c{i}", (4, 4)) for i in range(5)]
  for case, soft, w in zip(dataset.labeled, dataset.soft_labels, want[:2]):
    np.testing.assert_allclose(soft, w)
    np.testing.assert_array_equal(case.label, w > 0.5)
  for case, w in zip(dataset.validation, want[3:]):
    np.testing.assert_array_equal(case.label, w > 0.5)
  # Nearest neighbour would keep a quarter of the 4x4 image for mask c3; > 0.5 of the bilinear
  # mask keeps 2x2 pixels of it too, but not the same as mask c4's three-quarters: check one.
  assert dataset.validation[1].label.sum() == (want[4] > 0.5).sum()
  batch = sources.make_batches(dataset, cfg).batch_at(0)
  labels = batch.labeled["label"]
  assert labels.dtype == np.float32
  # The crop is the whole 4x4 image (no padding, no augmentation): the targets are the soft masks.
  np.testing.assert_allclose(labels[0], want[0])
  np.testing.assert_allclose(labels[1], want[1])
  # Duo's BCE on soft targets: -mean[y log p + (1 - y) log(1 - p)].
  p = jnp.full((1, 4, 4, 1), 0.6)
  y = labels[:1, ..., None]
  hand = -np.mean(y * np.log(0.6) + (1 - y) * np.log(0.4))
  np.testing.assert_allclose(float(duo.supervised_loss([p], [jnp.asarray(y)])), hand, rtol=1e-5)


def test_soft_masks_checks():
  c = _method_config()
  c.data.soft_masks = True
  duo.check_config(c)
  c.data.num_classes = 3
  with pytest.raises(DataError, match="soft_masks = True needs a binary task"):
    config_blocks.check_config(c, files=False)
  s = ml_collections.ConfigDict({"data": data_block(), "method": supervised.default_config()})
  s.data.soft_masks = True
  with pytest.raises(DataError, match="data.soft_masks = True: supervised trains on class labels"):
    supervised.check_config(s)


# ------------------------------------------------------------------------------------------------
# train.num_epochs


@pytest.mark.parametrize("groups, per_group, num_u, batch_u, want", [
    ((5, 5), 1, 70, 1, 5),     # min(|X1|, |X2|, |U|)
    ((6, 4), 1, 3, 1, 3),      # the unlabeled set is the shortest
    ((7, 9), 2, 9, 2, 3),      # floor(7 / 2), floor(9 / 2), floor(9 / 2)
    ((4,), 2, 0, 0, 2),        # no unlabeled stream
])
def test_epoch_length(groups, per_group, num_u, batch_u, want):
  assert batches_lib.epoch_length(groups, per_group, num_u, batch_u) == want


def test_epoch_length_of_a_split_and_the_run_length():
  image = np.zeros((4, 4, 1), np.float32)
  cases = [Case(case_id=f"c{i}", image=image, label=np.zeros((4, 4), np.uint8),
                spacing=(1.0, 1.0)) for i in range(12)]
  # Views of 3 and 4 cases (np.array_split of 7), 5 unlabeled: min(3, 4, 5) = 3.
  b = batches_lib.TwoStreamBatches(cases[:7], cases[7:], batch_labeled=2, batch_unlabeled=1,
                                   patch_size=(4, 4), seed=0, labeled_groups=2)
  assert [len(g) for g in b.groups] == [4, 3] and b.epoch_length() == 3
  with pytest.raises(DataError, match="epoch would have no batch"):
    batches_lib.epoch_length((1,), 2, 0, 0)

  config = _method_config()
  config.data.synthetic.shape = (32, 32)
  config.train = config_blocks.train_block()
  config.train.update(num_steps=0, num_epochs=7)
  config_blocks.check_config(config, files=False)
  resolved = train.with_run_length(config, duo, b)
  assert resolved.train.num_steps == 21 and config.train.num_steps == 0
  config.train.num_steps = 5
  with pytest.raises(DataError, match="num_epochs = 7 and train.num_steps = 5 are both set"):
    config_blocks.check_config(config, files=False)
  config.train.update(num_steps=0, num_epochs=0)
  with pytest.raises(DataError, match=r"train.num_steps = 0 must be an integer >= 1 \(or 0 with"):
    config_blocks.check_config(config, files=False)


# ------------------------------------------------------------------------------------------------
# data.input = "rgb_imagenet"


def test_rgb_imagenet_input():
  cfg = data_block("synthetic2d")
  cfg.update(dict(num_labeled=2, num_validation=2, labeled_groups=2, input="rgb_imagenet"))
  cfg.synthetic.update(num_cases=6, shape=(16, 16))
  plain = data_block("synthetic2d")
  plain.synthetic.update(num_cases=6, shape=(16, 16))
  raw = {c.case_id: c.image[..., 0] for c in sources.load_cases(plain)}
  dataset = sources.load_dataset(cfg)
  mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
  for case in (*dataset.labeled, *dataset.unlabeled):
    assert case.image.shape == (16, 16, 3)
    for c in range(3):  # Gray repeated, then (x - mean_c) / std_c in training.
      np.testing.assert_allclose(case.image[..., c], (raw[case.case_id] - mean[c]) / std[c],
                                 rtol=1e-5, atol=1e-6)
  for case in dataset.validation:  # Validation images repeated, not normalised.
    np.testing.assert_array_equal(case.image, np.repeat(raw[case.case_id][..., None], 3, -1))
  with pytest.raises(DataError, match="has 2 channels; it takes 1"):
    preprocess.as_rgb(Case(case_id="x", image=np.zeros((4, 4, 2), np.float32), label=None,
                           spacing=(1.0, 1.0)))
  cfg.zscore = True
  with pytest.raises(DataError, match="rgb_imagenet' normalises with the ImageNet statistics"):
    config_blocks.check_config(ml_collections.ConfigDict({"data": cfg}), files=False)


# ------------------------------------------------------------------------------------------------
# configs/duo.py presets


def _preset(name):
  return config_blocks.load_sibling(str(CONFIGS_DIR / "x.py"), "duo").get_config(name)


def test_released_preset_turns_the_switches_on_and_paper_keeps_today():
  released, paper, synthetic2d = _preset("released"), _preset("paper"), _preset("synthetic2d")
  assert (released.method.preset, released.method.separate_bn_calls, released.data.input,
          released.data.soft_masks, released.eval.batchnorm, released.train.num_epochs,
          released.train.num_steps, released.data.batch_unlabeled) == (
              "released", True, "rgb_imagenet", True, "per_image", 199, 0, 1)
  for name in ("paper", "synthetic2d", "", "nuclei", "la"):
    c = _preset(name)
    assert (c.method.separate_bn_calls, c.data.input, c.data.soft_masks, c.eval.batchnorm,
            c.train.num_epochs) == (False, "grayscale", False, "running", 0)
  paper_dict, s2d_dict = paper.to_dict(), synthetic2d.to_dict()
  paper_dict.pop("name"), s2d_dict.pop("name")
  assert paper_dict == s2d_dict
