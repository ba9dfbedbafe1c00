"""TPLA attention inside SGLang's ``DeepseekV2AttentionMLA`` (DeepSeek-V2/V3, Kimi-K2).

Hooks (SGLang 0.5.23), all gated on ``self.tpla`` (set by :mod:`.weights` when TPLA is on):

* AROUND ``DeepseekV2AttentionMLA.dispatch_attn_forward_method``: extend batches that hit a
  cached prefix take the absorbed MLA path (the MHA prefix paths would read 512-wide
  latents from the sliced pool).
* AROUND ``DeepseekMLAForwardMixin.forward_absorb_prepare`` (decode): every rank computes
  the full latent (replicated ``kv_a_proj``) with exact RMSNorm (or, with ``norm: local``, its
  latent slice over the slice's own RMS: the paper's local RMSNorm, decode rows only; the
  prefill rows stay exact, as the reference's ``pd_sep``), the queries of all heads
  of its group (its rows of ``q_b_proj``) absorbed with its latent columns of W_UK.
* AROUND ``DeepseekMLAForwardMixin.forward_absorb_core``: decode attends over the rank's
  slice with its own softmax (the ``tpla`` backend), applies its rows of W_UV and its heads'
  o_proj; SGLang's usual all-reduce sums the ranks.  Extend batches (prefix hits, chunked
  prefill; every extend with ``prefill: tpla``) run :func:`_extend`: batched over the requests,
  tiled with an online softmax so memory does not grow with the prefix; exact MLA recovers
  each key chunk's full latent across the latent groups with one all-gather, so prefill with
  radix-cache hits and chunked prefill is what stock MLA computes.  ``prefill: tpla`` on a CUDA
  rank runs the decode kernels with multi-token causal queries instead (FlashInfer's causal MLA,
  or the Triton multi-query kernel), following the rank's decode choice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


_MLA_CLS = "sglang.srt.models.deepseek_v2.DeepseekV2AttentionMLA"
_MIXIN = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla.DeepseekMLAForwardMixin"
HOOK_TARGETS = (
    _MLA_CLS + ".dispatch_attn_forward_method",
    _MIXIN + ".forward_absorb_prepare",
    _MIXIN + ".forward_absorb_core",
    "sglang.srt.layers.radix_attention.RadixAttention",
    "sglang.srt.layers.layer_boundary.adapters.attention.get_attn_tp_context",
    "sglang.srt.mem_cache.memory_pool.KVWriteLoc",
    "sglang.srt.model_executor.forward_context.get_attn_backend",
    "sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods.AttnForwardMethod",
)


def _dispatch(orig, self, forward_batch):
    method = orig(self, forward_batch)
    if getattr(self, "tpla", None) is None or forward_batch.forward_mode.is_decode_or_idle():
        return method
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod

    if _tpla_step(self, forward_batch):  # prefill='tpla': extend runs the TPLA absorbed path
        return AttnForwardMethod.MLA
    if forward_batch.extend_prefix_lens_cpu is not None and sum(forward_batch.extend_prefix_lens_cpu) > 0:
        return AttnForwardMethod.MLA
    return method


def _tpla_step(self, forward_batch) -> bool:
    """Does this batch attend with TPLA?  Decode always; extend only with ``prefill='tpla'``
    (the paper's plain TPLA, "TPLA everywhere"); the default ``prefill='exact'`` is pd-sep."""
    mode = forward_batch.forward_mode
    if mode.is_decode():
        return True
    return (
        mode.is_extend() and not mode.is_target_verify() and self.tpla.runtime.config.prefill == "tpla"
    )


def _tpla_attn(self):
    w = self.tpla
    if w.attn is None:
        from sglang.srt.layers.radix_attention import RadixAttention

        d = w.latent_end - w.latent_start
        w.attn = RadixAttention(
            w.num_heads, d + self.qk_rope_head_dim, self.scaling, num_kv_heads=1, layer_id=self.layer_id, v_head_dim=d
        )
    return w.attn


def _prepare(orig, self, positions, hidden_states, forward_batch, zero_allocator, *args, **kwargs):
    w = getattr(self, "tpla", None)
    if w is None or not _tpla_step(self, forward_batch):
        return orig(self, positions, hidden_states, forward_batch, zero_allocator, *args, **kwargs)
    r = self.kv_lora_rank
    if self.q_lora_rank is not None:
        from sglang.srt.layers.layer_boundary.adapters.attention import get_attn_tp_context

        q, latent = get_attn_tp_context().fetch_qkv_latent().split([self.q_lora_rank, r + self.qk_rope_head_dim], dim=-1)
        q = self.q_a_layernorm(q)
    else:
        q, latent = hidden_states, self.kv_a_proj_with_mqa(hidden_states)[0]
    lo, hi = w.latent_start, w.latent_end
    if w.local_norm_scale is None:  # exact RMSNorm over the full latent, then this rank's columns
        k_slice = self.kv_a_layernorm(latent[..., :r])[..., lo:hi]
    else:  # norm 'local': this slice over its own RMS (x sqrt(g p_j), x the gain's slice)
        k_slice = _local_norm(self, latent[..., lo:hi], w)
    q = _project_q(self, q).view(-1, w.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim)
    q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
    k_pe = latent[..., r:].unsqueeze(1)
    q_lat = torch.bmm(q_nope.transpose(0, 1), w.w_kc).transpose(0, 1)  # [T, Hg, D]
    q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe)
    return (q_pe, k_pe, q_lat, k_slice.unsqueeze(1), forward_batch, zero_allocator, positions, None, None, None)


def _project_q(self, q: torch.Tensor) -> torch.Tensor:
    """``q_b_proj`` (``q_proj``) for the heads this rank attends with: ``[T, q_lora]`` -> ``[T, Hg * (nope + rope)]``.

    SGLang's own head-sharded module computes this rank's ``H/TP`` heads (its quant method: block
    FP8, bf16, ...); the ``g`` head peers all-gather them (:mod:`sglang_tpla.comm`).  No q weight copy."""
    mod = self.q_b_proj if hasattr(self, "q_b_proj") else self.q_proj
    return self.tpla.peers.all_gather_q(mod(q)[0])


def _project_o(self, o: torch.Tensor) -> torch.Tensor:
    """This rank's latent-slice attention output ``[T, Hg, D]`` through its W_UV rows, reduce-scattered
    over the ``g`` head peers (sums the latent slices, keeps this rank's ``H/TP`` heads), then SGLang's
    own head-sharded ``o_proj``: this rank's partial of the layer output (SGLang's all-reduce sums the ranks)."""
    w = self.tpla
    v = torch.bmm(o.transpose(0, 1), w.w_vc.to(o.dtype)).transpose(0, 1)  # [T, Hg, v]
    return self.o_proj(w.peers.reduce_scatter_heads(v).flatten(1, 2))[0]


def _local_norm(self, cs: torch.Tensor, w) -> torch.Tensor:
    """This rank's latent slice ``[T, R/g]``: ``c_j / RMS(c_j) * sqrt(g p_j) * gamma_j`` (the
    reference's ``normalize_latent(c, eps, 'local', g, p) * gamma``, restricted to the slice)."""
    ln = self.kv_a_layernorm
    x = cs.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ln.variance_epsilon) * w.local_norm_scale
    return (x * ln.weight[w.latent_start : w.latent_end].float()).to(cs.dtype)


def _core(orig, self, q_pe, k_pe, q_nope_out, k_nope, forward_batch, *args, **kwargs):
    w = getattr(self, "tpla", None)
    if w is None:
        return orig(self, q_pe, k_pe, q_nope_out, k_nope, forward_batch, *args, **kwargs)
    if forward_batch.forward_mode.is_decode():
        q = torch.cat([q_nope_out, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        o = _tpla_attn(self)(q, k, k_nope, forward_batch, save_kv_cache=True)
        return _project_o(self, o.view(-1, w.num_heads, w.latent_end - w.latent_start))
    if _tpla_step(self, forward_batch):  # extend with prefill='tpla'
        return _project_o(self, _extend(self, q_pe, k_pe, q_nope_out, k_nope, forward_batch, exact=False))
    if forward_batch.forward_mode.is_extend() and not forward_batch.forward_mode.is_target_verify():
        o = _extend(self, q_pe, k_pe, q_nope_out, k_nope, forward_batch, exact=True)
        v = torch.bmm(o.transpose(0, 1), self.w_vc.to(o.dtype)).transpose(0, 1).flatten(1, 2)
        return self.o_proj(v)[0]
    raise RuntimeError(f"TPLA: forward mode {forward_batch.forward_mode} is not supported (speculative decoding is not)")


def _gather_latent(rows: torch.Tensor, rt) -> torch.Tensor:
    """``[n, D + rope]`` rows of this rank's slice -> the full ``[n, R]`` latent, across the latent groups
    (one all-gather over the attention TP group)."""
    from sglang.srt.runtime_context import get_parallel

    d = rt.layout.slice_width
    group = get_parallel().attn_tp_group
    wire = rows.contiguous()
    if wire.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # fp8 KV cache: collectives move bytes
        wire = wire.view(torch.uint8)
    parts = [torch.empty_like(wire) for _ in range(group.world_size)]
    dist.all_gather(parts, wire, group=group.device_group)
    parts = [p.view(rows.dtype) for p in parts]
    return torch.cat([parts[rt.layout.group_ranks(j)[0]][:, :d] for j in range(rt.layout.g)], dim=-1)


def _tpla_backend(backend):
    """The rank's ``tpla`` decode backend: ``backend`` itself or the decode half of SGLang's hybrid
    prefill/decode backend (``None`` if neither is)."""
    from .attention_backend import TPLAAttnBackend

    for b in (backend, getattr(backend, "decode_backend", None)):
        if isinstance(b, TPLAAttnBackend):
            return b
    return None


def _kernel_backend(backend):
    """The rank's ``tpla`` decode backend when its per-rank choice (:mod:`sglang_tpla.kernels.select`) is
    a GPU kernel, ``flashinfer`` or ``triton``; ``None`` for the plain-PyTorch choice (CPU, or forced)."""
    tb = _tpla_backend(backend)
    return tb if tb is not None and tb.choice.impl in ("flashinfer", "triton") else None


def _extend_index(backend, forward_batch):
    """The batch's :class:`sglang_tpla.metadata.ExtendIndex` (key slots: each request's cached prefix,
    then its new tokens; per-token request and causal limit), built once per forward (not per layer)
    from SGLang's host lengths, with the rank's slot gather (SGLang's index kernel on CUDA).  Every
    extend route reads it: the tiled torch path and the kernel routes."""
    index = getattr(forward_batch, "_tpla_extend_index", None)
    if index is None:
        from sglang_tpla.metadata import build_extend_index

        tb = _tpla_backend(backend)
        index = forward_batch._tpla_extend_index = build_extend_index(
            backend.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, forward_batch.extend_prefix_lens_cpu,
            forward_batch.extend_seq_lens_cpu, fill=None if tb is None else tb._fill,
        )  # fmt: skip
    return index


def _extend_keys(backend, forward_batch, num_heads: int):
    """The batch's key slots (:func:`_extend_index`) and the torch path's tiling, once per forward."""
    cached = getattr(forward_batch, "_tpla_extend_keys", None)
    if cached is None:
        from sglang_tpla.kernels.torch_extend import plan_extend

        index = _extend_index(backend, forward_batch)
        plan = plan_extend(
            forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu, index.kv_indices.device, num_heads
        )
        cached = forward_batch._tpla_extend_keys = (index.kv_indices, plan)
    return cached


_fallbacks_logged = 0


def _kernel_extend_step(tb, forward_batch):
    """``(ExtendIndex, planned FlashInferTPLAExtend or None)`` of a ``prefill: tpla`` extend batch on
    the kernel routes, built once per forward batch (cached on it, like :func:`_extend_keys`) from
    SGLang's host lengths: FlashInfer is planned here, once, and every layer runs the plan.  A batch
    FlashInfer refuses at plan time runs on the Triton multi-query kernel (``None``)."""
    global _fallbacks_logged
    step = getattr(forward_batch, "_tpla_extend_kernel", None)
    if step is None:
        index = _extend_index(tb, forward_batch)
        fi = None
        if tb.choice.impl == "flashinfer" and index.num_tokens:
            fi = tb.extend_flashinfer()
            why = fi.plan(index.qo_indptr_cpu, index.kv_indptr_cpu, index.kv_indices, index.kv_lens_cpu)
            if why is not None:
                import logging

                level = logging.WARNING if _fallbacks_logged < 3 else logging.DEBUG
                _fallbacks_logged += 1
                logging.getLogger("sglang_tpla").log(
                    level, "TPLA extend: FlashInfer refused this batch (%s); running it on the Triton kernel", why
                )
                fi = None
        step = forward_batch._tpla_extend_kernel = (index, fi)
    return step


def _extend_kernel(tb, rows, q_lat, q_pe, forward_batch, sm_scale: float):
    """``prefill: tpla`` on the GPU routes: FlashInfer's causal MLA (planned once per forward batch)
    or the Triton multi-query kernel (one row per query token, its causal key range read on the
    device); ``rows`` is the layer's pool buffer ``[slots, 1, D + 64]``."""
    index, fi = _kernel_extend_step(tb, forward_batch)
    if fi is not None:
        return fi.run(q_lat, q_pe, rows)
    from sglang_tpla.kernels.tpla_decode import tpla_extend_attention

    flat = rows.view(rows.shape[0], -1)
    if flat.dtype == torch.uint8 and tb.kv_dtype.itemsize == 1:  # an fp8 pool in SGLang's store dtype
        flat = flat.view(tb.kv_dtype)
    d = tb.d_ckv
    return tpla_extend_attention(
        q_lat, q_pe, flat[:, :d], flat[:, d:], index.kv_indptr, index.kv_indices, index.q_req, index.q_lim, sm_scale,
        kv_scale=tb.kv_scale, max_seq_len=index.max_kv_len,
    )  # fmt: skip


def _extend(self, q_pe, k_pe, q_lat, k_new, forward_batch, exact: bool):
    """Attention of an extend batch over the latent-split pool, every request over its cached prefix
    and its new tokens (causal), batched over the requests.  The new rows are written first and
    every key is read back from the pool, so the extend sees what later steps read (fp8 rounding
    included).

    * ``exact`` (pd-sep): exact absorbed MLA, ``q_lat [T, H_loc, R]``; each key chunk's full latent is
      recovered across the latent groups with one all-gather.  Returns ``[T, H_loc, R]``.  Always the
      tiled PyTorch path (:func:`sglang_tpla.kernels.torch_extend.extend_attention`, bounded memory):
      the decode kernels read one rank's slice, not the all-gathered full latent.
    * otherwise (``prefill: tpla``): this rank's heads over its own slice, own softmax, no collective,
      exactly like a decode step.  Returns ``[T, Hg, D]``.  The route follows the rank's decode choice
      (:mod:`sglang_tpla.kernels.select`): FlashInfer's causal MLA (Triton multi-query kernel for a
      batch FlashInfer refuses), the Triton multi-query kernel, or, on CPU (``torch``), the tiled
      PyTorch path.
    """
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc
    from sglang.srt.model_executor.forward_context import get_attn_backend

    from sglang_tpla.kernels.torch_extend import extend_attention

    backend = get_attn_backend()
    pool, layer, rt = backend.token_to_kv_pool, self.attn_mqa, self.tpla.runtime
    pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), torch.cat([k_new, k_pe], -1), None)
    tb = None if exact else _kernel_backend(backend)
    if tb is not None:
        return _extend_kernel(tb, pool.get_key_buffer(layer.layer_id), q_lat, q_pe, forward_batch, layer.scaling)
    slots, plan = _extend_keys(backend, forward_batch, q_lat.shape[1])
    buf = pool.get_key_buffer(layer.layer_id)
    d = rt.layout.slice_width
    gather = exact and rt.layout.g > 1

    def rows(k0: int, k1: int):
        r = buf[slots[k0:k1]].reshape(k1 - k0, -1)  # [n, D + rope], this rank's slice
        return (_gather_latent(r, rt) if gather else r[:, :d]), r[:, d:]

    return extend_attention(q_lat, q_pe, rows, plan, layer.scaling)


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGETS[0], _dispatch, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS[1], _prepare, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS[2], _core, HookType.AROUND)
