#!/usr/bin/env bash
# The GPU measurements of issue 5 in one go (about 8 min on an H100/H200, no data needed):
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
#
# 1. the supervised V-Net train step on the LA protocol's shapes (batch 4 of 112x112x80) against
#    the same step in PyTorch (--torch), the evaluation of one LA-sized volume at stride 18/18/4 and
#    a sweep over 20 volumes of LA-like sizes (compilations included), the metrics against medpy;
# 2. the same sweep with one compilation per volume size (eval.shape_bucket = 0), for comparison;
# 3. DTC's train step on the LA protocol's shapes in float32 and in bfloat16;
# Expects jaxseg importable (and torch, medpy for 1.); each result also goes to OUT_DIR/*.json.
set -uo pipefail
out=${1:-bench_out}
mkdir -p "$out"
bench() { python -m jaxseg.bench "$@"; echo; }
bench --config configs/supervised_vnet.py:la8 --steps 50 --eval_volume 183,140,88 --eval_sweep 20 \
  --torch --medpy --json "$out/supervised_vnet.json"
bench --config configs/supervised_vnet.py:la8 --steps 5 --eval_volume none --eval_sweep 20 \
  --config.eval.shape_bucket=0 --json "$out/supervised_vnet_no_buckets.json"
bench --config configs/dtc.py:la8 --steps 50 --eval_volume none --json "$out/dtc_fp32.json"
bench --config configs/dtc.py:la8 --steps 50 --eval_volume none \
  --config.method.model.dtype=bfloat16 --json "$out/dtc_bf16.json"

# 4. The trainer's steps/s with the host data pipeline and with the training volumes on the device
#    (data.on_device), DTC on 24 synthetic volumes of LA size (the last progress line is the rate of
#    steps 201-300, after compilation).
steps=${TRAINER_STEPS:-300}
for on_device in False True; do
  echo "== DTC trainer, data.on_device=$on_device"
  python -m jaxseg.main --config configs/dtc.py --workdir "$out/dtc_trainer_$on_device" \
    --config.method.model.n_filters=16 --config.data.patch_size="${PATCH:-(112,112,80)}" \
    --config.data.synthetic.shape="${VOLUME:-(180,140,88)}" --config.data.num_validation=0 \
    --config.train.num_steps="$steps" --config.train.log_every=$((steps / 3)) \
    --config.train.checkpoint_every=100000 --config.data.on_device=$on_device 2>&1 | grep "^step\|on the device"
done
