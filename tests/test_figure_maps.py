"""Tests of a method's optional per-voxel maps (`maps(state, inputs)`, e.g. ASDNet's confidence):
slid like the probabilities, computed for the figure cases only, drawn as heat panels in figure.png,
never scored; and the trainer's plumbing (`train._maps_fn`, `train._validate`).

The toy method is test-only: its view is a sigmoid of the intensity (as in tests/test_evaluate.py)
and its maps are pointwise functions of the image ("sig") or depend on the window ("centred"), so
the whole-case maps are known or can be recomputed with the sliding window directly.
"""

from __future__ import annotations

import csv
import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxseg import evaluate as ev
from jaxseg import inference, train, writers
from jaxseg.data import splits
from jaxseg.config_blocks import eval_block
from jaxseg.data.base import Case

SHAPE = (20, 18, 12)  # Bigger than the patch along every axis: several windows overlap.
PATCH = (12, 10, 8)
SHAPE_2D = (30, 26)
PATCH_2D = (16, 16)


def predict(inputs):
  return {"model": jax.nn.sigmoid(10.0 * (inputs["image"][..., :1] - 0.5))}


def sig(image):
  """The "sig" map of a (..., C) image: a pointwise function of channel 0, in (0, 1)."""
  return 1.0 / (1.0 + np.exp(-(3.0 * image[..., 0] - 1.0)))


def pointwise_maps(inputs):
  return {"sig": jax.nn.sigmoid(3.0 * inputs["image"][..., 0] - 1.0)}


def window_maps(inputs):
  """A pointwise map, then one that depends on the window (intensity minus the window's mean), so
  that its whole-case value is a true average over overlapping windows."""
  x = inputs["image"][..., 0]
  centred = x - jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
  return {"sig": jax.nn.sigmoid(3.0 * x - 1.0), "centred": jax.nn.sigmoid(centred)}


def make_cases(shape=SHAPE, n=4, seed=0):
  """n labeled cases: a box of intensity 1 (the label) on random low intensities, one case each."""
  rng = np.random.default_rng(seed)
  cases = []
  for i in range(n):
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(3 + i % 2, s - 3) for s in shape)] = 1
    image = np.where(label, 1.0, 0.3 * rng.random(shape)).astype(np.float32)[..., None]
    cases.append(Case(f"c{i}", image, label, (1.0,) * len(shape)))
  return cases


def read_text(path):
  return path.read_text()


def without_seconds(summary):
  return {k: v for k, v in summary.items() if k != "seconds"}


# ---------------------------------------------------------------------------------------------------
# predict_maps: the sliding window of the probabilities.


@pytest.mark.parametrize("options", [{}, {"gaussian": True, "mirror_axes": (0, 2)}])
def test_maps_are_slid_like_probabilities(options):
  case = make_cases(n=1)[0]
  cfg = eval_block()
  for key, value in options.items():
    setattr(cfg, key, value)
  patch, strides = ev.window_geometry(cfg, PATCH)
  maps = ev.predict_maps(jax.tree_util.Partial(window_maps), ev.case_inputs(case), cfg, patch,
                         strides)
  assert list(maps) == ["sig", "centred"]  # The method's order.
  assert all(m.shape == SHAPE and m.dtype == np.float32 for m in maps.values())
  # A pointwise map comes back as that function of the whole case image.
  np.testing.assert_allclose(maps["sig"], sig(case.image), rtol=1e-5, atol=1e-6)
  # A window-dependent map is averaged over the windows exactly like a probability view.
  as_view = lambda inputs: {"v": window_maps(inputs)["centred"][..., None]}
  want = ev.predict_views(as_view, ev.case_inputs(case), cfg, patch, strides)["v"][..., 0]
  np.testing.assert_allclose(maps["centred"], want, rtol=1e-6, atol=1e-7)
  direct = inference.sliding_window_predict(
      lambda w: window_maps(w)["centred"][..., None], {"image": case.image}, patch, strides,
      per_case={"modality_mask": case.present}, batch_size=cfg.batch_size,
      gaussian=cfg.gaussian, mirror_axes=tuple(cfg.mirror_axes))
  np.testing.assert_allclose(maps["centred"], np.asarray(direct)[..., 0], rtol=1e-6, atol=1e-7)
  # The window means differ between windows, so averaging is what made it smooth, not a no-op.
  assert not np.allclose(maps["centred"], 1.0 / (1.0 + np.exp(-(case.image[..., 0]
                                                                 - case.image[..., 0].mean()))))


def test_bad_maps_are_named():
  case = make_cases(n=1)[0]
  cfg = eval_block()
  patch, strides = ev.window_geometry(cfg, PATCH)
  with pytest.raises(ValueError, match="map 'flat'.*expected"):
    ev.predict_maps(lambda w: {"flat": w["image"][..., 0].reshape(w["image"].shape[0], -1)},
                    ev.case_inputs(case), cfg, patch, strides)
  with pytest.raises(TypeError, match="non-empty dict"):
    ev.predict_maps(lambda w: w["image"][..., 0], ev.case_inputs(case), cfg, patch, strides)


# ---------------------------------------------------------------------------------------------------
# evaluate: figure cases only, figure panels, reports unchanged.


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """The same 4 cases evaluated without and with maps (2 figure cases), predict_maps counted."""
  cases = make_cases()
  cfg = eval_block()
  cfg.num_figure_cases = 2
  plain = tmp_path_factory.mktemp("plain")
  with_maps = tmp_path_factory.mktemp("maps")
  calls = []
  real = ev.predict_maps

  def counted(maps_fn, inputs, *args, **kwargs):
    calls.append(inputs[0]["image"])
    return real(maps_fn, inputs, *args, **kwargs)

  summary_plain = ev.evaluate(predict, cases, cfg, 2, plain, patch_size=PATCH, split_name="test")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ev, "predict_maps", counted)
    summary_maps = ev.evaluate(predict, cases, cfg, 2, with_maps, patch_size=PATCH,
                               split_name="test", maps_fn=jax.tree_util.Partial(window_maps))
    figure_calls = list(calls)
    # No reports: no maps at all, whatever num_figure_cases says.
    summary_none = ev.evaluate(predict, cases, cfg, 2, None, patch_size=PATCH, split_name="test",
                               maps_fn=jax.tree_util.Partial(window_maps))
  return dict(cases=cases, cfg=cfg, plain=plain, with_maps=with_maps, summary_plain=summary_plain,
              summary_maps=summary_maps, summary_none=summary_none, figure_calls=figure_calls,
              all_calls=calls)


def test_maps_computed_for_figure_cases_only(evaluated):
  cases = evaluated["cases"]
  assert len(evaluated["figure_calls"]) == 2
  for seen, case in zip(evaluated["figure_calls"], cases[:2]):
    assert seen is case.image
  assert len(evaluated["all_calls"]) == 2  # evaluate without out_dir added none.


def test_reports_are_identical_with_and_without_maps(evaluated):
  plain, with_maps = evaluated["plain"], evaluated["with_maps"]
  assert read_text(plain / "metrics.csv") == read_text(with_maps / "metrics.csv")
  assert (without_seconds(json.loads(read_text(plain / "summary.json")))
          == without_seconds(json.loads(read_text(with_maps / "summary.json"))))
  assert without_seconds(evaluated["summary_plain"]) == without_seconds(evaluated["summary_maps"])
  assert without_seconds(evaluated["summary_none"]) == without_seconds(evaluated["summary_maps"])
  # Maps are never saved as predictions.
  assert (sorted(p.name for p in (plain / "predictions").iterdir())
          == sorted(p.name for p in (with_maps / "predictions").iterdir()))
  with open(with_maps / "metrics.csv") as f:
    assert {row["view"] for row in csv.DictReader(f)} == {"model"}


def _figure_cases(evaluated, maps_fn):
  """The figure cases of `evaluated`, rebuilt from their parts (`writers.figure_case`)."""
  cfg, shown = evaluated["cfg"], []
  patch, strides = ev.window_geometry(cfg, PATCH)
  with open(evaluated["plain"] / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  for case in evaluated["cases"][:cfg.num_figure_cases]:
    probs = ev.predict_views(predict, ev.case_inputs(case), cfg, patch, strides)
    labels = {"model": (probs["model"][..., 0] > 0.5).astype(np.int32)}
    dice = {"model": {1: next(float(r["dice"]) for r in rows if r["case"] == case.case_id
                              and r["postprocess"] == "raw" and r["class"] == "1")}}
    maps = None
    if maps_fn is not None:
      maps = ev.predict_maps(maps_fn, ev.case_inputs(case), cfg, patch, strides)
    shown.append(writers.figure_case(case, labels, dice, maps))
  return shown


def test_figure_has_one_heat_panel_per_map(evaluated):
  plain = Image.open(evaluated["plain"] / "figure.png").convert("RGB")
  figure = Image.open(evaluated["with_maps"] / "figure.png").convert("RGB")
  assert figure.size[0] > plain.size[0]  # Two more columns.
  shown = _figure_cases(evaluated, jax.tree_util.Partial(window_maps))
  header = ("test: 2 of 4 cases; the slice with the most ground-truth foreground; Dice and map "
            "means of the whole case")
  layout = writers.figure_layout(shown, 2, header=header)
  assert figure.size == layout.size
  assert np.array_equal(np.asarray(figure), np.asarray(writers.draw_figure(shown, 2, header)))
  kinds = [(p.case, p.kind, p.view) for p in layout.panels]
  assert kinds == [(i, k, v) for i in range(2) for k, v in
                   [("image", ""), ("ground truth", ""), ("prediction", "model"), ("map", "sig"),
                    ("map", "centred")]]
  pixels = np.asarray(figure)
  for panel in layout.panels:
    if panel.kind != "map":
      continue
    case, scale = evaluated["cases"][panel.case], layout.scales[panel.case]
    whole = ev.predict_maps(window_maps, ev.case_inputs(case), evaluated["cfg"],
                            *ev.window_geometry(evaluated["cfg"], PATCH))[panel.view]
    # Title: the name and the mean over the whole case.
    assert panel.title[0] == f"{panel.view} (mean {whole.mean():.2f})"
    assert shown[panel.case].map_means[panel.view] == pytest.approx(whole.mean(), rel=1e-6)
    # Pixels: the heat colours of the shown slice (the ground truth's), upscaled.
    z = writers.figure_slice(case.label)
    slice_ = whole[:, :, z].T
    left, top, w, h = panel.box
    want = writers.heat_colours(np.kron(slice_, np.ones((scale, scale), np.float32)))
    assert np.array_equal(pixels[top:top + h, left:left + w], want)
  assert [e[4] for e in layout.legend][-1] == "map value 0 to 1"


def test_no_maps_gives_todays_figure(evaluated):
  shown = _figure_cases(evaluated, None)
  header = ("test: 2 of 4 cases; the slice with the most ground-truth foreground; Dice of the "
            "whole case")
  layout = writers.figure_layout(shown, 2, header=header)
  assert {p.kind for p in layout.panels} == {"image", "ground truth", "prediction"}
  assert [e[2] for e in layout.legend] == ["fill", "outline"]
  assert all(c.maps == {} and c.map_means == {} for c in shown)
  figure = Image.open(evaluated["plain"] / "figure.png").convert("RGB")
  assert np.array_equal(np.asarray(figure), np.asarray(writers.draw_figure(shown, 2, header)))
  # The same FigureCase built the old way (no maps fields) draws the same bytes.
  old = [writers.FigureCase(c.case_id, c.image, c.label, c.predictions, c.dice, c.where)
         for c in shown]
  assert writers.draw_figure(old, 2, header).tobytes() == writers.draw_figure(shown, 2,
                                                                              header).tobytes()


def test_2d_figure_with_maps(tmp_path):
  cases = make_cases(SHAPE_2D, n=2, seed=1)
  cfg = eval_block()
  summary = ev.evaluate(predict, cases, cfg, 2, tmp_path, patch_size=PATCH_2D,
                        maps_fn=pointwise_maps)
  assert "sig" not in json.dumps(summary)
  patch, strides = ev.window_geometry(cfg, PATCH_2D)
  maps = ev.predict_maps(pointwise_maps, ev.case_inputs(cases[0]), cfg, patch, strides)
  np.testing.assert_allclose(maps["sig"], sig(cases[0].image), rtol=1e-5, atol=1e-6)
  shown = writers.figure_case(cases[0], {"model": cases[0].label.astype(np.int32)},
                              {"model": {1: 1.0}}, maps)
  np.testing.assert_allclose(shown.maps["sig"], sig(cases[0].image), rtol=1e-5, atol=1e-6)
  figure = Image.open(tmp_path / "figure.png")
  layout_without = writers.figure_layout(
      [writers.FigureCase(c.case_id, np.zeros(SHAPE_2D, np.float32), c.label, {"model": c.label},
                          {"model": {1: 1.0}}) for c in cases], 2)
  assert figure.size[0] > layout_without.size[0]


def test_heat_colours():
  colours = writers.heat_colours(np.array([-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]))
  assert colours.dtype == np.uint8 and colours.shape == (6, 3)
  assert tuple(colours[0]) == tuple(colours[1]) == writers.HEAT_COLOURS[0] == tuple(colours[5])
  assert tuple(colours[3]) == tuple(colours[4]) == writers.HEAT_COLOURS[-1]
  assert tuple(colours[2]) == writers.HEAT_COLOURS[4]
  # Brighter with the value (perceptual order), so the heat map also reads in gray.
  ramp = writers.heat_colours(np.linspace(0, 1, 65)).astype(np.float64)
  luma = ramp @ np.array([0.299, 0.587, 0.114])
  assert np.all(np.diff(luma) > 0)
  assert writers.map_title("confidence", 0.4237) == "confidence (mean 0.42)"


def test_figure_case_clips_maps_and_means_the_whole_case():
  case = make_cases(n=1)[0]
  values = np.linspace(-0.5, 1.5, np.prod(SHAPE)).reshape(SHAPE).astype(np.float32)
  shown = writers.figure_case(case, {"model": case.label}, {"model": {1: 1.0}}, {"m": values})
  z = writers.figure_slice(case.label)
  np.testing.assert_array_equal(shown.maps["m"], np.clip(values, 0, 1)[:, :, z].T)
  assert shown.map_means["m"] == pytest.approx(np.clip(values, 0, 1).mean(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# The trainer's plumbing.


def test_trainer_passes_maps_only_with_reports(monkeypatch, tmp_path):
  seen = []
  monkeypatch.setattr(train.evaluate, "evaluate", lambda *a, **k: seen.append(k) or {"ok": 1})
  config = ml_collections.ConfigDict({"eval": {"case_list": "", "patch_size": ()},
                                      "data": {"patch_size": PATCH}})
  cases = tuple(make_cases(n=1))
  dataset = types.SimpleNamespace(validation=cases, num_classes=2, split=splits.Split(
      labeled=(), unlabeled=(), validation=tuple(c.case_id for c in cases)))
  state = {"w": jnp.ones(())}
  with_maps = types.SimpleNamespace(predict=lambda s, x: predict(x),
                                    maps=lambda s, x: pointwise_maps(x))
  without = types.SimpleNamespace(predict=lambda s, x: predict(x))
  assert train._maps_fn(without, state) is None
  bound = train._maps_fn(with_maps, state)
  assert isinstance(bound, jax.tree_util.Partial) and bound.args[0] is state
  train._validate(with_maps, state, dataset, config, None, final=False)  # Validation: no maps.
  train._validate(with_maps, state, dataset, config, tmp_path)  # Final evaluation: maps.
  train._validate(without, state, dataset, config, tmp_path)
  assert seen[0]["maps_fn"] is None
  assert isinstance(seen[1]["maps_fn"], jax.tree_util.Partial)
  assert seen[1]["maps_fn"].func is with_maps.maps
  assert seen[2]["maps_fn"] is None
  assert seen[0]["split_record"] == {"validation_rule": "last"}  # How validation was chosen.
