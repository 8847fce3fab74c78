"""Packs LA 2018 cases losslessly for the device transfer (64 MiB per call).

The z-scored images hold at most 256 distinct float32 values (8-bit MRI), so each image is stored as a
lookup table plus uint8 codes (bz2), the label as bz2 bytes. unpack_la.py rebuilds the standard layout.
usage: pack_la.py SRC_ROOT OUT_DIR FIRST LAST   (indices into train.list, inclusive)
"""
import bz2, pathlib, sys
import h5py, numpy as np

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
first, last = int(sys.argv[3]), int(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
ids = (src / "train.list").read_text().split()
for i in range(first, last + 1):
  cid = ids[i]
  with h5py.File(src / "2018LA_Seg_Training Set" / cid / "mri_norm2.h5", "r") as h:
    image, label = h["image"][:], h["label"][:]
  lut = np.unique(image)
  assert lut.size <= 256, (cid, lut.size)
  codes = np.searchsorted(lut, image).astype(np.uint8)
  assert np.array_equal(lut[codes], image)
  np.savez(out / f"{cid}.npz", lut=lut, shape=np.array(image.shape),
           codes=np.frombuffer(bz2.compress(codes.tobytes(order="F"), 9), np.uint8),
           label=np.frombuffer(bz2.compress(label.tobytes(order="F"), 9), np.uint8))
