#!/usr/bin/env bash
# One entry point for a fresh machine.  Needs only python3 (>= 3.11).
#   bash run.sh main   set up (or reuse) the environment, then run the main job
#   bash run.sh test   set up (or reuse) the environment, then run the test suite
# The virtual environment lives outside the clone, keyed by the dependency pins in
# pyproject.toml, so a fresh clone with unchanged pins reuses it (sglang is ~11 GB).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cmd="${1:-main}"; shift || true

py="${PYTHON:-python3}"

# mooncake's non-CUDA transfer engine (PD disaggregation over TCP) links libibverbs.so.1 even
# when no RDMA device is used.  Install the Debian package when it is missing and we can.
if ! ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1'; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[run.sh] installing libibverbs1 (needed by mooncake's transfer engine)" >&2
        (apt-get install -y libibverbs1 || { apt-get update && apt-get install -y libibverbs1; }) >&2
    else
        echo "[run.sh] warning: libibverbs.so.1 not found; PD disaggregation tests need it (apt-get install libibverbs1)" >&2
    fi
fi
key="$("$py" - "$here/pyproject.toml" <<'PY'
import hashlib, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = sorted(p["dependencies"]) + sorted(d for v in p.get("optional-dependencies", {}).values() for d in v)
print(hashlib.sha256("\n".join(deps).encode()).hexdigest()[:12])
PY
)"
root="${SGLANG_TPLA_ENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/sglang-tpla}"
venv="$root/venv-$key"
if [ ! -f "$venv/.complete" ]; then
    echo "[run.sh] creating environment $venv (first time: ~10 min, ~11 GB)" >&2
    rm -rf "$venv"; mkdir -p "$root"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --upgrade pip >&2
    "$venv/bin/python" -m pip install -e "$here[test]" >&2
    touch "$venv/.complete"
else
    echo "[run.sh] reusing environment $venv" >&2
fi
# (Re)install this clone editable: cheap, and points the environment at this checkout.
"$venv/bin/python" -m pip install --no-deps --no-build-isolation -q -e "$here" >&2
# setuptools leaves <name>.egg-info in the clone; processes started from the clone would read
# its (possibly stale) entry points instead of the installed ones.
rm -rf "$here"/*.egg-info
export PATH="$venv/bin:$PATH"
cd "$here"
case "$cmd" in
    main) exec "$venv/bin/python" -m sglang_tpla "$@" ;;
    test) exec "$venv/bin/python" -m pytest "$@" ;;
    env)  echo "$venv" ;;
    *) echo "usage: bash run.sh main|test|env [args...]" >&2; exit 2 ;;
esac
