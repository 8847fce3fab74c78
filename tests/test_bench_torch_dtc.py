"""The PyTorch DTC iteration of the benchmark (`bench_torch.make_dtc_train_step`'s step) is ours:
with our V-Net-SDF's variables ported into `TorchVNetSDF`, one iteration of DTC `train_la_dtc.py`
(host `compute_sdf`, losses, backward, SGD) gives the loss terms of `jaxseg.methods.dtc.train_step`
and the same parameters after the update. Skipped where torch (or scikit-image) is absent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("skimage")

from conftest import jit_init, small_config, two_stream_batch  # pylint: disable=g-import-not-at-top
from jaxseg import bench_torch, geometry  # pylint: disable=g-import-not-at-top
from jaxseg.methods import dtc  # pylint: disable=g-import-not-at-top
from methods import written_out as wo  # pylint: disable=g-import-not-at-top
from test_bench_torch import (_to_torch_layout, conv_kernel_to_torch,  # pylint: disable=g-import-not-at-top
                              flax_to_torch_pairs)

pytestmark = pytest.mark.usefixtures("fast_compile")

# 2 labeled + 2 unlabeled samples of 32x32x16: 2x2x1 voxels x 4 samples at the bottleneck for
# train-mode BatchNorm. Step 6000, the end of the ramp: the consistency weight is 1 on both sides
# exactly (ours is computed in float32; the ramp itself is checked against the reference's in
# tests/methods/test_dtc.py).
PATCH = (32, 32, 16)
STEP = 6000


def _balls() -> np.ndarray:
  """Two labels (2, *PATCH): a ball of radius 6 and one of radius 4, off centre."""
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in PATCH], indexing="ij"), -1)
  balls = [np.sum((grid - c) ** 2, -1) <= r * r for c, r in (((14, 17, 8), 6), ((20, 10, 7), 4))]
  return np.stack(balls).astype(np.int32)


def _ported_pairs(params: dict, model: "bench_torch.TorchVNetSDF") -> list:
  """flax_to_torch_pairs of the V-Net body, and our heads: "sdf" -> out_conv, "seg" -> out_conv2."""
  body = {k: v for k, v in params.items() if not k.startswith("head_")}
  pairs = flax_to_torch_pairs(body, model, "params")
  for head, conv in (("head_sdf", model.out_conv), ("head_seg", model.out_conv2)):
    pairs += [(conv_kernel_to_torch(np.asarray(params[head]["kernel"])), conv.weight),
              (np.asarray(params[head]["bias"]), conv.bias)]
  return pairs


def test_the_host_sdf_is_our_signed_distance_map():
  labels = _balls()
  np.testing.assert_allclose(bench_torch.compute_sdf(labels, labels.shape),
                             np.asarray(geometry.signed_distance_map(jnp.asarray(labels))),
                             rtol=0, atol=1e-6)
  assert np.all(bench_torch.compute_sdf(np.zeros((1, 4, 4, 4)), (1, 4, 4, 4)) == 0)
  assert bench_torch.sigmoid_rampup(20, 40) == pytest.approx(np.exp(-1.25), rel=1e-15)
  assert bench_torch.sigmoid_rampup(50, 40) == 1.0 and bench_torch.sigmoid_rampup(3, 0) == 1.0


def test_one_dtc_iteration_equals_ours_in_float64(x64):
  """Float64 (float32 comparisons are ill-posed at ReLU kinks: tests/test_bench_torch.py), dropout
  off on both sides (the frameworks draw different masks), the released preset (β = 0.3)."""
  rng = np.random.default_rng(0)
  images = rng.standard_normal((4, *PATCH, 1))
  labels = _balls()
  batch = two_stream_batch(images[:2], labels, images[2:])
  config = small_config(dtc, preset="released")
  config.method.model.dropout_rate = 0.0
  state = jit_init(dtc, config, two_stream_batch(images[:2].astype(np.float32), labels,
                                                 images[2:].astype(np.float32)))
  state = wo.to_float64(state)
  state = state.replace(seg=state.seg.replace(step=jnp.asarray(STEP, state.seg.step.dtype)))
  new_state, metrics = jax.jit(dtc.train_step)(state, batch, jax.random.key(0))
  # Our schedule counts the optimiser's own updates (none yet): the base rate, held in float32.
  learning_rate = float(metrics["learning_rate"])
  assert learning_rate == pytest.approx(0.01, rel=1e-7)

  theirs = bench_torch.TorchVNetSDF(1, 1, 4, has_dropout=False).double().train()
  with torch.no_grad():
    for value, tensor in _ported_pairs(jax.device_get(state.seg.params), theirs):
      assert tuple(value.shape) == tuple(tensor.shape)
      tensor.copy_(torch.from_numpy(np.array(value, np.float64)))
  optimizer = torch.optim.SGD(theirs.parameters(), lr=learning_rate, momentum=0.9,
                              weight_decay=1e-4)
  loss, terms = bench_torch.dtc_loss(theirs, _to_torch_layout(images),
                                     torch.from_numpy(labels.astype(np.int64)), STEP, beta=0.3)
  loss.backward()
  optimizer.step()

  assert terms["consistency_weight"] == float(metrics["consistency_weight"]) == 1.0
  assert float(metrics["loss_consistency"]) > 0.05 and float(metrics["loss_lsf"]) > 0.05
  # The metrics are reported in float32 (base.scalar_metrics): equal up to that rounding.
  np.testing.assert_allclose(loss.item(), float(metrics["loss"]), rtol=1e-6)
  for name in ("loss_dice", "loss_lsf", "loss_consistency"):
    np.testing.assert_allclose(terms[name].item(), float(metrics[name]), rtol=1e-6, err_msg=name)
  pairs = _ported_pairs(jax.device_get(new_state.seg.params), theirs)
  assert len(pairs) == len(list(theirs.parameters()))
  old = dict((id(t), v) for v, t in _ported_pairs(jax.device_get(state.seg.params), theirs))
  for ours, tensor in pairs:
    step_size = np.abs(ours - old[id(tensor)]).max()
    assert step_size > 0
    # Relative to the tensor's largest update (what the step computes). Not to round-off: the
    # consistency term's σ(−1500·z) multiplies the float64 round-off of z by up to 1500/4 in the
    # gradient, and the updates agree to ~2e-9 of their size; a wrong term or weight moves them by
    # percents.
    np.testing.assert_allclose(tensor.detach().numpy(), ours, rtol=0, atol=1e-7 * step_size)


def test_the_bench_command_runs_the_pytorch_dtc_iteration():
  # Under `python -m jaxseg.bench` the bench module is __main__: the PyTorch DTC iteration's host
  # SDF must not import jaxseg.bench again (its flags would be defined twice, and the command died).
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from conftest import REPO, SUBPROCESS_ENV  # pylint: disable=import-outside-toplevel
  command = [sys.executable, "-m", "jaxseg.bench", "--config", "configs/dtc.py",
             "--config.data.patch_size=(16,16,16)", "--config.method.model.n_filters=4",
             "--eval_volume", "none", "--torch", "--steps", "1", "--warmup", "0"]
  done = subprocess.run(command, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "DTC iteration with the host SDF" in done.stdout
