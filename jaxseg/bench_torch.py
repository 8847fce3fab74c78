"""The PyTorch side of the benchmark: the reference V-Net's train step, timed in PyTorch.

`python -m jaxseg.bench` reports our JAX train step against "the same V-Net forward/backward in
PyTorch on the same device in the same run, as a ratio". This module is that PyTorch run. torch is an
optional dependency (the `bench` extra), so it is imported at the top here and callers import this
module lazily, only when torch is installed:

    from jaxseg import bench_torch
    times = bench_torch.vnet_train_step_seconds(batch=4, patch=(112, 112, 80), channels=1,
                                                num_classes=2, n_filters=16, steps=20, warmup=3)

`TorchVNet` is the V-Net of UA-MT `code/networks/vnet.py` (DTC and SASSNet use the same blocks),
with its module names, so reference state dicts load into it; `tests/test_bench_torch.py` proves that it
is our `jaxseg.models.vnet.VNet` by porting the Flax variables and comparing outputs and gradients.
Porting a Flax VNet (channels-last kernels) to it:

    Conv          kernel (kx, ky, kz, C_in, C_out)  -> weight kernel.permute(4, 3, 0, 1, 2)
    ConvTranspose kernel (kx, ky, kz, C_in, C_out)  -> weight flip(kernel, (0, 1, 2)).permute(3, 4, 0, 1, 2)
    BatchNorm     scale, bias, mean, var            -> weight, bias, running_mean, running_var

The transposed convolution needs the spatial flip: Flax (`transpose_kernel=False`) applies its kernel
unflipped to the zero-dilated input, out[2i + a] = x[i] · kernel[1 − a], while PyTorch scatters each
input voxel with its weight, out[2i + a] = x[i] · weight[:, :, a] (see `layers.ConvTranspose2x`).
"""

from __future__ import annotations

import platform
import time
from typing import Optional, Sequence, Union

import torch
from torch import nn
import torch.nn.functional as F

__all__ = [
    "NORMALIZATIONS",
    "TorchVNet",
    "device_description",
    "torch_version",
    "vnet_train_step_seconds",
]

NORMALIZATIONS = ("batchnorm", "groupnorm", "instancenorm", "none")
# The reference Dice's smoothing constant (UA-MT / DTC `losses.dice_loss`).
_DICE_SMOOTH = 1e-5


def _norm(normalization: str, channels: int) -> Optional[nn.Module]:
  """The reference's normalisation layer after each convolution (None: "none")."""
  if normalization == "batchnorm":
    return nn.BatchNorm3d(channels)
  if normalization == "groupnorm":
    return nn.GroupNorm(num_groups=16, num_channels=channels)
  if normalization == "instancenorm":
    return nn.InstanceNorm3d(channels)
  if normalization == "none":
    return None
  raise ValueError(f"Unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}.")


def _conv_norm_relu(conv: nn.Module, normalization: str, channels: int) -> list[nn.Module]:
  norm = _norm(normalization, channels)
  return [conv] + ([norm] if norm is not None else []) + [nn.ReLU(inplace=True)]


class ConvBlock(nn.Module):
  """`n_stages` × [Conv3d 3 p1 → norm → ReLU]; the first maps n_filters_in → n_filters_out."""

  def __init__(self, n_stages: int, n_filters_in: int, n_filters_out: int,
               normalization: str = "none"):
    super().__init__()
    ops = []
    for i in range(n_stages):
      channels_in = n_filters_in if i == 0 else n_filters_out
      ops += _conv_norm_relu(nn.Conv3d(channels_in, n_filters_out, 3, padding=1), normalization,
                             n_filters_out)
    # `conv` as in the reference, so that its state-dict keys (block_one.conv.0.weight, …) match.
    self.conv = nn.Sequential(*ops)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(x)


class DownsamplingConvBlock(nn.Module):
  """Conv3d k2 s2 p0 → norm → ReLU: halves every spatial size."""

  def __init__(self, n_filters_in: int, n_filters_out: int, stride: int = 2,
               normalization: str = "none"):
    super().__init__()
    conv = nn.Conv3d(n_filters_in, n_filters_out, stride, padding=0, stride=stride)
    self.conv = nn.Sequential(*_conv_norm_relu(conv, normalization, n_filters_out))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(x)


class UpsamplingDeconvBlock(nn.Module):
  """ConvTranspose3d k2 s2 p0 → norm → ReLU: doubles every spatial size."""

  def __init__(self, n_filters_in: int, n_filters_out: int, stride: int = 2,
               normalization: str = "none"):
    super().__init__()
    conv = nn.ConvTranspose3d(n_filters_in, n_filters_out, stride, padding=0, stride=stride)
    self.conv = nn.Sequential(*_conv_norm_relu(conv, normalization, n_filters_out))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(x)


class TorchVNet(nn.Module):
  """The LA-family V-Net (UA-MT `networks/vnet.py`), channels-first (N, C, X, Y, Z).

  Same architecture as `jaxseg.models.vnet.vnet(num_classes=n_classes, n_filters=n_filters)` (9,448,866
  parameters at n_channels=1, n_classes=2, n_filters=16, BN): cb(1, 2, 3, 3, 3) down the encoder with
  k2 s2 conv downsampling, Dropout3d(0.5) on block five's output, k2 s2 transposed-conv upsampling with
  the encoder features added (not concatenated), cb(3, 3, 3, 2, 1) up the decoder, Dropout3d(0.5) on
  block nine's output, and a 1³ conv to n_classes logits.

  Args:
    n_channels: input channels.
    n_classes: output logits.
    n_filters: base width n (16).
    normalization: one of `NORMALIZATIONS` (the reference trains with "batchnorm").
    has_dropout: the two channel-wise dropouts, active in train mode only (`Dropout3d` follows
      `self.training`).
  """

  def __init__(self, n_channels: int = 1, n_classes: int = 2, n_filters: int = 16,
               normalization: str = "batchnorm", has_dropout: bool = True):
    super().__init__()
    self.has_dropout = has_dropout
    n, norm = n_filters, normalization
    self.block_one = ConvBlock(1, n_channels, n, normalization=norm)
    self.block_one_dw = DownsamplingConvBlock(n, 2 * n, normalization=norm)
    self.block_two = ConvBlock(2, 2 * n, 2 * n, normalization=norm)
    self.block_two_dw = DownsamplingConvBlock(2 * n, 4 * n, normalization=norm)
    self.block_three = ConvBlock(3, 4 * n, 4 * n, normalization=norm)
    self.block_three_dw = DownsamplingConvBlock(4 * n, 8 * n, normalization=norm)
    self.block_four = ConvBlock(3, 8 * n, 8 * n, normalization=norm)
    self.block_four_dw = DownsamplingConvBlock(8 * n, 16 * n, normalization=norm)
    self.block_five = ConvBlock(3, 16 * n, 16 * n, normalization=norm)
    self.block_five_up = UpsamplingDeconvBlock(16 * n, 8 * n, normalization=norm)
    self.block_six = ConvBlock(3, 8 * n, 8 * n, normalization=norm)
    self.block_six_up = UpsamplingDeconvBlock(8 * n, 4 * n, normalization=norm)
    self.block_seven = ConvBlock(3, 4 * n, 4 * n, normalization=norm)
    self.block_seven_up = UpsamplingDeconvBlock(4 * n, 2 * n, normalization=norm)
    self.block_eight = ConvBlock(2, 2 * n, 2 * n, normalization=norm)
    self.block_eight_up = UpsamplingDeconvBlock(2 * n, n, normalization=norm)
    self.block_nine = ConvBlock(1, n, n, normalization=norm)
    self.out_conv = nn.Conv3d(n, n_classes, 1, padding=0)
    self.dropout = nn.Dropout3d(p=0.5, inplace=False)

  def forward(self, x: torch.Tensor, turnoff_drop: bool = False) -> torch.Tensor:
    """(N, n_channels, X, Y, Z) -> (N, n_classes, X, Y, Z) logits; sizes divisible by 16.

    `turnoff_drop=True` skips the dropouts (the reference's argument; our `dropout=False`).
    """
    use_dropout = self.has_dropout and not turnoff_drop
    x1 = self.block_one(x)
    x2 = self.block_two(self.block_one_dw(x1))
    x3 = self.block_three(self.block_two_dw(x2))
    x4 = self.block_four(self.block_three_dw(x3))
    x5 = self.block_five(self.block_four_dw(x4))
    if use_dropout:
      x5 = self.dropout(x5)
    x6 = self.block_six(self.block_five_up(x5) + x4)
    x7 = self.block_seven(self.block_six_up(x6) + x3)
    x8 = self.block_eight(self.block_seven_up(x7) + x2)
    x9 = self.block_nine(self.block_eight_up(x8) + x1)
    if use_dropout:
      x9 = self.dropout(x9)
    return self.out_conv(x9)


def dice_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
  """UA-MT / DTC `losses.dice_loss`: 1 − (2Σpg + s) / (Σp² + Σg² + s), s = 1e-5, batch-pooled."""
  target = target.float()
  intersection = torch.sum(probs * target)
  denominator = torch.sum(probs * probs) + torch.sum(target * target)
  return 1 - (2 * intersection + _DICE_SMOOTH) / (denominator + _DICE_SMOOTH)


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """0.5 · (CE + Dice of the class-1 softmax), UA-MT `train_LA.py` and our supervised "ce_dice"."""
  probs = F.softmax(logits, dim=1)
  return 0.5 * (F.cross_entropy(logits, labels) + dice_loss(probs[:, 1], labels == 1))


def torch_version() -> str:
  """The installed PyTorch version, e.g. "2.5.1+cu124"."""
  return torch.__version__


def device_description(device: Union[str, torch.device] = "cpu",
                       threads: Optional[int] = None) -> str:
  """What runs PyTorch on `device`, in the style of the JAX side ("platform (kind)").

  E.g. "cuda (NVIDIA H100 80GB HBM3)" or "cpu (x86_64, 2 threads)".

  Args:
    device: a torch device.
    threads: the `threads` given to `vnet_train_step_seconds` (None: PyTorch's current intra-op
      thread count, which is what that function uses when given None).
  """
  device = torch.device(device)
  if device.type == "cuda":
    return f"cuda ({torch.cuda.get_device_name(device)})"
  if device.type == "cpu":
    threads = torch.get_num_threads() if threads is None else threads
    return f"cpu ({platform.machine() or 'unknown'}, {threads} threads)"
  return device.type


def _synchronize(device: torch.device) -> None:
  # CUDA kernels run asynchronously: a time read before they finish measures only the launches.
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def vnet_train_step_seconds(*,
                            batch: int,
                            patch: Sequence[int],
                            channels: int,
                            num_classes: int,
                            n_filters: int,
                            device: Union[str, torch.device] = "cpu",
                            steps: int,
                            warmup: int,
                            threads: Optional[int] = None,
                            seed: int = 0) -> list[float]:
  """Times the reference V-Net's supervised train step in PyTorch.

  Builds `TorchVNet(channels, num_classes, n_filters, "batchnorm", has_dropout=True)` (PyTorch default
  init) and SGD(lr 0.01, momentum 0.9, weight decay 1e-4), as UA-MT `train_LA.py`, on random float32
  images (batch, channels, *patch) and random labels in [0, num_classes). A step is: forward in train
  mode, `supervised_loss`, backward, optimiser step. `warmup` untimed steps (on CUDA they include
  cuDNN's autotuning, `cudnn.benchmark = True`) precede `steps` timed ones; each is timed from its
  start to a device synchronisation after the optimiser step. Float32 throughout, with PyTorch's default
  math modes (cuDNN may use TF32 for convolutions on Ampere and later, as XLA's default precision
  does).

  Args:
    batch: samples per step.
    patch: spatial size (X, Y, Z), each divisible by 16.
    channels: input channels.
    num_classes: logits (≥ 2: the Dice term is on class 1).
    n_filters: base width of the V-Net.
    device: a torch device, e.g. "cpu" or "cuda".
    steps: timed steps (≥ 1).
    warmup: untimed steps before them (≥ 0).
    threads: `torch.set_num_threads` for the run (None: PyTorch's default); restored afterwards.
    seed: seeds the initialisation, the data and the dropout masks.

  Returns:
    The `steps` per-step wall times in seconds.
  """
  patch = tuple(int(s) for s in patch)
  if len(patch) != 3 or any(s <= 0 or s % 16 for s in patch):
    raise ValueError(f"patch {patch} must be three positive sizes divisible by 16.")
  if num_classes < 2:
    raise ValueError(f"num_classes must be at least 2 (Dice on class 1), got {num_classes}.")
  if steps < 1 or warmup < 0:
    raise ValueError(f"Need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.")
  device = torch.device(device)
  previous_threads = torch.get_num_threads()
  previous_benchmark = torch.backends.cudnn.benchmark
  try:
    if threads is not None:
      torch.set_num_threads(threads)
    if device.type == "cuda":
      # Picks the fastest convolution algorithms for these fixed shapes, during the warm-up.
      torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    model = TorchVNet(channels, num_classes, n_filters, normalization="batchnorm",
                      has_dropout=True).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = torch.randn((batch, channels) + patch, dtype=torch.float32, device=device)
    labels = torch.randint(0, num_classes, (batch,) + patch, dtype=torch.long, device=device)

    def train_step() -> None:
      optimizer.zero_grad(set_to_none=True)
      loss = supervised_loss(model(images), labels)
      loss.backward()
      optimizer.step()

    for _ in range(warmup):
      train_step()
    _synchronize(device)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      train_step()
      _synchronize(device)
      times.append(time.perf_counter() - start)
    return times
  finally:
    torch.set_num_threads(previous_threads)
    torch.backends.cudnn.benchmark = previous_benchmark
