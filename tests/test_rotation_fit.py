"""The ``fit`` transform's math (sglang_tpla.rotation_fit) and its place in the calibration file."""

import pytest
import torch

from sglang_tpla import rotation_fit as RF
from sglang_tpla.calibration import Calibration, CalibrationError, ModelIdentity
from sglang_tpla.config import TPLAConfigError, from_sources, validate_for_model
from sglang_tpla.transforms import randomized_hadamard

D = 512


def _stats(seed=0, rank=24):
    """Keys and queries that share a few strong directions (what trained MLA latents look like)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, rank, generator=gen, dtype=torch.float64))[0]
    strength = torch.linspace(3.0, 0.3, rank, dtype=torch.float64)
    key_cov = (basis * strength**2) @ basis.T + 0.01 * torch.eye(D, dtype=torch.float64)
    q_dirs = basis @ torch.randn(rank, rank, generator=gen, dtype=torch.float64) * 0.5
    query_moment = q_dirs @ q_dirs.T + 0.01 * torch.eye(D, dtype=torch.float64)
    mean = basis[:, 0] * 2.0
    return key_cov, query_moment, mean


@pytest.mark.parametrize("g", [2, 4])
def test_error_formula_matches_monte_carlo(g):
    """sum_j E_q Var_k[g s_j - s] / (g E_q Var_k[s]) estimated from independent samples."""
    c, q, m = _stats(1)
    u = randomized_hadamard(D, 5)
    gen = torch.Generator().manual_seed(2)
    nq, nk = 64, 4000
    a = torch.randn(nq, D, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(q).T
    k = m + torch.randn(nk, D, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(c).T
    ar, kr = a @ u, k @ u
    s = a @ k.T  # [nq, nk]
    w = D // g
    num = 0.0
    for j in range(g):
        sj = ar[:, j * w : (j + 1) * w] @ kr[:, j * w : (j + 1) * w].T
        num += float((g * sj - s).var(dim=1).mean())
    mc = num / (g * float(s.var(dim=1).mean()))
    exact = float(RF.shard_logit_error(c, q, u, g))
    print(f"g={g}: formula {exact:.4f}, Monte Carlo {mc:.4f}")
    assert mc == pytest.approx(exact, rel=0.1)


@pytest.mark.parametrize("g", [2, 4])
def test_fit_lowers_the_error_and_stays_orthogonal(g):
    c, q, _ = _stats(3)
    u, start, end = RF.fit_rotation(c, q, g, steps=25, seed=0)
    print(f"g={g}: Hadamard {start:.4f} -> fit {end:.4f}")
    assert start == pytest.approx(float(RF.shard_logit_error(c, q, randomized_hadamard(D, 0), g)))
    assert end < 0.5 * start
    torch.testing.assert_close(u.T @ u, torch.eye(D, dtype=torch.float64), atol=1e-10, rtol=0)
    again, _, _ = RF.fit_rotation(c, q, g, steps=25, seed=0)
    assert torch.equal(u, again)  # deterministic: every rank and both PD nodes load the same file anyway


def _calibration(layers=2, with_stats=True):
    ident = ModelIdentity("DeepseekV3ForCausalLM", D, layers, "0" * 64)
    stats = [_stats(10 + i) for i in range(layers)]
    moments = [c + torch.outer(m, m) for c, _, m in stats]
    kw = {"key_means": [m for _, _, m in stats], "query_moments": [q for _, q, _ in stats]} if with_stats else {}
    return Calibration.from_moments(ident, moments, 1000, **kw)


def test_fitted_rotations_round_trip(tmp_path):
    cal = RF.fit_calibration(_calibration(), [2], steps=5, log=lambda m: None)
    path = cal.save(tmp_path / "c.pt")
    back = Calibration.load(path)
    assert sorted(back.fitted) == [2]
    for a, b in zip(back.rotations_for("fit", 2), cal.fitted[2]):
        assert torch.equal(a, b)
    assert back.rotations_for("pca", None) is back.rotations
    p = back.shard_energy_fractions(0, 2, "fit")
    assert p.shape == (2,) and float(p.sum()) == pytest.approx(1.0)
    with pytest.raises(CalibrationError, match=r"no fitted rotation for g=4.*rotation_fit --calibration FILE --g 4"):
        back.rotations_for("fit", 4)


def test_fit_needs_format_3_statistics(tmp_path):
    with pytest.raises(CalibrationError, match="key means / query moments.*recreate it"):
        RF.fit_calibration(_calibration(with_stats=False), [2], steps=1, log=lambda m: None)


def test_cli_adds_fits_to_a_file(tmp_path, capsys):
    path = _calibration().save(tmp_path / "c.pt")
    assert RF.main(["--calibration", str(path), "--g", "2", "4", "--steps", "3"]) == 0
    assert sorted(Calibration.load(path).fitted) == [2, 4]
    assert RF.main(["--calibration", str(path), "--g", "3"]) == 2
    assert "divide kv_lora_rank" in capsys.readouterr().err
    plain = _calibration(with_stats=False).save(tmp_path / "old.pt")
    assert RF.main(["--calibration", str(plain), "--g", "2"]) == 2


class _HF:
    kv_lora_rank, qk_rope_head_dim, num_attention_heads, architectures = 512, 64, 4, ["DeepseekV3ForCausalLM"]


def test_fit_transform_config(tmp_path):
    f = tmp_path / "c.pt"
    f.write_bytes(b"x")
    with pytest.raises(TPLAConfigError, match="g must be given explicitly"):
        validate_for_model(from_sources({"transform": "fit", "calibration": str(f)}, {}), _HF, 2)
    with pytest.raises(TPLAConfigError, match="needs a calibration file"):
        validate_for_model(from_sources({"transform": "fit", "g": 2}, {}), _HF, 2)
    cfg = from_sources({"transform": "fit", "g": 2, "calibration": str(f)}, {})
    assert validate_for_model(cfg, _HF, 2).g == 2
    assert cfg.fingerprint().startswith("fit:g=2:sha256=")
    assert cfg.fingerprint() != from_sources({"transform": "fit", "g": 4, "calibration": str(f)}, {}).fingerprint()


def test_pd_launch_gives_both_nodes_the_fit_g():
    from sglang_tpla.pd_launch import PDSpec

    spec = PDSpec(model_path="m", decode_tp=2, transform="fit", calibration="c.pt")
    assert spec.tpla_options(decode=False)["g"] == 2 == spec.tpla_options(decode=True)["g"]
    assert "g" not in PDSpec(model_path="m", transform="hadamard").tpla_options(decode=False)
