"""The ``tpla`` decode backend without a server: per-step metadata, CUDA-graph metadata, no host
sync, and tensors on the right device.

The backend is built over a real ``TPLAMLATokenToKVPool`` and a ``req_to_token`` table, with a
stand-in model runner; its TPLA runtime is the one a g=2 rank would resolve.  Outputs are
compared with ``sglang_tpla.reference.latent_attention`` run per request (shares no code with
the backend's batched torch path, :mod:`sglang_tpla.kernels.torch_decode`).

* No host sync: the decode step runs with every device tensor on the ``meta`` device, where
  ``.item()`` / ``.tolist()`` / ``.cpu()`` / ``bool()`` of a device tensor raise (a meta tensor
  has no data); host arrays SGLang keeps (``seq_lens_cpu``) stay on the CPU.  The same run
  catches a tensor created on the default device instead of the inputs' device.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_tpla.config import from_sources
from sglang_tpla.layout import TPLALayout
from sglang_tpla.metadata import DecodeIndexBuffers, gather_kv_indices
from sglang_tpla.reference import latent_attention

D_PE = 64
HEADS = 4  # heads of the model; g = tp = 2: every rank holds all 4 heads over a 256-wide slice
SCALE = 0.07


def _loop_indices(r2t, rows, lens):
    return torch.cat([r2t[r, :n] for r, n in zip(rows, lens)] + [torch.zeros(0, dtype=r2t.dtype)]).to(torch.int32)


@pytest.mark.parametrize("lens", [[5, 0, 1, 9], [0], [7], [3, 3, 3]])
def test_gather_kv_indices_equals_a_loop_over_requests(lens):
    r2t = torch.randperm(8 * 16).view(8, 16).to(torch.int32)
    rows = torch.tensor([6, 1, 3, 0][: len(lens)])
    seq = torch.tensor(lens)
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = seq.cumsum(0)
    out = torch.full((64,), -1, dtype=torch.int32)
    gather_kv_indices(r2t, rows, seq, indptr, out, sum(lens))
    assert torch.equal(out[: sum(lens)], _loop_indices(r2t, rows.tolist(), lens))
    assert (out[sum(lens) :] == -1).all()  # nothing written past nnz


def test_index_buffers_grow_in_eager_mode_and_refuse_in_graph_mode():
    r2t = torch.arange(4 * 32, dtype=torch.int32).view(4, 32)
    rows, lens = torch.tensor([2, 3]), torch.tensor([30, 20])
    eager = DecodeIndexBuffers(4, 8, "cpu", growable=True)
    eager.fill(r2t, rows, lens, lens.clone(), 2)
    assert eager.nnz == 50 and eager.kv_indices.numel() >= 50
    assert torch.equal(eager.indices, _loop_indices(r2t, [2, 3], [30, 20]))
    assert eager.indptr.tolist() == [0, 30, 50] and eager.indptr_cpu.tolist() == [0, 30, 50]
    graph = DecodeIndexBuffers(4, 8, "cpu", growable=False)
    with pytest.raises(ValueError, match="graph buffers hold"):
        graph.fill(r2t, rows, lens, lens.clone(), 2)
    with pytest.raises(ValueError, match="sized for"):
        eager.fill(r2t, torch.arange(5), torch.ones(5, dtype=torch.long), torch.ones(5, dtype=torch.long), 5)


# --------------------------------------------------------------------------- a backend on one device


def _backend(device="cpu", kv_dtype=torch.float32, slots=64, max_reqs=6, context_len=24, rank=1, g=2):
    from sglang.srt.runtime_context import get_parallel

    from sglang_tpla.patches import runtime as rt_mod
    from sglang_tpla.patches.attention_backend import TPLAAttnBackend
    from sglang_tpla.patches.kv_pool import TPLAMLATokenToKVPool

    hf = SimpleNamespace(kv_lora_rank=512, qk_rope_head_dim=D_PE, num_attention_heads=HEADS)
    layout = TPLALayout(tp=2, g=g, num_heads=HEADS)
    rt_mod._cache[id(hf)] = rt_mod.TPLARuntime(from_sources({"g": g, "transform": "none"}, {}), layout, rank)
    lo, hi = layout.rank_slice(rank).latent_start, layout.rank_slice(rank).latent_end
    pool = TPLAMLATokenToKVPool(
        slots, page_size=1, dtype=kv_dtype, kv_lora_rank=512, qk_rope_head_dim=D_PE, layer_num=1, device=device,
        enable_memory_saver=False, latent_range=(lo, hi), full_kv_lora_rank=512,
    )  # fmt: skip
    runner = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf, scaling=SCALE, context_len=context_len),
        device=device, dtype=torch.float32, kv_cache_dtype=kv_dtype, kv_index_translator=None,
        req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(max_reqs, context_len, dtype=torch.int32, device=device), size=max_reqs),
        token_to_kv_pool=pool,
    )  # fmt: skip
    backend = TPLAAttnBackend(runner)
    ctx = get_parallel().override(dcp_enabled=False)
    return backend, pool, runner, ctx


def _layer(d):
    return SimpleNamespace(layer_id=0, tp_q_head_num=HEADS, qk_head_dim=d + D_PE, scaling=SCALE, v_head_dim=d)


def _batch(rows, lens, device="cpu", pad_to=None, out_loc=None):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    rows, lens = list(rows), list(lens)
    if pad_to is not None:  # as SGLang's graph runner pads: request row 0, seq_len fill value 1
        rows += [0] * (pad_to - len(rows))
        lens += [1] * (pad_to - len(lens))
    return SimpleNamespace(
        forward_mode=ForwardMode.DECODE, batch_size=len(rows),
        req_pool_indices=torch.tensor(rows, dtype=torch.int64, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int64, device=device),
        seq_lens_cpu=torch.tensor(lens, dtype=torch.int64),
        out_cache_loc=out_loc,
    )  # fmt: skip


def _filled(kv_dtype=torch.float32, seed=0):
    """A backend whose pool holds random rows and whose req_to_token maps 3 ragged requests."""
    g = torch.Generator().manual_seed(seed)
    backend, pool, runner, ctx = _backend(kv_dtype=kv_dtype)
    d = backend.d_ckv
    rows = torch.randn(pool.size + 1, 1, d + D_PE, generator=g)
    pool.get_key_buffer(0).copy_(rows.to(kv_dtype))
    r2t = runner.req_to_token_pool.req_to_token
    perm = torch.randperm(pool.size, generator=g)[: 3 * 20].view(3, 20).to(torch.int32) + 1
    r2t[2, :20], r2t[4, :20], r2t[5, :20] = perm
    return backend, pool, ctx, d, g


def _reference(backend, pool, q, rows, lens):
    flat = pool.get_key_buffer(0).float().view(pool.size + 1, -1)
    r2t = backend.req_to_token_pool.req_to_token
    d = backend.d_ckv
    out = []
    for b, (r, n) in enumerate(zip(rows, lens)):
        ctx = flat[r2t[r, :n].long()]
        out.append(latent_attention(q[b : b + 1, :, :d], q[b : b + 1, :, d:], ctx[:, :d], ctx[:, d:], SCALE)[0])
    return torch.stack(out)


REQS, LENS = [5, 2, 4], [20, 1, 13]


def test_eager_decode_matches_the_per_request_reference():
    backend, pool, ctx, d, g = _filled()
    q = torch.randn(3, HEADS, d + D_PE, generator=g)
    with ctx:
        backend.init_forward_metadata(_batch(REQS, LENS))
        out = backend.forward_decode(q.reshape(3, -1), None, None, _layer(d), None, save_kv_cache=False)
    ref = _reference(backend, pool, q, REQS, LENS)
    assert torch.allclose(out.view(3, HEADS, d), ref, atol=2e-5, rtol=1e-5)
    assert backend.choice.impl == "torch"


def test_fp8_kv_decode_matches_the_reference_on_the_dequantized_rows():
    backend, pool, ctx, d, g = _filled(kv_dtype=torch.float8_e4m3fn)
    assert pool.get_key_buffer(0).dtype == torch.float8_e4m3fn and pool.kv_buffer[0].element_size() == 1
    q = torch.randn(3, HEADS, d + D_PE, generator=g)
    with ctx:
        backend.init_forward_metadata(_batch(REQS, LENS))
        out = backend.forward_decode(q.reshape(3, -1), None, None, _layer(d), None, save_kv_cache=False)
    ref = _reference(backend, pool, q, REQS, LENS)  # the fp8 rows, dequantized (scale 1)
    assert torch.allclose(out.view(3, HEADS, d), ref, atol=2e-5, rtol=1e-5)


def test_graph_capture_and_padded_replay_metadata_and_output_equal_eager():
    backend, pool, ctx, d, g = _filled()
    q = torch.randn(4, HEADS, d + D_PE, generator=g)
    layer = _layer(d)
    with ctx:
        backend.init_forward_metadata(_batch(REQS, LENS))
        eager_meta = (backend.forward_metadata.buffers.indptr.clone(), backend.forward_metadata.buffers.indices.clone())
        eager = backend.forward_decode(q[:3].reshape(3, -1), None, None, layer, None, save_kv_cache=False).clone()

        backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
        graph = backend.graph
        # capture at bs=4 with SGLang's capture-time dummy batch (every request of length 1)
        backend.init_forward_metadata_out_graph(_batch([0] * 4, [1] * 4), in_capture=True)
        ptrs = (graph.kv_indptr.data_ptr(), graph.kv_indices.data_ptr())
        # replay: the same 3 live requests, padded to the captured 4
        backend.init_forward_metadata_out_graph(_batch(REQS, LENS, pad_to=4))
        step = backend.forward_metadata
        assert step.buffers is graph and (graph.kv_indptr.data_ptr(), graph.kv_indices.data_ptr()) == ptrs
        assert torch.equal(step.buffers.indptr[:4], eager_meta[0])
        assert torch.equal(step.buffers.indices[: int(eager_meta[0][-1])], eager_meta[1])
        assert step.buffers.indptr.tolist()[-1] == sum(LENS) + 1  # the padded lane reads one token
        replay = backend.forward_decode(q.reshape(4, -1), None, None, layer, None, save_kv_cache=False)
    assert torch.equal(replay.view(4, -1)[:3], eager.view(3, -1))
    assert backend.get_cuda_graph_seq_len_fill_value() == 1


def test_decode_step_reads_no_device_value_on_the_host_and_creates_nothing_off_device():
    """Every device tensor on ``meta``: a host sync or a tensor made on the CPU raises."""
    backend, pool, runner, ctx = _backend(device="meta", kv_dtype=torch.bfloat16)
    assert backend.choice.impl == "torch"
    d = backend.d_ckv
    q = torch.empty(3, HEADS * (d + D_PE), device="meta", dtype=torch.float32)
    k = torch.empty(3, 1, d + D_PE, device="meta", dtype=torch.float32)
    loc = torch.empty(3, dtype=torch.int64, device="meta")
    with ctx:
        backend.init_forward_metadata(_batch(REQS, LENS, device="meta", out_loc=loc))
        out = backend.forward_decode(q, k, k[..., :d], _layer(d), _batch(REQS, LENS, device="meta", out_loc=loc))
        backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
        backend.init_forward_metadata_out_graph(_batch(REQS, LENS, device="meta", pad_to=4))
        out_g = backend.forward_decode(q.new_empty(4, q.shape[1]), None, None, _layer(d), None, save_kv_cache=False)
    assert out.device.type == "meta" and tuple(out.shape) == (3, HEADS * d)
    assert out_g.device.type == "meta" and tuple(out_g.shape) == (4, HEADS * d)


def test_the_meta_check_does_catch_a_host_sync_and_a_cpu_tensor():
    """The guard above can fail: the two mistakes it exists for raise on meta tensors."""
    t = torch.ones(3, device="meta")
    with pytest.raises(Exception):
        t.tolist()
    with pytest.raises(Exception):
        t.sum().item()
    with pytest.raises(Exception):
        t + torch.arange(3)  # a tensor created on the default (CPU) device


def test_reference_causal_attention_runs_on_the_inputs_device():
    q = torch.empty(2, 3, 16, device="meta")
    out = latent_attention(q, q[..., :8], torch.empty(5, 16, device="meta"), torch.empty(5, 8, device="meta"), 0.1, causal_offset=3)
    assert out.device.type == "meta"


@pytest.mark.parametrize("which", ["exact", "tpla"])
def test_extend_hooks_run_on_the_inputs_device(which, monkeypatch):
    """The extend paths (exact MLA over a cached prefix; ``prefill: tpla``) with every device tensor
    on ``meta``: host lengths come from SGLang's ``*_cpu`` lists only."""
    from sglang.srt.model_executor import forward_context
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_tpla.patches import deepseek_attention as da

    backend, pool, runner, ctx = _backend(device="meta", g=1 if which == "exact" else 2, rank=0)
    monkeypatch.setattr(forward_context, "get_attn_backend", lambda: backend)
    d, n = backend.d_ckv, 5  # 2 requests: prefixes 3 and 0, 2 and 3 new tokens
    attn = SimpleNamespace(attn_mqa=_layer(d), tpla=SimpleNamespace(runtime=backend.runtime))
    fb = SimpleNamespace(
        forward_mode=ForwardMode.EXTEND, req_pool_indices=torch.zeros(2, dtype=torch.int64, device="meta"),
        extend_prefix_lens_cpu=[3, 0], extend_seq_lens_cpu=[2, 3], out_cache_loc=torch.zeros(n, dtype=torch.int64, device="meta"),
    )  # fmt: skip
    m = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    with ctx:
        out = da._extend(attn, m(n, HEADS, D_PE), m(n, 1, D_PE), m(n, HEADS, d), m(n, 1, d), fb, exact=which == "exact")
    assert out.device.type == "meta" and tuple(out.shape) == (n, HEADS, d)


def test_flashinfer_route_plans_from_host_arrays_and_replans_captured_wrappers_without_sync(monkeypatch):
    """The FlashInfer route of the backend (stand-in wrapper: FlashInfer needs CUDA): eager plans once
    per step from host arrays; capture builds one graph wrapper per batch size over the graph buffers
    and plans it for real; replay goes through SGLang's ``fast_mla_decode_plan``."""
    import flashinfer.mla
    from sglang.srt.layers.attention import flashinfer_mla_backend

    from sglang_tpla.kernels.select import Choice
    from sglang_tpla.patches import attention_backend as ab

    made, fast = [], []

    class Wrapper:
        def __init__(self, workspace, backend, use_cuda_graph=False, **buffers):
            self.use_cuda_graph, self.buffers, self.plans = use_cuda_graph, buffers, []
            made.append(self)

        def plan(self, **kw):
            self.plans.append(kw)

    monkeypatch.setattr(flashinfer.mla, "BatchMLAPagedAttentionWrapper", Wrapper)
    monkeypatch.setattr(flashinfer_mla_backend, "fast_mla_decode_plan", lambda w, *a: fast.append((w, a)))
    monkeypatch.setattr(ab, "choose_implementation", lambda *a, **k: Choice("flashinfer", "stand-in", "fa3"))
    backend, pool, runner, ctx = _backend()
    r2t = runner.req_to_token_pool.req_to_token
    r2t[2, :5] = torch.arange(10, 15)
    with ctx:
        backend.init_forward_metadata(_batch([2, 2], [5, 3]))
        (eager,) = made
        meta = eager.plans[-1]["metadata"]
        assert all(t.device.type == "cpu" for t in (meta.qo_indptr, meta.kv_indptr, meta.kv_len_arr))  # host arrays
        assert meta.kv_indptr.tolist() == [0, 5, 8] and meta.kv_indices.tolist() == [10, 11, 12, 13, 14, 10, 11, 12]

        backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
        for bs in (1, 4):
            backend.init_forward_metadata_out_graph(_batch([0] * bs, [1] * bs), in_capture=True)
        w1, w4 = made[1:]
        assert w1.use_cuda_graph and w4.use_cuda_graph and len(w1.plans) == len(w4.plans) == 1
        assert w4.buffers["kv_indices"].data_ptr() == backend.graph.kv_indices.data_ptr()
        assert w4.buffers["kv_indptr"].data_ptr() == backend.graph.kv_indptr.data_ptr()
        backend.init_forward_metadata_out_graph(_batch([2, 2], [5, 3], pad_to=4))  # replay at bs 4
        assert len(w4.plans) == 1 and len(fast) == 1 and fast[0][0] is w4
        qo_cpu, indptr_cpu, indices, lens_cpu = fast[0][1][:4]
        assert qo_cpu.tolist() == [0, 1, 2, 3, 4] and indptr_cpu.tolist() == [0, 5, 8, 9, 10] and lens_cpu.tolist() == [5, 3, 1, 1]
        assert indptr_cpu.device.type == "cpu" and indices.data_ptr() == backend.graph.kv_indices.data_ptr()
        assert backend.forward_metadata.flashinfer.wrapper is w4


def test_cuda_graph_decision_keeps_decode_graphs_and_turns_prefill_graphs_off(caplog):
    import logging

    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, default_cuda_graph_config, with_phase

    from sglang_tpla.patches.attention_backend import _graph_phases

    cfg = with_phase(with_phase(default_cuda_graph_config(), Phase.DECODE, backend=Backend.FULL), Phase.PREFILL, backend=Backend.BREAKABLE)
    args = SimpleNamespace(decode_attention_backend="tpla", attention_backend=None, cuda_graph_config=cfg)
    with caplog.at_level(logging.INFO, logger="sglang_tpla"):
        _graph_phases(None, args)
    (source, fields), = args._resolved_overrides
    assert fields["cuda_graph_config"].decode.backend == Backend.FULL
    assert fields["cuda_graph_config"].prefill.backend == Backend.DISABLED
    assert "decode CUDA graph backend as SGLang resolved it: full" in caplog.text and "prefill CUDA graphs (breakable) disabled" in caplog.text
    stock = SimpleNamespace(decode_attention_backend="flashinfer", attention_backend=None, cuda_graph_config=cfg)
    _graph_phases(None, stock)
    assert not hasattr(stock, "_resolved_overrides")  # TPLA off: SGLang's choice untouched
