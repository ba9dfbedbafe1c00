"""A real TPLA server at TP=2 (g=2, identity transform) with 3-token prefill chunks: every
chunk after the first is an extend over a cached prefix on the sliced pool."""

import pytest

from sglang_tpla.serving import ServerProcess

from serving_utils import BUDGET, FP32, reference, served_vs_reference, tiny_model, tpla_mode

pytestmark = pytest.mark.slow


def test_tpla_identity_transform_with_chunked_prefill_matches_fp32_reference(tmp_path_factory):
    model_dir = tiny_model(tmp_path_factory, seed=2)
    logs = tmp_path_factory.mktemp("logs")
    args = FP32 + ["--decode-attention-backend", "tpla", "--json-model-override-args", '{"tpla": {"g": 2, "transform": "none"}}',
                   "--chunked-prefill-size", "3"]
    with ServerProcess(model_dir, tp=2, env=BUDGET, args=args, log_path=logs / "tpla-none.log", name="tpla-tp2-none") as srv:
        ref = reference(model_dir, "none")
        rows = served_vs_reference(srv, ref, tpla_mode("pd_sep", 2, ref))
        chunks = srv.log_text().count("Prefill batch")
    print("identity, chunked prefill (cached, tokens equal, max|dlogprob|):", rows, "prefill batches:", chunks)
    assert chunks >= 5  # two prompts of 8 and 9 tokens in 3-token chunks (+ warm-up)
    for cached, equal, diff in rows:
        assert equal and diff < 1e-4, rows
