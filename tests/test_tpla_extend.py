"""``prefill: tpla`` extend on the GPU routes: the Triton multi-query kernel, FlashInfer's causal MLA
plumbing, the per-forward index metadata and the routing in the DeepSeek hook.

* The Triton kernel (``tpla_extend_attention``) runs under ``TRITON_INTERPRET=1`` in a subprocess
  (``tests/triton_runner.py``, cases of ``kind: extend``), against an oracle that shares no code
  with it: a loop over query tokens, each ``sglang_tpla.reference.latent_attention`` over its
  request's keys ``0 .. P_b + i``.  Its sm_90 compile is checked like the decode kernel's.
* FlashInfer needs CUDA: its route is checked with a stand-in ``BatchMLAPagedAttentionWrapper``
  (one causal plan per forward batch from host arrays, one run per layer on strided pool views).
* The routing: a CPU rank keeps the tiled PyTorch path; a CUDA rank's choice (``flashinfer`` /
  ``triton``) takes the kernel routes, whose arguments are checked end to end by standing in a
  pure-torch implementation of the kernel's contract and comparing with the PyTorch path.
* No host sync: the kernel routes' per-forward metadata and routing run with every device tensor
  on ``meta``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import triton_runner
from sglang_tpla.metadata import build_extend_index
from sglang_tpla.reference import latent_attention
from test_decode_backend import D_PE, HEADS, _backend, _layer

FP32, FP16, BF16 = "fp32", "fp16", "bf16"
CASES = [
    # the brief's shapes: prefixes 0 / 5 / 17, extend lengths 1 / 4 / 9; metadata from plan_extend (int64)
    dict(
        kind="extend", name="d256_fp32_prefix_0_5_17_plan", d=256, h=16, prefix=[0, 5, 17], ext=[1, 4, 9], dtype=FP32,
        config=(16, 16, 4, 1), splits=1, index="plan", atol=2e-5, rtol=2e-5,
    ),
    # 4 heads in a 16-head tile; rows of the 70-token prefix use 2 of 3 splits (>= 64 keys a split),
    # the short rows 1; metadata from build_extend_index (int32) over a shuffled req_to_token
    dict(
        kind="extend", name="d128_fp16_mu_3splits_index", d=128, h=4, prefix=[5, 70, 0], ext=[4, 9, 1], dtype=FP16,
        config=(16, 16, 4, 1), splits=3, mu=1.3, atol=2e-3, rtol=5e-3,
    ),
    # bf16 (the interpreter takes DOT_FP32), default config and split heuristic (1 split: short rows)
    dict(
        kind="extend", name="d256_bf16_default_config", d=256, h=8, prefix=[17, 0], ext=[9, 4], dtype=BF16,
        num_sms=132, atol=1.5e-2, rtol=2e-2,
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def interp_results():
    payload = triton_runner.spawn("interpret", CASES, timeout=900)
    assert payload["module"].startswith(os.path.realpath(triton_runner.REPO_ROOT) + os.sep), payload["module"]
    print(f"\ninterpreter: {len(CASES)} extend cases in {payload['wall_s']} s (subprocess wall time)")
    for r in payload["results"]:
        print(f"  {r['name']}: {r['seconds']} s, splits {r['splits']}, max abs err {r['max_abs_err']:.2e}")
    return {r["name"]: r for r in payload["results"]}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_triton_extend_matches_a_per_query_causal_loop(interp_results, case):
    r = interp_results[case["name"]]
    assert r["n_bad"] == 0, f"{r['n_bad']} elements beyond atol={case['atol']} rtol={case['rtol']}; max abs err {r['max_abs_err']:.3e}"
    assert r["out_dtype"] == r["expected_out_dtype"]


def test_cases_cover_the_brief(interp_results):
    assert {c["d"] for c in CASES} >= {256, 128} and {c["dtype"] for c in CASES} == {FP32, FP16, BF16}
    assert any(c["prefix"] == [0, 5, 17] and c["ext"] == [1, 4, 9] for c in CASES)
    assert {r["q_req_dtype"] for r in interp_results.values()} == {"torch.int64", "torch.int32"}
    assert max(r["splits"] for r in interp_results.values()) > 1  # the stage-2 merge with per-row lengths ran


@pytest.mark.slow
def test_extend_variant_compiles_for_sm90():
    """The multi-query (``ROWS``) stage 1 at DeepSeek-V3's TP=2 shape (D 256, 128 heads, bf16) and
    its stage 2, compiled for sm_90 (no GPU needed): fits shared memory, no spills, wgmma."""
    from sglang_tpla.kernels import tpla_decode as K

    cfg = K.choose_config(256, 128, torch.bfloat16)
    c = [cfg.block_h, cfg.block_n, cfg.num_warps, cfg.num_stages]
    jobs = [dict(stage=1, d=256, dtype=BF16, kv=BF16, config=c, out=BF16, rows=True), dict(stage=2, d=256, dtype=BF16, rows=True)]
    res = triton_runner.spawn("aot", jobs, timeout=900)["results"]
    s1, s2 = res
    print(f"\nsm_90 extend stage 1: {s1['shared']} B shared, {s1['regs']} regs, {s1['spill_bytes']} B spilled ({s1['seconds']} s)")
    assert s1["shared"] <= 232448 and s1["spill_bytes"] == 0 and s1["wgmma"]
    assert s2["spill_bytes"] == 0


# --------------------------------------------------------------------------- per-forward index metadata


def _table(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(6 * 32, generator=g).view(6, 32).to(torch.int32)


def test_extend_index_matches_a_loop_over_requests_and_plan_extend():
    from sglang_tpla.kernels.torch_extend import plan_extend

    r2t, rows, pre, ext = _table(), torch.tensor([4, 1, 3]), [0, 5, 17], [1, 4, 9]
    ix = build_extend_index(r2t, rows, pre, ext)
    kv = [p + n for p, n in zip(pre, ext)]
    assert torch.equal(ix.kv_indices, torch.cat([r2t[r, :n] for r, n in zip(rows.tolist(), kv)]))
    assert ix.kv_indptr.tolist() == ix.kv_indptr_cpu.tolist() == [0, 1, 10, 36]
    assert ix.qo_indptr_cpu.tolist() == [0, 1, 5, 14] and ix.kv_lens_cpu.tolist() == kv
    assert ix.q_lim.tolist() == [0, 5, 6, 7, 8] + list(range(17, 26))  # P_b + i: the last key each token sees
    plan = plan_extend(pre, ext, "cpu", HEADS)
    assert ix.q_req.tolist() == plan.q_req.tolist() and ix.q_lim.tolist() == plan.q_lim.tolist()
    assert (ix.max_kv_len, ix.num_tokens) == (26, 14)
    assert all(t.dtype == torch.int32 for t in (ix.kv_indptr, ix.kv_indices, ix.q_req, ix.q_lim, ix.qo_indptr_cpu))


def test_extend_index_reads_no_device_value_on_the_host():
    m = lambda n, dt: torch.empty(*n, dtype=dt, device="meta")  # noqa: E731
    ix = build_extend_index(m((6, 32), torch.int32), m((3,), torch.int64), [0, 5, 17], [1, 4, 9])
    assert all(t.device.type == "meta" for t in (ix.kv_indptr, ix.kv_indices, ix.q_req, ix.q_lim))
    assert (ix.kv_indices.numel(), ix.q_lim.numel()) == (36, 14)
    assert ix.kv_indptr_cpu.device.type == "cpu" and ix.kv_indptr_cpu.tolist() == [0, 1, 10, 36]


# --------------------------------------------------------------------------- routing in the DeepSeek hook

PRE, EXT, REQ_ROWS = [0, 5, 17], [1, 4, 9], [4, 1, 3]


def _extend_setup(choice, monkeypatch, device="cpu", seed=0):
    """A g=2 rank's backend with the given implementation choice, a pool holding every request's
    prefix, and an extend forward batch whose new rows go to their own slots."""
    from sglang.srt.model_executor import forward_context
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_tpla.kernels.select import Choice
    from sglang_tpla.patches import attention_backend as ab

    monkeypatch.setattr(ab, "choose_implementation", lambda *a, **k: Choice(choice, "stand-in", "fa3" if choice == "flashinfer" else None))
    backend, pool, runner, ctx = _backend(device=device, slots=96, context_len=32)
    monkeypatch.setattr(forward_context, "get_attn_backend", lambda: backend)
    d, t = backend.d_ckv, sum(EXT)
    meta = device == "meta"
    g = torch.Generator().manual_seed(seed)
    kv = [p + n for p, n in zip(PRE, EXT)]
    new_slots = []
    if not meta:
        pool.get_key_buffer(0).copy_(torch.randn(pool.size + 1, 1, d + D_PE, generator=g))
        perm = (torch.randperm(pool.size - 1, generator=g)[: sum(kv)] + 1).to(torch.int32)
        r2t, nxt = runner.req_to_token_pool.req_to_token, 0
        for r, p, n in zip(REQ_ROWS, PRE, EXT):
            r2t[r, : p + n] = perm[nxt : nxt + p + n]
            new_slots.append(perm[nxt + p : nxt + p + n])
            nxt += p + n
    out_loc = torch.empty(t, dtype=torch.int64, device="meta") if meta else torch.cat(new_slots).long()
    fb = SimpleNamespace(
        forward_mode=ForwardMode.EXTEND, req_pool_indices=torch.tensor(REQ_ROWS, device=device),
        extend_prefix_lens_cpu=list(PRE), extend_seq_lens_cpu=list(EXT), out_cache_loc=out_loc,
    )  # fmt: skip
    attn = SimpleNamespace(attn_mqa=_layer(d), tpla=SimpleNamespace(runtime=backend.runtime))

    def inputs():
        if meta:
            e = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
            return e(t, HEADS, D_PE), e(t, 1, D_PE), e(HEADS, t, d).transpose(0, 1), e(t, 1, d)
        return (
            torch.randn(t, HEADS, D_PE, generator=g), torch.randn(t, 1, D_PE, generator=g),
            torch.randn(HEADS, t, d, generator=g).transpose(0, 1), torch.randn(t, 1, d, generator=g),
        )  # fmt: skip

    return backend, pool, ctx, fb, attn, inputs


def _contract(q_lat, q_pe, ckv, kpe, kv_indptr, kv_indices, q_req, q_lim, sm_scale, mu=None, out=None, **kw):
    """``tpla_extend_attention``'s contract in plain torch, one query row at a time."""
    rows = []
    for t in range(q_lat.shape[0]):
        start = int(kv_indptr[int(q_req[t])])
        idx = kv_indices[start : start + int(q_lim[t]) + 1].long()
        rows.append(latent_attention(q_lat[t : t + 1], q_pe[t : t + 1], ckv[idx].float(), kpe[idx].float(), sm_scale, mu)[0])
    return torch.stack(rows)


def _run(attn, fb, ins, ctx, layers=1):
    from sglang_tpla.patches import deepseek_attention as da

    q_pe, k_pe, q_lat, k_new = ins
    with ctx:
        return [da._extend(attn, q_pe, k_pe, q_lat, k_new, fb, exact=False) for _ in range(layers)]


def test_cpu_rank_keeps_the_pytorch_path(monkeypatch):
    from sglang_tpla.kernels import tpla_decode

    monkeypatch.setattr(tpla_decode, "tpla_extend_attention", lambda *a, **k: pytest.fail("CPU rank reached the kernel route"))
    backend, pool, ctx, fb, attn, inputs = _extend_setup("torch", monkeypatch)
    (out,) = _run(attn, fb, inputs(), ctx)
    assert out.shape == (sum(EXT), HEADS, backend.d_ckv)
    assert not hasattr(fb, "_tpla_extend_kernel") and hasattr(fb, "_tpla_extend_keys")


def test_triton_route_arguments_give_the_pytorch_paths_result(monkeypatch):
    """The Triton route with the kernel replaced by its contract in plain torch equals the PyTorch
    route on the same pool and queries: the index metadata, the causal limits, the pool's column
    views and the scale reach the kernel right (the kernel itself is checked under the interpreter)."""
    from sglang_tpla.kernels import tpla_decode

    calls = []

    def kernel(*a, **k):
        calls.append((a, k))
        return _contract(*a, **k)

    monkeypatch.setattr(tpla_decode, "tpla_extend_attention", kernel)
    _, _, ctx, fb, attn, inputs = _extend_setup("triton", monkeypatch)
    ins = inputs()
    got = _run(attn, fb, ins, ctx, layers=2)
    _, _, ctx2, fb2, attn2, _ = _extend_setup("torch", monkeypatch)
    (want,) = _run(attn2, fb2, ins, ctx2)
    assert len(calls) == 2 and all(torch.allclose(o, want, atol=1e-5, rtol=1e-5) for o in got)
    a, k = calls[0]
    assert k["max_seq_len"] == 26 and a[6].tolist() == [0, 1, 1, 1, 1] + [2] * 9
    assert calls[0][0][4] is calls[1][0][4]  # the metadata is built once per forward batch, not per layer


def test_flashinfer_route_plans_once_per_forward_causal_from_host_arrays_and_runs_per_layer(monkeypatch):
    import flashinfer.mla

    made = []

    class Wrapper:
        def __init__(self, workspace, backend, use_cuda_graph=False, **buffers):
            self.backend, self.plans, self.runs = backend, [], []
            made.append(self)

        def plan(self, **kw):
            self.plans.append(kw)

        def run(self, query, kv_cache):
            self.runs.append((query, kv_cache))
            return query[0] * 2

    monkeypatch.setattr(flashinfer.mla, "BatchMLAPagedAttentionWrapper", Wrapper)
    backend, pool, ctx, fb, attn, inputs = _extend_setup("flashinfer", monkeypatch)
    ins = inputs()
    outs = _run(attn, fb, ins, ctx, layers=3)
    decode_w, ext = made  # the decode wrapper, and the extend wrapper built on first use
    assert backend.extend_flashinfer().wrapper is ext and ext.backend == "fa3"
    (plan,) = ext.plans  # once per forward batch
    assert len(ext.runs) == 3 and not decode_w.plans
    assert plan["causal"] is True and (plan["query_layout"], plan["kv_cache_layout"], plan["page_size"]) == ("split", "split", 1)
    assert (plan["num_heads"], plan["head_dim_ckv"], plan["head_dim_kpe"]) == (HEADS, backend.d_ckv, D_PE)
    meta = plan["metadata"]
    assert all(t.device.type == "cpu" and t.dtype == torch.int32 for t in (meta.qo_indptr, meta.kv_indptr, meta.kv_len_arr))
    assert meta.qo_indptr.tolist() == [0, 1, 5, 14] and meta.kv_indptr.tolist() == [0, 1, 10, 36]
    assert meta.kv_len_arr.tolist() == [1, 9, 26]
    r2t = backend.req_to_token_pool.req_to_token
    assert torch.equal(meta.kv_indices, torch.cat([r2t[r, : p + n] for r, p, n in zip(REQ_ROWS, PRE, EXT)]))
    (q_lat, q_pe), (ckv, kpe) = ext.runs[0]
    assert q_lat is ins[2] and q_pe is ins[0]
    buf = pool.get_key_buffer(0)
    assert ckv.data_ptr() == buf.data_ptr() and kpe.data_ptr() == buf.data_ptr() + backend.d_ckv * buf.element_size()
    assert ckv.shape[-1] == backend.d_ckv and kpe.shape[-1] == D_PE
    assert all(torch.equal(o, ins[2] * 2) for o in outs)


def test_a_batch_flashinfer_refuses_runs_on_the_triton_kernel(monkeypatch):
    import flashinfer.mla

    from sglang_tpla.kernels import tpla_decode

    class Refusing:
        def __init__(self, workspace, backend, use_cuda_graph=False, **buffers):
            self.plans = 0

        def plan(self, **kw):
            self.plans += 1
            raise ValueError("FA MLA needs at least 99999 work items")

        def run(self, query, kv_cache):
            pytest.fail("ran an unplanned wrapper")

    calls = []
    monkeypatch.setattr(flashinfer.mla, "BatchMLAPagedAttentionWrapper", Refusing)
    monkeypatch.setattr(tpla_decode, "tpla_extend_attention", lambda *a, **k: calls.append(a) or _contract(*a, **k))
    backend, pool, ctx, fb, attn, inputs = _extend_setup("flashinfer", monkeypatch)
    _run(attn, fb, inputs(), ctx, layers=2)
    assert backend.extend_flashinfer().wrapper.plans == 1 and len(calls) == 2


@pytest.mark.parametrize("choice", ["triton", "flashinfer"])
def test_kernel_routes_read_no_device_value_on_the_host(choice, monkeypatch):
    import flashinfer.mla

    from sglang_tpla.kernels import tpla_decode

    class Wrapper:
        def __init__(self, workspace, backend, use_cuda_graph=False, **buffers):
            pass

        def plan(self, **kw):
            assert kw["metadata"].kv_indices.device.type == "meta"

        def run(self, query, kv_cache):
            return torch.empty_like(query[0])

    monkeypatch.setattr(flashinfer.mla, "BatchMLAPagedAttentionWrapper", Wrapper)
    monkeypatch.setattr(tpla_decode, "tpla_extend_attention", lambda q_lat, *a, **k: torch.empty_like(q_lat))
    backend, pool, ctx, fb, attn, inputs = _extend_setup(choice, monkeypatch, device="meta")
    (out,) = _run(attn, fb, inputs(), ctx)
    assert out.device.type == "meta" and tuple(out.shape) == (sum(EXT), HEADS, backend.d_ckv)
    index, fi = fb._tpla_extend_kernel
    assert (fi is not None) == (choice == "flashinfer") and index.q_lim.device.type == "meta"


def test_exact_extend_stays_on_the_pytorch_path(monkeypatch):
    """pd-sep (exact) extend needs the all-gathered full latent: never the slice kernels."""
    from sglang_tpla.kernels import tpla_decode

    monkeypatch.setattr(tpla_decode, "tpla_extend_attention", lambda *a, **k: pytest.fail("exact extend reached a kernel"))
    backend, pool, ctx, fb, attn, inputs = _extend_setup("triton", monkeypatch)
    q_pe, k_pe, q_lat, k_new = inputs()
    from sglang_tpla.patches import deepseek_attention as da

    with ctx:
        with pytest.raises(Exception):  # g=2 exact gathers across ranks; there is no process group here
            da._extend(attn, q_pe, k_pe, q_lat, k_new, fb, exact=True)
    assert not hasattr(fb, "_tpla_extend_kernel")
