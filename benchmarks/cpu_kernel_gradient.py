"""CPU: the kernel gradient of a 3x3x3 convolution, XLA's against hand-written matmul forms.

  python benchmarks/cpu_kernel_gradient.py [--shape 2,64,64,48] [--channels 16] [--repeats 5]

The kernel gradient dK[a, b, e, c, o] = sum over voxels of x_pad[v + (a, b, e), c] * g[v, o] of a
stride-1 3x3x3 convolution with padding 1 (the V-Net's top level: batch 2 of 64x64x48, 16 -> 16
channels) computed as
- `xla`: the VJP of `layers.conv3d_as_stacked2d` as XLA compiles it (a windowed convolution), with
  XLA's default options and with `compiler_options.jit_options(3)` (no YNNPACK convolutions);
- `im2col`: the 27 shifted copies of x as one (27C, voxels) matrix times g (voxels, O);
- `taps`: 27 matmuls of a shifted copy of x (voxels, C) with g, contracting the voxels;
- `im2col_chunks`: the im2col matmul over 16 slabs of x in a `lax.scan`, each slab's copies small
  enough for the caches.
Each is checked against `xla` (relative max error printed) and timed in rounds that alternate the
forms; the medians over rounds are printed. The matmul forms were tried to close the gap to
PyTorch's kernel gradient and lost to XLA's convolution (README, "CPU speed").
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseg import compiler_options
from jaxseg.models.layers import conv3d_as_stacked2d

_TAPS = [(a, b, e) for a in range(3) for b in range(3) for e in range(3)]


def xla_kernel_gradient(x, g):
  kernel = jnp.zeros((3, 3, 3, x.shape[-1], g.shape[-1]), x.dtype)
  return jax.vjp(lambda k: conv3d_as_stacked2d(x, k, ((1, 1),) * 3), kernel)[1](g)[0]


def _shifted(x_pad, size):
  """The 27 shifted (N, *size, C) views of the padded x, in kernel order."""
  return [x_pad[:, a:a + size[0], b:b + size[1], e:e + size[2]] for a, b, e in _TAPS]


def im2col_kernel_gradient(x, g):
  n, *size, c = x.shape
  x_pad = jnp.pad(jnp.moveaxis(x, -1, 0), ((0, 0), (0, 0), (1, 1), (1, 1), (1, 1)))
  patches = jnp.concatenate([x_pad[:, :, a:a + size[0], b:b + size[1], e:e + size[2]].reshape(c, -1)
                             for a, b, e in _TAPS], 0)
  return (patches @ g.reshape(-1, g.shape[-1])).reshape(3, 3, 3, c, -1)


def taps_kernel_gradient(x, g):
  n, *size, c = x.shape
  x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  flat_g = g.reshape(-1, g.shape[-1])
  return jnp.stack([lax.dot_general(s.reshape(-1, c), flat_g, (((0,), (0,)), ((), ())))
                    for s in _shifted(x_pad, size)]).reshape(3, 3, 3, c, -1)


def im2col_chunks_kernel_gradient(x, g, chunks: int = 16):
  n, size_x, size_y, size_z, c = x.shape
  o = g.shape[-1]
  x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  rows = size_x // chunks

  def slab(total, i):
    x_slab = lax.dynamic_slice_in_dim(x_pad, i * rows, rows + 2, axis=1)
    patches = jnp.concatenate(_shifted(x_slab, (rows, size_y, size_z)), -1).reshape(-1, 27 * c)
    g_slab = lax.dynamic_slice_in_dim(g, i * rows, rows, axis=1).reshape(-1, o)
    return total + patches.T @ g_slab, None

  total, _ = lax.scan(slab, jnp.zeros((27 * c, o), x.dtype), jnp.arange(chunks))
  return total.reshape(3, 3, 3, c, o)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="2,64,64,48")
  parser.add_argument("--channels", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  shape = tuple(int(s) for s in args.shape.split(","))
  if shape[1] % 16:
    parser.error("--shape's x size must be a multiple of 16 (im2col_chunks' slabs)")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(*shape, args.channels)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(*shape, args.channels)), jnp.float32)
  forms = {
      "xla, XLA defaults": jax.jit(xla_kernel_gradient),
      "xla, jaxseg options": jax.jit(xla_kernel_gradient,
                                     compiler_options=compiler_options.jit_options(3)),
      "im2col": jax.jit(im2col_kernel_gradient),
      "taps": jax.jit(taps_kernel_gradient),
      "im2col_chunks": jax.jit(im2col_chunks_kernel_gradient),
  }
  want = forms["xla, XLA defaults"](x, g)
  errors = {}
  for name, fn in forms.items():
    got = fn(x, g)
    errors[name] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  times = {name: [] for name in forms}
  for _ in range(args.repeats):
    for name, fn in forms.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(x, g))
      times[name].append(time.perf_counter() - start)
  print(f"kernel gradient of a 3x3x3 convolution, {args.channels} -> {args.channels} channels at "
        f"{'x'.join(map(str, shape))}; jax {jax.__version__}; median of {args.repeats} rounds:")
  for name in forms:
    print(f"  {name:20s} {1e3 * statistics.median(times[name]):8.1f} ms  "
          f"(max relative error {errors[name]:.1e})")


if __name__ == "__main__":
  main()
