"""Per-rank decode attention, MLA head-sharded TP vs TPLA, timed side by side in one run.

``python -m sglang_tpla.bench.kernels [--models deepseek-v3,kimi-k2] [--tp 2,4,8] [--contexts 1024,...]``

Per rank and decode step, MLA-TP attends ``H/tp`` heads over the full 576-wide rows; TPLA
(``g = tp``) attends all ``H`` heads over ``512/tp + 64``.  For each shape the benchmark times
every implementation available on the device (CPU: the PyTorch path; CUDA: the Triton kernel,
FlashInfer MLA at ``512/tp``, and FlashInfer's own MLA at 512 as the MLA baseline), and reports
the median time, achieved GB/s (KV bytes read) and TFLOP/s, the fraction of the device
roofline when known, and the MLA/TPLA time ratio.  CPU numbers are a smoke test, not a claim
about GPUs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from ..shapes import DEEPSEEK_V3, KIMI_K2

MODELS = {"deepseek-v3": DEEPSEEK_V3, "kimi-k2": KIMI_K2}
# HBM bandwidth (B/s) and dense bf16 tensor throughput (FLOP/s) by device-name substring.
ROOFLINES = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "H800": (3.35e12, 989e12), "A100": (2.0e12, 312e12)}


def _roofline(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in ROOFLINES.items() if k in name), None)


def _problem(batch, heads, d, ctx, dtype, device, gen):
    slots = batch * ctx
    rows = torch.randn(slots, 1, d + 64, generator=gen, dtype=torch.float32).to(device, dtype)
    q = (torch.randn(batch, heads, d + 64, generator=gen) * 0.1).to(device, dtype)
    indptr = torch.arange(0, slots + 1, ctx, dtype=torch.int32, device=device)
    indices = torch.randperm(slots, generator=gen).to(device, torch.int32)
    return rows, q, indptr, indices


def _torch_impl(rows, q, indptr, indices, d, scale):
    """Batched PyTorch decode (equal lengths): the CPU path's math without the per-request loop."""
    b = q.shape[0]
    ctx = rows[indices.long()].view(b, -1, rows.shape[-1]).float()
    logits = torch.einsum("bhe,ble->bhl", q.float(), ctx) * scale
    return torch.einsum("bhl,bld->bhd", torch.softmax(logits, -1), ctx[..., :d])


def implementations(device: torch.device, d: int, dtype: torch.dtype):
    """name -> callable(rows, q, indptr, indices, d, scale) for what this device can run."""
    impls = {}
    if device.type == "cpu":
        impls["torch"] = _torch_impl
        return impls
    from sglang_tpla.kernels.select import flashinfer_refusal
    from sglang_tpla.kernels.tpla_decode import tpla_decode_attention

    def triton_impl(rows, q, indptr, indices, d, scale):
        flat = rows.view(rows.shape[0], -1)
        return tpla_decode_attention(q[..., :d], q[..., d:], flat[:, :d], flat[:, d:], indptr, indices, scale)

    impls["triton"] = triton_impl
    try:
        import flashinfer

        backend, why = flashinfer_refusal(torch.cuda.get_device_capability(device), d, str(dtype).removeprefix("torch."), flashinfer.__version__)
    except ImportError:
        backend, why = None, "flashinfer not installed"
    if backend:
        from sglang_tpla.kernels.flashinfer_decode import FlashInferTPLADecode

        cache = {}

        def fi_impl(rows, q, indptr, indices, d, scale):
            key = (q.shape[1], d)
            if key not in cache:
                cache[key] = FlashInferTPLADecode(device, backend, q.shape[1], d, 64, scale, q.dtype)
                cache[key].plan(indptr, indices)
            return cache[key].run(q[..., :d], q[..., d:], rows)

        impls[f"flashinfer-{backend}"] = fi_impl
    else:
        print(f"# flashinfer skipped for D={d}: {why}", file=sys.stderr)
    return impls


def _time(fn, device, repeat):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(models, tps, contexts, batch, dtype, device, repeat, progress=print):
    gen = torch.Generator().manual_seed(0)
    roof = _roofline(device)
    rows_out = []
    for mname in models:
        shape = MODELS[mname]
        scale = (shape.qk_nope_head_dim + shape.qk_rope_head_dim) ** -0.5
        for tp in tps:
            variants = {"mla": (shape.num_heads // tp, shape.kv_lora_rank), "tpla": (shape.num_heads, shape.kv_lora_rank // tp)}
            for ctx in contexts:
                res = {}
                for kind, (heads, d) in variants.items():
                    rows, q, indptr, indices = _problem(batch, heads, d, ctx, dtype, device, gen)
                    kv_bytes = rows.numel() * rows.element_size()
                    flops = 2 * batch * heads * ctx * ((d + 64) + d)
                    for iname, fn in implementations(device, d, dtype).items():
                        t = _time(lambda: fn(rows, q, indptr, indices, d, scale), device, repeat)
                        r = {"model": mname, "tp": tp, "context": ctx, "variant": kind, "impl": iname, "heads": heads,
                             "d_ckv": d, "ms": t * 1e3, "GBps": kv_bytes / t / 1e9, "TFLOPs": flops / t / 1e12}
                        if roof:
                            r["bw_frac"] = kv_bytes / t / roof[0]
                            r["flop_frac"] = flops / t / roof[1]
                        res[(kind, iname)] = r
                        rows_out.append(r)
                        progress(json.dumps(r))
                best = {k: min(v["ms"] for (kk, _), v in res.items() if kk == k) for k in ("mla", "tpla")}
                rows_out.append({"model": mname, "tp": tp, "context": ctx, "speedup_mla_over_tpla": best["mla"] / best["tpla"]})
    return rows_out


def table(rows) -> str:
    out = ["| model | TP | context | MLA best ms | TPLA best ms | speedup |", "|---|---|---|---|---|---|"]
    best = {}
    for r in rows:
        if "variant" in r:
            key = (r["model"], r["tp"], r["context"], r["variant"])
            best[key] = min(best.get(key, float("inf")), r["ms"])
    for r in rows:
        if "speedup_mla_over_tpla" in r:
            m, tp, c = r["model"], r["tp"], r["context"]
            out.append(f"| {m} | {tp} | {c} | {best[(m, tp, c, 'mla')]:.3f} | {best[(m, tp, c, 'tpla')]:.3f} | {r['speedup_mla_over_tpla']:.2f}x |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sglang_tpla.bench.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deepseek-v3,kimi-k2")
    ap.add_argument("--tp", default="2,4,8")
    ap.add_argument("--contexts", default=None, help="default: 1024..32768 on CUDA, 256,1024 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA, 2 on CPU")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--out", help="write all rows as JSON lines")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = device.type == "cpu"
    contexts = [int(x) for x in (args.contexts or ("256,1024" if cpu else "1024,2048,4096,8192,16384,32768")).split(",")]
    dtype = getattr(torch, args.dtype)
    rows = run(args.models.split(","), [int(x) for x in args.tp.split(",")], contexts, args.batch or (2 if cpu else 16),
               dtype, device, args.repeat or (3 if cpu else 20), progress=lambda s: print(s, file=sys.stderr, flush=True))
    where = torch.cuda.get_device_name(device) if not cpu else "CPU (PyTorch path: a smoke test, not a GPU claim)"
    print(f"## Per-rank decode attention, {where}, {args.dtype}\n")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
