import math

import pytest
import torch

from sglang_tpla import transforms as T
from sglang_tpla.reference_model import AttentionMode, ReferenceDeepseek
from sglang_tpla.tiny_model import random_state_dict, save_model, tiny_config

IDS = [5, 99, 3, 412, 77, 8, 260, 14, 33, 501, 2, 90]


def test_hadamard_is_orthogonal_and_seeded():
    u = T.randomized_hadamard(512, seed=7)
    torch.testing.assert_close(u.T @ u, torch.eye(512, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.all(u.abs() == 1 / math.sqrt(512))
    assert torch.equal(u, T.randomized_hadamard(512, seed=7))
    assert not torch.equal(u, T.randomized_hadamard(512, seed=8))
    with pytest.raises(ValueError, match="power-of-two"):
        T.sylvester_hadamard(384)


def test_hadamard_signs_act_on_input_coordinates():
    """With signs on the output side they would cancel inside every shard's dot product."""
    gen = torch.Generator().manual_seed(0)
    q, c = torch.randn(512, generator=gen, dtype=torch.float64), torch.randn(512, generator=gen, dtype=torch.float64)

    def shard0_dot(u):
        return float((q @ u)[:256] @ (c @ u)[:256])

    h = T.sylvester_hadamard(512) / math.sqrt(512)
    out_side = [shard0_dot(h * T.random_signs(512, s)[None, :]) for s in (1, 2)]
    assert out_side[0] == pytest.approx(out_side[1], rel=1e-12)  # output-side signs change nothing
    assert shard0_dot(T.randomized_hadamard(512, 1)) != pytest.approx(shard0_dot(T.randomized_hadamard(512, 2)), rel=1e-3)


def test_pca_sorted_orthogonal_and_energy_fractions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 64, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.1, 64, dtype=torch.float64)
    x = x @ torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))[0]
    m = x.T @ x / x.shape[0]
    res = T.pca(m)
    u, ev = res.rotation, res.eigenvalues
    torch.testing.assert_close(u.T @ u, torch.eye(64, dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.all(ev[:-1] >= ev[1:])
    torch.testing.assert_close(u.T @ m @ u, torch.diag(ev), atol=1e-9, rtol=0)  # diagonalises the moment
    p = T.pca_energy_fractions(ev, 2)
    assert p.sum().item() == pytest.approx(1.0) and p[0] > 0.8
    torch.testing.assert_close(T.shard_energy_fractions(m, u, 2), p)
    # an unrotated basis spreads the energy more evenly than PCA does
    assert T.shard_energy_fractions(m, torch.eye(64, dtype=torch.float64), 2)[0] < p[0]


def _rotations(kind, cfg, sd):
    if kind == "pca":
        moments = ReferenceDeepseek(cfg, sd).latent_second_moments([IDS, IDS[::-1]])
        return {i: T.make_rotation("pca", 512, second_moment=m) for i, m in enumerate(moments)}
    if kind == "fit":  # a few optimizer steps: any rotation the fit returns must fold exactly
        from sglang_tpla.rotation_fit import fit_rotation

        moments = ReferenceDeepseek(cfg, sd).latent_second_moments([IDS, IDS[::-1]])
        return {i: fit_rotation(m, m, 2, steps=3, seed=3)[0] for i, m in enumerate(moments)}
    return T.make_rotation(kind, 512, seed=3)


@pytest.mark.parametrize("kind", T.TRANSFORM_KINDS)
@pytest.mark.parametrize("q_lora_rank", [192, None], ids=["v3-layout", "v2-lite-layout"])
def test_folded_unsliced_model_equals_original(kind, q_lora_rank):
    cfg = tiny_config(q_lora_rank=q_lora_rank)
    sd = random_state_dict(cfg, seed=11)
    folded = T.fold_state_dict(sd, _rotations(kind, cfg, sd))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        assert torch.equal(folded[p + "kv_a_layernorm.weight"], torch.ones(512))
        assert torch.equal(folded[p + "kv_a_proj_with_mqa.weight"][512:], sd[p + "kv_a_proj_with_mqa.weight"][512:])
        # the fold really changed the latent weights (gamma is absorbed even for 'none')
        assert not torch.allclose(folded[p + "kv_b_proj.weight"], sd[p + "kv_b_proj.weight"])
    base = ReferenceDeepseek(cfg, sd).score(IDS, 7, AttentionMode("mla"))
    got = ReferenceDeepseek(cfg, folded).score(IDS, 7, AttentionMode("mla"))
    torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-5 * base.abs().max().item())


def test_folded_model_equals_original_in_hf_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=12)
    folded = T.fold_state_dict(sd, T.make_rotation("hadamard", 512, seed=5))
    out = []
    for name, weights in (("orig", sd), ("folded", folded)):
        save_model(tmp_path / name, cfg, weights)
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / name), torch_dtype=torch.float32).eval()
        with torch.no_grad():
            out.append(model(torch.tensor([IDS])).logits[0])
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5 * out[0].abs().max().item())


def test_rotation_changes_tpla_but_not_mla():
    """Folding is exact for MLA; for TPLA the basis matters, which is the point of the transform."""
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=13)
    a = ReferenceDeepseek(cfg, T.fold_state_dict(sd, T.make_rotation("none", 512)))
    b = ReferenceDeepseek(cfg, T.fold_state_dict(sd, T.make_rotation("hadamard", 512, seed=1)))
    mode = AttentionMode("pd_sep", g=2)
    assert (a.score(IDS, 6, mode)[6:] - b.score(IDS, 6, mode)[6:]).abs().max() > 1e-3


def test_fold_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no MLA layers"):
        T.fold_state_dict({"lm_head.weight": torch.zeros(2, 2)}, torch.eye(512))
    with pytest.raises(ValueError, match="rotation must be"):
        T.fold_layer(torch.zeros(576, 8), torch.ones(512), torch.zeros(16, 512), torch.eye(256))
    with pytest.raises(ValueError, match="unknown TPLA transform"):
        T.make_rotation("svd", 512)
    with pytest.raises(ValueError, match="calibration"):
        T.make_rotation("pca", 512)
