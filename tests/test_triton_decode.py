"""The Triton TPLA decode kernel under TRITON_INTERPRET=1 against the fp32 reference.

Triton reads TRITON_INTERPRET when it is imported, and other test modules import sglang (and so
triton) into this process, so every kernel run happens in one subprocess
(``tests/triton_runner.py interpret``) shared by the parametrized checks below.  The interpreter
runs the grid serially in numpy: the cases are kept small (a few seconds each).

The interpreter (triton 3.8) loads ``float8_e4m3fn`` tensors and converts them exactly, so the fp8
cache is checked here numerically (against the reference on the dequantised values); the sm_90
compile of the fp8 tiles is in ``test_kernel_compile.py``.  The ``TritonTPLADecode`` runner is
checked both here (numerics, buffer reuse) and in-process with its launches stubbed out (no
allocation, no device reads).
"""

import math
import os

import pytest
import torch

import triton_runner

FP32, FP16, BF16, FP8 = "fp32", "fp16", "bf16", "fp8"
# (atol, rtol) vs the fp32 reference, by query dtype.  An fp8 cache gets its query dtype's tolerance:
# the reference runs on the dequantised fp8 values, e4m3 values are exact in fp16 and bf16, and the
# kernel's remaining roundings (P and the output in the query dtype) are the same as without fp8.
TOL = {FP32: (2e-5, 2e-5), FP16: (2e-3, 5e-3), BF16: (1.5e-2, 2e-2)}

# config = (BLOCK_H, BLOCK_N, num_warps, num_stages); small BLOCK_N so that requests span chunks.
# A used split holds >= MIN_SPLIT_CHUNKS (4) chunks, so multi-split cases need requests longer than
# 4 * BLOCK_N; shorter requests leave trailing splits unused (also exercised).
CASES = [
    dict(name="d256_fp32_rowbuf_ragged", d=256, h=16, lens=[0, 1, 37, 64], dtype=FP32, config=(16, 16, 4, 1), splits=1),
    dict(
        name="d128_fp16_page4_mu_headmask_2splits_nolse",
        d=128, h=20, lens=[5, 0, 1, 150], page_size=4, dtype=FP16, mu=1.7, config=(16, 16, 4, 1), splits=2, lse=False,
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
    dict(name="d512_fp16_page2_2splits", d=512, h=16, lens=[1, 140], page_size=2, dtype=FP16, config=(16, 32, 4, 1), splits=2),
    dict(
        name="d256_bf16_dotfp32_page16_3splits_outview",
        d=256, h=16, lens=[0, 290, 2], page_size=16, dtype=BF16, dot_fp32=True, mu=2.0, config=(16, 32, 4, 1), splits=3,
        out="view_fp32",
    ),
    # default config (BLOCK_H=64, 40 heads masked) and default split heuristic bounded by max_seq_len
    dict(name="d64_fp16_default_config_h40", d=64, h=40, lens=[9, 120], page_size=4, dtype=FP16, max_seq_len=300),
    # 128 heads (DeepSeek-V3 at g=tp), default config: one BLOCK_H=128 program per request;
    # bf16 takes DOT_FP32 automatically under the interpreter
    dict(name="d256_bf16_default_h128", d=256, h=128, lens=[45], dtype=BF16, max_seq_len=45),
    # the long ragged case: default config (BLOCK_N=64) with 8 splits; the 1100-token request uses 5
    # of them (256-token minimum), the 300-token one 2, the short and empty ones 1
    dict(name="d128_bf16_default_config_8splits", d=128, h=4, lens=[1100, 3, 0, 300], page_size=4, dtype=BF16, splits=8),
    dict(name="all_empty_2splits", d=64, h=16, lens=[0, 0], dtype=FP32, config=(16, 16, 4, 1), splits=2),
    # caller-owned workspace: the one-split path puts its LSE there, the split path its partials
    dict(name="d128_fp16_1split_workspace", d=128, h=16, lens=[3, 0, 70], dtype=FP16, config=(16, 16, 4, 1), splits=1, workspace=True),
    # fp8 (e4m3) cache with a per-tensor scale (dequantised = stored * kv_scale)
    dict(
        name="d256_bf16q_fp8kv_scale_mu_3splits",
        d=256, h=16, lens=[0, 150, 7, 64], page_size=2, dtype=BF16, kv=FP8, kv_scale=0.03, mu=1.3, config=(16, 16, 4, 1),
        splits=3,
    ),
    dict(
        name="d64_fp16q_fp8kv_default_h40_workspace_2splits",
        d=64, h=40, lens=[9, 300, 0], dtype=FP16, kv=FP8, kv_scale=4.0, splits=2, workspace=True,
    ),
    # fp8 at D_CKV = 512: BLOCK_H = 32 (BLOCK_H = 64 spills on sm_90), so 40 heads take two programs
    dict(name="d512_fp16q_fp8kv_default_h40", d=512, h=40, lens=[33, 1], dtype=FP16, kv=FP8, kv_scale=0.5, splits=1),
    # TritonTPLADecode on SGLang's pool buffer [slots, 1, D + 64], two batch sizes with different
    # split counts (num_sms is small so that a few requests already need splits)
    dict(
        name="runner_d256_bf16_pool", kind="runner", d=256, h=16, lens=[600, 0, 300, 37], layout="pool", dtype=BF16,
        max_batch=4, first_batch=2, num_sms=8,
    ),
    dict(
        name="runner_d128_fp16q_fp8kv_uint8_pool", kind="runner", d=128, h=8, lens=[520, 1, 77], layout="pool_u8",
        dtype=FP16, kv=FP8, kv_scale=0.05, mu=0.8, max_batch=3, first_batch=1, num_sms=4,
    ),
]  # fmt: skip
for _c in CASES:
    _c.setdefault("atol", TOL[_c["dtype"]][0])
    _c.setdefault("rtol", TOL[_c["dtype"]][1])
KERNEL_CASES = [c for c in CASES if c.get("kind") != "runner"]
RUNNER_CASES = [c for c in CASES if c.get("kind") == "runner"]


@pytest.fixture(scope="module")
def interp_results():
    payload = triton_runner.spawn("interpret", CASES, timeout=900)
    repo = os.path.realpath(triton_runner.REPO_ROOT)
    assert payload["module"].startswith(repo + os.sep), f"runner imported the kernel from {payload['module']}"
    per_case = {r["name"]: r for r in payload["results"]}
    print(f"\ninterpreter: {len(CASES)} cases in {payload['wall_s']} s (subprocess wall time)")
    for r in payload["results"]:
        if "calls" in r:
            errs = ", ".join(f"B={c['batch']} splits={c['splits']} err {c['max_abs_err']:.2e}" for c in r["calls"])
            print(f"  {r['name']}: {r['seconds']} s, {errs}")
        else:
            print(f"  {r['name']}: {r['seconds']} s, max abs err {r['max_abs_err']:.2e}, lse err {r['lse_max_err']:.2e}")
    return per_case


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c["name"] for c in KERNEL_CASES])
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


@pytest.mark.parametrize("case", RUNNER_CASES, ids=[c["name"] for c in RUNNER_CASES])
def test_runner_matches_fp32_reference_and_reuses_buffers(interp_results, case):
    r = interp_results[case["name"]]
    first, second = r["calls"]
    for call in r["calls"]:
        assert call["n_bad"] == 0, f"B={call['batch']}: {call['n_bad']} elements beyond tolerance; max abs err {call['max_abs_err']:.3e}"
    assert first["splits"] != second["splits"], "the two batch sizes are meant to take different split counts"
    assert first["out_ptr"] == second["out_ptr"] == r["out_buffer_ptr"], "run must return views of the preallocated output"
    assert r["buffers_kept"], "run must not replace the preallocated buffers"
    if case["layout"] == "pool_u8":
        assert r["rows_dtype"] == "torch.uint8"  # SGLang's fp8 store dtype, viewed inside run


def _config(case):
    from sglang_tpla.kernels import tpla_decode as K

    if case.get("config"):
        return K.TPLADecodeConfig(*case["config"])
    return K.choose_config(case["d"], case["h"], triton_runner._dtype(case["dtype"]), triton_runner._dtype(case.get("kv", case["dtype"])))


def test_cases_cover_the_brief():
    """Masking, splits and dtypes that the cases above are meant to exercise."""
    from sglang_tpla.kernels.tpla_decode import MIN_SPLIT_CHUNKS

    assert {c["d"] for c in CASES} >= {512, 256, 128, 64}
    assert {c["dtype"] for c in CASES} == {FP32, FP16, BF16}
    assert {c["dtype"] for c in CASES if c.get("kv") == FP8} == {FP16, BF16}
    # requests long enough to use several splits, and splits left unused by short requests
    assert any(
        c.get("splits", 1) > 1 and max(c["lens"]) > MIN_SPLIT_CHUNKS * _config(c).block_n for c in KERNEL_CASES
    )
    assert any(c.get("splits", 1) * MIN_SPLIT_CHUNKS * _config(c).block_n > max(c["lens"]) for c in KERNEL_CASES)
    assert any(c["h"] % _config(c).block_h for c in CASES)
    assert any(c.get("page_size", 1) > 1 for c in CASES) and any(c.get("page_size", 1) == 1 for c in CASES)
    assert any(0 in c["lens"] for c in CASES) and any(1 in c["lens"] for c in CASES)
    assert {c.get("splits") for c in CASES if c.get("workspace")} >= {1, 2}


def test_default_cases_use_the_chosen_head_block(interp_results):
    assert interp_results["d64_fp16_default_config_h40"]["block_h"] == 64
    assert interp_results["d256_bf16_default_h128"]["block_h"] == 128  # each KV tile read once for 128 heads
    assert interp_results["d256_bf16_default_h128"]["head_blocks"] == 1
    assert interp_results["d512_fp16q_fp8kv_default_h40"]["head_blocks"] == 2
    assert interp_results["d128_fp16_page4_mu_headmask_2splits_nolse"]["head_blocks"] == 2  # 20 heads, 16 + 4 masked


# --------------------------------------------------------------------------- host-side logic (no launch)


def _tensors(b=2, h=4, d=128, slots=10, dtype=torch.float16, kv_dtype=None):
    buf = torch.zeros(slots, d + 64, dtype=kv_dtype or dtype)
    return dict(
        q_lat=torch.zeros(b, h, d, dtype=dtype),
        q_pe=torch.zeros(b, h, 64, dtype=dtype),
        ckv=buf[:, :d],
        kpe=buf[:, d:],
        kv_indptr=torch.zeros(b + 1, dtype=torch.int32),
        kv_indices=torch.zeros(0, dtype=torch.int32),
        sm_scale=0.1,
    )


_U8 = torch.zeros(10, 192, dtype=torch.uint8)
_E4M3 = torch.zeros(10, 192, dtype=torch.float8_e4m3fn)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(q_lat=torch.zeros(2, 4, 96, dtype=torch.float16)), ValueError, "D_CKV=96"),
        (dict(q_pe=torch.zeros(2, 4, 32, dtype=torch.float16)), ValueError, "q_pe must be"),
        (dict(q_pe=torch.zeros(2, 4, 64, dtype=torch.bfloat16)), TypeError, "q_pe has dtype"),
        (dict(ckv=torch.zeros(10, 64, dtype=torch.float16)), ValueError, "ckv must be"),
        (dict(kpe=torch.zeros(9, 64, dtype=torch.float16)), ValueError, "kpe must be"),
        (dict(kpe=torch.zeros(10, 64, dtype=torch.bfloat16)), TypeError, "kpe has dtype"),
        (dict(ckv=_E4M3[:, :128], kpe=_E4M3[:, 128:], q_lat=torch.zeros(2, 4, 128), q_pe=torch.zeros(2, 4, 64)), TypeError, "unsupported"),
        (dict(ckv=_U8[:, :128], kpe=_U8[:, 128:]), TypeError, "float8_e4m3fn"),
        (dict(ckv=torch.zeros(128, 10, dtype=torch.float16).T), ValueError, "unit stride"),
        (dict(kv_indptr=torch.zeros(3, dtype=torch.int64)), TypeError, "int32"),
        (dict(kv_indptr=torch.zeros(4, dtype=torch.int32)), ValueError, "B\\+1"),
        (dict(sm_scale=float("nan")), ValueError, "finite"),
        (dict(kv_scale=0.0), ValueError, "kv_scale"),
        (dict(num_kv_splits=0), ValueError, "num_kv_splits"),
        (dict(out=torch.zeros(2, 4, 64)), ValueError, "out must be"),
        (dict(num_kv_splits=2, workspace=(torch.zeros(2, 4, 1, 128), torch.zeros(2, 4, 1))), ValueError, "workspace"),
    ],
)  # fmt: skip
def test_validation_errors(change, exc, match, monkeypatch):
    from sglang_tpla.kernels.tpla_decode import tpla_decode_attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check; every case fails before a launch
    kw = _tensors()
    kw.update(change)
    with pytest.raises(exc, match=match):
        tpla_decode_attention(**kw)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    from sglang_tpla.kernels.tpla_decode import tpla_decode_attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tpla_decode_attention(**_tensors())


def test_choose_config():
    from sglang_tpla.kernels import tpla_decode as K

    bf16, fp16, fp8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
    for d in K.SUPPORTED_D_CKV:
        for q, kv in ((bf16, bf16), (fp16, fp16), (bf16, fp8), (fp16, fp8)):
            assert K.choose_config(d, 16, q, kv).block_h == 16
            assert K.choose_config(d, 1, q, kv).block_h == 16
            assert K.choose_config(d, 32, q, kv).block_h == 32
            if d < 512:  # one program for up to 128 heads (DeepSeek-V3 per rank), 64 for Kimi-K2
                assert K.choose_config(d, 128, q, kv).block_h == 128
                assert K.choose_config(d, 65, q, kv).block_h == 128
                assert K.choose_config(d, 64, q, kv).block_h == 64
                assert K.choose_config(d, 256, q, kv).block_h == 128
    # D_CKV = 512: the [128, 512] accumulator does not fit; with fp8 even 64 heads spill
    assert K.choose_config(512, 128, bf16).block_h == K.choose_config(512, 64, fp16).block_h == 64
    assert K.choose_config(512, 128, bf16, fp8).block_h == K.choose_config(512, 64, fp16, fp8).block_h == 32
    assert K.choose_config(256, 64, bf16, fp8).block_n == 32  # BLOCK_N = 64 spills with fp8
    assert K.choose_config(256, 64, bf16, None) == K.choose_config(256, 64, bf16, bf16)
    assert set(K.all_configs().values()) >= {K.choose_config(256, h, bf16, fp8) for h in (1, 20, 40, 128)}
    with pytest.raises(ValueError, match="D_CKV"):
        K.choose_config(320, 16, bf16)
    with pytest.raises(TypeError, match="unsupported"):
        K.choose_config(256, 16, torch.float32, fp8)


@pytest.mark.parametrize(
    "args,kw,expected",
    [
        # one program per split: the cap (64 splits, 64 of 132 SMs) is the best there is
        ((1, 1, 64), {}, 64),
        ((2, 1, 64), {}, 64),  # 128 programs: one wave
        # 32 programs: 4 splits fill one wave (128 / 132 SMs, cost 1/4 of a request); the best is
        # 33 splits (1056 = 8 full waves, cost 8/33), and 1/4 <= 4/3 * 8/33
        ((32, 1, 64), {}, 4),
        ((8, 2, 64), {}, 8),  # 16 programs: 8 splits = 128 in one wave (1/8); best 4/33 (33 splits)
        # 100 programs already use 100 SMs (cost 1); best 25/33 (3300 = 25 waves), 4/3 * 25/33 >= 1
        ((100, 1, 64), {}, 1),
        # 140 programs: 1 split = 2 waves (cost 2), 2 = 3 waves (3/2), 3 = 4 waves (4/3); best 35/33
        # (4620 = 35 waves), 4/3 * 35/33 = 1.41: 3 is the first within it
        ((140, 1, 64), {}, 3),
        ((264, 1, 64), {}, 1),  # exactly two full waves
        # max_seq_len bounds the splits a request can use: 1000 tokens / (4 * 64) -> 4
        ((1, 2, 64), dict(max_seq_len=1000), 4),
        ((1, 1, 64), dict(max_seq_len=100), 1),
        ((1, 1, 32), dict(max_seq_len=1000), 8),  # 4 chunks of 32 per split
        # the runner cases' sizes: 8 SMs: 2 programs -> 4 splits, 4 -> 2; 4 SMs: 1 -> 4, 3 -> 1
        # (3 programs: 1 split = 1 wave, cost 1; best 3/4 at 4 splits = 3 waves; 1 <= 4/3 * 3/4)
        ((2, 1, 64), dict(num_sms=8), 4),
        ((4, 1, 64), dict(num_sms=8), 2),
        ((1, 1, 64), dict(num_sms=4), 4),
        ((3, 1, 64), dict(num_sms=4), 1),
    ],
)
def test_choose_num_kv_splits_worked_examples(args, kw, expected):
    from sglang_tpla.kernels import tpla_decode as K

    assert K.choose_num_kv_splits(*args, **kw) == expected


def test_choose_num_kv_splits_properties():
    """Against a brute force over every split count: the answer fills its last wave as far as the
    cap allows, and its cost waves(s)/s is within WAVE_SLACK of the best split count's."""
    from fractions import Fraction

    from sglang_tpla.kernels import tpla_decode as K

    for sms in (132, 114, 78):
        for programs in range(1, 700, 7):
            for max_len in (None, 300, 5000):
                s = K.choose_num_kv_splits(programs, 1, 64, sms, max_len)
                cap = K.MAX_KV_SPLITS if max_len is None else min(K.MAX_KV_SPLITS, math.ceil(max_len / 256))
                waves = lambda n: math.ceil(programs * n / sms)  # noqa: E731
                best = min(Fraction(waves(n), n) for n in range(1, cap + 1))
                assert 1 <= s <= cap
                assert Fraction(waves(s), s) <= K.WAVE_SLACK * best
                assert s == cap or waves(s + 1) > waves(s)
                assert K.choose_num_kv_splits(programs, 1, 64, sms, max_len) == s  # host sizes only
    with pytest.raises(ValueError):
        K.choose_num_kv_splits(1, 0, 64)


# --------------------------------------------------------------------------- TritonTPLADecode host side


class _FakeKernel:
    """Stands in for a ``@triton.jit`` kernel: records ``kernel[grid](*args, **meta)``."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.name, grid, args, meta))


def _aten_ops_of(fn):
    """The aten ops ``fn()`` dispatches, and its result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        res = fn()
    return ops, res


def test_runner_run_allocates_nothing_and_never_syncs(monkeypatch):
    """With the launches stubbed out, run() dispatches view ops only: no allocation, copy, or
    device read (``.item()`` / ``.tolist()`` would dispatch ``_local_scalar_dense``); and the
    launches get the preallocated workspace and output."""
    from sglang_tpla.kernels import tpla_decode as K
    from sglang_tpla.kernels.triton_decode import TritonTPLADecode

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors pass the device check
    launches = []
    monkeypatch.setattr(K, "_tpla_decode_stage1", _FakeKernel("stage1", launches))
    monkeypatch.setattr(K, "_tpla_decode_stage2", _FakeKernel("stage2", launches))
    h, d = 128, 256
    runner = TritonTPLADecode("cpu", h, d, 0.1, torch.bfloat16, torch.float8_e4m3fn, max_batch=256, kv_scale=0.5, mu=0.9)
    assert runner.config.block_h == 128
    rows = torch.zeros(100, 1, d + 64, dtype=torch.uint8)  # SGLang's fp8 pool storage
    ws_range = {
        "out": (runner._out.data_ptr(), runner._out.numel() * runner._out.element_size()),
        "po": (runner._partial_out.data_ptr(), runner._partial_out.numel() * 4),
        "lse": (runner._partial_lse.data_ptr(), runner._partial_lse.numel() * 4),
    }
    for bsz in (1, 32, 140, 256):
        q = torch.zeros(bsz, h, d + 64, dtype=torch.bfloat16)
        indptr, indices = torch.zeros(bsz + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
        launches.clear()
        ops, res = _aten_ops_of(lambda: runner.run(q[..., :d], q[..., d:], rows, indptr, indices))
        assert ops and all(op.is_view for op in ops), [str(op) for op in ops if not op.is_view]
        assert res.data_ptr() == runner._out.data_ptr() and tuple(res.shape) == (bsz, h, d)
        splits = runner.splits_for(bsz)
        assert [(name, grid) for name, grid, _, _ in launches] == [("stage1", (bsz, 1, splits))] + (
            [("stage2", (bsz, h))] if splits > 1 else []
        )
        _, _, args, meta = launches[0]
        assert args[2].dtype == args[3].dtype == torch.float8_e4m3fn  # the uint8 rows, viewed
        assert args[2].data_ptr() == rows.data_ptr() and args[3].data_ptr() == rows.data_ptr() + d
        o, lse = args[6], args[7]
        start, size = ws_range["po" if splits > 1 else "out"]
        assert start <= o.data_ptr() < start + size
        assert ws_range["lse"][0] <= lse.data_ptr() < sum(ws_range["lse"])
        assert args[8] == pytest.approx(0.1 * 0.5 * 1.4426950408889634) and args[9:11] == (0.9, 0.5)
        assert meta["BLOCK_H"] == 128 and meta["DOT_FP32"]  # bf16 queries under TRITON_INTERPRET=1
    # the workspace holds the largest batch * splits any batch size gets
    need = max(b * runner.splits_for(b) for b in range(257))
    assert runner._partial_out.numel() == need * h * d and runner._partial_lse.numel() == need * h


def test_runner_splits_are_fixed_per_batch_size():
    from sglang_tpla.kernels import tpla_decode as K
    from sglang_tpla.kernels.triton_decode import TritonTPLADecode

    runner = TritonTPLADecode("cpu", 64, 128, 0.1, torch.float16, torch.float16, max_batch=64, num_sms=132)
    cfg = runner.config
    assert (cfg.block_h, cfg.block_n) == (64, 64)
    for b in (1, 7, 32, 64):
        assert runner.splits_for(b) == K.choose_num_kv_splits(b, 1, 64, 132) == runner.splits_for(b)
    assert runner.splits_for(32) == 4


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda r, q, rows, ip, ix: r.run(q.half()[..., :128], q.half()[..., 128:], rows, ip, ix), TypeError, "built for"),
        (lambda r, q, rows, ip, ix: r.run(q[..., :128], q[..., 128:], rows[..., :160], ip, ix), ValueError, "rows must be"),
        (lambda r, q, rows, ip, ix: r.run(q[..., :128], q[..., 128:], torch.zeros_like(rows, dtype=torch.uint8), ip, ix), TypeError, "built for"),
        (lambda r, q, rows, ip, ix: r.run(q[..., :128], q[..., 128:], rows.expand(-1, 2, -1), ip, ix), ValueError, "rows must be"),
        (lambda r, q, rows, ip, ix: r.splits_for(5), ValueError, "max_batch"),
    ],
)  # fmt: skip
def test_runner_refusals(call, exc, match):
    from sglang_tpla.kernels.triton_decode import TritonTPLADecode

    runner = TritonTPLADecode("cpu", 16, 128, 0.1, torch.bfloat16, torch.bfloat16, max_batch=4)
    q = torch.zeros(2, 16, 192, dtype=torch.bfloat16)
    rows = torch.zeros(10, 1, 192, dtype=torch.bfloat16)
    with pytest.raises(exc, match=match):
        call(runner, q, rows, torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    with pytest.raises(ValueError, match="max_batch"):
        TritonTPLADecode("cpu", 16, 128, 0.1, torch.bfloat16, torch.bfloat16, max_batch=0)
    with pytest.raises(TypeError, match="unsupported"):
        TritonTPLADecode("cpu", 16, 128, 0.1, torch.float32, torch.float8_e4m3fn, max_batch=4)
