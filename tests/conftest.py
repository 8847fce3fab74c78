"""Test setup: JAX's persistent compilation cache, so that re-runs skip XLA compilation."""

import os
import pathlib

import jax
import pytest

_CACHE = os.environ.get("JAXSEG_TEST_CACHE",
                        str(pathlib.Path.home() / ".cache" / "jaxseg" / "jax_test_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

GOLDEN = pathlib.Path(__file__).parent / "golden"
LA_ROOT = pathlib.Path(os.environ.get(
    "JAXSEG_LA_ROOT", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "la2018"))


def load_golden(name: str) -> dict:
  """Loads tests/golden/<name>.npz (copied from shared/reference/golden) into a dict."""
  import json
  import numpy as np
  with np.load(GOLDEN / f"{name}.npz", allow_pickle=False) as f:
    out = {k: f[k] for k in f.files}
  if "meta_json" in out:
    out["meta"] = json.loads(str(out.pop("meta_json")))
  return out


@pytest.fixture
def golden():
  return load_golden
