"""TPLA extend (``prefill: tpla``) through FlashInfer's causal MLA (``BatchMLAPagedAttentionWrapper``).

The same wrapper as decode (:mod:`.flashinfer_decode`: ``head_dim_ckv = 512/g``, ``head_dim_kpe =
64``, split query and KV layouts over strided column views of the rank's pool buffer
``[slots, 1, D + 64]``, page size 1), planned with several query tokens per request and
``causal=True``:

* ``qo_indptr``: ``0, cumsum(T_b)`` (the new tokens of each request);
* ``kv_indptr`` / ``kv_len_arr``: the prefix plus the new tokens, ``P_b + T_b`` (the new rows are
  written to the pool before attention); ``kv_indices``: their token slots (device);
* FlashInfer's causal mask is aligned to the end of the keys: query ``i`` of a request sees keys
  ``0 .. kv_len - q_len + i = P_b + i`` (``mla.cuh``: masked where ``kv_idx + qo_len > kv_len +
  q_idx``), which is exactly the extend's causal rule.

Planned once per forward batch (every layer shares the softmax scale and the lengths) from
**host** arrays (built from SGLang's ``extend_prefix_lens_cpu`` / ``extend_seq_lens_cpu``), run
per layer.  ``mu`` needs nothing here: the served weights fold it into the rank's W_UK columns
(``patches/weights.py``), so the absorbed ``q_lat`` already carries it, as in decode.

FlashInfer refuses some workloads at plan time with a ``ValueError`` (0.7.2: more than its native
work-item capacity for a long extend, or a causal tile boundary its kernels would get wrong when the
head count does not divide its 64 / 128-row query tile).  :meth:`plan` reports the refusal and the
caller runs that batch on the Triton multi-query kernel instead (a host decision, no sync).
Needs CUDA; on CPU only the plumbing is tested (against a stand-in wrapper).
"""

from __future__ import annotations

import torch


class FlashInferTPLAExtend:
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
        wrapper_cls=None,
    ):
        if wrapper_cls is None:
            from flashinfer.mla import BatchMLAPagedAttentionWrapper as wrapper_cls
        self.wrapper = wrapper_cls(workspace, backend=backend)
        self.num_heads, self.d_ckv, self.d_pe = num_heads, d_ckv, d_pe
        self.sm_scale, self.dtype = sm_scale, dtype
        self.planned = False

    def plan(self, qo_indptr_cpu, kv_indptr_cpu, kv_indices: torch.Tensor, kv_lens_cpu) -> str | None:
        """Once per forward batch: host int32 ``qo_indptr [B+1]``, ``kv_indptr [B+1]``, ``kv_lens [B]``
        and the device ``kv_indices``.  Returns ``None`` when planned, else FlashInfer's reason for
        refusing this batch (the caller falls back to the Triton kernel; :meth:`run` then refuses)."""
        from flashinfer.mla import MLAPlanMetadata  # >= 0.7.2 (select.py refuses older)

        self.planned = False
        meta = MLAPlanMetadata.csr(qo_indptr_cpu, kv_indptr_cpu, kv_indices, kv_lens_cpu)
        try:
            self.wrapper.plan(
                metadata=meta, num_heads=self.num_heads, head_dim_ckv=self.d_ckv, head_dim_kpe=self.d_pe, page_size=1,
                causal=True, sm_scale=self.sm_scale, q_data_type=self.dtype, kv_data_type=self.dtype,
                query_layout="split", kv_cache_layout="split",
            )  # fmt: skip
        except ValueError as e:  # FlashInfer's typed plan refusals derive from ValueError
            return f"{type(e).__name__}: {e}"
        self.planned = True
        return None

    def run(self, q_lat: torch.Tensor, q_pe: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``q_lat [T, H, D]``, ``q_pe [T, H, 64]``, ``rows [slots, 1, D + 64]`` (the pool buffer) -> ``[T, H, D]``."""
        if not self.planned:
            raise RuntimeError("FlashInferTPLAExtend.run without a successful plan for this forward batch")
        rows = rows.view(rows.shape[0], 1, -1)
        ckv, kpe = rows[..., : self.d_ckv], rows[..., self.d_ckv :]  # strided views, no copy
        return self.wrapper.run(query=(q_lat, q_pe), kv_cache=(ckv, kpe))
