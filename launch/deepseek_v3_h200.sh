#!/usr/bin/env bash
# PD deployment template: DeepSeek-V3 (or Kimi-K2) on H200 nodes.
#   1 prefill node, exact MLA, TP=8       (bash launch/deepseek_v3_h200.sh prefill   on $PREFILL_HOST)
#   1 decode node, TPLA g=$G, TP=8        (bash launch/deepseek_v3_h200.sh decode    on $DECODE_HOST)
#   sglang_router in PD mode              (bash launch/deepseek_v3_h200.sh router    anywhere)
#   stop what this script started here    (bash launch/deepseek_v3_h200.sh stop)
#   health of the three parts             (bash launch/deepseek_v3_h200.sh status)
#
# Every setting is a variable (defaults below).  Both nodes need `pip install sglang-tpla`
# (the prefill node sends each decode rank its latent slice; TPLA stays off there) and
# mooncake-transfer-engine.  Both fold the same transform at load; alternatively convert the
# checkpoint once (python -m sglang_tpla.convert --src ... --dst ... --transform hadamard)
# and set CONVERTED=1 so the prefill node needs no TPLA options.  With TRANSFORM=pca both
# nodes must read the same calibration file (the decode node refuses any other basis).
#
# NOT RUN on GPUs by this project yet: the CPU demo (launch/cpu_demo.sh) and the CI tests
# run the same roles on one machine; this file only adds multi-host/RDMA parameters.
set -euo pipefail
MODEL=${MODEL:-/models/DeepSeek-V3}
PREFILL_HOST=${PREFILL_HOST:-10.0.0.1}
DECODE_HOST=${DECODE_HOST:-10.0.0.2}
ROUTER_HOST=${ROUTER_HOST:-0.0.0.0}
PREFILL_PORT=${PREFILL_PORT:-30000}
DECODE_PORT=${DECODE_PORT:-30001}
ROUTER_PORT=${ROUTER_PORT:-8000}
BOOTSTRAP_PORT=${BOOTSTRAP_PORT:-8998}
PREFILL_TP=${PREFILL_TP:-8}
DECODE_TP=${DECODE_TP:-8}
G=${G:-2}
TRANSFORM=${TRANSFORM:-hadamard}
SEED=${SEED:-0}
CALIBRATION=${CALIBRATION:-}
CONVERTED=${CONVERTED:-0}
TRANSFER_BACKEND=${TRANSFER_BACKEND:-mooncake}     # mooncake (RDMA) or mooncake_tcp
IB_DEVICE=${IB_DEVICE:-}                           # e.g. mlx5_0,mlx5_1,... for RDMA
PAGE_SIZE=${PAGE_SIZE:-64}
PREFILL_EXTRA=${PREFILL_EXTRA:-"--mem-fraction-static 0.85 --chunked-prefill-size 16384"}
DECODE_EXTRA=${DECODE_EXTRA:-"--mem-fraction-static 0.88 --max-running-requests 256"}
LOG_DIR=${LOG_DIR:-$PWD/tpla-pd-logs}
PYTHON=${PYTHON:-python3}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-1800}

mkdir -p "$LOG_DIR"
opts() {  # the "tpla" JSON override; $1 = decode|prefill
    local o="\"transform\": \"$TRANSFORM\", \"seed\": $SEED"
    [ -n "$CALIBRATION" ] && o="$o, \"calibration\": \"$CALIBRATION\""
    [ "$1" = decode ] && o="$o, \"g\": $G"
    echo "{\"tpla\": {$o}}"
}
common=(--model-path "$MODEL" --page-size "$PAGE_SIZE" --disaggregation-transfer-backend "$TRANSFER_BACKEND" --trust-remote-code)
[ -n "$IB_DEVICE" ] && common+=(--disaggregation-ib-device "$IB_DEVICE")

start() {  # name, health url, command...
    local name=$1 url=$2; shift 2
    if [ -f "$LOG_DIR/$name.pid" ] && kill -0 "$(cat "$LOG_DIR/$name.pid")" 2>/dev/null; then
        echo "$name already running (pid $(cat "$LOG_DIR/$name.pid"))"; return 0
    fi
    echo "[$name] $*" | tee "$LOG_DIR/$name.cmd"
    setsid "$@" >"$LOG_DIR/$name.log" 2>&1 < /dev/null &
    echo $! > "$LOG_DIR/$name.pid"
    local t=0
    until curl -sf "$url" >/dev/null; do
        kill -0 "$(cat "$LOG_DIR/$name.pid")" 2>/dev/null || { echo "[$name] exited; see $LOG_DIR/$name.log"; tail -20 "$LOG_DIR/$name.log"; exit 1; }
        [ $t -ge "$STARTUP_TIMEOUT" ] && { echo "[$name] not healthy after ${STARTUP_TIMEOUT}s"; exit 1; }
        sleep 5; t=$((t + 5))
    done
    echo "[$name] healthy at $url (log $LOG_DIR/$name.log)"
}

case "${1:-}" in
prefill)
    extra=()
    [ "$CONVERTED" = 1 ] || [ "$TRANSFORM" = none ] || extra=(--json-model-override-args "$(opts prefill)")
    # shellcheck disable=SC2086
    start prefill "http://$PREFILL_HOST:$PREFILL_PORT/health" "$PYTHON" -m sglang.launch_server "${common[@]}" \
        --tp "$PREFILL_TP" --host "$PREFILL_HOST" --port "$PREFILL_PORT" --disaggregation-mode prefill \
        --disaggregation-bootstrap-port "$BOOTSTRAP_PORT" "${extra[@]}" $PREFILL_EXTRA ;;
decode)
    # shellcheck disable=SC2086
    start decode "http://$DECODE_HOST:$DECODE_PORT/health" "$PYTHON" -m sglang.launch_server "${common[@]}" \
        --tp "$DECODE_TP" --host "$DECODE_HOST" --port "$DECODE_PORT" --disaggregation-mode decode \
        --decode-attention-backend tpla --json-model-override-args "$(opts decode)" $DECODE_EXTRA ;;
router)
    start router "http://127.0.0.1:$ROUTER_PORT/health" "$PYTHON" -m sglang_router.launch_router --pd-disaggregation \
        --prefill "http://$PREFILL_HOST:$PREFILL_PORT" "$BOOTSTRAP_PORT" --decode "http://$DECODE_HOST:$DECODE_PORT" \
        --host "$ROUTER_HOST" --port "$ROUTER_PORT" --policy round_robin ;;
stop)  # exactly the process groups this script started on this host
    for name in router decode prefill; do
        f="$LOG_DIR/$name.pid"; [ -f "$f" ] || continue
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM -- "-$pid" 2>/dev/null || true
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
            kill -KILL -- "-$pid" 2>/dev/null || true
            echo "[$name] stopped"
        fi
        rm -f "$f"
    done ;;
status)
    for u in "prefill http://$PREFILL_HOST:$PREFILL_PORT/health" "decode http://$DECODE_HOST:$DECODE_PORT/health" \
             "router http://127.0.0.1:$ROUTER_PORT/health"; do
        set -- $u; curl -sf "$2" >/dev/null && echo "$1: healthy" || echo "$1: down"
    done ;;
*) echo "usage: $0 prefill|decode|router|stop|status   (settings: see the variables at the top)"; exit 2 ;;
esac
