#!/usr/bin/env bash
# Multi-host on one machine: N trainer processes x M emulated CPU devices each, talking through a
# coordinator on 127.0.0.1 and gloo collectives. The same code path as a TPU pod or a GPU cluster
# (jax.distributed.initialize, per-host batch slices, a global mesh over every process's devices).
#
# Usage: launch/local_multiprocess.sh [TRAINER FLAGS...]
#   e.g. launch/local_multiprocess.sh --config configs/default.py:tiny --workdir /tmp/dpo_2x4
#
# Environment (defaults in brackets):
#   NUM_PROCESSES        processes to start [2]
#   DEVICES_PER_PROCESS  emulated CPU devices per process [4]
#   PORT                 coordinator port on 127.0.0.1 [a free one]
#   PYTHON               interpreter with dpo_jax installed [python]
#   LOG_DIR              where process_<i>.log go [a new temporary folder]
#   TIMEOUT_S            kill everything after this many seconds, 0 = never [0]
# Process 0's output streams to the terminal; every process's full output is in LOG_DIR. Exits with
# the first failing process's status (and stops the others), 0 when all succeed.
set -euo pipefail

usage() {
  awk 'NR == 1 { next } /^#SBATCH/ || !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PYTHON="${PYTHON:-python}"
TIMEOUT_S="${TIMEOUT_S:-0}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t dpo_jax_local.XXXXXX)}"
if [[ -z "${PORT:-}" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
mkdir -p "$LOG_DIR"

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"  # after any of yours
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
coordinator="127.0.0.1:$PORT"

echo "local_multiprocess: $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices, coordinator" \
  "$coordinator, logs in $LOG_DIR"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  log="$LOG_DIR/process_$i.log"
  cmd=("$PYTHON" -u -m dpo_jax.train --distributed --coordinator_address="$coordinator"
    --num_processes="$NUM_PROCESSES" --process_id="$i" "$@")
  if ((i == 0)); then
    "${cmd[@]}" > >(tee "$log") 2>&1 &
  else
    "${cmd[@]}" >"$log" 2>&1 &
  fi
  pids+=("$!")
done

# Poll rather than wait: a process that dies leaves the others blocked in a collective, so the first
# failure (or the timeout) stops everyone.
status=0
start=$SECONDS
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    else
      code=0
      wait "$pid" || code=$?
      if ((code != 0 && status == 0)); then
        status=$code
        echo "local_multiprocess: process $pid exited with status $code; stopping the others (logs in" \
          "$LOG_DIR)" >&2
        stop_all
      fi
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  if ((TIMEOUT_S > 0 && SECONDS - start > TIMEOUT_S && status == 0)); then
    echo "local_multiprocess: timed out after ${TIMEOUT_S}s; stopping every process (logs in $LOG_DIR)" >&2
    status=124
    stop_all
  fi
  if ((${#running[@]} > 0)); then
    sleep 1
  fi
done
trap - EXIT
exit "$status"
