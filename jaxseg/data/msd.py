"""Medical Segmentation Decathlon (MSD) layout: a dataset.json manifest and NIfTI volumes.

    root/
      dataset.json      {"name": ..., "modality": {"0": "FLAIR", ...},
                         "labels": {"0": "background", "1": ...},
                         "training": [{"image": "./imagesTr/x.nii.gz",
                                       "label": "./labelsTr/x.nii.gz"}, ...],
                         "test": ["./imagesTs/y.nii.gz", ...]}        ("test" is optional)
      imagesTr/  labelsTr/  imagesTs/

Files are found through the manifest only, never by listing the folders: MSD archives unpacked on
macOS carry hidden "._x.nii.gz" resource files that are not images.

A 3D image (X, Y, Z) becomes (X, Y, Z, 1); a 4D multi-modal image (X, Y, Z, M) stays channels-last
(MSD stores the modality on the 4th axis). Each case keeps its NIfTI affine and the voxel spacing
(header zooms of the 3 spatial axes, mm), so predictions can be written back in place.

A modality whose channel is constant over the whole volume (how multi-modal files leave out a
sequence that was not acquired) is marked missing (`Case.modality_mask`, its channel set to 0), with
a warning naming the case (`preprocess.with_absent_modalities`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zlib
from typing import Any, Optional, Sequence, Union

import nibabel as nib
import numpy as np

from jaxseg.data import preprocess
from jaxseg.data.base import Case, DataError, check_case

PathLike = Union[str, os.PathLike]

MANIFEST = "dataset.json"
_REQUIRED_KEYS = ("name", "modality", "labels", "training")
# What nibabel raises for files that are not NIfTI, truncated, or corrupt.
_NIFTI_READ_ERRORS = (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError,
                      OSError, EOFError, ValueError, zlib.error)


@dataclasses.dataclass(frozen=True)
class MsdPair:
  """One training entry of the manifest: a case ID and its image and label paths."""

  case_id: str
  image: pathlib.Path
  label: pathlib.Path


@dataclasses.dataclass(frozen=True)
class MsdManifest:
  """The parts of an MSD dataset.json that loading needs.

  Attributes:
    root: the dataset folder.
    name: the task name (e.g. "BRATS").
    modalities: modality names in channel order ("0", "1", ... of the "modality" dict).
    label_names: class names in class-index order ("0", "1", ... of the "labels" dict).
    training: the labeled cases, in manifest order.
    test: paths of the unlabeled test images, in manifest order (empty when absent).
  """

  root: pathlib.Path
  name: str
  modalities: tuple[str, ...]
  label_names: tuple[str, ...]
  training: tuple[MsdPair, ...]
  test: tuple[pathlib.Path, ...]

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  @property
  def num_modalities(self) -> int:
    return len(self.modalities)


def case_id_from_path(path: PathLike) -> str:
  """The case ID of an MSD file: its name without .nii.gz (or .nii)."""
  name = pathlib.Path(path).name
  for suffix in (".nii.gz", ".nii"):
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def read_msd_manifest(root: PathLike) -> MsdManifest:
  """Reads and validates root/dataset.json.

  Args:
    root: the dataset folder.

  Returns:
    The manifest, with paths resolved against root (the leading "./" of MSD paths dropped).

  Raises:
    DataError: naming dataset.json (and the key at fault) when the file is missing, is not JSON,
      lacks a required key, or holds a malformed modality/labels/training/test entry.
  """
  root = pathlib.Path(root)
  path = root / MANIFEST
  if not root.is_dir():
    raise DataError(f"{root}: MSD dataset root not found")
  try:
    manifest = json.loads(path.read_text())
  except FileNotFoundError:
    raise DataError(f"{path}: MSD manifest not found") from None
  except (OSError, UnicodeDecodeError) as err:
    raise DataError(f"{path}: cannot read MSD manifest: {err}") from err
  except json.JSONDecodeError as err:
    raise DataError(f"{path}: not valid JSON: {err}") from err
  if not isinstance(manifest, dict):
    raise DataError(f"{path}: top level must be a JSON object, got {type(manifest).__name__}")
  missing = [k for k in _REQUIRED_KEYS if k not in manifest]
  if missing:
    raise DataError(f"{path}: missing key(s) {missing}")
  training = _training_pairs(manifest["training"], root, path)
  test = manifest.get("test", [])
  if not isinstance(test, list) or not all(isinstance(t, str) for t in test):
    raise DataError(f"{path}: key 'test' must be a list of image paths")
  return MsdManifest(
      root=root,
      name=str(manifest["name"]),
      modalities=_indexed_names(manifest["modality"], "modality", path),
      label_names=_indexed_names(manifest["labels"], "labels", path),
      training=training,
      test=tuple(_resolve(root, t) for t in test),
  )


def load_msd(root: PathLike, ids: Optional[Sequence[str]] = None) -> list[Case]:
  """Loads the labeled (training) cases of an MSD dataset.

  Args:
    root: the dataset folder.
    ids: case IDs (file names without .nii.gz) to load, in this order; None: all, in manifest order.

  Returns:
    One checked `Case` per ID: image (X, Y, Z, M) float32 with M = number of modalities, label
    (X, Y, Z) uint8 (int32 beyond 256 classes), spacing from the header (mm), the NIfTI affine of
    the image, source = the image path.

  Raises:
    DataError: naming dataset.json for manifest faults or unknown IDs, and the image or label file
      for a missing or unreadable file, a shape mismatch, a modality-count mismatch, non-integral
      labels or labels outside the declared classes, and NaN/inf intensities.
  """
  manifest = read_msd_manifest(root)
  pairs = manifest.training
  if ids is not None:
    by_id = {p.case_id: p for p in pairs}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
      raise DataError(f"{manifest.root / MANIFEST}: case IDs {unknown} are not in 'training'")
    pairs = tuple(by_id[i] for i in ids)
  return [load_msd_pair(pair, manifest) for pair in pairs]


def load_msd_pair(pair: MsdPair, manifest: MsdManifest) -> Case:
  """Loads and checks one training pair of `manifest` (see `load_msd`)."""
  image_nii, image = _read_nifti(pair.image, as_float=True)
  _, label = _read_nifti(pair.label, as_float=False)
  image = _image_channels_last(image, pair.image, manifest.num_modalities)
  label = _integral_label(label, pair.label)
  if label.shape != image.shape[:3]:
    raise DataError(f"{pair.image}: image shape {image.shape[:3]} and label shape {label.shape} "
                    f"(in {pair.label}) differ")
  _check_label_range(label, manifest.num_classes, pair.label)
  spacing = tuple(float(z) for z in image_nii.header.get_zooms()[:3])
  case = Case(case_id=pair.case_id, image=image, label=label, spacing=spacing,
              affine=np.asarray(image_nii.affine, dtype=np.float64), source=str(pair.image),
              modalities=manifest.modalities)
  check_case(case, num_classes=manifest.num_classes)
  case = preprocess.with_absent_modalities(case)
  label_dtype = np.uint8 if manifest.num_classes <= 256 else np.int32
  return case.replace(label=label.astype(label_dtype))


def _resolve(root: pathlib.Path, entry: str) -> pathlib.Path:
  """root / entry, with MSD's leading "./" dropped."""
  return root / (entry[2:] if entry.startswith("./") else entry)


def _indexed_names(table: Any, key: str, path: pathlib.Path) -> tuple[str, ...]:
  """Names of a {"0": name0, "1": name1, ...} dict, in index order; the indices must be 0..n-1."""
  if not isinstance(table, dict) or not table:
    raise DataError(f"{path}: key {key!r} must be a non-empty object {{\"0\": name, ...}}")
  try:
    indexed = {int(k): str(v) for k, v in table.items()}
  except ValueError:
    raise DataError(f"{path}: key {key!r} must map indices \"0\", \"1\", ... to names, "
                    f"got keys {list(table)}") from None
  if sorted(indexed) != list(range(len(indexed))):
    raise DataError(f"{path}: key {key!r} must have indices 0..{len(indexed) - 1}, "
                    f"got {sorted(indexed)}")
  return tuple(indexed[i] for i in range(len(indexed)))


def _training_pairs(entries: Any, root: pathlib.Path, path: pathlib.Path) -> tuple[MsdPair, ...]:
  """The 'training' list as `MsdPair`s; each case ID must be unique."""
  if not isinstance(entries, list) or not entries:
    raise DataError(f"{path}: key 'training' must be a non-empty list")
  pairs, seen = [], set()
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str)
                                              for k in ("image", "label")):
      raise DataError(f"{path}: training[{i}] must be {{\"image\": path, \"label\": path}}, "
                      f"got {entry!r}")
    case_id = case_id_from_path(entry["image"])
    if case_id in seen:
      raise DataError(f"{path}: training[{i}]: case ID {case_id!r} appears twice")
    seen.add(case_id)
    pairs.append(MsdPair(case_id, _resolve(root, entry["image"]), _resolve(root, entry["label"])))
  return tuple(pairs)


def _read_nifti(path: pathlib.Path, as_float: bool) -> tuple[nib.Nifti1Image, np.ndarray]:
  """Reads a NIfTI file (read-only): the image object and its data.

  Args:
    path: the file.
    as_float: True: data as float32 (scaling applied); False: data in its stored (scaled) dtype.
  """
  if not path.is_file():
    raise DataError(f"{path}: file listed in {MANIFEST} not found")
  try:
    img = nib.load(path)
    # Reading the data here, not later: truncation only shows when the data is decompressed.
    data = img.get_fdata(dtype=np.float32) if as_float else np.asarray(img.dataobj)
  except _NIFTI_READ_ERRORS as err:
    raise DataError(f"{path}: not a readable NIfTI file: {err}") from err
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise DataError(f"{path}: expected a NIfTI file, got {type(img).__name__}")
  return img, data


def _image_channels_last(data: np.ndarray, path: pathlib.Path, num_modalities: int) -> np.ndarray:
  """The image data as float32 (X, Y, Z, M); M must match the manifest's modality count."""
  if data.ndim == 3:
    data = data[..., np.newaxis]
  if data.ndim != 4:
    raise DataError(f"{path}: image must be 3D (X, Y, Z) or 4D (X, Y, Z, M), "
                    f"got shape {data.shape}")
  if data.shape[-1] != num_modalities:
    raise DataError(f"{path}: image has {data.shape[-1]} modalities, {MANIFEST} declares "
                    f"{num_modalities}")
  return data


def _integral_label(data: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """The label data as int64 (X, Y, Z).

  Float storage (or scl_slope scaling) is accepted only when every value is within 1e-3 of an
  integer: then it is rounded, otherwise it is an error.
  """
  if data.ndim == 4 and data.shape[-1] == 1:
    data = data[..., 0]  # Some tools write labels as (X, Y, Z, 1).
  if data.ndim != 3:
    raise DataError(f"{path}: label must be 3D (X, Y, Z), got shape {data.shape}")
  if np.issubdtype(data.dtype, np.floating):
    rounded = np.round(data)
    if not np.all(np.isfinite(data)) or np.any(np.abs(data - rounded) > 1e-3):
      raise DataError(f"{path}: label has non-integral values")
    data = rounded
  elif not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
    raise DataError(f"{path}: label must be integer, got dtype {data.dtype}")
  return data.astype(np.int64)


def _check_label_range(label: np.ndarray, num_classes: int, path: pathlib.Path) -> None:
  """Raises naming the label file when a value is outside 0..num_classes-1."""
  if label.size == 0 or (label.min() >= 0 and label.max() < num_classes):
    return
  found = np.unique(label)
  outside = found[(found < 0) | (found >= num_classes)]
  if outside.size:
    raise DataError(f"{path}: label values {outside.tolist()} are outside the classes "
                    f"0..{num_classes - 1} declared in {MANIFEST}")
