"""The on-device nnU-Net augmentation (jaxseg.data.nnunet_augment) against NumPy/SciPy.

Shapes are fixed per dimension (3D (12, 16, 16) with 2 channels, 2D (20, 20) with 2 channels) so
that one compiled `apply` serves every test of that dimension; the parameters are traced values.
3D is deliberately not cubic, so that a mix-up of axes shows against SciPy.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxseg.data import nnunet_augment as na

SHAPE3 = (12, 16, 16)
SHAPE2 = (20, 20)
C = 2
CFG = na.NnUNetAugmentConfig()
_apply = jax.jit(na.apply, static_argnums=(3,))

# Interpolation tolerance against SciPy: both interpolate linearly at the same points, but JAX
# computes the sampling coordinates and weights in float32 (SciPy in float64). For coordinates
# below 16 the float32 error is < 1e-5 voxel, and our volumes change by at most 1 per voxel (a unit
# box edge), so values agree to ~1e-5; 1e-4 leaves a margin for the float32 accumulation.
ATOL_SPATIAL = 1e-4


def _grid(shape):
  return np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")


def known_volume(shape):
  """Channel 0: an off-centre anisotropic Gaussian blob (smooth, ~0 at the border); channel 1: an
  off-centre box with value 1 inside. Label: the box (1) and the blob's core (2, overriding)."""
  g = _grid(shape)
  centre = [0.4 * s for s in shape]
  widths = [0.12 * s + 1.0 + i for i, s in enumerate(shape)]
  blob = np.exp(-0.5 * sum(((x - c) / w) ** 2 for x, c, w in zip(g, centre, widths)))
  box = np.ones(shape, bool)
  for x, s in zip(g, shape):
    box &= (x >= 0.55 * s) & (x < 0.55 * s + 4)
  label = np.where(blob > 0.6, 2, np.where(box, 1, 0)).astype(np.int32)
  image = np.stack([blob, box.astype(np.float64)], axis=-1).astype(np.float32)
  return image, label


def random_volume(shape, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=shape + (C,)).astype(np.float32) * np.array([1.0, 3.0], np.float32) + 0.5
  return image, rng.integers(0, 4, size=shape).astype(np.int32)


def params(ndim, **changes):
  """Identity parameters with some fields set (bools and float32 arrays)."""
  p = na.identity_params(ndim, C, CFG, key=jax.random.PRNGKey(7))
  fixed = {k: jnp.asarray(v, jnp.bool_ if isinstance(v, bool) or (
      isinstance(v, (list, tuple)) and isinstance(v[0], bool)) else jnp.float32)
           for k, v in changes.items()}
  return p.replace(**fixed)


def spatial(ndim, angles, scale=1.0):
  return params(ndim, rotate=any(a != 0 for a in angles), angles=angles,
                scale_on=scale != 1.0, scale=scale)


def near_tie_or_edge(shape_in, out_shape, p, margin=1e-3):
  """Output voxels whose float64 sampling coordinate lies within `margin` of a nearest-neighbour
  rounding tie (x.5) or of the input's edge (0 or S - 1): there float32 and float64 may round or
  classify differently, so the label may legitimately differ from SciPy's."""
  a = na.sampling_matrix(np.asarray(p.angles, np.float64), float(p.scale), np)
  g = np.stack(_grid(out_shape)) - ((np.asarray(out_shape) - 1) / 2.0).reshape((-1,) + (1,) * len(out_shape))
  coords = np.tensordot(a, g, axes=1) + ((np.asarray(shape_in) - 1) / 2.0).reshape(
      (-1,) + (1,) * len(out_shape))
  frac = coords - np.floor(coords)
  edge = np.zeros(out_shape, bool)
  for d, s in enumerate(shape_in):
    edge |= (np.abs(coords[d]) < margin) | (np.abs(coords[d] - (s - 1)) < margin)
  return (np.abs(frac - 0.5) < margin).any(axis=0) | edge


# ---------------------------------------------------------------------------------------------
# Configuration


def test_defaults_are_nnunet_moredA_values():
  c = na.NnUNetAugmentConfig()
  deg30 = 30.0 / 360.0 * 2.0 * np.pi
  assert c.rotation_x == c.rotation_y == c.rotation_z == (-deg30, deg30)
  assert (c.p_rotation, c.p_rotation_per_axis, c.p_scale, c.scale_range) == (0.2, 1.0, 0.2, (0.7, 1.4))
  assert (c.p_noise, c.noise_std_range) == (0.1, (0.0, 0.1))
  assert (c.p_blur, c.p_blur_per_channel, c.blur_sigma_range) == (0.2, 0.5, (0.5, 1.0))
  assert (c.p_brightness, c.brightness_range) == (0.15, (0.75, 1.25))
  assert (c.p_contrast, c.contrast_range) == (0.15, (0.75, 1.25))
  assert (c.p_low_resolution, c.p_low_resolution_per_channel,
          c.low_resolution_zoom_range) == (0.25, 0.5, (0.5, 1.0))
  assert (c.p_gamma_inverted, c.p_gamma, c.gamma_range, c.gamma_retain_stats) == (0.1, 0.3, (0.7, 1.5), True)
  assert (c.p_mirror_per_axis, c.mirror_axes) == (0.5, None)
  assert c.blur_radius() == 4  # int(4 * 1.0 + 0.5), SciPy's truncation for the largest sigma


@pytest.mark.parametrize("block, field", [
    ({"p_rotation": 1.5}, "p_rotation"),
    ({"p_blur_per_channel": -0.1}, "p_blur_per_channel"),
    ({"p_gamma": True}, "p_gamma"),
    ({"scale_range": (1.4, 0.7)}, "scale_range"),
    ({"scale_range": (0.0, 1.4)}, "scale_range"),
    ({"rotation_y": (0.1,)}, "rotation_y"),
    ({"gamma_range": (-0.5, 1.5)}, "gamma_range"),
    ({"low_resolution_zoom_range": (0.5, 1.5)}, "low_resolution_zoom_range"),
    ({"noise_std_range": (-0.1, 0.1)}, "noise_std_range"),
    ({"mirror_axes": (0, 3)}, "mirror_axes"),
    ({"mirror_axes": (1, 1)}, "mirror_axes"),
    ({"gamma_retain_stats": 1}, "gamma_retain_stats"),
    ({"p_rotatoin": 0.2}, "p_rotatoin"),
])
def test_config_errors_name_the_field(block, field):
  with pytest.raises(ValueError, match=f"nnunet_augment.{field}:"):
    na.NnUNetAugmentConfig.from_config(block)


def test_from_config_keeps_defaults_and_takes_lists():
  c = na.NnUNetAugmentConfig.from_config({"scale_range": [0.85, 1.25], "mirror_axes": [0, 1]})
  assert c.scale_range == (0.85, 1.25) and c.mirror_axes == (0, 1) and c.p_scale == 0.2
  assert na.NnUNetAugmentConfig.from_config(None) == na.NnUNetAugmentConfig()
  block = ml_collections.ConfigDict({"p_gamma": 0.5, "gamma_range": (0.8, 1.2)})
  assert na.NnUNetAugmentConfig.from_config(block) == na.NnUNetAugmentConfig(p_gamma=0.5,
                                                                             gamma_range=(0.8, 1.2))


# ---------------------------------------------------------------------------------------------
# Spatial transform


@pytest.mark.parametrize("shape", [SHAPE3, SHAPE2], ids=["3d", "2d"])
def test_identity_params_give_the_input_back_exactly(shape):
  image, label = random_volume(shape)
  out, lab = _apply(image, label, na.identity_params(len(shape), C, CFG), None)
  np.testing.assert_array_equal(np.asarray(out), image)
  np.testing.assert_array_equal(np.asarray(lab), label)
  # The resampling itself at angle 0 and scale 1 (flags on) samples the integer grid: exact too.
  out, lab = _apply(image, label, spatial(len(shape), [0.0] * (len(shape) * 2 - 3)).replace(
      rotate=jnp.asarray(True)), None)
  np.testing.assert_array_equal(np.asarray(out), image)
  np.testing.assert_array_equal(np.asarray(lab), label)


CASES3 = [([0.5, 0.0, 0.0], 1.0), ([0.0, -0.45, 0.0], 1.0), ([0.0, 0.0, 0.3], 1.0),
          ([0.0, 0.0, 0.0], 0.7), ([0.0, 0.0, 0.0], 1.4), ([0.4, -0.3, 0.5], 1.25),
          ([-0.52, 0.2, -0.1], 0.74)]
CASES2 = [([0.5], 1.0), ([-0.35], 1.0), ([0.0], 0.7), ([0.0], 1.4), ([0.45], 1.3), ([-0.2], 0.8)]


@pytest.mark.parametrize("shape, cases", [(SHAPE3, CASES3), (SHAPE2, CASES2)], ids=["3d", "2d"])
def test_rotation_and_scaling_match_scipy(shape, cases):
  image, label = known_volume(shape)
  for angles, scale in cases:
    p = spatial(len(shape), angles, scale)
    out, lab = _apply(image, label, p, None)
    ref, ref_lab = na.reference_spatial(image, label, p)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=ATOL_SPATIAL,
                               err_msg=f"angles {angles} scale {scale}")
    assert np.abs(ref - image).max() > 0.3  # the transform did move the content
    differ = np.asarray(lab) != ref_lab
    assert not (differ & ~near_tie_or_edge(shape, shape, p)).any(), (angles, scale)
    assert differ.mean() < 0.005


def test_scipy_reference_with_a_smaller_output_patch_and_its_centre_crop():
  # nnU-Net reads a larger patch and resamples the training patch out of its centre.
  image, label = known_volume((24, 22))
  for p in (spatial(2, [0.4], 1.2), spatial(2, [0.0])):
    out, lab = _apply(image, label, p, (18, 16))
    ref, ref_lab = na.reference_spatial(image, label, p, (18, 16))
    assert out.shape == (18, 16, C) and lab.shape == (18, 16)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=ATOL_SPATIAL)
    differ = np.asarray(lab) != ref_lab
    assert not (differ & ~near_tie_or_edge((24, 22), (18, 16), p)).any()
  np.testing.assert_array_equal(np.asarray(out), image[3:21, 3:19])  # identity: the centre crop
  np.testing.assert_array_equal(np.asarray(lab), label[3:21, 3:19])
  with pytest.raises(ValueError, match="even margin"):
    na.apply(image, label, p, (17, 16))


def test_a_quarter_turn_is_rot90():
  # Independent of SciPy: batchgenerators' rotation by +90 degrees maps output offset d to input
  # offset R.T d, which for the 2D matrix [[c, -s], [s, c]] is np.rot90(., 1); in 3D, rotation_x
  # turns axes (1, 2) the same way.
  image, label = random_volume(SHAPE2)
  out, lab = _apply(image, label, spatial(2, [np.pi / 2]), None)
  np.testing.assert_allclose(np.asarray(out), np.rot90(image, 1, axes=(0, 1)), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(lab), np.rot90(label, 1, axes=(0, 1)))
  image, label = random_volume(SHAPE3)
  out, lab = _apply(image, label, spatial(3, [np.pi / 2, 0.0, 0.0]), None)
  np.testing.assert_allclose(np.asarray(out), np.rot90(image, 1, axes=(1, 2)), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(lab), np.rot90(label, 1, axes=(1, 2)))


def test_quarter_turns_about_each_axis_and_the_composition_order():
  # The host reference (from which the device code is checked above) turns a cube by +90 degrees
  # about axis 0, 1, 2 as np.rot90 in the planes (1, 2), (2, 0), (0, 1).
  cube = np.random.default_rng(6).normal(size=(8, 8, 8, 1)).astype(np.float32)
  for axis, plane in enumerate([(1, 2), (2, 0), (0, 1)]):
    angles = [0.0, 0.0, 0.0]
    angles[axis] = np.pi / 2
    ref, _ = na.reference_spatial(cube, None, spatial(3, angles))
    np.testing.assert_allclose(ref, np.rot90(cube, 1, axes=plane), atol=1e-6, err_msg=str(axis))
  # The composition is batchgenerators': coordinates (as rows) times Rx(a) @ Ry(b) @ Rz(c).
  a, b, c = 0.3, -0.5, 0.2
  rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
  ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
  rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
  offsets = np.random.default_rng(0).normal(size=(3, 50))
  expected = 1.3 * np.dot(offsets.T, rx @ ry @ rz).T
  np.testing.assert_allclose(na.sampling_matrix(np.array([a, b, c]), 1.3, np) @ offsets, expected,
                             rtol=0, atol=1e-12)
  got = np.asarray(na.sampling_matrix(jnp.asarray([a, b, c], jnp.float32), 1.3)) @ offsets
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def _interior(mask, ndim):
  """Voxels whose full 3^ndim neighbourhood has one value of `mask` (away from its boundary)."""
  st = np.ones((3,) * ndim, bool)
  return ndi.binary_erosion(mask, st, border_value=0) | ndi.binary_erosion(~mask, st, border_value=1)


def test_a_label_warped_with_its_image_stays_on_it():
  # Label = a smooth image thresholded at 0.5. After the same random rotation + scaling (+ the
  # mirroring) of both, thresholding the warped image must give the warped label away from the
  # label's boundary. The control (the warped label shifted by 3 voxels) shows that the check fails for a
  # misaligned label.
  g = _grid(SHAPE3)
  smooth = np.exp(-0.5 * (((g[0] - 4.5) / 3.0) ** 2 + ((g[1] - 9.0) / 4.0) ** 2
                          + ((g[2] - 6.0) / 2.5) ** 2))
  image = np.stack([smooth, 1 - smooth], -1).astype(np.float32)
  label = (smooth > 0.5).astype(np.int32)
  key = jax.random.PRNGKey(3)
  for i in range(5):
    k_a, k_s = jax.random.split(jax.random.fold_in(key, i))
    angles = jax.random.uniform(k_a, (3,), jnp.float32, -np.pi / 6, np.pi / 6)
    scale = jax.random.uniform(k_s, (), jnp.float32, 0.7, 1.4)
    p = params(3, rotate=True, angles=angles, scale_on=True, scale=scale,
               mirror=[True, False, i % 2 == 0])
    out, lab = _apply(image, label, p, None)
    lab = np.asarray(lab).astype(bool)
    assert 30 < lab.sum() < lab.size - 30
    inner = _interior(lab, 3)
    above = np.asarray(out)[..., 0] > 0.5
    assert (above == lab)[inner].mean() >= 0.99 and inner.mean() > 0.6
    assert above[inner & lab].mean() >= 0.99  # the foreground alone, as it is the smaller part
    other = np.roll(lab, 3, axis=2)  # control: the label 3 voxels off
    assert above[_interior(other, 3) & other].mean() < 0.9


@pytest.mark.parametrize("shape, flags", [(SHAPE3, [True, False, True]), (SHAPE3, [False, True, False]),
                                          (SHAPE2, [True, True])], ids=["3d-02", "3d-1", "2d-01"])
def test_mirroring_is_exact(shape, flags):
  image, label = random_volume(shape)
  out, lab = _apply(image, label, params(len(shape), mirror=flags), None)
  axes = tuple(d for d, f in enumerate(flags) if f)
  np.testing.assert_array_equal(np.asarray(out), np.flip(image, axes))
  np.testing.assert_array_equal(np.asarray(lab), np.flip(label, axes))


# ---------------------------------------------------------------------------------------------
# Intensity transforms, each alone, against a hand computation


def _only(**changes):
  image, label = random_volume(SHAPE3, seed=1)
  out, lab = _apply(image, label, params(3, **changes), None)
  np.testing.assert_array_equal(np.asarray(lab), label)  # intensity transforms leave the label
  return image.astype(np.float64), np.asarray(out, np.float64)


def test_gaussian_noise():
  image, out = _only(noise=True, noise_std=0.07)
  field = np.asarray(jax.random.normal(jax.random.PRNGKey(7), image.shape, jnp.float32))
  np.testing.assert_allclose(out, image + 0.07 * field, rtol=0, atol=1e-6)
  added = (out - image) / 0.07  # one standard deviation for all channels, as nnU-Net
  assert abs(added.mean()) < 0.05 and abs(added.std() - 1) < 0.03


def test_gaussian_blur_per_channel_matches_scipy():
  for sigma in (0.5, 0.93):  # 0.5: SciPy's kernel is truncated at 2 voxels, ours at 4 with zeros
    image, out = _only(blur=True, blur_channels=[False, True], blur_sigma=[0.8, sigma])
    np.testing.assert_array_equal(out[..., 0], image[..., 0])
    ref = ndi.gaussian_filter(image[..., 1], sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(out[..., 1], ref, rtol=0, atol=1e-5)


def test_brightness_multiplies_each_channel():
  image, out = _only(brightness=True, brightness_factor=[0.8, 1.2])
  np.testing.assert_allclose(out, image * np.array([0.8, 1.2]), rtol=1e-6, atol=1e-6)


def test_contrast_scales_about_the_mean_and_keeps_the_range():
  image, out = _only(contrast=True, contrast_factor=[0.8, 1.2])
  for c, f in enumerate((0.8, 1.2)):
    x = image[..., c]
    expected = np.clip((x - x.mean()) * f + x.mean(), x.min(), x.max())
    np.testing.assert_allclose(out[..., c], expected, rtol=0, atol=2e-5)
  x = image[..., 1]
  assert ((x - x.mean()) * 1.2 + x.mean() > x.max()).any()  # the clipping was exercised


def test_simulated_low_resolution_matches_scipy_zoom():
  # Zoom 0.5 gives coarse shapes (6, 8, 8): every coarse sample is a rounding tie (x.5), which
  # SciPy rounds up; 0.6 gives (7, 10, 10) (12 * 0.6 = 7.2, 16 * 0.6 = 9.6).
  for zooms in ([0.5, 0.6], [0.77, 0.93]):
    image, out = _only(low_res=True, low_res_channels=[True, True], low_res_zoom=zooms)
    for c, z in enumerate(zooms):
      shape = np.asarray(SHAPE3)
      target = np.round(shape * np.float32(z)).astype(int)
      down = ndi.zoom(image[..., c], target / shape, order=0, mode="nearest", grid_mode=True)
      ref = ndi.zoom(down, shape / target, order=1, mode="nearest", grid_mode=True)
      np.testing.assert_allclose(out[..., c], ref, rtol=0, atol=1e-5)
      assert np.abs(out[..., c] - image[..., c]).max() > 0.5
  image, out = _only(low_res=True, low_res_channels=[False, True], low_res_zoom=[0.5, 0.5])
  np.testing.assert_array_equal(out[..., 0], image[..., 0])


@pytest.mark.parametrize("inverted", [False, True])
def test_gamma_with_and_without_inversion_retains_the_statistics(inverted):
  gammas = [0.75, 1.4]
  field = "gamma_inverted" if inverted else "gamma"
  image, out = _only(**{field: True, field + "_value": gammas})
  for c, g in enumerate(gammas):
    x = -image[..., c] if inverted else image[..., c]
    r = x.max() - x.min() + 1e-7
    y = ((x - x.min()) / r) ** g * r + x.min()
    y = (y - y.mean()) / (y.std() + 1e-8) * x.std() + x.mean()
    expected = -y if inverted else y
    np.testing.assert_allclose(out[..., c], expected, rtol=0, atol=5e-5)
    assert abs(out[..., c].mean() - image[..., c].mean()) < 1e-4
    assert abs(out[..., c].std() - image[..., c].std()) < 1e-4
    assert np.abs(out[..., c] - image[..., c]).max() > 0.1


def test_the_whole_pipeline_matches_the_host_reference():
  # Every transform on, in nnU-Net's order, against reference_apply (SciPy, float64).
  image, label = known_volume(SHAPE3)
  image = image + random_volume(SHAPE3, seed=2)[0] * 0.1
  for seed in range(3):
    p = na.draw_params(jax.random.PRNGKey(seed), CFG, 3, C)
    p = p.replace(rotate=jnp.asarray(True), angles=jnp.asarray([0.3, -0.4, 0.2]) * (seed + 1) / 2,
                  scale_on=jnp.asarray(True), scale=jnp.asarray(0.8 + 0.2 * seed, jnp.float32),
                  noise=jnp.asarray(True), blur=jnp.asarray(True), brightness=jnp.asarray(True),
                  contrast=jnp.asarray(True), low_res=jnp.asarray(True),
                  gamma_inverted=jnp.asarray(True), gamma=jnp.asarray(True))
    p = p.replace(noise_std=jnp.asarray(0.05), blur_channels=jnp.asarray([True, seed != 1]),
                  brightness_factor=jnp.asarray([0.8, 1.15]), contrast_factor=jnp.asarray([1.2, 0.85]),
                  low_res_channels=jnp.asarray([seed != 2, True]), low_res_zoom=jnp.asarray([0.6, 0.8]),
                  gamma_inverted_value=jnp.asarray([0.8, 1.3]), gamma_value=jnp.asarray([1.2, 0.75]),
                  mirror=jnp.asarray([seed == 0, True, seed == 2]))
    out, lab = _apply(image, label, p, None)
    ref, ref_lab = na.reference_apply(image, label, p)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=5e-4)
    assert (np.asarray(lab) != ref_lab).mean() < 0.005


# ---------------------------------------------------------------------------------------------
# Probabilities, determinism, jit


def test_draw_frequencies_match_the_probabilities():
  # 20000 deterministic draws; each frequency within 4.5 binomial standard deviations of p.
  n = 20000
  draw = jax.jit(jax.vmap(lambda k: na.draw_params(k, CFG, 3, C)))
  p = jax.tree.map(np.asarray, draw(jax.random.split(jax.random.PRNGKey(11), n)))

  def check(flags, prob):
    flags = np.asarray(flags, bool).reshape(-1)
    tol = 4.5 * math.sqrt(prob * (1 - prob) / flags.size)
    assert abs(flags.mean() - prob) <= tol, (flags.mean(), prob)

  for name, prob in [("rotate", 0.2), ("scale_on", 0.2), ("noise", 0.1), ("blur", 0.2),
                     ("brightness", 0.15), ("contrast", 0.15), ("low_res", 0.25),
                     ("gamma_inverted", 0.1), ("gamma", 0.3)]:
    check(getattr(p, name), prob)
  check(p.blur_channels, 0.5)
  check(p.low_res_channels, 0.5)
  check(p.mirror, 0.5)
  # Samples actually transformed: those with a flag on (the rest come back unchanged, see the
  # identity test); and blurring/low-res need a chosen channel too.
  check(p.blur & p.blur_channels.any(-1), 0.2 * 0.75)
  # Values: identity where off, inside the ranges where on, "half below 1" where nnU-Net does so.
  lim = np.pi / 6
  assert (p.angles[~p.rotate] == 0).all() and (np.abs(p.angles[p.rotate]) <= lim + 1e-6).all()
  assert (p.angles[p.rotate] != 0).all()  # p_rotation_per_axis = 1: every axis turns
  s = p.scale[p.scale_on]
  assert (p.scale[~p.scale_on] == 1).all() and (s >= 0.7).all() and (s <= 1.4).all()
  check(s < 1, 0.5)
  assert abs(np.median(p.angles[p.rotate])) < 0.02
  g = p.gamma_value[p.gamma]
  assert (g >= 0.7).all() and (g <= 1.5).all()
  check(g < 1, 0.5)
  b = p.brightness_factor[p.brightness]
  assert (b >= 0.75).all() and (b <= 1.25).all()
  check(b < 1, 0.5)  # uniform over (0.75, 1.25)
  assert (p.noise_std[p.noise] <= 0.1).all() and (p.noise_std[~p.noise] == 0).all()
  z = p.low_res_zoom[p.low_res[:, None] & p.low_res_channels]
  assert (z >= 0.5).all() and (z <= 1.0).all()
  sig = p.blur_sigma.reshape(-1)
  assert (sig >= 0.5).all() and (sig <= 1.0).all()

  per_axis = na.NnUNetAugmentConfig(p_rotation=1.0, p_rotation_per_axis=0.5, mirror_axes=(1,))
  q = jax.tree.map(np.asarray, jax.jit(jax.vmap(lambda k: na.draw_params(k, per_axis, 3, C)))(
      jax.random.split(jax.random.PRNGKey(5), 4000)))
  check(q.rotate, 1.0 - 1e-9)
  check(q.angles != 0, 0.5)
  assert not q.mirror[:, [0, 2]].any()
  check(q.mirror[:, 1], 0.5)


def _binomial_ok(count, n, prob, z=4.5):
  return abs(count / n - prob) <= z * math.sqrt(prob * (1 - prob) / n)


@pytest.mark.parametrize("block, prob", [
    ({"p_rotation": 0.2}, 0.2),
    ({"p_gamma": 0.3}, 0.3),
    ({"p_mirror_per_axis": 0.5, "mirror_axes": (1,)}, 0.5),
], ids=["rotation", "gamma", "mirror"])
def test_fraction_of_samples_transformed_matches_p(block, prob):
  # Only one transform can fire; over 400 samples (fixed keys) the fraction of outputs that differ
  # from the input is within 4.5 binomial standard deviations of its probability.
  off = {f: 0.0 for f in ("p_rotation", "p_scale", "p_noise", "p_blur", "p_brightness",
                          "p_contrast", "p_low_resolution", "p_gamma_inverted", "p_gamma",
                          "p_mirror_per_axis")}
  config = na.NnUNetAugmentConfig.from_config({**off, **block})
  n = 400
  draws = jax.jit(jax.vmap(lambda k: na.draw_params(k, config, 2, C)))(
      jax.random.split(jax.random.PRNGKey(13), n))
  draws = jax.tree.map(np.asarray, draws)
  image, label = random_volume(SHAPE2, seed=5)
  changed = 0
  for i in range(n):
    out, _ = _apply(image, label, jax.tree.map(lambda t: t[i], draws), None)
    changed += not np.array_equal(np.asarray(out), image)
  assert _binomial_ok(changed, n, prob), (changed, n, prob)


def test_changing_one_transform_leaves_the_other_draws():
  # The draws' layout depends on the shape only, so a new rotation probability or gamma range
  # changes those draws and no others.
  key = jax.random.PRNGKey(4)
  base = na.draw_params(key, CFG, 3, C)
  other = na.draw_params(key, na.NnUNetAugmentConfig(p_rotation=0.9, gamma_range=(0.5, 2.0)), 3, C)
  changed = {"rotate", "angles", "gamma_inverted_value", "gamma_value"}
  for name in base.__dataclass_fields__:
    if name not in changed:
      np.testing.assert_array_equal(np.asarray(getattr(base, name)), np.asarray(getattr(other, name)),
                                    err_msg=name)


def test_determinism_and_the_batch_keys():
  image, label = random_volume(SHAPE2, seed=4)
  images, labels = np.stack([image] * 3), np.stack([label] * 3)
  batch = jax.jit(na.augment_batch, static_argnums=(3,))
  key = jax.random.PRNGKey(21)
  a = batch(key, images, labels, CFG)
  b = batch(key, images, labels, CFG)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  c = batch(jax.random.PRNGKey(22), images, labels, CFG)
  assert not all(np.array_equal(np.asarray(x), np.asarray(y))
                 for x, y in zip(jax.tree.leaves(a[2]), jax.tree.leaves(c[2])))
  # Sample i is apply(draw_params(fold_in(key, i))): it does not depend on the batch around it.
  for i in range(3):
    p = na.draw_params(jax.random.fold_in(key, i), CFG, 2, C)
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(jax.tree.map(lambda t: t[i], a[2]))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    out, lab = _apply(image, label, p, None)
    np.testing.assert_allclose(np.asarray(a[0][i]), np.asarray(out), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a[1][i]), np.asarray(lab))
  assert a[1].dtype == labels.dtype and a[0].shape == images.shape


def test_jit_and_no_jit_agree():
  image, label = known_volume(SHAPE2)
  key = jax.random.PRNGKey(8)
  p_eager = na.draw_params(key, CFG, 2, C)
  p_jit = jax.jit(na.draw_params, static_argnums=(1, 2, 3))(key, CFG, 2, C)
  for x, y in zip(jax.tree.leaves(p_eager), jax.tree.leaves(p_jit)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  p = p_eager.replace(rotate=jnp.asarray(True), angles=jnp.asarray([0.4]), noise=jnp.asarray(True),
                      noise_std=jnp.asarray(0.05), blur=jnp.asarray(True),
                      blur_channels=jnp.asarray([True, True]), contrast=jnp.asarray(True),
                      low_res=jnp.asarray(True), low_res_channels=jnp.asarray([True, False]),
                      low_res_zoom=jnp.asarray([0.6, 1.0]), gamma=jnp.asarray(True),
                      mirror=jnp.asarray([True, False]))
  out_eager, lab_eager = na.apply(image, label, p)
  out_jit, lab_jit = _apply(image, label, p, None)
  np.testing.assert_allclose(np.asarray(out_eager), np.asarray(out_jit), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(lab_eager), np.asarray(lab_jit))
