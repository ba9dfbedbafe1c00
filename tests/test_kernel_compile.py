"""AOT-compile every Triton TPLA decode config for sm_90 (H100/H200) on a machine without a GPU.

The interpreter cannot see shared-memory overflow, register spills or which MMA instructions a
tile lowers to.  ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` runs the real NVIDIA
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) on the CPU, in a subprocess without
TRITON_INTERPRET (``tests/triton_runner.py aot``).  Every distinct ``(D_CKV, query dtype, cache
dtype, config)`` that ``choose_config`` can return is compiled (head counts only matter through
BLOCK_H, and ``all_configs`` enumerates 1..256 heads; the caches are the query dtype and fp8 e4m3),
each in both store variants (fp32 partials for the split path; the output dtype for the one-split
path, which writes ``out`` directly), plus the stage-2 merge kernel per D_CKV and output dtype.
Compiles land in Triton's normal cache, so a rerun only repeats the ptxas -v register/spill check.
"""

import os

import pytest
import torch

import triton_runner

pytestmark = pytest.mark.slow  # about 2 min of CPU (~130 sm_90 compiles); more on a busy 2-core machine

SM90_SMEM_LIMIT = 232448  # 227 KiB opt-in per block on H100 / H200
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8"}


def _jobs():
    from sglang_tpla.kernels import tpla_decode as K

    jobs, seen = [], set()
    for (d, q_dt, kv_dt, _), cfg in sorted(K.all_configs().items(), key=lambda kv: (-kv[0][0], str(kv[0][1:3]), kv[0][3])):
        key = (d, NAMES[q_dt], NAMES[kv_dt], cfg)
        if key not in seen:
            seen.add(key)
            c = [cfg.block_h, cfg.block_n, cfg.num_warps, cfg.num_stages]
            job = dict(stage=1, d=d, dtype=NAMES[q_dt], kv=NAMES[kv_dt], config=c)
            jobs.append(dict(job, out="fp32"))  # split path: fp32 partials
            if q_dt != torch.float32:  # one-split path: stage 1 stores the final output in the query dtype
                jobs.append(dict(job, out=NAMES[q_dt]))
    for d in K.SUPPORTED_D_CKV:
        for dt in K.SUPPORTED_DTYPES:
            jobs.append(dict(stage=2, d=d, dtype=NAMES[dt]))
    return jobs


@pytest.fixture(scope="module")
def compiled():
    payload = triton_runner.spawn("aot", _jobs(), timeout=1800, workers=2)
    assert payload["module"].startswith(os.path.realpath(triton_runner.REPO_ROOT) + os.sep)
    res = payload["results"]
    print(f"\nsm_90 AOT compile: {len(res)} kernels in {payload['wall_s']} s")
    for r in res:
        if r["stage"] == 2:
            what = f"{r['dtype']} stage2"
        else:
            what = "q %s kv %s BLOCK_H=%d BLOCK_N=%d warps=%d stages=%d" % (r["dtype"], r["kv"], *r["config"])
            what += f" out={r['out']}"
        mma = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "fma")
        print(
            f"  D_CKV={r['d']:3d} {what}: shared {r['shared']} B, {mma}, "
            f"{r['regs']} regs, {r['spill_bytes']} B spilled ({r['seconds']} s)"
        )
    return res


def test_shared_memory_fits_sm90(compiled):
    over = [r for r in compiled if r["shared"] > SM90_SMEM_LIMIT]
    assert not over, f"configs over the {SM90_SMEM_LIMIT} B shared-memory limit: {over}"


def test_no_register_spills(compiled):
    spilled = [r for r in compiled if r["spill_bytes"]]
    assert not spilled, f"configs that spill registers on sm_90a: {spilled}"


def test_large_head_blocks_use_wgmma(compiled):
    stage1 = [r for r in compiled if r["stage"] == 1 and r["dtype"] != "fp32"]
    wide = [r for r in stage1 if r["config"][0] >= 64]
    assert all(r["wgmma"] for r in wide), [r for r in wide if not r["wgmma"]]
    tiles = {(r["d"], r["kv"], r["config"][0]) for r in wide}
    for kv in ("bf16", "fp16", "fp8"):
        assert {d for d, k, bh in tiles if k == kv and bh == 128} == {256, 128, 64}  # one program per 128 heads
        # BLOCK_H = 64 everywhere but D_CKV = 512 with fp8 (spills: BLOCK_H = 32 there)
        assert {d for d, k, bh in tiles if k == kv and bh == 64} == ({256, 128, 64} if kv == "fp8" else {512, 256, 128, 64})
    # the small head tiles still use tensor cores (mma.sync)
    narrow = [r for r in stage1 if r["config"][0] < 64]
    assert narrow and all(r["wgmma"] or r["mma_sync"] for r in narrow)


def test_every_choosable_config_was_compiled(compiled):
    from sglang_tpla.kernels import tpla_decode as K

    done = {(r["d"], r["dtype"], r["kv"], tuple(r["config"])) for r in compiled if r["stage"] == 1}
    direct = {(r["d"], r["dtype"], r["kv"], tuple(r["config"])) for r in compiled if r["stage"] == 1 and r["out"] == r["dtype"]}
    for d in K.SUPPORTED_D_CKV:
        for q_dt, kv_dt in K.SUPPORTED_DTYPE_PAIRS:
            for h in (1, 8, 16, 17, 32, 33, 64, 65, 96, 128, 256):
                c = K.choose_config(d, h, q_dt, kv_dt)
                key = (d, NAMES[q_dt], NAMES[kv_dt], (c.block_h, c.block_n, c.num_warps, c.num_stages))
                assert key in done
                assert q_dt == torch.float32 or key in direct
    # the brief's shapes: every D_CKV at 16, 64 and 128 heads, bf16 and fp8 caches under bf16 queries
    for d in K.SUPPORTED_D_CKV:
        for kv in ("bf16", "fp8"):
            for h in (16, 64, 128):
                c = K.choose_config(d, h, torch.bfloat16, torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn)
                assert (d, "bf16", kv, (c.block_h, c.block_n, c.num_warps, c.num_stages)) in direct
