"""The PyTorch side of the benchmark (`jaxseg.bench_torch`): its V-Net is our V-Net, and it times.

"The same V-Net" is proved by porting our Flax VNet's variables into `TorchVNet` and comparing the
logits (eval and train mode) and the gradients of the supervised loss. Skipped where torch is absent
(it is an optional extra).
"""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
from jaxseg import bench_torch, losses  # pylint: disable=g-import-not-at-top
from jaxseg.models import get_model, layers  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.usefixtures("fast_compile")

N_FILTERS = 4
NUM_CLASSES = 2
# Batch 2 at 32x32x16 leaves 2x2x1 voxels x 2 samples at the bottleneck for the batch statistics of
# train-mode BatchNorm (at 16^3 and batch 1 there would be one value per channel).
IMAGE_SHAPE = (2, 32, 32, 16, 1)  # (N, X, Y, Z, C), ours.


def _to_torch_layout(x: np.ndarray) -> "torch.Tensor":
  """(N, *S, C) -> (N, C, *S)."""
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def _to_flax_layout(x: "torch.Tensor") -> np.ndarray:
  """(N, C, *S) -> (N, *S, C)."""
  return np.moveaxis(x.detach().numpy(), 1, -1)


def conv_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
  """Conv: (kx, ky, kz, C_in, C_out) -> (C_out, C_in, kx, ky, kz); both are cross-correlations."""
  return np.transpose(kernel, (4, 3, 0, 1, 2))


def conv_transpose_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
  """ConvTranspose, k2 s2: (kx, ky, kz, C_in, C_out) -> (C_in, C_out, kx, ky, kz), spatially flipped.

  Flax's kernel (transpose_kernel=False) slides unflipped over the zero-dilated input:
  out[2i + a] = x[i] · kernel[1 − a]; PyTorch scatters: out[2i + a] = x[i] · weight[:, :, a].
  """
  return np.transpose(np.flip(kernel, axis=(0, 1, 2)), (3, 4, 0, 1, 2))


def flax_to_torch_pairs(tree: dict, model: "bench_torch.TorchVNet",
                        kind: str = "params") -> list:
  """[(our array in torch layout, the TorchVNet tensor it maps to)] for every leaf of `tree`.

  `tree` is our VNet's "params" (or their gradients; kind="params") or "batch_stats" (kind="stats").
  Our ConvBlock / down / up blocks hold Conv_i (or ConvTranspose2x_0) and BatchNorm_i in order; the
  reference's `block.conv` Sequential holds the same convs and BNs in the same order (with ReLUs in
  between), so the i-th conv and i-th BN of each map one-to-one.
  """
  pairs = []
  for block_name, block in tree.items():
    if block_name == "head_seg":
      if kind == "params":
        pairs.append((conv_kernel_to_torch(block["kernel"]), model.out_conv.weight))
        pairs.append((np.asarray(block["bias"]), model.out_conv.bias))
      continue
    sequential = getattr(model, block_name).conv
    convs = [m for m in sequential if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    norms = [m for m in sequential if isinstance(m, torch.nn.BatchNorm3d)]
    for layer_name, leaves in block.items():
      kind_name, index = layer_name.rsplit("_", 1)
      if kind_name == "BatchNorm":
        norm = norms[int(index)]
        if kind == "params":
          pairs.append((np.asarray(leaves["scale"]), norm.weight))
          pairs.append((np.asarray(leaves["bias"]), norm.bias))
        else:
          pairs.append((np.asarray(leaves["mean"]), norm.running_mean))
          pairs.append((np.asarray(leaves["var"]), norm.running_var))
      elif kind_name == "Conv":
        conv = convs[int(index)]
        assert isinstance(conv, torch.nn.Conv3d)
        pairs.append((conv_kernel_to_torch(leaves["kernel"]), conv.weight))
        pairs.append((np.asarray(leaves["bias"]), conv.bias))
      elif kind_name == "ConvTranspose2x":
        conv = convs[int(index)]
        assert isinstance(conv, torch.nn.ConvTranspose3d)
        pairs.append((conv_transpose_kernel_to_torch(leaves["kernel"]), conv.weight))
        pairs.append((np.asarray(leaves["bias"]), conv.bias))
      else:
        raise AssertionError(f"Unmapped layer {block_name}/{layer_name}.")
  return pairs


def _randomised_variables(variables: dict, seed: int = 1) -> dict:
  """Our initial variables with random BN scale, bias, mean and variance (init has 1, 0, 0, 1, which
  would not notice a swapped or dropped BN tensor)."""
  rng = np.random.default_rng(seed)

  def randomise(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    if name == "mean" or (name == "bias" and path[-2].key.startswith("BatchNorm")):
      return jnp.asarray(rng.uniform(-0.2, 0.2, leaf.shape), leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(randomise, variables)


@pytest.fixture(scope="module")
def ported():
  """(our VNet, its randomised variables, a TorchVNet holding the same variables, an input)."""
  ours = get_model("vnet", num_classes=NUM_CLASSES, n_filters=N_FILTERS)
  image = np.random.default_rng(0).standard_normal(IMAGE_SHAPE).astype(np.float32)
  variables = jax.jit(lambda key: ours.init(key, jnp.asarray(image), train=False))(jax.random.key(0))
  variables = _randomised_variables(variables)
  theirs = bench_torch.TorchVNet(n_channels=IMAGE_SHAPE[-1], n_classes=NUM_CLASSES,
                                 n_filters=N_FILTERS)
  pairs = (flax_to_torch_pairs(variables["params"], theirs, "params") +
           flax_to_torch_pairs(variables["batch_stats"], theirs, "stats"))
  with torch.no_grad():
    for value, tensor in pairs:
      assert tuple(value.shape) == tuple(tensor.shape)
      tensor.copy_(torch.from_numpy(np.array(value)))  # A writable copy.
  # Every torch parameter and running statistic was written exactly once.
  expected = {id(t) for t in theirs.parameters()}
  expected |= {id(m.running_mean) for m in theirs.modules() if isinstance(m, torch.nn.BatchNorm3d)}
  expected |= {id(m.running_var) for m in theirs.modules() if isinstance(m, torch.nn.BatchNorm3d)}
  written = [id(t) for _, t in pairs]
  assert len(written) == len(set(written)) and set(written) == expected
  return ours, variables, theirs, image


@pytest.mark.parametrize("n_filters, channels, num_classes", [(4, 1, 2), (16, 1, 2), (8, 2, 3)])
def test_parameter_count_matches_ours(n_filters, channels, num_classes):
  ours = get_model("vnet", num_classes=num_classes, n_filters=n_filters)
  shapes = jax.eval_shape(lambda: ours.init(jax.random.key(0), jnp.zeros((1, 16, 16, 16, channels)),
                                            train=False))
  ours_count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
  theirs = bench_torch.TorchVNet(channels, num_classes, n_filters)
  theirs_count = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
  assert theirs_count == ours_count
  if (n_filters, channels, num_classes) == (16, 1, 2):
    assert theirs_count == 9_448_866  # The LA V-Net's count (docs/networks.md).


def test_transposed_conv_mapping():
  """Flax ConvTranspose (k2 s2 VALID) = PyTorch ConvTranspose3d with the kernel flipped in space."""
  rng = np.random.default_rng(0)
  c_in, c_out = 3, 5
  x = rng.standard_normal((2, 3, 4, 2, c_in)).astype(np.float32)
  theirs = torch.nn.ConvTranspose3d(c_in, c_out, 2, stride=2)
  with torch.no_grad():
    expected = _to_flax_layout(theirs(_to_torch_layout(x)))
  weight = theirs.weight.detach().numpy()  # (C_in, C_out, 2, 2, 2)
  bias = theirs.bias.detach().numpy()
  # The inverse of `conv_transpose_kernel_to_torch`.
  kernel = np.flip(np.transpose(weight, (2, 3, 4, 0, 1)), axis=(0, 1, 2))
  np.testing.assert_array_equal(conv_transpose_kernel_to_torch(kernel), weight)

  def apply(module, kernel):
    return np.asarray(module.apply({"params": {"kernel": kernel, "bias": bias}}, x))

  flax_conv_transpose = nn.ConvTranspose(c_out, (2, 2, 2), strides=(2, 2, 2), padding="VALID")
  np.testing.assert_allclose(apply(flax_conv_transpose, kernel), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(apply(layers.ConvTranspose2x(c_out), kernel), expected, rtol=1e-5,
                             atol=1e-6)
  # Without the flip it is a different layer.
  unflipped = np.transpose(weight, (2, 3, 4, 0, 1))
  assert not np.allclose(apply(flax_conv_transpose, unflipped), expected, atol=1e-3)
  # transpose_kernel=True (kernel (k, C_out, C_in), flipped and swapped inside lax.conv_transpose) is
  # PyTorch's layout and orientation: the weight ports by a plain axis permutation.
  flax_gradient_of_conv = nn.ConvTranspose(c_out, (2, 2, 2), strides=(2, 2, 2), padding="VALID",
                                           transpose_kernel=True)
  np.testing.assert_allclose(apply(flax_gradient_of_conv, np.transpose(weight, (2, 3, 4, 1, 0))),
                             expected, rtol=1e-5, atol=1e-6)


def _forward_ours(ours, variables, image, train: bool) -> np.ndarray:
  if train:  # Batch statistics; dropout off, since the two frameworks draw different masks.
    fn = lambda v, x: ours.apply(v, x, train=True, dropout=False, mutable=["batch_stats"])[0]
  else:
    fn = lambda v, x: ours.apply(v, x, train=False)
  return np.asarray(jax.jit(fn)(variables, image))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_matches_ours(ported, train):
  """Float32 logits, eval mode (running statistics) and train mode (batch statistics, no dropout)."""
  ours, variables, theirs, image = ported
  # A train-mode forward updates the running statistics: keep the fixture's model as it is.
  theirs = copy.deepcopy(theirs).train(train)
  expected = _forward_ours(ours, variables, image, train)
  with torch.no_grad():
    logits = _to_flax_layout(theirs(_to_torch_layout(image), turnoff_drop=True))
  assert logits.shape == IMAGE_SHAPE[:-1] + (NUM_CLASSES,)
  assert np.std(expected) > 0.1  # A non-degenerate comparison.
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_gradients_match_ours_in_float64(ported):
  """The supervised loss and its gradient with respect to every parameter, train mode, no dropout.

  In float64, because in float32 the comparison is ill-posed at a ReLU kink. Each framework's float32
  forward pass is off the float64 one by up to ~1e-4 (summation order; PyTorch's CPU convolutions
  ~3x more than XLA's), and with this seed one pre-ReLU activation of block eight is 4.9e-6 in
  float64, 5.4e-6 in JAX float32 and -3.1e-6 in PyTorch float32. The flipped ReLU derivative,
  amplified by the backward pass of train-mode BN over the few bottleneck voxels, moves PyTorch's
  float32 encoder gradients by up to ~14 % (JAX's stay within 0.5 % of float64). In float64 the two
  agree to ~1e-13.
  """
  ours, variables, theirs, image = ported
  theirs = copy.deepcopy(theirs).double().train()
  labels = np.random.default_rng(2).integers(0, NUM_CLASSES, IMAGE_SHAPE[:-1]).astype(np.int64)

  with jax.enable_x64(True):
    variables = jax.tree.map(lambda leaf: jnp.asarray(np.asarray(leaf), jnp.float64), variables)

    def our_loss(params):
      logits, _ = ours.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             jnp.asarray(image, jnp.float64), train=True, dropout=False,
                             mutable=["batch_stats"])
      probs = jax.nn.softmax(logits, axis=-1)
      return 0.5 * (losses.cross_entropy(logits, labels) +
                    losses.dice_loss(probs[..., 1], (labels == 1).astype(jnp.float64)))

    loss, grads = jax.jit(jax.value_and_grad(our_loss))(variables["params"])
    loss, grads = float(loss), jax.device_get(grads)

  their_loss = bench_torch.supervised_loss(
      theirs(_to_torch_layout(image).double(), turnoff_drop=True), torch.from_numpy(labels))
  their_loss.backward()
  np.testing.assert_allclose(their_loss.item(), loss, rtol=1e-12)
  pairs = flax_to_torch_pairs(grads, theirs, "params")
  assert len(pairs) == len(list(theirs.parameters()))
  for our_grad, tensor in pairs:
    # Relative to the tensor's largest gradient: a conv bias before a train-mode BN has gradient 0 up
    # to round-off (the BN subtracts it again).
    np.testing.assert_allclose(tensor.grad.numpy(), our_grad, rtol=0,
                               atol=1e-10 * max(np.abs(our_grad).max(), 1e-6))


def test_train_step_seconds_returns_positive_times():
  times = bench_torch.vnet_train_step_seconds(batch=2, patch=(16, 16, 16), channels=1, num_classes=2,
                                              n_filters=4, steps=3, warmup=1, threads=1)
  assert len(times) == 3
  assert all(isinstance(t, float) and math.isfinite(t) and t > 0 for t in times)


def test_train_step_seconds_rejects_bad_shapes():
  with pytest.raises(ValueError, match="divisible by 16"):
    bench_torch.vnet_train_step_seconds(batch=1, patch=(16, 16, 8), channels=1, num_classes=2,
                                        n_filters=4, steps=1, warmup=0)


def test_versions_and_device_description():
  assert bench_torch.torch_version() == torch.__version__
  assert bench_torch.device_description("cpu", threads=3).startswith("cpu (")
  assert "3 threads" in bench_torch.device_description("cpu", threads=3)
