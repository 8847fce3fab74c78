"""Tests of jaxseg.postprocess: the decision rule (strict threshold, argmax ties), DTC `getLargestCC`
golden outputs (skimage 26-connectivity) and edge cases, and the raw / LCC post-processings.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_golden
from jaxseg import postprocess

# ---------------------------------------------------------------------------------------------------
# Decisions.


def test_probabilities_to_labels_threshold_is_strict():
  probs = jnp.array([[0.5], [0.5000001], [0.2], [0.9]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(postprocess.probabilities_to_labels(probs)), [0, 1, 0, 1])
  np.testing.assert_array_equal(np.asarray(postprocess.probabilities_to_labels(probs, threshold=0.8)),
                                [0, 0, 0, 1])


def test_probabilities_to_labels_argmax_ties_go_to_first_class():
  probs = jnp.array([[0.5, 0.5], [0.4, 0.6]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(postprocess.probabilities_to_labels(probs)), [0, 1])
  probs3 = jnp.array([[0.3, 0.35, 0.35], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]], jnp.float32)
  labels = postprocess.probabilities_to_labels(probs3)
  assert labels.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(labels), [1, 2, 0])


# ---------------------------------------------------------------------------------------------------
# Largest connected component.

LCC_CASES = ["three_boxes", "corner_touch", "edge_touch_vs_singletons", "tie", "blobs"]


@pytest.mark.parametrize("name", LCC_CASES)
def test_largest_connected_component_matches_reference(name):
  case = load_golden(f"dtc_getLargestCC__{name}")
  largest = postprocess.largest_connected_component(case["in_segmentation"])
  assert largest.dtype == bool and largest.shape == case["in_segmentation"].shape
  np.testing.assert_array_equal(largest.astype(np.uint8), case["out_largest_cc"])


def test_largest_connected_component_of_empty_mask_is_empty():
  # The reference asserts on an all-zero mask (golden `empty_behaviour`); jaxseg returns it unchanged.
  assert load_golden("dtc_getLargestCC__empty_behaviour")["meta"]["behaviour_on_all_zero_input"][
      "raises"] == "AssertionError"
  largest = postprocess.largest_connected_component(np.zeros((5, 6, 7), np.uint8))
  assert largest.dtype == bool and largest.shape == (5, 6, 7) and not largest.any()


def test_largest_connected_component_2d_uses_8_connectivity():
  mask = np.zeros((6, 6), np.uint8)
  mask[0, 0] = mask[1, 1] = mask[2, 2] = 1  # a diagonal: one 8-connected component of 3.
  mask[5, 0:2] = 1  # a separate pair.
  expected = np.zeros((6, 6), bool)
  expected[[0, 1, 2], [0, 1, 2]] = True
  np.testing.assert_array_equal(postprocess.largest_connected_component(mask), expected)


def test_largest_connected_component_tie_goes_to_first_in_raster_order():
  mask = np.zeros((4, 7), bool)
  mask[3, 0:2] = True  # met second in raster order ...
  mask[0, 5:7] = True  # ... this one first.
  expected = np.zeros_like(mask)
  expected[0, 5:7] = True
  np.testing.assert_array_equal(postprocess.largest_connected_component(mask), expected)


def test_postprocesses_lcc_for_binary_tasks_only():
  assert postprocess.postprocesses(2, lcc=True) == ("raw", "lcc")
  assert postprocess.postprocesses(2, lcc=False) == ("raw",)
  assert postprocess.postprocesses(4, lcc=True) == ("raw",)


def test_postprocess_labels_keeps_dtype_and_empty_predictions():
  labels = np.zeros((5, 6), np.int32)
  labels[0, 0] = 1
  labels[2:5, 2:5] = 1
  assert postprocess.postprocess_labels(labels, "raw") is labels
  lcc = postprocess.postprocess_labels(labels, "lcc")
  assert lcc.dtype == np.int32 and lcc.sum() == 9 and lcc[0, 0] == 0
  empty = np.zeros((5, 6), np.int32)
  assert postprocess.postprocess_labels(empty, "lcc") is empty
  with pytest.raises(ValueError, match="postprocess"):
    postprocess.postprocess_labels(labels, "dilate")
