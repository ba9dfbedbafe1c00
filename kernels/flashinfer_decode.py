"""TPLA decode through FlashInfer's MLA wrapper (``flashinfer.mla.BatchMLAPagedAttentionWrapper``).

One wrapper per rank for eager decode, plus one per captured batch size in CUDA-graph mode
(``use_cuda_graph=True`` over the backend's persistent index buffers, as SGLang's own
``FlashInferMLAAttnBackend`` does).  ``head_dim_ckv = 512/g`` (the rank's slice),
``head_dim_kpe = 64``, split query and KV layouts.  The KV arguments are strided column views
of the rank's pool buffer ``[slots, 1, D + 64]`` (page size 1: token-slot ``kv_indices``), so
nothing is copied.

Planning (once per decode step, reused by every layer: all layers share the softmax scale)
takes the lengths as **host** arrays (``qo_indptr``, ``kv_indptr``, ``kv_len_arr``: built from
SGLang's ``seq_lens_cpu``) and the slots on the device, so planning reads no device data.  A
graph wrapper is planned for real once at capture; on replay ``fast_plan`` (SGLang's
``fast_mla_decode_plan``, which re-plans into the captured buffers without a stream sync) is
used instead.  Needs CUDA; on CPU only the argument plumbing is tested (against a stand-in).
"""

from __future__ import annotations

import torch

WORKSPACE_BYTES = 128 << 20


class FlashInferTPLADecode:
    def __init__(
        self,
        workspace: torch.Tensor,
        backend: str,
        num_heads: int,
        d_ckv: int,
        d_pe: int,
        sm_scale: float,
        dtype: torch.dtype,
        *,
        graph_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        fast_plan=None,
        wrapper_cls=None,
    ):
        """``graph_buffers``: ``(qo_indptr [bs+1], kv_indptr [bs+1], kv_indices [cap], kv_lens [bs])`` device
        int32 buffers of one captured batch size; ``fast_plan(wrapper, qo_indptr_cpu, kv_indptr_cpu,
        kv_indices, kv_len_arr_cpu, num_heads, d_ckv, d_pe, page_size, causal, sm_scale, q_dtype, kv_dtype)``
        re-plans a captured wrapper on replay."""
        if wrapper_cls is None:
            from flashinfer.mla import BatchMLAPagedAttentionWrapper as wrapper_cls
        if graph_buffers is None:
            self.wrapper = wrapper_cls(workspace, backend=backend)
        else:
            qo, kv, idx, lens = graph_buffers
            self.wrapper = wrapper_cls(
                workspace, use_cuda_graph=True, qo_indptr=qo, kv_indptr=kv, kv_indices=idx, kv_len_arr=lens, backend=backend
            )
        self.graph = graph_buffers is not None
        self.fast_plan = fast_plan
        self.num_heads, self.d_ckv, self.d_pe = num_heads, d_ckv, d_pe
        self.sm_scale, self.dtype = sm_scale, dtype
        self.planned = False

    def plan(self, qo_indptr_cpu, kv_indptr_cpu, kv_indices: torch.Tensor, kv_lens_cpu) -> None:
        """Once per decode step: host ``qo_indptr [B+1]``, ``kv_indptr [B+1]``, ``kv_lens [B]`` and the
        device ``kv_indices`` (token slots), all int32.  A graph wrapper plans for real the first time
        (at capture) and through ``fast_plan`` afterwards (replay)."""
        if self.graph and self.planned:
            self.fast_plan(
                self.wrapper, qo_indptr_cpu, kv_indptr_cpu, kv_indices, kv_lens_cpu, self.num_heads, self.d_ckv,
                self.d_pe, 1, False, self.sm_scale, self.dtype, self.dtype,
            )  # fmt: skip
            return
        from flashinfer.mla import MLAPlanMetadata  # >= 0.7.2 (select.py refuses older)

        meta = MLAPlanMetadata.csr(qo_indptr_cpu, kv_indptr_cpu, kv_indices, kv_lens_cpu)
        self.wrapper.plan(
            metadata=meta, num_heads=self.num_heads, head_dim_ckv=self.d_ckv, head_dim_kpe=self.d_pe, page_size=1,
            causal=False, sm_scale=self.sm_scale, q_data_type=self.dtype, kv_data_type=self.dtype,
            query_layout="split", kv_cache_layout="split",
        )
        self.planned = True

    def run(self, q_lat: torch.Tensor, q_pe: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``q_lat [B, H, D]``, ``q_pe [B, H, 64]``, ``rows [slots, 1, D + 64]`` (the pool buffer) -> ``[B, H, D]``."""
        if not self.planned:
            raise RuntimeError("FlashInferTPLADecode.run before plan (call plan once per decode step)")
        rows = rows.view(rows.shape[0], 1, -1)
        ckv, kpe = rows[..., : self.d_ckv], rows[..., self.d_ckv :]  # strided views, no copy
        return self.wrapper.run(query=(q_lat, q_pe), kv_cache=(ckv, kpe))
