"""Correctness cases of the GPU check: the Triton TPLA decode kernel against the fp32 reference, and
CUDA-graph capture / replay of ``TritonTPLADecode.run``.  Run through ``tests/gpu/gpucheck.py``
(``bash tests/gpu/run.sh``); needs only torch + triton and this tree.

Numerics (section ``numerics``)
    ``tpla_decode_attention`` for D in {512, 256, 128, 64} x heads in {16, 40, 128}, ragged requests
    (lengths 0, 1, 63, 1000, 4500; one case up to 33000), mu != 1, one split / the default split
    count / 48 splits, ``return_lse``, bf16, fp16, fp32 and fp8 (e4m3) KV with bf16 queries.  The
    reference is ``sglang_tpla.reference.latent_attention`` per request in fp32 on the same
    (rounded / dequantized) inputs.  A case passes when every element satisfies
    ``|out - ref| <= atol + rtol * |ref|`` (NaN never passes; outputs are NaN-poisoned before the
    call, so an element the kernel did not write fails), empty requests give exactly 0, and the
    LSE (natural log, -inf for empty requests) is within ``lse_atol``.

Extend numerics (section ``numerics``, names ``extend_*``)
    ``tpla_extend_attention`` (``prefill: tpla`` on the Triton route: one row per query token, causal
    over its request's prefix and the new tokens before it) for DeepSeek-V3 / Kimi-K2 shapes, bf16,
    fp16 and fp8 KV, requests with cached prefixes 0 .. 4500 and 1 .. 200 new tokens, shuffled slots,
    head-major queries (as the DeepSeek hook's ``bmm`` leaves them), the default split count and a
    forced one.  Reference: a loop over query tokens, each ``latent_attention`` over its keys
    ``0 .. P_b + i`` in fp32; same pass rule.

CUDA graphs (section ``graph``)
    ``TritonTPLADecode.run`` captured at one batch size (after an eager warm-up, as SGLang does),
    then replayed (1) on the capture data, (2) with new data written into the same buffers,
    longer requests than at capture, and (3) with fewer live requests, the rest padded the way
    SGLang pads a graph batch (seq_len fill value 1, pointing at the dummy slot 0).  Each replay
    is compared with an eager ``run`` on the same buffers (must be bit-identical: same kernels,
    same split count) and the live requests with the fp32 reference.

Dry run (no GPU): every case is built on the CPU at small lengths and every kernel launch is
checked and recorded but not executed (``gpucheck.DryLaunch``), except the cases marked
``dry_real``, which run for real under ``TRITON_INTERPRET=1``; CUDA-graph capture is replaced by
eager calls.
"""

from __future__ import annotations

import itertools
import math
import zlib

import torch

D_PE = 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
# (atol, rtol) of |out - ref| <= atol + rtol*|ref|, keyed by the KV dtype (fp8 KV has bf16 queries and
# a bf16 P.V, so it gets bf16's bound; its reference already holds the fp8 rounding).
TOL = {"fp32": (2e-5, 2e-5), "fp16": (2e-3, 5e-3), "bf16": (1.5e-2, 2e-2), "fp8": (1.5e-2, 2e-2)}
LSE_ATOL = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 2e-3, "fp8": 2e-3}
SM_SCALE = 192**-0.5  # DeepSeek-V3's (nope 128 + rope 64)^-0.5 without the YaRN mscale

LENS = [0, 1, 63, 1000, 4500]
LENS_DRY = [0, 1, 9, 40, 130]
LONG = [33000, 1, 0, 4500]
LONG_DRY = [300, 1, 0, 130]
# extend: (cached prefix, new tokens) per request
EXTEND = ([0, 5, 17, 1000, 4500], [1, 4, 9, 200, 64])
EXTEND_DRY = ([0, 5, 17], [1, 4, 9])
EXTEND_FEW = ([4500, 33], [3, 2])  # few query rows over a long prefix: the default takes several splits


def _case(name, d, h, kv, q=None, **kw):
    c = dict(section="numerics", name=name, d=d, heads=h, kv=kv, q=q or ("bf16" if kv == "fp8" else kv))
    c.update(kw)
    c.setdefault("lens", "std")
    c.setdefault("splits", "default")  # "default": the kernel's own choice bounded by max_seq_len
    c.setdefault("mu", None)
    c.setdefault("lse", False)
    c.setdefault("out", "poison")  # "poison" (NaN, q dtype) | "fp32" (NaN, fp32) | None (kernel allocates)
    c.setdefault("qscale", 1.0)
    c.setdefault("kv_scale", 0.05 if kv == "fp8" else None)
    c.setdefault("dry_real", False)
    c["affinity"] = f"{c['q']}-{kv}-{d}"  # cases sharing kernel specialisations go to one worker
    c["cost"] = 1.0
    return c


def numerics_cases() -> list[dict]:
    cs = []
    for d in (512, 256, 128, 64):
        for h in (16, 40, 128):
            cs.append(_case(f"bf16_d{d}_h{h}", d, h, "bf16", mu=0.75 if h == 40 else None, lse=h == 40,
                            dry_real=(d, h) == (64, 16)))  # fmt: skip
        cs.append(_case(f"bf16_d{d}_h128_1split_lse_mu", d, 128, "bf16", splits=1, lse=True, mu=1.3, out=None))
    cs.append(_case("bf16_d512_h16_48splits_lse", 512, 16, "bf16", splits=48, lse=True))
    cs.append(_case("bf16_d64_h128_48splits_out_fp32", 64, 128, "bf16", splits=48, out="fp32"))
    cs.append(_case("bf16_d256_h128_peaked_33k", 256, 128, "bf16", lens="long", qscale=4.0))
    cs.append(_case("bf16_d128_h16_all_empty_4splits_lse", 128, 16, "bf16", lens=[0, 0, 0], splits=4, lse=True,
                    dry_real=True))  # fmt: skip
    for d in (512, 256, 128, 64):
        cs.append(_case(f"fp16_d{d}_h128", d, 128, "fp16"))
    cs.append(_case("fp16_d256_h16_1split_lse", 256, 16, "fp16", splits=1, lse=True, mu=0.6, dry_real=True))
    for d in (512, 256, 128, 64):
        cs.append(_case(f"fp32_d{d}_h16", d, 16, "fp32", mu=1.5 if d == 128 else None))
    cs.append(_case("fp32_d512_h40_1split_lse_mu", 512, 40, "fp32", splits=1, lse=True, mu=0.8))
    for d in (512, 256, 128, 64):
        for h in (16, 128):
            cs.append(_case(f"fp8kv_d{d}_h{h}", d, h, "fp8", dry_real=(d, h) == (64, 16)))
    cs.append(_case("fp8kv_d512_h40_1split_lse_mu", 512, 40, "fp8", splits=1, lse=True, mu=1.2))
    # prefill: tpla through the Triton multi-query kernel
    cs.append(_case("extend_bf16_d256_h128", 256, 128, "bf16", kind="extend", lens="extend"))
    cs.append(_case("extend_bf16_d512_h16", 512, 16, "bf16", kind="extend", lens="extend", mu=0.9))
    cs.append(_case("extend_bf16_d128_h32_few_rows_long_prefix", 128, 32, "bf16", kind="extend", lens="few"))
    cs.append(_case("extend_fp16_d256_h16_3splits", 256, 16, "fp16", kind="extend", lens="extend", splits=3))
    cs.append(_case("extend_fp8kv_d128_h32", 128, 32, "fp8", kind="extend", lens="extend"))
    cs.append(_case("extend_fp16_d64_h16", 64, 16, "fp16", kind="extend", lens="extend", dry_real=True))
    return cs


GRAPH_CASES = [
    # DeepSeek-V3 TP=2 g=2 (all 128 heads, D=256), the compute-heavy TPLA shape
    dict(name="graph_tpla_d256_h128_bf16", d=256, heads=128, kv="bf16", capture_bs=8, live=5, mu=0.9),
    # stock MLA at DeepSeek-V3 TP=8 (16 heads x 512)
    dict(name="graph_mla_d512_h16_bf16", d=512, heads=16, kv="bf16", capture_bs=16, live=3, mu=None),
    # Kimi-K2 TP=8 g=4 (32 heads, D=128) with an fp8 KV cache, passed as SGLang stores it (uint8)
    dict(name="graph_tpla_d128_h32_fp8kv", d=128, heads=32, kv="fp8", capture_bs=4, live=1, mu=1.1, kv_scale=0.05),
    # tiny: runs for real under the interpreter in the dry run
    dict(name="graph_tpla_d64_h16_bf16_small", d=64, heads=16, kv="bf16", capture_bs=3, live=2, mu=None, dry_real=True),
    dict(name="graph_tpla_d64_h16_fp8kv_small", d=64, heads=16, kv="fp8", capture_bs=2, live=1, mu=0.7, kv_scale=0.05,
         dry_real=True),
]
for _g in GRAPH_CASES:
    _g.update(section="graph", affinity=f"graph-{_g['kv']}-{_g['d']}", cost=3.0)
    _g.setdefault("kv_scale", None)
    _g.setdefault("dry_real", False)


def graph_cases() -> list[dict]:
    return [dict(c) for c in GRAPH_CASES]


# --------------------------------------------------------------------------- data and reference


def make_rows(slots: int, d: int, kv: str, device, gen, kv_scale=None):
    """A ``[slots, 1, d+64]`` pool in the KV dtype and its fp32 (dequantized) values."""
    x = torch.randn(slots, 1, d + D_PE, device=device, generator=gen)
    if kv == "fp8":
        rows = (x / kv_scale).to(torch.float8_e4m3fn)
        return rows, rows.float() * kv_scale
    rows = x.to(DTYPES[kv])
    return rows, rows.float()


def reference(q_lat, q_pe, deq, d, lens, indices, sm_scale, mu):
    """fp32 output ``[B, H, d]`` and natural-log LSE ``[B, H]`` (-inf for empty requests), per request
    through ``sglang_tpla.reference.latent_attention``."""
    from sglang_tpla.reference import latent_attention

    bsz, heads = q_lat.shape[:2]
    flat = deq.reshape(deq.shape[0], -1)
    out = torch.zeros(bsz, heads, d, device=q_lat.device)
    lse = torch.full((bsz, heads), -math.inf, device=q_lat.device)
    lo = 0
    for b, n in enumerate(lens):
        if n:
            idx = indices[lo : lo + n].long()
            ckv, kpe = flat[idx, :d], flat[idx, d:]
            ql, qp = q_lat[b : b + 1].float(), q_pe[b : b + 1].float()
            out[b] = latent_attention(ql, qp, ckv, kpe, sm_scale, mu)[0]
            lat = torch.einsum("thd,ld->thl", ql, ckv) * (1.0 if mu is None else mu)
            lse[b] = ((lat + torch.einsum("thp,lp->thl", qp, kpe)) * sm_scale)[0].logsumexp(-1)
        lo += n
    return out, lse


def compare(out, ref, atol, rtol) -> dict:
    o = out.float()
    diff = (o - ref).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    bound = atol + rtol * ref.abs()
    denom = ref.norm().item()
    return {
        "max_abs_err": diff.max().item() if diff.numel() else 0.0,
        "err_over_tol": (diff / bound).max().item() if diff.numel() else 0.0,
        "rel_l2": ((o - ref).norm().item() / denom) if denom > 0 else (0.0 if o.abs().max().item() == 0 else math.inf),
        "ref_max_abs": ref.abs().max().item() if ref.numel() else 0.0,
        "atol": atol,
        "rtol": rtol,
        "ok": bool((diff <= bound).all()),
    }


def compare_lse(lse, ref_lse, atol) -> dict:
    lse = lse.float()
    inf_ref = torch.isinf(ref_lse)
    same_inf = bool((torch.isinf(lse) == inf_ref).all() and (lse[inf_ref] < 0).all())
    fin = ~inf_ref
    err = (lse[fin] - ref_lse[fin]).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    e = err.max().item() if err.numel() else 0.0
    return {"lse_max_abs_err": e, "lse_atol": atol, "lse_empty_is_neg_inf": same_inf, "lse_ok": same_inf and e <= atol}


def _indptr(lens, device):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


# --------------------------------------------------------------------------- numerics


def run_numerics(case: dict, ctx) -> dict:
    from sglang_tpla.kernels import tpla_decode as K

    if case.get("kind") == "extend":
        return run_extend(case, ctx)
    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(_seed(case["name"]))
    lens = case["lens"]
    if lens == "std":
        lens = LENS_DRY if ctx.dry else LENS
    elif lens == "long":
        lens = LONG_DRY if ctx.dry else LONG
    d, h, kv, qn = case["d"], case["heads"], case["kv"], case["q"]
    qdt = DTYPES[qn]
    nnz = sum(lens)
    slots = nnz + 1  # slot 0: the dummy slot, never addressed here
    rows, deq = make_rows(slots, d, kv, dev, gen, case["kv_scale"])
    q = (torch.randn(len(lens), h, d + D_PE, device=dev, generator=gen) * case["qscale"]).to(qdt)
    q_lat, q_pe = q[..., :d], q[..., d:]  # strided views of one buffer, as SGLang passes them
    indices = (torch.randperm(nnz, device=dev, generator=gen) + 1).to(torch.int32)
    indptr = _indptr(lens, dev)
    flat = rows.view(slots, d + D_PE)
    ckv, kpe = flat[:, :d], flat[:, d:]
    out = None
    if case["out"] == "poison":
        out = torch.full((len(lens), h, d), math.nan, dtype=qdt, device=dev)
    elif case["out"] == "fp32":
        out = torch.full((len(lens), h, d), math.nan, dtype=torch.float32, device=dev)
    kw = dict(mu=case["mu"], out=out, return_lse=case["lse"])
    if case["splits"] == "default":
        kw["max_seq_len"] = max(lens)
    else:
        kw["num_kv_splits"] = case["splits"]
    if kv == "fp8":
        kw["kv_scale"] = case["kv_scale"]
    real = ctx.launches_real(case)
    with ctx.launch_mode(real):
        res = K.tpla_decode_attention(q_lat, q_pe, ckv, kpe, indptr, indices, SM_SCALE, **kw)
    o, lse = res if case["lse"] else (res, None)
    if out is not None and o.data_ptr() != out.data_ptr():
        raise AssertionError("tpla_decode_attention did not write into the given out")
    rec = {"lens": lens, "heads": h, "d": d, "q": qn, "kv": kv, "splits": case["splits"], "mu": case["mu"],
           "lse": case["lse"], "out": case["out"]}  # fmt: skip
    try:
        cfg = K.choose_config(d, h, qdt, DTYPES[kv])
        rec["config"] = [cfg.block_h, cfg.block_n, cfg.num_warps, cfg.num_stages]
        if case["splits"] == "default":  # what the wrapper chose (same host-side rule)
            rec["splits_used"] = K.choose_num_kv_splits(len(lens), -(-h // cfg.block_h), cfg.block_n,
                                                        K.device_num_sms(dev), max(lens))  # fmt: skip
    except Exception:  # noqa: BLE001 - informative only
        pass
    if tuple(o.shape) != (len(lens), h, d):
        raise AssertionError(f"output shape {tuple(o.shape)} != {(len(lens), h, d)}")
    if lse is not None and tuple(lse.shape) != (len(lens), h):
        raise AssertionError(f"lse shape {tuple(lse.shape)} != {(len(lens), h)}")
    ref, ref_lse = reference(q_lat, q_pe, deq, d, lens, indices, SM_SCALE, case["mu"])
    if not real:
        rec["status"] = "dry"
        return rec
    if dev.type == "cuda":
        torch.cuda.synchronize()
    atol, rtol = TOL[kv]
    rec.update(compare(o, ref, atol, rtol))
    empty = [b for b, n in enumerate(lens) if n == 0]
    rec["empty_exact_zero"] = bool(all(o[b].float().abs().max().item() == 0 for b in empty)) if empty else True
    ok = rec["ok"] and rec["empty_exact_zero"]
    if lse is not None:
        rec.update(compare_lse(lse, ref_lse, LSE_ATOL[kv]))
        ok = ok and rec["lse_ok"]
    rec["status"] = "ok" if ok else "FAIL"
    return rec


def run_extend(case: dict, ctx) -> dict:
    """``tpla_extend_attention`` against a per-query-token fp32 loop (see the module docstring)."""
    from sglang_tpla.kernels import tpla_decode as K
    from sglang_tpla.reference import latent_attention

    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(_seed(case["name"]))
    pre, ext = EXTEND_FEW if case["lens"] == "few" else (EXTEND_DRY if ctx.dry else EXTEND)
    if ctx.dry and case["lens"] == "few":
        pre = [130, 33]
    d, h, kv, qn = case["d"], case["heads"], case["kv"], case["q"]
    qdt = DTYPES[qn]
    kv_lens = [p + n for p, n in zip(pre, ext)]
    nnz, total_q = sum(kv_lens), sum(ext)
    slots = nnz + 1  # slot 0: the dummy slot, never addressed here
    rows, deq = make_rows(slots, d, kv, dev, gen, case["kv_scale"])
    q_lat = (torch.randn(h, total_q, d, device=dev, generator=gen) * case["qscale"]).to(qdt).transpose(0, 1)
    q_pe = (torch.randn(total_q, h, D_PE, device=dev, generator=gen) * case["qscale"]).to(qdt)
    indices = (torch.randperm(nnz, device=dev, generator=gen) + 1).to(torch.int32)
    indptr = _indptr(kv_lens, dev)
    q_req = torch.tensor([b for b, n in enumerate(ext) for _ in range(n)], dtype=torch.int32, device=dev)
    q_lim = torch.tensor([p + i for p, n in zip(pre, ext) for i in range(n)], dtype=torch.int32, device=dev)
    flat = rows.view(slots, d + D_PE)
    out = torch.full((total_q, h, d), math.nan, dtype=qdt, device=dev)
    kw = dict(mu=case["mu"], out=out, max_seq_len=max(kv_lens))
    if case["splits"] != "default":
        kw["num_kv_splits"] = case["splits"]
    if kv == "fp8":
        kw["kv_scale"] = case["kv_scale"]
    real = ctx.launches_real(case)
    with ctx.launch_mode(real):
        o = K.tpla_extend_attention(q_lat, q_pe, flat[:, :d], flat[:, d:], indptr, indices, q_req, q_lim, SM_SCALE, **kw)
    if o.data_ptr() != out.data_ptr() or tuple(o.shape) != (total_q, h, d):
        raise AssertionError("tpla_extend_attention did not write the given out")
    rec = {"lens": [pre, ext], "heads": h, "d": d, "q": qn, "kv": kv, "splits": case["splits"], "mu": case["mu"],
           "lse": False, "out": "poison"}  # fmt: skip
    cfg = K.choose_config(d, h, qdt, DTYPES[kv])
    rec["config"] = [cfg.block_h, cfg.block_n, cfg.num_warps, cfg.num_stages]
    if case["splits"] == "default":
        rec["splits_used"] = K.choose_num_kv_splits(total_q, -(-h // cfg.block_h), cfg.block_n, K.device_num_sms(dev),
                                                    max(kv_lens))  # fmt: skip
    if not real:
        rec["status"] = "dry"
        return rec
    dflat = deq.reshape(slots, -1)
    ref = torch.zeros(total_q, h, d, device=dev)
    row = 0
    for b, (p, n) in enumerate(zip(pre, ext)):
        keys = indices[int(indptr[b]) : int(indptr[b]) + p + n].long()
        for i in range(n):
            seen = keys[: p + i + 1]
            ref[row] = latent_attention(q_lat[row : row + 1].float(), q_pe[row : row + 1].float(), dflat[seen, :d],
                                        dflat[seen, d:], SM_SCALE, case["mu"])[0]  # fmt: skip
            row += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    atol, rtol = TOL[kv]
    rec.update(compare(o, ref, atol, rtol))
    rec["status"] = "ok" if rec["ok"] else "FAIL"
    return rec


def numerics_line(r: dict) -> str:
    if "max_abs_err" not in r:
        return f"D={r.get('d')} H={r.get('heads')} {r.get('q')}/{r.get('kv')} splits={r.get('splits')} (built, not launched)"
    s = (f"D={r['d']:3d} H={r['heads']:3d} q={r['q']} kv={r['kv']} splits={r['splits']} max|err|={r['max_abs_err']:.2e} "
         f"tol={r['atol']:.0e}+{r['rtol']:.0e}*|ref| err/tol={r['err_over_tol']:.2f} relL2={r['rel_l2']:.1e}")  # fmt: skip
    if "lse_max_abs_err" in r:
        s += f" lse|err|={r['lse_max_abs_err']:.1e}"
    return s


# --------------------------------------------------------------------------- CUDA graphs


def run_graph(case: dict, ctx) -> dict:
    from sglang_tpla.kernels.triton_decode import TritonTPLADecode

    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(_seed(case["name"]))
    d, h, kv, bs, live, mu = case["d"], case["heads"], case["kv"], case["capture_bs"], case["live"], case["mu"]
    kv_scale = case["kv_scale"]
    qdt = torch.bfloat16
    small = ctx.dry
    max_ctx = 130 if small else 5000
    slots = bs * max_ctx + 1
    real = ctx.launches_real(case)
    dec = TritonTPLADecode(dev, h, d, SM_SCALE, qdt, DTYPES[kv], max_batch=bs, kv_scale=1.0 if kv_scale is None else kv_scale,
                           mu=mu, num_sms=None if dev.type == "cuda" else (12 if real else 132))  # fmt: skip
    # (dry run: 12 "SMs" keep the interpreted case at a few splits; the interpreter runs programs serially)
    splits = dec.splits_for(bs)
    rows = torch.empty(slots, 1, d + D_PE, dtype=DTYPES[kv], device=dev)
    # what the runner is handed: SGLang stores an fp8 pool as uint8 (its store_dtype); run() views it
    pool = rows.view(torch.uint8) if kv == "fp8" else rows
    qbuf = torch.empty(bs, h, d + D_PE, dtype=qdt, device=dev)
    q_lat, q_pe = qbuf[..., :d], qbuf[..., d:]
    indptr = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
    indices = torch.zeros(bs * max_ctx, dtype=torch.int32, device=dev)

    def fill(lens_live):
        """New pool values, queries and addressing written in place (as SGLang's replay does);
        requests past ``len(lens_live)`` are padding: seq_len 1 at the dummy slot 0."""
        new, deq = make_rows(slots, d, kv, dev, gen, kv_scale)
        rows.copy_(new)
        qbuf.copy_(torch.randn(bs, h, d + D_PE, device=dev, generator=gen).to(qdt))
        lens = list(lens_live) + [1] * (bs - len(lens_live))
        nnz_live = sum(lens_live)
        idx = torch.zeros(sum(lens), dtype=torch.int32, device=dev)  # padding -> slot 0
        idx[:nnz_live] = (torch.randperm(slots - 1, device=dev, generator=gen)[:nnz_live] + 1).to(torch.int32)
        indices.zero_()
        indices[: idx.numel()] = idx
        indptr.copy_(_indptr(lens, dev))
        return lens, deq

    def eager():
        o = torch.full((bs, h, d), math.nan, dtype=qdt, device=dev)
        with ctx.launch_mode(real):
            r = dec.run(q_lat, q_pe, pool, indptr, indices, out=o)
        return r

    rng = torch.Generator().manual_seed(1)  # host-side lengths
    lens_a = [int(x) for x in torch.randint(1, max_ctx // 10, (bs,), generator=rng)]
    lens_a[0] = 1
    fill(lens_a)
    # warm-up outside the capture (compiles the kernels), on a side stream as SGLang does
    if dev.type == "cuda":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            with ctx.launch_mode(real):
                dec.run(q_lat, q_pe, pool, indptr, indices)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            graph_out = dec.run(q_lat, q_pe, pool, indptr, indices)

        def replay():
            g.replay()
            torch.cuda.synchronize()
            return graph_out.clone()

        captured = True
    else:  # dry run: no CUDA graph on the CPU; the "replay" is an eager call on the same buffers

        def replay():
            with ctx.launch_mode(real):
                return dec.run(q_lat, q_pe, pool, indptr, indices).clone()

        captured = False

    rec = {"heads": h, "d": d, "kv": kv, "capture_bs": bs, "live": live, "splits": splits, "captured": captured, "steps": []}
    ok = True
    lens_b = [int(x) for x in torch.randint(1, max_ctx, (bs,), generator=rng)]
    lens_b[-1] = max_ctx  # longer than anything at capture time
    lens_c = [int(x) for x in torch.randint(0, max_ctx, (live,), generator=rng)]
    for step, lens_live in (("capture_data", None), ("new_data_longer", lens_b), (f"padded_{live}_of_{bs}", lens_c)):
        if lens_live is None:
            lens, deq = fill(lens_a)  # fresh values for the capture-size batch
            lens_live = lens_a
        else:
            lens, deq = fill(lens_live)
        got = replay()
        ref_eager = eager()
        st = {"step": step, "lens_live": lens_live if len(lens_live) <= 16 else f"{len(lens_live)} requests"}
        if real:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            diff = (got.float() - ref_eager.float()).abs()
            diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
            st["graph_vs_eager_max_diff"] = diff.max().item()
            n = len(lens_live)
            ref, _ = reference(q_lat[:n], q_pe[:n], deq, d, lens_live, indices, SM_SCALE, mu)
            cmp = compare(got[:n], ref, *TOL[kv])
            st.update(max_abs_err=cmp["max_abs_err"], err_over_tol=cmp["err_over_tol"], atol=cmp["atol"], rtol=cmp["rtol"])
            st["padded_finite"] = bool(torch.isfinite(got[n:].float()).all()) if n < bs else True
            st["ok"] = cmp["ok"] and st["graph_vs_eager_max_diff"] == 0 and st["padded_finite"]
            ok = ok and st["ok"]
        rec["steps"].append(st)
    rec["status"] = ("ok" if ok else "FAIL") if real else "dry"
    return rec


def graph_line(r: dict) -> str:
    parts = [f"D={r['d']} H={r['heads']} kv={r['kv']} capture bs={r['capture_bs']} splits={r['splits']}"]
    for st in r["steps"]:
        if "graph_vs_eager_max_diff" in st:
            parts.append(f"{st['step']}: vs eager {st['graph_vs_eager_max_diff']:.1e}, vs ref {st['max_abs_err']:.1e}")
        else:
            parts.append(f"{st['step']}: built")
    return "; ".join(parts)
