"""Foreground oversampling of the labeled stream (nnU-Net's rule; docs/data.md, batches and
augmentation): which samples are forced, where their crops go, and that batches stay a pure
function of (seed, step)."""

import collections

import numpy as np
import pytest

from conftest import CONFIGS_DIR, load_config_file
from jaxseg import config_blocks
from jaxseg.data import augment, device_crops
from jaxseg.data.base import Case, DataError
from jaxseg.data.batches import TwoStreamBatches
from test_batches import PoisonLabel

PATCH = (8, 8, 6)
CENTRE = tuple(p // 2 for p in PATCH)


def blob_case(index, shape=(30, 30, 20), blobs=(((6, 8), (20, 22), (5, 7), 1),), channels=1):
  """A case whose label is 0 but for boxes [lo, hi) per axis of the given class."""
  rng = np.random.default_rng(index)
  image = rng.normal(size=(*shape, channels)).astype(np.float32) + index * 100
  label = np.zeros(shape, np.uint8)
  for *box, c in blobs:
    label[tuple(slice(lo, hi) for lo, hi in box)] = c
  return Case(case_id=f"c{index}", image=image, label=label, spacing=(1.0,) * len(shape),
              source=f"/fake/c{index}.h5")


def make(labeled, unlabeled=(), **kwargs):
  options = dict(batch_labeled=1, batch_unlabeled=0, patch_size=PATCH, seed=3)
  options.update(kwargs)
  return TwoStreamBatches(list(labeled), list(unlabeled), **options)


def assert_batches_equal(a, b):
  for stream in ("labeled", "unlabeled"):
    x, y = getattr(a, stream), getattr(b, stream)
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# --- which slots are forced ---------------------------------------------------------------------

# nnU-Net v1 get_do_oversample: forced iff not slot < round(B * (1 - f)); by hand.
FORCED = {
    (1, 0.33): [], (2, 0.33): [1], (3, 0.33): [2], (4, 0.33): [3], (12, 0.33): [8, 9, 10, 11],
    (1, 0.0): [], (2, 0.0): [], (3, 0.0): [], (4, 0.0): [], (12, 0.0): [],
    (1, 1.0): [0], (2, 1.0): [0, 1], (3, 1.0): [0, 1, 2], (4, 1.0): [0, 1, 2, 3],
    (12, 1.0): list(range(12)),
    # Python's round: halves to even. round(0.5) = 0, round(1.5) = 2, round(2.5) = 2.
    (1, 0.5): [0], (3, 0.5): [2], (5, 0.5): [2, 3, 4],
}


@pytest.mark.parametrize("batch_labeled, fraction", sorted(FORCED))
def test_forced_slots_follow_nnunet(batch_labeled, fraction):
  batches = make([blob_case(i) for i in range(batch_labeled)], batch_labeled=batch_labeled,
                 foreground_oversample=fraction)
  forced = [s for s in range(batch_labeled) if batches.forced_foreground(s)]
  assert forced == FORCED[batch_labeled, fraction]


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_fraction_out_of_range_is_refused(fraction):
  with pytest.raises(DataError, match="data.foreground_oversample"):
    make([blob_case(0)], foreground_oversample=fraction)


# --- where the forced crops go ------------------------------------------------------------------

@pytest.mark.parametrize("augment_on", [True, False])
def test_forced_crop_has_the_blob_at_its_centre(augment_on):
  batches = make([blob_case(0)], foreground_oversample=1.0, augment=augment_on)
  for t in range(30):
    label = batches.batch_at(t).labeled["label"][0]
    assert label[CENTRE] == 1


def test_uniform_crops_often_miss_the_blob():
  batches = make([blob_case(0)], foreground_oversample=0.0)
  hits = [batches.batch_at(t).labeled["label"][0].any() for t in range(100)]
  assert sum(hits) < 50  # An 8x8x6 crop of 30x30x20 rarely covers a 2x2x2 blob.


def test_both_foreground_classes_are_picked():
  # Class 1 is a large box, class 2 a few voxels: the class is drawn first, so both ~ half.
  case = blob_case(0, blobs=(((5, 25), (5, 25), (3, 17), 1), ((14, 16), (14, 16), (9, 11), 2)))
  batches = make([case], foreground_oversample=1.0)
  centres = collections.Counter(int(batches.batch_at(t).labeled["label"][0][CENTRE])
                                for t in range(200))
  assert set(centres) == {1, 2}
  assert 60 <= centres[1] <= 140 and 60 <= centres[2] <= 140, centres


@pytest.mark.parametrize("corner", ["low", "high"])
def test_crops_are_clamped_at_the_border(corner):
  shape = (30, 30, 20)
  voxel = (0, 0, 0) if corner == "low" else tuple(s - 1 for s in shape)
  case = blob_case(0, shape=shape, blobs=(tuple((v, v + 1) for v in voxel) + (1,),))
  batches = make([case], foreground_oversample=1.0, augment=False)
  label = batches.batch_at(0).labeled["label"][0]
  image = batches.batch_at(0).labeled["image"][0]
  inside = (0, 0, 0) if corner == "low" else (-1, -1, -1)
  assert label[inside] == 1 and label.sum() == 1
  start = (0, 0, 0) if corner == "low" else tuple(s - p for s, p in zip(shape, PATCH))
  window = tuple(slice(s, s + p) for s, p in zip(start, PATCH))
  np.testing.assert_array_equal(image, case.image[window])


def test_padded_volume_is_centred_in_padded_coordinates():
  # 6x6x4 < patch: padded by 4 per side to 14x14x12; voxel (2, 3, 1) -> (6, 7, 5), start (2, 3, 2).
  case = blob_case(0, shape=(6, 6, 4), blobs=(((2, 3), (3, 4), (1, 2), 1),))
  batches = make([case], foreground_oversample=1.0, augment=False)
  label = batches.batch_at(0).labeled["label"][0]
  assert label[CENTRE] == 1 and label.sum() == 1


def test_centred_offsets_clamp():
  assert augment.centred_offsets((30, 30, 20), PATCH, (15, 2, 19)) == [11, 0, 14]
  assert augment.centred_offsets((8, 8, 6), PATCH, (7, 0, 3)) == [0, 0, 0]


def test_no_foreground_falls_back_to_the_uniform_crop():
  empty = blob_case(0, blobs=())
  forced = make([empty], foreground_oversample=1.0)
  uniform = make([empty])
  for t in range(5):
    assert_batches_equal(forced.batch_at(t), uniform.batch_at(t))


# --- determinism, resume, uniform samples unchanged -----------------------------------------------

def _mixed(**kwargs):
  labeled = [blob_case(i) for i in range(5)]
  unlabeled = [blob_case(100 + i).replace(label=PoisonLabel()) for i in range(4)]
  options = dict(batch_labeled=2, batch_unlabeled=2, seed=7)
  options.update(kwargs)
  return make(labeled, unlabeled, **options)


def test_batches_are_pure_and_resume_exactly():
  batches = _mixed(foreground_oversample=0.5)
  assert_batches_equal(batches.batch_at(4), batches.batch_at(4))
  expected = [next(batches) for _ in range(8)]
  resumed = _mixed(foreground_oversample=0.5)
  resumed.set_state({"step": 5, "seed": 7})
  for want in expected[5:]:
    assert_batches_equal(next(resumed), want)


def test_zero_fraction_equals_the_iterator_without_the_argument():
  with_zero, without = _mixed(foreground_oversample=0.0), _mixed()
  for t in range(6):
    assert_batches_equal(with_zero.batch_at(t), without.batch_at(t))


def test_unforced_samples_draw_as_before():
  # B_l = 2, f = 0.5: round(1.0) = 1, slot 0 uniform, slot 1 forced; unlabeled untouched.
  forced, plain = _mixed(foreground_oversample=0.5), _mixed()
  for t in range(6):
    a, b = forced.batch_at(t), plain.batch_at(t)
    np.testing.assert_array_equal(a.labeled["image"][0], b.labeled["image"][0])
    np.testing.assert_array_equal(a.unlabeled["image"], b.unlabeled["image"])
    assert a.labeled["label"][1][CENTRE] == 1


def test_process_rows_give_the_full_batch_rows():
  batches = _mixed(foreground_oversample=0.5)
  for t in range(4):
    full = batches.batch_at(t)
    part = batches.batch_at(t, labeled_rows=(1, 2), unlabeled_rows=(0, 0))
    for key in full.labeled:
      np.testing.assert_array_equal(part.labeled[key][0], full.labeled[key][1])
    assert part.labeled["label"][0][CENTRE] == 1


# --- the device pipeline and the config refuse it ---------------------------------------------------

def test_device_pipeline_refuses_oversampling():
  batches = _mixed(foreground_oversample=0.33, batch_labeled=4)
  shapes = np.asarray([c.image.shape[:3] for c in batches.labeled])
  with pytest.raises(DataError, match=r"data.foreground_oversample = 0.33 needs the host pipeline "
                                      r"\(data.on_device = False\)"):
    device_crops.plan_batch(batches, shapes, np.zeros((0, 3), np.int64), 0)
  with pytest.raises(DataError, match="data.on_device = False"):
    device_crops.DeviceData(batches, sharding=None)
  plain = _mixed(batch_labeled=4)
  device_crops.plan_batch(plain, shapes, shapes[:4], 0)  # f = 0 still plans.


def _config(changes):
  config = load_config_file(CONFIGS_DIR / "supervised.py").get_config("synthetic2d")
  return config_blocks.apply_overrides(config, changes, "test")


def test_config_check_refuses_on_device_with_oversampling():
  for changes in ({"data.on_device": True}, {"data.foreground_oversample": 0.33}):
    config_blocks.check_config(_config(changes))
  bad = _config({"data.on_device": True, "data.foreground_oversample": 0.33})
  with pytest.raises(DataError) as raised:
    config_blocks.check_config(bad)
  message = str(raised.value)
  assert message.startswith("config data.foreground_oversample = 0.33") and "data.on_device" in message
