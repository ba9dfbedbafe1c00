"""Bad TPLA settings are refused when the real server starts, with a message that names the fix;
and dummy weights (``--load-format dummy``) still get the TPLA fold and re-slicing."""

import pytest

from sglang_tpla.serving import ServerProcess
from sglang_tpla.tiny_model import save_tokenizer

from serving_utils import BUDGET, FP32, tiny_model

pytestmark = pytest.mark.slow

TPLA = ["--decode-attention-backend", "tpla"]


def _llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return save_tokenizer(path, 512)


def test_bad_settings_refused_at_start(tmp_path_factory):
    model = tiny_model(tmp_path_factory)
    logs = tmp_path_factory.mktemp("logs")
    llama = _llama(tmp_path_factory.mktemp("llama") / "model")
    cases = {
        "g3": (model, 2, ["--json-model-override-args", '{"tpla": {"g": 3}}'], "must divide the TP size tp=2; choose g in [1, 2]"),
        "pca-missing": (model, 1, ["--json-model-override-args", '{"tpla": {"transform": "pca", "calibration": "/nonexistent/t.pt"}}'],
                        "calibration file '/nonexistent/t.pt' does not exist"),
        "non-mla": (llama, 1, [], "TPLA needs an MLA model"),
        "mixed-chunk": (model, 1, ["--enable-mixed-chunk"], "mixed chunks (--enable-mixed-chunk"),
    }
    servers = {
        name: ServerProcess(path, tp=tp, env=BUDGET, args=FP32 + TPLA + extra, log_path=logs / f"{name}.log", name=name).start()
        for name, (path, tp, extra, _) in cases.items()
    }
    dummy = ServerProcess(model, tp=2, env=BUDGET, args=FP32 + TPLA + ["--load-format", "dummy"], log_path=logs / "dummy.log", name="dummy")
    try:
        with dummy:
            toks, _, _ = dummy.generate([5, 6, 7], 4)
            assert len(toks) == 4
            assert dummy.log_text().count("TPLA: folded transform hadamard:seed=0 into 2 layers") == 2  # both ranks
        for name, (_, _, _, needle) in cases.items():
            code = servers[name].wait_exit(timeout=600)
            log = servers[name].log_text()
            assert code != 0, f"{name}: server started although it should have been refused"
            assert needle in log, f"{name}: expected {needle!r} in:\n{servers[name].log_tail()}"
    finally:
        for s in [*servers.values(), dummy]:
            s.stop()
