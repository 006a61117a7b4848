#!/usr/bin/env bash
# One GPU session: everything a CPU cannot measure, side by side with the official model.
#
#   tools/gpu_session.sh             # on the GPU machine (one H200): about 9.5 minutes
#   tools/gpu_session.sh --dry-run   # the same steps on CPU, small sizes (CI runs this)
#
# Results go to $OUT when set, else ./gpu_results/: rows.jsonl (one JSON line per row, written
# the moment it is measured), table.md (the Markdown table, written at the end) and session.log.
# The official BiRefNet code is read from $BIREFNET_OFFICIAL, else ./.official (tools/gpu_carry.sh
# puts commit 25cb930 there); without it the official rows say why they were skipped.
#
# Time budget (one H200; the device runs one command for at most 10 minutes, and the wheels'
# install before this script takes ~15 s of it). Each step runs under its own `timeout`, capped
# by what is left of SESSION_SECONDS, so a slow step costs its own rows and no others:
#   env        30 s  versions, nvidia-smi, imports of the official code, 5 s scatter-add probe
#   deform     80 s  256² x 64 -> 256, k = 1, 3, 7: ours f32 + bf16, plain conv, torchvision;
#                    24 small jit compiles (~1-2 s each) and the timed calls
#   infer     150 s  SwinL 1024² bf16, B = 1 and 4: official eager first (~20 s), then ours with
#                    einsum and sdpa (cuDNN) attention: 4 compiles of ~25 s and the timed calls
#   train     190 s  SwinL 1024² bf16 train step, B = 2 then 4, remat off and on, official first;
#                    4 compiles of ~35 s (a row that does not fit is an OOM row)
#   max_batch rest   the largest train batch with remat: <= 3 compiles, first guess from the
#                    train step's peak memory (skipped when under 20 s are left)
#   table       5 s
# 30 + 80 + 150 + 190 = 450 s, + max_batch up to SESSION_SECONDS (540 s) = 9 min, + the install.
# The compile times are estimates (no GPU figure exists yet): the rows record the real ones.
set -u
cd "$(dirname "$0")/.."
DRY_RUN=""
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN="--dry-run"; fi
OUT_DIR="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
SESSION_SECONDS="${SESSION_SECONDS:-540}"
SCALE=1
if [ -n "$DRY_RUN" ]; then
  # The step budgets are the GPU's; a shared 2-core CPU compiling the dry run's small programs
  # can be several times slower (it is the code path that is tested here, not the time).
  SCALE=4
  SESSION_SECONDS=$((SESSION_SECONDS * SCALE))
  # CPU: one train-step compile is reused by the max-batch search through JAX's disk cache.
  export JAX_PLATFORMS=cpu
  if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
    JAX_COMPILATION_CACHE_DIR=$(mktemp -d)
    trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
  fi
  export JAX_COMPILATION_CACHE_DIR
fi
START=$(date +%s)
LOG="$OUT_DIR/session.log"

run_step() {  # run_step NAME SECONDS: one step under its own timeout, capped by the session's
  local name=$1 budget=$(($2 * SCALE)) left now t0 rc
  now=$(date +%s)
  left=$((SESSION_SECONDS - (now - START)))
  if [ "$budget" -gt "$left" ]; then budget=$left; fi
  if [ "$budget" -lt 20 ]; then
    "$PYTHON" tools/gpu_session.py step_end --out "$OUT_DIR" --step "$name" --rc 125 \
        --seconds 0 >>"$LOG" 2>&1
    echo "== $name: skipped, ${left} s left" | tee -a "$LOG"
    return
  fi
  echo "== $name (timeout ${budget} s)" | tee -a "$LOG"
  t0=$(date +%s)
  timeout -k 10 "$budget" "$PYTHON" tools/gpu_session.py "$name" --out "$OUT_DIR" $DRY_RUN \
      2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  "$PYTHON" tools/gpu_session.py step_end --out "$OUT_DIR" --step "$name" --rc "$rc" \
      --seconds "$(($(date +%s) - t0))" >>"$LOG" 2>&1
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s" | tee -a "$LOG"
}

run_step env 30
run_step deform 80
run_step infer 150
run_step train 190
run_step max_batch "$SESSION_SECONDS"  # capped by what is left
"$PYTHON" tools/gpu_session.py table --out "$OUT_DIR" 2>>"$LOG"
echo "total $(($(date +%s) - START)) s; rows in $OUT_DIR/rows.jsonl, table in $OUT_DIR/table.md"
