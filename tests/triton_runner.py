"""Helper script (no tests here) that runs Triton work in a process of its own.

Triton decides at import time whether it interprets (``TRITON_INTERPRET=1``), and pytest runs every
test module in one process, where sglang (hence triton) may already be imported.  So the tests
spawn this script:

* ``python tests/triton_runner.py interpret`` (with ``TRITON_INTERPRET=1``): reads a JSON list of
  decode cases on stdin, runs ``sglang_tpla.kernels.tpla_decode`` (or, for ``kind: runner`` cases,
  ``sglang_tpla.kernels.triton_decode.TritonTPLADecode``) under the interpreter and the fp32 reference
  (``sglang_tpla.reference.latent_attention`` per request), prints one JSON line of results.
* ``python tests/triton_runner.py aot`` (without ``TRITON_INTERPRET``): reads a JSON list of compile
  jobs, AOT-compiles them for sm_90 (``GPUTarget("cuda", 90, 32)``, no GPU needed), prints one JSON
  line with shared memory, wgmma use and ptxas register/spill counts per job.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

RESULT_PREFIX = "TRITON_RUNNER_RESULT "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn(mode: str, jobs: list, timeout: float = 600.0, workers: int = 1) -> dict:
    """Run this script in fresh interpreters (``TRITON_INTERPRET=1`` only for ``interpret``), the
    jobs dealt round-robin over ``workers`` concurrent processes, and return the merged payload
    ``{"module": <kernel file>, "results": [...] (in job order), "wall_s": ...}``."""
    import subprocess
    import tempfile

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if mode == "interpret":
        env["TRITON_INTERPRET"] = "1"
    workers = max(1, min(workers, len(jobs)))
    t0 = time.time()
    outs = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            for w in range(workers):
                files = [open(os.path.join(tmp, f"{w}.{k}"), "w+") for k in ("in", "out", "err")]
                json.dump(jobs[w::workers], files[0])
                files[0].seek(0)
                p = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), mode],
                    stdin=files[0], stdout=files[1], stderr=files[2], text=True, env=env, cwd=REPO_ROOT,
                )  # fmt: skip
                procs.append((p, files))
            for p, files in procs:
                p.wait(timeout=max(1.0, timeout - (time.time() - t0)))
                files[1].seek(0)
                files[2].seek(0)
                outs.append((p.returncode, files[1].read(), files[2].read()))
        finally:
            for p, files in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                for f in files:
                    f.close()
    payloads = []
    for rc, stdout, stderr in outs:
        lines = [l for l in stdout.splitlines() if l.startswith(RESULT_PREFIX)]
        if rc or not lines:
            raise RuntimeError(
                f"triton_runner {mode} failed (rc={rc})\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-8000:]}"
            )
        payloads.append(json.loads(lines[-1][len(RESULT_PREFIX) :]))
    if len({p["module"] for p in payloads}) != 1:
        raise RuntimeError(f"workers imported different kernel files: {[p['module'] for p in payloads]}")
    results = [None] * len(jobs)
    for w, p in enumerate(payloads):
        results[w::workers] = p["results"]
    return {"module": payloads[0]["module"], "results": results, "wall_s": round(time.time() - t0, 1)}


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[name]


# --------------------------------------------------------------------------- interpreter cases


def build_problem(case):
    """Queries, a paged latent cache (random page placement) in SGLang's addressing, and the row
    buffer behind it (``None`` for the separate-buffer layout).

    ``case["kv"] == "fp8"`` stores the cache as ``float8_e4m3fn`` values of ``x / kv_scale``; the
    ``pool_u8`` layout stores those bytes as SGLang's fp8 pool does (``uint8``).  The returned
    cache holds the stored (fp8) tensors; :func:`reference_decode` dequantises them."""
    import torch

    from sglang_tpla.reference import PagedLatentCache

    gen = torch.Generator().manual_seed(case.get("seed", 0))
    d, h, lens, ps = case["d"], case["h"], list(case["lens"]), case.get("page_size", 1)
    dt = _dtype(case["dtype"])
    kv_dt = _dtype(case.get("kv", case["dtype"]))
    kv_scale = case.get("kv_scale", 1.0)
    b = len(lens)
    pages = [math.ceil(n / ps) for n in lens]
    total_pages = sum(pages) + 3
    order = torch.randperm(total_pages, generator=gen)
    slots = total_pages * ps
    req_to_token = torch.zeros(b + 1, max(lens + [1]) + 2, dtype=torch.int32)
    req_pool = torch.randperm(b + 1, generator=gen)[:b]
    nxt = 0
    for i, n in enumerate(lens):
        for pos in range(n):
            req_to_token[req_pool[i], pos] = int(order[nxt + pos // ps]) * ps + pos % ps
        nxt += pages[i]

    def stored(*shape):
        return (torch.randn(*shape, generator=gen) / kv_scale).to(kv_dt)

    layout = case.get("layout", "rowbuf")
    rows = None
    if layout == "rowbuf":  # two column views of one [slots, D + 64] buffer
        buf = stored(slots, d + 64)
        ckv, kpe = buf[:, :d], buf[:, d:]
    elif layout in ("pool", "pool_u8"):  # SGLang's MLA pool buffer [slots, 1, D + 64]
        buf = stored(slots, 1, d + 64)
        ckv, kpe = buf[:, 0, :d], buf[:, 0, d:]
        rows = buf.view(torch.uint8) if layout == "pool_u8" else buf
    else:  # separate buffers, kpe a view with a different row stride
        ckv = stored(slots, d)
        kpe = stored(slots, 96)[:, 16:80]
    cache = PagedLatentCache(ckv, kpe, req_to_token, req_pool, torch.tensor(lens))
    q_lat = torch.randn(b, h, d, generator=gen).to(dt)
    q_pe = torch.randn(b, h, 64, generator=gen).to(dt)
    return q_lat, q_pe, cache, rows


def reference_decode(q_lat, q_pe, ckv, kpe, kv_indptr, kv_indices, sm_scale, mu, kv_scale=1.0):
    """fp32 reference per request over kv_indptr / kv_indices on the dequantised cache
    (``stored * kv_scale``): output [B, H, D] and natural LSE [B, H]."""
    import torch

    from sglang_tpla.reference import latent_attention

    b, h, d = q_lat.shape
    out = torch.zeros(b, h, d)
    lse = torch.full((b, h), float("-inf"))
    for i in range(b):
        idx = kv_indices[int(kv_indptr[i]) : int(kv_indptr[i + 1])].long()
        c, k = ckv[idx].float() * kv_scale, kpe[idx].float() * kv_scale
        ql, qp = q_lat[i : i + 1].float(), q_pe[i : i + 1].float()
        out[i] = latent_attention(ql, qp, c, k, sm_scale, mu)[0]
        if idx.numel():
            logits = sm_scale * ((1.0 if mu is None else mu) * ql[0] @ c.T + qp[0] @ k.T)
            lse[i] = torch.logsumexp(logits, -1)
    return out, lse


def _errors(res, ref, case):
    err = (res.float() - ref).abs()
    return err.max().item() if err.numel() else 0.0, int((err > case["atol"] + case["rtol"] * ref.abs()).sum())


def run_case(case):
    import torch

    from sglang_tpla.kernels import tpla_decode as K

    if case.get("kind") == "runner":
        return run_runner_case(case)
    if case.get("kind") == "extend":
        return run_extend_case(case)
    q_lat, q_pe, cache, _ = build_problem(case)
    kv_indptr, kv_indices = cache.kv_indptr_indices()
    sm_scale = case.get("scale_mult", 1.0) / math.sqrt(192)
    mu, kv_scale = case.get("mu"), case.get("kv_scale")
    cfg = K.TPLADecodeConfig(*case["config"]) if case.get("config") else None
    b, h, d = q_lat.shape
    out = sentinel = workspace = None
    if case.get("out") == "view_fp32":  # out is a head-slice of a bigger fp32 tensor full of sentinels
        sentinel = torch.full((b, h + 5, d), 123.0)
        out = sentinel[:, 2 : h + 2]
    if case.get("workspace"):  # a caller-owned workspace, larger than needed
        s = case["splits"] + 2
        workspace = (torch.full((b + 1, h, s, d), float("nan")), torch.full((b + 1, h, s), float("nan")))
    want_lse = case.get("lse", True)
    t0 = time.time()
    res = K.tpla_decode_attention(
        q_lat, q_pe, cache.ckv, cache.kpe, kv_indptr, kv_indices, sm_scale, mu,
        num_kv_splits=case.get("splits"), out=out, kv_scale=kv_scale, max_seq_len=case.get("max_seq_len"),
        config=cfg, dot_fp32=case.get("dot_fp32"), return_lse=want_lse, workspace=workspace,
    )  # fmt: skip
    seconds = time.time() - t0
    ref, ref_lse = reference_decode(q_lat, q_pe, cache.ckv, cache.kpe, kv_indptr, kv_indices, sm_scale, mu, kv_scale or 1.0)
    if want_lse:
        res, lse = res
    else:
        lse = ref_lse  # not asked for: the LSE checks below pass trivially
    max_err, n_bad = _errors(res, ref, case)
    finite = torch.isfinite(ref_lse)
    empty = torch.tensor([n == 0 for n in case["lens"]])
    used_cfg = cfg or K.choose_config(d, h, q_lat.dtype, cache.ckv.dtype)
    return {
        "name": case["name"],
        "seconds": round(seconds, 3),
        "out_dtype": str(res.dtype),
        "expected_out_dtype": str(torch.float32 if out is not None else q_lat.dtype),
        "max_abs_err": max_err,
        "n_bad": n_bad,
        "lse_max_err": (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0,
        "lse_empty_ok": bool(torch.isneginf(lse[empty]).all()) and bool(torch.isfinite(lse[~empty]).all()),
        "empty_zero": bool((res[empty] == 0).all()),
        "sentinel_ok": None
        if sentinel is None
        else bool((sentinel[:, :2] == 123).all() and (sentinel[:, h + 2 :] == 123).all()),
        "out_is_given": None if out is None else res.data_ptr() == out.data_ptr(),
        "block_h": used_cfg.block_h,
        "head_blocks": -(-h // used_cfg.block_h),
    }


def run_runner_case(case):
    """``TritonTPLADecode`` on SGLang's pool layout: the first ``first_batch`` requests, then all of
    them (a different batch size and split count), each against the fp32 reference."""
    import torch

    from sglang_tpla.kernels.triton_decode import TritonTPLADecode

    q_lat, q_pe, cache, rows = build_problem(case)
    kv_indptr, kv_indices = cache.kv_indptr_indices()
    sm_scale = 1 / math.sqrt(192)
    mu, kv_scale = case.get("mu"), case.get("kv_scale", 1.0)
    b, h, d = q_lat.shape
    runner = TritonTPLADecode(
        torch.device("cpu"), h, d, sm_scale, q_lat.dtype, cache.ckv.dtype, max_batch=case["max_batch"],
        kv_scale=kv_scale, mu=mu, num_sms=case["num_sms"],
    )  # fmt: skip
    buffers = (runner._out, runner._partial_out, runner._partial_lse)
    ptrs = [t.data_ptr() for t in buffers]
    calls = []
    t0 = time.time()
    for n in (case["first_batch"], b):
        res = runner.run(q_lat[:n], q_pe[:n], rows, kv_indptr[: n + 1], kv_indices)
        ref, _ = reference_decode(
            q_lat[:n], q_pe[:n], cache.ckv, cache.kpe, kv_indptr[: n + 1], kv_indices, sm_scale, mu, kv_scale
        )
        max_err, n_bad = _errors(res, ref, case)
        calls.append(dict(batch=n, splits=runner.splits_for(n), out_ptr=res.data_ptr(), max_abs_err=max_err, n_bad=n_bad))
    return {
        "name": case["name"],
        "seconds": round(time.time() - t0, 3),
        "calls": calls,
        "out_buffer_ptr": ptrs[0],
        "buffers_kept": [t.data_ptr() for t in buffers] == ptrs,
        "rows_dtype": str(rows.dtype),
    }


def run_extend_case(case):
    """The multi-query (extend) form of the kernel, ``tpla_extend_attention``: requests with cached
    prefixes ``prefix`` and ``ext`` new tokens each, their slots shuffled over SGLang's pool layout
    ``[slots, 1, D + 64]``, head-major queries (as the DeepSeek hook's ``bmm`` leaves them).  The
    per-row metadata comes from ``plan_extend`` (int64, ``index: plan``) or from
    ``sglang_tpla.metadata.build_extend_index`` over a ``req_to_token`` table (int32).

    Oracle (shares no code with the kernel): an explicit loop over query tokens, each one
    ``sglang_tpla.reference.latent_attention`` over its request's keys ``0 .. P_b + i``."""
    import torch

    from sglang_tpla.kernels import tpla_decode as K
    from sglang_tpla.kernels.torch_extend import plan_extend
    from sglang_tpla.metadata import build_extend_index
    from sglang_tpla.reference import latent_attention

    gen = torch.Generator().manual_seed(case.get("seed", 0))
    d, h, pre, ext = case["d"], case["h"], list(case["prefix"]), list(case["ext"])
    dt = _dtype(case["dtype"])
    kv_lens = [p + n for p, n in zip(pre, ext)]
    total_k, total_q = sum(kv_lens), sum(ext)
    slots = total_k + 9
    perm = (torch.randperm(slots - 1, generator=gen) + 1).to(torch.int32)  # slot 0 is SGLang's padding slot
    req_to_token = torch.zeros(len(pre) + 2, max(kv_lens) + 3, dtype=torch.int32)
    req_pool = torch.randperm(len(pre) + 2, generator=gen)[: len(pre)]
    nxt = 0
    for b, n in enumerate(kv_lens):
        req_to_token[req_pool[b], :n] = perm[nxt : nxt + n]
        nxt += n
    if case.get("index") == "plan":
        plan = plan_extend(pre, ext, "cpu", h)
        q_req, q_lim = plan.q_req, plan.q_lim
        kv_indptr = torch.tensor([0] + [sum(kv_lens[: b + 1]) for b in range(len(pre))], dtype=torch.int32)
        kv_indices = torch.cat([req_to_token[req_pool[b], :n] for b, n in enumerate(kv_lens)])
    else:
        ix = build_extend_index(req_to_token, req_pool, pre, ext)
        q_req, q_lim, kv_indptr, kv_indices = ix.q_req, ix.q_lim, ix.kv_indptr, ix.kv_indices
    pool = torch.randn(slots, 1, d + 64, generator=gen).to(dt)
    ckv, kpe = pool[:, 0, :d], pool[:, 0, d:]
    q_lat = torch.randn(h, total_q, d, generator=gen).to(dt).transpose(0, 1)  # [T, H, D], head-major
    q_pe = torch.randn(total_q, h, 64, generator=gen).to(dt)
    sm_scale, mu = case.get("scale_mult", 1.0) / math.sqrt(192), case.get("mu")
    cfg = K.TPLADecodeConfig(*case["config"]) if case.get("config") else None
    t0 = time.time()
    res = K.tpla_extend_attention(
        q_lat, q_pe, ckv, kpe, kv_indptr, kv_indices, q_req, q_lim, sm_scale, mu,
        num_kv_splits=case.get("splits"), max_seq_len=max(kv_lens), config=cfg, num_sms=case.get("num_sms"),
    )  # fmt: skip
    seconds = time.time() - t0
    ref = torch.zeros(total_q, h, d)
    row = 0
    for b, (p, n) in enumerate(zip(pre, ext)):
        keys = req_to_token[req_pool[b], : p + n].long()
        for i in range(n):
            seen = keys[: p + i + 1]
            ref[row] = latent_attention(
                q_lat[row : row + 1].float(), q_pe[row : row + 1].float(), ckv[seen].float(), kpe[seen].float(), sm_scale, mu
            )[0]
            row += 1
    max_err, n_bad = _errors(res, ref, case)
    used = cfg or K.choose_config(d, h, dt, dt)
    splits = case.get("splits") or K.choose_num_kv_splits(total_q, -(-h // used.block_h), used.block_n, case.get("num_sms") or 132, max(kv_lens))
    return {
        "name": case["name"],
        "seconds": round(seconds, 3),
        "out_dtype": str(res.dtype),
        "expected_out_dtype": str(dt),
        "max_abs_err": max_err,
        "n_bad": n_bad,
        "splits": splits,
        "q_req_dtype": str(q_req.dtype),
    }


# --------------------------------------------------------------------------- AOT compile jobs


def _parse_ptxas_log(log: str):
    import re

    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        return None
    return int(regs.group(1)), sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))


def _ptxas_usage(ptx: str):
    """Registers and spill bytes from ``ptxas -v`` with the flags Triton itself uses for sm_90a."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src, "-o", src + ".o"]
        return _parse_ptxas_log(subprocess.run(cmd, capture_output=True, text=True, check=True).stderr)


def run_aot(job):
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget

    from sglang_tpla.kernels import tpla_decode as K

    t0 = time.time()
    if job["stage"] == 1:
        cfg = K.TPLADecodeConfig(*job["config"])
        src = K.stage1_aot_source(
            job["d"], _dtype(job["dtype"]), cfg, out_dtype=_dtype(job.get("out", "fp32")),
            kv_dtype=_dtype(job.get("kv", job["dtype"])), rows=job.get("rows", False),
        )  # fmt: skip
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    else:
        src = K.stage2_aot_source(job["d"], _dtype(job["dtype"]), K.MAX_KV_SPLITS, store_lse=True, rows=job.get("rows", False))
        opts = {"num_warps": 4, "num_stages": 1}
    # Triton's own ptxas run already uses -v; print its log (captured here) instead of running ptxas
    # twice.  A Triton cache hit skips ptxas, so fall back to a separate run then.
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = compiled.asm["ptx"]
    regs, spill = _parse_ptxas_log(log.getvalue()) or _ptxas_usage(ptx)
    return dict(
        job,
        shared=int(compiled.metadata.shared),
        wgmma="wgmma.mma_async" in ptx,
        mma_sync="mma.sync" in ptx,
        regs=regs,
        spill_bytes=spill,
        seconds=round(time.time() - t0, 2),
    )


def main():
    # Import the checkout this file belongs to (an editable install may point at another clone).
    sys.path.insert(0, REPO_ROOT)
    mode = sys.argv[1]
    jobs = json.load(sys.stdin)
    if mode == "interpret":
        if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
            raise SystemExit("interpret mode needs TRITON_INTERPRET=1 set before triton is imported")
        import torch

        torch.set_num_threads(1)
        results = [run_case(c) for c in jobs]
    elif mode == "aot":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise SystemExit("aot mode must run without TRITON_INTERPRET")
        results = [run_aot(j) for j in jobs]
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    from sglang_tpla.kernels import tpla_decode

    payload = {"module": os.path.realpath(tpla_decode.__file__), "results": results}
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


if __name__ == "__main__":
    main()
