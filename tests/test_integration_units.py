"""SGLang-facing pieces that need no server: config validation, the launcher, the pool, hook targets."""

import importlib
import json
from types import SimpleNamespace

import pytest
import torch

from sglang_tpla.config import TPLAConfigError, from_sources, validate_for_model
from sglang_tpla.launch_server import translate

HF = SimpleNamespace(kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=8, architectures=["DeepseekV3ForCausalLM"])


def test_config_sources_json_wins_over_env():
    cfg = from_sources({"g": 2}, {"SGLANG_TPLA_G": "4", "SGLANG_TPLA_TRANSFORM": "none"})
    assert (cfg.g, cfg.transform) == (2, "none")
    assert from_sources(None, {}).transform == "hadamard" and from_sources(None, {}).g is None
    assert validate_for_model(from_sources(None, {}), HF, 2).g == 2  # g defaults to the attention TP size


@pytest.mark.parametrize(
    "opts,tp,hf,needle",
    [
        ({"g": 3}, 2, HF, "must divide the TP size tp=2"),
        ({"g": 16}, 16, SimpleNamespace(**{**HF.__dict__, "num_attention_heads": 16}), "slice width"),
        ({"transform": "pca"}, 2, HF, "needs a calibration file"),
        ({"transform": "pca", "calibration": "/nonexistent.pt"}, 2, HF, "does not exist"),
        ({"transform": "svd"}, 2, HF, "unknown transform"),
        ({"frobnicate": 1}, 2, HF, "unknown option"),
        ({}, 2, SimpleNamespace(num_attention_heads=8, architectures=["LlamaForCausalLM"]), "needs an MLA model"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(opts, tp, hf, needle):
    with pytest.raises(TPLAConfigError, match=needle):
        validate_for_model(from_sources(opts, {}), hf, tp)


def test_unsupported_sglang_features_are_refused():
    from sglang_tpla.config import check_server_compat

    check_server_compat()  # plain TP is fine
    for kwargs, needle in (
        (dict(attn_dp_size=2), "DP attention (--attn-dp-size 2"),
        (dict(dcp_size=4), "--dcp-size 4"),
        (dict(pp_size=2), "--pp-size 2"),
        (dict(speculative_algorithm="EAGLE"), "speculative decoding"),
        (dict(enable_mixed_chunk=True), "--enable-mixed-chunk"),
    ):
        with pytest.raises(TPLAConfigError, match="does not support") as e:
            check_server_compat(**kwargs)
        assert needle in str(e.value)


def test_launcher_translates_flags_and_keeps_the_rest():
    out = translate(["--model-path", "M", "--tp", "2", "--enable-tpla", "--tpla-g", "2", "--tpla-transform", "none",
                     "--json-model-override-args", '{"rope_theta": 5}'])
    assert out[:4] == ["--model-path", "M", "--tp", "2"]
    assert out[out.index("--decode-attention-backend") + 1] == "tpla"
    js = json.loads(out[out.index("--json-model-override-args") + 1])
    assert js == {"rope_theta": 5, "tpla": {"g": 2, "transform": "none"}}
    assert translate(["--model-path", "M"]) == ["--model-path", "M"]
    with pytest.raises(SystemExit):
        translate(["--tpla-g", "2"])


def test_pool_slices_full_rows_and_keeps_its_width():
    from sglang_tpla.patches.kv_pool import TPLAMLATokenToKVPool
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    pool = TPLAMLATokenToKVPool(
        16, page_size=1, dtype=torch.float32, kv_lora_rank=512, qk_rope_head_dim=64, layer_num=1, device="cpu",
        enable_memory_saver=False, latent_range=(256, 512), full_kv_lora_rank=512,
    )
    assert isinstance(pool, MLATokenToKVPool)
    buf = pool.get_key_buffer(0)
    assert buf.shape[-1] == 320
    row = torch.arange(576, dtype=torch.float32).view(1, 1, 576)
    layer = SimpleNamespace(layer_id=0)
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(dcp_enabled=False):
        pool.set_kv_buffer(layer, KVWriteLoc(torch.tensor([3]), None), row, None)
    got = pool.get_key_buffer(0)[3].view(-1)
    assert torch.equal(got, torch.cat([torch.arange(256, 512), torch.arange(512, 576)]).float())


def test_every_hook_target_imports_from_installed_sglang():
    from sglang_tpla import plugin

    checked = 0
    for name in plugin.HOOK_MODULES:
        mod = importlib.import_module(name)
        for target in getattr(mod, "HOOK_TARGETS", ()):
            parts = target.split(".")
            for i in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                    break
                except ImportError:
                    continue
            for attr in parts[i:]:
                obj = getattr(obj, attr)  # AttributeError = SGLang moved the target
            checked += 1
    assert checked >= 10
    assert "sglang_tpla.patches.server_args" in plugin.HOOK_MODULES  # argument-time refusals (checked above)
    assert importlib.import_module("sglang_tpla.patches.server_args").HOOK_TARGETS == ("sglang.srt.server_args.ServerArgs.resolve_once",)


def test_server_process_restarts_on_a_new_port_when_its_port_was_taken(tmp_path):
    """SGLang's launcher keeps running when uvicorn cannot bind (``[Errno 98] address already in use``): a
    port the harness chose and lost before binding is replaced, and the server started again."""
    import sys

    from sglang_tpla.serving import ServerProcess

    class Fake(ServerProcess):
        starts = []

        @property
        def command(self):
            self.starts.append(self.port)
            if len(self.starts) == 1:  # the first launch loses its port and hangs, as SGLang's does
                msg = f"ERROR: [Errno 98] error while attempting to bind on address ('127.0.0.1', {self.port}): address already in use"
                return [sys.executable, "-c", f"import time; print({msg!r}, flush=True); time.sleep(60)"]
            return [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1"]

    srv = Fake(tmp_path, log_path=tmp_path / "fake.log", ready_path="/", startup_timeout=30)
    try:
        srv.start().wait_ready()
        assert len(Fake.starts) == 2 and Fake.starts[0] != Fake.starts[1] == srv.port
    finally:
        srv.stop()
