#!/usr/bin/env bash
# The NVIDIA check (issue 13 item 5): install MLX's CUDA build, then lorad doctor, plan, selftest,
# bench P4 (daemon vs direct mflux-train, same GPU) and the engine tests, each bounded, all output
# under $OUT (default /tmp/lorad-gpu-check-out). Sized for ~8 minutes (BUDGET_S): the engine tests get what
# is left. See bench/gpu/README.md for the two-command wheel transfer this expects offline.
#
# Install, in this order of preference:
#   WHEELS=dir   (default: .whl/part2 when it exists) offline: join mlx-cuda-13 from its two parts
#                (the first in $PART1_DIR, default /tmp/lorad-whl), pip install --no-deps --target
#                /tmp/lorad-site, PYTHONPATH. torch/transformers/tokenizers must already be there.
#   otherwise    `uv sync --extra cuda` (a machine with a registry, e.g. a DGX).
#   INSTALL=skip use python3 as found (to try the script itself on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
OUT=${OUT:-/tmp/lorad-gpu-check-out}
BUDGET_S=${BUDGET_S:-480}
PART1_DIR=${PART1_DIR:-/tmp/lorad-whl}
WHEELS=${WHEELS:-}
[ -z "$WHEELS" ] && [ -d .whl/part2 ] && WHEELS=.whl/part2
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# stage NAME SECONDS CMD...: run CMD bounded, log to $OUT/NAME.log, one line in summary.txt.
stage() {
    local name=$1 limit=$2; shift 2
    local cap; cap=$(left); [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -le 5 ]; then
        echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"; return 0
    fi
    local t0=$(date +%s)
    echo "== $name (at most ${limit}s): $*"
    # SIGINT at the bound: pytest and P4 then stop the daemons they started.
    timeout -s INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local note=""; [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ] && note=" (timed out)"
    echo "$name: rc=$rc$note ${limit}s-bound $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
    tail -n 15 "$OUT/$name.log"
    return 0
}

{
    echo "date: $(date -u +%FT%TZ)"; echo "host: $(uname -a)"; echo "commit: $(git rev-parse HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not available"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

install_offline() {
    set -e
    local big part1
    part1=$(ls "$PART1_DIR"/mlx_cuda_13-*.whl.part-aa)
    big=$(basename "${part1%.part-aa}")
    cat "$part1" "$WHEELS/$big.part-ab" > "/tmp/$big"
    (cd /tmp && sha256sum -c "$REPO/$WHEELS/$big.sha256")
    python3 -m pip install --no-deps --no-index --target /tmp/lorad-site "/tmp/$big" "$WHEELS"/*.whl
}
export -f install_offline
export REPO WHEELS PART1_DIR

if [ "${INSTALL:-}" = skip ]; then
    PY=(python3)
elif [ -n "$WHEELS" ]; then
    stage install 120 bash -c install_offline
    export PYTHONPATH="/tmp/lorad-site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    PY=(python3)
else
    stage install 300 uv sync --extra cuda
    PY=(uv run --extra cuda python)
fi
LORAD=("${PY[@]}" -m daemon.cli)
ASSETS=$(mktemp -d /tmp/lorad-gpu-check.XXXX)

stage backend 120 "${PY[@]}" -c "import mlx.core as mx; print('mlx', mx.__version__, 'default device', mx.default_device(), 'cuda', mx.cuda.is_available()); print(mx.device_info() if hasattr(mx, 'device_info') else '')"
stage doctor 60 "${LORAD[@]}" --assets "$ASSETS" doctor
stage plan 60 "${LORAD[@]}" --assets "$ASSETS" plan --images 20
stage selftest 150 "${LORAD[@]}" --assets "$ASSETS" selftest --clean
stage p4 $(( $(left) - 200 > 240 ? 240 : $(left) - 200 )) "${PY[@]}" bench/p4_engine_overhead.py --rounds "${P4_ROUNDS:-1}" --steps "${P4_STEPS:-20}"
grep -h '^RESULT' "$OUT/p4.log" >> "$SUMMARY" 2>/dev/null
stage engine_tests $(( $(left) - 10 )) "${PY[@]}" -m pytest tests/e2e/test_mflux_training.py -v -p no:cacheprovider --timeout 240
grep -hE '^(PASSED|FAILED|ERROR)|passed|failed' "$OUT/engine_tests.log" | tail -n 30 >> "$SUMMARY"
echo "total: $(( $(date +%s) - START ))s of a ${BUDGET_S}s budget" | tee -a "$SUMMARY"
rm -rf "$ASSETS"
