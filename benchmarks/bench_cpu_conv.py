"""CPU: a 3D UNet train step with XLA's native 3D convolutions vs. the z-stacked 2D form.

  python benchmarks/bench_cpu_conv.py [--features 8,16,32,64] [--patch 32,32,32] [--batch 3]

Prints the median fwd+bwd time of each implementation, measured in one run, and their ratio.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.models import get_model


def step_time(impl: str, features, patch, batch, repeats: int) -> float:
  """Median fwd+bwd seconds of a UNet whose 3D convolutions use `impl` (layers.Conv.impl)."""
  model = get_model("unet", num_classes=1, features=features, conv_impl=impl)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *patch, 1)), jnp.float32)
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(0))

  def loss(params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                         train=True, mutable=["batch_stats"])
    return jnp.mean(out ** 2)

  grad = jax.jit(jax.grad(loss))
  jax.block_until_ready(grad(variables["params"]))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(grad(variables["params"]))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--features", default="8,16,32,64")
  parser.add_argument("--patch", default="32,32,32")
  parser.add_argument("--batch", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  features = tuple(int(v) for v in args.features.split(","))
  patch = tuple(int(v) for v in args.patch.split(","))
  native = step_time("native", features, patch, args.batch, args.repeats)
  stacked = step_time("stacked2d", features, patch, args.batch, args.repeats)
  print(f"{jax.devices()[0].platform}: UNet{features} batch {args.batch} x {patch}, fwd+bwd median "
        f"of {args.repeats}: native 3D conv {native * 1e3:.1f} ms, stacked 2D {stacked * 1e3:.1f} ms, "
        f"speed-up {native / stacked:.2f}x")


if __name__ == "__main__":
  main()
