"""jaxseg.optim matches torch.optim's update rules and schedules, step by step.

The reference of each test is PyTorch's algorithm written out in NumPy (float64), as in the
torch.optim source: torch itself is not needed. Plain blocks are checked bit for bit against the
optimiser chain the methods built before jaxseg.optim (copied below), so that existing runs and
their checkpoints are unchanged.
"""

import bisect
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxseg import optim
from jaxseg.data.base import DataError
from jaxseg.methods import base

P0 = np.array([1.0, -2.0])
GRADS = [np.array([0.5, -1.0]), np.array([0.25, 0.5]), np.array([-1.0, 2.0]),
         np.array([0.75, 0.1]), np.array([-0.3, -0.6])]


def run(cfg, grads, steps=3, total_steps=None):
  """Parameters {"w": P0} after `steps` updates with `grads`, and the optimiser state."""
  tx = optim.make_optimizer(cfg, total_steps)
  params = {"w": jnp.asarray(P0, jnp.float32)}
  state = tx.init(params)
  for g in grads[:steps]:
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params["w"]), state


# ------------------------------------------------------------------------------------------------
# torch.optim's algorithms (single tensor, maximize=False, foreach irrelevant), in float64. `lrs[t]`
# is the group's lr at step t (what the scheduler set before optimizer.step()).


def torch_sgd(p, grads, lrs, momentum=0.0, weight_decay=0.0, nesterov=False):
  buf = None
  for g, lr in zip(grads, lrs):
    d = g + weight_decay * p if weight_decay else g
    if momentum:
      buf = d.copy() if buf is None else momentum * buf + d  # dampening = 0
      d = d + momentum * buf if nesterov else buf
    p = p - lr * d
  return p


def torch_adam(p, grads, lrs, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
               decoupled=False):
  """torch.optim.Adam, or torch.optim.AdamW when `decoupled`."""
  m, v = np.zeros_like(p), np.zeros_like(p)
  for step, (g, lr) in enumerate(zip(grads, lrs), start=1):
    if decoupled:
      p = p * (1 - lr * weight_decay)
    elif weight_decay:
      g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bias_correction1, bias_correction2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = np.sqrt(v) / math.sqrt(bias_correction2) + eps
    p = p - lr / bias_correction1 * m / denom
  return p


def torch_rmsprop(p, grads, lrs, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0):
  square_avg, buf = np.zeros_like(p), np.zeros_like(p)
  for g, lr in zip(grads, lrs):
    if weight_decay:
      g = g + weight_decay * p
    square_avg = alpha * square_avg + (1 - alpha) * g * g
    avg = np.sqrt(square_avg) + eps
    if momentum > 0:
      buf = momentum * buf + g / avg
      p = p - lr * buf
    else:
      p = p - lr * g / avg
  return p


def torch_clip_grad_norm(grads, max_norm):
  """torch.nn.utils.clip_grad_norm_ (norm_type 2) on a list of gradients."""
  total_norm = np.linalg.norm([np.linalg.norm(g) for g in grads])
  clip_coef = max_norm / (total_norm + 1e-6)
  return [g * min(clip_coef, 1.0) for g in grads]


def step_lr(lr, step_size, gamma):  # torch.optim.lr_scheduler.StepLR, closed form.
  return lambda t: lr * gamma ** (t // step_size)


def multi_step_lr(lr, milestones, gamma):  # MultiStepLR.
  return lambda t: lr * gamma ** bisect.bisect_right(milestones, t)


# ------------------------------------------------------------------------------------------------
# Update rules.


def test_sgd_momentum_coupled_weight_decay_as_torch():
  cfg = optim.optimizer_config("sgd", 0.1, momentum=0.9, weight_decay=0.01)
  got, _ = run(cfg, GRADS)
  # torch.optim.SGD: d = g + wd * p; buf = momentum * buf + d; p -= lr * buf.
  p, buf = np.array([1.0, -2.0]), np.zeros(2)
  for g in GRADS[:3]:
    buf = 0.9 * buf + (g + 0.01 * p)
    p = p - 0.1 * buf
  np.testing.assert_allclose(got, p, rtol=1e-6)


def test_sgd_nesterov_with_step_decay_as_torch():
  cfg = optim.optimizer_config("sgd", 0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                               decay_every=2, decay_factor=0.5)
  got, _ = run(cfg, GRADS, steps=5)
  lrs = [step_lr(0.1, 2, 0.5)(t) for t in range(5)]
  np.testing.assert_allclose(got, torch_sgd(P0, GRADS, lrs, 0.9, 0.01, nesterov=True), rtol=1e-6)


def test_sgd_without_momentum_as_torch():
  got, _ = run(optim.optimizer_config("sgd", 0.1, momentum=0.0), GRADS, steps=5)
  np.testing.assert_allclose(got, torch_sgd(P0, GRADS, [0.1] * 5), rtol=1e-6)


@pytest.mark.parametrize("name, weight_decay", [("adam", 0.0), ("adam", 0.05), ("adamw", 0.05)])
def test_adam_and_adamw_as_torch_with_the_rate_changing(name, weight_decay):
  """Bias correction from step 1; Adam's decay is added to g, AdamW's scales p by 1 - lr·wd."""
  cfg = optim.optimizer_config(name, 0.1, beta1=0.8, beta2=0.95, eps=1e-6,
                               weight_decay=weight_decay, decay_boundaries=(2, 4))
  got, _ = run(cfg, GRADS, steps=5)
  lrs = [multi_step_lr(0.1, [2, 4], 0.1)(t) for t in range(5)]
  want = torch_adam(P0, GRADS, lrs, 0.8, 0.95, 1e-6, weight_decay, decoupled=name == "adamw")
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rmsprop_eps_outside_the_square_root_as_torch():
  cfg = optim.optimizer_config("rmsprop", 0.01, alpha=0.99, eps=1e-8)
  got, _ = run(cfg, GRADS)
  p, v = np.array([1.0, -2.0]), np.zeros(2)
  for g in GRADS[:3]:
    v = 0.99 * v + 0.01 * g * g
    p = p - 0.01 * g / (np.sqrt(v) + 1e-8)
  np.testing.assert_allclose(got, p, rtol=1e-6)


def test_rmsprop_with_a_large_eps_and_step_decay_as_torch():
  """eps = 0.05, where √(v + eps) and √v + eps differ by far more than the tolerance (at 1e-8
  the test above cannot tell them apart)."""
  cfg = optim.optimizer_config("rmsprop", 0.1, alpha=0.9, eps=0.05, weight_decay=0.01,
                               decay_every=2, decay_factor=0.5)
  got, _ = run(cfg, GRADS, steps=5)
  lrs = [step_lr(0.1, 2, 0.5)(t) for t in range(5)]
  want = torch_rmsprop(P0, GRADS, lrs, alpha=0.9, eps=0.05, weight_decay=0.01)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rmsprop_momentum_as_torch_when_the_rate_changes():
  """torch keeps g/(√v + eps) in the momentum buffer and multiplies by the current lr after;
  optax.rmsprop multiplies before the buffer, which differs once the rate has changed."""
  cfg = optim.optimizer_config("rmsprop", 0.1, alpha=0.9, eps=1e-3, momentum=0.8,
                               weight_decay=0.01, decay_every=2, decay_factor=0.1)
  got, _ = run(cfg, GRADS, steps=5)
  lrs = [step_lr(0.1, 2, 0.1)(t) for t in range(5)]
  want = torch_rmsprop(P0, GRADS, lrs, alpha=0.9, eps=1e-3, momentum=0.8, weight_decay=0.01)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The test tells the two orders apart: optax.rmsprop's is off by far more than the tolerance.
  tx = optax.chain(optax.add_decayed_weights(0.01), optax.rmsprop(
      optax.exponential_decay(0.1, 2, 0.1, staircase=True), decay=0.9, eps=1e-3, eps_in_sqrt=False,
      momentum=0.8))
  params = {"w": jnp.asarray(P0, jnp.float32)}
  state = tx.init(params)
  for g in GRADS:
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
  assert np.abs(np.asarray(params["w"]) - want).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Schedules: lr(t) of update t (t = 0 for the first), torch's closed forms at hand-chosen t.

POLY_T, LR = 100, 0.01


@pytest.mark.parametrize("changes, want", [
    (dict(), {0: LR, 7: LR, 10_000: LR}),
    (dict(decay_every=3, decay_factor=0.5), {0: LR, 2: LR, 3: LR / 2, 5: LR / 2, 6: LR / 4}),
    # MultiStepLR(milestones=[2, 5], gamma=0.1): the rate drops AT the boundary step.
    (dict(decay_boundaries=(2, 5)), {0: LR, 1: LR, 2: LR / 10, 4: LR / 10, 5: LR / 100,
                                     50: LR / 100}),
    # nnU-Net's poly: lr·(1 - t/T)^0.9; 0 at T and after.
    (dict(schedule="poly"), {0: LR, 50: LR * 0.5 ** 0.9, 75: LR * 0.25 ** 0.9, POLY_T: 0.0,
                             POLY_T + 10: 0.0}),
    (dict(schedule="poly", poly_power=2.0, min_learning_rate=1e-3),
     {0: LR, 50: 1e-3 + 9e-3 * 0.25, POLY_T: 1e-3}),
    # CosineAnnealingLR(T_max=T, eta_min): held at eta_min after T.
    (dict(schedule="cosine"), {0: LR, 25: LR * (1 + math.cos(math.pi / 4)) / 2, 50: LR / 2,
                               POLY_T: 0.0, POLY_T + 30: 0.0}),
    (dict(schedule="cosine", min_learning_rate=1e-3), {50: 1e-3 + 9e-3 / 2, POLY_T: 1e-3}),
    # Warm-up W = 4: LinearLR(start_factor=1/4, total_iters=3) times the schedule, not shifted.
    (dict(warmup_steps=4), {0: LR / 4, 1: LR / 2, 2: 3 * LR / 4, 3: LR, 4: LR, 99: LR}),
    (dict(schedule="poly", warmup_steps=4), {0: LR / 4, 2: 3 * LR / 4 * 0.98 ** 0.9,
                                             50: LR * 0.5 ** 0.9}),
    (dict(decay_every=3, warmup_steps=4), {0: LR / 4, 2: 3 * LR / 4, 3: LR / 10, 6: LR / 100}),
], ids=["constant", "step_every", "step_boundaries", "poly", "poly_power_floor", "cosine",
        "cosine_floor", "warmup_constant", "warmup_poly", "warmup_step"])
def test_schedule_values(changes, want):
  lr = optim.schedule(optim.optimizer_config("sgd", LR, **changes), POLY_T)
  got = {t: float(lr(jnp.asarray(t, jnp.int32))) for t in want}
  assert got == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_poly_and_cosine_span_the_configured_total_before_the_argument():
  cfg = optim.optimizer_config("sgd", LR, schedule="poly", total_steps=10)
  assert float(optim.schedule(cfg, POLY_T)(5)) == pytest.approx(LR * 0.5 ** 0.9)
  cfg.total_steps = 0
  assert float(optim.schedule(cfg, POLY_T)(5)) == pytest.approx(LR * 0.95 ** 0.9)


def test_step_decay_and_the_logged_learning_rate():
  cfg = optim.optimizer_config("sgd", 0.01, decay_every=2, decay_factor=0.1)
  schedule = optim.schedule(cfg)
  assert [float(schedule(t)) for t in range(5)] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4])
  tx = optim.make_optimizer(cfg)
  state = base.TrainState.create(apply_fn=None, params={"w": jnp.zeros(2)}, tx=tx)
  for t in range(5):
    before = np.asarray(state.params["w"])
    state = state.apply_gradients(grads={"w": jnp.ones(2)})
    # The rate step t used, both as logged and as applied (plain SGD with momentum, grad 1).
    assert float(optim.learning_rate(state)) == pytest.approx(float(schedule(t)))
    if t == 0:
      np.testing.assert_allclose(np.asarray(state.params["w"]), before - float(schedule(0)))


def test_learning_rate_reads_the_rate_of_the_latest_update():
  """Warm-up then cosine, with the encoder at 0.1×: the logged rate is the schedule's (multiplier
  1) after each update, lr(0) before any; plain SGD (grad 1) shows the rates the updates used."""
  cfg = optim.optimizer_config("sgd", 0.1, momentum=0.0, schedule="cosine", warmup_steps=3,
                               lr_multipliers={"encoder": 0.1})
  lr = optim.schedule(cfg, 8)
  tx = optim.make_optimizer(cfg, 8)
  params = {"encoder": {"w": jnp.zeros(2)}, "head": {"w": jnp.zeros(2)}}
  state = tx.init(params)
  assert float(optim.learning_rate(state)) == pytest.approx(float(lr(0)))
  for t in range(8):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert float(optim.learning_rate(state)) == pytest.approx(float(lr(t)), rel=1e-6)
    np.testing.assert_allclose(np.asarray(updates["head"]["w"]), -float(lr(t)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["encoder"]["w"]), -0.1 * float(lr(t)),
                               rtol=1e-6)


def test_learning_rate_needs_a_make_optimizer_state():
  state = optax.sgd(0.1).init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="no single learning rate"):
    optim.learning_rate(state)


# ------------------------------------------------------------------------------------------------
# Parameter groups: rate multipliers and weight-decay masks on a small tree.

TREE = {
    "encoder": {"conv": {"kernel": np.array([0.5, -1.0]), "bias": np.array([0.1, 0.2])},
                "norm": {"scale": np.array([1.0, 0.8])}},
    "head": {"kernel": np.array([2.0, -0.5]), "bias": np.array([0.3, -0.3])},
}
PATHS = ["encoder/conv/kernel", "encoder/conv/bias", "encoder/norm/scale", "head/kernel",
         "head/bias"]


def leaf(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def tree_grads(steps, seed=0):
  """[gradient tree of step t], fixed random values."""
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: rng.normal(size=p.shape), TREE) for _ in range(steps)]


def run_tree(cfg, grads, total_steps=None):
  tx = optim.make_optimizer(cfg, total_steps)
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), TREE)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state,
                               params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_rate_multipliers_and_weight_decay_mask_as_torch_param_groups(name):
  """Groups as torch would have them: encoder/conv at 0.5× (first match wins over "encoder"), the
  rest of the encoder at 0.1×, the head at 1×; biases and BN scales without weight decay."""
  grads = tree_grads(4)
  cfg = optim.optimizer_config(name, 0.05, weight_decay=0.1, decay_every=2, decay_factor=0.5,
                               lr_multipliers=(("encoder/conv", 0.5), ("encoder", 0.1)),
                               weight_decay_mask="bias|scale")
  if name == "rmsprop":
    cfg.momentum = 0.9
  got, _ = run_tree(cfg, grads)
  for path in PATHS:
    multiplier = 0.5 if "conv" in path else 0.1 if "encoder" in path else 1.0
    lrs = [multiplier * step_lr(0.05, 2, 0.5)(t) for t in range(4)]
    wd = 0.0 if path.endswith(("bias", "scale")) else 0.1
    p, g = leaf(TREE, path), [leaf(x, path) for x in grads]
    want = {"sgd": lambda: torch_sgd(p, g, lrs, 0.9, wd),
            "adam": lambda: torch_adam(p, g, lrs, weight_decay=wd),
            "adamw": lambda: torch_adam(p, g, lrs, weight_decay=wd, decoupled=True),
            "rmsprop": lambda: torch_rmsprop(p, g, lrs, momentum=0.9, weight_decay=wd)}[name]()
    # atol: float32 rounding of parameters of size 1 (a wrong group is off by > 1e-4).
    np.testing.assert_allclose(np.asarray(leaf(got, path)), want, rtol=1e-6, atol=1e-6,
                               err_msg=path)


def test_the_default_adamw_decays_every_parameter():
  grads = tree_grads(3)
  got, _ = run_tree(optim.optimizer_config("adamw", 0.05), grads)
  for path in PATHS:
    want = torch_adam(leaf(TREE, path), [leaf(x, path) for x in grads], [0.05] * 3,
                      weight_decay=0.01, decoupled=True)
    np.testing.assert_allclose(np.asarray(leaf(got, path)), want, rtol=1e-6, err_msg=path)


@pytest.mark.parametrize("key, changes", [
    ("lr_multipliers", dict(lr_multipliers=(("encodr", 0.1),))),
    ("weight_decay_mask", dict(weight_decay=0.1, weight_decay_mask="gamma|^kernel")),
])
def test_a_regex_that_matches_no_parameter_fails_at_init(key, changes):
  tx = optim.make_optimizer(optim.optimizer_config("sgd", 0.1, **changes),
                            key_prefix="method.critic_optimizer")
  with pytest.raises(DataError, match=rf"^config method\.critic_optimizer\.{key}: .* matches no "
                                      "parameter path"):
    tx.init(jax.tree.map(jnp.asarray, TREE))


# ------------------------------------------------------------------------------------------------
# Gradient clipping: torch.nn.utils.clip_grad_norm_(params, c) before optimizer.step().


@pytest.mark.parametrize("norm", [2e-5, 0.95e-5, 0.5e-5])
def test_clip_grad_norm_as_torch(norm):
  """c = 1e-5, so that torch's + 1e-6 in the denominator shows: above c torch scales by
  c/(‖g‖ + 1e-6), not c/‖g‖; at 0.95c it still scales (by 0.95); at c/2 it does not."""
  direction = tree_grads(1, seed=3)[0]
  scale = norm / optax.tree.norm(direction)
  grads = jax.tree.map(lambda g: np.asarray(g * scale), direction)
  # Plain SGD at lr 1: the update is minus the clipped gradient (compared as updates, since
  # float32 parameters of size 1 would hide a change of 1e-6).
  tx = optim.make_optimizer(optim.optimizer_config("sgd", 1.0, momentum=0.0, clip_grad_norm=1e-5))
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), TREE)
  updates, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(params), params)
  clipped = dict(zip(PATHS, torch_clip_grad_norm([leaf(grads, p) for p in PATHS], 1e-5)))
  for path in PATHS:
    np.testing.assert_allclose(np.asarray(leaf(updates, path)), -clipped[path], rtol=1e-5,
                               err_msg=path)


def test_clipping_comes_before_the_coupled_weight_decay_over_steps():
  """torch: clip_grad_norm_ on p.grad, then SGD adds wd·p: the decay is not clipped."""
  grads = [jax.tree.map(lambda g: 10 * g, x) for x in tree_grads(3, seed=1)]
  cfg = optim.optimizer_config("sgd", 0.1, momentum=0.9, weight_decay=0.5, clip_grad_norm=1.0)
  got, _ = run_tree(cfg, grads)
  p = {path: leaf(TREE, path) for path in PATHS}
  buf = {path: None for path in PATHS}
  for g in grads:  # The torch loop over all parameters, since the clip couples them.
    clipped = dict(zip(PATHS, torch_clip_grad_norm([leaf(g, path) for path in PATHS], 1.0)))
    for path in PATHS:
      d = clipped[path] + 0.5 * p[path]
      buf[path] = d if buf[path] is None else 0.9 * buf[path] + d
      p[path] = p[path] - 0.1 * buf[path]
  for path in PATHS:
    np.testing.assert_allclose(np.asarray(leaf(got, path)), p[path], rtol=1e-6, err_msg=path)


# ------------------------------------------------------------------------------------------------
# Plain blocks build the methods' previous optimiser, bit for bit.


def old_optimizer_config(name: str = "sgd", learning_rate: float = 0.01, **changes):
  """The block of the methods' previous optimiser code (before jaxseg.optim), verbatim."""
  c = ml_collections.ConfigDict(dict(
      name=name, learning_rate=learning_rate, momentum=0.9, nesterov=False, weight_decay=0.0,
      decay_every=0, decay_factor=0.1, beta1=0.9, beta2=0.999, alpha=0.99, eps=1e-8))
  c.update(changes)
  return c


def old_optimizer(cfg):
  """The methods' previous optimiser (before jaxseg.optim), verbatim."""
  if cfg.decay_every:
    lr = optax.exponential_decay(cfg.learning_rate, transition_steps=cfg.decay_every,
                                 decay_rate=cfg.decay_factor, staircase=True)
  else:
    lr = optax.constant_schedule(cfg.learning_rate)
  decay = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
  if cfg.name == "sgd":
    rule = optax.inject_hyperparams(optax.sgd)(lr, momentum=cfg.momentum or None,
                                               nesterov=cfg.nesterov)
  elif cfg.name == "adam":
    rule = optax.inject_hyperparams(optax.adam)(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
  else:
    rule = optax.inject_hyperparams(optax.rmsprop, static_args=("eps_in_sqrt",))(
        lr, decay=cfg.alpha, eps=cfg.eps, eps_in_sqrt=False)
  return optax.chain(*decay, rule)


# The methods' blocks (LA-protocol SGD with decay every 2 instead of 2500 so that it shows within
# the run; Duo-SegNet's SGD and critic RMSprop; SASSNet's discriminator Adam; the supervised
# default) and the other options the previous code read.
PLAIN_BLOCKS = {
    "la_sgd": ("sgd", 0.01, dict(momentum=0.9, weight_decay=1e-4, decay_every=2,
                                 decay_factor=0.1)),
    "duo_sgd": ("sgd", 1e-2, dict(momentum=0.9, weight_decay=0.0)),
    "duo_critic_rmsprop": ("rmsprop", 5e-5, dict(alpha=0.99, eps=1e-8, momentum=0.0)),
    "sassnet_discriminator_adam": ("adam", 1e-4, dict(beta1=0.9, beta2=0.99)),
    "supervised_sgd": ("sgd", 0.01, dict(momentum=0.9)),
    "sgd_nesterov": ("sgd", 0.1, dict(momentum=0.5, nesterov=True, weight_decay=0.01)),
    "sgd_no_momentum": ("sgd", 0.1, dict(momentum=0.0, decay_every=3, decay_factor=0.5)),
    "adam_coupled_decay": ("adam", 1e-3, dict(weight_decay=0.01, eps=1e-6, decay_every=2)),
    "rmsprop_decay": ("rmsprop", 1e-3, dict(momentum=0.0, weight_decay=0.01, decay_every=2)),
}


@pytest.mark.parametrize("block", PLAIN_BLOCKS)
def test_plain_blocks_are_the_previous_optimiser_bit_for_bit(block):
  name, lr, changes = PLAIN_BLOCKS[block]
  old_cfg, new_cfg = old_optimizer_config(name, lr, **changes), optim.optimizer_config(
      name, lr, **changes)
  # The same config except for the new fields (a config file gives the same block).
  assert {k: new_cfg[k] for k in old_cfg} == old_cfg.to_dict()
  grads = [jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g) for g in tree_grads(5, seed=2)]
  results = []
  for tx in (old_optimizer(old_cfg), optim.make_optimizer(new_cfg)):
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), TREE)
    state = tx.init(params)
    update = jax.jit(tx.update)  # As in training: the step is jitted.
    for g in grads:
      updates, state = update(g, state, params)
      params = optax.apply_updates(params, updates)
    results.append((params, state))
  (old_params, old_state), (new_params, new_state) = results
  # Same optimiser-state tree (a checkpoint of the old one restores into the new one) ...
  assert jax.tree.structure(new_state) == jax.tree.structure(old_state)
  # ... and the same bits in every leaf of the state and the parameters.
  for old, new in zip(jax.tree.leaves((old_params, old_state)),
                      jax.tree.leaves((new_params, new_state))):
    assert old.dtype == new.dtype and old.shape == new.shape
    assert np.array_equal(np.asarray(old), np.asarray(new)), (old, new)
  assert float(optim.learning_rate(new_state)) == float(
      optax.tree_utils.tree_get(old_state, "learning_rate",
                                filtering=lambda _, v: isinstance(v, jax.Array)))


# ------------------------------------------------------------------------------------------------
# The config block and its errors.


def test_optimizer_config_defaults_are_torch_s():
  sgd, adamw, rmsprop = (optim.optimizer_config(n) for n in ("sgd", "adamw", "rmsprop"))
  assert (sgd.momentum, sgd.weight_decay, sgd.schedule) == (0.9, 0.0, "constant")
  assert (adamw.beta1, adamw.beta2, adamw.eps, adamw.weight_decay) == (0.9, 0.999, 1e-8, 0.01)
  assert (rmsprop.momentum, rmsprop.alpha, rmsprop.eps) == (0.0, 0.99, 1e-8)
  assert optim.optimizer_config(decay_every=5).schedule == "step"
  assert optim.optimizer_config(decay_boundaries=(5,)).schedule == "step"
  assert optim.optimizer_config(lr_multipliers={"a": 0.1, "b": 2}).lr_multipliers == (
      ("a", 0.1), ("b", 2))
  with pytest.raises(DataError, match=r"unknown field\(s\) \['lr'\]"):
    optim.optimizer_config(lr=0.1)


def block(**fields):
  """An optimiser block with `fields` set as given, bypassing ConfigDict's type checks (as a
  block read back from JSON or written by hand would be)."""
  d = optim.optimizer_config("sgd", 0.01).to_dict()
  d.update(fields)
  return ml_collections.ConfigDict(d)


def without(key):
  d = optim.optimizer_config().to_dict()
  del d[key]
  return ml_collections.ConfigDict(d)


BAD_BLOCKS = [
    ("name", block(name="lion")),
    ("schedule", block(schedule="polyy")),
    ("learning_rate", block(learning_rate=-0.1)),
    ("learning_rate", block(learning_rate="0.1")),
    ("momentum", block(momentum=1.0)),
    ("weight_decay", block(weight_decay=-1e-4)),
    ("beta1", block(beta1=1.0)),
    ("beta2", block(beta2=-0.5)),
    ("eps", block(eps=-1e-8)),
    ("alpha", block(alpha=1.5)),
    ("decay_factor", block(decay_factor=0.0)),
    ("poly_power", block(poly_power=0)),
    ("min_learning_rate", block(min_learning_rate=-1.0)),
    ("clip_grad_norm", block(clip_grad_norm=-1.0)),
    ("clip_grad_norm", block(clip_grad_norm=True)),
    ("decay_every", block(schedule="step", decay_every=-2)),
    ("decay_every", block(schedule="step", decay_every=2.5)),
    ("total_steps", block(total_steps=-1)),
    ("warmup_steps", block(warmup_steps=1.5)),
    ("nesterov", block(nesterov="yes")),
    ("nesterov", block(nesterov=True, momentum=0.0)),
    ("nesterov", block(name="adam", nesterov=True)),
    ("decay_boundaries", block(schedule="step", decay_boundaries=(5, 2))),
    ("decay_boundaries", block(schedule="step", decay_boundaries=(0, 2))),
    ("decay_boundaries", block(schedule="step", decay_boundaries=(2.0,))),
    ("decay_boundaries", block(schedule="step", decay_boundaries=5)),
    ("decay_every", block(schedule="step")),
    ("decay_every", block(schedule="step", decay_every=2, decay_boundaries=(3,))),
    ("decay_every", block(schedule="constant", decay_every=2500)),
    ("decay_boundaries", block(schedule="cosine", total_steps=10, decay_boundaries=(3,))),
    ("min_learning_rate", block(schedule="step", decay_every=2, min_learning_rate=1e-4)),
    ("total_steps", block(schedule="poly")),
    ("warmup_steps", block(schedule="cosine", total_steps=10, warmup_steps=10)),
    ("min_learning_rate", block(schedule="poly", total_steps=10, min_learning_rate=0.1)),
    ("lr_multipliers", block(lr_multipliers=(("encoder", -0.1),))),
    ("lr_multipliers", block(lr_multipliers=("encoder",))),
    ("lr_multipliers", block(lr_multipliers=((3, 0.1),))),
    ("lr_multipliers", block(lr_multipliers=(("enc(", 0.1),))),
    ("weight_decay_mask", block(weight_decay_mask=3)),
    ("weight_decay_mask", block(weight_decay_mask="bias[")),
    ("lr", block(lr=0.1)),
    ("schedule", without("schedule")),
]


@pytest.mark.parametrize("key, cfg", BAD_BLOCKS, ids=[f"{k}{i}" for i, (k, _) in
                                                     enumerate(BAD_BLOCKS)])
def test_every_bad_setting_is_one_error_naming_its_key(key, cfg):
  pattern = rf"^config method\.optimizer\.{key}[ :]"
  with pytest.raises(DataError, match=pattern) as check:
    optim.check_optimizer_config(cfg)
  assert "\n" not in str(check.value)
  with pytest.raises(DataError, match=pattern):  # The builders check before building.
    optim.make_optimizer(cfg)


def test_the_messages_name_where_the_block_sits():
  config = ml_collections.ConfigDict(dict(method=dict(
      optimizer=optim.optimizer_config("sgd", 0.01),
      critic_optimizer=block(name="rmsprop", momentum=0.0, alpha=1.0),
      discriminator_optimizer=block(name="adam", schedule="cosine"))))
  optim.method_optimizer(config)
  with pytest.raises(DataError, match=r"^config method\.critic_optimizer\.alpha = 1\.0 must"):
    optim.method_optimizer(config, "critic_optimizer")
  with pytest.raises(DataError, match=r"^config method\.discriminator_optimizer\.total_steps "):
    optim.method_optimizer(config, "discriminator_optimizer")
  # T of poly and cosine comes from config.train.num_steps.
  config.train = ml_collections.ConfigDict(dict(num_steps=100))
  tx = optim.method_optimizer(config, "discriminator_optimizer")
  state = tx.init({"w": jnp.zeros(2)})
  for _ in range(51):
    _, state = tx.update({"w": jnp.ones(2)}, state)
  assert float(optim.learning_rate(state)) == pytest.approx(0.01 / 2)


def test_check_method_optimizers_checks_every_block_with_the_run_length():
  config = ml_collections.ConfigDict(dict(
      method=dict(name="duo", optimizer=optim.optimizer_config("sgd", 0.01, schedule="poly"),
                  critic_optimizer=optim.optimizer_config("rmsprop", 5e-5), model=dict(n=1)),
      train=dict(num_steps=100)))
  optim.check_method_optimizers(config)  # T = train.num_steps for the poly block.
  config.method.critic_optimizer.momentum = 1.5
  with pytest.raises(DataError, match=r"^config method\.critic_optimizer\.momentum = 1\.5 must"):
    optim.check_method_optimizers(config)
  config.method.critic_optimizer.momentum = 0.0
  config.train.num_steps = 0
  with pytest.raises(DataError, match=r"^config method\.optimizer\.total_steps "):
    optim.check_method_optimizers(config)


def test_step_boundaries_survive_a_jitted_init():
  """The trainer builds the optimiser inside a jitted `init`; the schedule is called later by the
  jitted step. Boundaries made into a traced array inside the first would leak into the second."""
  def init():
    tx = optim.make_optimizer(optim.optimizer_config("sgd", 0.1, decay_boundaries=(1, 2)))
    return base.TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=tx)

  state = jax.jit(init)()
  step = jax.jit(lambda s: s.apply_gradients(grads={"w": jnp.ones(2)}))
  rates = []
  for _ in range(3):
    state = step(state)
    rates.append(float(optim.learning_rate(state)))
  assert rates == pytest.approx([0.1, 0.01, 0.001])
