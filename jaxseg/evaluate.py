"""Evaluation of a method on labeled cases, and prediction of new files (docs/evaluation.md).

`evaluate` runs the sliding window (`jaxseg.inference`) once per case for all of a method's views,
turns probabilities into labels with the references' rule (`jaxseg.postprocess`), scores every view
with the medpy-equal metrics (`jaxseg.metrics`) per class and per region, raw and after
largest-connected-component post-processing, and writes (`jaxseg.writers`)

    out_dir/
      metrics.csv       one row per case x view x postprocess x class (or region)
      summary.json      per view and postprocess: per class (region) mean / std over the cases
      figure.png        a few cases: image | ground truth | prediction per view, Dice in the titles
                        | one heat panel per map of the method's optional `maps` (maps_fn), its
                        mean in the title (computed for these cases only; never scored)
      predictions/      <case>_<view>.nii.gz (3D, uint8) or <case>_<view>.png (2D)
      modality_subsets.csv  with eval.modalities = "subsets": Dice per modality subset x class /
                        region (`subset_table`)

`predict_files` is `--mode predict`: it segments NIfTI, LA-style h5 or 2D image files
(`jaxseg.data.readers`) with one view (eval.view: the first, a named one, or the mean of all) and
writes one label file per input.

A method's predict function takes the window inputs of a case, {"image": (B, *patch, C) float32,
"modality_mask": (B, C) bool, **fields} (the windows of the case's per-voxel `Case.fields`), and
returns {view: probabilities (B, *patch, K)} (`case_inputs`). A method's optional maps function
takes the same inputs and returns {name: (B, *patch) values in [0, 1]} (e.g. ASDNet's confidence);
its maps are slid like the probabilities (`predict_maps`) and only shown in figure.png.

Conventions (decisions, see also docs/evaluation.md):

* A view's probabilities (*spatial, 1) are thresholded (`> threshold`, strict); (*spatial, K) are
  argmax'ed (`postprocess.probabilities_to_labels`).
* Scored classes are 1..num_classes-1 (background is never scored). Regions (`eval.regions`) are
  scored like classes on the masks isin(labels, group) of prediction and ground truth; their rows
  and summary entries are named by the region ("WT", ...) where classes have their index.
* Means and standard deviations (population, ddof = 0) are over the cases whose ground truth holds
  the class (region); cases without it are counted (`num_empty_gt_excluded`) and left out. Empty
  predictions are scored by the empty policy (`metrics.py`) and counted (`num_empty_predictions`).
* Multi-class tasks (num_classes > 2) also get a "mean" entry: the mean over the foreground classes
  1..K-1 of each per-class mean (undefined when a class has no scored case).
* LCC rows exist for binary tasks only (num_classes == 2), where LCC means "keep the largest
  foreground component" (DTC `getLargestCC`). An empty prediction is kept as it is (the reference
  asserts there): its LCC row equals its raw row, so raw and LCC means cover the same cases.
* 2D tasks also get Duo-SegNet's pooled scores: `f1_pooled` = Dice of all test pixels pooled,
  `mae_pooled` = fraction of wrong pixels, over every case (empty ground truths included).
* Dice, Jaccard and MAE are fractions in [0, 1] (reports multiply by 100); distances are in the
  units of the case spacing: mm for NIfTI sources, voxels for LA h5 and 2D images (spacing 1).
* Saved predictions are the raw labels (no LCC).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxseg import eval_batchnorm, inference, metrics, parallel, postprocess, writers
from jaxseg.data import readers
from jaxseg.data.base import Case, DataError, resolve_modalities
from jaxseg.postprocess import LCC, RAW
from jaxseg.writers import CSV_COLUMNS, METRIC_NAMES

__all__ = [
    "CSV_COLUMNS",
    "METRIC_NAMES",
    "case_inputs",
    "check_mirror_axes",
    "check_regions",
    "choose_view",
    "evaluate",
    "headline",
    "image_inputs",
    "predict_files",
    "predict_maps",
    "predict_views",
    "raw_lcc_rows",
    "raw_lcc_table_lines",
    "summary_lines",
    "view_channels",
    "window_batch_size",
    "window_geometry",
    "window_spec",
]

PathLike = Union[str, os.PathLike]
# Window inputs {"image": (B, *patch, C), "modality_mask": (B, C), **fields} -> {view: probabilities
# (B, *patch, K)}; a `jax.tree_util.Partial` binding the state avoids a recompilation per checkpoint
# (see `inference.sliding_window_predict`).
ViewsPredictFn = Callable[[dict], dict]
# Window inputs (as above) -> {name: (B, *patch) per-voxel values in [0, 1]}: a method's optional
# `maps` bound to its state, e.g. `jax.tree_util.Partial(method.maps, state)`; shown, never scored.
MapsFn = Callable[[dict], dict]
# A case's inputs as the sliding window takes them: (per-voxel {name: (*spatial, ...)}, per-case
# {name: (...)}).
CaseInputs = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]

POOLED_NAMES = ("f1_pooled", "mae_pooled")
PREDICTIONS_DIR = "predictions"
MEAN = "mean"  # The summary entry of the mean over the foreground classes (num_classes > 2).


# ---------------------------------------------------------------------------------------------------
# Configuration checks (before any work).


def check_mirror_axes(eval_cfg: ml_collections.ConfigDict, ndim: int) -> tuple[int, ...]:
  """`eval.mirror_axes` as a tuple of distinct spatial axes in [0, ndim); DataError otherwise."""
  value = eval_cfg.get("mirror_axes", ())
  try:
    return inference.check_mirror_axes(value, ndim)
  except ValueError:
    raise DataError(f"config eval.mirror_axes = {value!r} must be () or distinct spatial axes "
                    f"among 0..{ndim - 1} (the patch is {ndim}D)") from None


def check_regions(eval_cfg: ml_collections.ConfigDict, num_classes: int
                  ) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """`eval.regions` as ((name, classes), ...); DataError naming the key otherwise.

  A region is a (name, classes) pair: a non-empty name that is not a class index nor "mean",
  unique, and a non-empty tuple of distinct foreground classes in 1..num_classes-1.
  """
  value = eval_cfg.get("regions", ())
  where = f"config eval.regions = {value!r}"
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise DataError(f"{where} must be a tuple of (name, classes) pairs, e.g. "
                    "(('WT', (1, 2, 3)), ('ET', (3,)))")
  regions, names = [], set()
  for entry in value:
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
      raise DataError(f"{where}: {entry!r} is not a (name, classes) pair")
    name, group = entry
    if not isinstance(name, str) or not name or name.isdigit() or name == MEAN or name in names:
      raise DataError(f"{where}: region name {name!r} must be a non-empty string, not a class "
                      f"index, not {MEAN!r}, and unique")
    if isinstance(group, (str, bytes)) or not isinstance(group, Sequence) or not group:
      raise DataError(f"{where}: region {name!r} needs a non-empty tuple of classes")
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
               and 1 <= c < num_classes for c in group) or len(set(group)) != len(group):
      raise DataError(f"{where}: region {name!r} classes {tuple(group)!r} must be distinct "
                      f"foreground classes in 1..{num_classes - 1}")
    names.add(name)
    regions.append((name, tuple(int(c) for c in group)))
  return tuple(regions)


# ---------------------------------------------------------------------------------------------------
# Windows, inputs and views.


def window_geometry(eval_cfg: ml_collections.ConfigDict, patch_size: Sequence[int]
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The (patch, strides) of the sliding window: `eval.patch_size` or else `patch_size`, and
  `eval.strides` or else half the patch per axis (at least 1).
  """
  patch = tuple(int(p) for p in (tuple(eval_cfg.patch_size) or tuple(patch_size)))
  strides = tuple(int(s) for s in eval_cfg.strides) or tuple(max(1, p // 2) for p in patch)
  if len(patch) not in (2, 3) or len(strides) != len(patch):
    raise ValueError(f"eval.patch_size {patch} and eval.strides {strides} must have one entry per "
                     "spatial axis (2 or 3)")
  return patch, strides


def case_inputs(case: Case) -> CaseInputs:
  """The inputs of a case: per-voxel {"image": (*spatial, C), **case.fields} and per-case
  {"modality_mask": (C,) bool} (`Case.present`)."""
  return {"image": case.image, **case.fields}, {"modality_mask": case.present}


def image_inputs(image: np.ndarray, modality_mask: Optional[np.ndarray] = None) -> CaseInputs:
  """The inputs of a bare image (*spatial, C): no fields; all modalities present unless a (C,)
  bool `modality_mask` is given."""
  mask = (np.ones(image.shape[-1], bool) if modality_mask is None
          else np.asarray(modality_mask, bool))
  return {"image": image}, {"modality_mask": mask}


def window_spec(inputs: CaseInputs, batch_size: int, patch: Sequence[int]
                ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one batch of window inputs: per-voxel entries (B, *patch, ...), per-case
  entries (B, ...)."""
  voxel, per_case = inputs
  ndim = len(patch)
  spec = {k: jax.ShapeDtypeStruct((batch_size, *patch, *np.shape(v)[ndim:]), np.asarray(v).dtype)
          for k, v in voxel.items()}
  spec.update({k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)), np.asarray(v).dtype)
               for k, v in per_case.items()})
  return spec


def _spec_key(spec: Mapping[str, jax.ShapeDtypeStruct]) -> tuple:
  return tuple(sorted((k, tuple(s.shape), str(s.dtype)) for k, s in spec.items()))


def _as_partial(fn: Callable) -> jax.tree_util.Partial:
  # A plain function bound inside another Partial would be a (non-array) pytree leaf; wrapped in
  # its own Partial it becomes static tree structure instead.
  return fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)


def view_channels(predict_fn: ViewsPredictFn, spec: Mapping[str, jax.ShapeDtypeStruct]
                  ) -> dict[str, int]:
  """The views of `predict_fn` and their channel counts K, in the order the method returns them.

  Only shapes are traced (`jax.eval_shape`); nothing is computed.

  Args:
    predict_fn: window inputs -> {view: (B, *patch, K)}.
    spec: the window inputs' shapes (`window_spec`), with "image" (B, *patch, C).

  Returns:
    {view: K} in the method's order (Python dicts keep insertion order; JAX's own flattening sorts
    keys, so the order is read while tracing).
  """
  order: list[str] = []

  def probe(window_inputs):
    views = predict_fn(window_inputs)
    if not isinstance(views, dict) or not views:
      raise TypeError(f"predict_fn must return a non-empty dict {{view: probabilities}}, got "
                      f"{type(views).__name__}")
    order.extend(views)
    return views

  shapes = jax.eval_shape(probe, dict(spec))
  expected = tuple(spec["image"].shape[:-1])
  for name in order:
    if shapes[name].shape[:-1] != expected:
      raise ValueError(f"view {name!r} of predict_fn maps windows {tuple(spec['image'].shape)} to "
                       f"{shapes[name].shape}; expected {expected} + (K,)")
  return {name: int(shapes[name].shape[-1]) for name in order}


def _concat_views(predict_fn: ViewsPredictFn, window_inputs: dict) -> jax.Array:
  """All views of `predict_fn` side by side on the channel axis, in the method's order."""
  return jnp.concatenate([jnp.asarray(p, jnp.float32) for p in predict_fn(window_inputs).values()],
                         axis=-1)


@dataclasses.dataclass(frozen=True)
class _SelectView:
  """`predict_fn(window_inputs)[name]`; frozen (hashable by value) so jit reuses its compilation."""

  name: str

  def __call__(self, predict_fn: ViewsPredictFn, window_inputs: dict) -> jax.Array:
    return predict_fn(window_inputs)[self.name]


@dataclasses.dataclass(frozen=True)
class _MeanViews:
  """The mean over the views of `predict_fn(window_inputs)` (all of K channels): eval.view = "mean".

  The sliding window averages linearly, so averaging per window equals averaging the views'
  averaged probabilities; the decision rule is applied to the mean.
  """

  def __call__(self, predict_fn: ViewsPredictFn, window_inputs: dict) -> jax.Array:
    views = [jnp.asarray(p, jnp.float32) for p in predict_fn(window_inputs).values()]
    return sum(views[1:], views[0]) / len(views)


MEAN_VIEW = "mean"  # eval.view: the average of all views' probabilities.


def choose_view(setting: str, channels: Mapping[str, int]) -> tuple[str, int]:
  """(view, K) that `--mode predict` writes for eval.view = `setting`.

  Args:
    setting: "" (the method's first view), a view name, or "mean" (the average of all views; a
      view named "mean" wins).
    channels: {view: K} in the method's order (`view_channels`).

  Raises:
    DataError: naming eval.view and listing the method's views, for an unknown name, or "mean"
      over views of different channel counts.
  """
  names = list(channels)
  if not setting:
    return names[0], channels[names[0]]
  if setting in channels:
    return setting, channels[setting]
  if setting == MEAN_VIEW:
    if len(set(channels.values())) != 1:
      raise DataError(f"config eval.view = 'mean': the method's views {channels} have different "
                      "channel counts; choose one view")
    return MEAN_VIEW, channels[names[0]]
  raise DataError(f"config eval.view = {setting!r} is not one of the method's views "
                  f"{', '.join(names)}; use one of them, 'mean' (their average) or '' (the first, "
                  f"{names[0]})")


def window_batch_size(eval_cfg: ml_collections.ConfigDict, mesh: Optional[Mesh] = None) -> int:
  """Windows per network call: `eval.batch_size`, rounded up to a multiple of the mesh's devices."""
  n = mesh.size if mesh is not None else 1
  return -(-int(eval_cfg.batch_size) // n) * n


def _window_options(eval_cfg: ml_collections.ConfigDict, ndim: int) -> dict:
  """The `sliding_window_predict` options of `eval_cfg` other than the batch size."""
  return dict(gaussian=bool(eval_cfg.gaussian), mirror_axes=check_mirror_axes(eval_cfg, ndim),
              shape_bucket=int(eval_cfg.shape_bucket))


def predict_views(predict_fn: ViewsPredictFn, inputs: Union[CaseInputs, np.ndarray],
                  eval_cfg: ml_collections.ConfigDict, patch: Sequence[int], strides: Sequence[int],
                  channels: Optional[dict[str, int]] = None,
                  mesh: Optional[Mesh] = None) -> dict[str, np.ndarray]:
  """Averaged sliding-window probabilities of every view, from one pass over the windows.

  Args:
    predict_fn: window inputs -> {view: (B, *patch, K_view)}, jittable.
    inputs: `case_inputs(case)`, or a bare image (*spatial, C) float32 (`image_inputs`).
    eval_cfg: the `config.eval` block (batch_size, gaussian, mirror_axes, shape_bucket).
    patch: window size per spatial axis.
    strides: window step per spatial axis.
    channels: `view_channels(...)` when already known.
    mesh: spread each batch of windows over these devices (`predict_fn`'s arrays replicated on
      them); None: one device.

  Returns:
    {view: (*spatial, K_view) float32 probabilities}, in the method's view order.
  """
  if not isinstance(inputs, tuple):
    inputs = image_inputs(np.asarray(inputs))
  predict_fn = _as_partial(predict_fn)
  batch_size = window_batch_size(eval_cfg, mesh)
  if channels is None:
    channels = view_channels(predict_fn, window_spec(inputs, batch_size, patch))
  voxel, per_case = inputs
  stacked = inference.sliding_window_predict(
      jax.tree_util.Partial(_concat_views, predict_fn), voxel, patch, strides, per_case=per_case,
      batch_size=batch_size, mesh=mesh, **_window_options(eval_cfg, len(patch)))
  bounds = np.cumsum(list(channels.values()))[:-1]
  return dict(zip(channels, np.split(np.asarray(stacked), bounds, axis=-1)))


def _maps_as_views(maps_fn: MapsFn, window_inputs: dict) -> dict:
  """`maps_fn(window_inputs)` as one-channel views {name: (B, *patch, 1) float32}, so that the
  sliding window averages them exactly like probabilities."""
  maps = maps_fn(window_inputs)
  if not isinstance(maps, dict) or not maps:
    raise TypeError(f"maps_fn must return a non-empty dict {{name: (B, *patch) map}}, got "
                    f"{type(maps).__name__}")
  windows = tuple(window_inputs["image"].shape)
  for name, m in maps.items():
    if tuple(jnp.shape(m)) != windows[:-1]:
      raise ValueError(f"map {name!r} of maps_fn maps windows {windows} to {tuple(jnp.shape(m))}; "
                       f"expected {windows[:-1]}")
  return {name: jnp.asarray(m, jnp.float32)[..., None] for name, m in maps.items()}


def _maps_views_fn(maps_fn: MapsFn) -> jax.tree_util.Partial:
  """`maps_fn` as a views predict function (`_maps_as_views`); a Partial, so that a maps function
  bound to a state reuses its compilation like `predict_fn` does."""
  return jax.tree_util.Partial(_maps_as_views, _as_partial(maps_fn))


def predict_maps(maps_fn: MapsFn, inputs: Union[CaseInputs, np.ndarray],
                 eval_cfg: ml_collections.ConfigDict, patch: Sequence[int], strides: Sequence[int],
                 mesh: Optional[Mesh] = None,
                 channels: Optional[dict[str, int]] = None) -> dict[str, np.ndarray]:
  """Averaged sliding-window maps of a method, from one pass over the windows (`predict_views`:
  the same windows, weights and mirroring as the probabilities).

  Args:
    maps_fn: window inputs -> {name: (B, *patch) values}, jittable (a method's `maps` bound to its
      state).
    inputs, eval_cfg, patch, strides, mesh: as for `predict_views`.
    channels: {name: 1} in the method's order (`view_channels(_maps_views_fn(maps_fn), spec)`) when
      already known.

  Returns:
    {name: (*spatial,) float32}, in the method's order.
  """
  maps = predict_views(_maps_views_fn(maps_fn), inputs, eval_cfg, patch, strides, channels, mesh)
  return {name: m[..., 0] for name, m in maps.items()}


def _check_view_classes(channels: dict[str, int], num_classes: int) -> None:
  for name, k in channels.items():
    if not (k == num_classes or (k == 1 and num_classes == 2)):
      raise ValueError(f"view {name!r} has {k} channel(s); with num_classes = {num_classes} it must "
                       f"have {num_classes}" + (" or 1" if num_classes == 2 else ""))


def _labels(probs: np.ndarray, threshold: float) -> np.ndarray:
  """(*spatial, K) probabilities -> (*spatial,) int32 labels (`postprocess.probabilities_to_labels`).
  """
  return np.asarray(postprocess.probabilities_to_labels(probs, threshold))


# ---------------------------------------------------------------------------------------------------
# Modality subsets (eval.modalities): the method given only some of the modalities.

SUBSETS = "subsets"  # eval.modalities: every non-empty subset, each as its own views.
SUBSETS_CSV = "modality_subsets.csv"


@dataclasses.dataclass(frozen=True)
class ModalitySubset:
  """Modalities given to the method: `keep[c]` for channel c; `name` joins their names with "+"."""

  name: str
  keep: tuple[bool, ...]


def modality_subsets(setting: str, names: Sequence[str]) -> tuple[ModalitySubset, ...]:
  """The subsets `eval.modalities` = `setting` asks for, for channels named `names`.

  "" -> () (each case's own modalities); "a,b" -> that one subset (names or indices,
  `base.resolve_modalities`); "subsets" -> every non-empty subset, by size, then in channel order
  (2^C - 1 of them).

  Raises:
    DataError: naming eval.modalities for an unknown name or index, a repeated or empty entry.
  """
  if not setting.strip():
    return ()
  count = len(names)

  def subset(indices: Sequence[int]) -> ModalitySubset:
    return ModalitySubset("+".join(names[i] for i in indices),
                          tuple(c in indices for c in range(count)))

  if setting.strip() == SUBSETS:
    return tuple(subset(indices) for size in range(1, count + 1)
                 for indices in itertools.combinations(range(count), size))
  entries = [e.strip() for e in setting.split(",")]
  if not all(entries):
    raise DataError(f"config eval.modalities = {setting!r}: an empty entry; give modality names "
                    f"or indices separated by commas, or {SUBSETS!r}; the channels are "
                    f"{tuple(names)}")
  return (subset(resolve_modalities(entries, names, "eval.modalities")),)


@dataclasses.dataclass(frozen=True)
class _WithheldModalities:
  """`predict_fn` given, per subset, only the subset's modalities (of those each window has): the
  others' channels are set to 0 (what a z-scored channel of no signal reads as; an early-fusion
  network sees a missing modality so) and their `modality_mask` entries to False (what a method
  that reads the mask, as MAML, predicts from). With `rename`, each view v of subset s is returned
  as "v:s"; else the views keep their names (one subset). Frozen, so that jit reuses it."""

  subsets: tuple[ModalitySubset, ...]
  rename: bool

  def __call__(self, predict_fn: ViewsPredictFn, window_inputs: dict) -> dict:
    image, available = window_inputs["image"], window_inputs["modality_mask"]
    expand = (slice(None),) + (None,) * (image.ndim - 2) + (slice(None),)  # (B, C) -> (B, 1.., C)
    out = {}
    for subset in self.subsets:
      given = available & jnp.asarray(subset.keep)[None, :]
      views = predict_fn({**window_inputs, "image": jnp.where(given[expand], image, 0.0),
                          "modality_mask": given})
      out.update({f"{view}:{subset.name}" if self.rename else view: p
                  for view, p in views.items()})
    return out


def with_modalities(predict_fn: ViewsPredictFn, setting: str, names: Sequence[str]
                    ) -> ViewsPredictFn:
  """`predict_fn` restricted to the modalities `eval.modalities` = `setting` names
  (`modality_subsets`; `predict_fn` itself when "").

  A case that lacks some of a subset's modalities (`Case.present`) is predicted from the subset's
  modalities it has; one that has none of them gets an all-withheld input (MAML: its joint head on
  zeros), so the subset's row scores what the method does with nothing.
  """
  return _withheld(predict_fn, modality_subsets(setting, names), rename=setting.strip() == SUBSETS)


def _withheld(predict_fn: ViewsPredictFn, subsets: tuple[ModalitySubset, ...], rename: bool
              ) -> ViewsPredictFn:
  """`predict_fn` given only each of `subsets`' modalities (`_WithheldModalities`); itself when
  there is no subset."""
  if not subsets:
    return predict_fn
  return jax.tree_util.Partial(_WithheldModalities(subsets, rename), _as_partial(predict_fn))


def subset_table(summary: dict) -> list[dict]:
  """Rows of the subset x class / region Dice table of an evaluation with eval.modalities =
  "subsets": per method view and subset, {"view", "modalities", "num_modalities", "<key>": Dice
  mean (raw predictions) for each class, the class mean and each region}. [] otherwise."""
  subsets = summary.get("modality_subsets")
  if not subsets:
    return []
  rows = []
  for view, posts in summary["views"].items():
    base_view, _, name = view.rpartition(":")
    if name not in subsets:
      continue
    row = {"view": base_view, "modalities": name, "num_modalities": len(name.split("+"))}
    row.update({key: stats.get("dice_mean") for key, stats in posts[RAW].items()})
    rows.append(row)
  return rows


def subset_table_lines(summary: dict) -> list[str]:
  """`subset_table` as aligned text lines, Dice in %: one line per subset, one column per key."""
  rows = subset_table(summary)
  if not rows:
    return []
  keys = [k for k in rows[0] if k not in ("view", "modalities", "num_modalities")]
  width = max(len(r["modalities"]) for r in rows) + 2
  lines = [f"{'view':<8}{'modalities':<{width}}" + "".join(f"{k:>8}" for k in keys)]
  for r in rows:
    lines.append(f"{r['view']:<8}{r['modalities']:<{width}}" + "".join(
        f"{'n/a':>8}" if r[k] is None else f"{100 * r[k]:8.2f}" for k in keys))
  return lines


# ---------------------------------------------------------------------------------------------------
# evaluate.


def evaluate(predict_fn: ViewsPredictFn, cases: Iterable[Case], eval_cfg: ml_collections.ConfigDict,
             num_classes: int, out_dir: Optional[PathLike] = None, *, patch_size: Sequence[int],
             split_name: str = "validation", mesh: Optional[Mesh] = None,
             maps_fn: Optional[MapsFn] = None,
             split_record: Optional[Mapping[str, Any]] = None) -> dict:
  """Scores every view of a method on labeled cases; writes the reports when `out_dir` is given.

  Several devices: each batch of windows is spread over `mesh` (the devices of this process).
  Several processes: every process scores every P-th case (its state must live on its own devices,
  `parallel.local_replica`), the rows are gathered, and process 0 writes the reports (each process
  writes the predictions of its cases, so `out_dir` should be on a shared file system). Every
  process returns the same summary.

  Args:
    predict_fn: window inputs {"image": (B, *patch, C), "modality_mask": (B, C), **fields} ->
      {view: probabilities (B, *patch, K)}, e.g. `jax.tree_util.Partial(method.predict, state)`;
      jittable.
    cases: labeled cases with preprocessed images (*spatial, C), all 2D or all 3D.
    eval_cfg: the `config.eval` block (`config_blocks.eval_block()`).
    num_classes: classes including background; classes 1..num_classes-1 are scored.
    out_dir: folder for metrics.csv, summary.json, figure.png and predictions/; None writes nothing.
    patch_size: config.data.patch_size, used when eval.patch_size is empty.
    split_name: named in the summary (e.g. "validation", "test").
    mesh: devices over which each batch of windows is spread; None: one device.
    maps_fn: window inputs -> {name: (B, *patch) values in [0, 1]}, e.g.
      `jax.tree_util.Partial(method.maps, state)`: slid (`predict_maps`) for the figure cases only,
      when figure.png is written, and shown there as heat panels; never scored nor saved. None (a
      method without maps): the figure has no map panels.
    split_record: how the cases were chosen (`Split.rule_dict()`, e.g. {"validation_rule":
      "random", "validation_seed": 0}), recorded as the summary's "validation_split".

  Returns:
    The summary (the content of summary.json):
    {"split", "num_cases", "num_classes", "classes", "view_names", "postprocesses", "empty_policy",
     "threshold", "units", ("regions": {name: [classes]} when eval.regions is set,
     "mirror_axes" when eval.mirror_axes is set),
     "views": {view: {postprocess: {key: stats}}},
     "views_mean": {postprocess: {key: means}}   (only with >= 2 views),
     "raw_lcc": the same scores with raw and LCC side by side (`raw_lcc_rows`),
     ("validation_split": `split_record`, when given)}
    where the keys are the classes ("1", ...), then "mean" (num_classes > 2: {"<metric>_mean": the
    mean of the class means over the classes 1..K-1}, and for 2D the pooled scores' means), then
    the regions' names; stats = {"num_cases", "num_empty_predictions", "num_empty_gt_excluded",
    "<metric>_mean", "<metric>_std" for each of METRIC_NAMES, and for 2D "f1_pooled",
    "mae_pooled"}. Undefined values (no scored case) are None.

  Raises:
    ValueError: no cases, a view whose channel count does not fit num_classes, views that differ
      between cases, or a case whose dimensionality does not match the patch.
    DataError: a case without a label (naming its source); bad eval.regions or eval.mirror_axes.
  """
  cases = list(cases)
  if not cases:
    raise ValueError("evaluate: no cases")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  patch, strides = window_geometry(eval_cfg, patch_size)
  mirror_axes = check_mirror_axes(eval_cfg, len(patch))
  regions = check_regions(eval_cfg, num_classes)
  modalities = eval_cfg.get("modalities", "").strip()
  subsets = modality_subsets(modalities, cases[0].modality_names)
  predict_fn = _as_partial(_withheld(predict_fn, subsets, rename=modalities == SUBSETS))
  batchnorm = eval_batchnorm.check_mode(eval_cfg)
  classes = tuple(range(1, num_classes))
  postprocesses = postprocess.postprocesses(num_classes, bool(eval_cfg.lcc))
  is_2d = len(patch) == 2
  out = pathlib.Path(out_dir) if out_dir is not None else None
  save_predictions = out is not None and eval_cfg.save_predictions

  # Checked for all cases on every process before any work, so that all processes fail alike.
  batch_size = window_batch_size(eval_cfg, mesh)
  channels_by_spec: dict[tuple, dict[str, int]] = {}
  view_names: Optional[tuple[str, ...]] = None
  for case in cases:
    _check_eval_case(case, len(patch))
    key = _spec_key(window_spec(case_inputs(case), batch_size, patch))
    if key not in channels_by_spec:
      channels = view_channels(predict_fn, window_spec(case_inputs(case), batch_size, patch))
      _check_view_classes(channels, num_classes)
      if not channels_by_spec:
        eval_batchnorm.check_runs_batchnorm(
            predict_fn, window_spec(case_inputs(case), batch_size, patch), batchnorm)
      channels_by_spec[key] = channels
    channels = channels_by_spec[key]
    if view_names is None:
      view_names = tuple(channels)
    elif tuple(channels) != view_names:
      raise ValueError(f"case {case.case_id!r}: views {tuple(channels)} differ from {view_names}")
  if save_predictions:
    (out / PREDICTIONS_DIR).mkdir(parents=True, exist_ok=True)
  predict_fn = eval_batchnorm.with_batchnorm(predict_fn, batchnorm)
  if maps_fn is not None:
    maps_fn = eval_batchnorm.with_batchnorm(maps_fn, batchnorm)

  primary = parallel.is_primary()
  start = time.perf_counter()
  window_seconds = 0.0
  rows: list[dict] = []
  pooled: dict[tuple[str, str, Union[int, str]], np.ndarray] = {}
  figure_cases: list[writers.FigureCase] = []
  # Only process 0 writes the figure, so only it spends windows on maps.
  maps_fn = _as_partial(maps_fn) if maps_fn is not None and primary else None
  map_channels_by_spec: dict[tuple, dict[str, int]] = {}
  for case in cases[jax.process_index()::jax.process_count()]:
    inputs = case_inputs(case)
    channels = channels_by_spec[_spec_key(window_spec(inputs, batch_size, patch))]
    window_start = time.perf_counter()
    probs = predict_views(predict_fn, inputs, eval_cfg, patch, strides, channels, mesh)
    window_seconds += time.perf_counter() - window_start  # predict_views returns host arrays.
    labels = {view: _labels(p, eval_cfg.threshold) for view, p in probs.items()}
    first_row = len(rows)
    for view, view_labels in labels.items():
      for post in postprocesses:
        pred = postprocess.postprocess_labels(view_labels, post)
        for key, scores in _case_scores(pred, case, classes, regions, eval_cfg.empty_policy):
          rows.append({"case": case.case_id, "view": view, "postprocess": post, "class": key,
                       **scores})
        if is_2d:
          for key, pred_mask, gt_mask in _masks(pred, case.label, classes, regions):
            counts = pooled.setdefault((view, post, key), np.zeros(5, np.int64))
            counts += _pixel_counts(pred_mask, gt_mask)
      if save_predictions:
        writers.save_case_prediction(out / PREDICTIONS_DIR / f"{case.case_id}_{view}",
                                     view_labels, case, num_classes)
    if out is not None and len(figure_cases) < eval_cfg.num_figure_cases:
      dice = {view: {r["class"]: r["dice"] for r in rows[first_row:]
                     if r["view"] == view and r["postprocess"] == RAW and r["class"] in classes}
              for view in labels}
      maps = None
      if maps_fn is not None:
        spec = window_spec(inputs, batch_size, patch)
        if _spec_key(spec) not in map_channels_by_spec:
          map_channels_by_spec[_spec_key(spec)] = view_channels(_maps_views_fn(maps_fn), spec)
        maps = predict_maps(maps_fn, inputs, eval_cfg, patch, strides, mesh,
                            map_channels_by_spec[_spec_key(spec)])
      figure_cases.append(writers.figure_case(case, labels, dice, maps))

  if jax.process_count() > 1:
    rows, pooled = _gather_scores(rows, pooled, [case.case_id for case in cases])
  keys = (*classes, *(name for name, _ in regions))
  summary = _summarize(rows, pooled, view_names, postprocesses, keys, classes, is_2d)
  extra: dict[str, Any] = {}
  if regions:
    extra["regions"] = {name: list(group) for name, group in regions}
  if mirror_axes:
    extra["mirror_axes"] = list(mirror_axes)
  if modalities:
    extra["modalities"] = modalities
  if batchnorm != eval_batchnorm.RUNNING:
    extra["batchnorm"] = batchnorm
  if modalities == SUBSETS:
    extra["modality_subsets"] = [s.name for s in subsets]
  if split_record:
    extra["validation_split"] = dict(split_record)
  if eval_cfg.get("intensity_rescale", "none") != "none":
    extra["intensity_rescale"] = eval_cfg.intensity_rescale
  summary = {
      "split": split_name,
      "num_cases": len(cases),
      "num_classes": num_classes,
      "classes": list(classes),
      "view_names": list(view_names),
      "postprocesses": list(postprocesses),
      "empty_policy": eval_cfg.empty_policy,
      "threshold": float(eval_cfg.threshold),
      **extra,
      # Wall-clock seconds of this process (process 0 with several): the sliding windows (with
      # their compilations) and the whole evaluation before the reports are written.
      "seconds": {"sliding_window": window_seconds, "total": time.perf_counter() - start},
      "units": {
          "dice": "fraction in [0, 1]", "jaccard": "fraction in [0, 1]",
          "mae": "fraction of wrong voxels in [0, 1]",
          # hd95, asd, assd, hd:
          "distances": "units of the case spacing: mm for NIfTI sources, voxels (pixels) for LA "
                       "h5 and 2D images (spacing 1)",
      },
      **summary,
  }
  summary["raw_lcc"] = raw_lcc_rows(summary)
  summary = writers.json_safe(summary)
  if out is not None and primary:
    out.mkdir(parents=True, exist_ok=True)
    writers.write_metrics_csv(out / "metrics.csv", rows)
    writers.write_summary(out / "summary.json", summary)
    table = subset_table(summary)
    if table:
      writers.write_table_csv(out / SUBSETS_CSV, table)
    if figure_cases:
      where = "the slice with the most ground-truth foreground; " if len(patch) == 3 else ""
      means = " and map means" if any(c.maps for c in figure_cases) else ""
      writers.write_figure(out / "figure.png", figure_cases, num_classes,
                           header=f"{split_name}: {len(figure_cases)} of {len(cases)} cases; "
                                  f"{where}Dice{means} of the whole case")
  return summary


def _masks(pred: np.ndarray, gt: np.ndarray, classes: Sequence[int],
           regions: Sequence[tuple[str, tuple[int, ...]]]):
  """(key, prediction mask, ground-truth mask) of each class (== c) and region (isin group)."""
  for c in classes:
    yield c, pred == c, gt == c
  for name, group in regions:
    yield name, np.isin(pred, group), np.isin(gt, group)


def _case_scores(pred: np.ndarray, case: Case, classes: Sequence[int],
                 regions: Sequence[tuple[str, tuple[int, ...]]], empty: str):
  """(key, metrics) of each class, then each region, of one case's labels (`metrics.case_metrics`).
  """
  scores = metrics.case_metrics(pred, case.label, spacing=case.spacing, classes=classes,
                                empty=empty)
  yield from scores.items()
  for name, group in regions:
    region_pred = np.isin(pred, group).astype(np.uint8)
    region_gt = np.isin(case.label, group).astype(np.uint8)
    yield name, metrics.case_metrics(region_pred, region_gt, spacing=case.spacing, classes=(1,),
                                     empty=empty)[1]


def _gather_scores(rows: list[dict], pooled: dict, case_order: Sequence[str]
                   ) -> tuple[list[dict], dict]:
  """Every process's rows (in case order) and pooled pixel counts (summed), on every process."""
  mine = {"rows": rows, "pooled": [[*key, counts.tolist()] for key, counts in pooled.items()]}
  everyone = parallel.allgather_json(mine)
  position = {case_id: i for i, case_id in enumerate(case_order)}
  all_rows = sorted((row for part in everyone for row in part["rows"]),
                    key=lambda row: position[row["case"]])  # Stable: a case's rows keep their order.
  all_pooled: dict[tuple[str, str, Union[int, str]], np.ndarray] = {}
  for part in everyone:
    for view, post, key, counts in part["pooled"]:
      total = all_pooled.setdefault((view, post, key), np.zeros(5, np.int64))
      total += np.asarray(counts, np.int64)
  return all_rows, all_pooled


def _check_eval_case(case: Case, ndim: int) -> None:
  if case.label is None:
    raise DataError(f"{case.source} (case {case.case_id!r}): evaluation needs a label")
  if case.ndim != ndim:
    raise ValueError(f"{case.source} (case {case.case_id!r}): image {case.image.shape} is "
                     f"{case.ndim}D but the patch is {ndim}D")


def _pixel_counts(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """[|pred & gt|, |pred|, |gt|, |pred != gt|, number of pixels] of two bool masks, int64."""
  return np.array([np.count_nonzero(pred & gt), np.count_nonzero(pred), np.count_nonzero(gt),
                   np.count_nonzero(pred != gt), pred.size], np.int64)


def _summarize(rows: list[dict], pooled: dict, view_names: Sequence[str],
               postprocesses: Sequence[str], keys: Sequence[Union[int, str]],
               classes: Sequence[int], is_2d: bool) -> dict:
  """The "views" and "views_mean" entries of the summary (see `evaluate`); `keys` are the classes
  then the region names."""
  views: dict[str, dict] = {}
  for view in view_names:
    views[view] = {}
    for post in postprocesses:
      entries: dict[str, dict] = {}
      for key in keys:
        group = [r for r in rows if r["view"] == view and r["postprocess"] == post
                 and r["class"] == key]
        scored = [r for r in group if not r["gt_empty"]]
        stats: dict[str, Any] = {
            "num_cases": len(scored),
            "num_empty_predictions": sum(bool(r["pred_empty"]) for r in scored),
            "num_empty_gt_excluded": len(group) - len(scored),
        }
        for name in METRIC_NAMES:
          values = np.array([r[name] for r in scored], np.float64)
          stats[f"{name}_mean"] = float(values.mean()) if values.size else math.nan
          stats[f"{name}_std"] = float(values.std()) if values.size else math.nan
        if is_2d:
          intersection, pred_size, gt_size, wrong, total = pooled[(view, post, key)]
          denominator = pred_size + gt_size
          stats["f1_pooled"] = 2.0 * intersection / denominator if denominator else math.nan
          stats["mae_pooled"] = wrong / total
        entries[str(key)] = stats
      if len(classes) > 1:
        # Over the classes only (regions overlap them); NaN when a class has no scored case.
        means = [f"{name}_mean" for name in METRIC_NAMES] + (list(POOLED_NAMES) if is_2d else [])
        mean = {k: float(np.mean([entries[str(c)][k] for c in classes])) for k in means}
        entries = {**{str(c): entries[str(c)] for c in classes}, MEAN: mean,
                   **{k: v for k, v in entries.items() if k not in {str(c) for c in classes}}}
      views[view][post] = entries
  result: dict[str, Any] = {"views": views}
  if len(view_names) >= 2:
    means = [f"{name}_mean" for name in METRIC_NAMES] + (list(POOLED_NAMES) if is_2d else [])
    first = views[view_names[0]]
    result["views_mean"] = {
        post: {key: {k: float(np.mean([views[v][post][key][k] for v in view_names])) for k in means}
               for key in first[post]}
        for post in postprocesses}
  return result


HEADLINE_METRICS = ("dice", "jaccard", "hd95", "asd")


def headline(summary: dict) -> dict[str, float]:
  """The scalars to log from a summary: "<view>/<metric>" for each view and "views_mean".

  Per view (the method's order, then "views_mean" when there are >= 2 views), on raw predictions:
  dice, jaccard, hd95, asd (the class means averaged over the foreground classes), for 2D also
  f1_pooled and mae_pooled; and lcc_dice when LCC rows exist. Multi-class tasks add each class's
  Dice, "<view>/class<c>/dice"; regions add "<view>/<region>/<metric>" for the same metrics.
  Undefined values are NaN.
  """
  entries = [(view, summary["views"][view]) for view in summary["view_names"]]
  if "views_mean" in summary:
    entries.append(("views_mean", summary["views_mean"]))
  class_keys = [str(c) for c in summary["classes"]]
  region_names = list(summary.get("regions", {}))
  names = [f"{m}_mean" for m in HEADLINE_METRICS]
  if any("f1_pooled" in entries[0][1][RAW][c] for c in class_keys):
    names += list(POOLED_NAMES)

  def value(stats: dict, key: str) -> float:
    v = stats.get(key)
    return math.nan if v is None else float(v)

  def class_average(by_key: dict, key: str) -> float:
    return float(np.mean([value(by_key[c], key) for c in class_keys]))

  scores = {}
  for view, posts in entries:
    for key in names:
      scores[f"{view}/{key.removesuffix('_mean')}"] = class_average(posts[RAW], key)
    if LCC in posts:
      scores[f"{view}/lcc_dice"] = class_average(posts[LCC], "dice_mean")
    if len(class_keys) > 1:
      for c in class_keys:
        scores[f"{view}/class{c}/dice"] = value(posts[RAW][c], "dice_mean")
    for region in region_names:
      for key in names:
        scores[f"{view}/{region}/{key.removesuffix('_mean')}"] = value(posts[RAW][region], key)
  return scores


TABLE_METRICS = ("dice", "jaccard", "hd95", "asd")  # The columns of `raw_lcc_rows`, in order.


def raw_lcc_rows(summary: dict) -> list[dict]:
  """The summary's scores with raw and LCC side by side: one row per view and class (region, and
  the class mean of multi-class tasks), each {"view", "class", "num_cases",
  "num_empty_predictions", and "<metric>_<raw|lcc>_<mean|std>" for each of TABLE_METRICS} (the
  "lcc" entries only when LCC rows exist; std None for the class mean, which has none). Read from
  the "views" entry of `summary` (the summary's "raw_lcc")."""
  rows = []
  for view, posts in summary["views"].items():
    for key, raw in posts[RAW].items():
      row: dict[str, Any] = {"view": view, "class": key, "num_cases": raw.get("num_cases"),
                             "num_empty_predictions": raw.get("num_empty_predictions")}
      for name in TABLE_METRICS:
        for post in (p for p in (RAW, LCC) if p in posts):
          stats = posts[post][key]
          row[f"{name}_{post}_mean"] = stats.get(f"{name}_mean")
          row[f"{name}_{post}_std"] = stats.get(f"{name}_std")
      rows.append(row)
  return rows


def raw_lcc_table_lines(summary: dict) -> list[str]:
  """The printed table of `raw_lcc_rows`: a header naming the split, its rule and the units, then
  one line per view and class with n, the empty predictions and mean ± std (population) of Dice,
  Jaccard (in %), 95HD and ASD, raw and LCC side by side."""
  rows = summary.get("raw_lcc") or raw_lcc_rows(summary)
  if not rows:
    return []
  posts = [p for p in (RAW, LCC) if f"dice_{p}_mean" in rows[0]]
  rule = summary.get("validation_split")
  how = ""
  if rule:
    how = f" (validation: {rule['validation_rule']}"
    how += (f", seed {rule['validation_seed']}" if "validation_seed" in rule
            else f", {rule['validation_file']}" if "validation_file" in rule else "")
    how += ")"
  lines = [f"{summary['split']}{how}: {summary['num_cases']} cases; mean ± std over the n scored "
           f"cases; Dice, Jaccard in %; 95HD, ASD in {summary['units']['distances'].split(':')[0]}"]

  def cell(row: dict, name: str, post: str) -> str:
    mean, std = row.get(f"{name}_{post}_mean"), row.get(f"{name}_{post}_std")
    scale = 100.0 if name in ("dice", "jaccard") else 1.0
    if mean is None:
      return "n/a"
    return f"{scale * mean:.2f}" + ("" if std is None else f" ± {scale * std:.2f}")

  header = ["view", "class", "n", "empty"] + [f"{TABLE_LABELS[m]} {p}" for m in TABLE_METRICS
                                              for p in posts]
  table = [header] + [
      [str(r["view"]), str(r["class"]), "" if r["num_cases"] is None else str(r["num_cases"]),
       "" if r["num_empty_predictions"] is None else str(r["num_empty_predictions"])]
      + [cell(r, m, p) for m in TABLE_METRICS for p in posts] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(header))]
  lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
  return lines


TABLE_LABELS = {"dice": "Dice", "jaccard": "Jaccard", "hd95": "95HD", "asd": "ASD"}


def summary_lines(summary: dict) -> list[str]:
  """Human-readable lines of a summary: Dice / Jaccard in %, distances in the spacing's units."""

  def fmt(stats: dict, name: str, scale: float = 1.0) -> str:
    mean, std = stats.get(f"{name}_mean"), stats.get(f"{name}_std")
    if mean is None:
      return "n/a"
    return f"{scale * mean:.2f}" + ("" if std is None else f" ± {scale * std:.2f}")

  lines = [f"{summary['split']}: {summary['num_cases']} cases, empty policy "
           f"{summary['empty_policy']!r}; Dice, Jaccard in %; 95HD, ASD in "
           f"{summary['units']['distances']}"]
  regions = summary.get("regions", {})
  entries = [(view, posts) for view, posts in summary["views"].items()]
  if "views_mean" in summary:
    entries.append(("views_mean", summary["views_mean"]))
  for view, posts in entries:
    for post, by_key in posts.items():
      for c, stats in by_key.items():
        what = (f"region {c} {regions[c]}" if c in regions
                else "class mean" if c == MEAN else f"class {c}")
        line = (f"  {view} {post} {what}: Dice {fmt(stats, 'dice', 100)} %, Jaccard "
                f"{fmt(stats, 'jaccard', 100)} %, 95HD {fmt(stats, 'hd95')}, ASD {fmt(stats, 'asd')}")
        if "num_cases" in stats:
          line += (f" (n = {stats['num_cases']}, {stats['num_empty_predictions']} empty "
                   f"predictions, {stats['num_empty_gt_excluded']} empty-gt cases excluded)")
        if stats.get("f1_pooled") is not None:
          line += (f"; pooled F1 {100 * stats['f1_pooled']:.2f} %, "
                   f"MAE {100 * stats['mae_pooled']:.2f} %")
        lines.append(line)
  return lines


# ---------------------------------------------------------------------------------------------------
# predict_files (--mode predict).


def predict_files(predict_fn: ViewsPredictFn, input_path: PathLike, output_dir: PathLike,
                  eval_cfg: ml_collections.ConfigDict, *, patch_size: Sequence[int],
                  data_cfg: ml_collections.ConfigDict, view: Optional[str] = None,
                  num_channels: Optional[int] = None,
                  log: Optional[Callable[[str], None]] = print) -> list[pathlib.Path]:
  """Segments files with one view of a method (or their mean) and writes one label file per input.

  Inputs are read like the training data (`jaxseg.data.readers.read_input`, `data_cfg`): NIfTI (3D,
  or 4D multi-modal channels-last), LA-style h5 (`image` dataset) or 2D images (folders2d's reader,
  `data.channels`, `data.image_size`), reduced to the channels of `data.modalities` (indices, or
  the names "channel0", ...: files are unnamed), then clipped / z-scored per
  `data.clip_percentiles` / `data.zscore`. The predict function gets the same inputs as in
  evaluation (no fields; a constant channel of a multi-channel file is a missing modality, with
  a warning naming the file).

  Outputs, in `output_dir` (`jaxseg.writers.write_input_prediction`): NIfTI inputs ->
  <case>.nii.gz (uint8, the input's affine and zooms); h5 -> <case>.nii.gz (identity affine: LA
  works in voxels; the case is the LA folder name for mri_norm2.h5); 2D -> <stem>.png at the file's
  original size (0 / 255 for binary, else class indices; a resized image's labels are resized back
  by nearest neighbour).

  Args:
    predict_fn: window inputs -> {view: probabilities}; jittable.
    input_path: a supported file, or a folder (see `readers.find_input_files`).
    output_dir: created if needed.
    eval_cfg: the `config.eval` block (window, batch size, threshold, gaussian, mirror_axes, view).
    patch_size: config.data.patch_size, used when eval.patch_size is empty.
    data_cfg: the training config's `data` block.
    view: the view to use (`choose_view`): a name, "mean" or "" (the first); None: eval.view.
    num_channels: the channels the model was trained on (after `data.modalities`); None: any
      count the model accepts (checked by tracing it on the file's channel count).
    log: called once with the line saying which view is used (e.g. "predicting with view f1 of
      the method's views f1, f2 (choose with --config.eval.view: a view, mean)"); None: silent.

  Returns:
    The written files, in input order.

  Raises:
    DataError: naming the path or file: a missing input, no supported files, an unreadable file,
      an image whose dimensionality or channel count the model does not take, fewer channels
      than `data.modalities` selects, two inputs that would write the same output, an output that
      would overwrite its input; or naming the config key (eval.view, eval.mirror_axes).
  """
  patch, strides = window_geometry(eval_cfg, patch_size)
  options = _window_options(eval_cfg, len(patch))
  batchnorm = eval_batchnorm.check_mode(eval_cfg)
  files = readers.find_input_files(input_path)
  predict_fn = _as_partial(predict_fn)
  out = pathlib.Path(output_dir)
  targets = [out / readers.output_name(p) for p in files]
  for i, target in enumerate(targets):
    if target in targets[:i]:
      raise DataError(f"{files[i]}: its output {target} would overwrite the prediction of "
                      f"{files[targets.index(target)]}")
    if target.exists() and target.resolve() == files[i].resolve():
      raise DataError(f"{files[i]}: the output would overwrite the input; choose another --output")
  out.mkdir(parents=True, exist_ok=True)

  setting = str(eval_cfg.get("view", "") if view is None else view)
  channels_by_spec: dict[tuple, dict[str, int]] = {}
  written, logged = [], False
  for path, target in zip(files, targets):
    source = readers.read_input(path, data_cfg, log=log or (lambda line: None))
    case = source.case
    if case.ndim != len(patch):
      raise DataError(f"{path}: image {case.spatial_shape} is {case.ndim}D but the model's "
                      f"patch {patch} is {len(patch)}D")
    c = case.num_modalities
    if num_channels is not None and c != num_channels:
      kept = (f" after data.modalities = {tuple(data_cfg.modalities)}"
              if data_cfg.get("modalities", ()) else "")
      raise DataError(f"{path}: image has {c} channel(s){kept}, the model takes {num_channels}")
    inputs = case_inputs(case)
    spec = window_spec(inputs, int(eval_cfg.batch_size), patch)
    key = _spec_key(spec)
    if key not in channels_by_spec:
      channels_by_spec[key] = _probe_input_channels(predict_fn, spec, c, path)
      eval_batchnorm.check_runs_batchnorm(predict_fn, spec, batchnorm)
    name, k = choose_view(setting, channels_by_spec[key])
    if not logged and log is not None:
      names = list(channels_by_spec[key])
      what = ("the mean of the views " + ", ".join(names) if name == MEAN_VIEW and name not in names
              else f"view {name} of the method's views {', '.join(names)}")
      choice = " (choose with --config.eval.view: a view or mean)" if len(names) > 1 else ""
      log(f"predicting with {what}{choice}")
      logged = True
    select = (_MeanViews() if name == MEAN_VIEW and name not in channels_by_spec[key]
              else _SelectView(name))
    voxel, per_case = inputs
    probs = inference.sliding_window_predict(
        jax.tree_util.Partial(select, eval_batchnorm.with_batchnorm(predict_fn, batchnorm)),
        voxel, patch, strides,
        per_case=per_case, batch_size=eval_cfg.batch_size, **options)
    labels = _labels(np.asarray(probs), eval_cfg.threshold)
    writers.write_input_prediction(target, labels, source, max(2, k))
    written.append(target)
  return written


def _probe_input_channels(predict_fn: ViewsPredictFn, spec: Mapping[str, jax.ShapeDtypeStruct],
                          num_channels: int, path: pathlib.Path) -> dict[str, int]:
  """`view_channels` for C-channel windows; a model that cannot take C channels -> DataError."""
  try:
    return view_channels(predict_fn, spec)
  except Exception as err:  # Flax and lax raise their own error types for mismatched shapes.
    raise DataError(f"{path}: the model does not take {num_channels}-channel input: "
                    f"{type(err).__name__}: {err}") from err
