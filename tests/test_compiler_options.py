"""Tests of jaxseg.compiler_options: the XLA:CPU options of jaxseg's jits change no result."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import compiler_options, inference
from jaxseg.models import layers


def ynnpack_convolutions(hlo: str) -> int:
  """How many YNNPACK fusions of an optimised HLO module compute a convolution."""
  bodies = dict(re.findall(r"^%(\S+) .*?\{\n(.*?)^\}", hlo, flags=re.M | re.S))
  called = re.findall(r"fusion\(.*kind=kCustom, calls=%(\S+?),.*__ynn_fusion", hlo)
  return sum("convolution(" in bodies.get(name, "") for name in called)


def test_3d_on_cpu_gets_ynnpack_without_convolutions_and_the_rest_nothing(monkeypatch):
  assert jax.default_backend() == "cpu"
  assert compiler_options.jit_options(3) == {
      "xla_cpu_experimental_ynn_fusion_type": compiler_options.YNN_FUSION_TYPES}
  assert compiler_options.jit_options(2) is None
  assert compiler_options.ynnpack_without_convolutions() == compiler_options.jit_options(3)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert compiler_options.jit_options(3) is None


def test_an_option_this_jaxlib_refuses_is_left_out(monkeypatch):
  assert not compiler_options._accepted("xla_cpu_experimental_ynn_fusion_type",
                                        "LIBRARY_FUSION_TYPE_NO_SUCH_TYPE")
  monkeypatch.setattr(compiler_options, "YNN_FUSION_TYPES", "LIBRARY_FUSION_TYPE_NO_SUCH_TYPE")
  assert compiler_options.ynnpack_without_convolutions() is None
  assert compiler_options.jit_options(3) is None


def test_the_options_take_convolutions_from_ynnpack_and_keep_the_results():
  # A z-stacked 3x3x3 convolution (the CPU form of our 3D convolutions) with both gradients.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 12, 12, 8, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 8, 8)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(2, 12, 12, 8, 8)), jnp.float32)

  def step(x, kernel):
    """The convolution and its two backward convolutions (the input and kernel gradients)."""
    y, vjp = jax.vjp(lambda x, k: layers.conv3d_as_stacked2d(x, k, ((1, 1),) * 3), x, kernel)
    return y, *vjp(weights)

  default = jax.jit(step).lower(x, kernel).compile()
  ours = jax.jit(step, compiler_options=compiler_options.jit_options(3)).lower(x, kernel).compile()
  assert ynnpack_convolutions(default.as_text()) > 0  # What the options change, on jaxlib 0.10.
  assert ynnpack_convolutions(ours.as_text()) == 0
  for want, got in zip(jax.tree.leaves(default(x, kernel)), jax.tree.leaves(ours(x, kernel))):
    # Sums of 216 (output, input gradient) to 2304 (kernel gradient) products in float32, in
    # another order: equal to a few ulps of the largest entry.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_sliding_window_inference_compiles_with_the_options():
  assert inference.sliding_window_jit(3) is inference.sliding_window_jit(3)
  image = np.random.default_rng(0).normal(size=(6, 5, 4, 1)).astype(np.float32)
  probs = inference.sliding_window_predict(lambda w: jax.nn.sigmoid(w[..., :1]), image, (4, 4, 4),
                                           (2, 2, 2), batch_size=2)
  np.testing.assert_allclose(probs, jax.nn.sigmoid(image[..., :1]), rtol=1e-6)


def test_sliding_window_inference_inside_a_callers_jit():
  # JAX refuses options on a nested jit: there the caller's compilation decides them.
  image = np.random.default_rng(0).normal(size=(6, 5, 4, 1)).astype(np.float32)

  def predict(scale):
    return inference.sliding_window_predict(lambda w: jax.nn.sigmoid(scale * w[..., :1]), image,
                                            (4, 4, 4), (2, 2, 2), batch_size=2)

  np.testing.assert_allclose(jax.jit(predict)(2.0), jax.nn.sigmoid(2.0 * image[..., :1]), rtol=1e-6)
