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


def test_pd_sep_g1_is_mla_bit_for_bit(tiny_cfg, tiny_sd, tmp_path):
    m = ReferenceDeepseek(tiny_cfg, tiny_sd)
    mla = m.score(IDS, 6, AttentionMode("mla"))
    assert torch.equal(m.score(IDS, 6, AttentionMode("pd_sep", g=1)), mla)
    assert torch.equal(m.score(IDS, 6, AttentionMode("tpla", g=1)), mla)
    # g=1 vs an MLA that shares no code with the reference (HF transformers), so this test can fail
    save_model(tmp_path, tiny_cfg, tiny_sd)
    torch.testing.assert_close(m.score(IDS, 6, AttentionMode("tpla", g=1)), hf_logits(tmp_path, IDS), rtol=1e-4, atol=1e-4)


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


def test_reference_of_a_bf16_checkpoint_folds_in_fp32(tmp_path):
    # A server run with --dtype float32 loads bf16 weights as fp32 and folds in fp32; the oracle must
    # do the same (load_model(dtype=float32) before fold_state_dict).  Folding the bf16 tensors as
    # stored rounds the folded weights to bf16: that was a 1.2-1.7e-3 logprob gap on the trained asset.
    from sglang_tpla.tiny_model import load_model
    from sglang_tpla.transforms import fold_state_dict, make_rotation

    cfg = tiny_config()
    save_model(tmp_path, cfg, {k: v.to(torch.bfloat16) for k, v in random_state_dict(cfg, seed=4).items()})
    u = make_rotation("hadamard", cfg["kv_lora_rank"], seed=0)
    _, sd32 = load_model(tmp_path, dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in sd32.values() if v.is_floating_point())
    plain = ReferenceDeepseek(cfg, sd32).score(IDS, len(IDS), AttentionMode("mla")).double()
    folded = ReferenceDeepseek(cfg, fold_state_dict(sd32, u)).score(IDS, len(IDS), AttentionMode("mla")).double()
    _, sd16 = load_model(tmp_path)
    rounded = ReferenceDeepseek(cfg, fold_state_dict(sd16, u)).score(IDS, len(IDS), AttentionMode("mla")).double()
    lsm = lambda x: torch.log_softmax(x, -1)  # noqa: E731
    assert (lsm(folded) - lsm(plain)).abs().max() < 2e-5  # the fold is exact in fp32
    assert (lsm(rounded) - lsm(plain)).abs().max() > 10 * (lsm(folded) - lsm(plain)).abs().max()
