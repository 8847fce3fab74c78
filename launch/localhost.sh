#!/usr/bin/env bash
# N processes of one jaxseg job on this machine, joined by jax.distributed over 127.0.0.1.
#
#   launch/localhost.sh NUM_PROCESSES COMMAND...
#   launch/localhost.sh 2 python -m jaxseg.main --config configs/dtc.py --workdir runs/dtc_2proc
#
# Expects: COMMAND runs a jaxseg job (`python -m jaxseg.main ...`) with the package importable, and
# the same working directory for every process (checkpoints and reports go to one shared --workdir).
# Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT, JAX_NUM_PROCESSES and JAX_PROCESS_ID,
# which the trainer reads (config train.distributed.mode "auto"). Process 0 is the coordinator.
#
# Environment:
#   PORT                coordinator port (default: a free one)
#   LOG_DIR             where process_<i>.log go (default: a new folder under /tmp); process 0's
#                       output is also shown on the console
#   GPUS_PER_PROCESS    on a multi-GPU machine, give process i the GPUs i*G .. i*G+G-1
#                       (JAX_LOCAL_DEVICE_IDS); unset: every process sees what JAX finds
#                       (on CPU: one device each, or --xla_force_host_platform_device_count in XLA_FLAGS)
#
# Exit status: 0 when every process succeeded; otherwise the first failure's status, after the
# other processes are stopped (a process left alone would wait for its peers until JAX times out).
set -uo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES COMMAND..." >&2
  exit 2
fi
num_processes=$1
shift
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d /tmp/jaxseg_localhost.XXXXXX)}
mkdir -p "$log_dir"
echo "localhost.sh: $num_processes processes, coordinator 127.0.0.1:$port, logs in $log_dir" >&2

pids=()
for ((i = 0; i < num_processes; i++)); do
  (
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$num_processes" JAX_PROCESS_ID="$i"
    if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
      export JAX_LOCAL_DEVICE_IDS=$(seq -s, $((i * GPUS_PER_PROCESS)) $((i * GPUS_PER_PROCESS + GPUS_PER_PROCESS - 1)))
    fi
    if ((i == 0)); then
      exec "$@" > >(tee "$log_dir/process_$i.log") 2>&1
    else
      exec "$@" > "$log_dir/process_$i.log" 2>&1
    fi
  ) &
  pids+=($!)
done

# Poll (portable to bash 4): the first process that fails stops the rest.
status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    wait "$pid"
    rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "localhost.sh: a process failed (exit $rc); stopping the others; logs in $log_dir" >&2
      kill "${pids[@]}" 2>/dev/null
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  ((${#running[@]})) && sleep 0.5
done
exit $status
