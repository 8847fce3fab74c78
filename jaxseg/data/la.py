"""Left Atrium 2018 (preprocessed h5 form of UA-MT / DTC / SASSNet): cases from the standard layout.

Layout (docs/data.md, LA 2018; how the volumes were preprocessed: docs/la_protocol.md):

    root/
      train.list                              case IDs, one per line (test.list where it exists)
      2018LA_Seg_Training Set/<ID>/mri_norm2.h5

Each h5 holds `image` (float32, axes W, H, D, read as our x, y, z) and `label` (uint8 {0, 1}, same
shape). The volumes are already z-scored and cropped; no voxel spacing is used on LA, so every case
gets spacing (1.0, 1.0, 1.0).
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional, Sequence, Union

import h5py
import numpy as np

from jaxseg.data.base import Case, DataError, check_case

PathLike = Union[str, os.PathLike]

CASES_DIR = "2018LA_Seg_Training Set"
CASE_FILE = "mri_norm2.h5"
NUM_CLASSES = 2  # background, left-atrium cavity.
SPACING = (1.0, 1.0, 1.0)  # The preprocessed h5 files carry no spacing; LA works in voxels.


def read_case_list(path: PathLike) -> list[str]:
  """Reads a case-ID list (e.g. train.list): one ID per line, in file order.

  File order matters: the literature takes the first N IDs of train.list as the labeled set.

  Args:
    path: the list file.

  Returns:
    The IDs, surrounding whitespace and blank lines dropped.

  Raises:
    DataError: the file is missing or unreadable, lists no ID, or lists an ID twice.
  """
  path = pathlib.Path(path)
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise DataError(f"{path}: case list not found") from None
  except (OSError, UnicodeDecodeError) as err:
    raise DataError(f"{path}: cannot read case list: {err}") from err
  ids = [line.strip() for line in text.splitlines() if line.strip()]
  if not ids:
    raise DataError(f"{path}: case list is empty")
  seen = set()
  for case_id in ids:
    if case_id in seen:
      raise DataError(f"{path}: case ID {case_id!r} is listed twice")
    seen.add(case_id)
  return ids


def case_path(root: PathLike, case_id: str) -> pathlib.Path:
  """Path of one case's h5 file: root/2018LA_Seg_Training Set/<case_id>/mri_norm2.h5."""
  return pathlib.Path(root) / CASES_DIR / case_id / CASE_FILE


def load_la_case(root: PathLike, case_id: str) -> Case:
  """Loads one LA case.

  Args:
    root: the dataset root (the folder holding train.list).
    case_id: the case folder name.

  Returns:
    A checked `Case`: image (X, Y, Z, 1) float32, label (X, Y, Z) uint8 in {0, 1}, spacing
    (1.0, 1.0, 1.0), no affine, source = the h5 path.

  Raises:
    DataError: naming the h5 file when it is missing, not a readable h5 file, lacks the `image` or
      `label` dataset, or holds a non-3D image, shapes that differ, labels outside {0, 1}, or
      NaN/inf intensities.
  """
  if not case_id or "/" in case_id or "\\" in case_id or case_id in (".", ".."):
    # An ID is a folder name; anything else would read outside the dataset.
    raise DataError(f"{pathlib.Path(root) / CASES_DIR}: invalid case ID {case_id!r}")
  path = case_path(root, case_id)
  if not path.is_file():
    raise DataError(f"{path}: case file not found (case {case_id!r})")
  image, label = _read_h5_pair(path)
  if image.ndim != 3:
    raise DataError(f"{path}: image must be 3D (W, H, D), got shape {image.shape}")
  if not (np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer)):
    raise DataError(f"{path}: image must be numeric, got dtype {image.dtype}")
  case = Case(case_id=case_id, image=image.astype(np.float32, copy=False)[..., np.newaxis],
              label=label, spacing=SPACING, affine=None, source=str(path), modalities=("mri",))
  check_case(case, num_classes=NUM_CLASSES)
  # Only after the range check: a cast before it would wrap e.g. -1 to 255.
  return case.replace(label=label.astype(np.uint8, copy=False))


def load_la(root: PathLike, list_name: Optional[str] = "train.list",
            ids: Optional[Sequence[str]] = None) -> list[Case]:
  """Loads LA cases, in list order.

  Args:
    root: the dataset root.
    list_name: the case list inside root ("train.list" or "test.list"); None to skip the list and
      load exactly `ids`.
    ids: the IDs to load, in this order; each must be in the list (catches typos). None: every ID
      of the list.

  Returns:
    One checked `Case` per ID (see `load_la_case`).

  Raises:
    DataError: naming the root, list or h5 file at fault.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise DataError(f"{root}: LA dataset root not found")
  if list_name is None:
    if ids is None:
      raise DataError(f"{root}: give `list_name` or `ids` to say which LA cases to load")
    wanted = list(ids)
  else:
    list_path = root / list_name
    listed = read_case_list(list_path)
    if ids is None:
      wanted = listed
    else:
      wanted = list(ids)
      listed_set = set(listed)
      unknown = [i for i in wanted if i not in listed_set]
      if unknown:
        raise DataError(f"{list_path}: case IDs {unknown} are not in the list")
  return [load_la_case(root, case_id) for case_id in wanted]


def _read_h5_pair(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads the `image` and `label` datasets of one h5 file (read-only), unchecked."""
  try:
    with h5py.File(path, "r") as f:
      missing = [k for k in ("image", "label") if not isinstance(f.get(k), h5py.Dataset)]
      if missing:
        raise DataError(f"{path}: missing dataset(s) {missing}; found keys {sorted(f.keys())}")
      return np.asarray(f["image"][()]), np.asarray(f["label"][()])
  except OSError as err:
    # h5py raises OSError both for non-h5 files and for corrupt chunks.
    raise DataError(f"{path}: not a readable h5 file: {err}") from err
