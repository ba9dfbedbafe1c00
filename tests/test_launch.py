"""The CPU PD demo (launch/cpu_demo.sh): the trained model served as exact-MLA prefill -> TPLA decode -> router,
text prompts in, text completions out; it stops every process it started.  Small settings: 2 prompts, 8 tokens."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd[:200]}")
    return found


PROMPTS = ("Open file and return a stream.", "Permission is hereby granted")


def test_cpu_demo_serves_text_and_shuts_down_cleanly(tmp_path):
    log_dir = tmp_path / "pd-demo"
    env = {**os.environ, "LOG_DIR": str(log_dir), "SGLANG_TPLA_CPU_MEM_GB": "1", "MAX_NEW_TOKENS": "8"}
    cmd = ["bash", str(REPO / "launch" / "cpu_demo.sh")]
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
    assert not _processes_mentioning(str(log_dir)), "processes left behind"
