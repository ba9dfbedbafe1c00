"""AOT-compile every Triton TPLA decode config for sm_90 (H100/H200) on a machine without a GPU.

The interpreter cannot see shared-memory overflow, register spills or which MMA instructions a
tile lowers to.  ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` runs the real NVIDIA
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) on the CPU, in a subprocess without
TRITON_INTERPRET (``tests/triton_runner.py aot``).  Every distinct ``(D_CKV, dtype, config)`` that
``choose_config`` can return is compiled (head counts only matter through BLOCK_H, and
``all_configs`` enumerates 1..256 heads), each in both store variants (fp32 partials for the
split path; the output dtype for the one-split path, which writes ``out`` directly), plus the
stage-2 merge kernel per D_CKV and output dtype.  Compiles land in Triton's normal cache, so a
rerun only repeats the ptxas -v register/spill check.
"""

import os

import pytest
import torch

import triton_runner

pytestmark = pytest.mark.slow  # about 1 min of CPU (64 sm_90 compiles); minutes on a busy 2-core machine

SM90_SMEM_LIMIT = 232448  # 227 KiB opt-in per block on H100 / H200
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _jobs():
    from sglang_tpla.kernels import tpla_decode as K

    jobs, seen = [], set()
    for (d, dt, _), cfg in sorted(K.all_configs(tuple(DTYPES)).items(), key=lambda kv: (-kv[0][0], str(kv[0][1]), kv[0][2])):
        key = (d, DTYPES[dt], cfg)
        if key not in seen:
            seen.add(key)
            c = [cfg.block_h, cfg.block_n, cfg.num_warps, cfg.num_stages]
            jobs.append(dict(stage=1, d=d, dtype=DTYPES[dt], config=c, out="fp32"))  # split path: fp32 partials
            if dt != torch.float32:  # one-split path: stage 1 stores the final output in the query dtype
                jobs.append(dict(stage=1, d=d, dtype=DTYPES[dt], config=c, out=DTYPES[dt]))
    for d in K.SUPPORTED_D_CKV:
        for name in DTYPES.values():
            jobs.append(dict(stage=2, d=d, dtype=name))
    return jobs


@pytest.fixture(scope="module")
def compiled():
    payload = triton_runner.spawn("aot", _jobs(), timeout=900, workers=2)
    assert payload["module"].startswith(os.path.realpath(triton_runner.REPO_ROOT) + os.sep)
    res = payload["results"]
    print(f"\nsm_90 AOT compile: {len(res)} kernels in {payload['wall_s']} s")
    for r in res:
        cfg = "stage2" if r["stage"] == 2 else "BLOCK_H=%d BLOCK_N=%d warps=%d stages=%d" % tuple(r["config"])
        cfg += f" out={r.get('out', r['dtype'])}"
        mma = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "fma")
        print(
            f"  D_CKV={r['d']:3d} {r['dtype']} {cfg}: shared {r['shared']} B, {mma}, "
            f"{r['regs']} regs, {r['spill_bytes']} B spilled ({r['seconds']} s)"
        )
    return res


def test_shared_memory_fits_sm90(compiled):
    over = [r for r in compiled if r["shared"] > SM90_SMEM_LIMIT]
    assert not over, f"configs over the {SM90_SMEM_LIMIT} B shared-memory limit: {over}"


def test_no_register_spills(compiled):
    spilled = [r for r in compiled if r["spill_bytes"]]
    assert not spilled, f"configs that spill registers on sm_90a: {spilled}"


def test_large_head_block_uses_wgmma(compiled):
    wide = [r for r in compiled if r["stage"] == 1 and r["dtype"] != "fp32" and r["config"][0] == 64]
    assert {r["d"] for r in wide} == {512, 256, 128, 64}
    assert all(r["wgmma"] for r in wide), [r for r in wide if not r["wgmma"]]
    # the small head tiles still use tensor cores (mma.sync)
    narrow = [r for r in compiled if r["stage"] == 1 and r["dtype"] != "fp32" and r["config"][0] < 64]
    assert narrow and all(r["wgmma"] or r["mma_sync"] for r in narrow)


def test_every_choosable_config_was_compiled(compiled):
    from sglang_tpla.kernels import tpla_decode as K

    done = {(r["d"], r["dtype"], tuple(r["config"])) for r in compiled if r["stage"] == 1}
    direct = {(r["d"], r["dtype"], tuple(r["config"])) for r in compiled if r["stage"] == 1 and r["out"] == r["dtype"]}
    for d in K.SUPPORTED_D_CKV:
        for dt, name in DTYPES.items():
            for h in (1, 8, 16, 17, 32, 33, 64, 96, 128, 256):
                c = K.choose_config(d, h, dt)
                key = (d, name, (c.block_h, c.block_n, c.num_warps, c.num_stages))
                assert key in done
                assert name == "fp32" or key in direct
