"""XLA compiler options of jaxseg's jitted programs: the train step, evaluation and the benchmark.

On the CPU backend, XLA hands convolutions, dots and reductions to YNNPACK by default (jaxlib 0.10).
For the convolutions of our 3D networks (stride-1 3x3x3 ones computed as z-stacked 2D convolutions,
`layers.conv3d_as_stacked2d`, and their two gradients) YNNPACK is slower than XLA's own Eigen
convolutions on the 2-core AMD EPYC (AVX-512) we measured on, up to 2x for the 32-channel ones: the
V-Net train step at batch 2 of 64x64x48, width 16, takes 1868 ms with YNNPACK convolutions and
1426 ms without, 1.28x (`benchmarks/cpu_ynn_convolutions.py`, alternated in one process, commit
081785d; it runs on any machine). So on the CPU the jits of 3D programs keep YNNPACK for
dots and reductions (both faster there than without it) and take it away from convolutions. 2D
programs keep XLA's defaults: the 2D UNet step of configs/supervised.py is 4 % faster with YNNPACK
convolutions (the same benchmark, which also runs 2D configs; figures in the README, "CPU speed").

The option is experimental in XLA and may be renamed or dropped: `jit_options` probes it once by
compiling a one-op program and leaves XLA's defaults alone when the probe is refused, so a newer jaxlib
never fails on it. GPU and TPU get no options. Results do not depend on it beyond float summation
order (tests/test_compiler_options.py).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["YNN_FUSION_TYPES", "jit_options", "ynnpack_without_convolutions"]

# XLA:CPU's default YNNPACK fusion types, as observed on jaxlib 0.10.2, without
# LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
_OPTION = "xla_cpu_experimental_ynn_fusion_type"


@functools.cache
def _accepted(option: str, value: str) -> bool:
  """Whether this jaxlib's CPU compiler takes `option=value` (compiles a one-op program)."""
  try:
    jax.jit(jnp.negative).lower(jnp.zeros((1,), jnp.float32)).compile({option: value})
  except Exception:  # pylint: disable=broad-except  # Refused options raise JaxRuntimeError.
    return False
  return True


def ynnpack_without_convolutions() -> Optional[dict[str, str]]:
  """The XLA:CPU compiler options that keep convolutions from YNNPACK, or None where this jaxlib
  refuses them."""
  return {_OPTION: YNN_FUSION_TYPES} if _accepted(_OPTION, YNN_FUSION_TYPES) else None


def jit_options(spatial_dims: int) -> Optional[dict[str, str]]:
  """The `compiler_options` for `jax.jit` of a program on images of `spatial_dims` dimensions, on
  JAX's default backend: for 3D on CPU, `ynnpack_without_convolutions()`; None (XLA's defaults)
  otherwise."""
  if spatial_dims != 3 or jax.default_backend() != "cpu":
    return None
  return ynnpack_without_convolutions()
