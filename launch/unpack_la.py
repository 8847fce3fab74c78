"""Rebuilds the standard LA layout from pack_la.py's files. usage: unpack_la.py PACKED_DIR ROOT"""
import bz2, pathlib, sys
from concurrent.futures import ProcessPoolExecutor
import h5py, numpy as np

def one(args):
  f, root = args
  z = np.load(f)
  shape = tuple(int(s) for s in z["shape"])
  codes = np.frombuffer(bz2.decompress(z["codes"].tobytes()), np.uint8).reshape(shape, order="F")
  label = np.frombuffer(bz2.decompress(z["label"].tobytes()), np.uint8).reshape(shape, order="F")
  d = root / "2018LA_Seg_Training Set" / f.stem
  d.mkdir(parents=True, exist_ok=True)
  with h5py.File(d / "mri_norm2.h5", "w") as h:
    h["image"] = z["lut"][codes]
    h["label"] = label
  return f.stem

if __name__ == "__main__":
  src, root = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
  with ProcessPoolExecutor(8) as ex:
    n = len(list(ex.map(one, [(f, root) for f in sorted(src.glob("*.npz"))])))
  print(f"unpacked {n} cases into {root}")
