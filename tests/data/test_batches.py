import collections

import numpy as np
import pytest

from jaxseg.data.base import Case, DataError
from jaxseg.data.batches import TwoStreamBatches


def make_case(index, shape=(12, 11, 9), channels=1, label=True):
  rng = np.random.default_rng(index)
  image = rng.normal(size=(*shape, channels)).astype(np.float32) + index * 100
  lab = (rng.random(shape) > 0.5).astype(np.uint8) if label is True else label
  return Case(case_id=f"c{index}", image=image, label=lab, spacing=(1.0,) * len(shape),
              source=f"/fake/c{index}.h5")


class PoisonLabel:
  """Stands in for the label of an unlabeled case: any use of it fails the test."""

  def __getattr__(self, name):
    raise AssertionError("the sampler read the label of an unlabeled case")

  def __array__(self, *args, **kwargs):
    raise AssertionError("the sampler read the label of an unlabeled case")


def make_batches(n_labeled=5, n_unlabeled=7, seed=0, **kwargs):
  labeled = [make_case(i) for i in range(n_labeled)]
  unlabeled = [make_case(100 + i, label=PoisonLabel()) for i in range(n_unlabeled)]
  options = dict(batch_labeled=2, batch_unlabeled=3, patch_size=(8, 8, 6), seed=seed)
  options.update(kwargs)
  return TwoStreamBatches(labeled, unlabeled, **options)


def case_of(image, base):
  """Recovers the case index from the offset each fake case adds to its intensities."""
  return int(round(float(np.median(image)) / 100)) - base


def test_shapes_and_dtypes_labeled_first():
  batch = next(make_batches())
  assert batch.labeled["image"].shape == (2, 8, 8, 6, 1) and batch.labeled["image"].dtype == np.float32
  assert batch.labeled["label"].shape == (2, 8, 8, 6) and batch.labeled["label"].dtype == np.int32
  assert batch.unlabeled["image"].shape == (3, 8, 8, 6, 1) and batch.unlabeled["image"].dtype == np.float32


def test_labeled_epochs_are_permutations_with_the_leftover_dropped():
  batches = make_batches(n_labeled=5)
  for epoch in range(4):
    used = np.concatenate([batches.labeled_indices(epoch * 2 + j) for j in range(2)])
    assert len(set(used.tolist())) == 4  # 5 cases, pairs: one left over each epoch
  firsts = {tuple(batches.labeled_indices(2 * e)) for e in range(10)}
  assert len(firsts) > 1  # each epoch reshuffles


def test_unlabeled_stream_is_a_chain_of_permutations():
  batches = make_batches(n_unlabeled=7)
  stream = np.concatenate([batches.unlabeled_indices(t) for t in range(14)])  # 42 = 6 blocks of 7
  for block in range(6):
    assert sorted(stream[7 * block:7 * block + 7].tolist()) == list(range(7))


def test_batch_images_come_from_the_sampled_cases():
  batches = make_batches()
  batch = batches.batch_at(3)
  assert [case_of(im, 0) for im in batch.labeled["image"]] == batches.labeled_indices(3).tolist()
  assert [case_of(im, 100) for im in batch.unlabeled["image"]] == batches.unlabeled_indices(3).tolist()


def test_unlabeled_labels_are_never_read():
  batches = make_batches()
  for _ in range(5):
    next(batches)  # PoisonLabel raises if touched


def test_deterministic_and_resumes_exactly():
  reference = make_batches(seed=4)
  expected = [next(reference) for _ in range(10)]
  first = make_batches(seed=4)
  for _ in range(6):
    next(first)
  state = first.get_state()
  resumed = make_batches(seed=4)
  resumed.set_state(state)
  for want in expected[6:]:
    got = next(resumed)
    np.testing.assert_array_equal(got.labeled["image"], want.labeled["image"])
    np.testing.assert_array_equal(got.labeled["label"], want.labeled["label"])
    np.testing.assert_array_equal(got.unlabeled["image"], want.unlabeled["image"])
  other = next(make_batches(seed=5))
  assert not np.array_equal(other.labeled["image"], expected[0].labeled["image"])


def test_resume_with_another_seed_is_refused():
  batches = make_batches(seed=1)
  with pytest.raises(DataError, match="data.seed"):
    batches.set_state({"step": 3, "seed": 2})


def test_augmentation_varies_the_crops():
  batches = make_batches(n_labeled=2, batch_labeled=2)
  crops = collections.Counter(batches.batch_at(t).labeled["label"][0].tobytes() for t in range(6))
  assert len(crops) == 6


def test_no_unlabeled_stream():
  batches = make_batches(batch_unlabeled=0, n_unlabeled=0)
  assert next(batches).unlabeled["image"].shape == (0, 8, 8, 6, 1)


@pytest.mark.parametrize("kwargs, words", [
    (dict(batch_labeled=6), "data.batch_labeled"),
    (dict(batch_unlabeled=2, n_unlabeled=0), "data.batch_unlabeled"),
    (dict(patch_size=(8, 8)), "data.patch_size"),
])
def test_bad_configuration(kwargs, words):
  with pytest.raises(DataError, match=words):
    make_batches(**kwargs)


def test_mismatched_channels_name_the_file():
  labeled = [make_case(0), make_case(1, channels=2)]
  with pytest.raises(DataError, match="/fake/c1.h5"):
    TwoStreamBatches(labeled, [], batch_labeled=1, batch_unlabeled=0, patch_size=(8, 8, 6), seed=0)


def test_labeled_groups_draw_each_view_from_its_own_part():
  batches = make_batches(n_labeled=6, batch_labeled=2, labeled_groups=2)
  for t in range(12):
    first, second = batches.labeled_indices(t)
    assert first in (0, 1, 2) and second in (3, 4, 5)
  for epoch in range(3):  # each part runs through its own permutations
    assert sorted(batches.labeled_indices(3 * epoch + j)[0] for j in range(3)) == [0, 1, 2]


def test_labeled_groups_must_divide_the_labeled_batch():
  with pytest.raises(DataError, match="data.labeled_groups"):
    make_batches(batch_labeled=3, n_labeled=6, labeled_groups=2)
