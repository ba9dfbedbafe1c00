"""Fast unit tests of the fidelity-evaluation metrics and variant planning (no server)."""

import math

import pytest
import torch

from sglang_tpla import eval_metrics as M
from sglang_tpla.eval import build_parser, parse_variant_spec, plan_variants


def test_kl_zero_for_equal_and_matches_closed_form():
    logp = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64), -1)
    assert M.kl_per_position(logp, logp).abs().max() < 1e-12
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert M.kl_per_position(p.log(), q.log()).item() == pytest.approx(want, rel=1e-12)
    # asymmetric
    assert M.kl_per_position(q.log(), p.log()).item() != pytest.approx(want)


def test_kl_ignores_zero_probability_terms():
    p = torch.tensor([[1.0, 0.0]], dtype=torch.float64).log()  # -inf entry
    q = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    assert M.kl_per_position(p, q).item() == pytest.approx(math.log(2))


def test_dense_logprobs_from_sglang_top_logprobs():
    rows = [[(-0.1, 2, None), (-2.0, 0, None)], [(-0.5, 1, "x")]]
    d = M.dense_logprobs(rows, 3)
    assert d.shape == (2, 3)
    assert d[0, 2] == -0.1 and d[0, 0] == -2.0 and d[0, 1] == float("-inf")
    assert d[1, 1] == -0.5


def test_top1_agreement_and_perplexity():
    a = torch.tensor([[0.1, 0.9], [0.8, 0.2]]).log()
    b = torch.tensor([[0.3, 0.7], [0.4, 0.6]]).log()
    assert M.top1_agreement(a, b).tolist() == [1.0, 0.0]
    assert M.perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    assert math.isnan(M.perplexity([]))


def test_first_divergence_and_equal_fraction():
    assert M.first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert M.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert M.first_divergence([9], [1]) == 0
    assert M.first_divergence([1, 2], [1, 2, 3]) == 2
    assert M.equal_fraction([1, 2, 3, 4], [1, 5, 3, 6]) == 0.5
    assert M.equal_fraction([1, 2], [1, 2]) == 1.0


def test_buckets_and_bins():
    vals = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert M.early_late_edges(5) == [0, 2, 5]
    assert M.bucket_means(vals, [0, 2, 5]) == [0.5, 3.0]
    assert math.isnan(M.bucket_means(vals, [0, 0, 5])[0])
    x, y = M.binned(list(range(8)), 4)
    assert x == [0.5, 2.5, 4.5, 6.5] and y == [0.5, 2.5, 4.5, 6.5]
    assert M.binned([], 4) == ([], [])


def test_variant_planning_skips_with_reasons():
    args = build_parser().parse_args(["--model-path", "m", "--tp", "2", "--g", "2", "4", "--out", "o"])
    run, skipped = plan_variants(args)
    names = [v.name for v in run]
    assert "hadamard g=1 pd-sep" in names and "hadamard g=2 pd-sep" in names and "hadamard g=2 tpla-everywhere" in names
    assert not any("g=4" in n for n in names)
    reasons = {s["variant"]: s["reason"] for s in skipped}
    assert any("g=4" in k and "TP" in v for k, v in reasons.items())
    assert "pca needs --calibration" in reasons["pca g=2 pd-sep"]
    tpla = next(v for v in run if v.name == "hadamard g=2 tpla-everywhere")
    assert tpla.tpla == {"g": 2, "transform": "hadamard", "seed": 0, "prefill": "tpla", "mu": "inv_p"} and tpla.mode == "tpla"
    assert "hadamard g=2 pd-sep mu=one" in names  # the unscaled row next to the default
    ident = next(v for v in run if v.name == "identity g=2 pd-sep")
    assert ident.tpla["transform"] == "none"  # the config's name for the checkpoint's own basis
    assert parse_variant_spec("hadamard:2:pd_sep") == ("hadamard", 2, "pd_sep", "exact", "inv_p")
    assert parse_variant_spec("pca:4:tpla:local:inv_p") == ("pca", 4, "tpla", "local", "inv_p")


def test_reference_modes_of_calibrated_variants(tmp_path):
    """pca / fit variants are checked against the reference folded with the file's own rotations,
    with mu inv_p from the shard energies in that basis; a fit missing for g is skipped."""
    from sglang_tpla.calibration import Calibration, ModelIdentity
    from sglang_tpla.eval import make_variant, reference_mode
    from sglang_tpla.rotation_fit import fit_calibration

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 512, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.1, 512, dtype=torch.float64)
    q = torch.randn(2000, 512, generator=gen, dtype=torch.float64)
    ident = ModelIdentity("DeepseekV3ForCausalLM", 512, 2, "0" * 64)
    cal = Calibration.from_moments(ident, [x.T @ x / 2000] * 2, 2000, key_means=[x.mean(0)] * 2, query_moments=[q.T @ q / 2000] * 2)
    fit_calibration(cal, [2], steps=2, log=lambda m: None)
    path = cal.save(tmp_path / "c.pt")

    key, rots, mode = reference_mode(make_variant("fit", 2, "pd_sep", calibration=path), 2, cal)
    assert key == "fit:g=2" and rots is cal.fitted[2]
    energy = (x @ cal.fitted[2][0].double()).pow(2).sum(0)  # p_j measured on the data, not from the file's moments
    want = [float(energy.sum() / energy[:256].sum()), float(energy.sum() / energy[256:].sum())]
    assert torch.allclose(torch.tensor(mode.mu), torch.tensor([want, want]), rtol=1e-9), (mode.mu, want)
    key, rots, mode = reference_mode(make_variant("pca", 2, "pd_sep", calibration=path), 2, cal)
    assert key == "pca" and rots is cal.rotations and mode.mu[0][1] > mode.mu[0][0]  # the weak shard is scaled up
    key, rots, mode = reference_mode(make_variant("hadamard", 2, "tpla", mu="one"), 2, None)
    assert key == "hadamard" and rots is None and mode.mu is None and mode.kind == "tpla"
    assert reference_mode(make_variant("pca", 2, "pd_sep", calibration=path), 2, None) is None

    args = build_parser().parse_args(["--model-path", "m", "--tp", "4", "--g", "2", "4", "--calibration", str(path), "--out", "o"])
    run, skipped = plan_variants(args)
    names = [v.name for v in run]
    assert "fit g=2 pd-sep" in names and "fit g=2 tpla-everywhere" in names and "pca g=4 pd-sep mu=lsq" not in names
    assert "no fitted rotation for g=4" in {s["variant"]: s["reason"] for s in skipped}["fit g=4 pd-sep"]
