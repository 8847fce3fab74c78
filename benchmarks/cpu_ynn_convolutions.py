"""CPU: a config's train step compiled with XLA's defaults against jaxseg's compiler options.

  python benchmarks/cpu_ynn_convolutions.py --config configs/supervised_vnet.py \
      --config.data.batch_labeled=2 --config.data.patch_size='(64,64,48)' [--steps 8 --warmup 1]

The same train step (the config's method, a random batch, one state) is compiled twice: with XLA's
default options, where XLA:CPU hands convolutions to YNNPACK, and with
`jaxseg.compiler_options.ynnpack_without_convolutions()` (YNNPACK for dots and reductions only),
which the trainer, evaluation and `jaxseg.bench` use for 3D configs (`jit_options`); a 2D config
shows why 2D ones keep XLA's defaults. The two steps then run one for one, the order swapped every
pair, and the script prints each one's median with its range, the median of the per-pair ratios and
the load average. Both steps start from the same state and batch every time (the state is not
donated), so they compute the same thing.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app
import jax

# The flags --config, --steps (timed pairs here), --warmup and --channels are jaxseg.bench's.
from jaxseg import bench, compiler_options, parallel, train


def main(argv) -> None:  # pylint: disable=protected-access
  del argv
  config = bench._CONFIG.value
  if jax.default_backend() != "cpu":
    sys.exit("error: this benchmark compares XLA:CPU options; JAX runs on "
             f"{jax.default_backend()}")
  options = compiler_options.ynnpack_without_convolutions()
  if options is None:
    sys.exit("error: this jaxlib refuses the XLA:CPU option; there is nothing to compare")
  method = train.load_method(config)
  mesh = parallel.make_mesh()
  state, key = train._initial_state(method, config, bench._CHANNELS.value, mesh)
  batch = jax.device_put(bench.random_batch(config, bench._CHANNELS.value), parallel.data_sharding(mesh))
  steps = {}
  for name, opts in (("XLA defaults", None), ("no YNNPACK convs", options)):
    start = time.perf_counter()
    compiled = jax.jit(method.train_step, compiler_options=opts).lower(state, batch, key).compile()
    print(f"compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)
    steps[name] = lambda compiled=compiled: jax.block_until_ready(compiled(state, batch, key))
  names = list(steps)
  for name in names:
    for _ in range(bench._WARMUP.value):
      steps[name]()
  load_before = os.getloadavg()[0]
  times = dict(zip(names, bench._alternated(*steps.values(), bench._STEPS.value)))
  load_after = os.getloadavg()[0]
  patch = "x".join(map(str, config.data.patch_size))
  print(f"{method.__name__.split('.')[-1]} train step, global batch "
        f"{config.data.batch_labeled + config.data.batch_unlabeled} of {patch}, jax {jax.__version__}, "
        f"{bench._STEPS.value} alternated pairs:")
  for name in names:
    t = times[name]
    print(f"  {name:17s} {1e3 * statistics.median(t):8.1f} ms median "
          f"(min {1e3 * min(t):.1f}, max {1e3 * max(t):.1f})")
  ratios = [a / b for a, b in zip(*times.values())]
  print(f"  defaults / ours {statistics.median(ratios):8.2f} median of the pairs (range "
        f"{min(ratios):.2f}-{max(ratios):.2f}); load average {load_before:.2f} before, "
        f"{load_after:.2f} after")


if __name__ == "__main__":
  app.run(main)
