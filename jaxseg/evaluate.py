"""Evaluation of a method on labeled cases, and prediction of new files (METHODS.md §1.6–1.9, §9.6).

`evaluate` runs the sliding window (`jaxseg.inference`) once per case for all of a method's views,
turns probabilities into labels with the references' rule, scores every view with the medpy-equal
metrics (`jaxseg.metrics`), raw and after largest-connected-component post-processing, and writes

    out_dir/
      metrics.csv       one row per case x view x postprocess x class
      summary.json      per view and postprocess: per-class mean / std over the scored cases
      figure.png        ground-truth (green) and prediction (red) contours on a few cases
      predictions/      <case>_<view>.nii.gz (3D, uint8) or <case>_<view>.png (2D)

`predict_files` is `--mode predict`: it segments NIfTI, LA-style h5 or 2D image files with one view
and writes one label file per input.

Conventions (decisions, see also METHODS.md §1.8–1.9):

* A view's probabilities (*spatial, 1) are thresholded (`> threshold`, strict); (*spatial, K) are
  argmax'ed (`inference.probabilities_to_labels`).
* Scored classes are 1..num_classes-1 (background is never scored).
* Means and standard deviations (population, ddof = 0) are over the cases whose ground truth holds
  the class; cases without it are counted (`num_empty_gt_excluded`) and left out. Empty predictions
  are scored by the empty policy (`metrics.py`) and counted (`num_empty_predictions`).
* LCC rows exist for binary tasks only (num_classes == 2), where LCC means "keep the largest
  foreground component" (DTC `getLargestCC`). An empty prediction is kept as it is (the reference
  asserts there): its LCC row equals its raw row, so raw and LCC means cover the same cases.
* 2D tasks also get Duo-SegNet's pooled scores (§9.6): `f1_pooled` = Dice of all test pixels
  pooled, `mae_pooled` = fraction of wrong pixels, over every case (empty ground truths included).
* Dice, Jaccard and MAE are fractions in [0, 1] (reports multiply by 100); distances are in the
  units of the case spacing: mm for NIfTI sources, voxels for LA h5 and 2D images (spacing 1).
* Saved predictions are the raw labels (no LCC).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import h5py
import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from jax.sharding import Mesh
from scipy import ndimage

from jaxseg import geometry, inference, metrics, parallel
from jaxseg.data import folders2d, la, msd, preprocess
from jaxseg.data.base import Case, DataError, check_case

__all__ = [
    "CSV_COLUMNS",
    "METRIC_NAMES",
    "evaluate",
    "find_input_files",
    "headline",
    "predict_files",
    "predict_views",
    "summary_lines",
    "view_channels",
    "window_batch_size",
    "window_geometry",
]

PathLike = Union[str, os.PathLike]
# windows (B, *patch, C) -> {view: probabilities (B, *patch, K)}; a `jax.tree_util.Partial` binding
# the state avoids a recompilation per checkpoint (see `inference.sliding_window_predict`).
ViewsPredictFn = Callable[[jax.Array], dict]

RAW, LCC = "raw", "lcc"
METRIC_NAMES = ("dice", "jaccard", "hd95", "asd", "assd", "hd", "mae")
CSV_COLUMNS = ("case", "view", "postprocess", "class", *METRIC_NAMES, "pred_empty", "gt_empty")
POOLED_NAMES = ("f1_pooled", "mae_pooled")
PREDICTIONS_DIR = "predictions"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
H5_SUFFIXES = (".h5",)

# Figure layout: tiles are upscaled by an integer factor (nearest) until their longer side is at
# least this many pixels, so that tiny volumes stay readable; the caption band sits above each tile.
FIGURE_MIN_SIDE = 128
FIGURE_CAPTION_HEIGHT = 16
_GT_COLOUR = (0, 255, 0)
_PRED_COLOUR = (255, 0, 0)


# ---------------------------------------------------------------------------------------------------
# Windows and views.


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


def _as_partial(fn: Callable) -> jax.tree_util.Partial:
  # A plain function bound inside another Partial would be a (non-array) pytree leaf; wrapped in
  # its own Partial it becomes static tree structure instead.
  return fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)


def view_channels(predict_fn: ViewsPredictFn, window_shape: Sequence[int],
                  dtype: Any = jnp.float32) -> dict[str, int]:
  """The views of `predict_fn` and their channel counts K, in the order the method returns them.

  Only shapes are traced (`jax.eval_shape`); nothing is computed.

  Args:
    predict_fn: windows (B, *patch, C) -> {view: (B, *patch, K)}.
    window_shape: (B, *patch, C).
    dtype: dtype of the windows.

  Returns:
    {view: K} in the method's order (Python dicts keep insertion order; JAX's own flattening sorts
    keys, so the order is read while tracing).
  """
  order: list[str] = []

  def probe(windows):
    views = predict_fn(windows)
    if not isinstance(views, dict) or not views:
      raise TypeError(f"predict_fn must return a non-empty dict {{view: probabilities}}, got "
                      f"{type(views).__name__}")
    order.extend(views)
    return views

  shapes = jax.eval_shape(probe, jax.ShapeDtypeStruct(tuple(window_shape), dtype))
  expected = tuple(window_shape[:-1])
  for name in order:
    if shapes[name].shape[:-1] != expected:
      raise ValueError(f"view {name!r} of predict_fn maps windows {tuple(window_shape)} to "
                       f"{shapes[name].shape}; expected {expected} + (K,)")
  return {name: int(shapes[name].shape[-1]) for name in order}


def _concat_views(predict_fn: ViewsPredictFn, windows: jax.Array) -> jax.Array:
  """All views of `predict_fn` side by side on the channel axis, in the method's order."""
  return jnp.concatenate([jnp.asarray(p, jnp.float32) for p in predict_fn(windows).values()],
                         axis=-1)


@dataclasses.dataclass(frozen=True)
class _SelectView:
  """`predict_fn(windows)[name]`; frozen (hashable by value) so jit reuses its compilation."""

  name: str

  def __call__(self, predict_fn: ViewsPredictFn, windows: jax.Array) -> jax.Array:
    return predict_fn(windows)[self.name]


def window_batch_size(eval_cfg: ml_collections.ConfigDict, mesh: Optional[Mesh] = None) -> int:
  """Windows per network call: `eval.batch_size`, rounded up to a multiple of the mesh's devices."""
  n = mesh.size if mesh is not None else 1
  return -(-int(eval_cfg.batch_size) // n) * n


def predict_views(predict_fn: ViewsPredictFn, image: np.ndarray, eval_cfg: ml_collections.ConfigDict,
                  patch: Sequence[int], strides: Sequence[int],
                  channels: Optional[dict[str, int]] = None,
                  mesh: Optional[Mesh] = None) -> dict[str, np.ndarray]:
  """Averaged sliding-window probabilities of every view, from one pass over the windows.

  Args:
    predict_fn: windows (B, *patch, C) -> {view: (B, *patch, K_view)}, jittable.
    image: (*spatial, C) float32.
    eval_cfg: the `config.eval` block (batch_size, gaussian).
    patch: window size per spatial axis.
    strides: window step per spatial axis.
    channels: `view_channels(...)` when already known.
    mesh: spread each batch of windows over these devices (`predict_fn`'s arrays replicated on
      them); None: one device.

  Returns:
    {view: (*spatial, K_view) float32 probabilities}, in the method's view order.
  """
  predict_fn = _as_partial(predict_fn)
  batch_size = window_batch_size(eval_cfg, mesh)
  if channels is None:
    channels = view_channels(predict_fn, (batch_size, *patch, image.shape[-1]))
  stacked = inference.sliding_window_predict(
      jax.tree_util.Partial(_concat_views, predict_fn), image, patch, strides,
      batch_size=batch_size, gaussian=eval_cfg.gaussian, mesh=mesh,
      shape_bucket=eval_cfg.shape_bucket)
  bounds = np.cumsum(list(channels.values()))[:-1]
  return dict(zip(channels, np.split(np.asarray(stacked), bounds, axis=-1)))


def _check_view_classes(channels: dict[str, int], num_classes: int) -> None:
  for name, k in channels.items():
    if not (k == num_classes or (k == 1 and num_classes == 2)):
      raise ValueError(f"view {name!r} has {k} channel(s); with num_classes = {num_classes} it must "
                       f"have {num_classes}" + (" or 1" if num_classes == 2 else ""))


def _labels(probs: np.ndarray, threshold: float) -> np.ndarray:
  """(*spatial, K) probabilities -> (*spatial,) int32 labels (METHODS.md §1.6 decision rule)."""
  return np.asarray(inference.probabilities_to_labels(probs, threshold))


def _postprocess(labels: np.ndarray, postprocess: str) -> np.ndarray:
  """Raw labels, or (binary labels only) the largest foreground component; empty stays empty."""
  if postprocess == RAW or not labels.any():
    return labels
  return geometry.largest_connected_component(labels).astype(labels.dtype)


# ---------------------------------------------------------------------------------------------------
# evaluate.


def evaluate(predict_fn: ViewsPredictFn, cases: Iterable[Case], eval_cfg: ml_collections.ConfigDict,
             num_classes: int, out_dir: Optional[PathLike] = None, *, patch_size: Sequence[int],
             split_name: str = "validation", mesh: Optional[Mesh] = None) -> dict:
  """Scores every view of a method on labeled cases; writes the reports when `out_dir` is given.

  Several devices: each batch of windows is spread over `mesh` (the devices of this process).
  Several processes: every process scores every P-th case (its state must live on its own devices,
  `parallel.local_replica`), the rows are gathered, and process 0 writes the reports (each process
  writes the predictions of its cases, so `out_dir` should be on a shared file system). Every
  process returns the same summary.

  Args:
    predict_fn: windows (B, *patch, C) -> {view: probabilities (B, *patch, K)}, e.g.
      `jax.tree_util.Partial(method.predict, state)`; jittable.
    cases: labeled cases with preprocessed images (*spatial, C), all 2D or all 3D.
    eval_cfg: the `config.eval` block (`config_blocks.eval_block()`).
    num_classes: classes including background; classes 1..num_classes-1 are scored.
    out_dir: folder for metrics.csv, summary.json, figure.png and predictions/; None writes nothing.
    patch_size: config.data.patch_size, used when eval.patch_size is empty.
    split_name: named in the summary (e.g. "validation", "test").
    mesh: devices over which each batch of windows is spread; None: one device.

  Returns:
    The summary (the content of summary.json):
    {"split", "num_cases", "num_classes", "classes", "view_names", "postprocesses", "empty_policy",
     "threshold", "units",
     "views": {view: {postprocess: {class: stats}}},
     "views_mean": {postprocess: {class: means}}   (only with >= 2 views)}
    where stats = {"num_cases", "num_empty_predictions", "num_empty_gt_excluded",
    "<metric>_mean", "<metric>_std" for each of METRIC_NAMES, and for 2D "f1_pooled",
    "mae_pooled"}; classes are string keys ("1", ...), undefined values (no scored case) are None.

  Raises:
    ValueError: no cases, a view whose channel count does not fit num_classes, views that differ
      between cases, or a case whose dimensionality does not match the patch.
    DataError: a case without a label (naming its source).
  """
  cases = list(cases)
  if not cases:
    raise ValueError("evaluate: no cases")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  patch, strides = window_geometry(eval_cfg, patch_size)
  predict_fn = _as_partial(predict_fn)
  classes = tuple(range(1, num_classes))
  postprocesses = (RAW, LCC) if eval_cfg.lcc and num_classes == 2 else (RAW,)
  is_2d = len(patch) == 2
  out = pathlib.Path(out_dir) if out_dir is not None else None
  save_predictions = out is not None and eval_cfg.save_predictions
  if save_predictions:
    (out / PREDICTIONS_DIR).mkdir(parents=True, exist_ok=True)

  # Checked for all cases on every process before any work, so that all processes fail alike.
  batch_size = window_batch_size(eval_cfg, mesh)
  channels_by_input: dict[int, dict[str, int]] = {}
  view_names: Optional[tuple[str, ...]] = None
  for case in cases:
    _check_eval_case(case, len(patch))
    num_channels = case.num_modalities
    if num_channels not in channels_by_input:
      channels = view_channels(predict_fn, (batch_size, *patch, num_channels))
      _check_view_classes(channels, num_classes)
      channels_by_input[num_channels] = channels
    channels = channels_by_input[num_channels]
    if view_names is None:
      view_names = tuple(channels)
    elif tuple(channels) != view_names:
      raise ValueError(f"case {case.case_id!r}: views {tuple(channels)} differ from {view_names}")

  primary = parallel.is_primary()
  start = time.perf_counter()
  window_seconds = 0.0
  rows: list[dict] = []
  pooled: dict[tuple[str, str, int], np.ndarray] = {}
  tiles: list[Image.Image] = []
  for case in cases[jax.process_index()::jax.process_count()]:
    channels = channels_by_input[case.num_modalities]
    window_start = time.perf_counter()
    probs = predict_views(predict_fn, case.image, eval_cfg, patch, strides, channels, mesh)
    window_seconds += time.perf_counter() - window_start  # predict_views returns host arrays.
    labels = {view: _labels(p, eval_cfg.threshold) for view, p in probs.items()}
    for view, view_labels in labels.items():
      for post in postprocesses:
        pred = _postprocess(view_labels, post)
        scores = metrics.case_metrics(pred, case.label, spacing=case.spacing, classes=classes,
                                      empty=eval_cfg.empty_policy)
        rows.extend({"case": case.case_id, "view": view, "postprocess": post, "class": c, **s}
                    for c, s in scores.items())
        if is_2d:
          for c in classes:
            counts = pooled.setdefault((view, post, c), np.zeros(5, np.int64))
            counts += _pixel_counts(pred == c, case.label == c)
      if save_predictions:
        _save_prediction(out / PREDICTIONS_DIR / f"{case.case_id}_{view}", view_labels, case,
                         num_classes)
    if out is not None and len(tiles) < eval_cfg.num_figure_cases:
      tiles.append(_figure_tile(case, labels[view_names[0]]))

  if jax.process_count() > 1:
    rows, pooled = _gather_scores(rows, pooled, [case.case_id for case in cases])
  summary = _summarize(rows, pooled, view_names, postprocesses, classes, is_2d)
  summary = {
      "split": split_name,
      "num_cases": len(cases),
      "num_classes": num_classes,
      "classes": list(classes),
      "view_names": list(view_names),
      "postprocesses": list(postprocesses),
      "empty_policy": eval_cfg.empty_policy,
      "threshold": float(eval_cfg.threshold),
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
  summary = _json_safe(summary)
  if out is not None and primary:
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "metrics.csv", rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if tiles:
      _side_by_side(tiles).save(out / "figure.png")
  return summary


def _gather_scores(rows: list[dict], pooled: dict, case_order: Sequence[str]
                   ) -> tuple[list[dict], dict]:
  """Every process's rows (in case order) and pooled pixel counts (summed), on every process."""
  mine = {"rows": rows, "pooled": [[*key, counts.tolist()] for key, counts in pooled.items()]}
  everyone = parallel.allgather_json(mine)
  position = {case_id: i for i, case_id in enumerate(case_order)}
  all_rows = sorted((row for part in everyone for row in part["rows"]),
                    key=lambda row: position[row["case"]])  # Stable: a case's rows keep their order.
  all_pooled: dict[tuple[str, str, int], np.ndarray] = {}
  for part in everyone:
    for view, post, c, counts in part["pooled"]:
      total = all_pooled.setdefault((view, post, c), np.zeros(5, np.int64))
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
               postprocesses: Sequence[str], classes: Sequence[int], is_2d: bool) -> dict:
  """The "views" and "views_mean" entries of the summary (see `evaluate`)."""
  views: dict[str, dict] = {}
  for view in view_names:
    views[view] = {}
    for post in postprocesses:
      views[view][post] = {}
      for c in classes:
        group = [r for r in rows if r["view"] == view and r["postprocess"] == post
                 and r["class"] == c]
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
          intersection, pred_size, gt_size, wrong, total = pooled[(view, post, c)]
          denominator = pred_size + gt_size
          stats["f1_pooled"] = 2.0 * intersection / denominator if denominator else math.nan
          stats["mae_pooled"] = wrong / total
        views[view][post][str(c)] = stats
  result: dict[str, Any] = {"views": views}
  if len(view_names) >= 2:
    keys = [f"{name}_mean" for name in METRIC_NAMES] + (list(POOLED_NAMES) if is_2d else [])
    result["views_mean"] = {
        post: {str(c): {k: float(np.mean([views[v][post][str(c)][k] for v in view_names]))
                        for k in keys}
               for c in classes}
        for post in postprocesses}
  return result


def _json_safe(value: Any) -> Any:
  """NaN / inf -> None (JSON has no NaN), recursively; numpy scalars -> Python numbers."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  """metrics.csv: floats at full precision (repr), NaN as "nan", empty flags as 0 / 1."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, "pred_empty": int(row["pred_empty"]),
                       "gt_empty": int(row["gt_empty"])})


HEADLINE_METRICS = ("dice", "jaccard", "hd95", "asd")


def headline(summary: dict) -> dict[str, float]:
  """The scalars to log from a summary: "<view>/<metric>" for each view and "views_mean".

  Per view (the method's order, then "views_mean" when there are >= 2 views), on raw predictions:
  dice, jaccard, hd95, asd (the class means averaged over the foreground classes), for 2D also
  f1_pooled and mae_pooled; and lcc_dice when LCC rows exist. Undefined values are NaN.
  """
  entries = [(view, summary["views"][view]) for view in summary["view_names"]]
  if "views_mean" in summary:
    entries.append(("views_mean", summary["views_mean"]))
  names = [f"{m}_mean" for m in HEADLINE_METRICS]
  if any("f1_pooled" in stats for stats in entries[0][1][RAW].values()):
    names += list(POOLED_NAMES)

  def class_average(by_class: dict, key: str) -> float:
    values = [stats.get(key) for stats in by_class.values()]
    values = [math.nan if v is None else v for v in values]
    return float(np.mean(values))

  scores = {}
  for view, posts in entries:
    for key in names:
      scores[f"{view}/{key.removesuffix('_mean')}"] = class_average(posts[RAW], key)
    if LCC in posts:
      scores[f"{view}/lcc_dice"] = class_average(posts[LCC], "dice_mean")
  return scores


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
  entries = [(view, posts) for view, posts in summary["views"].items()]
  if "views_mean" in summary:
    entries.append(("views_mean", summary["views_mean"]))
  for view, posts in entries:
    for post, by_class in posts.items():
      for c, stats in by_class.items():
        line = (f"  {view} {post} class {c}: Dice {fmt(stats, 'dice', 100)} %, Jaccard "
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
# Writing label maps.


def _diagonal_affine(spacing: Sequence[float]) -> np.ndarray:
  return np.diag([*map(float, spacing), 1.0])


def _save_prediction(stem: pathlib.Path, labels: np.ndarray, case: Case, num_classes: int) -> None:
  """3D: <stem>.nii.gz with the case's affine (else diag(spacing)); 2D: <stem>.png."""
  if labels.ndim == 2:
    _write_png_mask(stem.with_name(stem.name + ".png"), labels, num_classes)
  else:
    affine = case.affine if case.affine is not None else _diagonal_affine(case.spacing)
    _write_nifti_labels(stem.with_name(stem.name + ".nii.gz"), labels, affine)


def _write_png_mask(path: pathlib.Path, labels: np.ndarray, num_classes: int) -> None:
  """Binary: 0 / 255 (viewable; folders2d reads > 0 as foreground); else class indices."""
  if num_classes > 256:
    raise ValueError(f"{path}: cannot store {num_classes} classes in an 8-bit PNG")
  values = labels * 255 if num_classes == 2 else labels
  Image.fromarray(values.astype(np.uint8)).save(path)


def _write_nifti_labels(path: pathlib.Path, labels: np.ndarray, affine: np.ndarray,
                        like: Optional[nib.spatialimages.SpatialImage] = None) -> None:
  """uint8 NIfTI-1 of `labels` with `affine`; with `like`, its header (zooms, codes), unscaled."""
  if like is None:
    header = nib.Nifti1Header()
  else:
    header = nib.Nifti1Header.from_header(like.header)
    header.set_intent("none")  # A 4D input may carry a vector intent; labels are scalars.
  header.set_data_dtype(np.uint8)
  image = nib.Nifti1Image(labels.astype(np.uint8), affine, header)
  # Labels are stored exactly: no scaling inherited from the input.
  image.header.set_slope_inter(1.0, 0.0)
  if like is not None:
    image.header.set_zooms(tuple(like.header.get_zooms()[:labels.ndim]))
  nib.save(image, path)


# ---------------------------------------------------------------------------------------------------
# Figure.


def _figure_tile(case: Case, labels: np.ndarray) -> Image.Image:
  """One captioned RGB tile: grayscale image, ground-truth contour green, prediction contour red.

  3D: the slice along the last axis through the ground-truth centroid (the prediction's when the
  ground truth is empty, else the middle), transposed so that x runs left to right. Gray = channel 0,
  or the channel mean for 3-channel 2D (RGB) images, stretched between its 1st and 99th percentiles.
  """
  image, gt, pred = case.image, case.label > 0, labels > 0
  if case.ndim == 3:
    z = _centroid_index(gt, pred)
    image, gt, pred = (a[:, :, z].swapaxes(0, 1) for a in (image, gt, pred))
  gray = image.mean(axis=-1) if case.ndim == 2 and image.shape[-1] == 3 else image[..., 0]
  scale = max(1, math.ceil(FIGURE_MIN_SIDE / max(gray.shape)))
  gray, gt, pred = (np.kron(a, np.ones((scale, scale), a.dtype)) for a in (gray, gt, pred))
  low, high = np.percentile(gray, [1, 99])
  gray = np.clip((gray - low) / (high - low), 0, 1) if high > low else np.zeros_like(gray)
  rgb = np.repeat((255 * gray).astype(np.uint8)[..., None], 3, axis=-1)
  rgb[_contour(gt)] = _GT_COLOUR
  rgb[_contour(pred)] = _PRED_COLOUR  # Drawn last: where the contours coincide, red shows.
  tile = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + FIGURE_CAPTION_HEIGHT))
  tile.paste(Image.fromarray(rgb), (0, FIGURE_CAPTION_HEIGHT))
  ImageDraw.Draw(tile).text((2, 2), case.case_id, fill=(255, 255, 255))
  return tile


def _centroid_index(gt: np.ndarray, pred: np.ndarray) -> int:
  """Index along the last axis through the centroid of gt (else pred, else the middle)."""
  for mask in (gt, pred):
    if mask.any():
      return int(round(np.nonzero(mask)[-1].mean()))
  return mask.shape[-1] // 2


def _contour(mask: np.ndarray) -> np.ndarray:
  """Boundary pixels of a 2D bool mask (mask minus its 4-neighbour erosion)."""
  return mask & ~ndimage.binary_erosion(mask)


def _side_by_side(tiles: Sequence[Image.Image]) -> Image.Image:
  width = sum(t.width for t in tiles)
  height = max(t.height for t in tiles)
  figure = Image.new("RGB", (width, height))
  left = 0
  for tile in tiles:
    figure.paste(tile, (left, 0))
    left += tile.width
  return figure


# ---------------------------------------------------------------------------------------------------
# predict_files (--mode predict).


def _input_kind(path: pathlib.Path) -> Optional[str]:
  """"nifti", "h5" or "image" by file name, or None for anything else (hidden files included)."""
  name = path.name.lower()
  if path.name.startswith("."):
    return None
  if name.endswith(NIFTI_SUFFIXES):
    return "nifti"
  if name.endswith(H5_SUFFIXES):
    return "h5"
  if path.suffix.lower() in folders2d.EXTENSIONS:
    return "image"
  return None


def find_input_files(input_path: PathLike) -> list[pathlib.Path]:
  """The files `--input` names: the file itself, or a folder's supported files, sorted.

  A folder is scanned for NIfTI (.nii, .nii.gz), h5 (.h5) and 2D image files (folders2d.EXTENSIONS)
  directly inside it, and recursively for LA case files (<ID>/mri_norm2.h5, at any depth).

  Raises:
    DataError: naming the path when it does not exist, is an unsupported file, or is a folder
      without supported files.
  """
  path = pathlib.Path(input_path)
  if not path.exists():
    raise DataError(f"{path}: input not found")
  supported = "NIfTI (.nii, .nii.gz), h5 (.h5) or 2D images (" + ", ".join(folders2d.EXTENSIONS) + ")"
  if path.is_file():
    if _input_kind(path) is None:
      raise DataError(f"{path}: unsupported input file; expected {supported}")
    return [path]
  files = {p for p in path.iterdir() if p.is_file() and _input_kind(p) is not None}
  files.update(p for p in path.rglob(la.CASE_FILE) if p.is_file())
  if not files:
    raise DataError(f"{path}: no supported input files ({supported})")
  return sorted(files)


def _output_name(path: pathlib.Path) -> str:
  """NIfTI and h5 -> <case>.nii.gz (LA's <ID>/mri_norm2.h5 -> <ID>.nii.gz); images -> <stem>.png."""
  kind = _input_kind(path)
  if kind == "nifti":
    return msd.case_id_from_path(path) + ".nii.gz"
  if kind == "h5":
    return (path.parent.name if path.name == la.CASE_FILE else path.stem) + ".nii.gz"
  return path.stem + ".png"


def _read_h5_image(path: pathlib.Path) -> np.ndarray:
  """The `image` dataset of an LA-style h5 file (a label is not needed)."""
  try:
    with h5py.File(path, "r") as f:
      image = f.get("image")
      if not isinstance(image, h5py.Dataset):
        raise DataError(f"{path}: no `image` dataset; found keys {sorted(f.keys())}")
      return np.asarray(image[()])
  except OSError as err:
    raise DataError(f"{path}: not a readable h5 file: {err}") from err


@dataclasses.dataclass(frozen=True)
class _InputFile:
  """One input file, read: image (*spatial, C) float32 and what writing its prediction needs."""

  image: np.ndarray
  nifti: Optional[nib.spatialimages.SpatialImage] = None  # The NIfTI input (affine, header).
  original_size: Optional[tuple[int, int]] = None  # 2D: the file's (H, W) before resizing.


def _read_input(path: pathlib.Path, data_cfg: ml_collections.ConfigDict) -> _InputFile:
  """Reads one input as the training data was read: channels, resizing (2D), then preprocessing."""
  kind = _input_kind(path)
  original_size = None
  nifti = None
  if kind == "nifti":
    nifti, data = msd._read_nifti(path, as_float=True)  # pylint: disable=protected-access
  elif kind == "h5":
    data = _read_h5_image(path)
  else:
    data = folders2d._with_channels(  # pylint: disable=protected-access
        folders2d.read_image(path), data_cfg.get("channels", 0) or None)
    original_size = tuple(data.shape[:2])
    if data_cfg.get("image_size", ()):
      data = folders2d.resize_image(data, tuple(data_cfg.image_size))
  if kind != "image":
    if data.ndim == 3:
      data = data[..., np.newaxis]  # One modality; 4D NIfTI / h5 are already channels-last.
    if data.ndim != 4:
      raise DataError(f"{path}: image must be 3D (X, Y, Z) or 4D (X, Y, Z, C), got shape "
                      f"{data.shape}")
  if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
    raise DataError(f"{path}: image must be real-valued, got dtype {data.dtype}")
  case = Case(case_id=path.name, image=np.asarray(data, np.float32),
              label=None, spacing=(1.0,) * (data.ndim - 1), source=str(path))
  check_case(case)
  clip = tuple(data_cfg.get("clip_percentiles", ())) or None
  if clip is not None or data_cfg.get("zscore", False):
    case = preprocess.preprocess_case(case, clip=clip, zscore=data_cfg.get("zscore", False))
  return _InputFile(image=case.image, nifti=nifti, original_size=original_size)


def predict_files(predict_fn: ViewsPredictFn, input_path: PathLike, output_dir: PathLike,
                  eval_cfg: ml_collections.ConfigDict, *, patch_size: Sequence[int],
                  data_cfg: ml_collections.ConfigDict, view: Optional[str] = None,
                  num_channels: Optional[int] = None) -> list[pathlib.Path]:
  """Segments files with one view of a method and writes one label file per input.

  Inputs are read like the training data (`data_cfg`): NIfTI (3D, or 4D multi-modal channels-last),
  LA-style h5 (`image` dataset) or 2D images (folders2d's reader, `data.channels`,
  `data.image_size`), then clipped / z-scored per `data.clip_percentiles` / `data.zscore`.

  Outputs, in `output_dir`: NIfTI inputs -> <case>.nii.gz (uint8, the input's affine and zooms);
  h5 -> <case>.nii.gz (identity affine: LA works in voxels; the case is the LA folder name for
  mri_norm2.h5); 2D -> <stem>.png at the file's original size (0 / 255 for binary, else class
  indices; a resized image's labels are resized back by nearest neighbour).

  Args:
    predict_fn: windows (B, *patch, C) -> {view: probabilities}; jittable.
    input_path: a supported file, or a folder (see `find_input_files`).
    output_dir: created if needed.
    eval_cfg: the `config.eval` block (window, batch size, threshold).
    patch_size: config.data.patch_size, used when eval.patch_size is empty.
    data_cfg: the training config's `data` block.
    view: the view to use; None: the method's first view.
    num_channels: the channels the model was trained on; None: any count the model accepts
      (checked by tracing it on the file's channel count).

  Returns:
    The written files, in input order.

  Raises:
    DataError: naming the path or file: a missing input, no supported files, an unreadable file,
      an image whose dimensionality or channel count the model does not take, two inputs that
      would write the same output, an output that would overwrite its input; or naming `view`.
  """
  files = find_input_files(input_path)
  patch, strides = window_geometry(eval_cfg, patch_size)
  predict_fn = _as_partial(predict_fn)
  out = pathlib.Path(output_dir)
  targets = [out / _output_name(p) for p in files]
  for i, target in enumerate(targets):
    if target in targets[:i]:
      raise DataError(f"{files[i]}: its output {target} would overwrite the prediction of "
                      f"{files[targets.index(target)]}")
    if target.exists() and target.resolve() == files[i].resolve():
      raise DataError(f"{files[i]}: the output would overwrite the input; choose another --output")
  out.mkdir(parents=True, exist_ok=True)

  channels_by_input: dict[int, dict[str, int]] = {}
  written = []
  for path, target in zip(files, targets):
    data = _read_input(path, data_cfg)
    image = data.image
    if image.ndim - 1 != len(patch):
      raise DataError(f"{path}: image {image.shape[:-1]} is {image.ndim - 1}D but the model's "
                      f"patch {patch} is {len(patch)}D")
    c = image.shape[-1]
    if num_channels is not None and c != num_channels:
      raise DataError(f"{path}: image has {c} channel(s), the model takes {num_channels}")
    if c not in channels_by_input:
      channels_by_input[c] = _probe_input_channels(predict_fn, eval_cfg, patch, c, path)
    names = list(channels_by_input[c])
    name = names[0] if view is None else view
    if name not in names:
      raise DataError(f"view: {view!r} is not one of the method's views {names}")
    probs = inference.sliding_window_predict(
        jax.tree_util.Partial(_SelectView(name), predict_fn), image, patch, strides,
        batch_size=eval_cfg.batch_size, gaussian=eval_cfg.gaussian,
        shape_bucket=eval_cfg.shape_bucket)
    labels = _labels(np.asarray(probs), eval_cfg.threshold)
    num_classes = max(2, channels_by_input[c][name])
    if data.original_size is not None:
      if labels.shape != data.original_size:
        labels = folders2d.resize_mask(labels, data.original_size)
      _write_png_mask(target, labels, num_classes)
    elif data.nifti is not None:
      _write_nifti_labels(target, labels, np.asarray(data.nifti.affine), like=data.nifti)
    else:
      _write_nifti_labels(target, labels, _diagonal_affine(la.SPACING))
    written.append(target)
  return written


def _probe_input_channels(predict_fn: ViewsPredictFn, eval_cfg: ml_collections.ConfigDict,
                          patch: Sequence[int], num_channels: int, path: pathlib.Path
                          ) -> dict[str, int]:
  """`view_channels` for C-channel windows; a model that cannot take C channels -> DataError."""
  try:
    return view_channels(predict_fn, (eval_cfg.batch_size, *patch, num_channels))
  except Exception as err:  # Flax and lax raise their own error types for mismatched shapes.
    raise DataError(f"{path}: the model does not take {num_channels}-channel input: "
                    f"{type(err).__name__}: {err}") from err
