"""TPLA decode through the Triton kernel (``tpla_decode.py``), set up once per rank.

``TritonTPLADecode`` is what an attention backend calls, in eager decode and inside a CUDA graph.
It fixes everything that does not change from step to step (heads, latent width, scales, dtypes,
launch config) and preallocates, for up to ``max_batch`` requests, the fp32 split workspace
(partial outputs and log-sum-exps, sized for the largest ``batch * splits`` any batch size gets)
and an output buffer ``[max_batch, H, D_CKV]`` in the query dtype.

``run`` then allocates nothing, reads no device data (no ``.item()`` / ``.tolist()``, no host
sync) and launches with a split count that depends on the batch size only (``splits_for``), so
a graph captured at one batch size replays with the same grid.  The KV arguments are strided
column views of the rank's pool buffer ``[slots, 1, D_CKV + 64]`` (no copy).  An fp8 pool may come
as SGLang stores it (``uint8``, its ``store_dtype``): ``run`` views it as ``kv_dtype``.
"""

from __future__ import annotations

import torch

from sglang_tpla.kernels import tpla_decode as K


class TritonTPLADecode:
    def __init__(
        self,
        device: torch.device | str,
        num_heads: int,
        d_ckv: int,
        sm_scale: float,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
        max_batch: int,
        kv_scale: float = 1.0,
        mu: float | None = None,
        num_sms: int | None = None,
    ):
        """``num_heads``: query heads on this rank; ``d_ckv``: the rank's latent width (512 / g);
        ``kv_dtype``: the cache dtype (the query dtype, or ``torch.float8_e4m3fn`` with
        ``kv_scale``, SGLang's per-tensor ``k_scale``); ``mu``: scale of the latent logit part;
        ``num_sms``: SMs the split count is sized for (default: the device's)."""
        self.device = torch.device(device)
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.config = K.choose_config(d_ckv, num_heads, q_dtype, kv_dtype)  # validates d_ckv and dtypes
        self.num_heads, self.d_ckv, self.max_batch = num_heads, d_ckv, max_batch
        self.sm_scale, self.kv_scale, self.mu = float(sm_scale), float(kv_scale), mu
        self.q_dtype, self.kv_dtype = q_dtype, kv_dtype
        self.num_sms = K.device_num_sms(self.device) if num_sms is None else num_sms
        head_blocks = -(-num_heads // self.config.block_h)
        self._splits = [
            K.choose_num_kv_splits(b, head_blocks, self.config.block_n, self.num_sms) for b in range(max_batch + 1)
        ]
        pairs = max(b * s for b, s in enumerate(self._splits))  # (request, split) slots the workspace holds
        f32 = dict(dtype=torch.float32, device=self.device)
        self._partial_out = torch.empty(pairs * num_heads * d_ckv, **f32)
        self._partial_lse = torch.empty(pairs * num_heads, **f32)
        self._out = torch.empty(max_batch, num_heads, d_ckv, dtype=q_dtype, device=self.device)

    def splits_for(self, batch_size: int) -> int:
        """KV splits of a batch of ``batch_size`` requests (fixed per batch size: graph safe)."""
        if not 0 <= batch_size <= self.max_batch:
            raise ValueError(f"batch size {batch_size} is outside [0, max_batch={self.max_batch}]")
        return self._splits[batch_size]

    def run(
        self,
        q_lat: torch.Tensor,
        q_pe: torch.Tensor,
        rows: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q_lat [B, H, D_CKV]``, ``q_pe [B, H, 64]``, ``rows [slots, 1, D_CKV + 64]`` or
        ``[slots, D_CKV + 64]`` (the pool buffer; ``uint8``-stored fp8 is viewed as ``kv_dtype``),
        int32 ``kv_indptr [B+1]`` / ``kv_indices`` -> ``[B, H, D_CKV]``: ``out``, or a view of the
        preallocated output buffer (overwritten by the next call)."""
        bsz = q_lat.shape[0]
        if q_lat.dtype != self.q_dtype:
            raise TypeError(f"queries are {q_lat.dtype}, this runner was built for {self.q_dtype}")
        if rows.dim() == 3:
            if rows.shape[1] != 1:
                raise ValueError(f"rows must be [slots, 1, {self.d_ckv + K.D_PE}], got {tuple(rows.shape)}")
            rows = rows[:, 0]
        if rows.dim() != 2 or rows.shape[1] != self.d_ckv + K.D_PE:
            raise ValueError(f"rows must be [slots, (1,) {self.d_ckv + K.D_PE}], got {tuple(rows.shape)}")
        if rows.dtype == torch.uint8 and self.kv_dtype.itemsize == 1:
            rows = rows.view(self.kv_dtype)
        if rows.dtype != self.kv_dtype:
            raise TypeError(f"rows are {rows.dtype}, this runner was built for {self.kv_dtype}")
        splits = self.splits_for(bsz)
        h, d = self.num_heads, self.d_ckv
        workspace = (
            self._partial_out[: bsz * h * splits * d].view(bsz, h, splits, d),
            self._partial_lse[: bsz * h * splits].view(bsz, h, splits),
        )
        return K.tpla_decode_attention(
            q_lat, q_pe, rows[:, :d], rows[:, d:], kv_indptr, kv_indices, self.sm_scale, self.mu,
            num_kv_splits=splits, out=self._out[:bsz] if out is None else out, kv_scale=self.kv_scale,
            config=self.config, workspace=workspace,
        )  # fmt: skip
