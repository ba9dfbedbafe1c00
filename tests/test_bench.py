"""The kernel benchmark runs on CPU (a smoke test of the PyTorch path, not a performance claim)."""

import json
import subprocess
import sys

from sglang_tpla.bench.kernels import attention_cases, traffic


def test_kernel_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "bench.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "sglang_tpla.bench.kernels", "--models", "kimi-k2", "--tp", "2", "--contexts", "64",
         "--batch", "1", "--repeat", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| kimi-k2 | 2 | 1 | 64 | MLA |" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    timed = {(x["variant"], x["par"], x["heads"], x["d"], x["tokens"]) for x in rows}
    # MLA-TP: H/tp heads over 512; DCP=2: H*2/tp heads over half the tokens; TPLA g=2: the group's heads over 256
    assert timed == {("mla", 1, 32, 512, 64), ("dcp", 2, 64, 512, 32), ("tpla", 2, 64, 256, 64)}
    assert all(x["ms"] > 0 and x["GBps"] > 0 and x["speedup_vs_mla"] > 0 for x in rows)


def test_attention_shapes_per_rank():
    cases = {(c.model, c.tp, c.variant, c.par): c for c in attention_cases(batches=(8,), contexts=(4096,))}
    # DeepSeek-V3, TP=8: MLA 16 heads x 512; DCP4 64 heads over 1024 tokens; TPLA g=2 32 heads x 256, g=4 64 x 128
    assert (cases["deepseek-v3", 8, "mla", 1].heads, cases["deepseek-v3", 8, "mla", 1].d) == (16, 512)
    dcp = cases["deepseek-v3", 8, "dcp", 4]
    assert (dcp.heads, dcp.d, dcp.tokens) == (64, 512, 1024)
    assert (cases["deepseek-v3", 8, "tpla", 2].heads, cases["deepseek-v3", 8, "tpla", 2].d) == (32, 256)
    assert (cases["deepseek-v3", 8, "tpla", 4].heads, cases["deepseek-v3", 8, "tpla", 4].d) == (64, 128)
    # TP=2: g=4 and DCP=4 do not divide TP and are skipped; TPLA g=2 gives every rank all 128 heads
    assert ("deepseek-v3", 2, "tpla", 4) not in cases and ("deepseek-v3", 2, "dcp", 4) not in cases
    assert cases["deepseek-v3", 2, "tpla", 2].heads == 128
    assert cases["kimi-k2", 8, "mla", 1].heads == 8
    t = traffic(cases["deepseek-v3", 2, "tpla", 2])
    assert t["kv_bytes"] == 8 * 4096 * 320 * 2 and t["flops"] == 2 * 8 * 128 * 4096 * (2 * 256 + 64)


def test_prefill_table_row_says_which_server_failed_and_gives_no_ratio():
    from sglang_tpla.bench.prefill import _cells

    mla = {"s": {2048: 2.0}, "mib": {2048: 1000.0}, "failed": {16384: "ConnectionError after 40 s, server exited with -9"}}
    tpla = {"s": {2048: 1.0, 16384: 50.0}, "mib": {2048: 1100.0, 16384: 1200.0}, "failed": {}}
    assert _cells(mla, tpla, 2048) == "| 2048 | 2.00 | 1.00 | 0.50x | 1000 | 1100 | 1.10x |"
    row = _cells(mla, tpla, 16384)
    assert "failed: ConnectionError after 40 s, server exited with -9" in row and "50.00" in row and "1200" in row
    assert "x |" not in row  # no ratio against a failed server


def test_prefill_rss_guard_kills_a_server_whose_scheduler_passes_the_limit():
    """A stand-in server: a process group whose child is named like a scheduler and holds ~200 MB."""
    from types import SimpleNamespace

    from sglang_tpla.bench.prefill import RssGuard

    hog = "x = bytearray(200 * 2**20); import time; time.sleep(60)"
    proc = subprocess.Popen(["bash", "-c", f'exec -a sglang::scheduler {sys.executable} -c "{hog}" & wait'], start_new_session=True)
    try:
        with RssGuard(SimpleNamespace(proc=proc), limit_gb=0.1) as guard:
            proc.wait(timeout=30)
        assert 0.1 < guard.tripped < 1.0
        assert proc.returncode == -9
    finally:
        if proc.poll() is None:
            proc.kill()
