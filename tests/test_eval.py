"""The fidelity evaluation end to end (reduced): real TP=2 servers on the trained asset,
teacher-forced decode over its held-out text.

Runs ``sglang_tpla.eval`` on ``tests/assets/tiny-deepseek-trained`` (2 held-out documents,
24-token prompts, 24 forced decode steps) and checks

* the teacher-forcing mechanism: the served full next-token distributions at every forced
  position equal the fp32 reference's teacher-forced ``score`` (MLA server vs mode ``mla``,
  pd-sep server vs ``pd_sep``, TPLA-everywhere server vs ``tpla``), so the returned log-probs
  are the model's, not the forcing processor's, and every forced position after the first
  is a decode step;
* the ordering the issue asks for, on the trained model: pd-sep strictly better than TPLA everywhere (KL 1.04e-2 vs 1.13e-2
  in the fp32 reference on these documents; served = reference to ~1e-5, so the outcome is
  deterministic).  Exact RMSNorm is NOT better than the slice-local one on this model (reference
  KL 1.04e-2 exact vs 8.5e-3 local here; also in the full evaluation): reported in the README,
  not asserted.

g=1 (the Hadamard-folded, unsliced model) equal to stock MLA is served in ``test_serving_tp1.py`` (and on
FP8 weights in ``test_serving_fp8.py``); it is not repeated here, to spare a server.
"""

import json
from pathlib import Path

import pytest
import torch

from sglang_tpla.eval import run_eval
from sglang_tpla.reference_model import AttentionMode

from serving_utils import reference, tpla_mode

pytestmark = pytest.mark.slow

TOL = 1e-4  # fp32 server vs fp32 reference (log-probabilities), as in test_serving_tp2


@pytest.fixture(scope="module")
def model_dir():
    path = Path(__file__).parent / "assets" / "tiny-deepseek-trained"
    if not (path / "model.safetensors").exists():
        pytest.skip("trained asset not present")
    return path


@pytest.fixture(scope="module")
def result(model_dir, tmp_path_factory):
    variants = ["hadamard:2:pd_sep", "hadamard:2:tpla"]
    argv = ["--model-path", str(model_dir), "--tp", "2", "--num-docs", "2", "--prompt-len", "24", "--gen-len", "24",
            "--data", "heldout", "--out", str(tmp_path_factory.mktemp("eval"))]
    for v in variants:
        argv += ["--variant", v]
    return run_eval(argv)


def _row(result, name):
    return next(r for r in result["results"] if r["variant"] == name)


def test_reports_written(result):
    out = Path(result["meta"]["out"])
    for f in ("results.md", "results.json", "kl_agreement_vs_position.png"):
        assert (out / f).stat().st_size > 0, f
    assert json.loads((out / "results.json").read_text())["results"][0]["variant"] == "MLA"
    names = [r["variant"] for r in result["results"]]
    assert names[0] == "MLA" and "hadamard g=2 pd-sep" in names and "hadamard g=2 tpla-everywhere" in names


@pytest.mark.parametrize(
    "name,kind,transform",
    [("MLA", "mla", "none"), ("hadamard g=2 pd-sep", "pd_sep", "hadamard"), ("hadamard g=2 tpla-everywhere", "tpla", "hadamard")],
)
def test_forced_decode_distributions_match_reference(result, model_dir, name, kind, transform):
    ref = reference(model_dir, transform, seed=0)
    mode = AttentionMode("mla") if kind == "mla" else tpla_mode(kind, 2, ref)
    run = result["runs"][name]
    worst = 0.0
    for doc, dist in zip(result["docs"], run.dists):
        ids, p = doc["prompt"] + doc["continuation"], len(doc["prompt"])
        want = torch.log_softmax(ref.score(ids, p, mode).double(), -1)[p - 1 : len(ids) - 1]
        assert dist.shape == want.shape and torch.isfinite(dist).all()
        worst = max(worst, float((dist - want).abs().max()))
    print(f"{name}: max |served - reference| over the full distribution, all forced positions: {worst:.2e}")
    assert worst < TOL


def test_pd_sep_no_worse_than_tpla_everywhere(result):
    pd, tp = _row(result, "hadamard g=2 pd-sep"), _row(result, "hadamard g=2 tpla-everywhere")
    print(f"KL pd-sep {pd['kl_mean']:.3e} vs everywhere {tp['kl_mean']:.3e}; top-1 {pd['top1_agreement']:.3f} vs {tp['top1_agreement']:.3f}")
    assert pd["kl_mean"] > 0  # decode is approximate
    assert pd["kl_mean"] < tp["kl_mean"]
