"""Real SGLang servers on CPU at TP=1: the tpla backend with g=1 is exact MLA."""

import pytest

from sglang_tpla.reference_model import AttentionMode
from sglang_tpla.serving import ServerProcess

from serving_utils import BUDGET, FP32, NEW_TOKENS, PROMPTS, reference, served_vs_reference, tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    mla = ServerProcess(model_dir, tp=1, env=BUDGET, args=FP32, log_path=logs / "mla.log", name="mla-tp1")
    tpla = ServerProcess(model_dir, tp=1, env=BUDGET, args=FP32 + ["--decode-attention-backend", "tpla"], log_path=logs / "tpla.log", name="tpla-tp1")
    mla.start(), tpla.start()
    try:
        yield mla.wait_ready(), tpla.wait_ready()
    finally:
        mla.stop(), tpla.stop()


def test_stock_mla_on_cpu_platform_matches_fp32_reference(servers, model_dir):
    mla, _ = servers
    rows = served_vs_reference(mla, reference(model_dir), AttentionMode("mla"))
    assert rows[1][0] >= 6, "second prompt should reuse the cached 6-token prefix"
    for cached, equal, diff in rows:
        assert equal and diff < 1e-4, rows


def test_tpla_g1_equals_stock_mla(servers):
    mla, tpla = servers
    assert "TPLA on: attn TP 1, g=1" in tpla.log_text()
    assert "TPLA attention backend: implementation 'torch'" in tpla.log_text()
    for prompt in PROMPTS:
        t_mla, lp_mla, _ = mla.generate(prompt, NEW_TOKENS)
        t_tpla, lp_tpla, _ = tpla.generate(prompt, NEW_TOKENS)
        assert t_tpla == t_mla
        assert max(abs(a - b) for a, b in zip(lp_mla, lp_tpla)) < 1e-4
