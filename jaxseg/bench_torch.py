"""The PyTorch side of the benchmark: the reference V-Net's and DTC's train steps, timed in PyTorch.

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
`TorchVNetSDF` is DTC's two-head `code/networks/vnet_sdf.py` (out_conv → tanh: the level set, our head
"sdf"; out_conv2: the segmentation logit, our head "seg"), and `dtc_train_step` the iteration of DTC
`code/train_la_dtc.py`, with its `compute_sdf` of the labeled crops on the host (SciPy and
scikit-image) at every step; `tests/test_bench_torch_dtc.py` proves that step equal to our
`jaxseg.methods.dtc.train_step`. `bench.py` alternates these steps with ours (`make_*` return one step
as a function). Porting a Flax VNet (channels-last kernels) to it:

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
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from jaxseg import geometry
# The reference's `ramps.sigmoid_rampup` (exp(−5 (1 − clip(current, 0, L) / L)²), 1 if L = 0) is
# ours, float64 on host scalars; exported here for the PyTorch DTC iteration's callers.
from jaxseg.schedules import sigmoid_rampup

__all__ = [
    "NORMALIZATIONS",
    "TorchVNet",
    "TorchVNetSDF",
    "compute_sdf",
    "device_description",
    "dtc_loss",
    "make_dtc_train_step",
    "make_vnet_train_step",
    "sigmoid_rampup",
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
    return self.out_conv(self.features(x, turnoff_drop))

  def features(self, x: torch.Tensor, turnoff_drop: bool = False) -> torch.Tensor:
    """Block nine's output (after its dropout in train mode), what the heads read."""
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
    return x9


class TorchVNetSDF(TorchVNet):
  """DTC's `networks/vnet_sdf.py`: the V-Net with two 1³ heads on block nine, `out_conv` followed by
  tanh (the level set z; our head "sdf") and `out_conv2` (the segmentation logit s; our "seg").

  `forward` returns (z, s), each (N, n_classes, X, Y, Z), as the reference does.
  """

  def __init__(self, n_channels: int = 1, n_classes: int = 1, n_filters: int = 16,
               normalization: str = "batchnorm", has_dropout: bool = True):
    super().__init__(n_channels, n_classes, n_filters, normalization, has_dropout)
    self.out_conv2 = nn.Conv3d(n_filters, n_classes, 1, padding=0)
    self.tanh = nn.Tanh()

  def forward(self, x: torch.Tensor, turnoff_drop: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    x9 = self.features(x, turnoff_drop)
    return self.tanh(self.out_conv(x9)), self.out_conv2(x9)


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


def compute_sdf(labels: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
  """DTC / SASSNet `utils/util.py compute_sdf(labels, out_shape)` on the host, as their training
  scripts call it on the labeled crops every iteration (`jaxseg.geometry.reference_compute_sdf`).

  Args:
    labels: (B, X, Y, Z) {0, 1} labels of the labeled crops.
    out_shape: (B, X, Y, Z), the shape of the result (float64, as the reference's np.zeros).
  """
  return geometry.reference_compute_sdf(labels.astype(np.uint8).reshape(out_shape))


def dtc_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, iter_num: int, *,
             beta: float = 0.3, k: float = 1500.0, consistency: float = 1.0,
             consistency_rampup: float = 40.0, rampup_block: int = 150,
             turnoff_drop: bool = False) -> tuple[torch.Tensor, dict]:
  """The loss of one DTC `train_la_dtc.py` iteration at step `iter_num`: the first len(labels)
  images are the labeled ones. The SDF of their labels is computed on the host (`compute_sdf`), as
  the reference does every step; its unused BCE term is computed too, as there.

  Returns:
    (loss, {"loss_dice", "loss_lsf", "loss_consistency", "consistency_weight"}).
  """
  labeled = labels.shape[0]
  outputs_tanh, outputs = model(images, turnoff_drop=turnoff_drop)
  outputs_soft = torch.sigmoid(outputs)
  with torch.no_grad():
    gt_dis = compute_sdf(labels.cpu().numpy(), outputs[:labeled, 0, ...].shape)
    gt_dis = torch.from_numpy(gt_dis).to(device=outputs.device, dtype=outputs.dtype)
  target = (labels == 1).to(outputs.dtype)
  F.binary_cross_entropy_with_logits(outputs[:labeled, 0], target)  # Logged, never added.
  loss_sdf = F.mse_loss(outputs_tanh[:labeled, 0, ...], gt_dis)
  loss_seg_dice = dice_loss(outputs_soft[:labeled, 0, :, :, :], labels == 1)
  dis_to_mask = torch.sigmoid(-k * outputs_tanh)
  consistency_loss = torch.mean((dis_to_mask - outputs_soft) ** 2)
  weight = consistency * sigmoid_rampup(iter_num // rampup_block, consistency_rampup)
  loss = loss_seg_dice + beta * loss_sdf + weight * consistency_loss
  return loss, dict(loss_dice=loss_seg_dice, loss_lsf=loss_sdf, loss_consistency=consistency_loss,
                    consistency_weight=weight)


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


def _check_patch(patch: Sequence[int]) -> tuple[int, ...]:
  patch = tuple(int(s) for s in patch)
  if len(patch) != 3 or any(s <= 0 or s % 16 for s in patch):
    raise ValueError(f"patch {patch} must be three positive sizes divisible by 16.")
  return patch


def make_vnet_train_step(*, batch: int, patch: Sequence[int], channels: int, num_classes: int,
                         n_filters: int, device: Union[str, torch.device] = "cpu",
                         seed: int = 0) -> Callable[[], None]:
  """The reference V-Net's supervised train step in PyTorch, as a function of no arguments that
  runs one step and waits for the device (see `vnet_train_step_seconds` for what a step is)."""
  patch = _check_patch(patch)
  if num_classes < 2:
    raise ValueError(f"num_classes must be at least 2 (Dice on class 1), got {num_classes}.")
  device = torch.device(device)
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
    _synchronize(device)

  return train_step


def make_dtc_train_step(*, labels: np.ndarray, batch_unlabeled: int, channels: int, n_filters: int,
                        device: Union[str, torch.device] = "cpu", beta: float = 0.3,
                        seed: int = 0) -> Callable[[], None]:
  """One iteration of DTC `train_la_dtc.py` in PyTorch per call, waiting for the device.

  `TorchVNetSDF(channels, 1, n_filters)` with BN and dropout (PyTorch default init), SGD(lr 0.01,
  momentum 0.9, weight decay 1e-4), on random float32 images of len(labels) + batch_unlabeled
  samples; a step is: forward of the whole batch in train mode, `dtc_loss` (the SDF of `labels`
  on the host, every step), backward, optimiser step; the step counter advances like iter_num.

  Args:
    labels: (B_l, X, Y, Z) {0, 1} labels of the labeled crops (sizes divisible by 16).
  """
  labels = np.asarray(labels)
  patch = _check_patch(labels.shape[1:])
  device = torch.device(device)
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
  torch.manual_seed(seed)
  model = TorchVNetSDF(channels, 1, n_filters, normalization="batchnorm", has_dropout=True)
  model = model.to(device).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
  images = torch.randn((labels.shape[0] + batch_unlabeled, channels) + patch, dtype=torch.float32,
                       device=device)
  # The reference's labels are on the device; `compute_sdf` copies them back every step.
  label_tensor = torch.from_numpy(labels.astype(np.int64)).to(device)
  counter = {"iter_num": 0}

  def train_step() -> None:
    optimizer.zero_grad(set_to_none=True)
    loss, _ = dtc_loss(model, images, label_tensor, counter["iter_num"], beta=beta)
    loss.backward()
    optimizer.step()
    counter["iter_num"] += 1
    _synchronize(device)

  return train_step


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
  does). `python -m jaxseg.bench --torch` alternates `make_vnet_train_step`'s steps with ours instead.

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
  if steps < 1 or warmup < 0:
    raise ValueError(f"Need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.")
  previous_threads = torch.get_num_threads()
  previous_benchmark = torch.backends.cudnn.benchmark
  try:
    if threads is not None:
      torch.set_num_threads(threads)
    train_step = make_vnet_train_step(batch=batch, patch=patch, channels=channels,
                                      num_classes=num_classes, n_filters=n_filters, device=device,
                                      seed=seed)
    for _ in range(warmup):
      train_step()
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      train_step()
      times.append(time.perf_counter() - start)
    return times
  finally:
    torch.set_num_threads(previous_threads)
    torch.backends.cudnn.benchmark = previous_benchmark
