"""The Triton TPLA decode kernel under TRITON_INTERPRET=1 against the fp32 reference.

Triton reads TRITON_INTERPRET when it is imported, and other test modules import sglang (and so
triton) into this process, so every kernel run happens in one subprocess
(``tests/triton_runner.py interpret``) shared by the parametrized checks below.  The interpreter
runs the grid serially in numpy: the cases are kept small (a few seconds each).
"""

import math
import os

import pytest
import torch

import triton_runner

FP32, FP16, BF16 = "fp32", "fp16", "bf16"
TOL = {FP32: (2e-5, 2e-5), FP16: (2e-3, 5e-3), BF16: (1.5e-2, 2e-2)}  # (atol, rtol) vs fp32 reference

# config = (BLOCK_H, BLOCK_N, num_warps, num_stages); small BLOCK_N so that requests span chunks.
CASES = [
    dict(name="d256_fp32_rowbuf_ragged", d=256, h=16, lens=[0, 1, 37, 64], dtype=FP32, config=(16, 16, 4, 1), splits=1),
    dict(
        name="d128_fp16_page4_mu_headmask_2splits_nolse",
        d=128, h=20, lens=[5, 0, 1, 50], page_size=4, dtype=FP16, mu=1.7, config=(16, 16, 4, 1), splits=2, lse=False,
    ),
    dict(
        name="d64_bf16_dotfp32_page8_outview",
        d=64, h=8, lens=[1, 33, 0, 17], page_size=8, dtype=BF16, dot_fp32=True, mu=0.6, config=(16, 16, 4, 1),
        splits=1, out="view_fp32",
    ),
    dict(
        name="d128_fp16_5splits_peaked_separate_buffers",
        d=128, h=4, lens=[200, 3], page_size=2, layout="separate", dtype=FP16, config=(16, 16, 4, 1), splits=5,
        scale_mult=4.0,
    ),
    dict(name="d512_fp16_page2_2splits", d=512, h=16, lens=[1, 40], page_size=2, dtype=FP16, config=(16, 32, 4, 1), splits=2),
    dict(
        name="d256_bf16_dotfp32_page16_3splits_outview",
        d=256, h=16, lens=[0, 70, 2], page_size=16, dtype=BF16, dot_fp32=True, mu=2.0, config=(16, 32, 4, 1), splits=3,
        out="view_fp32",
    ),
    # default config (BLOCK_H=64, 40 heads masked) and default split heuristic bounded by max_seq_len
    dict(name="d64_fp16_default_config_h40", d=64, h=40, lens=[9, 120], page_size=4, dtype=FP16, max_seq_len=300),
    # 128 heads (DeepSeek-V3 at g=tp), default config; bf16 takes DOT_FP32 automatically under the interpreter
    dict(name="d256_bf16_default_h128", d=256, h=128, lens=[45], dtype=BF16, max_seq_len=45),
    # default config (BLOCK_N=64) with 8 splits: the long request fills 4 of them, the others are empty
    dict(name="d128_bf16_default_config_8splits", d=128, h=4, lens=[256, 3, 0, 100], page_size=4, dtype=BF16, splits=8),
    dict(name="all_empty_2splits", d=64, h=16, lens=[0, 0], dtype=FP32, config=(16, 16, 4, 1), splits=2),
]  # fmt: skip
for _c in CASES:
    _c.setdefault("atol", TOL[_c["dtype"]][0])
    _c.setdefault("rtol", TOL[_c["dtype"]][1])


@pytest.fixture(scope="module")
def interp_results():
    payload = triton_runner.spawn("interpret", CASES, timeout=600)
    repo = os.path.realpath(triton_runner.REPO_ROOT)
    assert payload["module"].startswith(repo + os.sep), f"runner imported the kernel from {payload['module']}"
    per_case = {r["name"]: r for r in payload["results"]}
    print(f"\ninterpreter: {len(CASES)} cases in {payload['wall_s']} s (subprocess wall time)")
    for r in payload["results"]:
        print(f"  {r['name']}: {r['seconds']} s, max abs err {r['max_abs_err']:.2e}, lse err {r['lse_max_err']:.2e}")
    return per_case


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_fp32_reference(interp_results, case):
    r = interp_results[case["name"]]
    assert r["n_bad"] == 0, f"{r['n_bad']} elements beyond atol={case['atol']} rtol={case['rtol']}; max abs err {r['max_abs_err']:.3e}"
    assert r["empty_zero"], "an empty request must give a zero output"
    assert r["lse_empty_ok"], "LSE must be -inf exactly for empty requests"
    assert r["lse_max_err"] < 2e-3
    assert r["out_dtype"] == r["expected_out_dtype"]
    if case.get("out"):
        assert r["out_is_given"], "the result must be written into the given out tensor"
        assert r["sentinel_ok"], "the kernel wrote outside out's heads"


def test_cases_cover_the_brief():
    """Masking, splits and dtypes that the cases above are meant to exercise."""
    assert {c["d"] for c in CASES} >= {512, 256, 128, 64}
    assert {c["dtype"] for c in CASES} == {FP32, FP16, BF16}
    assert any(c.get("splits", 1) > 1 and max(c["lens"]) > 4 * c["config"][1] for c in CASES if c.get("config"))
    assert any(c["h"] % (c["config"][0] if c.get("config") else 64) for c in CASES)
    assert any(c.get("page_size", 1) > 1 for c in CASES) and any(c.get("page_size", 1) == 1 for c in CASES)
    assert any(0 in c["lens"] for c in CASES) and any(1 in c["lens"] for c in CASES)


def test_default_cases_use_the_chosen_head_block(interp_results):
    assert interp_results["d64_fp16_default_config_h40"]["block_h"] == 64
    assert interp_results["d256_bf16_default_h128"]["head_blocks"] == 2
    assert interp_results["d128_fp16_page4_mu_headmask_2splits_nolse"]["head_blocks"] == 2  # 20 heads, 16 + 4 masked


# --------------------------------------------------------------------------- host-side logic (no launch)


def _tensors(b=2, h=4, d=128, slots=10, dtype=torch.float16):
    buf = torch.zeros(slots, d + 64, dtype=dtype)
    return dict(
        q_lat=torch.zeros(b, h, d, dtype=dtype),
        q_pe=torch.zeros(b, h, 64, dtype=dtype),
        ckv=buf[:, :d],
        kpe=buf[:, d:],
        kv_indptr=torch.zeros(b + 1, dtype=torch.int32),
        kv_indices=torch.zeros(0, dtype=torch.int32),
        sm_scale=0.1,
    )


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(q_lat=torch.zeros(2, 4, 96, dtype=torch.float16)), ValueError, "D_CKV=96"),
        (dict(q_pe=torch.zeros(2, 4, 32, dtype=torch.float16)), ValueError, "q_pe must be"),
        (dict(ckv=torch.zeros(10, 64, dtype=torch.float16)), ValueError, "ckv must be"),
        (dict(kpe=torch.zeros(9, 64, dtype=torch.float16)), ValueError, "kpe must be"),
        (dict(kpe=torch.zeros(10, 64, dtype=torch.bfloat16)), TypeError, "kpe has dtype"),
        (dict(ckv=torch.zeros(128, 10, dtype=torch.float16).T), ValueError, "unit stride"),
        (dict(kv_indptr=torch.zeros(3, dtype=torch.int64)), TypeError, "int32"),
        (dict(kv_indptr=torch.zeros(4, dtype=torch.int32)), ValueError, "B\\+1"),
        (dict(sm_scale=float("nan")), ValueError, "finite"),
        (dict(num_kv_splits=0), ValueError, "num_kv_splits"),
        (dict(out=torch.zeros(2, 4, 64)), ValueError, "out must be"),
    ],
)
def test_validation_errors(change, exc, match):
    from sglang_tpla.kernels.tpla_decode import tpla_decode_attention

    kw = _tensors()
    kw.update(change)
    with pytest.raises(exc, match=match):
        tpla_decode_attention(**kw)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    from sglang_tpla.kernels.tpla_decode import tpla_decode_attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tpla_decode_attention(**_tensors())


def test_choose_config_and_splits():
    from sglang_tpla.kernels import tpla_decode as K

    for d in K.SUPPORTED_D_CKV:
        for dt in (torch.bfloat16, torch.float16):
            assert K.choose_config(d, 128, dt).block_h == 64  # wgmma tile for DSV3 / Kimi head counts
            assert K.choose_config(d, 64, dt).block_h == 64
            assert K.choose_config(d, 16, dt).block_h == 16
            assert K.choose_config(d, 1, dt).block_h >= 16
    assert set(K.all_configs().values()) >= {K.choose_config(256, h, torch.bfloat16) for h in (1, 20, 40, 128)}
    with pytest.raises(ValueError, match="D_CKV"):
        K.choose_config(320, 16, torch.bfloat16)
    # about two waves of programs, capped, and bounded by a host-side max_seq_len
    assert K.choose_num_kv_splits(1, 2, 64, num_sms=132) == K.MAX_KV_SPLITS
    assert K.choose_num_kv_splits(256, 2, 64, num_sms=132) == 1
    assert K.choose_num_kv_splits(8, 2, 64, num_sms=132) == math.ceil(264 / 16)
    assert K.choose_num_kv_splits(1, 2, 64, num_sms=132, max_seq_len=100) == 1
    assert K.choose_num_kv_splits(1, 2, 64, num_sms=132, max_seq_len=1000) == 4
