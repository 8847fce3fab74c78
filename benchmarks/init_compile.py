"""Compile time of a config's jitted `method.init`, with JAX's rolled Threefry lowering on CPU or
jaxseg's unrolled one (`jaxseg.prng_lowering`), and what the lowered init holds.

  python benchmarks/init_compile.py configs/supervised.py rolled
  python benchmarks/init_compile.py configs/supervised.py unrolled

One process per measurement (the persistent cache is off); alternate the two in rounds. Prints the
lowering and compile seconds, the convolutions and while loops of the lowered program (the forward
pass that flax traces for the shapes is dead code: 0 convolutions) and the 1-minute load average.
"""

import importlib.util
import os
import sys
import time

import jax

from jaxseg import prng_lowering, train


def main() -> None:
  path, mode = sys.argv[1], sys.argv[2]
  if mode not in ("rolled", "unrolled"):
    sys.exit(f"error: mode {mode!r} is not rolled or unrolled")
  jax.config.update("jax_enable_compilation_cache", False)
  file, _, preset = path.partition(":")
  spec = importlib.util.spec_from_file_location("config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(preset)
  method = train.checked_method(config)
  example = train.example_batch(config, 1)
  init = jax.jit(lambda key: method.init(key, config, example))
  start = time.perf_counter()
  if mode == "unrolled":
    with prng_lowering.unrolled_threefry():
      lowered = init.lower(jax.random.PRNGKey(0))
  else:
    lowered = init.lower(jax.random.PRNGKey(0))
  lowered_at = time.perf_counter()
  lowered.compile()
  compiled_at = time.perf_counter()
  text = lowered.as_text()
  print(f"{path} {mode}: lower {lowered_at - start:.2f} s, compile {compiled_at - lowered_at:.2f} s, "
        f"convolutions {text.count('stablehlo.convolution')}, while loops "
        f"{text.count('stablehlo.while')}, load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
  main()
