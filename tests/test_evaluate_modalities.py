"""eval.modalities: the method given only some modalities (evaluate.with_modalities), and the
subset x class / region table of eval.modalities = "subsets"."""

from __future__ import annotations

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import evaluate as ev
from jaxseg import metrics
from jaxseg.config_blocks import eval_block
from jaxseg.data.base import Case, DataError

SHAPE = (12, 10, 8)
NAMES = ("A", "B")


def box(lo, hi):
  mask = np.zeros(SHAPE, bool)
  mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return mask


BOX_A, BOX_B = box((1, 1, 1), (6, 5, 4)), box((6, 4, 3), (11, 9, 7))


def two_modality_case(case_id="c0", modality_mask=None):
  """Channel A shows box a, channel B box b; the label (class 1) is a ∪ b."""
  image = np.stack([BOX_A, BOX_B], axis=-1).astype(np.float32)
  return Case(case_id, image, (BOX_A | BOX_B).astype(np.uint8), (1.0,) * 3, modalities=NAMES,
              modality_mask=modality_mask)


def brightest(inputs):
  """Foreground where any given channel is bright: reads the image only (not the mask), so it
  sees a withheld modality only if its channel were left in place."""
  x = jnp.max(inputs["image"], axis=-1, keepdims=True)
  return {"model": jax.nn.sigmoid(20.0 * (x - 0.5))}


def dice(pred, gt=BOX_A | BOX_B):
  return metrics.case_metrics(pred.astype(np.int32), gt.astype(np.int32), classes=(1,))[1]["dice"]


def test_subsets_by_size_then_channel_order():
  subsets = ev.modality_subsets("subsets", ("flair", "t1", "t2"))
  assert [s.name for s in subsets] == ["flair", "t1", "t2", "flair+t1", "flair+t2", "t1+t2",
                                       "flair+t1+t2"]
  assert subsets[4].keep == (True, False, True)
  assert len(ev.modality_subsets("subsets", tuple("abcd"))) == 15
  assert ev.modality_subsets("", NAMES) == ()
  (one,) = ev.modality_subsets(" b , 0", NAMES)
  assert one.name == "B+A" and one.keep == (True, True)


@pytest.mark.parametrize("setting, match", [("C", "unknown modality 'C'"), ("A,,B", "empty entry"),
                                            ("2", "out of range"), ("A,0", "twice")])
def test_bad_settings_name_eval_modalities(setting, match):
  with pytest.raises(DataError, match=rf"config eval.modalities.*{match}"):
    ev.modality_subsets(setting, NAMES)


def test_withheld_channels_are_zero_and_masked_per_window():
  seen = []

  def record(inputs):
    seen.append((inputs["image"], inputs["modality_mask"]))
    return {"v": inputs["image"][..., :1]}

  image = jnp.ones((2, 4, 4, 4, 2))
  available = jnp.array([[True, True], [True, False]])  # Window 1 lacks B.
  out = ev.with_modalities(record, "subsets", NAMES)({"image": image, "modality_mask": available})
  assert list(out) == ["v:A", "v:B", "v:A+B"]
  masks = [np.asarray(m).tolist() for _, m in seen]
  assert masks == [[[True, False], [True, False]], [[False, True], [False, False]],
                   [[True, True], [True, False]]]
  for (img, mask) in seen:  # Every channel not given is zero, every given one untouched.
    np.testing.assert_array_equal(
        np.asarray(img), np.broadcast_to(np.asarray(mask)[:, None, None, None, :], img.shape) * 1.0)
  assert ev.with_modalities(record, "", NAMES) is record
  one = ev.with_modalities(record, "B", NAMES)({"image": image, "modality_mask": available})
  assert list(one) == ["v"]  # One subset: the views keep their names.


def test_subsets_are_scored_as_views_with_the_table(tmp_path):
  cfg = eval_block()
  cfg.modalities = "subsets"
  cfg.save_predictions = False
  summary = ev.evaluate(brightest, [two_modality_case()], cfg, 2, tmp_path, patch_size=SHAPE)
  assert summary["view_names"] == ["model:A", "model:B", "model:A+B"]
  assert summary["modality_subsets"] == ["A", "B", "A+B"] and summary["modalities"] == "subsets"
  want = {"A": dice(BOX_A), "B": dice(BOX_B), "A+B": 1.0}
  assert want["A"] < 0.8 and want["B"] < 0.8  # Each modality alone misses half the structure.
  for name, value in want.items():
    assert summary["views"][f"model:{name}"]["raw"]["1"]["dice_mean"] == pytest.approx(value)
  with open(tmp_path / ev.SUBSETS_CSV) as f:
    rows = list(csv.DictReader(f))
  assert [(r["view"], r["modalities"], r["num_modalities"]) for r in rows] == [
      ("model", "A", "1"), ("model", "B", "1"), ("model", "A+B", "2")]
  assert [float(r["1"]) for r in rows] == pytest.approx(list(want.values()))
  lines = ev.subset_table_lines(summary)
  assert lines[0].split() == ["view", "modalities", "1"]
  assert lines[3].split() == ["model", "A+B", "100.00"]
  assert float(lines[1].split()[-1]) == pytest.approx(100 * want["A"], abs=0.005)


def test_one_named_subset_keeps_the_view_names(tmp_path):
  cfg = eval_block()
  cfg.modalities = "b"
  summary = ev.evaluate(brightest, [two_modality_case()], cfg, 2, tmp_path, patch_size=SHAPE)
  assert summary["view_names"] == ["model"] and "modality_subsets" not in summary
  assert summary["views"]["model"]["raw"]["1"]["dice_mean"] == pytest.approx(dice(BOX_B))
  assert not (tmp_path / ev.SUBSETS_CSV).exists() and ev.subset_table_lines(summary) == []


def test_a_case_lacking_a_modality_is_given_only_what_it_has(tmp_path):
  """The case's own mask lacks B: the full set reads as A alone, and subset B gets nothing."""
  cfg = eval_block()
  cfg.modalities = "subsets"
  cfg.save_predictions = False
  case = two_modality_case(modality_mask=np.array([True, False]))
  summary = ev.evaluate(brightest, [case], cfg, 2, tmp_path, patch_size=SHAPE)
  views = summary["views"]
  assert views["model:A+B"]["raw"]["1"]["dice_mean"] == pytest.approx(dice(BOX_A))
  assert views["model:B"]["raw"]["1"]["num_empty_predictions"] == 1
