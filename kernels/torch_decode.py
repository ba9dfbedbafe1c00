"""TPLA decode attention in plain PyTorch: the ``tpla`` backend's implementation on CPU.

Same contract as the Triton kernel (:func:`sglang_tpla.kernels.tpla_decode.tpla_decode_attention`):
queries of one latent group ``q_lat [B, H, D]`` / ``q_pe [B, H, 64]`` over the group's latent
and RoPE caches addressed in CSR form (``kv_indptr [B+1]``, ``kv_indices [nnz]``, int32 token
slots), latent used as V, own softmax; ``kv_scale`` dequantizes an fp8 cache (stored * scale).

The batch is attended at once (no loop over requests): the CSR slots are scattered into a
``[B, max_seq_len]`` table, the keys gathered, and a masked batched softmax computed in fp32.
``max_seq_len`` is a host int (the backend has the lengths on the host), so nothing here reads
device data on the host.  Written independently of :mod:`sglang_tpla.reference` (which loops
over requests and is the oracle the tests compare with).
"""

from __future__ import annotations

import torch


def torch_decode_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    max_seq_len: int,
    mu: float | None = None,
    kv_scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, H, D]`` latent-space output (before W_UV), in ``out`` or the query dtype."""
    bsz, heads, d = q_lat.shape
    if out is None:
        out = q_lat.new_empty(bsz, heads, d)
    nnz = kv_indices.numel()
    if bsz == 0:
        return out
    if nnz == 0 or max_seq_len <= 0:
        return out.zero_()
    dev = q_lat.device
    tok = torch.arange(nnz, device=dev, dtype=kv_indptr.dtype)
    req = torch.searchsorted(kv_indptr[1 : bsz + 1], tok, right=True)
    pos = (tok - kv_indptr[req]).long()
    slots = torch.zeros(bsz, max_seq_len, dtype=torch.long, device=dev)
    slots[req, pos] = kv_indices.long()
    valid = torch.zeros(bsz, max_seq_len, dtype=torch.bool, device=dev)
    valid[req, pos] = True
    k = ckv[slots].float()
    kp = kpe[slots].float()
    if kv_scale != 1.0:
        k = k * kv_scale
        kp = kp * kv_scale
    lat = torch.einsum("bhd,bld->bhl", q_lat.float(), k)
    if mu is not None:
        lat = lat * mu
    logits = (lat + torch.einsum("bhp,blp->bhl", q_pe.float(), kp)) * sm_scale
    keep = valid[:, None, :]
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    probs = torch.where(keep, probs, 0.0)  # a request with no tokens: all-NaN row -> zeros
    out.copy_(torch.einsum("bhl,bld->bhd", probs, k))
    return out
