"""sglang_tpla.shapes: per-rank weight bytes, KV capacity and the q/o option a vs b costs.

Expected values are written out as arithmetic here (or are the served tiny model's measured bytes),
not obtained by calling the function under test twice.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_tpla import shapes
from sglang_tpla.shapes import (DEEPSEEK_V3, H200, KIMI_K2, MLAShape, fp8_linear_bytes, kv_bytes_per_token, kv_pool_tokens,
                                qo_step_costs, rank_weight_bytes, sglang_default_mem_fraction, total_rank_weight_bytes)

REPO = Path(__file__).resolve().parents[1]


def test_kv_bytes_per_token_per_layer():
    one_layer = MLAShape("one", num_layers=1, num_heads=8)
    assert kv_bytes_per_token(one_layer, 1, 2) == 576 * 2  # 512 latent + 64 RoPE, bf16
    assert kv_bytes_per_token(one_layer, 2, 2) == (256 + 64) * 2
    assert kv_bytes_per_token(one_layer, 4, 1) == (128 + 64) * 1  # fp8 KV
    assert kv_bytes_per_token(DEEPSEEK_V3, 2, 2) == 61 * 320 * 2 == 39_040


def test_fp8_linear_bytes_counts_one_byte_per_weight_and_a_float32_scale_per_block():
    # DeepSeek-V3 q_b_proj shard at TP=8: 16 heads x 192 rows, 1536 columns -> 24 x 12 blocks
    assert fp8_linear_bytes(16 * 192, 1536) == 3072 * 1536 + 24 * 12 * 4 == 4_719_744
    # kv_a_proj_with_mqa: 576 rows end in a partial block (5 block rows), 7168 columns (56 blocks)
    assert fp8_linear_bytes(576, 7168) == 576 * 7168 + 5 * 56 * 4


def test_deepseek_v3_attention_parts_at_tp8():
    L = 61
    q_b = 3072 * 1536 + 24 * 12 * 4  # FP8 + scales
    o = 7168 * 2048 + 56 * 16 * 4
    kv_a_fp8 = 576 * 7168 + 5 * 56 * 4
    kv_b_fp8 = 16 * 256 * 512 + 32 * 4 * 4
    mla = rank_weight_bytes(DEEPSEEK_V3, 8, 1, "mla")
    assert mla["q_b_proj + o_proj"] == L * (q_b + o)
    assert mla["kv_a_proj + kv_b_proj"] == L * (kv_a_fp8 + kv_b_fp8)
    assert mla["w_kc + w_vc (SGLang)"] == L * 16 * (128 * 512 + 512 * 128) * 2
    assert mla["TPLA W_UK + W_UV"] == 0
    assert mla["embed_tokens + lm_head"] == 2 * (129280 // 8) * 7168 * 2
    # routed experts, EP off: 58 MoE layers x 256 experts x (gate, up: 256 x 7168; down: 7168 x 256) at 1 B + scales
    assert mla["MoE experts (routed)"] == 58 * 256 * (2 * (256 * 7168 + 2 * 56 * 4) + 7168 * 256 + 56 * 2 * 4)
    b2 = rank_weight_bytes(DEEPSEEK_V3, 8, 2, "tpla", "hadamard")
    assert b2["q_b_proj + o_proj"] == L * (q_b + o)  # option b: SGLang's own shards
    assert b2["kv_a_proj + kv_b_proj"] == L * (576 * 7168 * 2 + 4096 * 512 * 2)  # dequantized to bf16 for the fold
    assert b2["TPLA W_UK + W_UV"] == L * 32 * 256 * 256 * 2  # g*h = 32 heads x (nope + v) x 256 columns
    assert rank_weight_bytes(DEEPSEEK_V3, 8, 2, "tpla", "none")["kv_a_proj + kv_b_proj"] == L * (kv_a_fp8 + kv_b_fp8)
    a4 = rank_weight_bytes(DEEPSEEK_V3, 8, 4, "tpla-a", "hadamard")
    assert a4["q_b_proj + o_proj"] == L * (4 * 3072 * 1536 + 96 * 12 * 4 + 7168 * 8192 + 56 * 64 * 4)


def test_tiny_fp8_model_reproduces_the_served_rank_weight_bytes():
    """The formula against the bytes the served tiny FP8 model logged (docs/serving.md: TP=2, g=2, fp32
    model dtype): equal up to 32 B of small tensors the formula does not model."""
    tiny = MLAShape("tiny-fp8", num_layers=2, num_heads=8, hidden_size=512, q_lora_rank=256, vocab_size=512,
                    intermediate_size=512, fp8_block=(128, 128), rope_cache_positions=4096)
    # by hand, per rank (4 heads), one layer, FP8 weights + float32 block scales, fp32 elsewhere:
    q_a = 256 * 512 + 2 * 4 * 4
    kv_a = 576 * 512 + 5 * 4 * 4
    q_b = 768 * 256 + 6 * 2 * 4
    kv_b = 1024 * 512 + 8 * 4 * 4
    o = 512 * 512 + 4 * 4 * 4
    w_kc_vc = 4 * (128 * 512 + 512 * 128) * 4
    norms = (512 + 512 + 256 + 512) * 4
    mlp = 2 * (256 * 512 + 2 * 4 * 4) + 512 * 256 + 4 * 2 * 4
    layer = q_a + kv_a + q_b + kv_b + o + w_kc_vc + norms + mlp
    once = 2 * 256 * 512 * 4 + 512 * 4 + 4096 * 64 * 4  # embed + lm_head halves, final norm, RoPE cache
    mla = 2 * layer + once
    assert total_rank_weight_bytes(tiny, 2, 1, "mla", model_bytes=4) == mla == 9_913_248 - 32
    tpla_slices = 2 * 8 * 256 * 256 * 4  # 2 layers x g*h = 8 heads x (nope + v) x 256 columns, fp32
    assert total_rank_weight_bytes(tiny, 2, 2, "tpla", "none", model_bytes=4) == mla + tpla_slices == 14_107_552 - 32
    dequant = 2 * (576 * 512 * 4 - (576 * 512 + 5 * 4 * 4) + 1024 * 512 * 4 - (1024 * 512 + 8 * 4 * 4))
    assert (total_rank_weight_bytes(tiny, 2, 2, "tpla", "hadamard", model_bytes=4)
            == mla + tpla_slices + dequant == 19_022_336 - 32)


def test_sglang_default_mem_fraction_on_an_h200():
    # 143,771 MiB card, TP 8: reserve 512 + 8192 * 1.5 + 1024 (tp/8 GiB) + 512 * 2 (decode graphs) [+ 1536 prefill graphs]
    assert sglang_default_mem_fraction(143_771, 8) == round((143_771 - 16_384) / 143_771, 3) == 0.886
    assert sglang_default_mem_fraction(143_771, 8, prefill_graphs=False) == round((143_771 - 14_848) / 143_771, 3) == 0.897
    # H100 80 GB, TP 1, no prefill graphs: 512 + 8192 * 1.5 + 128 (1/8 GiB) + 256 * 2
    assert sglang_default_mem_fraction(81_559, 1, prefill_graphs=False) == round((81_559 - 13_440) / 81_559, 3)


def test_kv_pool_tokens_is_the_budget_minus_weights_over_the_row():
    card = 143_771 * 2**20
    assert kv_pool_tokens(DEEPSEEK_V3, 80 * 10**9, 2, 2, H200, 0.9) == (int(card * 0.9) - 80 * 10**9) // (61 * 320 * 2)
    assert kv_pool_tokens(DEEPSEEK_V3, 80 * 10**9, 1, 1, H200, 0.9) == (int(card * 0.9) - 80 * 10**9) // (61 * 576)
    assert kv_pool_tokens(KIMI_K2, 200 * 10**9, 1, 2, H200, 0.9) == 0  # weights do not fit


def test_option_a_vs_b_costs_per_decode_step():
    c = qo_step_costs(DEEPSEEK_V3, 8, 2, 64)
    stock_qo = (3072 * 1536 + 24 * 12 * 4) + (7168 * 2048 + 56 * 16 * 4)
    assert c["a_extra_weight_bytes"] == 61 * stock_qo
    assert c["a_s"] == pytest.approx(61 * stock_qo / 4.8e12)  # B=64: still bandwidth-bound
    assert c["b_collectives"] == 122
    assert c["b_bytes"] == 61 * 64 * 16 * (192 + 128) * 2  # (g-1) = 1 peer's q heads in, partial o out
    assert c["b_s"] == pytest.approx((122 * 10e-6 + c["b_bytes"] / 450e9, 122 * 20e-6 + c["b_bytes"] / 450e9))
    big = qo_step_costs(DEEPSEEK_V3, 8, 4, 256)
    weights = 3 * 61 * 16 * (192 * 1536 + 7168 * 128)
    assert big["a_s"] == pytest.approx(2 * 256 * weights / 1.979e15)  # compute-bound at B=256
    assert qo_step_costs(KIMI_K2, 8, 1, 1)["b_collectives"] == 0


def test_agrees_with_comm_decode_step_costs():
    """sglang_tpla.comm keeps its own estimate (no scales); the two must not drift."""
    comm = pytest.importorskip("sglang_tpla.comm")
    for s in (DEEPSEEK_V3, KIMI_K2):
        for g in (2, 4):
            mine = qo_step_costs(s, 8, g, 1)
            theirs = comm.decode_step_costs(s.hidden_size, s.q_lora_rank, s.num_heads, 8, g)
            h = s.num_heads // 8
            scales = (g - 1) * 61 * ((h * 192 // 128) * (1536 // 128) + (7168 // 128) * (h * 128 // 128)) * 4
            assert mine["a_extra_weight_bytes"] == theirs["a_extra_weight_bytes"] + scales
            assert mine["b_bytes"] == theirs["b_bytes_per_token_received"]
            assert mine["b_collectives"] == theirs["b_collectives_per_step"]


def test_cli_prints_the_tables():
    r = subprocess.run([sys.executable, "-m", "sglang_tpla.shapes"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "mem_fraction_static 0.886" in out
    assert re.search(r"\| DeepSeek-V3 MLA \| 85\.\d\d \|", out) and "| Kimi-K2 TPLA g=4 (a, hadamard) |" in out
    assert "| DeepSeek-V3 g=2 | 1.18 GB | 122 |" in out
    assert shapes.readme_table() in out



def test_readme_table_is_the_computed_one():
    assert shapes.readme_table() in (REPO / "README.md").read_text()


def test_serving_docs_tables_are_the_computed_ones():
    text = (REPO / "docs" / "serving.md").read_text()
    assert shapes.memory_table() in text and shapes.qo_table() in text


def test_cli_at_tp4_says_the_weights_do_not_fit():
    r = subprocess.run([sys.executable, "-m", "sglang_tpla.shapes", "--tp", "4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| DeepSeek-V3 MLA | 169.70 | weights do not fit |" in r.stdout  # ~170 GB per rank on a 151 GB card
