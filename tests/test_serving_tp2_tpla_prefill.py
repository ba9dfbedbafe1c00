"""TPLA everywhere (``prefill: tpla``, the paper's plain TPLA) through a real TP=2 server:
prompt tokens also attend over each rank's latent slice with their own softmax, like decode.
Checked against the fp32 reference's ``tpla`` mode, with a radix-cache prefix hit."""

import pytest

from sglang_tpla.config import TPLAConfigError, from_sources
from sglang_tpla.serving import ServerProcess

from serving_utils import BUDGET, FP32, reference, served_vs_reference, tiny_model, tpla_mode


def test_prefill_option_parsing():
    assert from_sources(None, {}).prefill == "exact"
    assert from_sources({"prefill": "tpla"}).prefill == "tpla"
    assert from_sources(None, {"SGLANG_TPLA_PREFILL": "tpla"}).prefill == "tpla"
    with pytest.raises(TPLAConfigError, match="prefill"):
        from_sources({"prefill": "mla"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory, seed=2)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    srv = ServerProcess(
        model_dir, tp=2, env=BUDGET, log_path=logs / "tpla-everywhere.log", name="tpla-everywhere-tp2",
        args=FP32 + ["--decode-attention-backend", "tpla", "--json-model-override-args",
                     '{"tpla": {"g": 2, "transform": "hadamard", "prefill": "tpla"}}'],
    )
    with srv:
        yield srv


@pytest.mark.slow
def test_tpla_everywhere_matches_fp32_reference(server, model_dir):
    ref = reference(model_dir, "hadamard", seed=0)
    rows = served_vs_reference(server, ref, tpla_mode("tpla", 2, ref))
    print("tpla everywhere (cached, tokens equal, max|dlogprob|):", rows)
    assert rows[1][0] >= 6, "second prompt should reuse the cached prefix (TPLA extend over the sliced pool)"
    for cached, equal, diff in rows:
        assert equal and diff < 1e-4, rows
    # and it is not pd-sep: the first token (from the prefill) already differs from exact MLA
    pd_sep = served_vs_reference(server, ref, tpla_mode("pd_sep", 2, ref))
    assert max(d for _, _, d in pd_sep) > 1e-3, pd_sep
