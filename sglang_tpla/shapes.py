"""MLA shapes of the models TPLA targets: KV-cache bytes per token, per-rank weight bytes and KV
capacity at TP=8 with block-FP8 weights, and the two ways to feed a TPLA rank's q/o projections.

Pure Python: no torch, no sglang.  ``python -m sglang_tpla.shapes`` prints the tables (markdown).

Model shapes (public ``config.json`` of ``deepseek-ai/DeepSeek-V3`` and ``moonshotai/Kimi-K2-Instruct``,
cross-checked against copies of those configs in public repositories): hidden 7168, 61 layers,
q_lora_rank 1536, kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128, moe_intermediate 2048,
intermediate (dense layers) 18432, 1 shared expert, ``quantization_config`` block FP8 128x128
(float8_e4m3fn weights, one float32 ``weight_scale_inv`` per block, no ``modules_to_not_convert``);
DeepSeek-V3: 128 heads, 256 routed experts, first 3 layers dense, vocab 129280, YaRN factor 40 over
4096 positions; Kimi-K2: 64 heads, 384 routed experts, first layer dense, vocab 163840, YaRN factor
32 over 4096.  DeepSeek-V3's MTP layer (``num_nextn_predict_layers`` 1) is not served (no
speculative decoding with TPLA) and not counted.

Per-rank weight bytes (:func:`rank_weight_bytes`), SGLang 0.5.23 with TP = ``tp``, experts sharded
with TP (``--ep-size 1``, EP off; every rank holds ``moe_intermediate/tp`` of every expert), no DP
attention.  A block-FP8 linear of ``o x i`` costs ``o*i + ceil(o/128)*ceil(i/128)*4`` bytes; an
unquantized one ``o*i*m`` (``m`` = model dtype bytes, 2 for bf16).  ``h = H/tp`` heads per rank::

    per layer, attention (q_a, kv_a replicated; q_b, kv_b column- and o_proj row-parallel):
      fp8(q_lora, hidden) + KVA + fp8(h*(nope+rope), q_lora) + KVB + fp8(hidden, h*v)
      + h*(nope*r + r*v)*m            SGLang's w_kc / w_vc, kv_b dequantized at load (kv_b stays too)
      + (2*hidden + q_lora + r)*m     RMSNorm gains
    stock MLA / TPLA transform 'none':  KVA = fp8(r+rope, hidden),  KVB = fp8(h*(nope+v), r)
    TPLA with a transform (hadamard):   KVA = (r+rope)*hidden*m,    KVB = h*(nope+v)*r*m
      (dequantized to fold the rotation, sglang_tpla/patches/weights.py)
    TPLA (both options) adds its W_UK / W_UV slices: g*h heads x (nope+v) x r/g  = h*(nope+v)*r*m
    option a (q/o re-sharded to the g*h heads a rank attends): q_b and o_proj g times wider
    per dense layer:  2*fp8(I/tp, hidden) + fp8(hidden, I/tp)
    per MoE layer:    E*(2*fp8(Im/tp, hidden) + fp8(hidden, Im/tp)) + the same for the shared
                      expert(s) (S*Im) + router E*hidden*m + its fp32 correction bias E*4
    once: embed_tokens + lm_head (vocab/tp)*hidden*m each (bf16, not quantized), final norm
          hidden*m, one shared YaRN cos/sin cache positions*rope*4 (fp32)

The formula reproduces the served tiny FP8 model's logged ``TPLA: rank weight bytes`` (TP=2, fp32
model dtype; docs/serving.md) to the byte, except 32 B of small buffers it does not model
(``tests/test_shapes.py``).

KV capacity (:func:`kv_pool_tokens`): SGLang 0.5.23 sizes a rank's pool as the free memory after
loading minus ``free_before_loading * (1 - mem_fraction_static)``
(``KVCacheConfigurator._profile_available_bytes``), i.e. ``free_before_loading * mem_fraction_static -
weights``.  ``free_before_loading`` is taken as the whole card (H200: 143,771 MiB, what ``nvidia-smi``
reports); the CUDA context and NCCL buffers (about 1-2 GB, and TPLA's head-peer communicator for
``1 < g < tp``) are not subtracted, so real pools are smaller by about that much.  Activations and CUDA
graphs live in the reserve and are ignored.  Every row uses one fraction, SGLang's default for stock
MLA on that card (:func:`sglang_default_mem_fraction`; H200, TP=8: 0.886).  TPLA's own default is
0.897 (it switches prefill CUDA graphs off, so SGLang reserves 1.5 GiB less); that is not counted as
TPLA's gain.  Tokens = ``pool / (layers * (r/g + rope) * kv_elem)``: MLA 576 elements per token per
layer (g=1), TPLA ``512/g + 64``; bf16 (2 B) or fp8 (1 B) KV.

Option a vs option b per decode step (:func:`qo_step_costs`), per rank: a reads ``(g-1)`` more stock
shards of q_b/o_proj (FP8 + scales) every step, as a roofline ``max(bytes / HBM, 2 * B * weights / FP8 peak)`` (compute-bound from B ~ 200 on an H200);
b (what the project implements, :mod:`sglang_tpla.comm`) runs 2 collectives per layer over the g
head peers (all-gather of q, ``(g-1)*B*h*(nope+rope)`` elements in, and reduce-scatter of the
attention output, ``(g-1)*B*h*v`` elements), each costing a fixed latency plus bytes / link
bandwidth.  Assumed H200 figures: HBM 4.8 TB/s, FP8 dense peak 1,979 TFLOP/s, NVLink 450 GB/s per
direction, 10-20 us per small collective; bf16 activations.  Estimates, not measurements.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MLAShape:
    name: str
    num_layers: int
    num_heads: int
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    hidden_size: int = 7168
    # the rest is needed only for the weight bytes (None: unknown / not modelled)
    q_lora_rank: int | None = None
    vocab_size: int | None = None
    intermediate_size: int | None = None  # dense MLP layers
    moe_intermediate_size: int | None = None
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    first_k_dense: int | None = None  # None: every layer dense
    fp8_block: tuple[int, int] | None = None  # block-FP8 checkpoint (weight_scale_inv per block)
    rope_cache_positions: int = 0  # SGLang's YaRN cos/sin cache rows (original_max_position * factor)


# From the models' public config.json files.
DEEPSEEK_V3 = MLAShape(
    "DeepSeek-V3", num_layers=61, num_heads=128, q_lora_rank=1536, vocab_size=129280, intermediate_size=18432,
    moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1, first_k_dense=3, fp8_block=(128, 128),
    rope_cache_positions=4096 * 40,
)
KIMI_K2 = MLAShape(
    "Kimi-K2", num_layers=61, num_heads=64, q_lora_rank=1536, vocab_size=163840, intermediate_size=18432,
    moe_intermediate_size=2048, n_routed_experts=384, n_shared_experts=1, first_k_dense=1, fp8_block=(128, 128),
    rope_cache_positions=4096 * 32,
)
DEEPSEEK_V2_LITE = MLAShape("DeepSeek-V2-Lite", num_layers=27, num_heads=16, hidden_size=2048)
KNOWN_SHAPES = (DEEPSEEK_V3, KIMI_K2, DEEPSEEK_V2_LITE)


def kv_row_width(shape: MLAShape, g: int = 1) -> int:
    """Elements per token per layer held by one device: MLA (g=1) keeps 576, TPLA 512/g + 64."""
    if shape.kv_lora_rank % g:
        raise ValueError(f"g={g} does not divide kv_lora_rank={shape.kv_lora_rank}")
    return shape.kv_lora_rank // g + shape.qk_rope_head_dim


def kv_bytes_per_token(shape: MLAShape, g: int = 1, elem_bytes: int = 2) -> int:
    """KV-cache bytes per token per device over all layers (bf16 by default)."""
    return shape.num_layers * kv_row_width(shape, g) * elem_bytes


def kv_bytes_table(shapes=(DEEPSEEK_V3, KIMI_K2), groups=(1, 2, 4, 8), elem_bytes: int = 2) -> str:
    """A markdown table of KV bytes per token per device, MLA vs TPLA for each g."""
    head = "| model | layers | heads | MLA (576/row) | " + " | ".join(
        f"TPLA g={g} ({kv_row_width(shapes[0], g)}/row)" for g in groups
    ) + " |"
    lines = [head, "|" + "---|" * (4 + len(groups))]
    for s in shapes:
        mla = kv_bytes_per_token(s, 1, elem_bytes)
        cells = []
        for g in groups:
            b = kv_bytes_per_token(s, g, elem_bytes)
            cells.append(f"{b:,} B ({b / mla:.3f}x, {mla / b:.2f}x tokens)")
        lines.append(f"| {s.name} | {s.num_layers} | {s.num_heads} | {mla:,} B | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- per-rank weight bytes

VARIANTS = ("mla", "tpla", "tpla-a")  # stock MLA; TPLA option b (implemented); TPLA option a (q/o re-sharded)


def fp8_linear_bytes(out_features: int, in_features: int, block: tuple[int, int] = (128, 128)) -> int:
    """Block-FP8 linear: one byte per weight plus one float32 scale per (partial) block."""
    bo, bi = block
    return out_features * in_features + math.ceil(out_features / bo) * math.ceil(in_features / bi) * 4


def _linear(shape: MLAShape, out_f: int, in_f: int, model_bytes: int, quantized: bool = True) -> int:
    if quantized and shape.fp8_block is not None:
        return fp8_linear_bytes(out_f, in_f, shape.fp8_block)
    return out_f * in_f * model_bytes


def _need(shape: MLAShape, *fields: str) -> None:
    missing = [f for f in fields if getattr(shape, f) is None]
    if missing:
        raise ValueError(f"{shape.name}: weight bytes need {', '.join(missing)}")


def rank_weight_bytes(shape: MLAShape, tp: int = 8, g: int = 1, variant: str = "mla", transform: str = "hadamard",
                      model_bytes: int = 2) -> dict[str, int]:
    """Resident weight bytes of one TP rank, by part (see the module docstring for the formula).

    ``variant``: ``mla`` (stock SGLang), ``tpla`` (option b, implemented: SGLang's head-sharded
    q_b/o_proj, activations move) or ``tpla-a`` (q_b/o_proj re-sharded to the ``g*H/tp`` heads a
    rank attends, replacing the stock shards).  ``transform``: with ``none`` TPLA dequantizes
    nothing; any other (``hadamard``, ``pca``, ``fit``) dequantizes kv_a and kv_b to the model dtype.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: one of {VARIANTS}")
    _need(shape, "q_lora_rank", "vocab_size", "intermediate_size")
    if shape.num_heads % tp or (variant != "mla" and tp % g):
        raise ValueError(f"{shape.name}: TP {tp} must divide {shape.num_heads} heads and g={g} must divide TP")
    s, m, L = shape, model_bytes, shape.num_layers
    h = s.num_heads // tp
    r, rope, nope, v, hid, ql = s.kv_lora_rank, s.qk_rope_head_dim, s.qk_nope_head_dim, s.v_head_dim, s.hidden_size, s.q_lora_rank
    tpla = variant != "mla"
    folded = tpla and transform != "none"
    wide = g if variant == "tpla-a" else 1
    q_o = _linear(s, wide * h * (nope + rope), ql, m) + _linear(s, hid, wide * h * v, m)
    kv_a = _linear(s, r + rope, hid, m, quantized=not folded)
    kv_b = _linear(s, h * (nope + v), r, m, quantized=not folded)
    dense = s.first_k_dense if s.first_k_dense is not None else L
    moe_layers = L - min(dense, L)
    out = {
        "embed_tokens + lm_head": 2 * math.ceil(s.vocab_size / tp) * hid * m,
        "q_a_proj": L * _linear(s, ql, hid, m),
        "q_b_proj + o_proj": L * q_o,
        "kv_a_proj + kv_b_proj": L * (kv_a + kv_b),
        "w_kc + w_vc (SGLang)": L * h * (nope * r + r * v) * m,
        "TPLA W_UK + W_UV": L * (h * (nope + v) * r * m if tpla else 0),
        "norms + rope cache": L * (2 * hid + ql + r) * m + hid * m + s.rope_cache_positions * rope * 4,
        "dense MLP": dense * _mlp(s, s.intermediate_size, tp, m),
    }
    if moe_layers:
        _need(shape, "moe_intermediate_size")
        im = s.moe_intermediate_size
        out["MoE experts (routed)"] = moe_layers * s.n_routed_experts * _mlp(s, im, tp, m)
        out["MoE shared expert + router"] = moe_layers * (
            (_mlp(s, s.n_shared_experts * im, tp, m) if s.n_shared_experts else 0) + s.n_routed_experts * (hid * m + 4)
        )
    return out


def _mlp(s: MLAShape, inter: int, tp: int, m: int) -> int:
    """gate + up (column-parallel) and down (row-parallel) of one SwiGLU MLP, per rank."""
    i = inter // tp
    return 2 * _linear(s, i, s.hidden_size, m) + _linear(s, s.hidden_size, i, m)


def total_rank_weight_bytes(shape: MLAShape, tp: int = 8, g: int = 1, variant: str = "mla",
                            transform: str = "hadamard", model_bytes: int = 2) -> int:
    return sum(rank_weight_bytes(shape, tp, g, variant, transform, model_bytes).values())


# --------------------------------------------------------------------------- KV capacity


@dataclass(frozen=True)
class Card:
    """One GPU, for the estimates (assumed figures, not measured here)."""

    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    fp8_flops: float  # dense FP8 tensor-core peak
    link_bytes_per_s: float  # NVLink, per direction per GPU
    collective_latency_s: tuple[float, float]  # one small all-gather / reduce-scatter, low and high


H200 = Card("H200", 143_771 << 20, 4.8e12, 1.979e15, 450e9, (10e-6, 20e-6))


def sglang_default_mem_fraction(gpu_mem_mib: int, tp: int, prefill_graphs: bool = True) -> float:
    """SGLang 0.5.23's default ``mem_fraction_static`` for an MLA model (``arg_groups/memory_hook.py``
    ``handle_gpu_memory_settings``; no DP attention, PD, speculative decoding or DeepEP): it reserves
    512 MiB + 1.5 x the chunked-prefill size + tp/8 GiB + 2 x the decode CUDA-graph max batch +
    1.5 GiB when prefill CUDA graphs are on (the CUDA default; TPLA switches them off), at least
    10 GiB on cards above 60 GiB, and returns ``round((card - reserved) / card, 3)``."""
    for limit, chunk, bs_small, bs_big in ((20, 2048, 8, 8), (35, 4096, 48, 160), (60, 4096, 32, 160),
                                           (90, 8192, 256, 512), (160, 8192, 256, 512)):
        if gpu_mem_mib < limit * 1024:
            break
    else:
        chunk, bs_small, bs_big = 16384, 512, 512
    max_bs = bs_small if tp < 4 else bs_big
    reserved = 512 + max(chunk, 2048) * 1.5 + tp / 8 * 1024 + max_bs * 2 + (1536 if prefill_graphs else 0)
    if gpu_mem_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return round((gpu_mem_mib - reserved) / gpu_mem_mib, 3)


def kv_pool_tokens(shape: MLAShape, weight_bytes: int, g: int = 1, kv_elem_bytes: int = 2, card: Card = H200,
                   mem_fraction: float | None = None, tp: int = 8) -> int:
    """KV tokens one rank's pool holds: ``(card * mem_fraction - weights) / bytes per token``."""
    frac = sglang_default_mem_fraction(card.memory_bytes >> 20, tp) if mem_fraction is None else mem_fraction
    pool = int(card.memory_bytes * frac) - weight_bytes  # SGLang: free memory after loading - free before * (1 - frac)
    return max(pool, 0) // kv_bytes_per_token(shape, g, kv_elem_bytes)


# --------------------------------------------------------------------------- option a vs option b per decode step


def qo_step_costs(shape: MLAShape, tp: int, g: int, batch: int, card: Card = H200, act_bytes: int = 2) -> dict:
    """Per rank, per decode step of ``batch`` tokens: what each way of giving a TPLA rank the q/o of
    its ``g*H/tp`` heads adds over stock MLA.

    ``a``: ``(g-1)`` more stock shards of q_b_proj / o_proj (FP8 + scales) held and read every step;
    time ``max(bytes / HBM, 2 * batch * weights / FP8 peak)`` (one FP8 byte per weight).
    ``b``: 2 collectives per layer over the g head peers; bytes received per rank
    ``layers * (g-1) * batch * h * (nope + rope + v) * act_bytes``; time ``count * latency + bytes / link``.
    """
    _need(shape, "q_lora_rank")
    s, L = shape, shape.num_layers
    h = s.num_heads // tp
    stock_q = _linear(s, h * (s.qk_nope_head_dim + s.qk_rope_head_dim), s.q_lora_rank, 1)
    stock_o = _linear(s, s.hidden_size, h * s.v_head_dim, 1)
    a_bytes = (g - 1) * L * (stock_q + stock_o)
    a_weights = (g - 1) * L * h * ((s.qk_nope_head_dim + s.qk_rope_head_dim) * s.q_lora_rank + s.hidden_size * s.v_head_dim)
    a_s = max(a_bytes / card.hbm_bytes_per_s, 2 * batch * a_weights / card.fp8_flops)
    count = 2 * L if g > 1 else 0
    b_bytes = L * (g - 1) * batch * h * (s.qk_nope_head_dim + s.qk_rope_head_dim + s.v_head_dim) * act_bytes
    lo, hi = card.collective_latency_s
    b_bw = b_bytes / card.link_bytes_per_s
    return {
        "a_extra_weight_bytes": a_bytes, "a_s": a_s,
        "b_collectives": count, "b_bytes": b_bytes,
        "b_s": (count * lo + b_bw, count * hi + b_bw),
        # per-collective latency below which b is as fast as a (negative: b never is)
        "break_even_latency_s": (a_s - b_bw) / count if count else float("inf"),
    }


# --------------------------------------------------------------------------- tables


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def memory_table(shapes=(DEEPSEEK_V3, KIMI_K2), tp: int = 8, groups=(2, 4), card: Card = H200,
                 mem_fraction: float | None = None, option_a: bool = True) -> str:
    """Per-rank weight GB and KV tokens (bf16 and fp8 KV), MLA vs TPLA, FP8 weights."""
    frac = sglang_default_mem_fraction(card.memory_bytes >> 20, tp) if mem_fraction is None else mem_fraction
    rows = [("MLA", "mla", 1, "hadamard")]
    for g in groups:
        rows.append((f"TPLA g={g} (b, hadamard)", "tpla", g, "hadamard"))
        rows.append((f"TPLA g={g} (b, none)", "tpla", g, "none"))
        if option_a:
            rows.append((f"TPLA g={g} (a, hadamard)", "tpla-a", g, "hadamard"))
    lines = [
        f"| model, TP={tp}, FP8 weights | weights / rank (GB) | KV pool / rank (GB) | KV tokens, bf16 KV | KV tokens, fp8 KV | vs MLA |",
        "|---|---|---|---|---|---|",
    ]
    for s in shapes:
        base = None
        for label, variant, g, transform in rows:
            w = total_rank_weight_bytes(s, tp, g, variant, transform)
            pool = int(card.memory_bytes * frac) - w
            t16 = kv_pool_tokens(s, w, g, 2, card, frac, tp)
            t8 = kv_pool_tokens(s, w, g, 1, card, frac, tp)
            base = base or t16
            if pool <= 0:
                lines.append(f"| {s.name} {label} | {_gb(w)} | weights do not fit | 0 | 0 | - |")
                continue
            lines.append(f"| {s.name} {label} | {_gb(w)} | {_gb(pool)} | {t16:,} | {t8:,} | {t16 / base:.2f}x |")
    return "\n".join(lines)


def breakdown_table(shape: MLAShape, tp: int = 8, groups=(2, 4)) -> str:
    """Per-rank weight bytes by part (MB), MLA vs TPLA (b, hadamard / none) and option a."""
    cols = [("MLA", "mla", 1, "hadamard")]
    for g in groups:
        cols += [(f"b g={g} hadamard", "tpla", g, "hadamard"), (f"b g={g} none", "tpla", g, "none"),
                 (f"a g={g} hadamard", "tpla-a", g, "hadamard")]
    parts = [rank_weight_bytes(shape, tp, g, v, t) for _, v, g, t in cols]
    lines = [f"| {shape.name}, TP={tp}, per rank (MB) | " + " | ".join(c[0] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for key in parts[0]:
        lines.append(f"| {key} | " + " | ".join(f"{p[key] / 1e6:,.1f}" for p in parts) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(p.values()) / 1e6:,.1f}**" for p in parts) + " |")
    return "\n".join(lines)


def qo_table(shapes=(DEEPSEEK_V3, KIMI_K2), tp: int = 8, groups=(2, 4), batches=(1, 64, 256), card: Card = H200) -> str:
    """Option a vs option b: added time per decode step (ms, per rank) at each batch size."""
    lo, hi = card.collective_latency_s
    lines = [
        f"| TP={tp} | a: extra q/o weights held and read | b: collectives / step | "
        + " | ".join(f"B={b}: a / b (ms)" for b in batches) + f" | b as fast as a below, us per collective (B={' / '.join(map(str, batches))}) |",
        "|---" * (4 + len(batches)) + "|",
    ]
    for s in shapes:
        for g in groups:
            cells, be = [], []
            for b in batches:
                c = qo_step_costs(s, tp, g, b, card)
                cells.append(f"{c['a_s'] * 1e3:.2f} / {c['b_s'][0] * 1e3:.2f}-{c['b_s'][1] * 1e3:.2f}")
                be.append(f"{c['break_even_latency_s'] * 1e6:.1f}" if c["break_even_latency_s"] > 0 else "never")
            c1 = qo_step_costs(s, tp, g, 1, card)
            lines.append(f"| {s.name} g={g} | {_gb(c1['a_extra_weight_bytes'])} GB | {c1['b_collectives']} | "
                         + " | ".join(cells) + f" | {' / '.join(be)} |")
    return "\n".join(lines)


# The served tiny FP8 model (docs/serving.md, tests/test_serving_fp8.py): TP=2, g=2, fp32 model dtype on
# the CPU platform, weights counted against one budget; measured 2026-12-02.
TINY_FP8_MEASURED = {"mla": (9_913_248, 163_975), "tpla hadamard": (19_022_336, 291_597), "tpla none": (14_107_552, 293_517)}


def readme_table(tp: int = 8, card: Card = H200) -> str:
    """The README's short table: per-rank weight GB and bf16 KV tokens, MLA vs TPLA g=2 / g=4 (option b,
    transform hadamard), FP8 weights, plus the tiny model's measured row."""
    frac = sglang_default_mem_fraction(card.memory_bytes >> 20, tp)
    lines = [f"| per rank, TP={tp}, FP8 weights, {card.name}, bf16 KV: weights GB / KV tokens | MLA | TPLA g=2 | TPLA g=4 |",
             "|---|---|---|---|"]
    for s in (DEEPSEEK_V3, KIMI_K2):
        cells, base = [], None
        for variant, g in (("mla", 1), ("tpla", 2), ("tpla", 4)):
            w = total_rank_weight_bytes(s, tp, g, variant, "hadamard")
            t = kv_pool_tokens(s, w, g, 2, card, frac, tp)
            base = base or t
            cells.append(f"{w / 1e9:.2f} / {t:,}" + (f" ({t / base:.2f}x)" if variant != "mla" else ""))
        lines.append(f"| {s.name} (from the shapes) | " + " | ".join(cells) + " |")
    (wm, tm), (wt, tt) = TINY_FP8_MEASURED["mla"], TINY_FP8_MEASURED["tpla hadamard"]
    lines.append(f"| tiny FP8 model, TP=2, fp32, CPU (measured; MB) | {wm / 1e6:.1f} / {tm:,} | "
                 f"{wt / 1e6:.1f} / {tt:,} ({tt / tm:.2f}x) | - |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sglang_tpla.shapes", description=(
        "Per-rank weight bytes, KV capacity and the q/o option a vs b costs from the model shapes (estimates; "
        "assumptions in the module docstring)."))
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="mem_fraction_static (default: SGLang's default for an H200 at this TP)")
    a = p.parse_args(argv)
    frac = sglang_default_mem_fraction(H200.memory_bytes >> 20, a.tp) if a.mem_fraction is None else a.mem_fraction
    print("## KV bytes per token per device (bf16 KV)\n")
    print(kv_bytes_table(groups=(1, *a.groups)))
    print(f"\n## Per rank at TP={a.tp}: weights and KV tokens ({H200.name} {H200.memory_bytes >> 20:,} MiB, "
          f"mem_fraction_static {frac}, EP off)\n")
    print(memory_table(tp=a.tp, groups=a.groups, mem_fraction=frac))
    for s in (DEEPSEEK_V3, KIMI_K2):
        print()
        print(breakdown_table(s, a.tp, a.groups))
    lo, hi = H200.collective_latency_s
    print(f"\n## q/o per decode step: option a (re-sharded weights) vs b (collectives), added over stock MLA\n"
          f"HBM {H200.hbm_bytes_per_s / 1e12:.1f} TB/s, FP8 {H200.fp8_flops / 1e12:,.0f} TFLOP/s, "
          f"NVLink {H200.link_bytes_per_s / 1e9:.0f} GB/s, {lo * 1e6:.0f}-{hi * 1e6:.0f} us per collective, bf16 activations\n")
    print(qo_table(tp=a.tp, groups=a.groups, batches=a.batches))
    if a.tp == 8:
        print("\n## README table\n")
        print(readme_table())


if __name__ == "__main__":
    main()
