"""A trained Duo-SegNet workdir scored with both BatchNorm modes on two versions of its validation
images: as the run's config gives them, and normalised like the training images.

  python benchmarks/duo_eval_inputs.py --config configs/duo.py:released --workdir W \
      [--set train.num_epochs=80 ...]

Under data.input = "rgb_imagenet" (the released protocol) the validation images are left in
[0, 1] while the network was trained on ImageNet-normalised ones; this separates what the
evaluation BatchNorm mode does from what that input mismatch does. Prints one line per (images,
eval.batchnorm): the Dice of f1, f2 and their mean, and the pooled F1 and MAE of each view (%),
raw predictions. Nothing is written to the workdir.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxseg import config_blocks, evaluate, parallel, train  # noqa: E402
from jaxseg.data import preprocess, sources  # noqa: E402
from jaxseg.data.batches import BatchSpec  # noqa: E402

# The trainer's own state building and checkpoint restore.
# pylint: disable=protected-access


def load_config(spec: str, overrides: list[str]):
  file, _, preset = spec.partition(":")
  module = config_blocks.load_sibling(str(REPO / file), pathlib.Path(file).stem)
  config = module.get_config(preset)
  for item in overrides:
    key, _, value = item.partition("=")
    config_blocks.apply_overrides(config, {key: ast.literal_eval(value)}, "--set")
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--set", nargs="*", default=[])
  args = parser.parse_args()
  config = load_config(args.config, args.set)
  method = train.checked_method(config)
  dataset = sources.load_dataset(config.data)
  config = train.with_run_length(config, method, sources.make_batches(dataset, config.data))
  spec = BatchSpec.of_case(dataset.labeled[0], config.data.patch_size)
  state, _ = train._initial_state(method, config, spec, parallel.make_mesh())
  ckpt = train._checkpointer(config, pathlib.Path(args.workdir), create=False)
  state, record = train._restore_latest(ckpt, state, pathlib.Path(args.workdir), required=True)
  ckpt.close()
  versions = {"as configured": dataset.validation}
  if config.data.input == preprocess.RGB_IMAGENET:
    versions["ImageNet-normalised"] = tuple(preprocess.imagenet_normalised(c)
                                            for c in dataset.validation)
  print(f"{args.config} {args.workdir} step {record['step']}: Dice f1 / f2 / mean, pooled F1 "
        "f1 / f2, MAE f1 / f2 (%)")
  for name, cases in versions.items():
    for mode in ("running", "per_image"):
      eval_cfg = config.eval.copy_and_resolve_references()
      eval_cfg.batchnorm = mode
      patch = tuple(config.eval.patch_size or config.data.patch_size)
      summary = evaluate.evaluate(train._predict_fn(method, state), cases, eval_cfg,
                                  dataset.num_classes, None, patch_size=patch)
      s = evaluate.headline(summary)
      print(f"  validation images {name}, eval.batchnorm {mode}: Dice {100 * s['f1/dice']:.2f} / "
            f"{100 * s['f2/dice']:.2f} / {100 * s['views_mean/dice']:.2f}, F1 "
            f"{100 * s['f1/f1_pooled']:.2f} / {100 * s['f2/f1_pooled']:.2f}, MAE "
            f"{100 * s['f1/mae_pooled']:.2f} / {100 * s['f2/mae_pooled']:.2f}", flush=True)


if __name__ == "__main__":
  main()
