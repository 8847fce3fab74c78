"""2D image/mask folders (the data form of Duo-SegNet; docs/data.md, 2D image folders).

    root/
      images/   a.png  b.tif  ...
      masks/    a.png  b.png  ...

An image and its mask share a file stem; the extensions may differ (.png, .tif, .tiff, .jpg, .jpeg,
any case). Hidden files (".DS_Store", macOS "._a.png") and files with other extensions are ignored.
Cases come in sorted stem order (the Duo-SegNet reference used the unsorted `os.listdir` order,
which differs between machines).

Only this simple layout is supported. The DSB2018 nuclei set in its original form has one mask file
per nucleus (`<id>/images/<id>.png`, `<id>/masks/*.png`): merge the nucleus masks into one mask per
image first.

Image conventions (decisions):
- Channels follow the file: grayscale ("L", "I;16", "1", ...) gives C = 1, colour gives C = 3; the
  alpha channel is dropped; palette images are expanded to RGB. `channels=1` converts colour to
  gray (ITU-R 601 luma, as PIL's "L"), `channels=3` repeats gray 3 times. With `channels=None` all
  images of a folder must have the same C.
- Intensities: 8-bit / 255, 16-bit / 65535, bilevel {0, 1}; 32-bit float images are kept as stored.

Mask conventions (decisions):
- A mask is single-channel. An RGB(A) mask is accepted only when its R, G, B are equal (a gray mask
  saved as RGB); alpha is ignored. Palette ("P") masks give their palette indices.
- `num_classes == 2` (binary): foreground = value > 0, so 0/255 and 0/1 masks both give {0, 1}.
  JPEG masks carry compression noise that this turns into foreground: store masks losslessly.
- `num_classes > 2`: values are class indices and must lie in 0..num_classes-1.

Resizing (`size=(H, W)`): the image bilinearly (PIL, antialiased when shrinking, as torchvision's
`Resize` on PIL images), the mask by nearest neighbour. Duo-SegNet resized masks bilinearly and
thresholded them; nearest keeps class indices valid for multi-class masks.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from jaxseg.data.base import Case, DataError, check_case

PathLike = Union[str, os.PathLike]

IMAGE_DIR = "images"
MASK_DIR = "masks"
EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
SPACING = (1.0, 1.0)  # 2D image files carry no physical pixel size.
# ITU-R 601-2 luma weights, the ones PIL's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# What PIL raises for files it cannot identify, decode, or considers decompression bombs.
_IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_folder2d(root: PathLike, size: Optional[Sequence[int]] = None, num_classes: int = 2,
                  channels: Optional[int] = None) -> list[Case]:
  """Loads every image of root/images with its mask from root/masks, sorted by file stem.

  Args:
    root: folder holding `images/` and `masks/`.
    size: (H, W) to resize every image and mask to; None keeps the file's size.
    num_classes: 2 for binary masks (foreground = value > 0); > 2 to read values as class indices.
    channels: None to keep the file's channels (1 gray, 3 colour); 1 or 3 to force that many.

  Returns:
    One checked `Case` per image: image (H, W, C) float32, label (H, W) uint8 (int32 beyond 256
    classes), spacing (1.0, 1.0), no affine, case_id = the stem, source = the image path.

  Raises:
    DataError: naming the folder or file at fault: a missing images/ or masks/ folder, no images,
      an image without a mask or a mask without an image, two files with the same stem, an
      unreadable file, an RGB mask with unequal channels, image/mask shapes that differ (without
      resize), label values outside the classes, mixed channel counts; or naming the config key
      (`size`, `num_classes`, `channels`) when an argument is invalid.
  """
  root = pathlib.Path(root)
  _check_options(size, num_classes, channels)
  images = _files_by_stem(root / IMAGE_DIR)
  masks = _files_by_stem(root / MASK_DIR)
  if not images:
    raise DataError(f"{root / IMAGE_DIR}: no images ({', '.join(EXTENSIONS)})")
  _check_pairing(images, masks)
  cases = [_load_pair(stem, images[stem], masks[stem], size, num_classes, channels)
           for stem in sorted(images)]
  if channels is None:
    _check_same_channels(cases)
  return cases


def read_image(path: pathlib.Path) -> np.ndarray:
  """Reads a 2D image file as float32 (H, W, C), C = 1 (gray) or 3 (colour), see module doc."""
  with _open_image(path) as img:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
      return (np.asarray(img, dtype=np.float32) / 65535.0)[..., np.newaxis]
    if img.mode == "I":
      return _int32_image(np.asarray(img), path)[..., np.newaxis]
    if img.mode == "F":
      return np.asarray(img, dtype=np.float32)[..., np.newaxis]
    if img.mode == "1":
      return np.asarray(img, dtype=np.float32)[..., np.newaxis]
    if img.mode in ("L", "LA"):
      gray = np.asarray(img.convert("L"), dtype=np.float32)
      return (gray / 255.0)[..., np.newaxis]
    # RGB, RGBA, P, CMYK, YCbCr, ...: 8-bit colour; alpha dropped by the conversion.
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def read_mask(path: pathlib.Path) -> np.ndarray:
  """Reads a 2D mask file as int64 (H, W) of the stored values (not yet mapped to classes)."""
  with _open_image(path) as img:
    if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
      rgb = np.asarray(img.convert("RGB"))
      if not np.all(rgb == rgb[..., :1]):
        raise DataError(f"{path}: mask is colour (R, G, B differ); masks must be single-channel")
      return rgb[..., 0].astype(np.int64)
    if img.mode == "LA":
      return np.asarray(img.getchannel("L")).astype(np.int64)
    values = np.asarray(img)  # L, P (palette indices), 1, I;16, I, F.
  if np.issubdtype(values.dtype, np.floating):
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
      raise DataError(f"{path}: mask has non-integer values")
  return values.astype(np.int64)


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Bilinear resize of a float32 (H, W, C) image to (size[0], size[1], C), channel by channel."""
  height, width = size
  resized = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F")
                        .resize((width, height), Image.Resampling.BILINEAR))
             for c in range(image.shape[-1])]
  return np.stack(resized, axis=-1).astype(np.float32)


def resize_mask(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Nearest-neighbour resize of an (H, W) mask: output pixel centres sample the input grid."""
  height, width = size
  rows = _nearest_indices(mask.shape[0], height)
  cols = _nearest_indices(mask.shape[1], width)
  return mask[rows[:, np.newaxis], cols[np.newaxis, :]]


def soft_mask(root: PathLike, stem: str, size: Optional[Sequence[int]] = None) -> np.ndarray:
  """The soft (H, W) float32 mask in [0, 1] of the binary mask of `stem` in root/masks: foreground
  (value > 0) as 1.0, resized bilinearly to `size` like the images (`resize_image`); None keeps
  the file's size (then it is the binary mask itself). The released Duo-SegNet code resized its
  masks so and trained on the soft values; thresholded at 0.5 they are its test ground truth.

  Raises:
    DataError: naming the folder or file: no mask of that stem, an unreadable mask.
  """
  masks = _files_by_stem(pathlib.Path(root) / MASK_DIR)
  if stem not in masks:
    raise DataError(f"{pathlib.Path(root) / MASK_DIR}: no mask of stem {stem!r}")
  binary = (read_mask(masks[stem]) > 0).astype(np.float32)
  if size is None:
    return binary
  return np.clip(resize_image(binary[..., np.newaxis], size)[..., 0], 0.0, 1.0)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each output pixel centre: floor((i + 0.5) * n_in / n_out)."""
  return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def _check_options(size: Optional[Sequence[int]], num_classes: int,
                   channels: Optional[int]) -> None:
  if size is not None and (len(size) != 2 or any(int(s) != s or s < 1 for s in size)):
    raise DataError(f"size: must be (H, W) of positive integers, got {size!r}")
  if int(num_classes) != num_classes or num_classes < 2:
    raise DataError(f"num_classes: must be an integer >= 2, got {num_classes!r}")
  if channels not in (None, 1, 3):
    raise DataError(f"channels: must be None, 1 or 3, got {channels!r}")


def _files_by_stem(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Image files of `folder` by stem; hidden files and other extensions are ignored."""
  if not folder.is_dir():
    raise DataError(f"{folder}: folder not found")
  found: dict[str, pathlib.Path] = {}
  for path in folder.iterdir():
    if path.name.startswith(".") or path.suffix.lower() not in EXTENSIONS or not path.is_file():
      continue
    if path.stem in found:
      raise DataError(f"{path}: same stem as {found[path.stem]}; which one to use is ambiguous")
    found[path.stem] = path
  return found


def _check_pairing(images: dict[str, pathlib.Path], masks: dict[str, pathlib.Path]) -> None:
  """Every image has a mask and every mask an image; raises naming the first unpaired file."""
  for stem in sorted(images):
    if stem not in masks:
      raise DataError(f"{images[stem]}: image without a mask (stem {stem!r}) in "
                      f"{images[stem].parent.parent / MASK_DIR}")
  for stem in sorted(masks):
    if stem not in images:
      raise DataError(f"{masks[stem]}: mask without an image (stem {stem!r}) in "
                      f"{masks[stem].parent.parent / IMAGE_DIR}")


def _load_pair(stem: str, image_path: pathlib.Path, mask_path: pathlib.Path,
               size: Optional[Sequence[int]], num_classes: int, channels: Optional[int]) -> Case:
  """Reads, converts, resizes and checks one image/mask pair."""
  image = _with_channels(read_image(image_path), channels)
  mask = read_mask(mask_path)
  if size is None and mask.shape != image.shape[:2]:
    raise DataError(f"{image_path}: image size {image.shape[:2]} and mask size {mask.shape} "
                    f"(in {mask_path}) differ")
  label = _mask_to_classes(mask, num_classes, mask_path)
  if size is not None:
    image, label = resize_image(image, size), resize_mask(label, size)
  case = Case(case_id=stem, image=image, label=label, spacing=SPACING, affine=None,
              source=str(image_path))
  check_case(case, num_classes=num_classes)
  return case.replace(label=label.astype(np.uint8 if num_classes <= 256 else np.int32))


def _mask_to_classes(mask: np.ndarray, num_classes: int, path: pathlib.Path) -> np.ndarray:
  """Binary: value > 0 is foreground. Multi-class: values are class indices, checked."""
  if num_classes == 2:
    return (mask > 0).astype(np.int64)
  if mask.size and (mask.min() < 0 or mask.max() >= num_classes):
    found = np.unique(mask)
    outside = found[(found < 0) | (found >= num_classes)]
    raise DataError(f"{path}: mask values {outside.tolist()} are outside the classes "
                    f"0..{num_classes - 1}")
  return mask


def _with_channels(image: np.ndarray, channels: Optional[int]) -> np.ndarray:
  """Forces 1 (luma) or 3 (repeated gray) channels; None keeps the image as read."""
  if channels is None or image.shape[-1] == channels:
    return image
  if channels == 1:
    return (image @ _LUMA)[..., np.newaxis].astype(np.float32)
  return np.repeat(image, 3, axis=-1)


def _check_same_channels(cases: list[Case]) -> None:
  """With the file's own channels kept, a folder mixing gray and colour cannot be batched."""
  first = cases[0]
  for case in cases[1:]:
    if case.num_modalities != first.num_modalities:
      raise DataError(f"{case.source}: has {case.num_modalities} channel(s) but {first.source} has "
                      f"{first.num_modalities}; pass channels=1 or channels=3")


def _open_image(path: pathlib.Path) -> Image.Image:
  """Opens and decodes one single-frame image file (read-only), or raises naming it."""
  try:
    img = Image.open(path)
  except _IMAGE_READ_ERRORS as err:
    raise DataError(f"{path}: not a readable image: {err}") from err
  try:
    img.load()
  except _IMAGE_READ_ERRORS as err:
    img.close()
    raise DataError(f"{path}: not a readable image: {err}") from err
  num_frames = getattr(img, "n_frames", 1)
  if num_frames > 1:
    img.close()
    raise DataError(f"{path}: has {num_frames} frames; a 2D image must have one")
  return img


def _int32_image(values: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """A 32-bit integer ("I") image: 16-bit data held in 32 bits is scaled by 1/65535."""
  if values.size and (values.min() < 0 or values.max() > 65535):
    raise DataError(f"{path}: 32-bit integer image has values outside 0..65535; "
                    "only 8- and 16-bit integer images are supported")
  return values.astype(np.float32) / 65535.0
