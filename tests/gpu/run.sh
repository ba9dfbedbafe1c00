#!/usr/bin/env bash
# The prepared GPU check of the TPLA decode kernel (and its multi-query extend form): numerics vs the fp32 reference, CUDA-graph
# capture/replay, per-rank attention benchmark, decode-layer benchmark.  Needs only python3 with
# torch + triton and this working tree (no sglang, no flashinfer, no network, no pip install).
#
#   bash tests/gpu/run.sh              # on an NVIDIA GPU; results in $OUT (default results/gpu-<date>)
#   bash tests/gpu/run.sh --dry-run    # on a CPU: builds every case, launches nothing on a GPU
#
# $OUT gets: env.txt, log.txt (everything printed), results.jsonl (one JSON line per case),
# report.md (tables + what each number means).  Exit code 0 only when every case passed.
# Knobs (environment): PYTHON (python3), WORKERS (phase-1 processes, 6 on a GPU, 2 in the dry run), T1 / T2 (phase time
# limits in s, 110 / 115; 250 / 250 with --dry-run), REP_MS (do_bench_cudagraph rep, 15).
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=""
for a in "$@"; do
    case "$a" in
        --dry-run) DRY="--dry-run" ;;
        *) echo "usage: bash tests/gpu/run.sh [--dry-run]" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
if [ -n "$DRY" ]; then
    OUT="${OUT:-results/tmp/gpu-dry-$(date +%Y%m%d-%H%M%S)}"
    WORKERS="${WORKERS:-2}"
    T1="${T1:-250}"; T2="${T2:-250}"  # the GPU limits below do not fit an interpreter on a loaded CPU
    export TRITON_INTERPRET=1
else
    OUT="${OUT:-results/gpu-$(date +%Y%m%d-%H%M)}"
    WORKERS="${WORKERS:-6}"
    unset TRITON_INTERPRET
fi
T1="${T1:-110}"; T2="${T2:-115}"; REP_MS="${REP_MS:-15}"
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
LOG="$OUT/log.txt"; : > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONHASHSEED=0
t0=$(date +%s)
say() { echo "$*" | tee -a "$LOG"; }

{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  mode: ${DRY:-gpu}  workers: $WORKERS"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed paths"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    nproc 2>/dev/null | sed 's/^/cpus: /'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

# run_worker PHASE SHARD LIMIT: restarts a worker that lost its CUDA context (exit 3) up to twice
run_worker() {
    local phase=$1 shard=$2 limit=$3 tries=0 rc=0 start=$(date +%s)
    while :; do
        local left=$(( limit - ($(date +%s) - start) ))
        [ "$left" -le 5 ] && { say "[p$phase $shard] out of time"; return 124; }
        timeout -k 5 "$left" "$PY" tests/gpu/gpucheck.py run --phase "$phase" --shard "$shard" --out "$OUT" --rep-ms "$REP_MS" $DRY 2>&1 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
        if [ "$rc" = 3 ] && [ $tries -lt 2 ]; then tries=$((tries + 1)); say "[p$phase $shard] restarting (CUDA context lost)"; continue; fi
        [ "$rc" = 124 ] && say "[p$phase $shard] TIMEOUT after ${limit}s: cases not reached are reported missing"
        return "$rc"
    done
}

say "== phase 1: correctness cases + kernel warm-up, $WORKERS workers (limit ${T1}s)"
pids=()
for ((i = 0; i < WORKERS; i++)); do
    run_worker 1 "$i/$WORKERS" "$T1" & pids+=($!)
done
rc1=0
for p in "${pids[@]}"; do wait "$p" || rc1=$?; done
say "== phase 1 done after $(( $(date +%s) - t0 ))s (rc $rc1)"

say "== phase 2: ceilings, attention and layer timings, 1 process (limit ${T2}s)"
run_worker 2 "0/1" "$T2"; rc2=$?
say "== phase 2 done after $(( $(date +%s) - t0 ))s (rc $rc2)"

"$PY" tests/gpu/gpucheck.py report --out "$OUT" $DRY 2>&1 | tee -a "$LOG"
rc3=${PIPESTATUS[0]}
say "== total $(( $(date +%s) - t0 ))s; phase rc $rc1/$rc2, report rc $rc3; results in $OUT"
[ "$rc1" = 0 ] && [ "$rc2" = 0 ] && [ "$rc3" = 0 ]
