"""Tests of MAML's deep-supervision weighting in jaxseg.losses: the weights against the golden vectors of
`YaoZhang93/MAML` MAMLTrainerV2 (tests/golden/maml_ds_loss_weights__*), hand-written fractions, and the
combined loss against the same sum written out term by term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import losses


@pytest.mark.parametrize("case", ["pool4_mod2", "pool5_mod4"])
def test_maml_loss_weights_golden(golden, case):
  g = golden(f"maml_ds_loss_weights__{case}")
  num_pools, num_modalities = int(g["in_net_numpool"]), int(g["in_num_input_channels"])
  expected = g["out_weights"]
  assert expected.shape == (1 + num_modalities * num_pools,)
  np.testing.assert_allclose(losses.maml_loss_weights(num_pools, num_modalities), expected,
                             rtol=1e-12, atol=0)
  # The vector is [w_0] + M copies of the per-branch deep-supervision weights.
  w = np.asarray(losses.deep_supervision_weights(num_pools))
  np.testing.assert_allclose(w, expected[1:1 + num_pools], rtol=1e-12, atol=0)
  np.testing.assert_allclose(expected[0], w[0], rtol=1e-12)


def test_deep_supervision_weights_by_hand():
  # 1/2^s, the last set to 0, normalised: 5 scales [8, 4, 2, 1, 0]/15, 4 scales [4, 2, 1, 0]/7.
  assert losses.deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0],
                                                             rel=1e-15, abs=0)
  np.testing.assert_allclose(losses.deep_supervision_weights(5), [0.533, 0.267, 0.133, 0.067, 0.0],
                             atol=5e-4)
  assert losses.deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0], rel=1e-15, abs=0)
  assert losses.deep_supervision_weights(2) == (1.0, 0.0)
  assert losses.deep_supervision_weights(1) == (1.0,)
  for s in range(1, 8):
    assert sum(losses.deep_supervision_weights(s)) == pytest.approx(1.0, rel=1e-15)
  with pytest.raises(ValueError, match="num_scales"):
    losses.deep_supervision_weights(0)
  with pytest.raises(ValueError, match="num_modalities"):
    losses.maml_loss_weights(4, 0)


def _outputs(num_modalities=2, num_scales=3, size=8, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  joint = jnp.asarray(rng.normal(size=(2, size, size, classes)), jnp.float32)
  branches = tuple(
      tuple(jnp.asarray(rng.normal(size=(2, size >> s, size >> s, classes)), jnp.float32)
            for s in range(num_scales)) for _ in range(num_modalities))
  labels = tuple(jnp.asarray(rng.integers(0, classes, size=(2, size >> s, size >> s)), jnp.int32)
                 for s in range(num_scales))
  return joint, branches, labels


def test_maml_deep_supervised_loss_released_and_paper():
  joint, branches, labels = _outputs()
  loss_fn = losses.soft_dice_ce_loss
  w = [4 / 6, 2 / 6, 0.0]  # 3 scales: 1, 1/2, (1/4 -> 0), normalised
  l_joint = float(loss_fn(joint, labels[0]))
  l_branch = [[float(loss_fn(b, y)) for b, y in zip(scales, labels)] for scales in branches]
  branch_sum = sum(w[s] * l_branch[m][s] for m in range(2) for s in range(3))
  released = float(jax.jit(lambda j, b, y: losses.maml_deep_supervised_loss(loss_fn, j, b, y))(
      joint, branches, labels))
  assert released == pytest.approx(w[0] * l_joint + branch_sum, rel=1e-5)
  paper = float(losses.maml_deep_supervised_loss(loss_fn, joint, branches, labels, preset="paper",
                                                 branch_weight=0.5))
  assert paper == pytest.approx(l_joint + 0.5 * branch_sum, rel=1e-5)
  # The zero-weight (coarsest) outputs are not evaluated: a NaN there does not reach the loss.
  poisoned = tuple(scales[:-1] + (jnp.full_like(scales[-1], jnp.nan),) for scales in branches)
  assert np.isfinite(float(losses.maml_deep_supervised_loss(loss_fn, joint, poisoned, labels)))


def test_maml_deep_supervised_loss_validation():
  joint, branches, labels = _outputs()
  with pytest.raises(ValueError, match="preset"):
    losses.maml_deep_supervised_loss(losses.soft_dice_ce_loss, joint, branches, labels, preset="mine")
  with pytest.raises(ValueError, match="λ"):
    losses.maml_deep_supervised_loss(losses.soft_dice_ce_loss, joint, branches, labels, branch_weight=2.0)
  with pytest.raises(ValueError, match="outputs"):
    losses.maml_deep_supervised_loss(losses.soft_dice_ce_loss, joint, branches, labels[:2])
