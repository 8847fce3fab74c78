"""DKUXNet: two UX-Net segmenters with kMaX decoders that learn from each other (docs/methods/dkuxnet.md).

The poster (3D UX-Net backbone, a kMaX decoder whose cluster centres group into "query groups", two
networks and a "dual kMaX-based contrastive learning strategy") gives the architecture and the
shape of the losses but not their weights, the temperature, the number of centres, the optimiser
or the run length; its released code trains one supervised network and has no semi-supervised
part. The default preset, `dkux-v1`, is our explicit interpretation; every choice below that the
poster does not state is ours.

Per network k ∈ {A, B} (`jaxseg.models.dkuxnet.DKUXNet`): P^k = softmax of the conv head, R^k =
softmax over the N centres of the kMaX mask logits, and the grouped query distribution
D^k_g = Σ_{n ∈ G_g} R^k_n over contiguous groups of centres (`method.groups`, e.g. 16 background +
16 atrium centres; `losses.group_probabilities`).

One iteration of `dkux-v1`, on the batch x = concat(x_𝓛, x_𝓤) (both networks see the same batch):

    L_sup^k  = dice_ce(z^k_𝓛, y) + w_qd · L_qd(D^k_𝓛, y)                      (monai_dice_ce_loss,
                                                                              query_distribution_loss)
    c        = 1[y > 0] on labeled samples, 1[argmax sg P^peer > 0] on unlabeled ones
    L_segc^k = contrast(P^k, sg P^peer, c),   L_qdc^k = contrast(D^k, sg D^peer, c)
    L        = Σ_k [L_sup^k + λ_c(t) · (L_segc^k + L_qdc^k)],   λ_c(t) = λ · sigmoid_rampup(⌊t/b⌋, r)

where contrast is `losses.voxel_contrastive_loss`: M anchor voxels per sample stratified by c, the
positive of anchor i its own voxel in the stopped peer, the negatives the peer's anchors of the
other class, temperature τ. The anchors of network k come from its own key (fold_in of the step's
key with k), the same anchors for both of its terms. One gradient of L with respect to both
networks' parameters; each network applies its part with its own AdamW state (`peers.Peers`).

Presets (`method.preset`):
- `dkux-v1` (default): the above, two networks.
- `released`: the released training script: one network, dice_ce + w_qd · the voxel-summed, ε-free
  query distribution loss (`losses.released_query_distribution_loss`), groups 16 / 4 / 108 of
  N = 128 centres (the config sets them).
- `supervised`: one network, dice_ce of the conv head alone (the kMaX decoder is not built): the
  supervised UX-Net baseline with the same labels, batches, optimiser and steps.

Inference (`predict`): softmax of the conv head of network A ("A"); with two networks also B ("B")
and the mean of the two probability maps ("avg"). `--mode predict` writes "A" (the first view).

CPU: `init` builds the networks on a (1, 16, 16, 16, C) input (parameter shapes do not depend on
the crop), traces one initialisation vmapped over the networks' keys, and draws the parameters with
"rbg" keys (`init_keys`): XLA:CPU compiles the ~400 per-parameter threefry draws of two networks
for minutes. The depthwise convolutions of the UX-Net and of the kMaX pixel heads run as dense
block-diagonal convolutions on CPU (`uxnet.GroupedConv`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from jaxseg import losses, models, optim, schedules
from jaxseg.data.base import DataError
from jaxseg.data.batches import Batch
from jaxseg.methods import base, peers
from jaxseg.models.uxnet import DOWNSAMPLING

PRESETS = ("dkux-v1", "released", "supervised")
NEGATIVES = ("other_class", "all")
SIMILARITIES = ("cosine", "dot")
# The networks of each preset, in view order.
NETWORKS = {"dkux-v1": ("A", "B"), "released": ("A",), "supervised": ("A",)}


def default_config() -> ml_collections.ConfigDict:
  """The `method` block of `dkux-v1` at the LA sizes (docs/methods/dkuxnet.md, hyperparameters)."""
  c = ml_collections.ConfigDict()
  c.name = "dkuxnet"
  c.preset = "dkux-v1"
  c.groups = (16, 16)  # Centres per query group: background, foreground (N = 32).
  c.qd_weight = 0.1  # w_qd.
  c.contrast_weight = 0.1  # λ, the weight λ_c(t) ramps up to.
  c.rampup_block = 150  # b: λ_c is constant over blocks of b steps...
  c.rampup_length = 40  # ...and reaches λ after r blocks (6000 steps at the LA values).
  c.num_anchors = 512  # M anchor voxels per sample.
  c.temperature = 0.1  # τ.
  c.negatives = "other_class"  # Or "all" (every other anchor, the poster's Σ_{k≠i} read literally).
  c.include_positive_in_denominator = False
  c.similarity = "cosine"  # Or "dot".
  c.model = ml_collections.ConfigDict(dict(
      name="dkuxnet", feature_size=48, centre_dim=256, key_dim=128, value_dim=256, num_heads=8,
      ffn_dim=2048, dtype="float32"))
  c.optimizer = optim.optimizer_config("adamw", 1e-4, weight_decay=0.01)
  return c


REQUIREMENTS = base.Requirements(classes="any", unlabeled=False, modalities="any")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The method block and the data it needs; raises a DataError naming the key."""
  base.check_requirements(config, REQUIREMENTS)
  cfg = config.method
  base.check_choice(cfg, "preset", PRESETS)
  base.check_choice(cfg, "negatives", NEGATIVES)
  base.check_choice(cfg, "similarity", SIMILARITIES)
  for key in ("qd_weight", "contrast_weight"):
    base.check_positive(cfg, key)
  base.check_positive(cfg, "temperature", allow_zero=False)
  base.check_count(cfg, "rampup_block")
  base.check_count(cfg, "rampup_length", minimum=0)
  base.check_count(cfg, "num_anchors", minimum=2)
  if not isinstance(cfg.include_positive_in_denominator, bool):
    raise DataError(f"config method.include_positive_in_denominator = "
                    f"{cfg.include_positive_in_denominator!r} must be True or False")
  groups = tuple(cfg.groups)
  if not groups or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in groups):
    raise DataError(f"config method.groups = {groups!r} must be centres per group, integers >= 1")
  if cfg.preset == "dkux-v1" and len(groups) != config.data.num_classes:
    raise DataError(f"config method.groups = {groups!r}: dkux-v1 has one query group per class, "
                    f"data.num_classes = {config.data.num_classes}")
  if cfg.preset == "dkux-v1" and config.data.batch_unlabeled < 1:
    raise DataError(f"config data.batch_unlabeled = {config.data.batch_unlabeled}: dkux-v1 "
                    "learns from unlabeled samples (>= 1)")
  base.check_choice(cfg.model, "name", ("dkuxnet",), where="method.model")
  base.check_count(cfg.model, "feature_size", where="method.model")
  base.check_crop_sizes(config, 16, "the UX-Net halves the crop four times")


@flax.struct.dataclass
class State:
  """DKUXNet's training state.

  Attributes:
    nets: the networks ("A", "B" for dkux-v1; "A" otherwise), each with its own AdamW state.
    hparams: the method block's scalars (static).
  """
  nets: peers.Peers
  hparams: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)


def network(config: ml_collections.ConfigDict):
  """The DKUXNet module of the config (no kMaX decoder for the `supervised` preset)."""
  cfg = config.method
  return models.get_model("dkuxnet", num_classes=config.data.num_classes,
                          num_centres=int(sum(cfg.groups)), kmax=cfg.preset != "supervised",
                          **base.model_kwargs(cfg.model))


def init_keys(rng: jax.Array, num: int) -> jax.Array:
  """`num` independent "rbg" keys (stacked) for the networks' initialisations, drawn from `rng`
  (any key implementation).

  Parameter initialisers draw their bits with XLA's RngBitGenerator instead of threefry, which
  XLA:CPU compiles several times faster (one network's init: ≈25 s instead of ≈85 s on a loaded
  2-core CPU). The draws differ from a threefry init of the same seed, and RngBitGenerator's bits
  may differ between backends (the same on one backend and JAX version).
  """
  bits = jax.random.bits(rng, (num, 4), jnp.uint32)
  return jax.random.wrap_key_data(bits, impl="rbg")


def init(rng: jax.Array, config: ml_collections.ConfigDict, example_batch: Batch) -> State:
  """The preset's networks, initialised independently, each with its own optimiser state."""
  check_config(config)
  base.check_example_batch(example_batch, REQUIREMENTS, "dkuxnet")
  cfg = config.method
  module = network(config)
  image = example_batch.labeled["image"]
  # Parameter shapes do not depend on the spatial size (every size divisible by 16): the smallest.
  x = jnp.zeros((1,) + (DOWNSAMPLING,) * (image.ndim - 2) + image.shape[-1:], image.dtype)
  names = NETWORKS[cfg.preset]
  create = lambda key: base.create_train_state(module, optim.method_optimizer(config), key, x)
  # One traced initialisation, vmapped over the networks' keys, with "rbg" keys (module docstring,
  # CPU); the networks stay independent (their own keys).
  stacked = jax.vmap(create)(init_keys(rng, len(names)))
  nets = peers.Peers({name: jax.tree.map(lambda a, i=i: a[i], stacked)
                      for i, name in enumerate(names)})
  hparams = ml_collections.FrozenConfigDict(dict(
      preset=cfg.preset, groups=tuple(int(g) for g in cfg.groups),
      qd_weight=float(cfg.qd_weight), contrast_weight=float(cfg.contrast_weight),
      rampup_block=int(cfg.rampup_block), rampup_length=int(cfg.rampup_length),
      num_anchors=int(cfg.num_anchors), temperature=float(cfg.temperature),
      negatives=cfg.negatives, include_positive=cfg.include_positive_in_denominator,
      similarity=cfg.similarity))
  return State(nets=nets, hparams=hparams)


# ------------------------------------------------------------------------------------------------
# The losses of one network.


def supervised_loss(outputs: dict, labels: jax.Array, hp) -> tuple[jax.Array, dict]:
  """L_sup of one network's labeled outputs ("logits", and "groups" = D unless `supervised`, as
  `objective` computes them): dice_ce of the conv head, plus w_qd times the query distribution
  loss of the preset (none for `supervised`). Returns (L_sup, its terms)."""
  dice_ce = losses.monai_dice_ce_loss(outputs["logits"], labels)
  if hp.preset == "supervised":
    return dice_ce, {"dice_ce": dice_ce}
  groups = outputs["groups"]
  if hp.preset == "released":
    qd = losses.released_query_distribution_loss(groups, labels)
  else:
    qd = losses.query_distribution_loss(groups, labels)
  return dice_ce + hp.qd_weight * qd, {"dice_ce": dice_ce, "qd": qd}


def contrast_classes(labels: jax.Array, peer_probs_unlabeled: jax.Array) -> jax.Array:
  """c (B, *S) in {0, 1}: foreground by the label on the labeled samples, by the stopped peer's
  argmax on the unlabeled ones (labeled first, as the batch)."""
  pseudo = jnp.argmax(jax.lax.stop_gradient(peer_probs_unlabeled), axis=-1)
  return jnp.concatenate([labels > 0, pseudo > 0]).astype(jnp.int32)


def contrastive_terms(key: jax.Array, mine: dict, peer: dict, classes: jax.Array, hp
                      ) -> tuple[jax.Array, jax.Array]:
  """(L_segc, L_qdc) of one network against its peer: the contrast of the probabilities P and of
  the grouped distributions D, at the same anchors (one key)."""
  options = dict(num_anchors=hp.num_anchors, temperature=hp.temperature, negatives=hp.negatives,
                 include_positive_in_denominator=hp.include_positive, similarity=hp.similarity)
  segc = losses.voxel_contrastive_loss(key, mine["probs"], peer["probs"], classes, **options)
  qdc = losses.voxel_contrastive_loss(key, mine["groups"], peer["groups"], classes, **options)
  return segc, qdc


def contrast_weight(step: jax.Array, hp) -> jax.Array:
  """λ_c(t) = λ · sigmoid_rampup(⌊t/b⌋, r)."""
  return schedules.consistency_weight(step, hp.contrast_weight, hp.rampup_length,
                                      block=hp.rampup_block)


# ------------------------------------------------------------------------------------------------
# The method.


def objective(params: dict, nets: peers.Peers, batch: Batch, rng: jax.Array, hp):
  """L as a function of every network's parameters {name: params}.

  Returns:
    (L, (metrics, {name: batch_stats})).
  """
  images = base.all_images(batch)
  labels = batch.labeled["label"]
  num_labeled = labels.shape[0]
  outputs, stats = {}, {}
  for name in nets.names:
    out, stats[name] = base.forward_train(nets[name], params[name], images)
    out = dict(out)
    out["probs"] = jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)
    if "mask_logits" in out:
      out["groups"] = losses.group_probabilities(out["mask_logits"], hp.groups)
    outputs[name] = out
  total, metrics = 0.0, {}
  weight = contrast_weight(nets[nets.names[0]].step, hp)
  for k, name in enumerate(nets.names):
    labeled = jax.tree.map(lambda a: a[:num_labeled], outputs[name])
    sup, terms = supervised_loss(labeled, labels, hp)
    total = total + sup
    metrics.update({f"{term}_{name}": value for term, value in terms.items()})
    if len(nets.names) == 2:
      peer = outputs[nets.names[1 - k]]
      classes = contrast_classes(labels, peer["probs"][num_labeled:])
      segc, qdc = contrastive_terms(jax.random.fold_in(rng, k), outputs[name], peer, classes, hp)
      total = total + weight * (segc + qdc)
      metrics.update({f"segc_{name}": segc, f"qdc_{name}": qdc})
  if len(nets.names) == 2:
    metrics["contrast_weight"] = weight
  return total, (metrics, stats)


def train_step(state: State, batch: Batch, rng: jax.Array):
  """One AdamW step of every network on L.

  Metrics: loss, dice_ce_<net>, qd_<net> (not `supervised`), segc_<net>, qdc_<net> and
  contrast_weight (`dkux-v1`), learning_rate.
  """
  nets, loss, metrics = base.gradient_step(
      state.nets, lambda params: objective(params, state.nets, batch, rng, state.hparams))
  return state.replace(nets=nets), base.scalar_metrics(
      loss=loss, **metrics, learning_rate=optim.learning_rate(nets[nets.names[0]]))


def predict(state: State, inputs: dict) -> dict:
  """Eval-mode class probabilities (B, *S, K) of the conv heads: {"A"}, with two networks also
  {"B", "avg"} (the mean of A's and B's probabilities)."""
  probs = {name: jax.nn.softmax(
      base.forward_eval(state.nets[name], inputs["image"])["logits"].astype(jnp.float32), axis=-1)
      for name in state.nets.names}
  if len(probs) == 2:
    probs["avg"] = 0.5 * (probs["A"] + probs["B"])
  return probs
