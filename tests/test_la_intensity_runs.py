"""benchmarks/la_intensity_runs.sh (the device runs of the LA intensity question) lists the commands
of the issue in order: DRY_RUN prints them without running anything. The script itself was run end
to end on a CPU at tiny size (benchmarks/results/la_intensity_runs_cpu.md)."""

import os
import re
import subprocess

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "la_intensity_runs.sh"


def commands(tmp_path, **env):
  out = tmp_path / "out"
  result = subprocess.run(["bash", str(SCRIPT), "/data/la2018", str(out)], cwd=REPO,
                          env=dict(os.environ, DRY_RUN="1", WORK_DIR=str(tmp_path / "w"), **env),
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  lines = [l[2:] for l in (out / "commands.log").read_text().splitlines() if l.startswith("+ ")]
  assert lines == [l[2:] for l in result.stdout.splitlines() if l.startswith("+ ")]
  # Each run's time limit is what is left of the budget: a second may have passed.
  limits = [int(m.group(1)) for m in map(re.compile(r"^timeout (\d+) ").match, lines) if m]
  budget = int(env.get("BUDGET_S", 690))
  assert limits and all(budget - 5 <= t <= budget for t in limits)
  return [re.sub(r"^timeout \d+ ", "timeout T ", l) for l in lines]


def test_the_issue_runs_in_order(tmp_path):
  lines = commands(tmp_path)
  w = tmp_path / "w"
  main = "python -m jaxseg.main"
  root = "--config.data.on_device=True --config.data.root=/data/la2018"
  want = [
      f"timeout T {main} --config configs/supervised_vnet.py:la8 {root} --workdir "
      f"{w}/supervised_vnet_la8",
      f"python -m jaxseg.analyse --workdir {w}/supervised_vnet_la8 --eval eval",
      f"timeout T {main} --config configs/dtc.py:la8 {root} --workdir {w}/dtc_la8",
      f"python -m jaxseg.analyse --workdir {w}/dtc_la8 --eval eval",
  ]
  for name in ("supervised_vnet_la8", "dtc_la8"):
    config = "configs/" + name.replace("_la8", ".py:la8")
    want += [f"timeout T {main} --config {config} {root} --workdir {w}/{name} --mode eval "
             "--config.eval.intensity_rescale=labeled",
             f"python -m jaxseg.analyse --workdir {w}/{name} --eval eval_rescaled"]
  for name in ("supervised_vnet_la8", "dtc_la8"):
    config = "configs/" + name.replace("_la8", ".py:la8")
    want += [f"timeout T {main} --config {config} {root} --workdir {w}/{name} --mode eval "
             "--config.data.validation=last",
             f"python -m jaxseg.analyse --workdir {w}/{name} --eval eval_last",
             f"timeout T {main} --config {config} {root} --workdir {w}/{name} --mode eval "
             "--config.data.validation=last --config.eval.intensity_rescale=labeled",
             f"python -m jaxseg.analyse --workdir {w}/{name} --eval eval_last_rescaled"]
  want += [f"timeout T {main} --config configs/dtc.py:la8_robust {root} --workdir "
           f"{w}/dtc_la8_robust",
           f"python -m jaxseg.analyse --workdir {w}/dtc_la8_robust --eval eval",
           f"timeout T {main} --config configs/dtc.py:la8_robust {root} --workdir "
           f"{w}/dtc_la8_robust --mode eval --config.data.validation=last",
           f"python -m jaxseg.analyse --workdir {w}/dtc_la8_robust --eval eval_last"]
  assert lines == want


def test_synthetic_form_and_options(tmp_path):
  lines = commands(tmp_path, RUNS="dtc:", ROBUST_RUNS="dtc:", OLD_BLOCK="0", ON_DEVICE="False",
                   ROBUST_EXTRA="--config.data.zscore=True", EXTRA="--config.train.num_steps=2",
                   PY="py", BUDGET_S="100")
  assert len(lines) == 6
  assert lines[0].endswith("py -m jaxseg.main --config configs/dtc.py "
                           "--config.data.on_device=False --config.data.root=/data/la2018 "
                           f"--config.train.num_steps=2 --workdir {tmp_path}/w/dtc")
  assert lines[4].endswith("--config.train.num_steps=2 --config.data.zscore=True --workdir "
                           f"{tmp_path}/w/dtc_robust")
