"""MLA shapes of the models TPLA targets, and per-token KV-cache bytes per device.

Pure Python: no torch, no sglang.
"""

from __future__ import annotations

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


# From the models' public config.json files.
DEEPSEEK_V3 = MLAShape("DeepSeek-V3", num_layers=61, num_heads=128)
KIMI_K2 = MLAShape("Kimi-K2", num_layers=61, num_heads=64)
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
