#!/usr/bin/env bash
# Local CPU demo of PD disaggregation with the built-in tiny DeepSeek model:
#   1 exact-MLA prefill node (TP=$PREFILL_TP) -> 1 TPLA decode node (TP=$DECODE_TP, g=$G)
#   -> sglang_router (PD mode), mooncake over loopback TCP.
# Starts everything, waits for each health check, sends two requests through the router,
# prints them, then stops exactly the processes it started.  Logs: $LOG_DIR.
#
#   bash launch/cpu_demo.sh                      # defaults below
#   PREFILL_TP=2 bash launch/cpu_demo.sh --hold  # keep serving until Ctrl-C
# Extra arguments go to `python -m sglang_tpla.pd_launch` (see its --help: ports, transform, ...).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$repo/run.sh" env)"
export SGLANG_TPLA_CPU_MEM_GB="${SGLANG_TPLA_CPU_MEM_GB:-1}"   # KV budget per rank on the CPU platform
exec "$venv/bin/python" -m sglang_tpla.pd_launch --demo \
    --prefill-tp "${PREFILL_TP:-1}" --decode-tp "${DECODE_TP:-2}" --g "${G:-2}" \
    --transform "${TRANSFORM:-hadamard}" --log-dir "${LOG_DIR:-$repo/pd-demo-logs}" \
    --prefill-args "--dtype float32" --decode-args "--dtype float32" "$@"
