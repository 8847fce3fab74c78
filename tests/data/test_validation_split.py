"""data.validation: "last" (today's rule), "random" (seeded draw from the non-labeled cases) or a
list file; the rule recorded in split.json; errors naming the key and the file."""

import json

import ml_collections
import numpy as np
import pytest

from jaxseg import config_blocks
from jaxseg.data import sources
from jaxseg.data.base import DataError
from jaxseg.data.splits import Split, make_split

IDS = [f"case{i:02d}" for i in range(80)]


def naive_random_split(ids, n, k, seed):
  """The rule written out: labeled = ids[:n]; validation = k of ids[n:] drawn by
  default_rng(seed).choice without replacement, in list order; unlabeled = the others."""
  rest = list(ids[n:])
  picked = {rest[i] for i in np.random.default_rng(seed).choice(len(rest), k, replace=False)}
  return (tuple(ids[:n]), tuple(i for i in rest if i not in picked),
          tuple(i for i in rest if i in picked))


def test_last_is_the_rule_of_before():
  split = make_split(IDS, 8, num_validation=8)
  assert split == make_split(IDS, 8, num_validation=8, validation="last", validation_seed=5)
  assert (split.labeled, split.unlabeled, split.validation) == (
      tuple(IDS[:8]), tuple(IDS[8:72]), tuple(IDS[72:]))
  assert split.rule_dict() == {"validation_rule": "last"}


@pytest.mark.parametrize("n, k, seed", [(8, 8, 0), (8, 8, 1), (16, 8, 0), (2, 5, 3)])
def test_random_draws_k_of_the_non_labeled_cases(n, k, seed):
  split = make_split(IDS, n, num_validation=k, validation="random", validation_seed=seed)
  assert (split.labeled, split.unlabeled, split.validation) == naive_random_split(IDS, n, k, seed)
  assert len(split.validation) == k and not set(split.validation) & set(split.labeled)
  assert sorted(split.labeled + split.unlabeled + split.validation) == IDS
  assert split.rule_dict() == {"validation_rule": "random", "validation_seed": seed}


def test_random_split_depends_on_its_seed_only():
  a = make_split(IDS, 8, num_validation=8, validation="random", validation_seed=0)
  assert a == make_split(IDS, 8, num_validation=8, validation="random", validation_seed=0)
  b = make_split(IDS, 8, num_validation=8, validation="random", validation_seed=1)
  assert a.validation != b.validation and a.labeled == b.labeled
  # Not the last 8: the point of the rule on an ID-ordered list.
  assert a.validation != tuple(IDS[72:])


def test_random_with_a_labeled_fraction_counts_the_pool_without_validation():
  # 0.1 of the 72 cases left after validation = 7.2 -> 7, as with "last".
  split = make_split(IDS, 0.1, num_validation=8, validation="random")
  assert split.labeled == tuple(IDS[:7]) and len(split.validation) == 8


def test_file_gives_its_cases_in_file_order():
  chosen = ["case50", "case09", "case33"]
  split = make_split(IDS, 8, num_validation=8, validation="val.list", validation_ids=chosen)
  assert split.validation == tuple(chosen)  # The file's count, not num_validation.
  assert split.labeled == tuple(IDS[:8])
  assert split.unlabeled == tuple(i for i in IDS[8:] if i not in chosen)
  assert split.rule_dict() == {"validation_rule": "file", "validation_file": "val.list"}


@pytest.mark.parametrize("ids, words", [
    (["case50", "nope"], "config data.validation = 'v.list': cases ['nope'] of the file are not "
                         "in the case list"),
    (["case50", "case03"], "config data.validation = 'v.list': the file lists labeled cases "
                           "['case03']"),
    (["case50", "case50"], "config data.validation = 'v.list': the file lists a case twice"),
    ([], "config data.validation = 'v.list': the file lists no case"),
])
def test_bad_file_names_the_key_and_the_file(ids, words):
  with pytest.raises(DataError) as e:
    make_split(IDS, 8, validation="v.list", validation_ids=ids)
  assert str(e.value).startswith(words)


def test_split_json_records_the_rule(tmp_path):
  for split in (make_split(IDS, 8, 8), make_split(IDS, 8, 8, validation="random",
                                                  validation_seed=3),
                make_split(IDS, 8, validation="v.list", validation_ids=["case40"])):
    split.write(tmp_path / "split.json")
    assert Split.read(tmp_path / "split.json") == split
    assert json.loads((tmp_path / "split.json").read_text())["validation_rule"] == \
        split.validation_rule
  # A split.json of before the rule was recorded reads as "last".
  (tmp_path / "old.json").write_text(json.dumps(
      {"labeled": ["a"], "unlabeled": ["b"], "validation": ["c"]}))
  assert Split.read(tmp_path / "old.json").validation_rule == "last"


def synthetic_data(**changes) -> ml_collections.ConfigDict:
  d = config_blocks.data_block("synthetic3d")
  d.update(dict(num_labeled=2, num_validation=3, **changes))
  d.synthetic.update(dict(num_cases=10, shape=(16, 16, 16)))
  return d


def test_load_dataset_uses_the_rule_and_the_seed_key(tmp_path):
  ids = [f"synth_{i:04d}" for i in range(10)]
  dataset = sources.load_dataset(synthetic_data(validation="random", validation_seed=4))
  labeled, unlabeled, validation = naive_random_split(ids, 2, 3, 4)
  assert tuple(c.case_id for c in dataset.validation) == validation
  assert tuple(c.case_id for c in dataset.unlabeled) == unlabeled
  assert all(c.label is None for c in dataset.unlabeled)
  assert dataset.split.rule_dict() == {"validation_rule": "random", "validation_seed": 4}
  # The run seed does not move the split.
  other = synthetic_data(validation="random", validation_seed=4, seed=9)
  assert sources.load_dataset(other).split == dataset.split
  (tmp_path / "val.list").write_text("synth_0007\n\nsynth_0004\n")
  dataset = sources.load_dataset(synthetic_data(validation=str(tmp_path / "val.list")))
  assert dataset.split.validation == ("synth_0007", "synth_0004")


def test_relative_list_file_is_under_the_data_root(tmp_path):
  d = config_blocks.data_block("la")
  d.root = str(tmp_path)
  assert sources.validation_file(d, "val.list") == tmp_path / "val.list"
  assert sources.validation_file(d, str(tmp_path / "x.list")) == tmp_path / "x.list"


def test_config_check_names_the_key(tmp_path):
  d = synthetic_data(validation="")
  with pytest.raises(DataError, match=r"^config data.validation = '' must be 'last', 'random' or "
                                      "the path of a list file$"):
    config_blocks.check_config(ml_collections.ConfigDict({"data": d}))
  d = synthetic_data(validation=str(tmp_path / "none.list"))
  with pytest.raises(DataError, match=r"^config data.validation = '.*none.list': .*none.list is "
                                      "not a file"):
    config_blocks.check_config(ml_collections.ConfigDict({"data": d}))
  config_blocks.check_config(ml_collections.ConfigDict({"data": d}), files=False)
  with pytest.raises(DataError, match="config data.validation_seed = -1"):
    config_blocks.check_config(ml_collections.ConfigDict({"data": synthetic_data(
        validation_seed=-1)}))


def test_la_protocol_draws_its_validation_cases():
  d = config_blocks.data_block("la")
  assert (d.validation, d.validation_seed, d.num_validation) == ("random", 0, 8)
  assert config_blocks.data_block().validation == "last"
