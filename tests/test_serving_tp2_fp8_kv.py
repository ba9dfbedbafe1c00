"""Real SGLang servers on CPU at TP=2 with an fp8 KV cache (``--kv-cache-dtype fp8_e4m3``): TPLA
g=2 against the fp32 reference whose cache rows are rounded through fp8 (scale 1, as SGLang's MLA
pool stores them), and the KV capacity against stock MLA with the same fp8 cache."""

import pytest
import torch

from sglang_tpla.reference_model import AttentionMode
from sglang_tpla.serving import ServerProcess

from serving_utils import BUDGET, FP32, reference, served_vs_reference, tiny_model, tpla_mode

pytestmark = pytest.mark.slow

FP8 = ["--kv-cache-dtype", "fp8_e4m3"]
# Served vs reference, max |logprob difference| over 10 decode steps.  Both round the same rows
# through fp8 (observed ~2e-6: the fp32 stack); a row value on an fp8 rounding boundary could land
# on the neighbouring code in a different summation order, hence the margin.
TOL = 1e-4


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model_dir = tiny_model(tmp_path_factory, seed=2)
    logs = tmp_path_factory.mktemp("logs")
    mla = ServerProcess(model_dir, tp=2, env=BUDGET, args=FP32 + FP8, log_path=logs / "mla-fp8.log", name="mla-fp8")
    tpla = ServerProcess(
        model_dir, tp=2, env=BUDGET, log_path=logs / "tpla-fp8.log", name="tpla-fp8",
        args=FP32 + FP8 + ["--decode-attention-backend", "tpla", "--json-model-override-args", '{"tpla": {"g": 2, "transform": "hadamard"}}'],
    )  # fmt: skip
    mla.start(), tpla.start()
    try:
        yield model_dir, mla.wait_ready(), tpla.wait_ready()
    finally:
        mla.stop(), tpla.stop()


def test_fp8_kv_tpla_matches_the_fp8_rounded_reference(servers):
    model_dir, _, tpla = servers
    ref = reference(model_dir, "hadamard", seed=0)
    mode = tpla_mode("pd_sep", 2, ref, kv_dtype=torch.float8_e4m3fn)
    rows = served_vs_reference(tpla, ref, mode)
    print("fp8 KV TPLA g=2 vs fp8-rounded fp32 reference (cached, tokens equal, max|dlogprob|):", rows)
    assert rows[1][0] >= 6, "second prompt should reuse the cached prefix"
    for cached, equal, diff in rows:
        assert equal and diff < TOL, rows
    unrounded = served_vs_reference(tpla, ref, tpla_mode("pd_sep", 2, ref))
    print("... vs the reference without fp8 rounding:", unrounded)
    assert max(r[2] for r in unrounded) > max(r[2] for r in rows), "the fp8 rounding should be visible"


def test_stock_mla_with_fp8_kv_matches_the_same_rounding_model(servers):
    """The reference's fp8 model (rows rounded, scale 1) is what stock SGLang MLA does too."""
    model_dir, mla, _ = servers
    ref = reference(model_dir)
    rows = served_vs_reference(mla, ref, AttentionMode("mla", kv_dtype=torch.float8_e4m3fn))
    print("fp8 KV stock MLA vs fp8-rounded fp32 reference:", rows)
    for cached, equal, diff in rows:
        assert equal and diff < TOL, rows


def test_fp8_kv_capacity(servers):
    _, mla, tpla = servers
    n_mla, n_tpla = mla.max_total_num_tokens(), tpla.max_total_num_tokens()
    print(f"fp8 KV, max_total_num_tokens at the same budget: MLA {n_mla} (576 B/token), TPLA g=2 {n_tpla} (320 B/token), "
          f"{n_tpla / n_mla:.3f}x")
    assert n_tpla >= 0.98 * 576 / 320 * n_mla
