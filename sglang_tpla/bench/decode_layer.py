"""One decode step of one MLA attention layer on one TP rank: stock MLA vs TPLA, with the projections.

``python -m sglang_tpla.bench.decode_layer [--models deepseek-v3,kimi-k2] [--tp 2,8] [--batch 1,8,32]
[--contexts 4096,32768] [--out rows.jsonl]`` (CUDA only; torch + the Triton kernel, no SGLang)

The step, in bf16, with each variant's per-rank weight shapes (absorbed MLA decode, as SGLang runs it)::

    q      = x @ W_qb                  x [B, q_lora=1536] (after q_a_proj + q_a_layernorm), W_qb [1536, Hr*(128+64)]
    q_lat  = bmm(q_nope, W_UK)         W_UK [Hr, 128, D]          (absorb: query into the latent space)
    o_lat  = attention(q_lat, q_pe)    the Triton kernel over the rank's KV (D + 64 wide rows)
    v      = bmm(o_lat, W_UV)          W_UV [Hr, D, 128]
    y      = v.flatten() @ W_o         W_o [Hr*128, hidden=7168]  (partial sum on this rank)

* MLA (head-sharded TP):  ``Hr = H/TP`` heads, ``D = 512``.
* TPLA g:  ``Hr = H/(TP/g)`` (every rank holds all heads of its latent group), ``D = 512/g``:
  more heads per rank than MLA (``g`` times), so W_qb and W_o are ``g`` times larger per rank,
  while the KV rows are ``(512/g + 64)/576`` as wide.  This benchmark puts that trade in one number.

Not measured: the all-reduce of ``y`` over the TP ranks (one GPU; TPLA and MLA both all-reduce
``[B, 7168]``), q_a_proj / kv_a_proj / RoPE / the KV write of the new token (identical in both, and
replicated), and MoE / MLP.  Weights are bf16 (serving checkpoints may keep q_b_proj / o_proj in FP8,
which halves their bytes).  Like the attention benchmark, each timed call reads weights and KV that
are not in L2 (round robin over enough copies of the whole layer to move >= 256 MB): in a real
step the 61 layers' weights never stay in L2 either.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch

from .kernels import (
    D_PE,
    DEFAULT_BATCHES,
    DEFAULT_CONTEXTS,
    DEFAULT_GROUPS,
    DEFAULT_TPS,
    MODELS,
    ROTATE_BYTES,
    AttnProblem,
    _f,
    _kctx,
    _randn,
    _x,
    emit_report,
    cudagraph_timer,
    device_ceilings,
    roofline_fields,
    variants,
)

Q_LORA_RANK = 1536  # DeepSeek-V3 and Kimi-K2 config.json: q_lora_rank


@dataclass(frozen=True)
class LayerCase:
    model: str
    tp: int
    variant: str  # "mla" | "tpla"
    par: int  # 1 or g
    heads: int  # heads on this rank
    d: int  # latent width on this rank
    batch: int
    context: int

    @property
    def name(self) -> str:
        v = "mla" if self.variant == "mla" else f"tpla{self.par}"
        return f"layer-{self.model}-tp{self.tp}-{v}-b{self.batch}-ctx{_kctx(self.context)}"

    @property
    def label(self) -> str:
        return "MLA" if self.variant == "mla" else f"TPLA g={self.par}"


def layer_cases(models=tuple(MODELS), tps=DEFAULT_TPS, batches=DEFAULT_BATCHES, contexts=DEFAULT_CONTEXTS,
                groups=DEFAULT_GROUPS) -> list[LayerCase]:  # fmt: skip
    out = []
    for m in models:
        for tp in tps:
            for b in batches:
                for ctx in contexts:
                    for v, par, heads, d, _ in variants(m, tp, groups, dcps=()):
                        out.append(LayerCase(m, tp, v, par, heads, d, b, ctx))
    return out


def weight_shapes(c: LayerCase) -> dict[str, tuple[int, ...]]:
    s = MODELS[c.model]
    qk = s.qk_nope_head_dim + s.qk_rope_head_dim
    return {
        "w_qb": (Q_LORA_RANK, c.heads * qk),
        "w_uk": (c.heads, s.qk_nope_head_dim, c.d),
        "w_uv": (c.heads, c.d, s.v_head_dim),
        "w_o": (c.heads * s.v_head_dim, s.hidden_size),
    }


def layer_traffic(c: LayerCase, elem: int = 2) -> dict:
    """Weight bytes, KV bytes, activation bytes and FLOPs of one step on one rank."""
    s = MODELS[c.model]
    w = weight_shapes(c)
    w_elems = sum(math.prod(v) for v in w.values())
    kv = c.batch * c.context * (c.d + D_PE) * elem
    act = c.batch * (Q_LORA_RANK + c.heads * (s.qk_nope_head_dim + D_PE) + 2 * c.heads * c.d
                     + c.heads * s.v_head_dim + s.hidden_size) * elem  # fmt: skip
    mm_flops = 2 * c.batch * w_elems
    attn_flops = 2 * c.batch * c.heads * c.context * (2 * c.d + D_PE)
    return {"weight_bytes": w_elems * elem, "kv_bytes": kv, "bytes": w_elems * elem + kv + act,
            "flops": mm_flops + attn_flops, "attn_flops": attn_flops}  # fmt: skip


class DecodeLayerStep:
    """Weights, inputs and the attention problem of one per-rank layer step, ``copies`` times over."""

    def __init__(self, c: LayerCase, device, *, dtype=torch.bfloat16, copies: int | None = None,
                 context: int | None = None, seed: int = 0):  # fmt: skip
        device = torch.device(device)
        s = MODELS[c.model]
        self.c = c
        self.nope, self.rope, self.v = s.qk_nope_head_dim, s.qk_rope_head_dim, s.v_head_dim
        ctx = c.context if context is None else context
        per_copy = layer_traffic(c)["weight_bytes"] + c.batch * ctx * (c.d + D_PE) * 2
        self.copies = copies or max(1, min(64, -(-ROTATE_BYTES // per_copy)))
        meta = device.type == "meta"
        gen = None if meta else torch.Generator(device=device).manual_seed(seed)
        scale = (self.nope + self.rope) ** -0.5
        self.attn = AttnProblem(c.heads, c.d, c.batch, ctx, device, sm_scale=scale, q_dtype=dtype, kv_dtype=dtype,
                                copies=self.copies, seed=seed + 1)  # fmt: skip
        fan_in = {"w_qb": Q_LORA_RANK, "w_uk": self.nope, "w_uv": c.d, "w_o": c.heads * self.v}
        self.w = []
        for _ in range(self.copies):
            ws = {}
            for k, shp in weight_shapes(c).items():
                t = torch.empty(shp, dtype=dtype, device=device)
                if not meta:
                    t.normal_(0.0, fan_in[k] ** -0.5, generator=gen)
                ws[k] = t
            self.w.append(ws)
        self.x = [_randn((c.batch, Q_LORA_RANK), device, gen).to(dtype) for _ in range(self.copies)]
        self._i = 0

    def step(self, i: int | None = None) -> torch.Tensor:
        if i is None:
            i = self._i
            self._i = (self._i + 1) % self.copies
        c, w, a = self.c, self.w[i], self.attn
        b = c.batch
        q = (self.x[i] @ w["w_qb"]).view(b, c.heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w["w_uk"]).transpose(0, 1)  # [B, Hr, D], unit last stride
        o_lat = a.dec.run(q_lat, q_pe, a.rows, a.indptr[i], a.indices[i], out=a.out)
        v = torch.bmm(o_lat.transpose(0, 1), w["w_uv"])  # [Hr, B, 128]
        return v.transpose(0, 1).reshape(b, c.heads * self.v) @ w["w_o"]


def run_layer_case(c: LayerCase, device, timer, *, warm: bool = False, spec=None, meas=None) -> dict:
    """Time one layer step.  ``warm``: the same kernel specialisations over 64 tokens, run once."""
    device = torch.device(device)
    step = DecodeLayerStep(c, device, copies=1 if warm else None, context=min(c.context, 64) if warm else None)
    rec = {"name": c.name, **asdict(c), "label": c.label, "copies": step.copies, "splits": step.attn.splits,
           **{f"shape_{k}": list(v) for k, v in weight_shapes(c).items()}}  # fmt: skip
    y = step.step(0)
    if tuple(y.shape) != (c.batch, MODELS[c.model].hidden_size):
        raise AssertionError(f"layer output {tuple(y.shape)}")
    if device.type == "cuda":
        rec["finite"] = bool(torch.isfinite(y).all())
        if not rec["finite"]:
            raise AssertionError("layer output has non-finite values")
    if warm:
        return rec
    tr = layer_traffic(c)
    ms = timer(step.step)
    rec.update(tr, ms=ms, GBps=tr["bytes"] / (ms * 1e-3) / 1e9, TFLOPs=tr["flops"] / (ms * 1e-3) / 1e12)
    rec.update(roofline_fields(ms, tr["bytes"], tr["flops"], spec, meas))
    return rec


def table(rows: list[dict], attn_ms: dict | None = None) -> str:
    """Markdown table; ``attn_ms`` maps (model, tp, variant, par, batch, context) to the attention-only ms."""
    order = {"mla": 0, "tpla": 1}
    rows = sorted((r for r in rows if "ms" in r), key=lambda r: (r["model"], r["tp"], r["batch"], r["context"],
                                                                  order[r["variant"]], r["par"]))  # fmt: skip
    out = [
        "| model | TP | batch | context | variant | heads x D | weights MB | KV MB | layer ms | attention ms | "
        "rest ms | roof (spec) | speedup vs MLA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = (attn_ms or {}).get((r["model"], r["tp"], r["variant"], r["par"], r["batch"], r["context"]))
        rest = r["ms"] - a if a is not None else None
        out.append(
            f"| {r['model']} | {r['tp']} | {r['batch']} | {_kctx(r['context'])} | {r['label']} | {r['heads']} x {r['d']} | "
            f"{r['weight_bytes'] / 1e6:.0f} | {r['kv_bytes'] / 1e6:.0f} | {_f(r['ms'], '.4f')} | {_f(a, '.4f')} | "
            f"{_f(rest, '.4f')} | {_f(r.get('roof_spec'), '.2f')} | {_x(r.get('speedup_vs_mla'))} |"
        )
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sglang_tpla.bench.decode_layer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--models", default="deepseek-v3,kimi-k2")
    ap.add_argument("--tp", default=",".join(map(str, DEFAULT_TPS)))
    ap.add_argument("--groups", default=",".join(map(str, DEFAULT_GROUPS)))
    ap.add_argument("--batch", default=",".join(map(str, DEFAULT_BATCHES)))
    ap.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)))
    ap.add_argument("--rep-ms", type=float, default=15.0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("decode_layer needs CUDA (the dry run of tests/gpu/run.sh builds every case on CPU)")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    device = torch.device("cuda")
    spec, meas = device_ceilings(device)
    timer = cudagraph_timer(args.rep_ms)
    rows = []
    for c in layer_cases(args.models.split(","), ints(args.tp), ints(args.batch), ints(args.contexts), ints(args.groups)):
        r = run_layer_case(c, device, timer, spec=spec, meas=meas)
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    emit_report(rows, f"## One decode layer step per rank, {torch.cuda.get_device_name(device)}, bf16\n", args.out, table)


if __name__ == "__main__":
    main()
