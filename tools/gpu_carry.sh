#!/usr/bin/env bash
# The carry kit of a GPU session: what the lent GPU machine lacks, ready to travel with the
# working tree (it has no network; see README "Benchmarks").
#
#   tools/gpu_carry.sh OFFICIAL_GIT_DIR      # or BIREFNET_OFFICIAL_GIT=DIR tools/gpu_carry.sh
#
# OFFICIAL_GIT_DIR is a git clone (or bare git dir) of the official BiRefNet repo holding
# commit 25cb930. The script
#   1. downloads into .whl/ (git-ignored) the wheels the machine lacks, for CPython 3.12 on
#      manylinux x86_64, without dependencies: ml_collections (our configs), grain and the
#      runtime dependencies of it that the machine lacks (array_record, portpicker,
#      importlib_resources), kornia + kornia_rs (the official model's Laplacian);
#   2. writes `git archive` of the official commit 25cb930 into .official/ (git-ignored), with
#      its full hash in .official/COMMIT;
#   3. checks that what travels (the tracked files + .whl + .official) stays under 64 MiB;
#   4. prints the remote command (under 2,000 characters) and the folders to carry.
#
# CARRY_PYTHON_VERSION=3.11 CARRY_WHL_DIR=/tmp/whl311 downloads the cp311 variants elsewhere (to
# prove the set on a machine whose Python is 3.11; the device's is 3.12). Everything else the session imports is on the
# device already (its package list: jax 0.11.2, flax, optax, orbax-checkpoint, torch 2.11,
# torchvision 0.26, timm, einops, opencv-python-headless, huggingface-hub, absl-py, pyyaml, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
OFFICIAL_GIT="${1:-${BIREFNET_OFFICIAL_GIT:-}}"
OFFICIAL_COMMIT=25cb930
PY_VERSION="${CARRY_PYTHON_VERSION:-3.12}"
WHL_DIR="${CARRY_WHL_DIR:-.whl}"
OFFICIAL_DIR=.official
LIMIT_MIB=64
# One version of each: two versions of a package stop the whole install on the device.
PACKAGES=(
  ml_collections==1.1.0
  grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 importlib_resources==7.1.0
  kornia==0.9.0 kornia_rs==0.2.0
)
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done

if [ -z "$OFFICIAL_GIT" ]; then
  echo "usage: tools/gpu_carry.sh OFFICIAL_GIT_DIR (a clone of ZhengPeng7/BiRefNet)" >&2
  exit 2
fi

echo "== wheels for CPython $PY_VERSION (manylinux x86_64) into $WHL_DIR/"
rm -rf "$WHL_DIR"
mkdir -p "$WHL_DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp "${PLATFORMS[@]}" -d "$WHL_DIR" "${PACKAGES[@]}"
ls -1 "$WHL_DIR"

echo "== official BiRefNet $OFFICIAL_COMMIT into $OFFICIAL_DIR/"
rm -rf "$OFFICIAL_DIR"
mkdir -p "$OFFICIAL_DIR"
git --git-dir="$(git -C "$OFFICIAL_GIT" rev-parse --absolute-git-dir 2>/dev/null || echo "$OFFICIAL_GIT")" \
    archive --format=tar "$OFFICIAL_COMMIT" | tar -x -C "$OFFICIAL_DIR"
git --git-dir="$(git -C "$OFFICIAL_GIT" rev-parse --absolute-git-dir 2>/dev/null || echo "$OFFICIAL_GIT")" \
    rev-parse "$OFFICIAL_COMMIT^{commit}" >"$OFFICIAL_DIR/COMMIT"
for f in config.py loss.py models/birefnet.py; do
  [ -f "$OFFICIAL_DIR/$f" ] || { echo "error: $OFFICIAL_DIR/$f missing" >&2; exit 1; }
done

echo "== size of what travels"
tracked=$(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r cat 2>/dev/null | wc -c)
carried=$(cat "$WHL_DIR"/* | wc -c)
official=$(find "$OFFICIAL_DIR" -type f -print0 | xargs -0 cat | wc -c)
total=$((tracked + untracked + carried + official))
awk -v t="$tracked" -v u="$untracked" -v w="$carried" -v o="$official" -v s="$total" \
    -v l="$LIMIT_MIB" 'BEGIN { m = 1048576; printf "tracked %.1f MiB, untracked %.1f MiB, .whl %.1f MiB, .official %.1f MiB: %.1f MiB of %d\n", t / m, u / m, w / m, o / m, s / m, l }'
if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then
  echo "error: the carried set is over $LIMIT_MIB MiB" >&2
  exit 1
fi

COMMAND='python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash tools/gpu_session.sh'
echo "== carry: [\".whl\", \".official\"]"
echo "== remote command (${#COMMAND} characters; timeout_s 600):"
echo "$COMMAND"
