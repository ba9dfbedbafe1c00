#!/usr/bin/env bash
# Local CPU demo: the shipped trained tiny DeepSeek-V3 (tests/assets/tiny-deepseek-trained) served with
# PD disaggregation, text in, text out:
#   1 exact-MLA prefill node (TP=$PREFILL_TP) -> 1 TPLA decode node (TP=$DECODE_TP, g=$G)
#   -> sglang_router (PD mode), mooncake over loopback TCP.
# Starts everything, waits for each health check, sends the text prompts through the router,
# prints each prompt and its completion, then stops exactly the processes it started.  Logs: $LOG_DIR.
#
#   bash launch/cpu_demo.sh                                  # defaults below (3 built-in prompts)
#   bash launch/cpu_demo.sh --prompt "Return the value of"   # your own prompt(s) (repeatable)
#   bash launch/cpu_demo.sh --hold                           # keep serving until Ctrl-C
# Variables: PREFILL_TP (1), DECODE_TP (2), G (decode TP), TRANSFORM (hadamard), MAX_NEW_TOKENS (24),
# LOG_DIR (pd-demo-logs), MODEL (the trained model).  Other flags: python -m sglang_tpla.demo --help.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$repo/run.sh" env)"
export SGLANG_TPLA_CPU_MEM_GB="${SGLANG_TPLA_CPU_MEM_GB:-1}"   # KV budget per rank on the CPU platform
exec "$venv/bin/python" -m sglang_tpla.demo \
    --model-path "${MODEL:-$repo/tests/assets/tiny-deepseek-trained}" \
    --prefill-tp "${PREFILL_TP:-1}" --decode-tp "${DECODE_TP:-2}" ${G:+--g "$G"} \
    --transform "${TRANSFORM:-hadamard}" --max-new-tokens "${MAX_NEW_TOKENS:-24}" \
    --log-dir "${LOG_DIR:-$repo/pd-demo-logs}" "$@"
