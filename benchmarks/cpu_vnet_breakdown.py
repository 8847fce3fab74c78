"""Where the V-Net step's time goes on a CPU, JAX against PyTorch (needs torch: the `bench` extra).

  python benchmarks/cpu_vnet_breakdown.py [--batch 2] [--patch 64,64,48] [--n_filters 16]
  XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/cpu_vnet_breakdown.py   # an XLA variant

Prints, median of 3 after one untimed call, in one run:
- the whole V-Net (eval-mode forward, train-mode forward, train-mode forward + backward of a mean
  square loss) in JAX as the trainer runs it on CPU (`auto`: z-stacked 3x3x3 convolutions,
  down-sampling and 1x1 convolutions as matmuls, compiled with `compiler_options.jit_options(3)`),
  the same convolutions with XLA's default options (`stacked2d`: YNNPACK convolutions), and the
  3x3x3 convolutions as XLA's native 3D convolution (`native`, default options); and in PyTorch;
- one 3x3x3 convolution per V-Net level (batch x patch / 2^level, C -> C channels): JAX stacked
  forward, input gradient and kernel gradient (with jaxseg's options), and PyTorch forward and
  forward + backward.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxseg import bench_torch, compiler_options
from jaxseg.models import get_model
from jaxseg.models.layers import conv3d_as_stacked2d
from timing import median_seconds  # benchmarks/timing.py, beside this script


def median_ms(fn, repeats: int = 3) -> float:
  """Median milliseconds of `fn` after one untimed call (compilation, warm-up)."""
  jax.block_until_ready(fn())
  return 1e3 * median_seconds(lambda: jax.block_until_ready(fn()), repeats)[0]


def jax_vnet(impl: str, x: np.ndarray, n_filters: int) -> tuple[float, float, float]:
  model = get_model("vnet", num_classes=2, n_filters=n_filters, conv_impl=impl)
  jit = functools.partial(jax.jit, compiler_options=compiler_options.jit_options(3)
                          if impl == "auto" else None)
  x = jnp.asarray(x)
  variables = jax.jit(lambda k: model.init({"params": k, "dropout": k}, x, train=False))(
      jax.random.PRNGKey(0))

  def loss(params, x):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                         mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
    return jnp.mean(out ** 2)

  forward_eval = jit(lambda v, x: model.apply(v, x, train=False))
  forward_train, grad = jit(loss), jit(jax.grad(loss))
  return (median_ms(lambda: forward_eval(variables, x)),
          median_ms(lambda: forward_train(variables["params"], x)),
          median_ms(lambda: grad(variables["params"], x)))


def torch_vnet(x: np.ndarray, n_filters: int) -> tuple[float, float, float]:
  model = bench_torch.TorchVNet(x.shape[-1], 2, n_filters, "batchnorm", has_dropout=True)
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))

  def backward():
    model.zero_grad()
    (model(x) ** 2).mean().backward()

  model.eval()
  with torch.no_grad():
    forward_eval = median_ms(lambda: model(x))
  model.train()
  with torch.no_grad():
    forward_train = median_ms(lambda: model(x))
  return forward_eval, forward_train, median_ms(backward)


def conv_level(shape: tuple[int, ...], channels: int, rng) -> str:
  x = jnp.asarray(rng.normal(size=(*shape, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, channels, channels)), jnp.float32)
  conv = lambda x, k: conv3d_as_stacked2d(x, k, ((1, 1),) * 3)
  g = jnp.ones_like(conv(x, kernel))
  jit = functools.partial(jax.jit, compiler_options=compiler_options.jit_options(3))
  forward = jit(conv)
  dx = jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g))
  dk = jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g))
  tx = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1))).requires_grad_()
  tconv = torch.nn.Conv3d(channels, channels, 3, padding=1)
  tg = torch.ones_like(tconv(tx))

  def torch_backward():
    tx.grad = None
    tconv.zero_grad()
    tconv(tx).backward(tg)

  with torch.no_grad():
    torch_forward = median_ms(lambda: tconv(tx))
  return (f"{'x'.join(map(str, shape))} x {channels} ch: JAX fwd {median_ms(lambda: forward(x, kernel)):.1f}, "
          f"d input {median_ms(lambda: dx(x, kernel, g)):.1f}, d kernel "
          f"{median_ms(lambda: dk(x, kernel, g)):.1f} ms; PyTorch fwd {torch_forward:.1f}, "
          f"fwd+bwd {median_ms(torch_backward):.1f} ms")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--patch", default="64,64,48")
  parser.add_argument("--n_filters", type=int, default=16)
  args = parser.parse_args()
  patch = tuple(int(p) for p in args.patch.split(","))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.batch, *patch, 1)).astype(np.float32)
  print(f"V-Net width {args.n_filters}, batch {args.batch} of {'x'.join(map(str, patch))}; "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        "ms: eval forward / train forward / train forward+backward")
  for impl in ("auto", "stacked2d", "native"):
    print(f"  JAX {impl:9s} " + " / ".join(f"{t:.0f}" for t in jax_vnet(impl, x, args.n_filters)))
  print("  PyTorch       " + " / ".join(f"{t:.0f}" for t in torch_vnet(x, args.n_filters)))
  print("one 3x3x3 convolution per level:")
  for level in range(4):
    shape = (args.batch, *(p // 2 ** level for p in patch))
    print("  " + conv_level(shape, args.n_filters * 2 ** level, rng))


if __name__ == "__main__":
  main()
