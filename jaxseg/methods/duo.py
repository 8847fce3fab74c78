"""Duo-SegNet: two segmenters, two views, one per-pixel critic (docs/methods/duo.md).

Paper (Peiris et al., 2021): segmenters F₁, F₂ learn from the labeled views X¹, X² and from each
other on the unlabeled images U, while a per-pixel critic tells their probability maps from
ground-truth masks:

    min_{θ₁, θ₂} max_ψ  λ_s·L_s + λ_u·L_u + λ_c·L_c.

Per batch: `k_s` descent steps of both segmenters (each with its own SGD state, `peers.Peers`: the
reference's one SGD over both networks is the same update)
on λ_s·L_s + λ_u·L_u + λ_c·L_c, then `k_c` critic steps (RMSprop) on L_adv1 — the critic never sees
unlabeled predictions. D(m) = σ(critic(m)) is the critic's per-pixel probability that the map m is a
ground-truth mask (the reference's convention, D = 1 − ψ); every pixel sum of the paper is a
per-pixel mean (`losses.binary_cross_entropy`, PyTorch `BCELoss` with its log clamp at −100).

Effective losses per preset (`apply_preset`; docs/methods/duo.md, presets; p^i = F_i(X^i), u_i = F_i(U)):

| term | `paper` (default) | `released` (`himashi92/Duo-SegNet`) |
|---|---|---|
| L_s | Σ_i [bce(p^i, Y^i) + w_dice·dice_lin(p^i, Y^i)], w_dice = 0 | Σ_i bce(p^i, Y^i) |
| L_u | bce(u₁, sg u₂) + bce(u₂, sg u₁), with gradient | weight 0 (`.item()` in the code) |
| L_c | Σ_i [η·bce(D(p^i), 1) + bce(D(u_i), 1)] | Σ_i bce(D(u_i), 1) (D(sg p^i) there) |
| critic | Σ_i [(1−η)·bce(D(Y^i),1) + η·bce(D(sg p^i),0)] | Σ_i [bce(D(Y^i),1) + bce(D(sg p^i),0)] |
| λ_s, λ_u, λ_c, η | 0.5, 0.4, 0.2, 0.5 | 0.5, 0, 0.2, – |

so `released` descends 0.5·Σ_i bce(p^i, Y^i) + 0.2·Σ_i bce(D(u_i), 1) (its Dice and L_u carry no
gradient, its labeled adversarial term is detached). L_u is computed and logged in both presets
(weight 0 in `released`); `loss_c` is the preset's L_c.

Batch-norm and modes (docs/methods/duo.md, one step; docs/networks.md, batch statistics):
- By default each segmenter forwards its view and the unlabeled images in ONE train-mode call,
  F_i(concat(X^i, U)), so its BN batch statistics span the view's labeled and the unlabeled samples
  and its running statistics are updated once per segmenter step. The reference calls F_i(X^i) and
  F_i(U) separately with batch size 1: there each call normalises with one image's statistics and
  the running statistics move twice per step. `method.separate_bn_calls = True` does the same
  (`segment_views_separately`). The losses are otherwise the same.
- The critic is always in train mode, as in the reference (which never calls `critic.eval()`): each
  critic call normalises with its own batch statistics. Calls are made per view and per stream, in
  the reference's order — segmenter step D(p¹), D(p²), D(u₁), D(u₂); critic step D(sg p¹), D(sg p²),
  D(Y¹), D(Y²) — so real masks and predictions are never normalised together. The running
  statistics are threaded through all of these calls, the segmenter step's included, as the
  reference's train-mode forwards update them; they are never read (the critic is not used in eval
  mode), only the critic's parameters are trained by its own step.
- The critic steps score the segmenters' predictions of the last segmenter step (made before its
  update), as the reference does for k_s = 1.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from jaxseg import losses, models, optim
from jaxseg.data.base import DataError
from jaxseg.data.batches import Batch
from jaxseg.methods import adversarial, base, peers

PRESETS = ("paper", "released")
VIEWS = ("f1", "f2")

# What the released code's gradients reduce to (`himashi92/Duo-SegNet` train.py, loss.py): its L_u
# (`.item()`) and Dice (NumPy) carry no gradient, its labeled adversarial term sees detached maps,
# its critic weighs real and fake by 1. λ_s = 0.5 (calc_loss's bce_weight) and λ_c = 0.2 are the
# config defaults.
_RELEASED = dict(lambda_u=0.0, w_dice=0.0, eta_segmenter=0.0, critic_real=1.0, critic_fake=1.0)


def default_config() -> ml_collections.ConfigDict:
  """The `method` block: the `paper` preset with the reference's weights and optimisers
  (docs/methods/duo.md, hyperparameters)."""
  c = ml_collections.ConfigDict()
  c.name = "duo"
  c.preset = "paper"  # "paper" | "released" (see `apply_preset`).
  c.lambda_s = 0.5  # Weight of L_s.
  c.lambda_u = 0.4  # Weight of L_u (released: 0).
  c.lambda_c = 0.2  # Weight of L_c.
  c.eta = 0.5  # η of L_adv1 (paper only).
  c.w_dice = 0.0  # Linear Dice in L_s (paper only; 1 = the authors' BCE + Dice intent).
  c.k_s = 1  # Segmenter steps per batch.
  c.k_c = 1  # Critic steps per batch.
  # False: F_i(concat(X^i, U)), one train-mode call per segmenter. True: the released code's
  # separate calls F₁(X¹), F₂(X²), F₁(U), F₂(U), each network's BN state threaded through its two.
  c.separate_bn_calls = False
  c.model = ml_collections.ConfigDict(dict(
      name="unet", features=(8, 16, 32, 64), norm="batch", upsample="linear_align_corners",
      dtype="float32"))
  c.critic = ml_collections.ConfigDict(dict(name="duo_critic", ndf=64, dtype="float32"))
  c.optimizer = optim.optimizer_config("sgd", 1e-2, momentum=0.9, weight_decay=0.0)
  c.critic_optimizer = optim.optimizer_config("rmsprop", 5e-5, alpha=0.99, eps=1e-8,
                                              momentum=0.0)
  return c


# One logit per segmenter (binary); two views of the labeled set; the unlabeled stream feeds L_u
# and the critic's adversarial term.
# BCE and the critic take soft targets (data.soft_masks: the released bilinear masks).
REQUIREMENTS = base.Requirements(classes="binary", labeled_groups=len(VIEWS), unlabeled=True,
                                 soft_labels=True)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The method block and the data it needs; raises a DataError naming the key."""
  base.check_requirements(config, REQUIREMENTS)
  apply_preset(config.method)


def apply_preset(cfg: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """The effective loss weights and step counts of the method block `cfg`.

  Returns a frozen dict with `preset`, `k_s`, `k_c`, `separate_bn_calls` (as configured in both
  presets) and the weights of

      segmenters: lambda_s·L_s + lambda_u·L_u + lambda_c·L_c,
        L_s = Σ_i [bce(p^i, Y^i) + w_dice·dice_lin(p^i, Y^i)],
        L_c = Σ_i [eta_segmenter·bce(D(p^i), 1) + bce(D(u_i), 1)];
      critic: Σ_i [critic_real·bce(D(Y^i), 1) + critic_fake·bce(D(sg p^i), 0)].

  `paper` takes λ_s, λ_u, λ_c, w_dice from `cfg` and sets eta_segmenter = η, critic_real = 1 − η,
  critic_fake = η. `released` keeps λ_s and λ_c (defaults = the code's 0.5, 0.2) and fixes the
  rest to the code's effective gradients: lambda_u = w_dice = eta_segmenter = 0, critic_real =
  critic_fake = 1 (`cfg.lambda_u`, `cfg.w_dice` and `cfg.eta` are ignored).

  Raises:
    DataError: unknown preset, k_s / k_c < 1, a negative weight, η outside [0, 1].
  """
  base.check_choice(cfg, "preset", PRESETS)
  for key in ("k_s", "k_c"):
    base.check_count(cfg, key)
  for key in ("lambda_s", "lambda_u", "lambda_c", "w_dice"):
    base.check_positive(cfg, key)
  if not 0 <= cfg.eta <= 1:
    raise DataError(f"config method.eta = {cfg.eta!r} must be in [0, 1]")
  separate = cfg.get("separate_bn_calls", False)
  if not isinstance(separate, bool):
    raise DataError(f"config method.separate_bn_calls = {separate!r} must be True or False")
  weights = dict(preset=cfg.preset, k_s=int(cfg.k_s), k_c=int(cfg.k_c), separate_bn_calls=separate,
                 lambda_s=float(cfg.lambda_s), lambda_c=float(cfg.lambda_c))
  if cfg.preset == "paper":
    weights.update(lambda_u=float(cfg.lambda_u), w_dice=float(cfg.w_dice),
                   eta_segmenter=float(cfg.eta), critic_real=1.0 - float(cfg.eta),
                   critic_fake=float(cfg.eta))
  else:
    weights.update(_RELEASED)
  return ml_collections.FrozenConfigDict(weights)


@flax.struct.dataclass
class State:
  """Duo-SegNet's training state.

  Attributes:
    seg: the segmenters F₁, F₂ as peers "f1", "f2", each with its own SGD state (the reference's
      one SGD over both networks, which is the same update: SGD acts parameter by parameter);
      `seg.params` and `seg.batch_stats` are {"f1": ..., "f2": ...}.
    critic: the per-pixel critic and its RMSprop state.
    hparams: `apply_preset`'s effective weights (static).
  """
  seg: peers.Peers
  critic: base.TrainState
  hparams: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)


# ------------------------------------------------------------------------------------------------
# Losses (docs/methods/duo.md, one step), on probabilities / critic outputs D ∈ [0, 1].


def supervised_loss(probs: Sequence[jax.Array], labels: Sequence[jax.Array],
                    w_dice: float = 0.0) -> jax.Array:
  """L_s = Σ_i [bce(p^i, Y^i) + w_dice·dice_lin(p^i, Y^i)], p^i = F_i(X^i) of view i."""
  total = 0.0
  for p, y in zip(probs, labels, strict=True):
    total += losses.binary_cross_entropy(p, y)
    if w_dice:
      total += w_dice * losses.dice_loss(p, y, squared=False)
  return total


def unlabeled_loss(u1: jax.Array, u2: jax.Array) -> jax.Array:
  """L_u = bce(u₁, sg u₂) + bce(u₂, sg u₁): each segmenter's target is the other's map of U."""
  return (losses.binary_cross_entropy(u1, jax.lax.stop_gradient(u2))
          + losses.binary_cross_entropy(u2, jax.lax.stop_gradient(u1)))


def segmenter_adversarial_loss(d_labeled: Sequence[jax.Array], d_unlabeled: Sequence[jax.Array],
                               eta: float) -> jax.Array:
  """L_c for the segmenters = Σ_i [η·bce(D(p^i), 1) + bce(D(u_i), 1)] (non-saturating)."""
  total = 0.0
  for d_l, d_u in zip(d_labeled, d_unlabeled, strict=True):
    total += eta * losses.binary_cross_entropy(d_l, jnp.ones_like(d_l))
    total += losses.binary_cross_entropy(d_u, jnp.ones_like(d_u))
  return total


def critic_loss(d_real: Sequence[jax.Array], d_fake: Sequence[jax.Array], real_weight: float,
                fake_weight: float) -> jax.Array:
  """L_adv1 for the critic = Σ_i [(1 − η)·bce(D(Y^i), 1) + η·bce(D(sg p^i), 0)] (labeled only)."""
  total = 0.0
  for d_r, d_f in zip(d_real, d_fake, strict=True):
    total += real_weight * losses.binary_cross_entropy(d_r, jnp.ones_like(d_r))
    total += fake_weight * losses.binary_cross_entropy(d_f, jnp.zeros_like(d_f))
  return total


def segmenter_loss(loss_s: jax.Array, loss_u: jax.Array, loss_c: jax.Array,
                   hp: ml_collections.FrozenConfigDict) -> jax.Array:
  """The segmenters' objective λ_s·L_s + λ_u·L_u + λ_c·L_c."""
  return hp.lambda_s * loss_s + hp.lambda_u * loss_u + hp.lambda_c * loss_c


# ------------------------------------------------------------------------------------------------
# Forward passes.


def split_views(batch: Batch):
  """(X¹, X²) and (Y¹, Y²): the first and second half of the labeled samples; Y float (…, 1)."""
  half = batch.labeled["image"].shape[0] // 2
  y = batch.labeled["label"].astype(jnp.float32)[..., None]
  return (batch.labeled["image"][:half], batch.labeled["image"][half:]), (y[:half], y[half:])


def segment_views(seg: peers.Peers, params, images: Sequence[jax.Array], unlabeled: jax.Array,
                  rng: jax.Array):
  """Train-mode F_i(concat(X^i, U)) for i = 1, 2, one call per segmenter.

  Returns:
    (p¹, p²), (u₁, u₂) foreground probabilities (…, 1) and the updated {"f1", "f2"} batch_stats.
  """
  probs, unlabeled_probs, stats = [], [], {}
  for view, x, key in zip(VIEWS, images, jax.random.split(rng, len(VIEWS))):
    logits, stats[view] = base.forward_train(seg[view], params[view],
                                             jnp.concatenate([x, unlabeled]), key)
    p = jax.nn.sigmoid(logits)
    probs.append(p[:x.shape[0]])
    unlabeled_probs.append(p[x.shape[0]:])
  return tuple(probs), tuple(unlabeled_probs), stats


def segment_views_separately(seg: peers.Peers, params, images: Sequence[jax.Array],
                             unlabeled: jax.Array, rng: jax.Array):
  """Train-mode F₁(X¹), F₂(X²), F₁(U), F₂(U): four calls in this order (the released code's), each
  normalised by its own batch statistics; each network's BN state is threaded from its labeled to
  its unlabeled call, so its running statistics move twice per step.

  Returns:
    as `segment_views`.
  """
  keys = jax.random.split(rng, 2 * len(VIEWS))
  stats = {view: seg[view].batch_stats for view in VIEWS}
  outputs = []
  for call, (view, x) in enumerate([*zip(VIEWS, images), *((v, unlabeled) for v in VIEWS)]):
    logits, stats[view] = base.forward_train(seg[view], params[view], x, keys[call],
                                             batch_stats=stats[view])
    outputs.append(jax.nn.sigmoid(logits))
  n = len(VIEWS)
  return tuple(outputs[:n]), tuple(outputs[n:]), stats


def critic_probabilities(critic: base.TrainState, params, batch_stats, maps: Sequence[jax.Array]):
  """D(m) = σ(critic(m)) for each map, one train-mode call each, BN statistics threaded in order.

  (The reference resizes σ(critic(m)) bilinearly to the size of m, an identity for a 1×1 critic.)
  """
  out = []
  for m in maps:
    logits, batch_stats = base.forward_train(critic, params, m, batch_stats=batch_stats)
    out.append(jax.nn.sigmoid(logits))
  return out, batch_stats


# ------------------------------------------------------------------------------------------------
# The method.


def init(rng: jax.Array, config: ml_collections.ConfigDict, example_batch: Batch) -> State:
  """Two one-logit segmenters (independent initialisations) and the critic.

  Raises:
    DataError: `check_config`'s, or an example batch without two views or unlabeled samples.
  """
  check_config(config)
  base.check_example_batch(example_batch, REQUIREMENTS, "duo")
  cfg = config.method
  hparams = apply_preset(cfg)

  unet = models.get_model(cfg.model.name, num_classes=1, **base.model_kwargs(cfg.model))
  critic = models.get_model(cfg.critic.name, **base.model_kwargs(cfg.critic))
  x = jnp.asarray(example_batch.labeled["image"][:1])
  keys = jax.random.split(rng, 3)
  seg = peers.create_peers(
      VIEWS, lambda key: base.create_train_state(unet, optim.method_optimizer(config), key, x),
      keys[:2])
  critic_state = base.create_train_state(
      critic, optim.method_optimizer(config, "critic_optimizer"), keys[2],
      jnp.zeros((1, *x.shape[1:-1], 1), jnp.float32))
  return State(seg=seg, critic=critic_state, hparams=hparams)


def segmenter_objective(params, seg: peers.Peers, critic: base.TrainState, batch: Batch,
                        rng: jax.Array, hp: ml_collections.FrozenConfigDict):
  """λ_s·L_s + λ_u·L_u + λ_c·L_c as a function of the segmenters' `params` {"f1", "f2"}.

  Segmenters and critic run in train mode (module docstring); the critic's parameters are constants.

  Returns:
    (total, (aux, segmenter batch_stats, critic batch_stats)); aux holds the loss terms, the mean
    D(u_i) and the labeled predictions (p¹, p²).
  """
  (x1, x2), labels = split_views(batch)
  segment = segment_views_separately if hp.separate_bn_calls else segment_views
  probs, (u1, u2), seg_stats = segment(seg, params, (x1, x2), batch.unlabeled["image"], rng)
  d, critic_stats = critic_probabilities(critic, critic.params, critic.batch_stats,
                                         (*probs, u1, u2))
  loss_s = supervised_loss(probs, labels, hp.w_dice)
  loss_u = unlabeled_loss(u1, u2)
  loss_c = segmenter_adversarial_loss(d[:2], d[2:], hp.eta_segmenter)
  total = segmenter_loss(loss_s, loss_u, loss_c, hp)
  aux = dict(loss_s=loss_s, loss_u=loss_u, loss_c=loss_c, loss_total=total,
             d_unlabeled=0.5 * (jnp.mean(d[2]) + jnp.mean(d[3])), probs=probs)
  return total, (aux, seg_stats, critic_stats)


def segmenter_step(seg: peers.Peers, critic: base.TrainState, batch: Batch, rng: jax.Array,
                   hp: ml_collections.FrozenConfigDict):
  """One descent step of both segmenters on λ_s·L_s + λ_u·L_u + λ_c·L_c (critic parameters fixed).

  Returns:
    (seg, critic with updated BN running statistics, aux) where aux holds the losses, the mean D on
    the unlabeled predictions and the pre-update labeled predictions (p¹, p²).
  """
  seg, critic, _, aux = adversarial.segmenter_step(
      seg, critic, lambda params, frozen_critic: segmenter_objective(params, seg, frozen_critic,
                                                                     batch, rng, hp))
  return seg, critic, aux


def critic_objective(params, critic: base.TrainState, fakes: Sequence[jax.Array],
                     labels: Sequence[jax.Array], hp: ml_collections.FrozenConfigDict):
  """L_adv1 as a function of the critic's `params`: fakes sg p^i, reals Y^i (no unlabeled maps).

  Returns:
    (loss, (aux, critic batch_stats)); aux holds the loss and the mean D on fakes and reals.
  """
  d, stats = critic_probabilities(critic, params, critic.batch_stats, (*fakes, *labels))
  loss = critic_loss(d[2:], d[:2], hp.critic_real, hp.critic_fake)
  aux = dict(loss_critic=loss, d_fake=0.5 * (jnp.mean(d[0]) + jnp.mean(d[1])),
             d_real=0.5 * (jnp.mean(d[2]) + jnp.mean(d[3])))
  return loss, (aux, stats)


def critic_step(critic: base.TrainState, probs: Sequence[jax.Array], labels: Sequence[jax.Array],
                hp: ml_collections.FrozenConfigDict):
  """One RMSprop step of the critic on L_adv1; returns (critic, aux). Touches no segmenter."""
  critic, _, aux = adversarial.critic_step(
      critic, tuple(probs),
      lambda params, fakes: critic_objective(params, critic, fakes, labels, hp))
  return critic, aux


def train_step(state: State, batch: Batch, rng: jax.Array):
  """k_s segmenter steps, then k_c critic steps on the last segmenter step's predictions.

  The loops are Python loops (k_s, k_c are small static integers). Metrics are those of the last
  step of each kind; d_real / d_fake are the mean D on the masks / labeled predictions before the
  last critic update, d_unlabeled the mean D(u_i) of the last segmenter step.
  """
  hp = state.hparams
  seg, critic = state.seg, state.critic
  for s in range(hp.k_s):
    seg, critic, seg_aux = segmenter_step(seg, critic, batch, jax.random.fold_in(rng, s), hp)
  probs = seg_aux.pop("probs")
  _, labels = split_views(batch)
  for _ in range(hp.k_c):
    critic, critic_aux = critic_step(critic, probs, labels, hp)
  rates = dict(learning_rate=optim.learning_rate(seg[VIEWS[0]]),
               learning_rate_critic=optim.learning_rate(critic))
  return state.replace(seg=seg, critic=critic), base.scalar_metrics(**seg_aux, **critic_aux,
                                                                    **rates)


def predict(state: State, inputs: dict) -> dict:
  """Eval-mode foreground probabilities of both segmenters on `inputs["image"]`: {"f1", "f2"},
  each (B, *spatial, 1)."""
  return {view: jax.nn.sigmoid(base.forward_eval(state.seg[view], inputs["image"]))
          for view in VIEWS}
