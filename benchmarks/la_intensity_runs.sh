#!/usr/bin/env bash
# The device runs of the LA intensity question (docs/la_protocol.md, "Why the :la8 runs of record
# fail on a few validation cases"), in one go, within a time budget:
#
#   bash benchmarks/la_intensity_runs.sh LA_ROOT OUT_DIR
#
# 1. supervised_vnet:la8 and dtc:la8 with their presets' seeded random validation split (8 cases
#    drawn from the 72 non-labeled ones, data.validation_seed 0); after each, the per-case table
#    (python -m jaxseg.analyse);
# 2. the same checkpoints evaluated again after the label-free rescale of every validation image to
#    the labeled images' mean and std (--mode eval --config.eval.intensity_rescale=labeled, kept as
#    eval_rescaled/), and its per-case table: a failed case that recovers there fails because of
#    its intensity scale. The seed-0 draw holds none of the compressed volumes, so the checkpoints
#    are also evaluated on the old validation block (the last 8 of train.list), as stored
#    (eval_last/) and rescaled (eval_last_rescaled/); OLD_BLOCK=0 skips that;
# 3. if the budget leaves time for a whole run: dtc:la8_robust (per-case z-score + on-device
#    intensity augmentation) on the same split, and its table.
#
# The workdirs (checkpoints included) go to WORK_DIR; OUT_DIR receives the small files of every run:
# config.json, split.json, each evaluation's metrics.csv, summary.json and case_analysis.csv, the
# logs, and commands.log (every command with its wall-clock seconds). A run killed by the budget
# resumes from its last checkpoint when the script is run again with the same WORK_DIR.
#
# Environment (defaults): PY (python), BUDGET_S (690: the whole script's seconds), WORK_DIR
# (/tmp/la_intensity_runs), ON_DEVICE (True: data.on_device, the same batches as the host pipeline
# bit for bit), RUNS ("supervised_vnet:la8 dtc:la8"), ROBUST_RUNS ("dtc:la8_robust"), ROBUST_MIN_S
# (330: the least time left to start them), EXTRA (flags added to every jaxseg.main command),
# ROBUST_EXTRA (flags added to the robust runs only; their workdir names end in _robust),
# DRY_RUN (1: print the commands only). LA_ROOT "-" runs without --config.data.root: the synthetic
# presets, how the script is tried on a CPU at tiny size (benchmarks/results/la_intensity_runs_cpu.md):
#   RUNS="supervised_vnet: dtc:" ROBUST_RUNS="dtc:" ROBUST_EXTRA="--config.data.zscore=True
#   --config.data.intensity_augment.enabled=True" EXTRA="--config.train.num_steps=2 ..." \
#   bash benchmarks/la_intensity_runs.sh - OUT_DIR
set -uo pipefail
root=${1:?usage: la_intensity_runs.sh LA_ROOT OUT_DIR}
out=${2:?usage: la_intensity_runs.sh LA_ROOT OUT_DIR}
PY=${PY:-python}
budget=${BUDGET_S:-690}
work=${WORK_DIR:-/tmp/la_intensity_runs}
on_device=${ON_DEVICE:-True}
runs=${RUNS-supervised_vnet:la8 dtc:la8}
robust_runs=${ROBUST_RUNS-dtc:la8_robust}
robust_min=${ROBUST_MIN_S:-330}
read -r -a extra <<< "${EXTRA:-}"
read -r -a robust_extra <<< "${ROBUST_EXTRA:-}"
dry=${DRY_RUN:-}
mkdir -p "$out" "$work"
exec 3>&1
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }

run() {  # Runs "$@" (unless DRY_RUN), logging the command and its seconds.
  local t0=$(date +%s)
  # To fd 3 (the console): the command's own output may be redirected to a log.
  echo "+ $*" | tee -a "$out/commands.log" >&3
  [ -n "$dry" ] && return 0
  "$@"
  local rc=$?
  echo "  rc $rc, $(( $(date +%s) - t0 )) s" | tee -a "$out/commands.log" >&3
  return $rc
}

flags_of() {  # config:preset [robust] -> the jaxseg.main flags of its run, and its name
  local m=${1%%:*} preset=${1#*:}
  local cfg="configs/$m.py${preset:+:$preset}"
  local name="${m}${preset:+_$preset}"
  flags=(--config "$cfg" --config.data.on_device="$on_device")
  [ "$root" = "-" ] || flags+=(--config.data.root="$root")
  flags+=("${extra[@]}")
  if [ -n "${2:-}" ]; then
    flags+=("${robust_extra[@]}")
    [[ $name == *robust* ]] || name="${name}_robust"
  fi
  flags+=(--workdir "$work/$name")
  run_name=$name
}

copy_back() {  # The small files of workdir $1 into $out/<name>/.
  local wd=$1 dest="$out/$(basename "$1")"
  [ -n "$dry" ] && return 0
  mkdir -p "$dest"
  for f in config.json split.json train_log.csv validation_log.csv; do
    [ -f "$wd/$f" ] && cp "$wd/$f" "$dest/"
  done
  for d in "$wd"/eval*/; do
    [ -d "$d" ] || continue
    mkdir -p "$dest/$(basename "$d")"
    for f in metrics.csv summary.json case_analysis.csv; do
      [ -f "$d/$f" ] && cp "$d/$f" "$dest/$(basename "$d")/"
    done
  done
}

train_and_analyse() {  # config:preset [robust]
  flags_of "$1" "${2:-}"
  local t=$(left)
  if [ "$t" -le 30 ]; then echo "skip $1: ${t} s left" | tee -a "$out/commands.log"; return 1; fi
  run timeout "$t" "$PY" -m jaxseg.main "${flags[@]}" > "$out/$run_name.train.log" 2>&1 || {
    echo "$1: training stopped (budget or error), see $run_name.train.log" | tee -a "$out/commands.log"
    tail -3 "$out/$run_name.train.log"; copy_back "$work/$run_name"; return 1; }
  # The raw / LCC table of the final evaluation.
  [ -n "$dry" ] || sed -n '/mean ± std/,/^results in/p' "$out/$run_name.train.log" | grep -v '^results in'

  run "$PY" -m jaxseg.analyse --workdir "$work/$run_name" --eval eval \
    > "$out/$run_name.analysis.txt" 2>&1
  [ -n "$dry" ] || cat "$out/$run_name.analysis.txt"
  copy_back "$work/$run_name"
}

eval_and_analyse() {  # config:preset LABEL ROBUST [flags]: --mode eval of its last checkpoint with
  # the flags, the folder it writes renamed eval_LABEL (so that the evaluations do not overwrite
  # each other), and the per-case table of it. ROBUST: "robust" for a robust run, else "".
  flags_of "$1" "$3"; local label=$2; shift 3
  local t=$(left)
  if [ "$t" -le 20 ]; then echo "skip $label of $run_name: ${t} s left" | tee -a "$out/commands.log"; return 1; fi
  run timeout "$t" "$PY" -m jaxseg.main "${flags[@]}" --mode eval "$@" \
    > "$out/$run_name.$label.log" 2>&1 || { tail -3 "$out/$run_name.$label.log"; return 1; }
  if [ -z "$dry" ]; then
    local written=$(ls -td "$work/$run_name"/eval_step*/ | head -1)
    rm -rf "$work/$run_name/eval_$label" && mv "$written" "$work/$run_name/eval_$label"
  fi
  run "$PY" -m jaxseg.analyse --workdir "$work/$run_name" --eval "eval_$label" \
    > "$out/$run_name.${label}_analysis.txt" 2>&1
  [ -n "$dry" ] || cat "$out/$run_name.${label}_analysis.txt"
  copy_back "$work/$run_name"
}

echo "la_intensity_runs: commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${budget} s, $(date -u)" \
  | tee -a "$out/commands.log"
trained=()
for spec in $runs; do
  train_and_analyse "$spec" && trained+=("$spec")
done
# 2. The label-free rescale on the run's own validation cases; then the old validation block (the
#    last 8 of train.list, which holds three of the six volumes stored with the most compressed
#    intensities) as stored and rescaled: the supervised V-Net never saw those cases; for the
#    semi-supervised methods they were unlabeled training cases (their labels never read).
for spec in "${trained[@]}"; do
  eval_and_analyse "$spec" rescaled "" --config.eval.intensity_rescale=labeled
done
if [ "${OLD_BLOCK:-1}" = 1 ]; then
  for spec in "${trained[@]}"; do
    eval_and_analyse "$spec" last "" --config.data.validation=last
    eval_and_analyse "$spec" last_rescaled "" --config.data.validation=last \
      --config.eval.intensity_rescale=labeled
  done
fi
for spec in $robust_runs; do
  if [ "$(left)" -lt "$robust_min" ] && [ -z "$dry" ]; then
    echo "skip $spec: $(left) s left, a whole run needs about $robust_min" | tee -a "$out/commands.log"
    continue
  fi
  train_and_analyse "$spec" robust || continue
  [ "${OLD_BLOCK:-1}" = 1 ] && eval_and_analyse "$spec" last robust --config.data.validation=last
done
echo "done in $(( $(date +%s) - start )) s" | tee -a "$out/commands.log"
