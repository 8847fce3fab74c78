"""Tests of jaxseg.geometry: DTC `getLargestCC` golden outputs (skimage 26-connectivity) and edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_golden
from jaxseg import geometry

LCC_CASES = ["three_boxes", "corner_touch", "edge_touch_vs_singletons", "tie", "blobs"]


@pytest.mark.parametrize("name", LCC_CASES)
def test_largest_connected_component_matches_reference(name):
  case = load_golden(f"dtc_getLargestCC__{name}")
  largest = geometry.largest_connected_component(case["in_segmentation"])
  assert largest.dtype == bool and largest.shape == case["in_segmentation"].shape
  np.testing.assert_array_equal(largest.astype(np.uint8), case["out_largest_cc"])


def test_largest_connected_component_of_empty_mask_is_empty():
  # The reference asserts on an all-zero mask (golden `empty_behaviour`); jaxseg returns it unchanged.
  assert load_golden("dtc_getLargestCC__empty_behaviour")["meta"]["behaviour_on_all_zero_input"][
      "raises"] == "AssertionError"
  largest = geometry.largest_connected_component(np.zeros((5, 6, 7), np.uint8))
  assert largest.dtype == bool and largest.shape == (5, 6, 7) and not largest.any()


def test_largest_connected_component_2d_uses_8_connectivity():
  mask = np.zeros((6, 6), np.uint8)
  mask[0, 0] = mask[1, 1] = mask[2, 2] = 1  # a diagonal: one 8-connected component of 3.
  mask[5, 0:2] = 1  # a separate pair.
  expected = np.zeros((6, 6), bool)
  expected[[0, 1, 2], [0, 1, 2]] = True
  np.testing.assert_array_equal(geometry.largest_connected_component(mask), expected)


def test_largest_connected_component_tie_goes_to_first_in_raster_order():
  mask = np.zeros((4, 7), bool)
  mask[3, 0:2] = True  # met second in raster order ...
  mask[0, 5:7] = True  # ... this one first.
  expected = np.zeros_like(mask)
  expected[0, 5:7] = True
  np.testing.assert_array_equal(geometry.largest_connected_component(mask), expected)
