"""Triton TPLA decode attention: one latent group's attention over a paged latent cache.

Imported as ``sglang_tpla.kernels.tpla_decode`` (``kernels/`` has no ``__init__.py`` on purpose).
Written for this project; it is not derived from SGLang's ``decode_attention.py``.

What it computes
----------------
For every request ``b`` and head ``h`` of one TPLA latent group (the caller passes the group's
columns: ``D_CKV = 512 / g`` latent columns plus the 64 RoPE columns)::

    logit[t] = sm_scale * (mu * q_lat[b, h] . ckv[slot_t] + q_pe[b, h] . kpe[slot_t])
    out[b, h] = softmax(logit) @ ckv[slots]                     # [D_CKV], latent space, before W_UV

over the request's tokens ``slot_t = kv_indices[kv_indptr[b] + t]``, ``t < kv_indptr[b+1] - kv_indptr[b]``.
This is ``sglang_tpla.reference.latent_attention`` per request (the fp32 oracle).  An empty request
gives zeros.  ``kv_indices`` are token slots (SGLang's flattened ``req_to_token`` form, int32); a
page size > 1 is already resolved in them, so paged and unpaged pools take the same path.

Decode only (query length 1)
----------------------------
There is no extend / target-verify (query length > 1) variant, on purpose:

* TPLA approximates decode only.  Prefill (extend) stays exact MLA, which needs the full 512-wide
  latent; a TPLA rank's pool holds only its slice, so an exact extend cannot run on it at all, and
  in PD-separated serving the prefill node runs plain MLA anyway.
* Speculative verify (MTP / EAGLE, q_len > 1 with a causal mask over the draft tokens) would need a
  different tiling (queries x heads in the M dimension) and is not supported by the TPLA backend;
  the backend must refuse it rather than call this kernel per draft token.

Design
------
Two-stage split-KV ("flash-decoding"):

* stage 1, grid ``(B, cdiv(H, BLOCK_H), num_kv_splits)``: each program holds a ``BLOCK_H`` tile of
  heads (masked beyond ``H``; ``BLOCK_H = 64`` for >32 heads so that sm_90 uses wgmma, which needs
  M = 64 per warpgroup), walks its split of the request's tokens in ``BLOCK_N`` chunks, gathers the
  ``[BLOCK_N, D_CKV]`` latent rows and ``[BLOCK_N, 64]`` RoPE rows through ``kv_indices`` (separate
  base pointers and row strides, so two column views of one ``[slots, D_CKV + 64]`` buffer work with
  no copy), computes the two QK dots, runs an online softmax in base 2 with fp32 state, and reuses
  the latent tile as V (``P @ ckv``).  It writes the normalised partial output
  ``[B, H, splits, D_CKV]`` (fp32) and the base-2 log-sum-exp per split.  With one split it writes
  the final output directly and stage 2 is skipped.
* stage 2, grid ``(B, H)``: merges the splits by log-sum-exp into ``out [B, H, D_CKV]``.

Precision: QK dots take the cache dtype and accumulate in fp32; softmax state, accumulator,
partials and the merge are fp32; P is cast to the cache dtype for the PV dot (as in
FlashAttention).  The output is stored in ``out``'s dtype (default: the query dtype).

Configs (``choose_config``; compiled for sm_90 by ``tests/test_kernel_compile.py``, which checks
shared memory <= 227 KiB, no register spills and wgmma for BLOCK_H = 64):

=======  =================================  =====================================
D_CKV    > 32 heads: BLOCK_H=64 (wgmma)     <= 16 / <= 32 heads: BLOCK_H=16 / 32
=======  =================================  =====================================
512      BLOCK_N=32, 8 warps, 2 stages      BLOCK_N=32, 4 / 8 warps, 2 stages
256      BLOCK_N=64, 8 warps, 2 stages      BLOCK_N=64, 4 warps, 2 stages
128, 64  BLOCK_N=64, 4 warps, 3 stages      BLOCK_N=64, 4 warps, 3 stages
=======  =================================  =====================================

fp32 inputs use BLOCK_H=16, BLOCK_N=16, 1 stage (ieee dots on FMA units; not a serving path).
Splits (``choose_num_kv_splits``): about ``2 * SMs`` stage-1 programs, at most ``MAX_KV_SPLITS``,
from host-side sizes only (CUDA-graph safe); an optional host ``max_seq_len`` keeps >= 4 chunks
per split.  None of this is tuned on a GPU yet.

No explicit page size: SGLang's token-level ``kv_indices`` already resolve pages, and a page-table
form would only save the 4-byte index per token against 256-1152 bytes of KV per token.

``DOT_FP32`` (constexpr) casts the ``tl.dot`` operands to fp32.  It exists for ``TRITON_INTERPRET=1``,
whose bf16 ``tl.dot`` multiplies raw bit patterns (triton #11584); on a GPU keep the native bf16/fp16
dots.  fp32 inputs use ``input_precision="ieee"`` (no TF32), since fp32 is the exactness path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

D_PE = 64
SUPPORTED_D_CKV = (512, 256, 128, 64)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KV_SPLITS = 64
# H100 / H200 limit on dynamic shared memory per block (opt-in): 227 KiB.
SM90_MAX_SHARED_BYTES = 232448

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------- kernels


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
    qk_scale,  # sm_scale * log2(e)
    mu,  # scale of the latent part of the logit
    num_heads,
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
    D_CKV: tl.constexpr,
    D_PE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

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

    kv_start = tl.load(kv_indptr_ptr + b)
    kv_len = tl.load(kv_indptr_ptr + b + 1) - kv_start
    # Splits cover whole BLOCK_N chunks; trailing splits of a short request are empty.
    per_split = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, kv_len)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_CKV], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        slot = tl.load(kv_indices_ptr + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
        ckv = tl.load(ckv_ptr + slot[:, None] * stride_ckv + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        kpe = tl.load(kpe_ptr + slot[:, None] * stride_kpe + offs_p[None, :], mask=mask_n[:, None], other=0.0)
        if DOT_FP32:
            ckv = ckv.to(tl.float32)
            kpe = kpe.to(tl.float32)
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
    out = acc / l_safe[:, None]
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
    num_splits,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_ob,
    stride_oh,
    stride_lob,
    stride_loh,
    D_CKV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D_CKV)
    lse = tl.load(plse_ptr + b * stride_plb + h * stride_plh + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: every weight below is 0
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    acc = tl.zeros([D_CKV], tl.float32)
    base = po_ptr + b * stride_pob + h * stride_poh
    for s in range(0, num_splits):
        ws = tl.exp2(tl.load(plse_ptr + b * stride_plb + h * stride_plh + s) - m)
        part = tl.load(base + s * stride_pos + offs_d)
        acc += tl.where(ws > 0, ws * part, 0.0)
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


# Per D_CKV, for the wgmma head tile (BLOCK_H = 64): (BLOCK_N, num_warps, num_stages).  8 warps
# (two warpgroups) keep the [64, D_CKV] fp32 accumulator in registers without spilling for the
# wide latents.  Shared memory per config is checked for sm_90 by tests/test_kernel_compile.py.
_WIDE = {512: (32, 8, 2), 256: (64, 8, 2), 128: (64, 4, 3), 64: (64, 4, 3)}
# For <= 32 heads (mma.sync tiles, memory-bound anyway): BLOCK_H = 16 or 32, keyed (D_CKV, BLOCK_H).
_NARROW = {
    (512, 16): (32, 4, 2),
    (512, 32): (32, 8, 2),  # 4 warps spill the [32, 512] accumulator
    (256, 16): (64, 4, 2),
    (256, 32): (64, 4, 2),
    (128, 16): (64, 4, 3),
    (128, 32): (64, 4, 3),
    (64, 16): (64, 4, 3),
    (64, 32): (64, 4, 3),
}


def choose_config(d_ckv: int, num_heads: int, dtype: torch.dtype) -> TPLADecodeConfig:
    """Stage-1 launch parameters for a latent width, head count (per rank) and cache dtype."""
    _check_d_ckv(d_ckv)
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; use one of {SUPPORTED_DTYPES}")
    if dtype == torch.float32:
        # fp32 is the exactness path (ieee dots run on FMA units, not tensor cores): small tiles,
        # no spills on sm_90.  Not a serving path.
        return TPLADecodeConfig(16, 16, 8 if d_ckv == 512 else 4, 1)
    if num_heads > 32:
        block_h = 64
        block_n, warps, stages = _WIDE[d_ckv]
    else:
        block_h = 16 if num_heads <= 16 else 32
        block_n, warps, stages = _NARROW[(d_ckv, block_h)]
    return TPLADecodeConfig(block_h, block_n, warps, stages)


def all_configs(dtypes=(torch.bfloat16, torch.float16)) -> dict[tuple[int, torch.dtype, int], TPLADecodeConfig]:
    """Every config ``choose_config`` can return (for 1..256 heads), keyed ``(d_ckv, dtype, block_h)``."""
    out = {}
    for d in SUPPORTED_D_CKV:
        for dt in dtypes:
            for h in range(1, 257):
                cfg = choose_config(d, h, dt)
                out[(d, dt, cfg.block_h)] = cfg
    return out


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # H100 / H200; only used to size the split count


_SM_CACHE: dict[int, int] = {}


def _cuda_sms(index: int) -> int:
    if index not in _SM_CACHE:
        _SM_CACHE[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_CACHE[index]


def choose_num_kv_splits(
    batch: int, num_head_blocks: int, block_n: int, num_sms: int = 132, max_seq_len: int | None = None
) -> int:
    """How many KV splits stage 1 uses.

    Aims at about two waves of programs over the SMs (``batch * head_blocks * splits ~ 2 * SMs``),
    at most ``MAX_KV_SPLITS``.  It never reads device data (no host sync; CUDA-graph safe).  With a
    host-side ``max_seq_len`` it also keeps at least 4 ``BLOCK_N`` chunks per split, so short
    contexts do not launch mostly empty splits.
    """
    base = max(1, batch * num_head_blocks)
    splits = max(1, min(MAX_KV_SPLITS, -(-2 * num_sms // base)))
    if max_seq_len is not None:
        splits = max(1, min(splits, -(-max(int(max_seq_len), 1) // (4 * block_n))))
    return splits


# --------------------------------------------------------------------------- wrapper


def _check_d_ckv(d: int):
    if d not in SUPPORTED_D_CKV:
        raise ValueError(f"latent width D_CKV={d} is not supported; use one of {SUPPORTED_D_CKV} (512/g)")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    max_seq_len: int | None = None,
    config: TPLADecodeConfig | None = None,
    dot_fp32: bool | None = None,
    return_lse: bool = False,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """TPLA decode for one latent group: ``[B, H, D_CKV]`` latent-space output (before W_UV).

    * ``q_lat [B, H, D_CKV]``: the absorbed query's slice for this group; ``q_pe [B, H, 64]``.
    * ``ckv [slots, D_CKV]``, ``kpe [slots, 64]``: the group's latent and RoPE caches; each may be a
      strided column view (last-dim stride 1), e.g. ``buf[:, :D]`` and ``buf[:, D:]`` of one
      ``[slots, D + 64]`` buffer.  Same dtype as the queries: fp32, fp16 or bf16.
    * ``kv_indptr [B+1]``, ``kv_indices [nnz]``: int32 token-slot addressing (SGLang's flattened form).
      Their values are not checked (that would sync with the device): slots must be < ``slots``.
    * ``mu``: scale of the latent part of the logit (``None`` = 1).
    * ``num_kv_splits``: stage-1 splits (``None``: :func:`choose_num_kv_splits`, optionally bounded
      by the host-side ``max_seq_len``).
    * ``out``: optional ``[B, H, D_CKV]`` output (fp32/fp16/bf16, last-dim stride 1); default dtype
      is the query dtype.
    * ``config``: override :func:`choose_config`.  ``dot_fp32``: cast dot operands to fp32 (default:
      only for bf16 under ``TRITON_INTERPRET=1``).
    * ``workspace``: optional preallocated ``(partial_out [>=B, H, >=splits, D_CKV] fp32,
      partial_lse [>=B, H, >=splits] fp32)`` (contiguous) for CUDA graphs.
    * ``return_lse``: also return the natural-log LSE ``[B, H]`` fp32 (``-inf`` for empty requests).
    """
    # ---- validation
    if q_lat.dim() != 3 or q_pe.dim() != 3:
        raise ValueError(f"q_lat and q_pe must be [B, H, D]; got {tuple(q_lat.shape)} and {tuple(q_pe.shape)}")
    bsz, heads, d_ckv = q_lat.shape
    _check_d_ckv(d_ckv)
    if tuple(q_pe.shape) != (bsz, heads, D_PE):
        raise ValueError(f"q_pe must be [B, H, {D_PE}] = {(bsz, heads, D_PE)}, got {tuple(q_pe.shape)}")
    if ckv.dim() != 2 or ckv.shape[1] != d_ckv:
        raise ValueError(f"ckv must be [slots, {d_ckv}] (the group's latent columns), got {tuple(ckv.shape)}")
    if kpe.dim() != 2 or tuple(kpe.shape) != (ckv.shape[0], D_PE):
        raise ValueError(f"kpe must be [slots, {D_PE}] with slots={ckv.shape[0]}, got {tuple(kpe.shape)}")
    dtype = q_lat.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}; use one of {SUPPORTED_DTYPES}")
    for name, t in (("q_pe", q_pe), ("ckv", ckv), ("kpe", kpe)):
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} (q_lat, q_pe, ckv, kpe must match)")
    for name, t in (("ckv", ckv), ("kpe", kpe)):
        if t.shape[0] > 0 and t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension (got strides {t.stride()})")
    if kv_indptr.dim() != 1 or kv_indptr.numel() != bsz + 1:
        raise ValueError(f"kv_indptr must be 1-D with B+1={bsz + 1} entries, got shape {tuple(kv_indptr.shape)}")
    if kv_indices.dim() != 1:
        raise ValueError(f"kv_indices must be 1-D, got shape {tuple(kv_indices.shape)}")
    for name, t in (("kv_indptr", kv_indptr), ("kv_indices", kv_indices)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    device = q_lat.device
    for name, t in (("q_pe", q_pe), ("ckv", ckv), ("kpe", kpe), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, q_lat on {device}; all inputs must share a device")
    sm_scale = float(sm_scale)
    mu = 1.0 if mu is None else float(mu)
    if not (math.isfinite(sm_scale) and math.isfinite(mu)):
        raise ValueError(f"sm_scale={sm_scale} and mu={mu} must be finite")
    if num_kv_splits is not None and not 1 <= int(num_kv_splits) <= 65535:
        raise ValueError(f"num_kv_splits must be in [1, 65535] (grid z), got {num_kv_splits}")
    if out is None:
        out = torch.empty(bsz, heads, d_ckv, dtype=dtype, device=device)
    else:
        if tuple(out.shape) != (bsz, heads, d_ckv):
            raise ValueError(f"out must be [B, H, D_CKV] = {(bsz, heads, d_ckv)}, got {tuple(out.shape)}")
        if out.dtype not in SUPPORTED_DTYPES or out.device != device:
            raise ValueError(f"out must be fp32/fp16/bf16 on {device}, got {out.dtype} on {out.device}")
        if out.stride(2) != 1:
            raise ValueError("out must have unit stride in its last dimension")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"tensors on {device} need TRITON_INTERPRET=1 (set before triton is imported)")
    if q_lat.stride(2) != 1:
        q_lat = q_lat.contiguous()
    if q_pe.stride(2) != 1:
        q_pe = q_pe.contiguous()

    if bsz == 0 or heads == 0:
        lse = torch.empty(bsz, heads, dtype=torch.float32, device=device)
        return (out, lse) if return_lse else out

    cfg = config or choose_config(d_ckv, heads, dtype)
    head_blocks = triton.cdiv(heads, cfg.block_h)
    if num_kv_splits is None:
        num_kv_splits = choose_num_kv_splits(bsz, head_blocks, cfg.block_n, _num_sms(device), max_seq_len)
    num_kv_splits = int(num_kv_splits)
    if dot_fp32 is None:
        dot_fp32 = _interpreting() and dtype == torch.bfloat16
    precision = "ieee" if (dot_fp32 or dtype == torch.float32) else "tf32"

    qk_scale = sm_scale * _LOG2E
    grid = (bsz, head_blocks, num_kv_splits)
    meta = dict(
        D_CKV=d_ckv,
        D_PE=D_PE,
        BLOCK_H=cfg.block_h,
        BLOCK_N=cfg.block_n,
        DOT_FP32=bool(dot_fp32),
        PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    common = (q_lat, q_pe, ckv, kpe, kv_indptr, kv_indices)
    q_strides = (q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), ckv.stride(0), kpe.stride(0))

    if num_kv_splits == 1:  # the one split is the answer: write out directly
        lse2 = torch.empty(bsz, heads, dtype=torch.float32, device=device)
        _tpla_decode_stage1[grid](
            *common, out, lse2, qk_scale, mu, heads, *q_strides,
            out.stride(0), out.stride(1), 0, lse2.stride(0), lse2.stride(1), 0, **meta,
        )  # fmt: skip
        return (out, lse2 * _LN2) if return_lse else out

    if bsz * heads * num_kv_splits * d_ckv >= 2**31:
        raise ValueError(f"B*H*splits*D_CKV must stay below 2**31 (int32 offsets); lower num_kv_splits={num_kv_splits}")
    if workspace is None:
        po = torch.empty(bsz, heads, num_kv_splits, d_ckv, dtype=torch.float32, device=device)
        plse = torch.empty(bsz, heads, num_kv_splits, dtype=torch.float32, device=device)
    else:
        po, plse = workspace
        if (
            po.dtype != torch.float32
            or plse.dtype != torch.float32
            or po.dim() != 4
            or plse.dim() != 3
            or po.shape[0] < bsz
            or po.shape[1] != heads
            or po.shape[2] < num_kv_splits
            or po.shape[3] != d_ckv
            or plse.shape[0] < bsz
            or plse.shape[1] != heads
            or plse.shape[2] < num_kv_splits
            or not (po.is_contiguous() and plse.is_contiguous())
        ):
            raise ValueError(
                f"workspace must be contiguous fp32 ([>={bsz}, {heads}, >={num_kv_splits}, {d_ckv}], "
                f"[>={bsz}, {heads}, >={num_kv_splits}]); got {tuple(po.shape)} {po.dtype}, {tuple(plse.shape)} {plse.dtype}"
            )
    _tpla_decode_stage1[grid](
        *common, po, plse, qk_scale, mu, heads, *q_strides,
        po.stride(0), po.stride(1), po.stride(2), plse.stride(0), plse.stride(1), plse.stride(2), **meta,
    )  # fmt: skip
    lse = torch.empty(bsz, heads, dtype=torch.float32, device=device) if return_lse else plse
    _tpla_decode_stage2[(bsz, heads)](
        po, plse, out, lse, num_kv_splits,
        po.stride(0), po.stride(1), po.stride(2), plse.stride(0), plse.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        D_CKV=d_ckv, BLOCK_S=triton.next_power_of_2(num_kv_splits), STORE_LSE=return_lse, num_warps=4, num_stages=1,
    )  # fmt: skip
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- AOT compile (no GPU needed)

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def stage1_aot_source(
    d_ckv: int, dtype: torch.dtype, cfg: TPLADecodeConfig, dot_fp32: bool = False, out_dtype: torch.dtype = torch.float32
):
    """A ``triton.compiler.ASTSource`` for stage 1, specialised like a real launch on a
    ``[slots, D_CKV + 64]`` row buffer (pointers and row strides divisible by 16).  ``out_dtype``:
    fp32 for the split path (partials), the output dtype for the one-split path (writes ``out``)."""
    from triton.compiler import ASTSource

    _check_d_ckv(d_ckv)
    t = _TRITON_DTYPE[dtype]
    fn = _tpla_decode_stage1
    ptr_types = {
        "q_lat_ptr": f"*{t}", "q_pe_ptr": f"*{t}", "ckv_ptr": f"*{t}", "kpe_ptr": f"*{t}",
        "kv_indptr_ptr": "*i32", "kv_indices_ptr": "*i32", "o_ptr": f"*{_TRITON_DTYPE[out_dtype]}", "lse_ptr": "*fp32",
    }  # fmt: skip
    constexprs = dict(
        D_CKV=d_ckv,
        D_PE=D_PE,
        BLOCK_H=cfg.block_h,
        BLOCK_N=cfg.block_n,
        DOT_FP32=dot_fp32,
        PRECISION="ieee" if (dot_fp32 or dtype == torch.float32) else "tf32",
    )
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptr_types:
            signature[name] = ptr_types[name]
        elif name in ("qk_scale", "mu"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    divisible = [n for n in fn.arg_names if n in ptr_types or n.startswith("stride_")]
    divisible = [n for n in divisible if n not in ("stride_ls",)]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def stage2_aot_source(d_ckv: int, out_dtype: torch.dtype, num_kv_splits: int = 8, store_lse: bool = False):
    from triton.compiler import ASTSource

    _check_d_ckv(d_ckv)
    fn = _tpla_decode_stage2
    ptr_types = {"po_ptr": "*fp32", "plse_ptr": "*fp32", "out_ptr": f"*{_TRITON_DTYPE[out_dtype]}", "lse_out_ptr": "*fp32"}
    constexprs = dict(D_CKV=d_ckv, BLOCK_S=triton.next_power_of_2(num_kv_splits), STORE_LSE=store_lse)
    signature = {
        n: ("constexpr" if n in constexprs else ptr_types.get(n, "i32")) for n in fn.arg_names
    }
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ptr_types}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
