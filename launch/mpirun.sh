#!/usr/bin/env bash
# Multi-node training with Open MPI's mpirun: one process per host, each driving all GPUs of
# its host. Run from the repository root (the same path on every host, e.g. a shared home):
#
#   launch/mpirun.sh HOSTFILE --config configs/dis.py --workdir /shared/runs/dis [main flags...]
#
# HOSTFILE: one host per line ("node1 slots=1"); the first one runs process 0 and its
# coordinator (port COORDINATOR_PORT, default 12355, must be reachable from the others).
# --workdir must be on a file system every host sees. Environment knobs: PYTHON (default
# python3), COORDINATOR_PORT, and the XLA_* / NCCL_* variables below (all exported to the ranks).
set -euo pipefail

[[ $# -ge 1 && -f "$1" ]] || { echo "usage: $0 HOSTFILE [birefnet_jax.main flags...]" >&2; exit 2; }
HOSTFILE=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOSTS=$(awk 'NF && $1 !~ /^#/' "$HOSTFILE" | wc -l)
HEAD_NODE=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")

export JAX_COORDINATOR_ADDRESS="$HEAD_NODE:${COORDINATOR_PORT:-12355}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# birefnet_jax.main reads the process count and index from OMPI_COMM_WORLD_SIZE / _RANK and,
# with one rank per host, gives each process all its host's GPUs. --tag-output prefixes every
# line with the rank; mpirun stops all ranks when one fails.
exec mpirun -np "$HOSTS" --hostfile "$HOSTFILE" --map-by ppr:1:node --bind-to none --tag-output \
    -x JAX_COORDINATOR_ADDRESS -x XLA_PYTHON_CLIENT_MEM_FRACTION -x XLA_FLAGS -x NCCL_DEBUG \
    -x PYTHONPATH -x PYTHONUNBUFFERED -x PATH -x LD_LIBRARY_PATH \
    "${PYTHON:-python3}" -m birefnet_jax.main "$@"
