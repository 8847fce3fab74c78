"""Deterministic labeled / unlabeled / validation splits of a case list.

The LA protocol (docs/la_protocol.md, data and split): labeled = the first N IDs of the list in
file order, validation = the last K IDs, unlabeled = everything in between. No randomness is
involved, so a split is fully described by the list and (N, K); it is written into every run's
workdir all the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence, Union

from jaxseg.data.base import DataError


@dataclasses.dataclass(frozen=True)
class Split:
  """Case IDs of each part of a split, in list order."""

  labeled: tuple[str, ...]
  unlabeled: tuple[str, ...]
  validation: tuple[str, ...]

  def to_dict(self) -> dict:
    return {"labeled": list(self.labeled), "unlabeled": list(self.unlabeled),
            "validation": list(self.validation)}

  def write(self, path: Union[str, os.PathLike]) -> None:
    """Writes the split as JSON (the run's record of which cases were used for what)."""
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=1)

  @classmethod
  def read(cls, path: Union[str, os.PathLike]) -> "Split":
    with open(path) as f:
      d = json.load(f)
    return cls(tuple(d["labeled"]), tuple(d["unlabeled"]), tuple(d["validation"]))


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
               *, key: str = "data.num_labeled") -> Split:
  """Splits `case_ids` into labeled (first N), validation (last K) and unlabeled (the rest).

  Args:
    case_ids: the case list in its file order (e.g. LA train.list).
    num_labeled: N as a count, or as a fraction of the training pool (the list minus validation).
    num_validation: K, the number of cases carved off the end of the list for validation.
    key: the config key named in errors about `num_labeled`.

  Raises:
    DataError: empty or duplicated list, or counts that do not fit the list.
  """
  ids = tuple(case_ids)
  if not ids:
    raise DataError("the case list is empty: nothing to split")
  seen = set()
  duplicates = sorted({i for i in ids if i in seen or seen.add(i)})
  if duplicates:
    raise DataError(f"the case list repeats IDs {duplicates[:5]}")
  if not 0 <= num_validation < len(ids):
    raise DataError(f"config data.num_validation: {num_validation} does not leave any training "
                    f"case out of {len(ids)}")
  pool = ids[:len(ids) - num_validation]
  n = num_labeled_from(num_labeled, len(pool), key)
  if n > len(pool):
    raise DataError(f"config {key}: {n} labeled cases requested but only {len(pool)} are left "
                    f"after carving {num_validation} validation cases off {len(ids)}")
  return Split(labeled=pool[:n], unlabeled=pool[n:], validation=ids[len(pool):])
