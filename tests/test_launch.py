"""The CPU PD demo (launch/cpu_demo.sh): the trained model served as exact-MLA prefill -> TPLA decode -> router,
text prompts in, text completions out; it stops every process it started (found as descendants of a
child subreaper, not by command line).  Small settings: 2 prompts, 8 tokens."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


# Runs the command as a child subreaper (prctl PR_SET_CHILD_SUBREAPER): every process the command starts,
# whatever its session / process group (the script uses setsid) or command line, is re-parented to this
# wrapper when its parent exits instead of escaping to init.  After the command ends the wrapper lists
# what is still alive under it (one JSON line), kills and reaps it, and exits with the command's status.
_SUBREAPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
rc = subprocess.run(sys.argv[1:]).returncode
time.sleep(2)
me, left = str(os.getpid()), []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        continue
    fields = stat.rsplit(")", 1)[1].split()
    if fields[1] == me and fields[0] != "Z":
        left.append(f"{pid} (pgid {fields[2]}, sid {fields[3]}): {cmd[:160]}")
print("SUBREAPER_LEFT " + json.dumps(left), flush=True)
for line in left:
    try:
        os.kill(int(line.split()[0]), signal.SIGKILL)
    except OSError:
        pass
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
sys.exit(rc)
"""


PROMPTS = ("Open file and return a stream.", "Permission is hereby granted")


def test_cpu_demo_serves_text_and_shuts_down_cleanly(tmp_path):
    log_dir = tmp_path / "pd-demo"
    env = {**os.environ, "LOG_DIR": str(log_dir), "SGLANG_TPLA_CPU_MEM_GB": "1", "MAX_NEW_TOKENS": "8"}
    cmd = [sys.executable, "-c", _SUBREAPER, "bash", str(REPO / "launch" / "cpu_demo.sh")]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    prompts = re.findall(r"^\[demo\] prompt: (.*)$", out.stdout, re.M)
    completions = re.findall(r"^\[demo\] completion: (.*)$", out.stdout, re.M)
    assert prompts == [repr(p) for p in PROMPTS], out.stdout[-3000:]
    assert len(completions) == 2 and any(re.search(r"[A-Za-z]{2}", c) for c in completions), out.stdout[-3000:]
    assert "[demo] stopped" in out.stdout
    for name in ("prefill0.log", "decode.log", "router.log"):
        assert (log_dir / name).stat().st_size > 0
    assert "TPLA on: attn TP 2, g=2" in (log_dir / "decode.log").read_text()
    assert "PD prefill node, folded transform hadamard" in (log_dir / "prefill0.log").read_text()
    left = re.search(r"^SUBREAPER_LEFT (.*)$", out.stdout, re.M)
    assert left and json.loads(left.group(1)) == [], f"processes left behind: {left and left.group(1)}"
