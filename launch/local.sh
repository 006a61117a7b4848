#!/usr/bin/env bash
# N training processes on this machine, joined by jax.distributed over the loopback interface.
#
#   launch/local.sh N --config configs/quickstart.py --workdir runs/mp [more main flags...]
#
# Uses: testing multi-host code on one machine (CPU: every process gets its own forced CPU
# devices), and multi-GPU boxes run as one process per GPU (or per group of GPUs) via
# CUDA_VISIBLE_DEVICES. One process driving all GPUs of a box (plain `python -m
# birefnet_jax.main`) is the usual and faster setup; this script is for when you want processes.
#
# Environment knobs (all optional):
#   PYTHON                   interpreter (default: python3)
#   LAUNCH_PROGRAM           what each process runs (default: "-m birefnet_jax.main"); the
#                            distributed flags are appended after the given arguments
#   LOCAL_PLATFORM           auto | cpu | gpu (auto: gpu when nvidia-smi lists GPUs)
#   CPU_DEVICES_PER_PROCESS  forced CPU devices per process on CPU (default 2)
#   COORDINATOR_PORT         loopback port of process 0's coordinator (default: a free one)
#   LAUNCH_TIMEOUT           seconds before everything is stopped (default 0: no limit)
#   EXIT_GRACE               once one process has ended successfully, seconds the others get
#                            to end too (default 300); a process that fails stops all at once
#   KILL_GRACE               seconds between SIGTERM and SIGKILL when stopping (default 60:
#                            SIGTERM makes the trainer save a checkpoint first)
#
# Output lines carry a "[process i]" tag. The exit status is the first failing process's
# status (124 on LAUNCH_TIMEOUT, 1 when processes outlive EXIT_GRACE), 0 when all succeed.
set -u -o pipefail

usage() { echo "usage: $0 NUM_PROCESSES [birefnet_jax.main flags...]" >&2; exit 2; }
[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
NUM=$1
shift

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
read -r -a PROGRAM <<< "${LAUNCH_PROGRAM:--m birefnet_jax.main}"
PLATFORM=${LOCAL_PLATFORM:-auto}
CPU_DEVICES=${CPU_DEVICES_PER_PROCESS:-2}
LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT:-0}
EXIT_GRACE=${EXIT_GRACE:-300}
KILL_GRACE=${KILL_GRACE:-60}

# --- Devices: GPUs split evenly over the processes, or forced CPU devices. -------------------
if [[ "$PLATFORM" == auto ]]; then
  if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q '^GPU'; then
    PLATFORM=gpu
  else
    PLATFORM=cpu
  fi
fi
GPUS=()
if [[ "$PLATFORM" == gpu ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=',' read -r -a GPUS <<< "$CUDA_VISIBLE_DEVICES"
  else
    mapfile -t GPUS < <(nvidia-smi -L | awk '/^GPU/ {sub(":", "", $2); print $2}')
  fi
  if (( ${#GPUS[@]} == 0 || ${#GPUS[@]} % NUM != 0 )); then
    echo "$0: ${#GPUS[@]} GPU(s) cannot be split evenly over $NUM processes" >&2
    exit 2
  fi
elif [[ "$PLATFORM" != cpu ]]; then
  echo "$0: LOCAL_PLATFORM must be auto, cpu or gpu, got '$PLATFORM'" >&2
  exit 2
fi

PORT=${COORDINATOR_PORT:-$("$PYTHON" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')} || exit 2

# --- Start the processes. ---------------------------------------------------------------------
PIDS=()
for ((i = 0; i < NUM; i++)); do
  env_vars=(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1)
  if [[ "$PLATFORM" == gpu ]]; then
    per=$(( ${#GPUS[@]} / NUM ))
    mine=$(IFS=','; echo "${GPUS[*]:$((i * per)):$per}")
    env_vars+=(CUDA_VISIBLE_DEVICES="$mine")
  else
    env_vars+=(JAX_PLATFORMS=cpu
               XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$CPU_DEVICES")
  fi
  env "${env_vars[@]}" "$PYTHON" "${PROGRAM[@]}" "$@" \
      --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM" --process_id="$i" \
      > >(sed -u "s/^/[process $i] /") 2>&1 &
  PIDS+=($!)
done
echo "[launch] $NUM processes on $PLATFORM, coordinator 127.0.0.1:$PORT, pids ${PIDS[*]}"

# --- Supervise: the first failure (or the time limits) stops everyone. -------------------------
declare -A DONE=()   # pid -> exit status, once reaped

running() { local n=0 p; for p in "${PIDS[@]}"; do [[ -z "${DONE[$p]+x}" ]] && n=$((n + 1)); done; echo $n; }

FAILED=   # index of the first process that exited with a non-zero status
reap() {  # records the status of every process that has ended (sets FAILED on a failure)
  local i p rc
  for i in "${!PIDS[@]}"; do
    p=${PIDS[$i]}
    [[ -n "${DONE[$p]+x}" ]] && continue
    # A child that has ended but is not waited for yet still answers kill -0 (zombie): ask ps.
    if ! kill -0 "$p" 2> /dev/null || [[ "$(ps -o stat= -p "$p" 2> /dev/null)" == Z* ]]; then
      wait "$p"; rc=$?
      DONE[$p]=$rc
      echo "[launch] process $i exited with status $rc" >&2
      if (( rc != 0 )) && [[ -z "$FAILED" ]]; then FAILED=$i; fi
    fi
  done
}

stop_all() {  # SIGTERM (the trainer saves and stops), then SIGKILL after KILL_GRACE
  local p t
  for p in "${PIDS[@]}"; do [[ -z "${DONE[$p]+x}" ]] && kill -TERM "$p" 2> /dev/null; done
  for ((t = 0; t < KILL_GRACE * 5; t++)); do
    reap
    (( $(running) == 0 )) && return
    sleep 0.2
  done
  for p in "${PIDS[@]}"; do
    if [[ -z "${DONE[$p]+x}" ]]; then
      echo "[launch] killing pid $p" >&2
      kill -KILL "$p" 2> /dev/null
      wait "$p" 2> /dev/null
      DONE[$p]=137
    fi
  done
}

finish() { stop_all; wait; exit "$1"; }   # the final wait lets the [process i] taggers drain

trap 'echo "[launch] interrupted: stopping all processes" >&2; finish 130' INT TERM

start=$SECONDS
first_success=
while :; do
  reap
  if [[ -n "$FAILED" ]]; then
    echo "[launch] process $FAILED failed: stopping the others" >&2
    finish "${DONE[${PIDS[$FAILED]}]}"
  fi
  (( $(running) == 0 )) && { wait; exit 0; }
  if (( $(running) < NUM )); then
    first_success=${first_success:-$SECONDS}
    if (( SECONDS - first_success > EXIT_GRACE )); then
      echo "[launch] processes still running ${EXIT_GRACE}s after another one ended: stopping" >&2
      finish 1
    fi
  fi
  if (( LAUNCH_TIMEOUT > 0 && SECONDS - start > LAUNCH_TIMEOUT )); then
    echo "[launch] LAUNCH_TIMEOUT of ${LAUNCH_TIMEOUT}s reached: stopping all processes" >&2
    finish 124
  fi
  sleep 0.5
done
