"""Calibration CLI (error paths), format 2 with logit pairs, and the least-squares logit scales."""

import json

import pytest
import torch

from sglang_tpla import calibrate
from sglang_tpla.calibration import (
    Calibration,
    CalibrationError,
    ModelIdentity,
    lsq_logit_scales,
    lsq_normal_equations,
    solve_normal_equations,
)
from sglang_tpla.config import TPLAConfigError, from_sources
from sglang_tpla.tiny_model import build_tiny_model_dir
from sglang_tpla.transforms import make_rotation


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=1)


def _cli(model_dir, data, out, *extra):
    return calibrate.main(["--model-path", str(model_dir), "--data", str(data), "--out", str(out), *extra])


def test_bad_data_is_refused_with_a_fix(model_dir, tmp_path):
    out = tmp_path / "c.pt"
    with pytest.raises(calibrate.CalibrateError, match="cannot read --data"):
        _cli(model_dir, tmp_path / "missing.txt", out, "--num-tokens", "10")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(calibrate.CalibrateError, match="holds no text"):
        _cli(model_dir, tmp_path / "empty.txt", out, "--num-tokens", "10")
    (tmp_path / "bad.jsonl").write_text('{"text": "w5 w6"}\n{"txt": "w7"}\n')
    with pytest.raises(calibrate.CalibrateError, match='line 2 has no string "text"'):
        _cli(model_dir, tmp_path / "bad.jsonl", out, "--num-tokens", "10")
    (tmp_path / "notjson.jsonl").write_text("{oops\n")
    with pytest.raises(calibrate.CalibrateError, match="line 1 is not JSON"):
        _cli(model_dir, tmp_path / "notjson.jsonl", out, "--num-tokens", "10")
    assert not out.exists()


def test_too_few_tokens_says_how_many(model_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "w5 w6 w7"}) + "\n" + json.dumps({"text": "w8 w9"}) + "\n")
    with pytest.raises(calibrate.CalibrateError, match=r"only 5 tokens but --num-tokens is 100.*--num-tokens 5 or less"):
        _cli(model_dir, tmp_path / "d.jsonl", tmp_path / "c.pt", "--num-tokens", "100")


def test_non_mla_model_is_refused(tmp_path):
    m = tmp_path / "llama"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}))
    (tmp_path / "d.txt").write_text("hello world")
    with pytest.raises(calibrate.CalibrateError, match="LlamaForCausalLM.*not an MLA model.*kv_lora_rank"):
        _cli(m, tmp_path / "d.txt", tmp_path / "c.pt", "--num-tokens", "2")


def test_windows_are_exact():
    w = calibrate.make_windows(list(range(100)), 25, 10)
    assert [len(x) for x in w] == [10, 10, 5] and sum(w, []) == list(range(25))


def _pairs(n=300, r=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(2.0, 0.1, r)  # anisotropic, so shards differ
    q = torch.randn(n, r, generator=g) * scale
    k = torch.randn(n, r, generator=g) * scale
    k = k / k.pow(2).mean(-1, keepdim=True).sqrt()
    return q, k


@pytest.mark.parametrize("norm", ["exact", "local"])
@pytest.mark.parametrize("g", [2, 4])
def test_lsq_fit_equals_direct_lstsq(g, norm):
    q, k = _pairs()
    rot = make_rotation("hadamard", 512, seed=3)
    p = torch.tensor([0.4, 0.6]) if g == 2 else None
    mu = lsq_logit_scales(q, k, g, rot, norm, p)
    # direct: rotate, build the partial logits, and solve each shard's 1-column least squares
    a, u = q.double() @ rot.double(), k.double() @ rot.double()
    s = (q.double() * k.double()).sum(-1)
    kk = u.view(-1, g, 512 // g)
    if norm == "local":
        pp = torch.full((g,), 1.0 / g, dtype=torch.float64) if p is None else p.double()
        kk = kk * torch.rsqrt(kk.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.sqrt(g * pp)[:, None]
    big_a = (a.view(-1, g, 512 // g) * kk).sum(-1)
    direct = torch.stack([torch.linalg.lstsq(big_a[:, j : j + 1], s.unsqueeze(-1)).solution[0, 0] for j in range(g)])
    print(f"g={g} norm={norm} lsq mu={mu.tolist()}")
    torch.testing.assert_close(mu, direct, rtol=1e-9, atol=1e-9)
    # the joint fit sum_j mu_j s_j ~ s: equals torch's lstsq on A, and is exactly 1 with exact norm
    joint = solve_normal_equations(*lsq_normal_equations(q, k, g, rot, norm, p))
    torch.testing.assert_close(joint, torch.linalg.lstsq(big_a, s.unsqueeze(-1)).solution.squeeze(-1), rtol=1e-7, atol=1e-7)
    if norm == "exact":
        torch.testing.assert_close(joint, torch.ones(g, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_lsq_depends_on_the_basis_and_pca_energy_shows():
    q, k = _pairs()
    plain = lsq_logit_scales(q, k, 2)
    had = lsq_logit_scales(q, k, 2, make_rotation("hadamard", 512, seed=0))
    # original basis: shard 0 holds most energy (scale decreasing), so mu_0 < mu_1
    assert plain[0] < plain[1] and not torch.allclose(plain, had, rtol=1e-3)


def test_format2_roundtrip_and_fail_closed(tmp_path):
    ident = ModelIdentity("DeepseekV3ForCausalLM", 512, 2, "a" * 64)
    q, k = _pairs()
    m = [(k.double().T @ k.double()) / k.shape[0]] * 2
    cal = Calibration.from_moments(ident, m, 300, lsq_pairs=([q, q], [k, k]))
    back = Calibration.load(cal.save(tmp_path / "c.pt"), expect=ident)
    assert back.has_lsq
    torch.testing.assert_close(back.lsq_logit_scales(1, 2), lsq_logit_scales(q, k, 2))
    scales = back.logit_scales("lsq", 2)
    assert len(scales) == 2 and len(scales[0]) == 2
    assert back.logit_scales("inv_p", 4) == [[4.0] * 4] * 2 and back.logit_scales("one", 2) is None
    no_pairs = Calibration.from_moments(ident, m, 300)
    no_pairs = Calibration.load(no_pairs.save(tmp_path / "n.pt"))
    with pytest.raises(CalibrationError, match="no logit pairs.*sglang_tpla.calibrate"):
        no_pairs.lsq_logit_scales(0, 2)


def test_config_norm_and_lsq_options(tmp_path):
    assert from_sources({"norm": "local", "mu": "lsq"}).norm == "local"
    assert from_sources(None, {"SGLANG_TPLA_NORM": "local"}).norm == "local"
    with pytest.raises(TPLAConfigError, match="unknown norm"):
        from_sources({"norm": "slice"})
    from types import SimpleNamespace

    from sglang_tpla.config import validate_for_model

    hf = SimpleNamespace(kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=16, architectures=["X"])
    with pytest.raises(TPLAConfigError, match="mu 'lsq'.*calibration file"):
        validate_for_model(from_sources({"mu": "lsq", "g": 2}), hf, 2)
    with pytest.raises(TPLAConfigError, match="does not exist"):
        validate_for_model(from_sources({"mu": "lsq", "g": 2, "calibration": str(tmp_path / "nope.pt")}), hf, 2)


def test_server_kv_budget_defaults_to_one_gib_on_the_cpu_platform(tmp_path, monkeypatch):
    """Without a budget SGLang's CPU platform sizes the KV pool from all free memory (GBs for a tiny model)."""
    base = ["--model-path", "m", "--data", "d", "--num-tokens", "1", "--out", "o"]
    monkeypatch.delenv("SGLANG_TPLA_CPU_MEM_GB", raising=False)
    args, _ = calibrate.parser().parse_known_args(base)
    env = calibrate.server_env(args, tmp_path)
    assert env["SGLANG_TPLA_CPU_MEM_GB"] == "1" and env["SGLANG_TPLA_CALIBRATE_DIR"] == str(tmp_path)
    monkeypatch.setenv("SGLANG_TPLA_CPU_MEM_GB", "3")
    assert calibrate.server_env(args, tmp_path)["SGLANG_TPLA_CPU_MEM_GB"] == "3"
    args, _ = calibrate.parser().parse_known_args([*base, "--cpu-mem-gb", "0.5"])
    assert calibrate.server_env(args, tmp_path)["SGLANG_TPLA_CPU_MEM_GB"] == "0.5"
