"""Where DKUXNet's time goes on a CPU: compile and step times of the configs/dkuxnet.py presets.

  python benchmarks/dkuxnet_cpu.py [--preset ""|supervised] [--pieces] [--repeats 3]
      [--set method.model.centre_dim=16 ...] [--kmax_conv native]

Prints, for the preset's config on a fake batch of its crop size (labels = image > 0.3):
- `jax.jit(dkuxnet.init)`: lower + compile seconds, then run seconds;
- `jax.jit(dkuxnet.train_step)`: lower + compile seconds, the first call, then the median step;
and with --pieces the forward and forward + backward (compile, median) of the pieces of one step
on the whole batch: the UX-Net alone, the DKUXNet (UX-Net + kMaX), and the two contrastive losses
of one network with M = method.num_anchors anchors on the network's output shapes. --set overrides
config keys (Python literals); --kmax_conv native runs the kMaX pixel heads' depthwise convs as
XLA's grouped convolution (the CPU default is the block-diagonal dense form).
"""

from __future__ import annotations

import argparse
import ast
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py, beside this script)
from jaxseg import losses  # noqa: E402
from jaxseg.data.batches import Batch  # noqa: E402
from jaxseg.methods import dkuxnet  # noqa: E402


def load_config(preset: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("dkuxnet_config", REPO / "configs" / "dkuxnet.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def fake_batch(config) -> Batch:
  rng = np.random.default_rng(0)
  b_l, b_u = config.data.batch_labeled, config.data.batch_unlabeled
  patch = tuple(config.data.patch_size)
  image = rng.normal(size=(b_l + b_u, *patch, 1)).astype(np.float32)
  label = (image[..., 0] > 0.3).astype(np.int32)
  ones = lambda n: np.ones((n, 1), bool)
  return Batch(labeled={"image": image[:b_l], "label": label[:b_l], "modality_mask": ones(b_l)},
               unlabeled={"image": image[b_l:], "modality_mask": ones(b_u)})


def compile_and_time(name: str, fn, *args, repeats: int = 3):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  first_s = time.perf_counter() - start
  step_s, _ = median_seconds(lambda: jax.block_until_ready(compiled(*args)), repeats)
  print(f"{name:42s} compile {compile_s:7.1f} s   first {first_s:6.2f} s   median {step_s:6.2f} s",
        flush=True)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="")
  parser.add_argument("--pieces", action="store_true")
  parser.add_argument("--no_step", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--set", nargs="*", default=[])
  parser.add_argument("--kmax_conv", default="auto")
  args = parser.parse_args()
  print(f"uptime: {os.popen('uptime').read().strip()}")
  config = load_config(args.preset)
  for item in args.set:
    key, value = item.split("=", 1)
    block = config
    *parents, leaf = key.split(".")
    for part in parents:
      block = block[part]
    block[leaf] = ast.literal_eval(value)
    print(f"set {key} = {block[leaf]!r}")
  if args.kmax_conv != "auto":
    from jaxseg.models import kmax
    from jaxseg.models.uxnet import GroupedConv

    def grouped_conv(*a, **k):
      k["impl"] = args.kmax_conv
      return GroupedConv(*a, **k)
    kmax.GroupedConv = grouped_conv
    print(f"kMaX depthwise conv impl: {args.kmax_conv}")
  batch = fake_batch(config)
  print(f"preset {args.preset!r}: method.preset {config.method.preset}, crops "
        f"{tuple(config.data.patch_size)}, batch {config.data.batch_labeled}+"
        f"{config.data.batch_unlabeled}, groups {tuple(config.method.groups)}, "
        f"M {config.method.num_anchors}", flush=True)
  key = jax.random.key(0)
  state = compile_and_time("init", lambda k: dkuxnet.init(k, config, batch), key, repeats=1)
  if not args.no_step:
    compile_and_time("train_step", dkuxnet.train_step, state, batch, jax.random.key(1),
                     repeats=args.repeats)
  if args.pieces:
    images = jnp.concatenate([batch.labeled["image"], batch.unlabeled["image"]])
    net = state.nets["A"]
    params = net.params

    def forward(p, kmax):
      variables = {"params": p}
      if net.batch_stats:
        variables["batch_stats"] = net.batch_stats
      if kmax:
        out, _ = net.apply_fn(variables, images, train=True, mutable=["batch_stats"])
        return out
      return net.apply_fn(variables, images, train=True, mutable=["batch_stats"])[0]


    from jaxseg.models.uxnet import UXNet
    ux = UXNet(num_classes=config.data.num_classes, feature_size=config.method.model.feature_size)
    ux_fwd = lambda p: ux.apply({"params": p}, images)["logits"]
    compile_and_time("uxnet forward", lambda p: jnp.sum(ux_fwd(p)), params["uxnet"],
                     repeats=args.repeats)
    compile_and_time("uxnet grad", jax.grad(lambda p: jnp.sum(ux_fwd(p) ** 2)), params["uxnet"],
                     repeats=args.repeats)

    if "kmax" in params:
      full = lambda p: forward(p, True)
      loss = lambda p: jnp.sum(full(p)["logits"] ** 2) + jnp.sum(full(p)["mask_logits"] ** 2)
      compile_and_time("dkuxnet forward (train mode)", lambda p: jax.tree.map(jnp.sum, full(p)),
                       params, repeats=args.repeats)
      compile_and_time("dkuxnet grad", jax.grad(loss), params, repeats=args.repeats)
      k = config.data.num_classes
      shape = images.shape[:-1]
      rng = np.random.default_rng(1)
      probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(*shape, k)), jnp.float32))
      groups = jax.nn.softmax(jnp.asarray(rng.normal(size=(*shape, k)), jnp.float32))
      classes = jnp.asarray(rng.integers(0, 2, size=shape), jnp.int32)
      hp = state.hparams

      def contrast(mine):
        segc, qdc = dkuxnet.contrastive_terms(jax.random.key(3), mine, {
            "probs": probs, "groups": groups}, classes, hp)
        return segc + qdc
      mine = {"probs": probs, "groups": groups}
      compile_and_time("contrastive (segc+qdc) forward", contrast, mine, repeats=args.repeats)
      compile_and_time("contrastive (segc+qdc) grad", jax.grad(contrast), mine,
                       repeats=args.repeats)
  print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
  main()
