"""The fp32 reference model against HF transformers, and its TPLA modes against each other."""

import pytest
import torch

from sglang_tpla.reference_model import AttentionMode, ReferenceDeepseek
from sglang_tpla.tiny_model import random_state_dict, save_model, tiny_config

IDS = [3, 17, 250, 9, 44, 101, 7, 300, 12, 5, 66, 480, 31, 2, 150, 222]


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("q_lora_rank", [192, None], ids=["v3-layout", "v2-lite-layout"])
def test_reference_matches_hf_transformers(tmp_path, q_lora_rank):
    cfg = tiny_config(q_lora_rank=q_lora_rank)
    sd = random_state_dict(cfg, seed=3)
    save_model(tmp_path, cfg, sd)
    ref = ReferenceDeepseek(cfg, sd).score(IDS, len(IDS), AttentionMode("mla"))
    hf = hf_logits(tmp_path, IDS)
    torch.testing.assert_close(ref, hf, rtol=1e-4, atol=1e-4)
    # and token by token through the latent cache (prefill 5, then decode steps)
    step = ReferenceDeepseek(cfg, sd).score(IDS, 5, AttentionMode("mla"))
    torch.testing.assert_close(step, hf, rtol=1e-4, atol=1e-4)


def test_pd_sep_g1_is_mla_bit_for_bit(tiny_cfg, tiny_sd):
    m = ReferenceDeepseek(tiny_cfg, tiny_sd)
    mla = m.score(IDS, 6, AttentionMode("mla"))
    assert torch.equal(m.score(IDS, 6, AttentionMode("pd_sep", g=1)), mla)
    assert torch.equal(m.score(IDS, 6, AttentionMode("tpla", g=1)), mla)


def test_pd_sep_prefill_exact_decode_approximate(tiny_cfg, tiny_sd):
    m = ReferenceDeepseek(tiny_cfg, tiny_sd)
    mla = m.score(IDS, 6, AttentionMode("mla"))
    pd = m.score(IDS, 6, AttentionMode("pd_sep", g=2))
    everywhere = m.score(IDS, 6, AttentionMode("tpla", g=2))
    assert torch.equal(pd[:6], mla[:6])  # prefill is exact MLA
    decode_err = (pd[6:] - mla[6:]).abs().max().item()
    print(f"pd_sep g=2 max |logit diff| on decode positions: {decode_err:.3e}")
    assert decode_err > 1e-3  # TPLA is an approximation: it must show
    assert (everywhere[:6] - mla[:6]).abs().max() > 1e-3  # TPLA everywhere changes the prompt too


def test_generate_returns_greedy_tokens_and_logprobs(tiny_cfg, tiny_sd):
    m = ReferenceDeepseek(tiny_cfg, tiny_sd)
    toks, lps = m.generate(IDS[:5], 6, AttentionMode("mla"))
    logits = m.score(IDS[:5] + toks, 5, AttentionMode("mla"))
    lp = torch.log_softmax(logits.double(), -1)
    for k, tok in enumerate(toks):
        assert tok == int(lp[4 + k].argmax())
        assert abs(lps[k] - float(lp[4 + k, tok])) < 1e-6
