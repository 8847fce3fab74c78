"""Test setup: JAX's persistent compilation cache, so that re-runs skip XLA compilation; helpers shared by
the model and method tests (`fast_compile`, `learnable_batch`)."""

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
REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO / "configs"
LA_ROOT = pathlib.Path(os.environ.get(
    "JAXSEG_LA_ROOT", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "la2018"))
LA_MISSING = (f"LA 2018 data not found at {LA_ROOT}: set JAXSEG_LA_ROOT=/path/to/la2018 to run "
              "these tests")


def require_la_data() -> pathlib.Path:
  """LA_ROOT, when it holds the LA 2018 data (its train.list); else skips the calling test with
  LA_MISSING, the line saying how to point the tests at the data. Every test that reads the LA
  data calls this first; the skips all come from here, so pytest's -ra summary (pyproject addopts)
  prints the line once: "SKIPPED [n] tests/conftest.py:..: LA 2018 data not found at ..."."""
  if not (LA_ROOT / "train.list").is_file():
    pytest.skip(LA_MISSING)
  return LA_ROOT


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


@pytest.fixture(scope="module")
def fast_compile():
  """Most XLA optimisations off (as flax's examples do in tests): about half the CPU compile time.

  A module takes it with `pytestmark = pytest.mark.usefixtures("fast_compile")`.
  """
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def two_stream_batch(image_l, label_l, image_u):
  """The training batch of labeled images (B_l, *patch, C), their labels (B_l, *patch) and
  unlabeled images (B_u, *patch, C). Tests build batches only here, so that a change of the batch
  layout changes one function."""
  import numpy as np
  from jaxseg.data.batches import Batch
  channels = image_l.shape[-1]
  return Batch(labeled={"image": image_l, "label": label_l,
                        "modality_mask": np.ones((image_l.shape[0], channels), bool)},
               unlabeled={"image": image_u,
                          "modality_mask": np.ones((image_u.shape[0], channels), bool)})


def prediction_inputs(images):
  """The inputs of `method.predict` for images (B, *patch, C), all modalities present."""
  import numpy as np
  return {"image": images, "modality_mask": np.ones((images.shape[0], images.shape[-1]), bool)}


def predict_probs(method, state, images):
  """`method.predict` on images (B, *patch, C): {view: probabilities}. Tests call predict only
  here, so that a change of the prediction inputs changes one function."""
  return method.predict(state, prediction_inputs(images))


def learnable_batch(patch, b_l: int = 2, b_u: int = 2, seed: int = 0):
  """A fake two-stream batch a segmenter can fit: the label is the image thresholded at 0.3."""
  import numpy as np
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(b_l + b_u, *patch, 1)).astype(np.float32)
  label = (image[..., 0] > 0.3).astype(np.int32)
  return two_stream_batch(image[:b_l], label[:b_l], image[b_l:])


def small_config(method, num_classes: int = 2, **overrides):
  """The default `config.data` and `method`'s default config with a V-Net of base width 4."""
  import ml_collections
  from jaxseg.config_blocks import data_block
  c = ml_collections.ConfigDict()
  c.data = data_block()
  c.data.num_classes = num_classes
  c.method = method.default_config()
  c.method.model.n_filters = 4
  c.method.update(overrides)
  return c


def jit_init(method, config, batch, seed: int = 0):
  """`method.init` under jit (one compile instead of op-by-op dispatch)."""
  return jax.jit(lambda key: method.init(key, config, batch))(jax.random.key(seed))


def run_steps(train_step, state, batch, num_steps: int, first_key: int = 10) -> list:
  """[(state after step t, metrics of step t as floats)] of one jitted step, keys first_key + t."""
  step = jax.jit(train_step)
  out = []
  for t in range(num_steps):
    state, metrics = step(state, batch, jax.random.key(first_key + t))
    out.append((state, {k: float(v) for k, v in metrics.items()}))
  return out


def load_config_file(path):
  """The module of a config file, loaded by path (configs/ is not a package on sys.path)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# A 2D supervised run small enough to train in seconds on CPU, for the tests that run
# `python -m jaxseg.main` in a subprocess (with SUBPROCESS_ENV: the test compilation cache, CPU).
TINY_RUN = ["--config", "configs/supervised.py:synthetic2d",
            "--config.data.synthetic.num_cases=8", "--config.data.synthetic.shape=(32,32)",
            "--config.data.num_labeled=2", "--config.data.num_validation=2",
            "--config.data.patch_size=(16,16)", "--config.method.model.features=(4,8)",
            "--config.train.log_every=5", "--config.eval.num_figure_cases=1"]
SUBPROCESS_ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=_CACHE,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2", JAX_PLATFORMS="cpu")


def tiny_run_command(workdir, *extra) -> list:
  """`python -m jaxseg.main` with TINY_RUN in `workdir`, then `extra` flags."""
  import sys
  return [sys.executable, "-m", "jaxseg.main", *TINY_RUN, "--workdir", str(workdir), *extra]


def run_tiny(workdir, *extra):
  """Runs `tiny_run_command` from the repository root; the CompletedProcess (text output)."""
  import subprocess
  return subprocess.run(tiny_run_command(workdir, *extra), cwd=REPO, env=SUBPROCESS_ENV,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  """Runs the test body in float32, or in float64 with JAX's x64 mode scoped to this test only (the
  loss tests' precisions)."""
  import jax.numpy as jnp
  with jax.enable_x64(request.param == "float64"):
    yield jnp.dtype(request.param)


@pytest.fixture
def x64():
  """JAX's x64 mode for the duration of one test."""
  with jax.enable_x64(True):
    yield


def write_msd_task(root: pathlib.Path, name: str, prefix: str, cases, affine, modalities,
                   labels) -> pathlib.Path:
  """A Medical Segmentation Decathlon task folder at `root`: imagesTr/<prefix>_<i:03d>.nii.gz
  ((*spatial, M) images), labelsTr/ (the labels) and dataset.json naming the modalities and
  labels. `cases` are (image, label) pairs."""
  import json  # pylint: disable=import-outside-toplevel
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  pairs = []
  for i, (image, label) in enumerate(cases):
    for folder, data in (("imagesTr", image), ("labelsTr", label)):
      (root / folder).mkdir(parents=True, exist_ok=True)
      nib.save(nib.Nifti1Image(data, affine), root / folder / f"{prefix}_{i:03d}.nii.gz")
    pairs.append({"image": f"./imagesTr/{prefix}_{i:03d}.nii.gz",
                  "label": f"./labelsTr/{prefix}_{i:03d}.nii.gz"})
  (root / "dataset.json").write_text(json.dumps({
      "name": name, "modality": {str(i): m for i, m in enumerate(modalities)},
      "labels": {str(i): label for i, label in enumerate(labels)},
      "numTraining": len(pairs), "training": pairs}))
  return root
