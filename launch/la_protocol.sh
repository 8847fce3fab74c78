#!/usr/bin/env bash
# The LA 2018 comparison of the LA family on one host: each method's :la8 (or :la16) preset, one after
# the other, last-iteration evaluation on the validation split (8 cases of train.list drawn with
# data.validation_seed 0 from the non-labeled ones; the runs of record used the last 8, which
# --config.data.validation=last restores). The intensity question's runs: la_intensity_runs.sh in
# benchmarks/.
#
#   bash launch/la_protocol.sh /path/to/la2018 [la8|la16] [runs_dir] [method ...]
#
# Methods default to: supervised_vnet dtc sassnet mean_teacher uamt. Each run writes
# <runs_dir>/<method>_<preset>/ (eval/summary.json, eval/metrics.csv per case, split.json) and its log.
# A killed run resumes from its last checkpoint when the script is run again.
set -euo pipefail
root=${1:?usage: la_protocol.sh LA_ROOT [la8|la16] [RUNS_DIR] [METHOD ...]}
preset=${2:-la8}
runs=${3:-runs}
shift $(( $# < 3 ? $# : 3 ))
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(supervised_vnet dtc sassnet mean_teacher uamt)
mkdir -p "$runs"
for m in "${methods[@]}"; do
  wd="$runs/${m}_${preset}"
  echo "=== $m:$preset -> $wd"
  start=$(date +%s)
  python -m jaxseg.main --config "configs/$m.py:$preset" --config.data.root="$root" --workdir "$wd" \
    2>&1 | tee -a "$wd.log"
  echo "$m:$preset wall-clock $(( $(date +%s) - start )) s" | tee -a "$wd.log"
done
