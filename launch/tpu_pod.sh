#!/usr/bin/env bash
# A jaxseg job on a Cloud TPU VM slice: every worker runs the same command (multi-controller JAX).
#
#   launch/tpu_pod.sh TPU_NAME ZONE -- python -m jaxseg.main --config configs/dtc.py:la8 \
#       --config.data.root=/mnt/data/la2018 --workdir /mnt/runs/dtc_la8
#
# Steps: (1) create the TPU VM slice TPU_NAME in ZONE unless it exists (ACCELERATOR_TYPE,
# RUNTIME_VERSION); (2) copy this checkout's committed HEAD (`git archive`) to every worker and
# install it with jax[tpu] into ~/jaxseg_venv; (3) run the command on all workers at once, with
# --config.train.distributed.mode=on appended to a `jaxseg.main` command (JAX finds the pod's
# coordinator, process count and index itself).
#
# Expects:
#   - gcloud installed and authenticated, with a project set (`gcloud config set project ...`) that
#     has TPU quota in ZONE;
#   - the data root and the --workdir at the same path on every worker, the workdir on storage that
#     all workers share (e.g. a Filestore/NFS mount or a gcsfuse-mounted bucket): each worker writes
#     its part of every checkpoint there, process 0 the logs and reports. Mount them with
#     SETUP_COMMAND, which runs on every worker before the job;
#   - the global batch (config data.batch_labeled and data.batch_unlabeled) divisible by the number
#     of TPU chips (cores on v2/v3) in the slice; the trainer refuses it otherwise.
#
# Environment:
#   ACCELERATOR_TYPE  slice type for a new TPU VM (default v4-32: 4 workers x 4 chips)
#   RUNTIME_VERSION   TPU VM software version for a new TPU VM (default tpu-ubuntu2204-base)
#   SETUP_COMMAND     shell command run on every worker before the job (e.g. mounting storage)
#   DRY_RUN=1         print the gcloud commands instead of running them
set -euo pipefail

if [[ $# -lt 4 || "$3" != "--" ]]; then
  echo "usage: $0 TPU_NAME ZONE -- COMMAND..." >&2
  exit 2
fi
tpu_name=$1 zone=$2
shift 3
accelerator_type=${ACCELERATOR_TYPE:-v4-32}
runtime_version=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
repo=$(cd "$(dirname "$0")/.." && pwd)

command=("$@")
for arg in "${command[@]}"; do
  if [[ "$arg" == jaxseg.main ]]; then
    command+=(--config.train.distributed.mode=on)
    break
  fi
done

run() {
  if [[ "${DRY_RUN:-}" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" --worker=all --command "$1"
}

if [[ "${DRY_RUN:-}" == 1 ]] || ! gcloud compute tpus tpu-vm describe "$tpu_name" --zone "$zone" > /dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$tpu_name" --zone "$zone" \
    --accelerator-type "$accelerator_type" --version "$runtime_version"
fi

archive=$(mktemp /tmp/jaxseg_XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$tpu_name":jaxseg.tar.gz --zone "$zone" --worker=all
on_all_workers "rm -rf ~/jaxseg && mkdir ~/jaxseg && tar -xzf ~/jaxseg.tar.gz -C ~/jaxseg && \
python3 -m venv ~/jaxseg_venv && ~/jaxseg_venv/bin/pip install -q -e ~/jaxseg 'jax[tpu]'"
if [[ -n "${SETUP_COMMAND:-}" ]]; then
  on_all_workers "$SETUP_COMMAND"
fi
on_all_workers "cd ~/jaxseg && . ~/jaxseg_venv/bin/activate && $(printf '%q ' "${command[@]}")"
