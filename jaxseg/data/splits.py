"""Deterministic labeled / unlabeled / validation splits of a case list.

Labeled = the first N IDs of the list in file order (the LA protocol, docs/la_protocol.md). The
validation cases (`data.validation`) are
  "last":   the last K IDs (the default; unlabeled = everything in between);
  "random": K IDs drawn without replacement from the non-labeled ones by a generator seeded with
            `data.validation_seed` (a key of its own, so that runs of different seeds share the
            split), kept in list order;
  a list file: the IDs it names, none of them labeled, all of them in the case list.
Unlabeled = the remaining IDs, in list order. A split is a pure function of the list, (N, K), the
rule and its seed or file; every run writes it (and the rule) into its workdir as split.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence, Union

import numpy as np

from jaxseg.config_blocks import VALIDATION_RULES  # data.validation, else a list file.
from jaxseg.data.base import DataError


@dataclasses.dataclass(frozen=True)
class Split:
  """Case IDs of each part of a split, in list order."""

  labeled: tuple[str, ...]
  unlabeled: tuple[str, ...]
  validation: tuple[str, ...]
  # How the validation cases were chosen: "last", "random" (with its seed) or "file" (its path).
  validation_rule: str = "last"
  validation_seed: Optional[int] = None
  validation_file: Optional[str] = None

  def rule_dict(self) -> dict:
    """{"validation_rule": ..., and "validation_seed" or "validation_file" where it applies}: the
    record of how the validation cases were chosen (split.json, the evaluation summary)."""
    out: dict = {"validation_rule": self.validation_rule}
    if self.validation_seed is not None:
      out["validation_seed"] = self.validation_seed
    if self.validation_file is not None:
      out["validation_file"] = self.validation_file
    return out

  def to_dict(self) -> dict:
    return {"labeled": list(self.labeled), "unlabeled": list(self.unlabeled),
            "validation": list(self.validation), **self.rule_dict()}

  def write(self, path: Union[str, os.PathLike]) -> None:
    """Writes the split as JSON (the run's record of which cases were used for what)."""
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=1)

  @classmethod
  def read(cls, path: Union[str, os.PathLike]) -> "Split":
    with open(path) as f:
      d = json.load(f)
    # Files written before the rule was recorded hold a "last" split.
    return cls(tuple(d["labeled"]), tuple(d["unlabeled"]), tuple(d["validation"]),
               d.get("validation_rule", "last"), d.get("validation_seed"),
               d.get("validation_file"))


def num_labeled_from(num_labeled: Union[int, float], pool_size: int, key: str) -> int:
  """Resolves a labeled count given as an int (N) or a fraction of the training pool (0 < f <= 1)."""
  if isinstance(num_labeled, bool):
    raise DataError(f"config {key}: expected a count or a fraction, got {num_labeled!r}")
  if isinstance(num_labeled, float):
    if not 0.0 < num_labeled <= 1.0:
      raise DataError(f"config {key}: a fraction must be in (0, 1], got {num_labeled}")
    return max(1, int(round(num_labeled * pool_size)))
  if isinstance(num_labeled, int):
    if num_labeled < 1:
      raise DataError(f"config {key}: needs at least 1 labeled case, got {num_labeled}")
    return num_labeled
  raise DataError(f"config {key}: expected a count or a fraction, got {num_labeled!r}")


def make_split(case_ids: Sequence[str], num_labeled: Union[int, float], num_validation: int = 0,
               *, key: str = "data.num_labeled", validation: str = "last",
               validation_seed: int = 0,
               validation_ids: Optional[Sequence[str]] = None) -> Split:
  """Splits `case_ids` into labeled (first N), validation and unlabeled (the rest, in list order).

  Args:
    case_ids: the case list in its file order (e.g. LA train.list).
    num_labeled: N as a count, or as a fraction of the training pool (the list minus validation).
    num_validation: K, the number of validation cases ("last", "random"; a list file gives its own).
    key: the config key named in errors about `num_labeled`.
    validation: "last" (the last K IDs), "random" (K IDs drawn from the non-labeled ones with
      `np.random.default_rng(validation_seed)`, kept in list order) or the path of a list file
      whose IDs are `validation_ids` (named in errors and recorded).
    validation_seed: the seed of the "random" draw.
    validation_ids: the IDs of the list file (required with a file, unused otherwise).

  Raises:
    DataError: empty or duplicated list, counts that do not fit the list, a list-file ID that is
      not in the list, repeated, or labeled (naming data.validation and the file).
  """
  ids = tuple(case_ids)
  if not ids:
    raise DataError("the case list is empty: nothing to split")
  seen = set()
  duplicates = sorted({i for i in ids if i in seen or seen.add(i)})
  if duplicates:
    raise DataError(f"the case list repeats IDs {duplicates[:5]}")
  from_file = validation not in VALIDATION_RULES
  if from_file:
    if validation_ids is None:
      raise ValueError(f"make_split: validation = {validation!r} is a list file: pass its IDs")
    chosen = _checked_file_ids(ids, validation, validation_ids)
    num_validation = len(chosen)
  if not 0 <= num_validation < len(ids):
    raise DataError(f"config data.num_validation: {num_validation} does not leave any training "
                    f"case out of {len(ids)}")
  pool_size = len(ids) - num_validation
  n = num_labeled_from(num_labeled, pool_size, key)
  if n > pool_size:
    raise DataError(f"config {key}: {n} labeled cases requested but only {pool_size} are left "
                    f"after carving {num_validation} validation cases off {len(ids)}")
  labeled = ids[:n]
  if validation == "last":
    return Split(labeled=labeled, unlabeled=ids[n:pool_size], validation=ids[pool_size:])
  if from_file:
    overlap = [i for i in chosen if i in set(labeled)]
    if overlap:
      raise DataError(f"config data.validation = {validation!r}: the file lists labeled cases "
                      f"{overlap[:5]} (labeled = the first {n} of the case list)")
    rule: dict = {"validation_rule": "file", "validation_file": str(validation)}
  else:
    draw = np.random.default_rng(validation_seed).choice(len(ids) - n, num_validation,
                                                         replace=False)
    chosen = tuple(ids[n + int(i)] for i in draw)
    rule = {"validation_rule": "random", "validation_seed": int(validation_seed)}
  chosen_set = set(chosen)
  rest = tuple(i for i in ids[n:] if i not in chosen_set)
  in_order = chosen if from_file else tuple(i for i in ids[n:] if i in chosen_set)
  return Split(labeled=labeled, unlabeled=rest, validation=in_order, **rule)


def _checked_file_ids(ids: tuple[str, ...], path: str,
                      file_ids: Sequence[str]) -> tuple[str, ...]:
  """The IDs of the validation list file `path`, each in `ids` once."""
  file_ids = tuple(file_ids)
  if not file_ids:
    raise DataError(f"config data.validation = {path!r}: the file lists no case")
  known = set(ids)
  missing = [i for i in file_ids if i not in known]
  if missing:
    raise DataError(f"config data.validation = {path!r}: cases {missing[:5]} of the file are not "
                    f"in the case list ({len(missing)} in all)")
  if len(set(file_ids)) != len(file_ids):
    raise DataError(f"config data.validation = {path!r}: the file lists a case twice")
  return file_ids
