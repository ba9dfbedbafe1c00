"""fp32 reference attention for MLA and TPLA decode over a paged latent cache.

This is the oracle for every kernel and integration path.  It is written for clarity,
not speed: one request at a time, plain PyTorch, everything upcast to float32.

Shapes (one decoder layer, absorbed MLA form):

* ``q_nope``  ``[B, H, nope]``  per-head no-RoPE query (before absorption)
* ``q_pe``    ``[B, H, rope]``  per-head RoPE query (already rotated)
* cache: latent ``ckv [slots, R]`` (normalised, in the transformed basis) and RoPE key
  ``kpe [slots, rope]``, addressed SGLang-style through ``req_to_token[req_pool_idx, pos]``.
  Either may be a strided view (e.g. two column ranges of one ``[slots, R + rope]`` buffer).
* weights: ``w_kc [H, nope, R]`` and ``w_vc [H, R, v]`` (the absorbed ``kv_b_proj``) and
  ``o_proj [hidden, H * v]``.

MLA decode (head-sharded TP over ``tp`` ranks) and TPLA decode (``TPLALayout``) both
return the layer output ``[B, hidden]`` as the sum of per-rank partial outputs, i.e.
what the attention all-reduce produces.

Pure PyTorch: no sglang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .layout import TPLALayout

NORM_MODES = ("exact", "local")
MU_MODES = ("one", "inv_p", "value")


# --------------------------------------------------------------------------- cache


@dataclass
class PagedLatentCache:
    """A latent KV cache addressed the way SGLang addresses its MLA pool."""

    ckv: torch.Tensor  # [slots, R] (or a slice of it)
    kpe: torch.Tensor  # [slots, rope]
    req_to_token: torch.Tensor  # [max_reqs, max_context] slot index of each position
    req_pool_indices: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B]

    def __post_init__(self):
        if self.ckv.shape[0] != self.kpe.shape[0]:
            raise ValueError("latent and RoPE caches must have the same number of slots")
        if self.req_pool_indices.numel() != self.seq_lens.numel():
            raise ValueError("req_pool_indices and seq_lens must have one entry per request")

    @property
    def batch_size(self) -> int:
        return self.seq_lens.numel()

    def slots(self, b: int) -> torch.Tensor:
        n = int(self.seq_lens[b])
        return self.req_to_token[int(self.req_pool_indices[b]), :n].long()

    def gather(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's context as contiguous fp32 ``([L, R], [L, rope])``."""
        idx = self.slots(b)
        return self.ckv[idx].float(), self.kpe[idx].float()

    def kv_indptr_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same addressing in the flattened ``kv_indptr`` / ``kv_indices`` form (int32)."""
        lens = self.seq_lens.long()
        indptr = torch.zeros(lens.numel() + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(lens, 0).to(torch.int32)
        parts = [self.slots(b) for b in range(self.batch_size)]
        indices = torch.cat(parts).to(torch.int32) if parts else torch.zeros(0, dtype=torch.int32)
        return indptr, indices


# --------------------------------------------------------------------------- weights


@dataclass
class MLAAttentionWeights:
    """One layer's absorbed MLA weights, full (unsharded), float32."""

    w_kc: torch.Tensor  # [H, nope, R]
    w_vc: torch.Tensor  # [H, R, v]
    o_proj: torch.Tensor  # [hidden, H * v]

    @property
    def num_heads(self) -> int:
        return self.w_kc.shape[0]

    @property
    def v_head_dim(self) -> int:
        return self.w_vc.shape[2]

    @classmethod
    def from_kv_b_proj(
        cls, kv_b_proj: torch.Tensor, o_proj: torch.Tensor, num_heads: int, qk_nope_head_dim: int, v_head_dim: int
    ) -> "MLAAttentionWeights":
        """Split HF ``kv_b_proj.weight [H*(nope+v), R]`` the way SGLang's ``post_load_weights`` does."""
        w = kv_b_proj.float().unflatten(0, (num_heads, qk_nope_head_dim + v_head_dim))
        w_kc, w_vc = w.split([qk_nope_head_dim, v_head_dim], dim=1)  # [H, nope, R], [H, v, R]
        return cls(w_kc.contiguous(), w_vc.transpose(1, 2).contiguous(), o_proj.float())


# --------------------------------------------------------------------------- normalisation


def normalize_latent(
    c: torch.Tensor,
    eps: float,
    mode: str = "exact",
    g: int = 1,
    energy_fractions: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The cached latent from the pre-norm latent ``c [T, R]`` (gain already folded to 1).

    ``exact``: RMSNorm over the full latent, what every TPLA rank can compute because the
    down-projection is replicated.  ``local``: the paper's slice-local RMSNorm with its
    scale correction: ``c_j / RMS(c_j) * sqrt(g * p_j)`` (``p_j = 1/g`` if not given).
    """
    c = c.float()
    if mode == "exact":
        return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    if mode != "local":
        raise ValueError(f"unknown RMSNorm mode {mode!r}; choose one of {list(NORM_MODES)}")
    r = c.shape[-1]
    if r % g:
        raise ValueError(f"g={g} does not divide the latent width {r}")
    p = torch.full((g,), 1.0 / g) if energy_fractions is None else torch.as_tensor(energy_fractions, dtype=torch.float64)
    parts = c.view(*c.shape[:-1], g, r // g)
    scale = torch.sqrt(g * p).float()[:, None]
    out = parts * torch.rsqrt(parts.pow(2).mean(-1, keepdim=True) + eps) * scale
    return out.reshape(c.shape)


def logit_scales(
    mode: str, g: int, energy_fractions: Sequence[float] | torch.Tensor | None = None, values: Sequence[float] | None = None
) -> list[float] | None:
    """Per-shard scale ``mu_j`` on the latent part of the logit.  ``None`` means no scaling."""
    if mode == "one":
        return None
    if mode == "inv_p":
        if energy_fractions is None:
            raise ValueError("mu mode 'inv_p' needs the per-shard energy fractions p_j (from calibration or 1/g)")
        p = [float(x) for x in energy_fractions]
        if len(p) != g or min(p) <= 0:
            raise ValueError(f"need {g} positive energy fractions, got {p}")
        return [1.0 / x for x in p]
    if mode == "value":
        if values is None or len(values) != g:
            raise ValueError(f"mu mode 'value' needs exactly g={g} values")
        return [float(x) for x in values]
    raise ValueError(f"unknown mu mode {mode!r}; choose one of {list(MU_MODES)}")


# --------------------------------------------------------------------------- attention core


def absorb_query(q_nope: torch.Tensor, w_kc: torch.Tensor) -> torch.Tensor:
    """``q_nope [B, H, nope] x w_kc [H, nope, R] -> [B, H, R]`` (per head)."""
    return torch.einsum("bhn,hnr->bhr", q_nope.float(), w_kc.float())


def latent_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    sm_scale: float,
    mu: float | None = None,
    causal_offset: int | None = None,
) -> torch.Tensor:
    """Softmax attention of queries over one sequence's latent context, latent used as V.

    ``q_lat [T, H, D]``, ``q_pe [T, H, rope]``, ``ckv [L, D]``, ``kpe [L, rope]`` ->
    ``[T, H, D]``.  ``logit = sm_scale * (mu * q_lat . ckv + q_pe . kpe)``.  With
    ``causal_offset`` query ``t`` sees keys ``0 .. causal_offset + t``.  An empty context
    gives a zero output.
    """
    t, h, d = q_lat.shape
    if ckv.shape[0] == 0:
        return q_lat.new_zeros(t, h, d)
    lat = torch.einsum("thd,ld->thl", q_lat, ckv)
    if mu is not None:
        lat = lat * mu
    logits = (lat + torch.einsum("thp,lp->thl", q_pe, kpe)) * sm_scale
    if causal_offset is not None:
        keys = torch.arange(ckv.shape[0], device=ckv.device)
        allowed = keys[None, :] <= (causal_offset + torch.arange(t, device=ckv.device))[:, None]
        logits = logits.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.einsum("thl,ld->thd", torch.softmax(logits, dim=-1), ckv)


def _o_proj_partial(v: torch.Tensor, o_proj: torch.Tensor, head_start: int, head_end: int) -> torch.Tensor:
    """One rank's o_proj contribution: its heads' ``v [B, H, v]`` through its columns of o_proj."""
    vd = v.shape[2]
    cols = o_proj[:, head_start * vd : head_end * vd]
    return v[:, head_start:head_end].reshape(v.shape[0], -1) @ cols.T


def _per_request(cache: PagedLatentCache, q_lat, q_pe, sm_scale, lo, hi, mu) -> torch.Tensor:
    """Attention of ``q_lat [B, H, hi-lo]`` over columns ``lo:hi`` of each request's cached latent."""
    out = q_lat.new_zeros(q_lat.shape)
    for b in range(cache.batch_size):
        ckv, kpe = cache.gather(b)
        out[b] = latent_attention(q_lat[b : b + 1], q_pe[b : b + 1].float(), ckv[:, lo:hi], kpe, sm_scale, mu)[0]
    return out


def mla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: PagedLatentCache,
    weights: MLAAttentionWeights,
    sm_scale: float,
    tp: int = 1,
) -> torch.Tensor:
    """Exact absorbed MLA decode, heads sharded over ``tp`` ranks; returns ``[B, hidden]``."""
    h = weights.num_heads
    if h % tp:
        raise ValueError(f"tp={tp} must divide num_heads={h}")
    q_lat = absorb_query(q_nope, weights.w_kc)
    o = _per_request(cache, q_lat, q_pe, sm_scale, 0, q_lat.shape[2], None)
    v = torch.einsum("bhr,hrv->bhv", o, weights.w_vc.float())
    out = None
    for r in range(tp):
        part = _o_proj_partial(v, weights.o_proj, r * h // tp, (r + 1) * h // tp)
        out = part if out is None else out + part
    return out


def tpla_group_output(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: PagedLatentCache,
    weights: MLAAttentionWeights,
    sm_scale: float,
    latent_range: tuple[int, int],
    mu: float | None = None,
) -> torch.Tensor:
    """Per-head output ``[B, H, v]`` of one latent group: own softmax over its slice, its rows of W_UV."""
    lo, hi = latent_range
    q_lat = absorb_query(q_nope, weights.w_kc[:, :, lo:hi])
    width = cache.ckv.shape[1]
    if width == weights.w_kc.shape[2]:  # a full-width cache: read this group's columns
        o = _per_request(cache, q_lat, q_pe, sm_scale, lo, hi, mu)
    elif width == hi - lo:  # a TPLA pool: the cache holds only this group's slice
        o = _per_request(cache, q_lat, q_pe, sm_scale, 0, width, mu)
    else:
        raise ValueError(f"cache latent width {width} is neither the full latent nor the slice width {hi - lo}")
    return torch.einsum("bhr,hrv->bhv", o, weights.w_vc[:, lo:hi].float())


def tpla_rank_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: PagedLatentCache,
    weights: MLAAttentionWeights,
    sm_scale: float,
    layout: TPLALayout,
    rank: int,
    mu: Sequence[float] | None = None,
) -> torch.Tensor:
    """What TP rank ``rank`` contributes to the all-reduce: ``[B, hidden]``.

    The cache may be the full ``R``-wide latent (the rank reads its columns) or just the
    rank's own slice (what a TPLA KV pool stores).
    """
    s = layout.rank_slice(rank)
    v = tpla_group_output(
        q_nope, q_pe, cache, weights, sm_scale, (s.latent_start, s.latent_end), None if mu is None else mu[s.group]
    )
    return _o_proj_partial(v, weights.o_proj, s.head_start, s.head_end)


def tpla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: PagedLatentCache,
    weights: MLAAttentionWeights,
    sm_scale: float,
    layout: TPLALayout,
    mu: Sequence[float] | None = None,
) -> torch.Tensor:
    """TPLA decode summed over all ranks (the all-reduce), ``[B, hidden]``.

    Each group's per-head output is computed once and shared by the group's ranks.
    """
    if weights.num_heads != layout.num_heads:
        raise ValueError(f"layout has {layout.num_heads} heads, weights have {weights.num_heads}")
    per_group = [
        tpla_group_output(q_nope, q_pe, cache, weights, sm_scale, layout.latent_range(j), None if mu is None else mu[j])
        for j in range(layout.g)
    ]
    out = None
    for s in layout.ranks():
        part = _o_proj_partial(per_group[s.group], weights.o_proj, s.head_start, s.head_end)
        out = part if out is None else out + part
    return out
