"""Every config and preset loads; the LA presets carry the LA protocol (docs/la_protocol.md)."""

import math

import pytest

from conftest import CONFIGS_DIR, load_config_file as load

# configs/_*.py are helpers the config files load (e.g. _la_family.py), not config files.
CONFIGS = sorted(p for p in CONFIGS_DIR.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_loads_and_the_docstring_gives_the_command(path):
  module = load(path)
  assert f"python -m jaxseg.main --config configs/{path.name}" in module.__doc__
  for preset in module.PRESETS:
    config = module.get_config(preset)
    assert config.name and config.job
  with pytest.raises(ValueError, match="unknown preset"):
    module.get_config("no_such_preset")


@pytest.mark.parametrize("name", ["duo"])
def test_la_presets_follow_the_protocol(name):
  config = load(CONFIGS_DIR / f"{name}.py").get_config("la")
  assert config.data.source == "la"
  assert (config.data.num_labeled, config.data.num_validation) == (8, 8)
  assert tuple(config.data.patch_size) == (112, 112, 80)
  assert config.train.num_steps == 6000
  assert tuple(config.eval.strides) == (18, 18, 4)
  assert config.data.batch_labeled + config.data.batch_unlabeled == 4


def test_duo_quick_start_is_2d_and_fast_shaped():
  """`python -m jaxseg.main --config configs/duo.py` (the README's first command) trains on the 2D
  synthetic images with the small UNet for 400 steps (a few minutes on a 2-core CPU), and
  `configs/supervised.py` is its baseline: same data, labeled cases, backbone and steps."""
  duo = load(CONFIGS_DIR / "duo.py").get_config("")
  assert duo.data.source == "synthetic"
  assert tuple(duo.data.synthetic.shape) == (128, 128) and duo.data.synthetic.num_cases == 100
  assert tuple(duo.data.patch_size) == (96, 96)
  assert (duo.data.num_labeled, duo.data.num_validation) == (10, 20)
  assert (duo.data.batch_labeled, duo.data.batch_unlabeled, duo.data.labeled_groups) == (2, 2, 2)
  assert tuple(duo.method.model.features) == (8, 16, 32, 64)
  assert duo.method.preset == "paper" and duo.train.num_steps == 400 and duo.seed == 0
  base = load(CONFIGS_DIR / "supervised.py").get_config("")
  assert base.data.to_dict() == {**duo.data.to_dict(), "labeled_groups": 1, "batch_unlabeled": 0}
  assert base.method.model.to_dict() == duo.method.model.to_dict()
  assert base.train.num_steps == duo.train.num_steps and base.seed == duo.seed


@pytest.mark.parametrize("name", ["duo", "supervised"])
def test_synthetic3d_preset_keeps_the_3d_volumes(name):
  config = load(CONFIGS_DIR / f"{name}.py").get_config("synthetic3d")
  assert tuple(config.data.synthetic.shape) == (64, 64, 48)
  assert tuple(config.data.patch_size) == (32, 32, 32)
  assert (config.data.num_labeled, config.data.num_validation) == (4, 4)
  assert config.train.num_steps == 400


LA_FAMILY = ["supervised_vnet", "dtc", "sassnet", "mean_teacher", "uamt"]


@pytest.mark.parametrize("name", LA_FAMILY)
@pytest.mark.parametrize("preset, labeled", [("la8", 8), ("la16", 16)])
def test_la_family_presets_follow_the_protocol(name, preset, labeled):
  """docs/la_protocol.md: labeled = first N of train.list, validation = 8 drawn from the rest
  (seed 0), 112x112x80, 2 + 2 (4 labeled for the supervised baseline), SGD 0.01 momentum 0.9 wd
  1e-4 x0.1 every 2500, 6000 steps, window strides (18, 18, 4), V-Net of width 16, ramps of 40
  blocks of 150 steps."""
  config = load(CONFIGS_DIR / f"{name}.py").get_config(preset)
  assert config.data.source == "la" and config.data.list_name == "train.list"
  assert (config.data.num_labeled, config.data.num_validation) == (labeled, 8)
  assert (config.data.validation, config.data.validation_seed) == ("random", 0)
  assert tuple(config.data.patch_size) == (112, 112, 80)
  assert (config.data.batch_labeled, config.data.batch_unlabeled) == (
      (4, 0) if name == "supervised_vnet" else (2, 2))
  opt = config.method.optimizer
  assert (opt.name, opt.learning_rate, opt.momentum, opt.weight_decay) == ("sgd", 0.01, 0.9, 1e-4)
  assert (opt.decay_every, opt.decay_factor) == (2500, 0.1)
  assert config.train.num_steps == 6000
  assert tuple(config.eval.patch_size) == (112, 112, 80)
  assert tuple(config.eval.strides) == (18, 18, 4) and config.eval.threshold == 0.5
  assert config.method.model.n_filters == 16
  if "rampup_block" in config.method:
    assert (config.method.rampup_block, config.method.consistency_rampup) == (150, 40)
  if "threshold_rampup" in config.method:
    assert config.method.threshold_rampup == 6000


@pytest.mark.parametrize("name", LA_FAMILY)
def test_la_family_default_runs_on_synthetic_data_with_squeezed_ramps(name):
  config = load(CONFIGS_DIR / f"{name}.py").get_config("")
  assert config.data.source == "synthetic" and config.train.num_steps == 400
  if "rampup_block" in config.method:
    assert config.method.rampup_block * config.method.consistency_rampup == 400


def test_la_presets_of_dtc_and_sassnet_are_the_published_settings():
  assert load(CONFIGS_DIR / "dtc.py").get_config("la8").method.preset == "released"
  sassnet = load(CONFIGS_DIR / "sassnet.py")
  assert sassnet.get_config("la8").method.beta_max == 0.015
  assert sassnet.get_config("la16").method.beta_max == 0.01


@pytest.mark.parametrize("preset, labeled", [("la8", 8), ("la16", 16)])
def test_asdnet_la_presets_follow_the_protocol_with_adam(preset, labeled):
  """The LA protocol of the family (data, crops, steps, window), C = 2, but the method's Adam
  optimisers (S 1e-3, D 1e-4, coupled decay 1e-4, x0.1 at 2500 and 5000), not the family's SGD."""
  config = load(CONFIGS_DIR / "asdnet.py").get_config(preset)
  assert config.data.source == "la" and config.data.num_classes == 2
  assert (config.data.num_labeled, config.data.num_validation) == (labeled, 8)
  assert tuple(config.data.patch_size) == (112, 112, 80)
  assert (config.data.batch_labeled, config.data.batch_unlabeled) == (2, 2)
  assert config.train.num_steps == 6000
  assert tuple(config.eval.patch_size) == (112, 112, 80) and tuple(config.eval.strides) == (18, 18, 4)
  for key, lr in (("optimizer", 1e-3), ("confidence_optimizer", 1e-4)):
    opt = config.method[key]
    assert (opt.name, opt.learning_rate, opt.weight_decay) == ("adam", lr, 1e-4)
    assert tuple(opt.decay_boundaries) == (2500, 5000) and opt.decay_factor == 0.1


@pytest.mark.parametrize("preset, labeled", [("la8_released", 8), ("la16_released", 16)])
def test_asdnet_released_la_presets(preset, labeled):
  """The LA data protocol with the released code's batch: 3 sub-batches of 3 crops of 64x64x16
  from either stream (9 + 9), validated every 1000 steps (its semi threshold reads that Dice)."""
  config = load(CONFIGS_DIR / "asdnet.py").get_config(preset)
  assert config.data.source == "la" and config.data.num_classes == 2
  assert (config.data.num_labeled, config.data.num_validation) == (labeled, 8)
  assert tuple(config.data.patch_size) == (64, 64, 16)
  assert (config.data.batch_labeled, config.data.batch_unlabeled) == (9, 9)
  assert config.method.sub_batches == 3 and config.train.eval_every == 1000
  assert config.train.num_steps == 6000
  assert tuple(config.eval.patch_size) == (112, 112, 80) and tuple(config.eval.strides) == (18, 18, 4)


def test_asdnet_released_synthetic_preset_validates_during_the_run():
  config = load(CONFIGS_DIR / "asdnet.py").get_config("released")
  assert config.data.source == "synthetic" and config.data.num_classes == 4
  assert (config.data.batch_labeled, config.data.batch_unlabeled) == (3, 3)
  assert 0 < config.train.eval_every < config.train.num_steps == 400


def test_asdnet_default_has_several_organs():
  config = load(CONFIGS_DIR / "asdnet.py").get_config("")
  assert config.data.source == "synthetic" and config.data.num_classes >= 4
  assert tuple(config.data.patch_size) == (32, 32, 16) and config.train.num_steps == 400
  assert config.data.num_labeled == 4 and config.data.batch_unlabeled >= 1


# ------------------------------------------------------------------------------------------------
# Every key of every method block, pinned to its value: a changed default fails here.

# The optimiser blocks, every field (jaxseg.optim.optimizer_config).
LA_SGD = dict(name="sgd", learning_rate=0.01, momentum=0.9, nesterov=False, weight_decay=1e-4,
              beta1=0.9, beta2=0.999, eps=1e-8, alpha=0.99, schedule="step", decay_every=2500,
              decay_factor=0.1, decay_boundaries=(), poly_power=0.9, min_learning_rate=0.0,
              total_steps=0, warmup_steps=0, lr_multipliers=(), weight_decay_mask="",
              clip_grad_norm=0.0)
PLAIN_SGD = dict(name="sgd", learning_rate=0.01, momentum=0.9, nesterov=False, weight_decay=0.0,
                 beta1=0.9, beta2=0.999, eps=1e-8, alpha=0.99, schedule="constant",
                 decay_every=0, decay_factor=0.1, decay_boundaries=(), poly_power=0.9,
                 min_learning_rate=0.0, total_steps=0, warmup_steps=0, lr_multipliers=(),
                 weight_decay_mask="", clip_grad_norm=0.0)
DUO_RMSPROP = dict(name="rmsprop", learning_rate=5e-5, momentum=0.0, nesterov=False,
                   weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8, alpha=0.99,
                   schedule="constant", decay_every=0, decay_factor=0.1, decay_boundaries=(),
                   poly_power=0.9, min_learning_rate=0.0, total_steps=0, warmup_steps=0,
                   lr_multipliers=(), weight_decay_mask="", clip_grad_norm=0.0)
SASSNET_ADAM = dict(name="adam", learning_rate=1e-4, momentum=0.9, nesterov=False,
                    weight_decay=0.0, beta1=0.9, beta2=0.99, eps=1e-8, alpha=0.99,
                    schedule="constant", decay_every=0, decay_factor=0.1, decay_boundaries=(),
                    poly_power=0.9, min_learning_rate=0.0, total_steps=0, warmup_steps=0,
                    lr_multipliers=(), weight_decay_mask="", clip_grad_norm=0.0)


def _duo(features, preset="paper", separate_bn_calls=False):
  return dict(name="duo", preset=preset, lambda_s=0.5, lambda_u=0.4, lambda_c=0.2, eta=0.5,
              w_dice=0.0, k_s=1, k_c=1, separate_bn_calls=separate_bn_calls,
              model=dict(name="unet", features=features, norm="batch",
                         upsample="linear_align_corners", dtype="float32"),
              critic=dict(name="duo_critic", ndf=64, dtype="float32"),
              optimizer=PLAIN_SGD, critic_optimizer=DUO_RMSPROP)


def _dtc(preset, n_filters, rampup_block):
  return dict(name="dtc", preset=preset, beta=1.0, k=1500.0, consistency=1.0,
              consistency_rampup=40, rampup_block=rampup_block,
              model=dict(name="vnet_sdf", n_filters=n_filters, dtype="float32"), optimizer=LA_SGD)


def _mean_teacher(n_filters, rampup_block):
  return dict(name="mean_teacher", ema_decay=0.99, consistency=0.1, consistency_rampup=40.0,
              rampup_block=rampup_block, model=dict(name="vnet", n_filters=n_filters,
                                                    dtype="float32"), optimizer=LA_SGD)


def _uamt(n_filters, rampup_block, threshold_rampup):
  return dict(name="uamt", preset="paper", ema_decay=0.99, consistency=0.1,
              consistency_rampup=40.0, rampup_block=rampup_block,
              threshold_rampup=threshold_rampup,
              model=dict(name="vnet", n_filters=n_filters, dtype="float32"), optimizer=LA_SGD)


def _sassnet(n_filters, ndf, rampup_block, beta_max):
  return dict(name="sassnet", preset="paper", beta=0.3, beta_max=beta_max, consistency_rampup=40,
              rampup_block=rampup_block,
              model=dict(name="vnet_sdf", n_filters=n_filters, dtype="float32"),
              discriminator=dict(name="sassnet_discriminator", ndf=ndf, dtype="float32"),
              optimizer=LA_SGD, discriminator_optimizer=SASSNET_ADAM)


ASDNET_ADAM = dict(name="adam", learning_rate=1e-3, momentum=0.9, nesterov=False, weight_decay=1e-4,
                   beta1=0.9, beta2=0.999, eps=1e-8, alpha=0.99, schedule="step", decay_every=0,
                   decay_factor=0.1, decay_boundaries=(2500, 5000), poly_power=0.9,
                   min_learning_rate=0.0, total_steps=0, warmup_steps=0, lr_multipliers=(),
                   weight_decay_mask="", clip_grad_norm=0.0)


def _asdnet(n_filters, features):
  return dict(name="asdnet", preset="paper", beta=2.0, lambda_adv=0.03, lambda_semi=0.3, gamma=0.5,
              sub_batches=3, labeled_probability=0.5, aux_weights=(0.4, 0.2),
              released_fix_dice_backward=False,
              model=dict(name="svnet", n_filters=n_filters, dtype="float32"),
              confidence=dict(name="asdnet_confidence", features=features, decoder="repaired",
                              dtype="float32"),
              optimizer=ASDNET_ADAM, confidence_optimizer={**ASDNET_ADAM, "learning_rate": 1e-4})


def _asdnet_released(features):
  """The released code's method block (`asdnet.released_config`): its segmenter, the as-coded
  confidence net, weights 0.05 / 0.5, Adam 2e-3 x0.1 every 10000 (S) and 1e-4 (D), no decay."""
  return dict(name="asdnet", preset="released", beta=2.0, lambda_adv=0.05, lambda_semi=0.5,
              gamma=0.5, sub_batches=3, labeled_probability=0.5, aux_weights=(0.4, 0.2),
              released_fix_dice_backward=False,
              model=dict(name="hrres_segnet_ds", features=features, dtype="float32"),
              confidence=dict(name="asdnet_confidence", features=features, decoder="as_coded",
                              dtype="float32"),
              optimizer={**ASDNET_ADAM, "learning_rate": 2e-3, "weight_decay": 0.0,
                         "decay_every": 10000, "decay_boundaries": ()},
              confidence_optimizer={**ASDNET_ADAM, "learning_rate": 1e-4, "weight_decay": 0.0,
                                    "schedule": "constant", "decay_boundaries": ()})


def _supervised(features):
  return dict(name="supervised", loss="bce",
              model=dict(name="unet", features=features, norm="batch",
                         upsample="linear_align_corners", dtype="float32"), optimizer=PLAIN_SGD)


def _supervised_vnet(n_filters):
  return dict(name="supervised", loss="ce_dice",
              model=dict(name="vnet", n_filters=n_filters, dtype="float32"), optimizer=LA_SGD)


# nnU-Net v1's moreDA augmentation (jaxseg.data.nnunet_augment defaults): ±30 degrees per axis.
_DEG30 = 30.0 / 360.0 * 2.0 * math.pi
NNUNET_MORE_DA = dict(
    p_rotation=0.2, rotation_x=(-_DEG30, _DEG30), rotation_y=(-_DEG30, _DEG30),
    rotation_z=(-_DEG30, _DEG30), p_rotation_per_axis=1.0, p_scale=0.2, scale_range=(0.7, 1.4),
    p_noise=0.1, noise_std_range=(0.0, 0.1), p_blur=0.2, p_blur_per_channel=0.5,
    blur_sigma_range=(0.5, 1.0), p_brightness=0.15, brightness_range=(0.75, 1.25),
    p_contrast=0.15, contrast_range=(0.75, 1.25), p_low_resolution=0.25,
    p_low_resolution_per_channel=0.5, low_resolution_zoom_range=(0.5, 1.0), p_gamma_inverted=0.1,
    p_gamma=0.3, gamma_range=(0.7, 1.5), gamma_retain_stats=True, p_mirror_per_axis=0.5,
    mirror_axes=None)
# MAMLTrainerV2: SGD 1e-2, Nesterov momentum 0.99, weight decay 3e-5, poly, gradient norm 12.
MAML_SGD = dict(name="sgd", learning_rate=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5,
                beta1=0.9, beta2=0.999, eps=1e-8, alpha=0.99, schedule="poly", decay_every=0,
                decay_factor=0.1, decay_boundaries=(), poly_power=0.9, min_learning_rate=0.0,
                total_steps=0, warmup_steps=0, lr_multipliers=(), weight_decay_mask="",
                clip_grad_norm=12.0)


def _maml(base_features, num_pools, fusion="maml"):
  return dict(name="maml", preset="paper", branch_weight=1.0, fusion=fusion, batch_dice=True,
              augment=True,
              nnunet_augment=NNUNET_MORE_DA,
              model=dict(name="maml", base_features=base_features, num_pools=num_pools,
                         shared_init="torch", dtype="float32"),
              optimizer=MAML_SGD)


# dkuxnet.default_config(): AdamW 1e-4, decoupled weight decay 0.01, constant.
DKUX_ADAMW = dict(name="adamw", learning_rate=1e-4, momentum=0.9, nesterov=False, weight_decay=0.01,
                  beta1=0.9, beta2=0.999, eps=1e-8, alpha=0.99, schedule="constant",
                  decay_every=0, decay_factor=0.1, decay_boundaries=(), poly_power=0.9,
                  min_learning_rate=0.0, total_steps=0, warmup_steps=0, lr_multipliers=(),
                  weight_decay_mask="", clip_grad_norm=0.0)
# The CPU-sized networks of the synthetic presets, and the reference widths of the LA ones.
DKUX_SMALL = dict(name="dkuxnet", feature_size=8, centre_dim=32, key_dim=16, value_dim=32,
                  num_heads=2, ffn_dim=64, dtype="float32")
DKUX_FULL = dict(name="dkuxnet", feature_size=48, centre_dim=256, key_dim=128, value_dim=256,
                 num_heads=8, ffn_dim=2048, dtype="float32")


def _dkuxnet(preset, groups, model, rampup_block, rampup_length):
  return dict(name="dkuxnet", preset=preset, groups=groups, qd_weight=0.1, contrast_weight=0.1,
              rampup_block=rampup_block, rampup_length=rampup_length, num_anchors=512,
              temperature=0.1, negatives="other_class", include_positive_in_denominator=False,
              similarity="cosine", model=model, optimizer=DKUX_ADAMW)


METHOD_BLOCKS = {
    ("duo", ""): _duo((8, 16, 32, 64)),
    ("duo", "synthetic2d"): _duo((16, 32, 64, 128)),
    ("duo", "synthetic3d"): _duo((8, 16, 32, 64)),
    ("duo", "la"): _duo((16, 32, 64, 128, 256)),
    ("duo", "nuclei"): _duo((64, 128, 256, 512, 1024)),
    ("duo", "heart"): _duo((64, 128, 256, 512, 1024)),
    ("duo", "spleen"): _duo((64, 128, 256, 512, 1024)),
    ("duo", "paper"): _duo((16, 32, 64, 128)),
    ("duo", "released"): _duo((16, 32, 64, 128), "released", True),
    ("duo", "nuclei_released"): _duo((64, 128, 256, 512, 1024), "released", True),
    ("duo", "heart_released"): _duo((64, 128, 256, 512, 1024), "released", True),
    ("duo", "spleen_released"): _duo((64, 128, 256, 512, 1024), "released", True),
    # The LA presets run the `released` preset (effective beta 0.3; `beta` itself is unused).
    ("dtc", ""): _dtc("paper", 8, 10),
    ("dtc", "la8"): _dtc("released", 16, 150),
    ("dtc", "la16"): _dtc("released", 16, 150),
    ("mean_teacher", ""): _mean_teacher(8, 10),
    ("mean_teacher", "la8"): _mean_teacher(16, 150),
    ("mean_teacher", "la16"): _mean_teacher(16, 150),
    ("uamt", ""): _uamt(8, 10, 400),
    ("uamt", "la8"): _uamt(16, 150, 6000),
    ("uamt", "la16"): _uamt(16, 150, 6000),
    ("sassnet", ""): _sassnet(8, 16, 10, 0.01),
    ("sassnet", "la8"): _sassnet(16, 64, 150, 0.015),
    ("sassnet", "la16"): _sassnet(16, 64, 150, 0.01),
    ("supervised", ""): _supervised((8, 16, 32, 64)),
    ("supervised", "synthetic2d"): _supervised((16, 32, 64, 128)),
    ("supervised", "synthetic3d"): _supervised((8, 16, 32, 64)),
    ("supervised_vnet", ""): _supervised_vnet(8),
    ("supervised_vnet", "la8"): _supervised_vnet(16),
    ("supervised_vnet", "la16"): _supervised_vnet(16),
    # The synthetic default: 3 organs, a narrower confidence net; LA: the paper's widths.
    ("asdnet", ""): _asdnet(8, (8, 16, 32, 64)),
    ("asdnet", "la8"): _asdnet(16, (32, 64, 128, 256)),
    ("asdnet", "la16"): _asdnet(16, (32, 64, 128, 256)),
    ("asdnet", "msd"): _asdnet(16, (32, 64, 128, 256)),
    # The released code's method on the same data: narrower networks on the synthetic data.
    ("asdnet", "released"): _asdnet_released((8, 16, 32, 64)),
    ("asdnet", "la8_released"): _asdnet_released((32, 64, 128, 256)),
    ("asdnet", "la16_released"): _asdnet_released((32, 64, 128, 256)),
    # The synthetic default: 4 branches of width 8, 3 poolings; BraTS: the released plan's.
    ("maml", ""): _maml(8, 3),
    ("maml", "brats"): _maml(16, 5),
    # The nnU-Net baselines: one network on the stacked (or one) modalities, the rest as "".
    ("maml", "early_fusion"): _maml(8, 3, fusion="early"),
    ("maml", "single_modality"): _maml(8, 3, fusion="early"),
    # Synthetic: the small networks, N = 8 centres, λ_c over 13 blocks of 10 steps; LA: the
    # reference widths, N = 32 (released: 128 in 16 / 4 / 108), the LA ramp.
    ("dkuxnet", ""): _dkuxnet("dkux-v1", (4, 4), DKUX_SMALL, 10, 13),
    ("dkuxnet", "supervised"): _dkuxnet("supervised", (4, 4), DKUX_SMALL, 10, 13),
    ("dkuxnet", "la4"): _dkuxnet("dkux-v1", (16, 16), DKUX_FULL, 150, 40),
    ("dkuxnet", "la8"): _dkuxnet("dkux-v1", (16, 16), DKUX_FULL, 150, 40),
    ("dkuxnet", "la16"): _dkuxnet("dkux-v1", (16, 16), DKUX_FULL, 150, 40),
    ("dkuxnet", "la8_released"): _dkuxnet("released", (16, 4, 108), DKUX_FULL, 150, 40),
}
# The intensity-robust variants change the data block only: the method block of their base preset.
METHOD_BLOCKS.update({
    (name, f"{base}_robust"): METHOD_BLOCKS[(name, base)]
    for name in ("dtc", "mean_teacher", "uamt", "sassnet", "supervised_vnet", "asdnet", "dkuxnet")
    for base in (("la8",) if name == "dkuxnet" else ("la8", "la16"))})


def test_every_method_config_preset_is_pinned():
  """Each method config file's presets are exactly the ones pinned below."""
  for name in {n for n, _ in METHOD_BLOCKS}:
    presets = set(load(CONFIGS_DIR / f"{name}.py").PRESETS)
    assert presets == {p for n, p in METHOD_BLOCKS if n == name}, name


@pytest.mark.parametrize("name, preset", sorted(METHOD_BLOCKS), ids=lambda x: x or "default")
def test_method_block_is_pinned(name, preset):
  block = load(CONFIGS_DIR / f"{name}.py").get_config(preset).method.to_dict()
  assert block == METHOD_BLOCKS[name, preset]
