"""Per-rank decode attention: stock MLA (head-sharded TP), DCP and TPLA, timed side by side.

``python -m sglang_tpla.bench.kernels [--models deepseek-v3,kimi-k2] [--tp 2,8] [--batch 1,8,32]
[--contexts 4096,32768] [--out rows.jsonl]``

What one row is
---------------
The attention of **one decode step of one layer on one GPU rank** (query length 1), for a model
(DeepSeek-V3: 128 heads, Kimi-K2: 64 heads; both kv_lora_rank 512 + RoPE 64) at a TP size:

* ``mla``   stock MLA with head-sharded TP: ``H/TP`` heads over the full 576-wide rows (D=512)
  and the whole context.
* ``dcp``   SGLang's decode context parallelism with ``dcp`` ranks sharing a head shard: each
  rank attends ``H*dcp/TP`` heads over ``context/dcp`` tokens of 576-wide rows.  The LSE
  exchange / all-to-all that merges the ``dcp`` partial results is **not** measured.
* ``tpla``  TPLA with ``g`` latent groups (``sglang_tpla.layout``): each rank attends the heads
  of its group, ``H/(TP/g)``, over ``512/g + 64``-wide rows and the whole context.  The
  all-reduce after ``o_proj`` is not part of attention and not measured here.

On CUDA every row runs the project's Triton kernel through ``TritonTPLADecode.run`` (the call
SGLang's CUDA graph captures, preallocated workspace, split count from ``splits_for``), timed
with ``triton.testing.do_bench_cudagraph`` (median of graph replays).  **The MLA and DCP rows run
the same Triton kernel at D=512**: without FlashInfer / FlashMLA on the machine that is the
comparison available, and it compares kernels of equal quality rather than TPLA against the
best MLA kernel.  Each timed call reads KV that is not in L2: the calls rotate over enough
disjoint copies of the requests (their own slots, queries and indices) to move >= 256 MB.

Reported per row: ``ms``; ``GBps`` = (KV bytes + q + o + int32 indices) / time; ``TFLOPs`` =
``2*B*H*tokens*(2*D + 64)`` / time (QK over D+64, PV over D); ``roof_spec`` = the time the
roofline allows, ``max(bytes / 4.8 TB/s, FLOPs / 989 TFLOP/s)`` (H200 datasheet), over the
measured time (1.0 = at the roofline); ``roof_meas`` the same against the achieved ceilings
(measured in the run when it measures them, else kernels.md §7: 4.3 TB/s copy, 788 TFLOP/s bf16
GEMM); ``bound`` which side of the ridge the shape is on; ``speedup_vs_mla`` = MLA ms / this ms
for the same model, TP, batch and context.

On CPU the PyTorch path is timed (a smoke test of the harness, not a claim about GPUs).

No SGLang import anywhere (the GPU check runs on machines without it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..shapes import DEEPSEEK_V3, KIMI_K2

MODELS = {"deepseek-v3": DEEPSEEK_V3, "kimi-k2": KIMI_K2}
D_PE = 64
# Datasheet HBM bandwidth (B/s) and dense bf16 tensor throughput (FLOP/s) by device-name substring.
ROOFLINES = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "H800": (3.35e12, 989e12), "A100": (2.0e12, 312e12)}
# Achieved ceilings on an H200 (kernels.md §7, measured 2026-10-28): device-to-device copy and an
# 8192^3 bf16 GEMM.  A run that measures its own ceilings passes those instead.
ACHIEVED = {"H200": (4.3e12, 788e12)}
ROTATE_BYTES = 256 << 20  # >= 5x the H200's 50 MB L2
MAX_COPIES = 256

DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_CONTEXTS = (4096, 32768)
DEFAULT_TPS = (2, 8)
DEFAULT_GROUPS = (2, 4)
DEFAULT_DCPS = (2, 4)


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class AttnCase:
    """One per-rank attention shape."""

    model: str
    tp: int
    variant: str  # "mla" | "dcp" | "tpla"
    par: int  # 1 for mla, the DCP size, or TPLA's g
    heads: int  # query heads on this rank
    d: int  # latent width on this rank (value dim)
    batch: int
    context: int  # tokens per request (whole sequence)
    tokens: int  # tokens per request this rank attends over

    @property
    def name(self) -> str:
        v = "mla" if self.variant == "mla" else f"{self.variant}{self.par}"
        return f"{self.model}-tp{self.tp}-{v}-b{self.batch}-ctx{_kctx(self.context)}"

    @property
    def label(self) -> str:
        return {"mla": "MLA", "dcp": f"DCP dcp={self.par}", "tpla": f"TPLA g={self.par}"}[self.variant]


def _kctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def variants(model: str, tp: int, groups=DEFAULT_GROUPS, dcps=DEFAULT_DCPS) -> list[tuple[str, int, int, int, int]]:
    """``(variant, par, heads, d, token_divisor)`` per rank for one model and TP size.

    TPLA's per-rank heads/width come from :class:`sglang_tpla.layout.TPLALayout` (rank r of group
    ``r // (TP/g)`` holds the ``H/(TP/g)`` heads of its group and the latent slice ``512/g``);
    invalid (TP, g) pairs are skipped."""
    from ..layout import TPLALayout, TPLALayoutError

    shape = MODELS[model]
    h, lat = shape.num_heads, shape.kv_lora_rank
    if h % tp:
        raise ValueError(f"{model}: {h} heads do not split over TP={tp}")
    out = [("mla", 1, h // tp, lat, 1)]
    for dcp in dcps:
        if dcp > 1 and tp % dcp == 0:
            out.append(("dcp", dcp, h * dcp // tp, lat, dcp))
    for g in groups:
        try:
            lay = TPLALayout(tp=tp, g=g, num_heads=h, kv_lora_rank=lat)
        except TPLALayoutError:
            continue
        out.append(("tpla", g, lay.heads_per_rank, lay.slice_width, 1))
    return out


def attention_cases(models=tuple(MODELS), tps=DEFAULT_TPS, batches=DEFAULT_BATCHES, contexts=DEFAULT_CONTEXTS,
                    groups=DEFAULT_GROUPS, dcps=DEFAULT_DCPS) -> list[AttnCase]:  # fmt: skip
    cases = []
    for m in models:
        for tp in tps:
            for b in batches:
                for ctx in contexts:
                    for v, par, heads, d, div in variants(m, tp, groups, dcps):
                        cases.append(AttnCase(m, tp, v, par, heads, d, b, ctx, -(-ctx // div)))
    return cases


def traffic(c: AttnCase, kv_elem: int = 2, q_elem: int = 2) -> dict:
    """Bytes that must cross HBM and FLOPs of one call (every input read once, output written once)."""
    kv = c.batch * c.tokens * (c.d + D_PE) * kv_elem
    q = c.batch * c.heads * (c.d + D_PE) * q_elem
    o = c.batch * c.heads * c.d * q_elem
    idx = c.batch * c.tokens * 4 + (c.batch + 1) * 4
    flops = 2 * c.batch * c.heads * c.tokens * (2 * c.d + D_PE)
    return {"kv_bytes": kv, "bytes": kv + q + o + idx, "flops": flops}


def roofline_fields(ms: float, nbytes: float, flops: float, spec=None, meas=None) -> dict:
    """``roof_*`` = roofline time / measured time (1.0 = at the roofline); ``intensity`` FLOP/B;
    ``bound``: which side of the datasheet ridge (the H200's when ``spec`` is unknown)."""
    out = {"intensity": flops / nbytes}
    ref_bw, ref_pk = spec or ROOFLINES["H200"]
    out["bound"] = "compute" if flops / ref_pk > nbytes / ref_bw else "memory"
    t = ms * 1e-3
    if spec:
        bw, pk = spec
        floor = max(nbytes / bw, flops / pk)
        out.update(roof_spec=floor / t if t > 0 else math.nan, bw_frac_spec=nbytes / t / bw if t > 0 else math.nan)
    if meas:
        bw, pk = meas
        out["roof_meas"] = max(nbytes / bw, flops / pk) / t if t > 0 else math.nan
    return out


def device_ceilings(device: torch.device):
    """(datasheet, achieved) ceilings for the device, each (B/s, FLOP/s) or None."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    spec = next((v for k, v in ROOFLINES.items() if k in name), None)
    meas = next((v for k, v in ACHIEVED.items() if k in name), None)
    return spec, meas


# --------------------------------------------------------------------------- GPU (Triton) path


def _randn(shape, device, gen):
    """``torch.randn``, or ``torch.empty`` on the meta device (its randn imports torch._dynamo: seconds)."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, device=device)
    return torch.randn(shape, device=device, generator=gen)


def _copies(bytes_per_copy: int, limit: int = MAX_COPIES) -> int:
    return max(1, min(limit, -(-ROTATE_BYTES // max(1, bytes_per_copy))))


class AttnProblem:
    """KV pool, ``copies`` disjoint request sets and a ``TritonTPLADecode`` for one per-rank shape.

    ``call()`` runs the next request set (round robin): what ``do_bench_cudagraph`` captures.
    Slot 0 of the pool is the dummy slot SGLang points padded requests at; request slots are a
    random permutation of the rest.  ``device="meta"`` builds every shape without memory (dry run).
    """

    def __init__(self, heads: int, d: int, batch: int, tokens: int, device, *, sm_scale: float,
                 q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16, kv_scale: float = 1.0, mu: float | None = None,
                 copies: int | None = None, num_sms: int | None = None, seed: int = 0):  # fmt: skip
        from sglang_tpla.kernels.triton_decode import TritonTPLADecode

        device = torch.device(device)
        self.heads, self.d, self.batch, self.tokens = heads, d, batch, tokens
        kv_elem = torch.empty(0, dtype=kv_dtype).element_size()
        per_copy = batch * tokens * (d + D_PE) * kv_elem
        self.copies = copies or _copies(per_copy)
        meta = device.type == "meta"
        gen = None if meta else torch.Generator(device=device).manual_seed(seed)
        slots = self.copies * batch * tokens + 1
        if kv_dtype == torch.float8_e4m3fn:
            self.rows = torch.empty(slots, 1, d + D_PE, dtype=kv_dtype, device=device)
            if not meta:  # fill in chunks: no fp32 copy of a multi-GB pool
                for lo in range(0, slots, 1 << 20):
                    hi = min(slots, lo + (1 << 20))
                    self.rows[lo:hi] = (torch.randn(hi - lo, 1, d + D_PE, device=device, generator=gen) / kv_scale).to(kv_dtype)
        else:
            self.rows = torch.empty(slots, 1, d + D_PE, dtype=kv_dtype, device=device)
            if not meta:
                self.rows.normal_(generator=gen)
        self.q_lat, self.q_pe, self.indptr, self.indices = [], [], [], []
        indptr = torch.arange(0, batch * tokens + 1, tokens, dtype=torch.int32, device=device)
        for c in range(self.copies):
            q = _randn((batch, heads, d + D_PE), device, gen).to(q_dtype)
            self.q_lat.append(q[..., :d])  # strided views of one q buffer, as SGLang passes them
            self.q_pe.append(q[..., d:])
            self.indptr.append(indptr)
            if meta:  # (arithmetic on meta tensors imports torch._dynamo: seconds)
                self.indices.append(torch.empty(batch * tokens, dtype=torch.int32, device=device))
                continue
            perm = torch.randperm(batch * tokens, device=device, generator=gen)
            self.indices.append((perm + 1 + c * batch * tokens).to(torch.int32))
        self.dec = TritonTPLADecode(device, heads, d, sm_scale, q_dtype, kv_dtype, max_batch=batch, kv_scale=kv_scale,
                                    mu=mu, num_sms=num_sms if num_sms is not None else (132 if device.type != "cuda" else None))  # fmt: skip
        self.splits = self.dec.splits_for(batch)
        self.out = torch.empty(batch, heads, d, dtype=q_dtype, device=device)
        self._i = 0

    def call(self, c: int | None = None):
        if c is None:
            c = self._i
            self._i = (self._i + 1) % self.copies
        return self.dec.run(self.q_lat[c], self.q_pe[c], self.rows, self.indptr[c], self.indices[c], out=self.out)


def cudagraph_timer(rep_ms: float = 15.0):
    """Median ms of CUDA-graph replays (``triton.testing.do_bench_cudagraph``)."""
    from triton.testing import do_bench_cudagraph

    import inspect

    median = "return_mode" in inspect.signature(do_bench_cudagraph).parameters

    def timer(fn):
        if median:
            return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
        return float(do_bench_cudagraph(fn, rep=rep_ms))

    return timer


def run_attention_case(c: AttnCase, device, timer, *, warm: bool = False, spec=None, meas=None,
                       kv_dtype=torch.bfloat16) -> dict:  # fmt: skip
    """Time one shape with the Triton kernel.  ``warm``: same kernel specialisations (batch,
    heads, D, splits) over 64 tokens, run once untimed, so a later timed run finds them compiled."""
    shape = MODELS[c.model]
    scale = (shape.qk_nope_head_dim + shape.qk_rope_head_dim) ** -0.5
    tokens = min(c.tokens, 64) if warm else c.tokens
    prob = AttnProblem(c.heads, c.d, c.batch, tokens, device, sm_scale=scale, kv_dtype=kv_dtype,
                       copies=1 if warm else None)  # fmt: skip
    rec = {"name": c.name, **asdict(c), "label": c.label, "splits": prob.splits, "copies": prob.copies}
    if warm:
        prob.call()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return rec
    kv_elem = torch.empty(0, dtype=kv_dtype).element_size()
    tr = traffic(c, kv_elem=kv_elem)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()  # the pool fill is done before the timer's side stream reads it
    ms = timer(prob.call)
    rec.update(tr, ms=ms, GBps=tr["bytes"] / (ms * 1e-3) / 1e9, TFLOPs=tr["flops"] / (ms * 1e-3) / 1e12)
    rec.update(roofline_fields(ms, tr["bytes"], tr["flops"], spec, meas))
    return rec


def add_speedups(rows: list[dict], key=("model", "tp", "batch", "context")) -> list[dict]:
    """``speedup_vs_mla`` = MLA ms / row ms for rows sharing ``key`` (an MLA row must exist)."""
    mla = {tuple(r[k] for k in key): r["ms"] for r in rows if r.get("variant") == "mla" and "ms" in r}
    for r in rows:
        base = mla.get(tuple(r.get(k) for k in key))
        if base is not None and r.get("ms"):
            r["speedup_vs_mla"] = base / r["ms"]
    return rows


def _f(x, fmt):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _x(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}x"


def table(rows: list[dict]) -> str:
    """Markdown table, the MLA row of each (model, TP, batch, context) first."""
    order = {"mla": 0, "dcp": 1, "tpla": 2}
    rows = sorted((r for r in rows if "ms" in r), key=lambda r: (r["model"], r["tp"], r["batch"], r["context"],
                                                                  order[r["variant"]], r["par"]))  # fmt: skip
    out = [
        "| model | TP | batch | context | variant | heads x D | tokens/rank | FLOP/B | ms | GB/s | TFLOP/s | roof (spec) | "
        "roof (achieved) | bound | speedup vs MLA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['tp']} | {r['batch']} | {_kctx(r['context'])} | {r['label']} | {r['heads']} x {r['d']} | "
            f"{r['tokens']} | {_f(r.get('intensity'), '.0f')} | {_f(r['ms'], '.4f')} | {_f(r.get('GBps'), '.0f')} | {_f(r.get('TFLOPs'), '.1f')} | "
            f"{_f(r.get('roof_spec'), '.2f')} | {_f(r.get('roof_meas'), '.2f')} | {r.get('bound', 'n/a')} | "
            f"{_x(r.get('speedup_vs_mla'))} |"
        )
    return "\n".join(out)


def side_by_side(rows: list[dict]) -> str:
    """One line per (model, TP, batch, context): MLA ms, then each other variant's ms and its
    speedup over MLA (``MLA ms / ms``)."""
    order = {"mla": 0, "dcp": 1, "tpla": 2}
    rows = [r for r in rows if "ms" in r]
    labels = sorted({(order[r["variant"]], r["par"], r["label"]) for r in rows if r["variant"] != "mla"})
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["model"], r["tp"], r["batch"], r["context"]), {})[r["label"]] = r
    head = "| model | TP | batch | context | MLA ms | " + " | ".join(f"{lab} ms (speedup)" for _, _, lab in labels) + " |"
    out = [head, "|---" * (5 + len(labels)) + "|"]
    for (m, tp, b, ctx), g in sorted(groups.items()):
        mla = g.get("MLA")
        cells = []
        for _, _, lab in labels:
            r = g.get(lab)
            cells.append("-" if r is None else f"{_f(r['ms'], '.4f')} ({_x(r.get('speedup_vs_mla'))})")
        out.append(f"| {m} | {tp} | {b} | {_kctx(ctx)} | {_f(mla['ms'], '.4f') if mla else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------- CPU (PyTorch) smoke path


def _torch_attention(rows, q, indptr, indices, d, scale):
    """Batched PyTorch decode (equal lengths): the reference math without the per-request loop."""
    b = q.shape[0]
    ctx = rows[indices.long()].view(b, -1, rows.shape[-1]).float()
    logits = torch.einsum("bhe,ble->bhl", q.float(), ctx) * scale
    return torch.einsum("bhl,bld->bhd", torch.softmax(logits, -1), ctx[..., :d])


def _time_host(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_attention_case_cpu(c: AttnCase, repeat: int, gen: torch.Generator) -> dict:
    shape = MODELS[c.model]
    scale = (shape.qk_nope_head_dim + shape.qk_rope_head_dim) ** -0.5
    slots = c.batch * c.tokens
    rows = torch.randn(slots, c.d + D_PE, generator=gen)
    q = torch.randn(c.batch, c.heads, c.d + D_PE, generator=gen) * 0.1
    indptr = torch.arange(0, slots + 1, c.tokens, dtype=torch.int32)
    indices = torch.randperm(slots, generator=gen).to(torch.int32)
    ms = _time_host(lambda: _torch_attention(rows, q, indptr, indices, c.d, scale), repeat)
    tr = traffic(c, kv_elem=4, q_elem=4)
    return {"name": c.name, **asdict(c), "label": c.label, "impl": "torch-cpu", **tr, "ms": ms,
            "GBps": tr["bytes"] / (ms * 1e-3) / 1e9, "TFLOPs": tr["flops"] / (ms * 1e-3) / 1e12,
            **roofline_fields(ms, tr["bytes"], tr["flops"])}  # fmt: skip


# --------------------------------------------------------------------------- CLI


def _ints(s):
    return [int(x) for x in str(s).split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sglang_tpla.bench.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--models", default="deepseek-v3,kimi-k2")
    ap.add_argument("--tp", default=",".join(map(str, DEFAULT_TPS)))
    ap.add_argument("--groups", default=",".join(map(str, DEFAULT_GROUPS)), help="TPLA g values (invalid ones skipped)")
    ap.add_argument("--dcp", default=",".join(map(str, DEFAULT_DCPS)), help="DCP sizes (those not dividing TP skipped)")
    ap.add_argument("--batch", default=None, help="comma list; default 1,8,32 on CUDA, 2 on CPU")
    ap.add_argument("--contexts", default=None, help="comma list; default 4096,32768 on CUDA, 256 on CPU")
    ap.add_argument("--kv-dtype", default="bfloat16", choices=("bfloat16", "float8_e4m3fn"))
    ap.add_argument("--repeat", type=int, default=3, help="CPU only: timed repeats")
    ap.add_argument("--rep-ms", type=float, default=15.0, help="CUDA only: do_bench_cudagraph rep (ms)")
    ap.add_argument("--out", help="write all rows as JSON lines")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batches = _ints(args.batch or ("1,8,32" if cuda else "2"))
    contexts = _ints(args.contexts or ("4096,32768" if cuda else "256"))
    cases = attention_cases(args.models.split(","), _ints(args.tp), batches, contexts, _ints(args.groups), _ints(args.dcp))
    rows = []
    if cuda:
        spec, meas = device_ceilings(device)
        timer = cudagraph_timer(args.rep_ms)
        for c in cases:
            r = run_attention_case(c, device, timer, spec=spec, meas=meas, kv_dtype=getattr(torch, args.kv_dtype))
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        where = torch.cuda.get_device_name(device)
    else:
        gen = torch.Generator().manual_seed(0)
        for c in cases:
            r = run_attention_case_cpu(c, args.repeat, gen)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        where = "CPU (PyTorch path: a smoke test, not a GPU claim)"
    emit_report(rows, f"## Per-rank decode attention, one layer, {where}\n", args.out)


def emit_report(rows: list[dict], heading: str, out: str | None, table_fn=None) -> None:
    """Speedups vs MLA, the markdown tables on stdout (``table_fn``: the per-row table, default
    :func:`table`), and the rows as JSON lines in ``out``."""
    add_speedups(rows)
    print(heading)
    print((table_fn or table)(rows))
    print()
    print(side_by_side(rows))
    if out:
        with open(out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
