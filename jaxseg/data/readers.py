"""Readers of the files `--mode predict` segments: NIfTI, LA-style h5 and 2D images.

Each file is read as the training data were read (`read_input`): NIfTI through the MSD reader (3D,
or 4D multi-modal channels-last), h5 through its `image` dataset (no label needed), 2D images
through folders2d's reader with `data.channels` and `data.image_size`; then reduced to the channels
of `data.modalities` and clipped / z-scored per `data.clip_percentiles` / `data.zscore`. The result
is an unlabeled `Case` (its constant channels marked missing, no fields) and what writing its
prediction back needs (the NIfTI header, a 2D file's size).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Optional, Union

import h5py
import ml_collections
import nibabel as nib
import numpy as np

from jaxseg.data import folders2d, la, msd, preprocess
from jaxseg.data.base import Case, DataError, check_case

__all__ = [
    "H5_SUFFIXES",
    "InputFile",
    "NIFTI_SUFFIXES",
    "find_input_files",
    "input_kind",
    "output_name",
    "read_h5_image",
    "read_input",
]

PathLike = Union[str, os.PathLike]
NIFTI_SUFFIXES = (".nii.gz", ".nii")
H5_SUFFIXES = (".h5",)


def input_kind(path: pathlib.Path) -> Optional[str]:
  """"nifti", "h5" or "image" by file name, or None for anything else (hidden files included)."""
  name = path.name.lower()
  if path.name.startswith("."):
    return None
  if name.endswith(NIFTI_SUFFIXES):
    return "nifti"
  if name.endswith(H5_SUFFIXES):
    return "h5"
  if path.suffix.lower() in folders2d.EXTENSIONS:
    return "image"
  return None


def find_input_files(input_path: PathLike) -> list[pathlib.Path]:
  """The files `--input` names: the file itself, or a folder's supported files, sorted.

  A folder is scanned for NIfTI (.nii, .nii.gz), h5 (.h5) and 2D image files (folders2d.EXTENSIONS)
  directly inside it, and recursively for LA case files (<ID>/mri_norm2.h5, at any depth).

  Raises:
    DataError: naming the path when it does not exist, is an unsupported file, or is a folder
      without supported files.
  """
  path = pathlib.Path(input_path)
  if not path.exists():
    raise DataError(f"{path}: input not found")
  supported = "NIfTI (.nii, .nii.gz), h5 (.h5) or 2D images (" + ", ".join(folders2d.EXTENSIONS) + ")"
  if path.is_file():
    if input_kind(path) is None:
      raise DataError(f"{path}: unsupported input file; expected {supported}")
    return [path]
  files = {p for p in path.iterdir() if p.is_file() and input_kind(p) is not None}
  files.update(p for p in path.rglob(la.CASE_FILE) if p.is_file())
  if not files:
    raise DataError(f"{path}: no supported input files ({supported})")
  return sorted(files)


def output_name(path: pathlib.Path) -> str:
  """NIfTI and h5 -> <case>.nii.gz (LA's <ID>/mri_norm2.h5 -> <ID>.nii.gz); images -> <stem>.png."""
  kind = input_kind(path)
  if kind == "nifti":
    return msd.case_id_from_path(path) + ".nii.gz"
  if kind == "h5":
    return (path.parent.name if path.name == la.CASE_FILE else path.stem) + ".nii.gz"
  return path.stem + ".png"


def read_h5_image(path: pathlib.Path) -> np.ndarray:
  """The `image` dataset of an LA-style h5 file (a label is not needed)."""
  try:
    with h5py.File(path, "r") as f:
      image = f.get("image")
      if not isinstance(image, h5py.Dataset):
        raise DataError(f"{path}: no `image` dataset; found keys {sorted(f.keys())}")
      return np.asarray(image[()])
  except OSError as err:
    raise DataError(f"{path}: not a readable h5 file: {err}") from err


@dataclasses.dataclass(frozen=True)
class InputFile:
  """One input file, read: its unlabeled case and what writing its prediction needs.

  Attributes:
    case: image (*spatial, C) float32, preprocessed; label None, all modalities present, spacing 1.
    nifti: the NIfTI input (affine, header) for NIfTI files, else None.
    original_size: 2D files: the file's (H, W) before resizing, else None.
  """

  case: Case
  nifti: Optional[nib.spatialimages.SpatialImage] = None
  original_size: Optional[tuple[int, int]] = None


def read_input(path: pathlib.Path, data_cfg: ml_collections.ConfigDict,
               log: Callable[[str], None] = print) -> InputFile:
  """Reads one input as the training data was read: channels, resizing (2D), the channels of
  `data.modalities`, then clipping / z-scoring (`preprocess.normalised`). A constant channel of a
  multi-channel file is a modality the file lacks: marked missing, with a warning line to `log`
  (`preprocess.with_absent_modalities`).

  Raises:
    DataError: naming the file: unreadable, not 3D / 4D (NIfTI, h5), not real-valued, or without
      a channel `data.modalities` names (files are unnamed: "channel0", ...).
  """
  kind = input_kind(path)
  original_size = None
  nifti = None
  if kind == "nifti":
    nifti, data = msd._read_nifti(path, as_float=True)  # pylint: disable=protected-access
  elif kind == "h5":
    data = read_h5_image(path)
  else:
    data = folders2d._with_channels(  # pylint: disable=protected-access
        folders2d.read_image(path), data_cfg.get("channels", 0) or None)
    original_size = tuple(data.shape[:2])
    if data_cfg.get("image_size", ()):
      data = folders2d.resize_image(data, tuple(data_cfg.image_size))
  if kind != "image":
    if data.ndim == 3:
      data = data[..., np.newaxis]  # One modality; 4D NIfTI / h5 are already channels-last.
    if data.ndim != 4:
      raise DataError(f"{path}: image must be 3D (X, Y, Z) or 4D (X, Y, Z, C), got shape "
                      f"{data.shape}")
  if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
    raise DataError(f"{path}: image must be real-valued, got dtype {data.dtype}")
  case = Case(case_id=path.name, image=np.asarray(data, np.float32),
              label=None, spacing=(1.0,) * (data.ndim - 1), source=str(path))
  check_case(case)
  case = preprocess.with_absent_modalities(case, log)
  try:
    (case,) = preprocess.selected_modalities([case], data_cfg)
  except DataError as err:
    raise DataError(f"{path}: {err} (input files are unnamed: select channels by index or as "
                    "channel0, channel1, ...)") from err
  (case,) = preprocess.normalised([case], data_cfg)
  return InputFile(case=case, nifti=nifti, original_size=original_size)
