"""Tests of jaxseg.models.kmax: the pure pieces against NumPy, one kMaX layer's E/M steps, self-attention
and FFN against a NumPy forward from the layer's own intermediates, the decoder's shapes and modes, and
the parameter count of one layer.

Tiny widths throughout (the machine is shared); variables come from `jax.eval_shape` + NumPy.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from jaxseg.models import get_model
from jaxseg.models.kmax import (BN_EPSILON, KMaXDecoder, KMaXLayer, centre_update_sum,
                                hard_assignment, multi_head_attention)

pytestmark = pytest.mark.usefixtures("fast_compile")

SMALL = dict(centre_dim=16, bottleneck_dim=12, key_dim=8, value_dim=12, num_heads=2, ffn_dim=20,
             pixel_head_dim=10, mask_dim=6)


def _gelu(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _numpy_variables(shapes, seed=0):
  """Kernels U(±3/√fan_in), biases and centres 0.1·N(0, 1), BN scales U(0.5, 1.5) (so the γ = 0
  BatchNorms are not zero); running means 0 and variances 1 (the initial statistics). (With smaller
  kernels the pixel-head bias dominates and every voxel picks the same centre.)"""
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = path[-1].key
    if path[0].key == "batch_stats":
      return jnp.full(leaf.shape, 0.0 if name == "mean" else 1.0, leaf.dtype)
    if name == "kernel":
      bound = 3 / math.sqrt(math.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)
    if name == "scale":
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return jnp.asarray(0.1 * rng.normal(size=leaf.shape), leaf.dtype)  # biases, centres

  return jax.tree_util.tree_map_with_path(value, shapes)


# ----------------------------------------------------------------------------------------------------
# (a)–(c) the pure pieces.


def test_hard_assignment_matches_numpy_argmax_including_ties():
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 3, size=(2, 3, 4, 5, 6)).astype(np.float32)  # many ties
  logits[0, 0, 0, 0] = 1.0  # all tied: the first index wins
  out = np.asarray(hard_assignment(jnp.asarray(logits)))
  expected = np.eye(6, dtype=np.float32)[np.argmax(logits, axis=-1)]
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(out[0, 0, 0, 0], np.eye(6)[0])
  assert out.dtype == np.float32


def test_hard_assignment_has_zero_gradient():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 4)), jnp.float32)
  weights = jnp.arange(40.0).reshape(2, 5, 4)
  loss = lambda s: jnp.sum(hard_assignment(s) * weights) + jnp.sum(hard_assignment(s * 3))  # noqa: E731
  grad = jax.grad(loss)(logits)
  np.testing.assert_array_equal(np.asarray(grad), np.zeros((2, 5, 4), np.float32))


def test_centre_update_sum_matches_a_loop_over_voxels():
  rng = np.random.default_rng(2)
  b, shape, n, c = 2, (3, 2, 4), 5, 7
  index = rng.integers(0, n, size=(b,) + shape)
  assignment = np.eye(n, dtype=np.float32)[index]
  values = rng.normal(size=(b,) + shape + (c,)).astype(np.float32)
  expected = np.zeros((b, n, c), np.float64)
  for i in range(b):
    for voxel in np.ndindex(*shape):
      expected[i, index[(i,) + voxel]] += values[(i,) + voxel]
  out = centre_update_sum(jnp.asarray(assignment), jnp.asarray(values))
  assert out.shape == (b, n, c) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
  # bf16 inputs are summed in float32.
  assert centre_update_sum(jnp.asarray(assignment, jnp.bfloat16),
                           jnp.asarray(values, jnp.bfloat16)).dtype == jnp.float32


def _numpy_attention(q, k, v, heads, normalise=lambda x: x):
  """Multi-head softmax attention (no scaling), channels split head-major; logits (B, L, M, h)."""
  b, l, dk = q.shape
  m, dv = k.shape[1], v.shape[-1]
  out = np.zeros((b, l, dv))
  logits = np.zeros((b, l, m, heads))
  for h in range(heads):
    qs = slice(h * dk // heads, (h + 1) * dk // heads)
    for i in range(b):
      logits[i, :, :, h] = q[i, :, qs] @ k[i, :, qs].T
  weights = _softmax(normalise(logits), axis=2)
  for h in range(heads):
    vs = slice(h * dv // heads, (h + 1) * dv // heads)
    for i in range(b):
      out[i, :, vs] = weights[i, :, :, h] @ v[i, :, vs]
  return out


def test_multi_head_attention_matches_numpy():
  rng = np.random.default_rng(3)
  q, k = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 5, 8))
  v = rng.normal(size=(2, 5, 12))
  out = multi_head_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                             jnp.asarray(v, jnp.float32), num_heads=4)
  np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, 4), rtol=1e-5, atol=1e-5)
  # A per-head affine map on the logits (what a BatchNorm over the heads does).
  scale, shift = rng.uniform(0.5, 1.5, 4), rng.normal(size=4)
  out = multi_head_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                             jnp.asarray(v, jnp.float32), num_heads=4,
                             normalise_logits=lambda s: s * scale + shift)
  np.testing.assert_allclose(np.asarray(out),
                             _numpy_attention(q, k, v, 4, lambda s: s * scale + shift),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="divisible"):
    multi_head_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), num_heads=5)


# ----------------------------------------------------------------------------------------------------
# (d) one kMaX layer against NumPy from its own intermediates (eval mode, initial statistics).


@pytest.fixture(scope="module")
def layer_run():
  layer = KMaXLayer(**SMALL)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 4, 3, 4, 5)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(2, 7, SMALL["centre_dim"])), jnp.float32)
  shapes = jax.eval_shape(functools.partial(layer.init, train=False), jax.random.key(0), x, z)
  variables = _numpy_variables(shapes)
  apply = jax.jit(functools.partial(layer.apply, train=False, mutable=["intermediates"]))
  out, state = apply(variables, x, z)
  inter = jax.tree.map(lambda a: np.asarray(a, np.float64), state["intermediates"])
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  return dict(x=np.asarray(x, np.float64), z=np.asarray(z, np.float64), out=np.asarray(out),
              inter=inter, params=params)


def _bn(x, p):
  """Eval-mode BatchNorm at the initial statistics (mean 0, variance 1)."""
  return x / np.sqrt(1.0 + BN_EPSILON) * p["scale"] + p["bias"]


def test_layer_projections(layer_run):
  p, inter, x, z = layer_run["params"], layer_run["inter"], layer_run["x"], layer_run["z"]
  pixel = _gelu(_bn(_gelu(x) @ p["pixel_proj"]["kernel"], p["pixel_proj_bn"]))
  query = _gelu(_bn(z @ p["query_proj"]["kernel"], p["query_proj_bn"]))
  values = _bn(pixel @ p["value_proj"]["kernel"], p["value_proj_bn"])
  np.testing.assert_allclose(inter["pixel_space"][0], pixel, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(inter["query_space"][0], query, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(inter["pixel_values"][0], values, rtol=1e-4, atol=1e-5)


def test_layer_e_step(layer_run):
  p, inter = layer_run["params"]["predictor"], layer_run["inter"]
  f = inter["predictor"]["pixel_embedding"][0]
  np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, rtol=1e-5)
  kernel = _bn(inter["query_space"][0] @ p["mask_head"]["kernel"], p["mask_head_bn"])
  np.testing.assert_allclose(inter["predictor"]["mask_kernel"][0], kernel, rtol=1e-4, atol=1e-5)
  logits = _bn(np.einsum("bxyzc,bnc->bxyzn", f, kernel)[..., None], p["logits_bn"])[..., 0]
  np.testing.assert_allclose(inter["mask_logits"][0], logits, rtol=1e-4, atol=1e-5)
  assignment = np.eye(logits.shape[-1])[np.argmax(inter["mask_logits"][0], axis=-1)]
  np.testing.assert_array_equal(inter["assignment"][0], assignment)
  used = assignment.reshape(assignment.shape[0], -1, assignment.shape[-1]).sum(1) > 0
  assert np.all(used.sum(-1) >= 3)  # the voxels are spread over several centres


def test_layer_m_step_attention_and_ffn(layer_run):
  p, inter, z = layer_run["params"], layer_run["inter"], layer_run["z"]
  a, v = inter["assignment"][0], inter["pixel_values"][0]
  b, n = z.shape[:2]
  summed = np.einsum("bvn,bvc->bnc", a.reshape(b, -1, n), v.reshape(b, -1, v.shape[-1]))
  update = _bn(_bn(summed, p["kmeans_sum_bn"]) @ p["kmeans_out"]["kernel"], p["kmeans_out_bn"])
  np.testing.assert_allclose(inter["kmeans_update"][0], update, rtol=1e-4, atol=1e-4)
  z = z + update

  # Self-attention from the pre-update Q.
  qkv = _bn(inter["query_space"][0] @ p["qkv"]["kernel"], p["qkv_bn"])
  kd = SMALL["key_dim"]
  q, k, val = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
  o = _numpy_attention(q, k, val, SMALL["num_heads"], lambda s: _bn(s, p["attention_logits_bn"]))
  o = _gelu(_bn(o, p["attention_values_bn"]))
  z = _gelu(z + _bn(o @ p["attention_out"]["kernel"], p["attention_out_bn"]))
  h = _gelu(_bn(z @ p["ffn1"]["kernel"], p["ffn1_bn"]))
  z = _gelu(z + _bn(h @ p["ffn2"]["kernel"], p["ffn2_bn"]))
  assert layer_run["out"].dtype == np.float32
  np.testing.assert_allclose(layer_run["out"], z, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# (e) the decoder.


def _decoder_inputs(b=2):
  rng = np.random.default_rng(5)
  features = [jnp.asarray(rng.normal(size=(b, 2, 2, 2, 9)), jnp.float32),
              jnp.asarray(rng.normal(size=(b, 4, 4, 4, 7)), jnp.float32),
              jnp.asarray(rng.normal(size=(b, 4, 4, 8, 5)), jnp.float32)]
  final = jnp.asarray(rng.normal(size=(b, 8, 8, 8, 3)), jnp.float32)
  return features, final


def test_decoder_shapes_modes_and_batch_stats():
  decoder = get_model("kmax_decoder", num_centres=4, layers_per_scale=1, **SMALL)
  assert isinstance(decoder, KMaXDecoder)
  features, final = _decoder_inputs()
  shapes = jax.eval_shape(functools.partial(decoder.init, train=False), jax.random.key(0),
                          features, final)
  assert sorted(k for k in shapes["params"] if k.startswith("layer_")) == [
      "layer_0_0", "layer_1_0", "layer_2_0"]
  assert shapes["params"]["centres"].shape == (4, SMALL["centre_dim"])
  variables = _numpy_variables(shapes)
  eval_out = jax.eval_shape(functools.partial(decoder.apply, train=False), variables, features,
                            final)
  assert eval_out["mask_logits"].shape == (2, 8, 8, 8, 4)
  assert eval_out["mask_logits"].dtype == jnp.float32
  assert eval_out["centres"].shape == (2, 4, SMALL["centre_dim"])

  apply = jax.jit(functools.partial(decoder.apply, train=True, mutable=["batch_stats"]))
  out, updates = apply(variables, features, final)
  assert out["mask_logits"].shape == (2, 8, 8, 8, 4) and out["mask_logits"].dtype == jnp.float32
  assert out["centres"].shape == (2, 4, SMALL["centre_dim"]) and out["centres"].dtype == jnp.float32
  assert np.isfinite(np.asarray(out["mask_logits"])).all()
  assert np.isfinite(np.asarray(out["centres"])).all()
  changed = jax.tree.map(lambda new, old: bool(np.any(np.asarray(new) != np.asarray(old))),
                         updates["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(changed))
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_decoder_default_structure_and_dtype():
  """Default widths and 2 layers per scale, bf16 compute: shapes only (no compile)."""
  decoder = KMaXDecoder(num_centres=32, dtype=jnp.bfloat16)
  features = [jax.ShapeDtypeStruct((1, 2, 2, 2, 384), jnp.float32),
              jax.ShapeDtypeStruct((1, 4, 4, 4, 192), jnp.float32),
              jax.ShapeDtypeStruct((1, 8, 8, 8, 96), jnp.float32)]
  final = jax.ShapeDtypeStruct((1, 16, 16, 16, 48), jnp.float32)
  variables = jax.eval_shape(functools.partial(decoder.init, train=False), jax.random.key(0),
                             features, final)
  assert sorted(k for k in variables["params"] if k.startswith("layer_")) == [
      f"layer_{i}_{j}" for i in range(3) for j in range(2)]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  out = jax.eval_shape(functools.partial(decoder.apply, train=False), variables, features, final)
  assert out["mask_logits"].shape == (1, 16, 16, 16, 32)
  assert out["mask_logits"].dtype == jnp.float32
  assert out["centres"].dtype == jnp.float32


# ----------------------------------------------------------------------------------------------------
# (f) parameter count of one layer, by hand.


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_layer_parameter_count():
  c_x, d, bn_, kd, vd, h, ffn, ph, md = 5, 16, 12, 8, 12, 2, 20, 10, 6
  assert (d, bn_, kd, vd, h, ffn, ph, md) == tuple(SMALL.values())
  layer = KMaXLayer(**SMALL)
  shapes = jax.eval_shape(functools.partial(layer.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 4, 4, 4, c_x)), jnp.zeros((1, 3, d)))
  bn = lambda c: 2 * c  # noqa: E731  (γ, β)
  expected_predictor = (
      125 * bn_ + bn(bn_)            # depthwise 5³ conv (no bias) + BN
      + bn_ * ph + bn(ph)            # 1³ conv (no bias) + BN
      + ph * md + md + bn(md)        # 1³ conv with bias + BN
      + bn_ * md + bn(md)            # mask head (no bias) + BN
      + bn(1))                       # logits BN over a singleton channel
  expected = (
      c_x * bn_ + bn(bn_)                          # pixel projection
      + d * bn_ + bn(bn_)                          # query projection
      + bn_ * vd + bn(vd)                          # pixel values
      + expected_predictor
      + bn(vd) + vd * d + bn(d)                    # M-step: BN(Aᵀ V), Dense, BN
      + bn_ * (2 * kd + vd) + bn(2 * kd + vd)      # qkv
      + bn(h) + bn(vd)                             # BN on the logits (per head) and on the values
      + vd * d + bn(d)                             # attention output
      + d * ffn + bn(ffn) + ffn * d + bn(d))       # FFN
  assert _count(shapes["params"]["predictor"]) == expected_predictor
  assert _count(shapes["params"]) == expected
  # Running statistics: one mean and one variance per BN channel.
  assert _count(shapes["batch_stats"]) == 2 * sum(
      math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"])
      if path[-1].key == "scale")


def test_full_size_parameter_counts():
  """The counts of docs/networks.md (eval_shape only): DK-UXNet's inputs 384/192/96, final 48."""
  features = [jax.ShapeDtypeStruct((1, 2, 2, 2, c), jnp.float32) for c in (384, 192, 96)]
  final = jax.ShapeDtypeStruct((1, 4, 4, 4, 48), jnp.float32)
  for n, total in ((32, 10_197_950), (128, 10_222_526)):
    variables = jax.eval_shape(functools.partial(KMaXDecoder(num_centres=n).init, train=False),
                               jax.random.key(0), features, final)
    params = variables["params"]
    assert _count(params) == total
    assert [_count(params[f"layer_{i}_0"]) for i in range(3)] == [1_714_066, 1_664_914, 1_640_338]
    assert _count(params["predictor"]) == 85_074
