"""Triton TPLA attention over a paged latent cache, one latent group: decode, and extend as multi-query rows.

Imported as ``sglang_tpla.kernels.tpla_decode`` (``kernels/`` has no ``__init__.py`` on purpose).
Written for this project; it is not derived from SGLang's ``decode_attention.py``.

What it computes
----------------
Decode (:func:`tpla_decode_attention`; extend, below, is the same per query row).  For every
request ``b`` and head ``h`` of one TPLA latent group (the caller passes the group's
columns: ``D_CKV = 512 / g`` latent columns plus the 64 RoPE columns)::

    logit[t] = sm_scale * (mu * q_lat[b, h] . ckv[slot_t] + q_pe[b, h] . kpe[slot_t])
    out[b, h] = softmax(logit) @ ckv[slots]                     # [D_CKV], latent space, before W_UV

over the request's tokens ``slot_t = kv_indices[kv_indptr[b] + t]``, ``t < kv_indptr[b+1] - kv_indptr[b]``.
This is ``sglang_tpla.reference.latent_attention`` per request (the fp32 oracle).  An empty request
gives zeros.  ``kv_indices`` are token slots (SGLang's flattened ``req_to_token`` form, int32); a
page size > 1 is already resolved in them, so paged and unpaged pools take the same path.

Extend: multi-token causal queries (``prefill: tpla``)
-----------------------------------------------------
:func:`tpla_extend_attention` runs the same two stages with one program row per **query token**
instead of per request (constexpr ``ROWS``): row ``t`` is new token ``i`` of request ``b =
q_req[t]`` after a cached prefix of ``P_b``, and attends over that request's slots
``kv_indices[kv_indptr[b] : kv_indptr[b] + q_lim[t] + 1]`` with ``q_lim[t] = P_b + i`` (causal; the
new rows are already in the pool).  Each row's key start and length are read on the device from
the request ``kv_indptr`` and ``q_req`` / ``q_lim`` (:class:`sglang_tpla.metadata.ExtendIndex`,
``ExtendPlan`` of :mod:`.torch_extend`), so there is no host sync and no loop over requests; stage 2
merges each row's used splits with the same per-row length.  Decode is the ``ROWS=False`` case,
unchanged.

This is the cheap correct form, not a flash-prefill kernel: the M dimension of each program is
still the heads of one query token, so a request's prefix is re-read once per query row and the KV
reads of an extend are ``O(T * P)`` (plus ``O(T^2)`` within the new tokens) rather than one read per
query tile; L2 absorbs some of it, the rest is bandwidth.  On CUDA the primary route for
``prefill: tpla`` is FlashInfer's causal MLA with ``qo_indptr`` (:mod:`.flashinfer_extend`), which
tiles queries x heads; this kernel is the fallback (no FlashInfer, fp8 KV cache, ``D_CKV = 64``, or
a batch FlashInfer refuses at plan time).  Exact (pd-sep) extend never comes here: it needs the
full 512-wide latent, all-gathered across the latent groups, and runs on the tiled PyTorch path.

Speculative verify (MTP / EAGLE, q_len > 1 with a causal mask over the draft tokens) is not
supported by the TPLA backend, which refuses it rather than run it through either form.

Design
------
Two-stage split-KV ("flash-decoding"):

* stage 1, grid ``(B, cdiv(H, BLOCK_H), num_kv_splits)``: each program holds a ``BLOCK_H`` tile of
  heads (masked beyond ``H``), walks its split of the request's tokens in ``BLOCK_N`` chunks,
  gathers the ``[BLOCK_N, D_CKV]`` latent rows and ``[BLOCK_N, 64]`` RoPE rows through
  ``kv_indices`` (separate base pointers and row strides, so two column views of one
  ``[slots, D_CKV + 64]`` buffer work with no copy), computes the two QK dots, runs an online
  softmax in base 2 with fp32 state, and reuses the latent tile as V (``P @ ckv``).  It writes the
  normalised partial output ``[B, H, splits, D_CKV]`` (fp32) and the base-2 log-sum-exp per split.
  With one split it writes the final output directly and stage 2 is skipped.
* A request's splits are whole chunks of at least ``MIN_SPLIT_CHUNKS * BLOCK_N`` tokens, computed
  on the device from its length: a short request in a many-split launch (a CUDA graph fixes the
  split count per batch size) uses only the splits it needs, and the unused programs exit at once.
* stage 2, grid ``(B, H)``: merges the request's used splits by log-sum-exp into ``out [B, H, D_CKV]``.

Precision: QK dots take the query dtype and accumulate in fp32; softmax state, accumulator,
partials and the merge are fp32; P is cast to the query dtype for the PV dot (as in
FlashAttention).  The output is stored in ``out``'s dtype (default: the query dtype).

FP8 cache
---------
``ckv`` / ``kpe`` may be ``torch.float8_e4m3fn`` under fp16 / bf16 queries, with SGLang's
per-tensor scale ``kv_scale`` (dequantised value = stored * ``kv_scale``).  Tiles are loaded as
fp8 (half the bytes of bf16) and converted to the query dtype for the dots (e4m3 values are exact
in fp16 and bf16); ``kv_scale`` is folded into the logit scale (both key parts are fp8) and into
the final output (the latent is V), so nothing else changes.  An fp8 pool stored as ``uint8``
must be passed as a ``.view(torch.float8_e4m3fn)`` (``triton_decode.TritonTPLADecode.run`` does
that view itself).  e5m2 is not supported.

Configs
-------
``choose_config``, compiled for sm_90 by ``tests/test_kernel_compile.py`` (shared memory <= 227 KiB,
no register spills, wgmma for BLOCK_H >= 64; figures below: bf16 queries, split path).  One
program covers up to 128 heads, so DeepSeek-V3's 128 heads per rank read each KV tile once per
request (two warpgroups, M = 64 each); at D_CKV = 512 the [128, 512] fp32 accumulator does not fit
in registers and 64 stays the widest tile (32 with an fp8 cache, where 64 spills 236-356 B).
``BLOCK_H, BLOCK_N, warps, stages: shared bytes, registers``:

=====  =================================  ====================================  ==========================
D_CKV  65-128 heads (wgmma)               33-64 heads (wgmma)                   <= 16 / <= 32 heads (mma)
=====  =================================  ====================================  ==========================
512    as 33-64 heads (2 programs)        64, 32, 8, 2: 147456 B, 240 regs      16, 32, 4, 2 / 32, 32, 8, 2
       fp8: 32, 32, 8, 2 (4 programs)     fp8: 32, 32, 8, 2: 71680 B, 255 regs  fp8: 16, 32, 8, 2 / same
256    128, 64, 8, 2: 163840 B, 234 regs  64, 64, 8, 2: 122880 B, 213 regs      16, 64, 4, 2 / 32, 64, 4, 2
       fp8: 143360 B, 255 regs            fp8: 64, 32, 8, 2: 71680 B, 213 regs  fp8: 8 warps (4 spill)
128    128, 64, 8, 3: 98816 B, 204 regs   64, 64, 4, 3: 74240 B, 210 regs      BLOCK_N 64, 4 warps, 3 st.
64     128, 64, 8, 3: 65792 B, 108 regs   64, 64, 4, 3: 49408 B, 162 regs      BLOCK_N 64, 4 warps, 3 st.
=====  =================================  ====================================  ==========================

fp32 inputs use BLOCK_H=16, BLOCK_N=16, 1 stage (ieee dots on FMA units; not a serving path).
None of this is timed on a GPU yet: the tiles are the widest that compile cleanly.

Splits
------
``choose_num_kv_splits`` (host sizes only, CUDA-graph safe): with ``P = B * head_blocks`` programs
per split, ``s`` splits cost ``ceil(P * s / SMs) / s`` waves of a request; among the split counts
that fill their last wave as far as possible it takes the smallest within ``WAVE_SLACK`` (4/3) of
the cheapest, at most ``MAX_KV_SPLITS`` and, given a host ``max_seq_len``, at most the splits such
a request can use.  E.g. on 132 SMs with one head block: B = 1 -> 64, B = 32 -> 4, B = 100 -> 1,
B = 140 -> 3.  A caller-owned ``workspace`` (and ``out``) makes a call allocation-free.

No explicit page size: SGLang's token-level ``kv_indices`` already resolve pages, and a page-table
form would only save the 4-byte index per token against 256-1152 bytes of KV per token.

``DOT_FP32`` (constexpr) casts the ``tl.dot`` operands to fp32.  It exists for ``TRITON_INTERPRET=1``,
whose bf16 ``tl.dot`` multiplies raw bit patterns (triton #11584); on a GPU keep the native bf16/fp16
dots.  fp32 inputs use ``input_precision="ieee"`` (no TF32), since fp32 is the exactness path.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from fractions import Fraction

import torch
import triton
import triton.language as tl

D_PE = 64
SUPPORTED_D_CKV = (512, 256, 128, 64)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # queries and output
FP8_KV_DTYPE = torch.float8_e4m3fn
# (query dtype, cache dtype): a cache in the query dtype, or fp8 under fp16 / bf16 queries
SUPPORTED_DTYPE_PAIRS = tuple((dt, dt) for dt in SUPPORTED_DTYPES) + (
    (torch.float16, FP8_KV_DTYPE),
    (torch.bfloat16, FP8_KV_DTYPE),
)
MAX_KV_SPLITS = 64
MIN_SPLIT_CHUNKS = 4  # a used split holds >= 4 BLOCK_N chunks (fewer for a request shorter than that)
WAVE_SLACK = Fraction(4, 3)  # choose_num_kv_splits: accepted stage-1 cost over the best split count

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------- kernels


@triton.jit
def _split_len(kv_len, num_splits, block_n, min_split_len):
    """Tokens per split of one request: whole ``block_n`` chunks, at least ``min_split_len``."""
    n = tl.maximum(tl.cdiv(kv_len, num_splits), min_split_len)
    return tl.cdiv(n, block_n) * block_n


@triton.jit
def _tpla_decode_stage1(
    q_lat_ptr,
    q_pe_ptr,
    ckv_ptr,
    kpe_ptr,
    kv_indptr_ptr,
    kv_indices_ptr,
    o_ptr,
    lse_ptr,
    qk_scale,  # sm_scale * kv_scale * log2(e)
    mu,  # scale of the latent part of the logit
    v_scale,  # kv_scale: the latent rows are V
    num_heads,
    min_split_len,
    stride_qlb,
    stride_qlh,
    stride_qpb,
    stride_qph,
    stride_ckv,
    stride_kpe,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    row_req_ptr,  # ROWS: [rows] the request of each query row
    row_lim_ptr,  # ROWS: [rows] the last key position the row may see (P_b + t, causal)
    D_CKV: tl.constexpr,
    D_PE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    ROWS: tl.constexpr = False,
):
    b = tl.program_id(0)  # a request (decode) or a query row (ROWS: multi-query extend)
    hb = tl.program_id(1)
    split = tl.program_id(2)

    if ROWS:  # row b: query token t of request r sees r's keys 0 .. P_r + t
        kv_start = tl.load(kv_indptr_ptr + tl.load(row_req_ptr + b).to(tl.int32))
        kv_len = tl.load(row_lim_ptr + b).to(tl.int32) + 1
    else:
        kv_start = tl.load(kv_indptr_ptr + b)
        kv_len = tl.load(kv_indptr_ptr + b + 1) - kv_start
    split_len = _split_len(kv_len, tl.num_programs(2), BLOCK_N, min_split_len)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)
    if (split > 0) & (lo >= hi):
        return  # unused split of a short request: stage 2 merges only the used ones

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < num_heads
    offs_d = tl.arange(0, D_CKV)
    offs_p = tl.arange(0, D_PE)
    q_lat = tl.load(
        q_lat_ptr + b * stride_qlb + offs_h[:, None] * stride_qlh + offs_d[None, :], mask=mask_h[:, None], other=0.0
    )
    q_pe = tl.load(
        q_pe_ptr + b * stride_qpb + offs_h[:, None] * stride_qph + offs_p[None, :], mask=mask_h[:, None], other=0.0
    )
    if DOT_FP32:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_CKV], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        slot = tl.load(kv_indices_ptr + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
        # an fp8 cache is dequantised to the dot dtype here; its scale is in qk_scale and v_scale
        ckv = tl.load(ckv_ptr + slot[:, None] * stride_ckv + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        kpe = tl.load(kpe_ptr + slot[:, None] * stride_kpe + offs_p[None, :], mask=mask_n[:, None], other=0.0)
        ckv = ckv.to(q_lat.dtype)
        kpe = kpe.to(q_lat.dtype)
        qk = tl.dot(q_lat, tl.trans(ckv), input_precision=PRECISION) * mu
        qk = tl.dot(q_pe, tl.trans(kpe), acc=qk, input_precision=PRECISION)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        # every chunk holds at least one valid token, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(ckv.dtype), ckv, acc=acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    lse = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))
    out = acc * (v_scale / l_safe)[:, None]
    tl.store(
        o_ptr + b * stride_ob + offs_h[:, None] * stride_oh + split * stride_os + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=mask_h[:, None],
    )
    tl.store(lse_ptr + b * stride_lb + offs_h * stride_lh + split * stride_ls, lse, mask=mask_h)


@triton.jit
def _tpla_decode_stage2(
    po_ptr,
    plse_ptr,
    out_ptr,
    lse_out_ptr,
    kv_indptr_ptr,
    num_splits,
    block_n,
    min_split_len,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_ob,
    stride_oh,
    stride_lob,
    stride_loh,
    row_lim_ptr,  # ROWS: as in stage 1
    D_CKV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    STORE_LSE: tl.constexpr,
    ROWS: tl.constexpr = False,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    if ROWS:
        kv_len = tl.load(row_lim_ptr + b).to(tl.int32) + 1
    else:
        kv_len = tl.load(kv_indptr_ptr + b + 1) - tl.load(kv_indptr_ptr + b)
    # the splits stage 1 used for this request (every one holds >= 1 token; none for an empty request)
    used = tl.cdiv(kv_len, _split_len(kv_len, num_splits, block_n, min_split_len))
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D_CKV)
    lse = tl.load(plse_ptr + b * stride_plb + h * stride_plh + offs_s, mask=offs_s < used, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # empty request: no weights below
    denom = tl.sum(tl.exp2(lse - m), 0)
    acc = tl.zeros([D_CKV], tl.float32)
    base = po_ptr + b * stride_pob + h * stride_poh
    for s in range(0, used):
        w = tl.exp2(tl.load(plse_ptr + b * stride_plb + h * stride_plh + s) - m)
        acc += w * tl.load(base + s * stride_pos + offs_d)
    nonempty = denom > 0
    out = acc / tl.where(nonempty, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))
    if STORE_LSE:
        lse_out = tl.where(nonempty, (m + tl.log2(tl.where(nonempty, denom, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(lse_out_ptr + b * stride_lob + h * stride_loh, lse_out)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TPLADecodeConfig:
    """Launch parameters of stage 1."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_h", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16 (tl.dot needs M, N, K >= 16)")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"bad num_warps={self.num_warps} / num_stages={self.num_stages}")


# (D_CKV, BLOCK_H) -> (BLOCK_N, num_warps, num_stages) for fp16 / bf16 queries; the fp8-cache
# entries differ only where a tile spills (see the module docstring for the sm_90 compile figures).
_TILES = {
    (512, 16): (32, 4, 2),
    (512, 32): (32, 8, 2),  # 4 warps spill the [32, 512] accumulator
    (512, 64): (32, 8, 2),
    (256, 16): (64, 4, 2),
    (256, 32): (64, 4, 2),
    (256, 64): (64, 8, 2),
    (256, 128): (64, 8, 2),
    (128, 16): (64, 4, 3),
    (128, 32): (64, 4, 3),
    (128, 64): (64, 4, 3),
    (128, 128): (64, 8, 3),
    (64, 16): (64, 4, 3),
    (64, 32): (64, 4, 3),
    (64, 64): (64, 4, 3),
    (64, 128): (64, 8, 3),  # 4 warps need 245 registers
}
# An fp8 tile is dequantised in registers on its way to the dot: where the tiles above spill
# with fp8 (4 warps at BLOCK_H <= 32; BLOCK_N = 64 at [64, 256]), fp8 takes more warps / a
# shorter chunk.
_FP8_TILES = {
    (512, 16): (32, 8, 2),
    (256, 16): (64, 8, 2),
    (256, 32): (64, 8, 2),
    (256, 64): (32, 8, 2),
}


def _head_block(d_ckv: int, num_heads: int, fp8: bool) -> int:
    """Heads per program: the smallest of 16 / 32 / 64 / 128 that holds them all, up to the widest
    tile that fits in registers.  One program per 128 heads reads each KV tile once per request; at
    D_CKV = 512 the [128, 512] fp32 accumulator does not fit, and with an fp8 cache even
    BLOCK_H = 64 spills there (the dequantised tile needs registers too)."""
    widest = 128 if d_ckv < 512 else (32 if fp8 else 64)
    return next(bh for bh in (16, 32, 64, 128) if num_heads <= bh or bh == widest)


def choose_config(d_ckv: int, num_heads: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> TPLADecodeConfig:
    """Stage-1 launch parameters for a latent width, head count (per rank), query dtype and cache
    dtype (``None``: the query dtype)."""
    _check_d_ckv(d_ckv)
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    _check_dtypes(dtype, dtype if kv_dtype is None else kv_dtype)
    if dtype == torch.float32:
        # fp32 is the exactness path (ieee dots run on FMA units, not tensor cores): small tiles,
        # no spills on sm_90.  Not a serving path.
        return TPLADecodeConfig(16, 16, 8 if d_ckv == 512 else 4, 1)
    fp8 = kv_dtype == FP8_KV_DTYPE
    block_h = _head_block(d_ckv, num_heads, fp8)
    key = (d_ckv, block_h)
    return TPLADecodeConfig(block_h, *(_FP8_TILES[key] if fp8 and key in _FP8_TILES else _TILES[key]))


def all_configs(pairs=None) -> dict[tuple[int, torch.dtype, torch.dtype, int], TPLADecodeConfig]:
    """Every config ``choose_config`` can return (for 1..256 heads), keyed ``(d_ckv, q_dtype,
    kv_dtype, block_h)``, over the given ``(q_dtype, kv_dtype)`` pairs (default: all supported)."""
    out = {}
    for d in SUPPORTED_D_CKV:
        for q_dt, kv_dt in pairs or SUPPORTED_DTYPE_PAIRS:
            for h in range(1, 257):
                cfg = choose_config(d, h, q_dt, kv_dt)
                out[(d, q_dt, kv_dt, cfg.block_h)] = cfg
    return out


def device_num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 132 (H100 / H200) elsewhere, which
    only sizes the split count."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132


_SM_CACHE: dict[int, int] = {}


def _cuda_sms(index: int) -> int:
    if index not in _SM_CACHE:
        _SM_CACHE[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_CACHE[index]


@functools.lru_cache(maxsize=4096)
def choose_num_kv_splits(
    batch: int, num_head_blocks: int, block_n: int, num_sms: int = 132, max_seq_len: int | None = None
) -> int:
    """How many KV splits stage 1 launches: few splits, filling whole waves of the SMs.

    With ``P = batch * num_head_blocks`` programs per split, ``s`` splits run in
    ``waves(s) = ceil(P * s / num_sms)`` waves of ``1 / s`` of a request each (one program per
    SM at a time, equal lengths), so stage 1 costs ``waves(s) / s``.  The candidates are the
    largest split count of each wave count (``s`` with ``waves(s + 1) > waves(s)``, and the cap);
    the answer is the smallest candidate within ``WAVE_SLACK`` of the cheapest one, since every
    split adds fp32 partials and merge work.  The cap is ``MAX_KV_SPLITS`` and, with a host-side
    ``max_seq_len``, the number of splits a request of that length can use (the kernel gives each
    used split at least ``MIN_SPLIT_CHUNKS * block_n`` tokens).  Host sizes only: no device data is
    read, and a batch size always gets the same answer (CUDA-graph safe).
    """
    if batch < 0 or num_head_blocks < 1 or block_n < 1 or num_sms < 1:
        raise ValueError(f"bad sizes batch={batch} num_head_blocks={num_head_blocks} block_n={block_n} num_sms={num_sms}")
    programs = max(1, batch * num_head_blocks)
    cap = MAX_KV_SPLITS
    if max_seq_len is not None:
        cap = min(cap, max(1, -(-int(max_seq_len) // (MIN_SPLIT_CHUNKS * block_n))))

    waves = [-(-programs * s // num_sms) for s in range(cap + 2)]  # waves[s]: waves of s splits
    # cost(s) = waves[s] / s, compared by cross-multiplying
    candidates = [s for s in range(1, cap + 1) if s == cap or waves[s + 1] > waves[s]]
    best = candidates[0]
    for s in candidates:
        if waves[s] * best < waves[best] * s:
            best = s
    num, den = WAVE_SLACK.numerator * waves[best], WAVE_SLACK.denominator * best
    return next(s for s in candidates if waves[s] * den <= num * s)


# --------------------------------------------------------------------------- wrapper


def _check_d_ckv(d: int):
    if d not in SUPPORTED_D_CKV:
        raise ValueError(f"latent width D_CKV={d} is not supported; use one of {SUPPORTED_D_CKV} (512/g)")


def _check_dtypes(q_dtype: torch.dtype, kv_dtype: torch.dtype):
    if (q_dtype, kv_dtype) in SUPPORTED_DTYPE_PAIRS:
        return
    hint = ""
    if kv_dtype == torch.uint8:
        hint = " (an fp8 pool stored as uint8: pass .view(torch.float8_e4m3fn))"
    raise TypeError(
        f"unsupported (query, cache) dtypes ({q_dtype}, {kv_dtype}){hint}; use one of "
        f"{[(str(q).removeprefix('torch.'), str(k).removeprefix('torch.')) for q, k in SUPPORTED_DTYPE_PAIRS]}"
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_workspace(workspace, bsz: int, heads: int, splits: int, d_ckv: int):
    po, plse = workspace
    ok = (
        po.dtype == plse.dtype == torch.float32
        and po.dim() == 4
        and plse.dim() == 3
        and po.shape[0] >= bsz
        and po.shape[1] == heads
        and po.shape[2] >= splits
        and po.shape[3] == d_ckv
        and plse.shape[0] >= bsz
        and plse.shape[1] == heads
        and plse.shape[2] >= splits
        and po.is_contiguous()
        and plse.is_contiguous()
    )
    if not ok:
        raise ValueError(
            f"workspace must be contiguous fp32 ([>={bsz}, {heads}, >={splits}, {d_ckv}], "
            f"[>={bsz}, {heads}, >={splits}]); got {tuple(po.shape)} {po.dtype}, {tuple(plse.shape)} {plse.dtype}"
        )
    return po, plse


def _check_inputs(q_lat, q_pe, ckv, kpe, kv_indices, out, what: str):
    """Shapes, dtypes, strides and devices shared by decode (``what = "B"``) and extend (``"T"``)."""
    if q_lat.dim() != 3 or q_pe.dim() != 3:
        raise ValueError(f"q_lat and q_pe must be [{what}, H, D]; got {tuple(q_lat.shape)} and {tuple(q_pe.shape)}")
    bsz, heads, d_ckv = q_lat.shape
    _check_d_ckv(d_ckv)
    if tuple(q_pe.shape) != (bsz, heads, D_PE):
        raise ValueError(f"q_pe must be [{what}, H, {D_PE}] = {(bsz, heads, D_PE)}, got {tuple(q_pe.shape)}")
    if ckv.dim() != 2 or ckv.shape[1] != d_ckv:
        raise ValueError(f"ckv must be [slots, {d_ckv}] (the group's latent columns), got {tuple(ckv.shape)}")
    if kpe.dim() != 2 or tuple(kpe.shape) != (ckv.shape[0], D_PE):
        raise ValueError(f"kpe must be [slots, {D_PE}] with slots={ckv.shape[0]}, got {tuple(kpe.shape)}")
    dtype, kv_dtype = q_lat.dtype, ckv.dtype
    if q_pe.dtype != dtype:
        raise TypeError(f"q_pe has dtype {q_pe.dtype}, expected {dtype} (q_lat and q_pe must match)")
    if kpe.dtype != kv_dtype:
        raise TypeError(f"kpe has dtype {kpe.dtype}, expected {kv_dtype} (ckv and kpe must match)")
    _check_dtypes(dtype, kv_dtype)
    for name, t in (("ckv", ckv), ("kpe", kpe)):
        if t.shape[0] > 0 and t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension (got strides {t.stride()})")
    if kv_indices.dim() != 1:
        raise ValueError(f"kv_indices must be 1-D, got shape {tuple(kv_indices.shape)}")
    device = q_lat.device
    for name, t in (("q_pe", q_pe), ("ckv", ckv), ("kpe", kpe), ("kv_indices", kv_indices)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, q_lat on {device}; all inputs must share a device")
    if out is not None:
        if tuple(out.shape) != (bsz, heads, d_ckv):
            raise ValueError(f"out must be [{what}, H, D_CKV] = {(bsz, heads, d_ckv)}, got {tuple(out.shape)}")
        if out.dtype not in SUPPORTED_DTYPES or out.device != device:
            raise ValueError(f"out must be fp32/fp16/bf16 on {device}, got {out.dtype} on {out.device}")
        if out.stride(2) != 1:
            raise ValueError("out must have unit stride in its last dimension")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"tensors on {device} need TRITON_INTERPRET=1 (set before triton is imported)")


def _scalars(sm_scale, mu, kv_scale, num_kv_splits):
    sm_scale = float(sm_scale)
    mu = 1.0 if mu is None else float(mu)
    kv_scale = 1.0 if kv_scale is None else float(kv_scale)
    if not all(math.isfinite(x) for x in (sm_scale, mu, kv_scale)) or kv_scale <= 0:
        raise ValueError(f"sm_scale={sm_scale}, mu={mu} must be finite and kv_scale={kv_scale} finite and > 0")
    if num_kv_splits is not None and not 1 <= int(num_kv_splits) <= 65535:
        raise ValueError(f"num_kv_splits must be in [1, 65535] (grid z), got {num_kv_splits}")
    return sm_scale, mu, kv_scale


def tpla_decode_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    mu: float | None = None,
    num_kv_splits: int | None = None,
    out: torch.Tensor | None = None,
    *,
    kv_scale: float | None = None,
    max_seq_len: int | None = None,
    config: TPLADecodeConfig | None = None,
    dot_fp32: bool | None = None,
    return_lse: bool = False,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_sms: int | None = None,
):
    """TPLA decode for one latent group: ``[B, H, D_CKV]`` latent-space output (before W_UV).

    * ``q_lat [B, H, D_CKV]``: the absorbed query's slice for this group; ``q_pe [B, H, 64]``.
      fp32, fp16 or bf16 (both the same dtype).
    * ``ckv [slots, D_CKV]``, ``kpe [slots, 64]``: the group's latent and RoPE caches; each may be a
      strided column view (last-dim stride 1), e.g. ``buf[:, :D]`` and ``buf[:, D:]`` of one
      ``[slots, D + 64]`` buffer.  Either the query dtype or ``torch.float8_e4m3fn`` (fp16 / bf16
      queries only).  An fp8 pool stored as ``uint8`` (SGLang's ``store_dtype``) must be passed as
      a ``.view(torch.float8_e4m3fn)``; ``TritonTPLADecode.run`` does that view itself.
    * ``kv_scale``: the per-tensor fp8 scale (dequantised value = stored value * ``kv_scale``;
      SGLang's ``k_scale``), ``None`` = 1.  It applies to both key parts and to V.
    * ``kv_indptr [B+1]``, ``kv_indices [nnz]``: int32 token-slot addressing (SGLang's flattened form).
      Their values are not checked (that would sync with the device): slots must be < ``slots``.
    * ``mu``: scale of the latent part of the logit (``None`` = 1).
    * ``num_kv_splits``: stage-1 splits (``None``: :func:`choose_num_kv_splits` for ``num_sms``
      (default: the device's), optionally bounded by the host-side ``max_seq_len``).
    * ``out``: optional ``[B, H, D_CKV]`` output (fp32/fp16/bf16, last-dim stride 1); default dtype
      is the query dtype.
    * ``config``: override :func:`choose_config`.  ``dot_fp32``: cast dot operands to fp32 (default:
      only for bf16 under ``TRITON_INTERPRET=1``).
    * ``workspace``: optional preallocated ``(partial_out [>=B, H, >=splits, D_CKV] fp32,
      partial_lse [>=B, H, >=splits] fp32)`` (contiguous).  With ``workspace`` and ``out`` given,
      nothing is allocated (CUDA graphs).
    * ``return_lse``: also return the natural-log LSE ``[B, H]`` fp32 (``-inf`` for empty requests;
      a new tensor).
    """
    _check_inputs(q_lat, q_pe, ckv, kpe, kv_indices, out, "B")
    bsz = q_lat.shape[0]
    if kv_indptr.dim() != 1 or kv_indptr.numel() != bsz + 1:
        raise ValueError(f"kv_indptr must be 1-D with B+1={bsz + 1} entries, got shape {tuple(kv_indptr.shape)}")
    for name, t in (("kv_indptr", kv_indptr), ("kv_indices", kv_indices)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    if kv_indptr.device != q_lat.device:
        raise ValueError(f"kv_indptr is on {kv_indptr.device}, q_lat on {q_lat.device}; all inputs must share a device")
    scalars = _scalars(sm_scale, mu, kv_scale, num_kv_splits)
    return _launch(
        q_lat, q_pe, ckv, kpe, kv_indptr, kv_indices, None, scalars, num_kv_splits, out, max_seq_len, config,
        dot_fp32, return_lse, workspace, num_sms,
    )  # fmt: skip


def tpla_extend_attention(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    q_req: torch.Tensor,
    q_lim: torch.Tensor,
    sm_scale: float,
    mu: float | None = None,
    out: torch.Tensor | None = None,
    *,
    kv_scale: float | None = None,
    max_seq_len: int | None = None,
    num_kv_splits: int | None = None,
    config: TPLADecodeConfig | None = None,
    dot_fp32: bool | None = None,
    num_sms: int | None = None,
) -> torch.Tensor:
    """TPLA extend (multi-token causal queries) for one latent group: ``[T, H, D_CKV]``.

    The decode kernel with one row per query token: row ``t`` (query token of request
    ``b = q_req[t]``, which may see keys ``0 .. q_lim[t]`` of its request, ``q_lim = P_b + i`` for
    its ``i``-th new token after a cached prefix of ``P_b``) attends over
    ``kv_indices[kv_indptr[b] : kv_indptr[b] + q_lim[t] + 1]``.  Start and length of each row are
    read on the device (no host sync, no loop over requests).

    * ``q_lat [T, H, D_CKV]``, ``q_pe [T, H, 64]``, ``ckv`` / ``kpe``, ``sm_scale``, ``mu``,
      ``kv_scale``, ``out``, ``config``, ``dot_fp32``, ``num_sms``: as :func:`tpla_decode_attention`.
    * ``kv_indptr [B+1]``, ``kv_indices``: int32, the requests' keys (cached prefix, then the new
      tokens, already written to the pool): lengths ``P_b + T_b``.
    * ``q_req [T]``, ``q_lim [T]``: int32 or int64 (``ExtendPlan.q_req`` / ``q_lim`` of
      :mod:`sglang_tpla.kernels.torch_extend`, or :class:`sglang_tpla.metadata.ExtendIndex`).
      Not checked against ``kv_indptr`` (that would sync): ``q_lim[t] < P_b + T_b``.
    * ``max_seq_len``: host bound on ``q_lim + 1`` (sizes the split count, like decode's).

    Launches are split over query rows only when one would pass ``2**31`` fp32 offsets.
    """
    _check_inputs(q_lat, q_pe, ckv, kpe, kv_indices, out, "T")
    rows = q_lat.shape[0]
    if kv_indptr.dim() != 1 or kv_indptr.numel() < 1:
        raise ValueError(f"kv_indptr must be 1-D with B+1 entries, got shape {tuple(kv_indptr.shape)}")
    for name, t in (("kv_indptr", kv_indptr), ("kv_indices", kv_indices)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    for name, t in (("q_req", q_req), ("q_lim", q_lim)):
        if t.dim() != 1 or t.numel() != rows:
            raise ValueError(f"{name} must be 1-D with T={rows} entries, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    for name, t in (("kv_indptr", kv_indptr), ("q_req", q_req), ("q_lim", q_lim)):
        if t.device != q_lat.device:
            raise ValueError(f"{name} is on {t.device}, q_lat on {q_lat.device}; all inputs must share a device")
    scalars = _scalars(sm_scale, mu, kv_scale, num_kv_splits)
    if out is None:
        out = torch.empty(rows, q_lat.shape[1], q_lat.shape[2], dtype=q_lat.dtype, device=q_lat.device)
    if rows == 0 or q_lat.shape[1] == 0:
        return out
    heads, d_ckv = q_lat.shape[1], q_lat.shape[2]
    cfg = config or choose_config(d_ckv, heads, q_lat.dtype, ckv.dtype)
    if num_kv_splits is None:  # host sizes only: the row count and the host bound on the row length
        sms = device_num_sms(q_lat.device) if num_sms is None else num_sms
        num_kv_splits = choose_num_kv_splits(rows, triton.cdiv(heads, cfg.block_h), cfg.block_n, sms, max_seq_len)
    q_req, q_lim = q_req.contiguous(), q_lim.contiguous()
    step = rows
    # int32 offsets: a launch keeps rows * H * splits * D_CKV below 2**31; only a very large extend
    # (e.g. more than 16K tokens at 128 heads x 512 columns) takes several launches
    per_row = heads * d_ckv * int(num_kv_splits)
    if rows * per_row >= 2**31:
        step = max(1, (2**31 - 1) // per_row)
    for t0 in range(0, rows, step):
        t1 = min(rows, t0 + step)
        ql, qp = q_lat[t0:t1], q_pe[t0:t1]
        if step < rows:  # a slice of a strided (e.g. head-major) query may still span 2**31 elements
            ql, qp = ql.contiguous(), qp.contiguous()
        _launch(
            ql, qp, ckv, kpe, kv_indptr, kv_indices, (q_req[t0:t1], q_lim[t0:t1]), scalars, num_kv_splits,
            out[t0:t1], max_seq_len, cfg, dot_fp32, False, None, num_sms,
        )  # fmt: skip
    return out


def _launch(
    q_lat, q_pe, ckv, kpe, kv_indptr, kv_indices, rows, scalars, num_kv_splits, out, max_seq_len, config, dot_fp32,
    return_lse, workspace, num_sms,
):  # fmt: skip
    """Both stages over ``B`` program rows: requests (``rows is None``: decode) or query tokens
    (``rows = (q_req, q_lim)``: extend).  Inputs already checked."""
    bsz, heads, d_ckv = q_lat.shape
    dtype, kv_dtype, device = q_lat.dtype, ckv.dtype, q_lat.device
    sm_scale, mu, kv_scale = scalars
    if out is None:
        out = torch.empty(bsz, heads, d_ckv, dtype=dtype, device=device)
    if q_lat.stride(2) != 1:
        q_lat = q_lat.contiguous()
    if q_pe.stride(2) != 1:
        q_pe = q_pe.contiguous()

    if bsz == 0 or heads == 0:
        lse = torch.empty(bsz, heads, dtype=torch.float32, device=device)
        return (out, lse) if return_lse else out

    cfg = config or choose_config(d_ckv, heads, dtype, kv_dtype)
    head_blocks = triton.cdiv(heads, cfg.block_h)
    if num_kv_splits is None:
        sms = device_num_sms(device) if num_sms is None else num_sms
        num_kv_splits = choose_num_kv_splits(bsz, head_blocks, cfg.block_n, sms, max_seq_len)
    num_kv_splits = int(num_kv_splits)
    if bsz * heads * num_kv_splits * d_ckv >= 2**31:
        raise ValueError(f"B*H*splits*D_CKV must stay below 2**31 (int32 offsets); lower num_kv_splits={num_kv_splits}")
    if dot_fp32 is None:
        dot_fp32 = _interpreting() and dtype == torch.bfloat16
    min_split_len = MIN_SPLIT_CHUNKS * cfg.block_n
    if workspace is None:
        plse = torch.empty(bsz, heads, num_kv_splits, dtype=torch.float32, device=device)
        po = torch.empty(bsz, heads, num_kv_splits, d_ckv, dtype=torch.float32, device=device) if num_kv_splits > 1 else None
    else:
        po, plse = _check_workspace(workspace, bsz, heads, num_kv_splits, d_ckv)
    row_req, row_lim = rows if rows is not None else (kv_indptr, kv_indptr)  # unread without ROWS

    grid = (bsz, head_blocks, num_kv_splits)
    meta = dict(
        D_CKV=d_ckv,
        D_PE=D_PE,
        BLOCK_H=cfg.block_h,
        BLOCK_N=cfg.block_n,
        DOT_FP32=bool(dot_fp32),
        PRECISION="ieee" if (dot_fp32 or dtype == torch.float32) else "tf32",
        ROWS=rows is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    head = (q_lat, q_pe, ckv, kpe, kv_indptr, kv_indices)
    scalars = (sm_scale * kv_scale * _LOG2E, mu, kv_scale, heads, min_split_len)
    in_strides = (q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), ckv.stride(0), kpe.stride(0))
    lse_strides = (plse.stride(0), plse.stride(1), plse.stride(2))

    if num_kv_splits == 1:  # the one split is the answer: write out directly (LSE into split 0)
        _tpla_decode_stage1[grid](
            *head, out, plse, *scalars, *in_strides, out.stride(0), out.stride(1), 0, *lse_strides, row_req, row_lim,
            **meta,
        )  # fmt: skip
        return (out, plse[:bsz, :, 0] * _LN2) if return_lse else out

    _tpla_decode_stage1[grid](
        *head, po, plse, *scalars, *in_strides, po.stride(0), po.stride(1), po.stride(2), *lse_strides, row_req,
        row_lim, **meta,
    )  # fmt: skip
    lse = torch.empty(bsz, heads, dtype=torch.float32, device=device) if return_lse else plse
    _tpla_decode_stage2[(bsz, heads)](
        po, plse, out, lse, kv_indptr, num_kv_splits, cfg.block_n, min_split_len,
        po.stride(0), po.stride(1), po.stride(2), plse.stride(0), plse.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), row_lim,
        D_CKV=d_ckv, BLOCK_S=triton.next_power_of_2(num_kv_splits), STORE_LSE=return_lse, ROWS=rows is not None,
        num_warps=4, num_stages=1,
    )  # fmt: skip
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- AOT compile (no GPU needed)

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", FP8_KV_DTYPE: "fp8e4nv"}


def stage1_aot_source(
    d_ckv: int,
    dtype: torch.dtype,
    cfg: TPLADecodeConfig,
    dot_fp32: bool = False,
    out_dtype: torch.dtype = torch.float32,
    kv_dtype: torch.dtype | None = None,
    rows: bool = False,
):
    """A ``triton.compiler.ASTSource`` for stage 1, specialised like a real launch on a
    ``[slots, D_CKV + 64]`` row buffer (pointers and row strides divisible by 16).  ``out_dtype``:
    fp32 for the split path (partials), the output dtype for the one-split path (writes ``out``).
    ``kv_dtype``: the cache dtype (``None``: the query dtype).  ``rows``: the multi-query extend
    variant (int32 ``q_req`` / ``q_lim``)."""
    from triton.compiler import ASTSource

    _check_d_ckv(d_ckv)
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    _check_dtypes(dtype, kv_dtype)
    t, kt = _TRITON_DTYPE[dtype], _TRITON_DTYPE[kv_dtype]
    fn = _tpla_decode_stage1
    ptr_types = {
        "q_lat_ptr": f"*{t}", "q_pe_ptr": f"*{t}", "ckv_ptr": f"*{kt}", "kpe_ptr": f"*{kt}",
        "kv_indptr_ptr": "*i32", "kv_indices_ptr": "*i32", "o_ptr": f"*{_TRITON_DTYPE[out_dtype]}", "lse_ptr": "*fp32",
        "row_req_ptr": "*i32", "row_lim_ptr": "*i32",
    }  # fmt: skip
    constexprs = dict(
        D_CKV=d_ckv,
        D_PE=D_PE,
        BLOCK_H=cfg.block_h,
        BLOCK_N=cfg.block_n,
        DOT_FP32=dot_fp32,
        PRECISION="ieee" if (dot_fp32 or dtype == torch.float32) else "tf32",
        ROWS=rows,
    )
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptr_types:
            signature[name] = ptr_types[name]
        elif name in ("qk_scale", "mu", "v_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    divisible = [n for n in fn.arg_names if n in ptr_types or n.startswith("stride_")]
    divisible = [n for n in divisible if n not in ("stride_ls",)]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def stage2_aot_source(
    d_ckv: int, out_dtype: torch.dtype, num_kv_splits: int = 8, store_lse: bool = False, rows: bool = False
):
    from triton.compiler import ASTSource

    _check_d_ckv(d_ckv)
    fn = _tpla_decode_stage2
    ptr_types = {
        "po_ptr": "*fp32", "plse_ptr": "*fp32", "out_ptr": f"*{_TRITON_DTYPE[out_dtype]}", "lse_out_ptr": "*fp32",
        "kv_indptr_ptr": "*i32", "row_lim_ptr": "*i32",
    }  # fmt: skip
    constexprs = dict(D_CKV=d_ckv, BLOCK_S=triton.next_power_of_2(num_kv_splits), STORE_LSE=store_lse, ROWS=rows)
    signature = {n: ("constexpr" if n in constexprs else ptr_types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ptr_types}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
