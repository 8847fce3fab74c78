import pytest

from jaxseg.data.base import DataError
from jaxseg.data.splits import Split, make_split

IDS = [f"case{i:02d}" for i in range(80)]


def test_la_protocol_split():
  split = make_split(IDS, 8, num_validation=8)
  assert split.labeled == tuple(IDS[:8])
  assert split.validation == tuple(IDS[-8:])
  assert split.unlabeled == tuple(IDS[8:72])
  assert len(set(split.labeled) | set(split.unlabeled) | set(split.validation)) == 80


def test_fraction_is_of_the_training_pool():
  # 0.1 of the 72 cases left after validation = 7.2 -> 7.
  assert len(make_split(IDS, 0.1, num_validation=8).labeled) == 7
  assert len(make_split(IDS, 0.1).labeled) == 8
  assert len(make_split(IDS, 1.0).unlabeled) == 0


def test_write_read_roundtrip(tmp_path):
  split = make_split(IDS, 16, num_validation=8)
  split.write(tmp_path / "split.json")
  assert Split.read(tmp_path / "split.json") == split


@pytest.mark.parametrize("ids, n, k, words", [
    ([], 2, 0, "empty"),
    (["a", "b", "a"], 1, 0, "repeats"),
    (IDS, 73, 8, "data.num_labeled"),
    (IDS, 0, 0, "data.num_labeled"),
    (IDS, 1.5, 0, "data.num_labeled"),
    (IDS, 2, 80, "data.num_validation"),
])
def test_bad_split_requests(ids, n, k, words):
  with pytest.raises(DataError, match=words):
    make_split(ids, n, num_validation=k)
