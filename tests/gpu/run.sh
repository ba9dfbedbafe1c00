#!/usr/bin/env bash
# One prepared GPU check (NVIDIA GPU with torch + triton installed; FlashInfer >= 0.7.2 optional:
# without it the FlashInfer rows are skipped and the Triton kernel is checked alone).
#   bash tests/gpu/run.sh            # results in $OUT (default results/gpu-<date>)
# Needs only this working tree (no pip install of the package: PYTHONPATH points at it).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-results/gpu-$(date +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; python -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1; } > "$OUT/env.txt" 2>&1
timeout 240 python tests/gpu/check_kernels.py > "$OUT/check.txt" 2>&1; check=$?
timeout 240 python -m sglang_tpla.bench.kernels --out "$OUT/bench.jsonl" > "$OUT/bench.md" 2> "$OUT/bench.log"; bench=$?
cat "$OUT/env.txt" "$OUT/check.txt" "$OUT/bench.md"
echo "check exit $check, bench exit $bench; results in $OUT"
exit $(( check || bench ))
