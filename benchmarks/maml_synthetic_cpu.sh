#!/usr/bin/env bash
# MAML against the nnU-Net baselines on the embedded multi-modal synthetic data (configs/maml.py),
# the same 300 steps, loss machinery, augmentation, sampler and optimiser for every run:
#   maml            configs/maml.py               4 branches, fusion, MA attention, joint head
#   early_fusion    configs/maml.py:early_fusion  one nnU-Net on the 4 modalities as channels
#   single_m<k>     configs/maml.py:single_modality --config.data.modalities=(k,)   one modality
# Each run trains from a clean `git archive` of HEAD, then is evaluated on the validation split
# (the last 4 of 24 volumes) with every modality subset (--config.eval.modalities=subsets; a
# single-modality network has one subset). Writes $OUT/<run>/ (workdir with eval_step300/) and
# $OUT/runs.log (commands, wall-clock, load).
#
#   bash benchmarks/maml_synthetic_cpu.sh /tmp/maml_runs [python]
set -euo pipefail
OUT=${1:?usage: maml_synthetic_cpu.sh OUT_DIR [python]}
PY=${2:-$(pwd)/.venv/bin/python}
COMMIT=$(git rev-parse --short HEAD)
mkdir -p "$OUT" && rm -rf "$OUT/src" && mkdir -p "$OUT/src"
git archive HEAD | tar -x -C "$OUT/src"
cd "$OUT/src"
echo "commit $COMMIT, python $PY, $(nproc) cores" | tee -a "$OUT/runs.log"

run() {  # name, then the config and overrides
  local name=$1; shift
  local t0=$(date +%s)
  echo "== $name: python -m jaxseg.main $* --workdir $OUT/$name (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/runs.log"
  "$PY" -m jaxseg.main "$@" --workdir "$OUT/$name" > "$OUT/$name.train.log" 2>&1
  local t1=$(date +%s)
  "$PY" -m jaxseg.main "$@" --workdir "$OUT/$name" --mode eval --config.eval.modalities=subsets \
    > "$OUT/$name.eval.log" 2>&1
  local t2=$(date +%s)
  echo "   train+final eval $((t1 - t0)) s, subset eval $((t2 - t1)) s (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/runs.log"
}

run maml --config configs/maml.py
run early_fusion --config configs/maml.py:early_fusion
for k in 0 1 2 3; do
  run "single_m$k" --config configs/maml.py:single_modality "--config.data.modalities=($k,)"
done
echo "done $(date -u)" | tee -a "$OUT/runs.log"
