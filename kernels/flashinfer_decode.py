"""TPLA decode through FlashInfer's MLA wrapper (``flashinfer.mla.BatchMLAPagedAttentionWrapper``).

One wrapper per rank: ``head_dim_ckv = 512/g`` (the rank's slice), ``head_dim_kpe = 64``,
split query and KV layouts.  The KV arguments are strided column views of the rank's pool
buffer ``[slots, 1, D + 64]`` (page size 1: SGLang's token-slot ``kv_indices``), so nothing is
copied.  :meth:`plan` runs once per decode step (int32 metadata) and the plan is reused by every
layer (all layers share the softmax scale).  Needs CUDA; on CPU only the argument plumbing is
tested (against a stand-in wrapper).
"""

from __future__ import annotations

import torch

WORKSPACE_BYTES = 128 << 20


class FlashInferTPLADecode:
    def __init__(self, device, backend: str, num_heads: int, d_ckv: int, d_pe: int, sm_scale: float, dtype: torch.dtype, wrapper_cls=None):
        if wrapper_cls is None:
            from flashinfer.mla import BatchMLAPagedAttentionWrapper as wrapper_cls
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = wrapper_cls(self.workspace, backend=backend)
        self.num_heads, self.d_ckv, self.d_pe = num_heads, d_ckv, d_pe
        self.sm_scale, self.dtype, self.device = sm_scale, dtype, device
        self.planned = False

    def plan(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor) -> None:
        """Once per decode step: ``kv_indptr [B+1]`` and ``kv_indices`` (token slots)."""
        kv_indptr = kv_indptr.to(self.device, torch.int32)
        kv_indices = kv_indices.to(self.device, torch.int32)
        b = kv_indptr.numel() - 1
        qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=self.device)
        kv_lens = (kv_indptr[1:] - kv_indptr[:-1]).to(torch.int32)
        from flashinfer.mla import MLAPlanMetadata  # >= 0.7.2 (select.py refuses older)

        meta = MLAPlanMetadata.csr(qo_indptr, kv_indptr, kv_indices, kv_lens)
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
