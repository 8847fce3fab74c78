"""jaxseg.data.base.resolve_modalities: a modality selection (names or indices) as channel indices."""

import pytest

from jaxseg.data.base import DataError, resolve_modalities

NAMES = ("FLAIR", "T1w", "t1gd", "T2w")


def test_names_are_matched_without_case_and_kept_in_the_given_order():
  assert resolve_modalities(("t2w", "flair"), NAMES, "data.modalities") == (3, 0)
  assert resolve_modalities(["T1GD"], NAMES, "data.modalities") == (2,)


def test_indices_as_ints_or_digit_strings():
  assert resolve_modalities((0, 2), NAMES, "k") == (0, 2)
  assert resolve_modalities(("1", " 3"), NAMES, "k") == (1, 3)


@pytest.mark.parametrize("selection, match", [
    (("T3",), r"config eval\.modalities: unknown modality 'T3'.*FLAIR"),
    ((4,), r"config eval\.modalities: channel index 4 is out of range"),
    (("flair", 0), r"config eval\.modalities: .* names a channel twice"),
    ((), r"config eval\.modalities: no modality selected"),
])
def test_bad_selections_name_the_key_and_the_channels(selection, match):
  with pytest.raises(DataError, match=match):
    resolve_modalities(selection, NAMES, "eval.modalities")
