"""The kernel benchmark runs on CPU (a smoke test of the PyTorch path, not a performance claim)."""

import json
import subprocess
import sys


def test_kernel_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "bench.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "sglang_tpla.bench.kernels", "--models", "kimi-k2", "--tp", "2", "--contexts", "64",
         "--batch", "1", "--repeat", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| kimi-k2 | 2 | 64 |" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    timed = {(x["variant"], x["heads"], x["d_ckv"]) for x in rows if "variant" in x}
    assert timed == {("mla", 32, 512), ("tpla", 64, 256)}  # MLA-TP: H/tp heads over 512; TPLA: all heads over 256
    assert all(x["ms"] > 0 and x["GBps"] > 0 for x in rows if "variant" in x)
