"""Optimisers and learning-rate schedules with PyTorch's semantics, built from one config block.

`optimizer_config()` gives the block (`config.method.optimizer` and its siblings), with PyTorch's
defaults; `make_optimizer(cfg)` builds the `optax.GradientTransformation`; `learning_rate(state)`
reads back the rate the latest update used (for logging). Bad settings raise `DataError` naming
the key, and `check_optimizer_config` raises them without building anything, so that a method can
fail before any data is loaded.

The update rules are those of torch.optim (the reference implementations are PyTorch scripts):

  sgd      buf = m·buf + g;  g = g + m·buf if nesterov else buf;  p -= lr·g
  adam     bias-corrected Adam, p -= lr·m̂ / (√v̂ + eps)
  adamw    p -= lr·wd·p, then the Adam step (decoupled decay, torch.optim.AdamW)
  rmsprop  v = α·v + (1-α)·g²;  buf = m·buf + g / (√v + eps) (eps outside the root);  p -= lr·buf

For sgd, adam and rmsprop `weight_decay` is coupled L2, g = g + wd·p before the rule, as in torch.
adamw's decay is scaled by the rate of the step (optax.adamw computes -lr·(adam + wd·p), which is
torch's p·(1 - lr·wd) - lr·adam). `clip_grad_norm` is torch.nn.utils.clip_grad_norm_ called before
`optimizer.step()`: g·min(1, c / (‖g‖ + 1e-6)) over all parameters, before the weight decay.
Parameter paths are the '/'-joined keys of the parameter tree, e.g. "encoder/conv1/kernel"; the
regexes of `lr_multipliers` and `weight_decay_mask` are matched with `re.search` on them (each must
match some parameter; `make_optimizer(...).init` raises otherwise). A rate multiplier m is a torch
param group with lr = m·lr: the schedule, and adamw's decay, scale with it.

Methods build their optimisers with `method_optimizer(config, "optimizer")`, which takes T of poly
and cosine from `config.train.num_steps` and names the block in the messages;
`check_method_optimizers(config)` checks all of a method's blocks before any data is read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxseg.data.base import DataError

NAMES = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "poly", "cosine")

# The multi_transform group of parameters no `lr_multipliers` pattern matches (multiplier 1).
_UNSCALED = "unscaled"

# Numeric fields: (accepts the value, what the message says it must be).
_RANGES = {
    "learning_rate": (lambda v: v >= 0, ">= 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eps": (lambda v: v >= 0, ">= 0"),
    "alpha": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "decay_factor": (lambda v: v > 0, "> 0"),
    "poly_power": (lambda v: v > 0, "> 0"),
    "min_learning_rate": (lambda v: v >= 0, ">= 0"),
    "clip_grad_norm": (lambda v: v >= 0, ">= 0"),
}
_COUNTS = ("decay_every", "total_steps", "warmup_steps")  # Steps: integers >= 0.


def optimizer_config(name: str = "sgd", learning_rate: float = 0.01, **changes
                     ) -> ml_collections.ConfigDict:
  """An optimiser block with every field `make_optimizer` reads, PyTorch's defaults for `name`.

  Fields (steps count optimiser updates, t = 0 for the first):
    name: sgd | adam | adamw | rmsprop.
    learning_rate: the base rate lr.
    momentum: sgd and rmsprop (adam ignores it). 0.9 (this repository's SGD), 0.0 for rmsprop
      (torch.optim.RMSprop's default; the optimiser code before this module ignored rmsprop's
      momentum, which is now applied as torch does).
    nesterov: sgd only, needs momentum > 0 (as torch).
    weight_decay: wd; coupled L2 for sgd/adam/rmsprop, decoupled for adamw (default 0.01 there,
      torch.optim.AdamW's; 0.0 otherwise).
    beta1, beta2, eps: Adam's (0.9, 0.999, 1e-8); `eps` is also RMSprop's.
    alpha: RMSprop's decay of the squared-gradient average (0.99).
    schedule: constant | step | poly | cosine. Defaults to "step" when `decay_every` or
      `decay_boundaries` is among `changes`, else "constant". Setting `decay_every` or
      `decay_boundaries` under another schedule is an error (not silently ignored).
    decay_every, decay_factor: step decay lr·f^⌊t / every⌋ (torch StepLR); f = 0.1.
    decay_boundaries: step decay at explicit steps, lr·f^(number of boundaries <= t) (torch
      MultiStepLR), e.g. (2500, 5000). Give this or `decay_every`, not both.
    poly_power: poly (nnU-Net) lr(t) = min_lr + (lr - min_lr)·(1 - t/T)^power; 0.9.
    min_learning_rate: the rate poly and cosine reach at t >= T (torch's eta_min); 0.0. Only
      those two schedules read it (a nonzero value under another is an error).
      cosine: lr(t) = min_lr + (lr - min_lr)·½(1 + cos(π t/T)) (torch CosineAnnealingLR), held at
      min_lr after T rather than rising again.
    total_steps: T of poly and cosine; 0 = the `total_steps` argument of the builders
      (`method_optimizer`: config.train.num_steps).
    warmup_steps: W; the schedule is multiplied by min(1, (t + 1)/W), not shifted (0 = none):
      torch's LinearLR(start_factor=1/W, total_iters=W - 1) chained with the schedule
      (ChainedScheduler). Step 0 uses lr(0)/W, step W - 1 and later the full schedule; poly and
      cosine still span t = 0..T, so W < T.
    lr_multipliers: ((regex, multiplier), ...) over parameter paths; the first matching pattern
      scales that parameter's rate (every schedule value); unmatched parameters get 1. A mapping
      given here is stored as its items, in order.
    weight_decay_mask: regex of parameter paths that get NO weight decay, e.g. "bias|scale";
      "" = decay every parameter.
    clip_grad_norm: c; clip the gradients to global L2 norm c before anything else, as torch's
      clip_grad_norm_ (0 = off).

  Raises:
    DataError: a key of `changes` is not a field.
  """
  c = ml_collections.ConfigDict(dict(
      name=name, learning_rate=float(learning_rate),
      momentum=0.0 if name == "rmsprop" else 0.9, nesterov=False,
      weight_decay=0.01 if name == "adamw" else 0.0,
      beta1=0.9, beta2=0.999, eps=1e-8, alpha=0.99,
      schedule="step" if changes.get("decay_every") or changes.get("decay_boundaries")
      else "constant",
      decay_every=0, decay_factor=0.1, decay_boundaries=(), poly_power=0.9,
      min_learning_rate=0.0, total_steps=0, warmup_steps=0,
      # A tuple of pairs rather than a ConfigDict: ordered (first match wins), regex keys may hold
      # '.' and '/', and `--config...lr_multipliers='(("encoder", 0.1),)'` parses it.
      lr_multipliers=(), weight_decay_mask="", clip_grad_norm=0.0))
  unknown = sorted(set(changes) - set(c.keys()))
  if unknown:
    raise DataError(f"optimizer_config: unknown field(s) {unknown}; fields are {sorted(c.keys())}")
  if isinstance(changes.get("lr_multipliers"), Mapping):
    changes["lr_multipliers"] = tuple(changes["lr_multipliers"].items())
  c.update(changes)
  return c


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _total(cfg: ml_collections.ConfigDict, total_steps: Optional[int]) -> int:
  """T of poly and cosine: the config's when set, else the builder's argument (0 if none)."""
  return cfg.total_steps or total_steps or 0


def check_optimizer_config(cfg: ml_collections.ConfigDict, key_prefix: str = "method.optimizer",
                           total_steps: Optional[int] = None) -> None:
  """Raises what `make_optimizer(cfg, total_steps)` would raise, without building anything.

  Args:
    cfg: an `optimizer_config` block (ConfigDict or FrozenConfigDict).
    key_prefix: where the block sits in the config, for the messages ("method.critic_optimizer").
    total_steps: the argument the builder will get (e.g. config.train.num_steps).

  Raises:
    DataError: naming the first bad key, e.g. "config method.optimizer.schedule = 'polyy' is not
      one of ...".
  """

  def fail(key: str, why: str) -> None:
    value = cfg[key] if key in cfg else None
    raise DataError(f"config {key_prefix}.{key} = {value!r} {why}")

  fields = set(optimizer_config().keys())
  unknown, missing = sorted(set(cfg.keys()) - fields), sorted(fields - set(cfg.keys()))
  if unknown:
    fail(unknown[0], f"is not a field of an optimiser block (fields: {sorted(fields)})")
  if missing:
    # A block written by hand, or by the optimiser code that predates the new fields.
    raise DataError(f"config {key_prefix}.{missing[0]} is missing; build the block with "
                    "jaxseg.optim.optimizer_config")
  if cfg.name not in NAMES:
    fail("name", f"is not one of {list(NAMES)}")
  if cfg.schedule not in SCHEDULES:
    fail("schedule", f"is not one of {list(SCHEDULES)}")
  for key, (accepts, bound) in _RANGES.items():
    if not _is_number(cfg[key]) or not accepts(cfg[key]):
      fail(key, f"must be a number {bound}")
  for key in _COUNTS:
    if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0:
      fail(key, "must be an integer number of steps >= 0")
  if not isinstance(cfg.nesterov, bool):
    fail("nesterov", "must be True or False")
  if cfg.nesterov and (cfg.name != "sgd" or cfg.momentum == 0):
    fail("nesterov", f"needs name 'sgd' with momentum > 0 (name {cfg.name!r}, momentum "
         f"{cfg.momentum})")

  bounds = cfg.decay_boundaries
  if not isinstance(bounds, (tuple, list)) or not all(
      isinstance(b, int) and not isinstance(b, bool) for b in bounds):
    fail("decay_boundaries", "must be a tuple of integer steps")
  if any(b <= 0 for b in bounds) or any(a >= b for a, b in zip(bounds, bounds[1:])):
    fail("decay_boundaries", "must be increasing steps > 0")
  if cfg.schedule == "step" and bool(cfg.decay_every) == bool(bounds):
    fail("decay_every", f"and decay_boundaries = {tuple(bounds)!r}: schedule 'step' needs exactly "
         "one of decay_every > 0 or decay_boundaries")
  # The old blocks had no `schedule`: decay_every alone meant step decay. An override such as
  # `--config.method.optimizer.decay_every=1000` on a constant block must not be dropped silently.
  if cfg.schedule != "step":
    for key in ("decay_every", "decay_boundaries"):
      if cfg[key]:
        fail(key, f"is only read by schedule 'step' (schedule is {cfg.schedule!r})")
  if cfg.schedule not in ("poly", "cosine") and cfg.min_learning_rate:
    fail("min_learning_rate", f"is only read by schedules 'poly' and 'cosine' (schedule is "
         f"{cfg.schedule!r})")
  if cfg.schedule in ("poly", "cosine"):
    if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 0):
      raise DataError(f"total_steps argument = {total_steps!r} must be an integer >= 0")
    steps = _total(cfg, total_steps)
    if steps <= 0:
      fail("total_steps", f"(and no total_steps argument): schedule {cfg.schedule!r} needs "
           "total_steps > 0")
    if cfg.warmup_steps >= steps:
      fail("warmup_steps", f"must be < total_steps = {steps}")
    if cfg.min_learning_rate > cfg.learning_rate:
      fail("min_learning_rate", f"must be <= learning_rate = {cfg.learning_rate}")

  pairs = cfg.lr_multipliers
  if not isinstance(pairs, (tuple, list)) or not all(
      isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and _is_number(p[1])
      and p[1] >= 0 for p in pairs):
    fail("lr_multipliers", "must be ((regex, multiplier >= 0), ...)")
  if not isinstance(cfg.weight_decay_mask, str):
    fail("weight_decay_mask", "must be a regex string ('' = decay everything)")
  for key, pattern in [("lr_multipliers", p) for p, _ in pairs] + [
      ("weight_decay_mask", cfg.weight_decay_mask)]:
    try:
      re.compile(pattern)
    except re.error as e:
      fail(key, f"has a bad regex {pattern!r}: {e}")


def _warmup(base: optax.Schedule, warmup_steps: int) -> optax.Schedule:
  """lr(t) = base(t)·min(1, (t + 1)/W): step 0 uses base(0)/W, steps >= W - 1 use base(t)."""
  return lambda t: base(t) * jnp.minimum(1.0, (t + 1) / warmup_steps)


def schedule(cfg: ml_collections.ConfigDict, total_steps: Optional[int] = None, *,
             key_prefix: str = "method.optimizer") -> optax.Schedule:
  """The learning rate lr(t) of update t (t = 0 for the first) named by `cfg.schedule`.

  Args:
    cfg: an `optimizer_config` block.
    total_steps: T of poly and cosine when `cfg.total_steps` is 0 (e.g. config.train.num_steps).
    key_prefix: for the error messages.

  Raises:
    DataError: `check_optimizer_config`'s.
  """
  check_optimizer_config(cfg, key_prefix, total_steps)
  lr, floor = cfg.learning_rate, cfg.min_learning_rate
  if cfg.schedule == "constant":
    base = optax.constant_schedule(lr)
  elif cfg.schedule == "step" and cfg.decay_every:
    base = optax.exponential_decay(lr, transition_steps=cfg.decay_every,
                                   decay_rate=cfg.decay_factor, staircase=True)
  elif cfg.schedule == "step":
    # A NumPy constant: a jnp array made here, inside a jitted init, would leak its tracer into
    # the schedule that the train step calls later.
    bounds, factor = np.asarray(cfg.decay_boundaries, np.int64), cfg.decay_factor
    base = lambda t: lr * factor ** jnp.sum(t >= bounds)
  else:
    steps = _total(cfg, total_steps)
    if cfg.schedule == "poly":
      power = cfg.poly_power
      base = lambda t: floor + (lr - floor) * (1 - jnp.minimum(t, steps) / steps) ** power
    else:
      base = lambda t: floor + (lr - floor) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t, steps)
                                                                 / steps))
  return _warmup(base, cfg.warmup_steps) if cfg.warmup_steps else base


def _path(key_path) -> str:
  """A parameter's '/'-joined path, e.g. "encoder/conv1/kernel"."""
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def _decays(no_decay: str):
  """params -> tree of bools: True where the path does NOT match `no_decay` (those get decay)."""
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: not re.search(no_decay, _path(path)), params)


def _group_labels(pairs: tuple[tuple[str, float], ...]):
  """params -> tree of group names: "pattern{i}" of the first pattern i matching, else unscaled."""
  def label(path, _leaf):
    name = _path(path)
    return next((f"pattern{i}" for i, (p, _) in enumerate(pairs) if re.search(p, name)), _UNSCALED)
  return lambda params: jax.tree_util.tree_map_with_path(label, params)


def _torch_rmsprop(learning_rate, alpha, eps, momentum) -> optax.GradientTransformation:
  """torch.optim.RMSprop with momentum: the buffer holds g/(√v + eps) and lr scales it after.

  optax.rmsprop scales by lr before the buffer, which differs once the rate changes.
  """
  return optax.chain(optax.scale_by_rms(decay=alpha, eps=eps, eps_in_sqrt=False),
                     optax.trace(decay=momentum), optax.scale_by_learning_rate(learning_rate))


def _rule(cfg: ml_collections.ConfigDict, lr: optax.Schedule, decay_mask
          ) -> optax.GradientTransformation:
  """The update rule of `cfg.name` at rate `lr`, with lr kept in the state (inject_hyperparams)."""
  # These calls are the ones of the methods' original optimisers, op for op, so that existing runs
  # give bit-identical updates and checkpoints keep their optimiser-state layout.
  if cfg.name == "sgd":
    return optax.inject_hyperparams(optax.sgd)(lr, momentum=cfg.momentum or None,
                                               nesterov=cfg.nesterov)
  if cfg.name == "adam":
    return optax.inject_hyperparams(optax.adam)(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
  if cfg.name == "adamw":
    # `mask` is static: inject_hyperparams would call a function-valued argument as a schedule.
    return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=decay_mask)
  if not cfg.momentum:
    return optax.inject_hyperparams(optax.rmsprop, static_args=("eps_in_sqrt",))(
        lr, decay=cfg.alpha, eps=cfg.eps, eps_in_sqrt=False)
  return optax.inject_hyperparams(_torch_rmsprop)(lr, alpha=cfg.alpha, eps=cfg.eps,
                                                  momentum=cfg.momentum)


def _scaled(lr: optax.Schedule, multiplier: float) -> optax.Schedule:
  return lambda t: multiplier * lr(t)


# torch.nn.utils.clip_grad_norm_ divides by ‖g‖ + this (clip_coef = c / (total_norm + 1e-6)).
_TORCH_CLIP_EPS = 1e-6


def _clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
  """g·min(1, c / (‖g‖ + 1e-6)), ‖g‖ the L2 norm of all leaves together: torch's clip_grad_norm_.

  Not optax.clip_by_global_norm, which scales by c/‖g‖ and only when ‖g‖ >= c: it differs from
  torch by a relative 1e-6/‖g‖ above c, and for ‖g‖ in (c - 1e-6, c), which torch still scales.
  """
  def clip(updates, params=None):
    del params
    norm = optax.tree.norm(updates)
    coef = jnp.minimum(1.0, max_norm / (norm + _TORCH_CLIP_EPS))
    return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates)
  return optax.stateless(clip)


def _check_patterns(cfg: ml_collections.ConfigDict, key_prefix: str
                    ) -> optax.GradientTransformation:
  """A transform whose `init` raises DataError if a regex of `cfg` matches no parameter path.

  A typo ("encodr") would otherwise leave every parameter at multiplier 1, or decay them all. The
  check needs the parameter tree, so it runs at `init`; updates pass through unchanged.
  """
  patterns = [("lr_multipliers", str(p)) for p, _ in cfg.lr_multipliers]
  if cfg.weight_decay_mask:
    patterns.append(("weight_decay_mask", cfg.weight_decay_mask))

  def init(params):
    paths = [_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    for key, pattern in patterns:
      if not any(re.search(pattern, path) for path in paths):
        raise DataError(f"config {key_prefix}.{key}: the regex {pattern!r} matches no parameter "
                        f"path (they read like {paths[:3]})")
    return optax.EmptyState()

  return optax.GradientTransformation(init, lambda updates, state, params=None: (updates, state))


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: Optional[int] = None, *,
                   key_prefix: str = "method.optimizer") -> optax.GradientTransformation:
  """The optimiser of `cfg`: clip, coupled weight decay, then the rule (per lr group).

  The order is torch's: clip_grad_norm_ rescales the raw gradients, then `optimizer.step()` adds
  the coupled decay wd·p and applies the rule. Only the options that are set add transforms, so a
  plain block (sgd, adam or rmsprop without momentum, schedule constant or step every N, no
  multipliers, mask or clipping) builds exactly the chain the methods used before this module:
  chain(add_decayed_weights(wd), inject_hyperparams(rule)(lr)), without the decay for wd = 0;
  same updates bit for bit and the same optimiser-state tree (checkpoints keep loading).

  Args:
    cfg: an `optimizer_config` block.
    total_steps: T of poly and cosine when `cfg.total_steps` is 0 (e.g. config.train.num_steps).
    key_prefix: where the block sits, for the error messages ("method.critic_optimizer").

  Raises:
    DataError: `check_optimizer_config`'s; from `init`, a regex that matches no parameter path.
  """
  lr = schedule(cfg, total_steps, key_prefix=key_prefix)
  # add_decayed_weights and adamw take the mask of the leaves that DO decay.
  decay_mask = _decays(cfg.weight_decay_mask) if cfg.weight_decay_mask else None
  pairs = tuple((str(p), float(m)) for p, m in cfg.lr_multipliers)
  if pairs:
    groups = {f"pattern{i}": _rule(cfg, _scaled(lr, m), decay_mask)
              for i, (_, m) in enumerate(pairs)}
    # The unscaled group exists even when every parameter matches, so that `learning_rate` has it.
    groups[_UNSCALED] = _rule(cfg, lr, decay_mask)
    rule = optax.multi_transform(groups, _group_labels(pairs))
  else:
    rule = _rule(cfg, lr, decay_mask)
  check = [_check_patterns(cfg, key_prefix)] if pairs or cfg.weight_decay_mask else []
  clip = [_clip_grad_norm(cfg.clip_grad_norm)] if cfg.clip_grad_norm else []
  coupled = cfg.weight_decay and cfg.name != "adamw"
  decay = [optax.add_decayed_weights(cfg.weight_decay, decay_mask)] if coupled else []
  return optax.chain(*check, *clip, *decay, rule)


def num_steps(config: ml_collections.ConfigDict) -> Optional[int]:
  """config.train.num_steps, or None for a config without a train block (the methods' tests)."""
  train = config.get("train")
  return None if train is None else train.get("num_steps")


def check_method_optimizers(config: ml_collections.ConfigDict) -> None:
  """`check_optimizer_config` of every block config.method.<key> whose key ends in "optimizer".

  For the trainer's checks before any data is read; T is config.train.num_steps, as in
  `method_optimizer`.

  Raises:
    DataError: naming the first bad key, e.g. "config method.critic_optimizer.alpha = ...".
  """
  for key in config.method.keys():
    if key.endswith("optimizer"):
      check_optimizer_config(config.method[key], f"method.{key}", num_steps(config))


def method_optimizer(config: ml_collections.ConfigDict, key: str = "optimizer"
                     ) -> optax.GradientTransformation:
  """`make_optimizer` of the block config.method.<key>, T = config.train.num_steps.

  Args:
    config: the whole config (`config.method[key]` an `optimizer_config` block).
    key: "optimizer", "critic_optimizer", "discriminator_optimizer", ...; the messages name
      method.<key>.<field>.

  Raises:
    DataError: `make_optimizer`'s.
  """
  return make_optimizer(config.method[key], num_steps(config), key_prefix=f"method.{key}")


def learning_rate(state: Any) -> jax.Array:
  """The learning rate the latest update used: lr(t) after update t (lr(0) before any).

  Args:
    state: a TrainState (its `opt_state` is read) or the state of a `make_optimizer` optimiser.

  Returns:
    A float32 scalar. With `lr_multipliers` it is the rate of the unmatched parameters
    (multiplier 1), i.e. the schedule's value; a group with multiplier m used m times it.
  """
  opt_state = getattr(state, "opt_state", state)
  # The schedule's own state is also keyed "learning_rate"; the value is the array one.
  found = optax.tree_utils.tree_get_all_with_path(
      opt_state, "learning_rate", filtering=lambda _, value: isinstance(value, jax.Array))
  if len(found) > 1:
    found = [(path, v) for path, v in found
             if any(getattr(k, "key", None) == _UNSCALED for k in path)]
  if len(found) != 1:
    raise ValueError("no single learning rate in this optimiser state; is it a make_optimizer one?")
  return found[0][1]
