"""How BatchNorm layers normalise at evaluation and in --mode predict (`eval.batchnorm`).

  "running"    every BatchNorm layer uses its running statistics (eval mode), as trained networks
               are normally run; a method's predict function does this by itself.
  "per_image"  every BatchNorm layer normalises each evaluated image (each sliding-window window,
               each mirrored copy) by that image's own statistics over its spatial axes, and the
               running statistics are neither read nor updated. This is what a train-mode forward
               pass of one image at a time (batch size 1) computes, e.g. the released Duo-SegNet
               code, which never switches its networks to eval mode. Nothing else changes: dropout
               stays off, and the windows of one network call do not share statistics, so the
               result does not depend on eval.batch_size nor on the padding windows of the last
               call.

The switch is generic: `with_batchnorm(predict_fn, mode)` wraps any method's predict function,
and Flax's method interception (`flax.linen.intercept_methods`) replaces the computation of every
`nn.BatchNorm` layer that would use its running averages. The statistics are computed by Flax's own
BatchNorm code (`_compute_stats`, `_normalize`) with the spatial axes as the reduction axes, so
per-image evaluation equals a batch-1 train-mode forward of the same layer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import flax.linen as nn
import jax
from flax.linen import normalization as flax_norm

from jaxseg.data.base import DataError

# Flax's own BatchNorm statistics and normalisation, so that per-image evaluation computes exactly
# what a train-mode BatchNorm layer does.
# pylint: disable=protected-access

RUNNING, PER_IMAGE = "running", "per_image"
MODES = (RUNNING, PER_IMAGE)  # eval.batchnorm


def _running_average_call(context, args, kwargs) -> bool:
  """Whether this intercepted call is a BatchNorm's __call__ that would use its running averages
  (the module attribute merged with the call argument, as BatchNorm itself does)."""
  if not isinstance(context.module, nn.BatchNorm) or context.method_name != "__call__":
    return False
  argument = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  return bool(nn.merge_param("use_running_average", context.module.use_running_average, argument))


def per_image_batch_norm(module: nn.BatchNorm, x: jax.Array) -> jax.Array:
  """`module` (a bound nn.BatchNorm) applied to `x` (B, *spatial, C) with each sample's own
  statistics over its non-feature axes except the batch axis: sample b gets what `module` in train
  mode computes for the batch x[b:b+1]. The running statistics are not touched."""
  feature_axes = flax_norm._canonicalize_axes(x.ndim, module.axis)
  if 0 in feature_axes:
    raise ValueError("per-image BatchNorm needs the batch on axis 0, not a feature axis")
  per_sample_axes = tuple(i for i in range(1, x.ndim) if i not in feature_axes)
  mean, var = flax_norm._compute_stats(
      x, per_sample_axes, dtype=module.dtype, use_fast_variance=module.use_fast_variance,
      force_float32_reductions=module.force_float32_reductions)
  return flax_norm._normalize(
      module, x, mean, var, per_sample_axes, feature_axes, module.dtype, module.param_dtype,
      module.epsilon, module.use_bias, module.use_scale, module.bias_init, module.scale_init,
      module.force_float32_reductions)


def _per_image_interceptor(next_fun, args, kwargs, context):
  if not _running_average_call(context, args, kwargs):
    return next_fun(*args, **kwargs)
  if kwargs.get("mask") is not None or len(args) > 2:
    raise ValueError("per-image BatchNorm does not support a BatchNorm mask")
  x = args[0] if args else kwargs["x"]
  return per_image_batch_norm(context.module, x)


@dataclasses.dataclass(frozen=True)
class _PerImage:
  """`predict_fn(window_inputs)` with per-image BatchNorm; frozen (hashable by value), so that jit
  reuses its compilation."""

  def __call__(self, predict_fn: Callable[[dict], dict], window_inputs: dict) -> dict:
    with nn.intercept_methods(_per_image_interceptor):
      return predict_fn(window_inputs)


def check_mode(eval_cfg: Mapping) -> str:
  """`eval.batchnorm` of `eval_cfg` ("running" when the key is absent: configs of older runs)."""
  mode = eval_cfg.get("batchnorm", RUNNING)
  if mode not in MODES:
    raise DataError(f"config eval.batchnorm = {mode!r} must be one of {MODES}")
  return mode


def with_batchnorm(predict_fn: Callable[[dict], dict], mode: str) -> Callable[[dict], dict]:
  """`predict_fn` evaluated with BatchNorm mode `mode` (MODES): itself for "running"."""
  if mode == RUNNING:
    return predict_fn
  if mode != PER_IMAGE:
    raise DataError(f"config eval.batchnorm = {mode!r} must be one of {MODES}")
  fn = predict_fn if isinstance(predict_fn, jax.tree_util.Partial) else jax.tree_util.Partial(
      predict_fn)
  return jax.tree_util.Partial(_PerImage(), fn)


def runs_batchnorm(predict_fn: Callable[[dict], dict], spec: Mapping[str, jax.ShapeDtypeStruct]
                   ) -> bool:
  """Whether `predict_fn` on inputs of shapes `spec` runs a BatchNorm layer on its running
  averages, i.e. whether per-image BatchNorm changes anything (traced with jax.eval_shape; nothing
  is computed)."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if _running_average_call(context, args, kwargs):
      seen.append(context.module.name)
    return next_fun(*args, **kwargs)

  def traced(inputs):
    with nn.intercept_methods(record):
      return predict_fn(inputs)

  jax.eval_shape(traced, dict(spec))
  return bool(seen)


def check_runs_batchnorm(predict_fn: Callable[[dict], dict],
                         spec: Mapping[str, jax.ShapeDtypeStruct], mode: str) -> None:
  """Refuses eval.batchnorm = "per_image" for a predict function without BatchNorm layers."""
  if mode == PER_IMAGE and not runs_batchnorm(predict_fn, spec):
    raise DataError("config eval.batchnorm = 'per_image': the method's networks have no "
                    "BatchNorm layer run on its running statistics at evaluation, so there is "
                    "nothing to normalise per image; use eval.batchnorm = 'running'")
