"""The CPU PD launch demo (launch/cpu_demo.sh) runs end to end and stops every process it started."""

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


def test_cpu_demo_runs_and_shuts_down_cleanly(tmp_path):
    log_dir = tmp_path / "pd-demo"
    env = {**os.environ, "LOG_DIR": str(log_dir), "SGLANG_TPLA_CPU_MEM_GB": "1"}
    out = subprocess.run(["bash", str(REPO / "launch" / "cpu_demo.sh")], env=env, capture_output=True, text=True,
                         timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    served = re.findall(r"\[pd\] prompt \[.*\] -> \[([\d, ]+)\]", out.stdout)
    assert len(served) == 2 and all(len(s.split(",")) == 8 for s in served), out.stdout[-3000:]
    assert "[pd] stopped" in out.stdout
    for name in ("prefill0.log", "decode.log", "router.log"):
        assert (log_dir / name).stat().st_size > 0
    assert "TPLA on: attn TP 2, g=2" in (log_dir / "decode.log").read_text()
    assert "PD prefill node, folded transform hadamard" in (log_dir / "prefill0.log").read_text()
    assert not _processes_mentioning(str(log_dir)), "processes left behind"
