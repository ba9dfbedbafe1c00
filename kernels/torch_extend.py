"""Extend (prefill over a cached prefix) attention over latent rows, tiled with an online softmax.

Used by the DeepSeek hook for every extend batch TPLA handles itself: exact MLA over a cached
prefix (the full latent gathered across the latent groups, chunk by chunk) and ``prefill: tpla``
(each rank's own slice).  One formulation for both, batched over the requests:

* the keys of request ``b`` are its token slots ``req_to_token[b, :P_b + T_b]`` (cached prefix,
  then the ``T_b`` new tokens, already written to the pool): the CSR ``kv_indptr`` /
  ``kv_indices`` of :func:`sglang_tpla.metadata.gather_kv_indices` with lengths ``P_b + T_b``;
* query ``t`` of request ``b`` (absolute position ``P_b + t``) sees keys ``0 .. P_b + t`` of
  its own request (causal);
* the key stream is walked once, ``kv_chunk`` keys at a time: ``rows(k0, k1)`` returns the
  chunk's ``(ckv [n, D], kpe [n, 64])`` (the caller gathers, and for exact MLA all-gathers
  across the latent groups, only that chunk: one collective per chunk, the same count on every
  rank since the tiling depends only on host lengths); each chunk is attended by the query
  tiles (``q_tile`` tokens) whose requests it holds keys of, masked to same-request causal
  pairs, and merged into a running max / sum per query (flash-attention's online softmax, fp32).

Memory bound per call (one layer), besides inputs and output: the running state of the batch's
queries, ``T * H * (D + 2) * 4`` bytes (bounded by the extend size, i.e. SGLang's
``--chunked-prefill-size``, not by the prompt or prefix length), one chunk of rows, and the fp32
logits and probabilities of one tile, ``2 * q_tile * H * kv_chunk * 4`` bytes, with
``q_tile * H * kv_chunk <= budget_elems`` (default 2**22: 32 MiB) by :func:`tile_sizes`.

Pure torch: matmuls on whatever device the inputs are on; no SGLang import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

BUDGET_ELEMS = 1 << 22


def tile_sizes(num_heads: int, budget_elems: int = BUDGET_ELEMS) -> tuple[int, int]:
    """``(q_tile, kv_chunk)`` with ``q_tile * num_heads * kv_chunk <= budget_elems`` (powers of two, >= 16)."""
    per_head = max(budget_elems // max(num_heads, 1), 256)
    kv_chunk = 1 << min(12, max(4, (per_head.bit_length() - 1) // 2 + 1))
    q_tile = max(16, 1 << ((per_head // kv_chunk).bit_length() - 1))
    return q_tile, kv_chunk


def memory_bound_bytes(num_tokens: int, num_heads: int, d: int, d_pe: int = 64, budget_elems: int = BUDGET_ELEMS) -> int:
    """The stated bound on :func:`extend_attention`'s extra memory (fp32), inputs and output excluded:
    the running state ``T * H * (D + 2)``, two tile-sized logit buffers (the tile's, updated in
    place, and the RoPE term before it is added), the tile's query / PV temporaries and one chunk
    of fp32 rows; x2 for the allocator (freed blocks are not always reused at once)."""
    q_tile, kv_chunk = tile_sizes(num_heads, budget_elems)
    state = num_tokens * num_heads * (d + 2)
    tile = 2 * q_tile * num_heads * kv_chunk + q_tile * num_heads * (2 * d + d_pe)
    return 2 * 4 * (state + tile + kv_chunk * (d + d_pe))


@dataclass
class ExtendPlan:
    """Host-side tiling and device-side token metadata of one extend batch (built once per forward,
    shared by every layer)."""

    chunks: list[tuple[int, int, list[tuple[int, int]]]]  # (k0, k1, query tiles [(q0, q1), ...] that see it)
    q_req: torch.Tensor  # [T] request of each query token
    q_lim: torch.Tensor  # [T] last key position it may see (P_b + t)
    k_req: torch.Tensor  # [K] request of each key
    k_pos: torch.Tensor  # [K] position of each key inside its request
    num_tokens: int


def plan_extend(
    prefix_lens: Sequence[int], extend_lens: Sequence[int], device, num_heads: int, budget_elems: int = BUDGET_ELEMS
) -> ExtendPlan:
    """The tiling for requests with host lengths ``prefix_lens`` (cached) and ``extend_lens`` (new)."""
    q_tile, kv_chunk = tile_sizes(num_heads, budget_elems)
    prefix_lens, extend_lens = [int(p) for p in prefix_lens], [int(n) for n in extend_lens]
    kv_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
    q_ptr, k_ptr = [0], [0]
    for n, k in zip(extend_lens, kv_lens):
        q_ptr.append(q_ptr[-1] + n)
        k_ptr.append(k_ptr[-1] + k)
    total_q, total_k = q_ptr[-1], k_ptr[-1]
    tiles = []  # (q0, q1, k_lo, k_hi): the keys a query tile can see
    b = 0
    for q0 in range(0, total_q, q_tile):
        q1 = min(q0 + q_tile, total_q)
        while q_ptr[b + 1] <= q0:  # first request with a query in the tile
            b += 1
        last = b
        while q_ptr[last + 1] < q1:
            last += 1
        tiles.append((q0, q1, k_ptr[b], k_ptr[last] + prefix_lens[last] + (q1 - q_ptr[last])))
    chunks = []
    for k0 in range(0, total_k, kv_chunk):
        k1 = min(k0 + kv_chunk, total_k)
        seen = [(q0, q1) for q0, q1, lo, hi in tiles if lo < k1 and k0 < hi]
        if seen:
            chunks.append((k0, k1, seen))
    dev = torch.device(device)
    reqs = torch.arange(len(extend_lens))
    q_req = torch.repeat_interleave(reqs, torch.tensor(extend_lens, dtype=torch.long), output_size=total_q)
    q_lim = torch.cat([torch.arange(n) + p for p, n in zip(prefix_lens, extend_lens)] + [torch.zeros(0, dtype=torch.long)])
    k_req = torch.repeat_interleave(reqs, torch.tensor(kv_lens, dtype=torch.long), output_size=total_k)
    k_pos = torch.cat([torch.arange(k) for k in kv_lens] + [torch.zeros(0, dtype=torch.long)])
    return ExtendPlan(chunks, q_req.to(dev), q_lim.to(dev), k_req.to(dev), k_pos.to(dev), total_q)


def extend_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    rows: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    plan: ExtendPlan,
    sm_scale: float,
    mu: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[T, H, D]``: every query over its request's keys (causal), latent used as V.

    ``rows(k0, k1)`` returns the keys ``k0 .. k1`` of the batch's key stream as
    ``(ckv [n, D], kpe [n, 64])`` in any float dtype (computed in fp32)."""
    t, h, d = q_lat.shape
    if out is None:
        out = q_lat.new_empty(t, h, d)
    dev = q_lat.device
    m = torch.full((t, h), float("-inf"), device=dev)
    l = torch.zeros(t, h, device=dev)
    acc = torch.zeros(t, h, d, device=dev)
    for k0, k1, tiles in plan.chunks:
        ckv, kpe = rows(k0, k1)
        ckv, kpe = ckv.float(), kpe.float()
        k_req, k_pos = plan.k_req[None, k0:k1], plan.k_pos[None, k0:k1]
        for q0, q1 in tiles:
            ql = q_lat[q0:q1].float()
            if mu is not None:
                ql = ql * mu
            logits = torch.einsum("thd,nd->thn", ql, ckv)  # the tile's one [tq, H, n] buffer, updated in place
            logits.add_(torch.einsum("thp,np->thn", q_pe[q0:q1].float(), kpe)).mul_(sm_scale)
            keep = (k_req == plan.q_req[q0:q1, None]) & (k_pos <= plan.q_lim[q0:q1, None])  # [tq, n]
            logits.masked_fill_(~keep[:, None, :], float("-inf"))
            m_old = m[q0:q1]
            m_new = torch.maximum(m_old, logits.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = logits.sub_(m_safe[..., None]).exp_()
            alpha = torch.exp(m_old - m_safe)
            l[q0:q1] = l[q0:q1] * alpha + p.sum(-1)
            acc[q0:q1].mul_(alpha[..., None]).add_(torch.einsum("thn,nd->thd", p, ckv))
            m[q0:q1] = m_new
            del logits, p
    out.copy_(acc.div_(torch.where(l > 0, l, torch.ones_like(l))[..., None]))
    return out
