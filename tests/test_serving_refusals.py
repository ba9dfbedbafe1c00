"""Bad TPLA settings are refused when the real server starts, with a message that names the fix
(those that the server arguments alone decide: at argument resolution, before anything is loaded);
and dummy weights (``--load-format dummy``) still get the TPLA fold and re-slicing."""

import pytest

from sglang_tpla.convert import convert
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


# What a server logs once it got past argument resolution (the resolved arguments) and loaded weights.
LOADED = ("server_args=", "Load weight", "TPLA on")


def test_bad_settings_refused_at_start(tmp_path_factory):
    model = tiny_model(tmp_path_factory)
    logs = tmp_path_factory.mktemp("logs")
    llama = _llama(tmp_path_factory.mktemp("llama") / "model")
    converted = tmp_path_factory.mktemp("converted") / "model"
    convert(model, converted, "hadamard", seed=0)  # config.json records tpla_transform hadamard:seed=0
    none = ["--json-model-override-args", '{"tpla": {"transform": "none"}}']
    # name: (model, tp, args, extra env, expected message, refused at argument resolution before anything loads)
    cases = {
        "g3": (model, 2, TPLA + ["--json-model-override-args", '{"tpla": {"g": 3}}'], {},
               "must divide the TP size tp=2; choose g in [1, 2]", False),
        "pca-missing": (model, 1, TPLA + ["--json-model-override-args", '{"tpla": {"transform": "pca", "calibration": "/nonexistent/t.pt"}}'],
                        {}, "calibration file '/nonexistent/t.pt' does not exist", False),
        "non-mla": (llama, 1, TPLA, {}, "TPLA needs an MLA model", False),
        # patches/server_args.py, before SGLang resolves the arguments
        "mixed-chunk": (model, 1, TPLA + ["--enable-mixed-chunk"], {}, "mixed chunks (--enable-mixed-chunk", True),
        "dp-attention": (model, 2, TPLA + ["--dp-size", "2", "--enable-dp-attention"], {}, "DP attention (--enable-dp-attention", True),
        "dcp": (model, 2, TPLA + ["--dcp-size", "2"], {}, "decode context parallelism (--dcp-size 2)", True),
        "pp": (model, 2, TPLA + ["--pp-size", "2"], {}, "pipeline parallelism (--pp-size 2)", True),
        "speculative": (model, 1, TPLA + ["--speculative-algorithm", "NGRAM"], {}, "speculative decoding (--speculative-algorithm NGRAM)", True),
        "nixl-decode": (model, 1, TPLA + ["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "nixl"], {},
                        "--disaggregation-transfer-backend mooncake|mooncake_tcp (got nixl)", True),
        "env-g-off": (model, 1, [], {"SGLANG_TPLA_G": "2"}, "TPLA options were given (SGLANG_TPLA_G=2) but TPLA is off", True),
        "converted-mismatch": (converted, 1, TPLA + none, {},
                               "converted with transform 'hadamard:seed=0' (tpla_transform in its config.json), but the server "
                               "is configured for 'identity'", True),
    }
    servers = {
        name: ServerProcess(path, tp=tp, env={**BUDGET, **env}, args=FP32 + args, log_path=logs / f"{name}.log", name=name).start()
        for name, (path, tp, args, env, _, _) in cases.items()
    }
    dummy = ServerProcess(model, tp=2, env=BUDGET, args=FP32 + TPLA + ["--load-format", "dummy"], log_path=logs / "dummy.log", name="dummy")
    try:
        with dummy:
            toks, _, _ = dummy.generate([5, 6, 7], 4)
            assert len(toks) == 4
            assert dummy.log_text().count("TPLA: folded transform hadamard:seed=0 into 2 layers") == 2  # both ranks
        for name, (_, _, _, _, needle, early) in cases.items():
            code = servers[name].wait_exit(timeout=600)
            log = servers[name].log_text()
            assert code != 0, f"{name}: server started although it should have been refused"
            assert needle in log, f"{name}: expected {needle!r} in:\n{servers[name].log_tail()}"
            if early:
                assert "TPLAConfigError" in log and not [m for m in LOADED if m in log], (
                    f"{name}: refused only after the arguments were resolved or weights loaded:\n{servers[name].log_tail()}")
    finally:
        for s in [*servers.values(), dummy]:
            s.stop()
