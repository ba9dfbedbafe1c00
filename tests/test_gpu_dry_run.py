"""The prepared GPU check (tests/gpu/run.sh) in its CPU dry run: every case is built and every
kernel launch bound to its kernel's signature on this machine, a few tiny cases run for real under
TRITON_INTERPRET=1, so nothing fails on the GPU machine for a reason visible here."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, WORKERS="2")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", "tests/gpu/run.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert {p.name for p in out.iterdir()} == {"env.txt", "log.txt", "results.jsonl", "report.md"}, tail
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    by_section = {}
    for x in recs:
        by_section.setdefault(x["section"], []).append(x)
    plan = subprocess.run([sys.executable, "tests/gpu/gpucheck.py", "plan", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    planned = {line.split()[-1] for line in plan.stdout.splitlines()}
    assert planned == {x["id"] for x in recs if x["section"] != "worker"}
    assert not [x["id"] for x in recs if x["status"] in ("FAIL", "ERROR")]
    # every section is there; the dry_real cases really ran under the interpreter and passed
    for s in ("env", "numerics", "graph", "warm", "ceilings", "bench", "layer"):
        assert by_section.get(s), s
    real = [x for x in by_section["numerics"] + by_section["graph"] if x["status"] == "ok"]
    assert {x["name"] for x in real} >= {"bf16_d64_h16", "fp16_d256_h16_1split_lse", "fp8kv_d64_h16",
                                         "graph_tpla_d64_h16_bf16_small", "graph_tpla_d64_h16_fp8kv_small"}  # fmt: skip
    assert all(x["err_over_tol"] <= 1 for x in real if "err_over_tol" in x)
    # benchmark shapes were built at full size (meta device): MLA/DCP/TPLA rows for both models at TP 2 and 8
    bench = {(x["model"], x["tp"], x["variant"], x["par"]) for x in by_section["bench"]}
    assert ("deepseek-v3", 8, "tpla", 4) in bench and ("kimi-k2", 2, "dcp", 2) in bench and ("kimi-k2", 8, "mla", 1) in bench
    layer = {x["name"]: x for x in by_section["layer"]}
    dsv3 = layer["layer-deepseek-v3-tp8-tpla2-b32-ctx32k"]
    assert dsv3["shape_w_qb"] == [1536, 32 * 192] and dsv3["shape_w_o"] == [32 * 128, 7168]
    # no worker imported sglang (refused anyway), and launches were intercepted and recorded
    workers = by_section["worker"]
    assert workers and not any(w["sglang_imported"] for w in workers) and not any(w["import_errors"] for w in workers)
    assert sum(w["launches"] for w in workers) > 100
    report = (out / "report.md").read_text()
    assert "## Numerics" in report and "## Per-rank decode attention" in report and "## One decode layer step" in report
