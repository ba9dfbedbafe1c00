"""The project's CPU platform (``SGLANG_PLATFORM=tpla_cpu``, ``patches/cpu_platform.py``).

Fast: the platform is chosen only when selected, its hooks register only then, every SGLang
name it relies on still exists, and its server-arg defaults.

The real servers on this platform are exercised by tests/test_serving_*.py.
"""

from __future__ import annotations

import os
import pkgutil
from collections import defaultdict
from types import SimpleNamespace

import pytest


PLATFORM_MODULE = "sglang_tpla.patches.cpu_platform"

# ---------------------------------------------------------------------------- fast


@pytest.fixture(scope="module")
def cpu_platform():
    import importlib

    return importlib.import_module(PLATFORM_MODULE)


@pytest.mark.parametrize("value", [None, "", "cpu", "cuda", "TPLA_CPU", "tpla", "tpla_cpu "])
def test_activate_returns_none_unless_selected(cpu_platform, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    else:
        monkeypatch.setenv("SGLANG_PLATFORM", value)
    assert cpu_platform.activate() is None


def test_activate_when_selected_names_an_out_of_tree_cpu_platform(cpu_platform, monkeypatch):
    from sglang.srt.platforms.device_mixin import PlatformEnum
    from sglang.srt.platforms.interface import SRTPlatform

    monkeypatch.setenv("SGLANG_PLATFORM", "tpla_cpu")
    path = cpu_platform.activate()
    assert path == f"{PLATFORM_MODULE}.TPLACpuPlatform"
    cls = pkgutil.resolve_name(path)
    assert issubclass(cls, SRTPlatform) and cls._enum is PlatformEnum.OOT
    plat = cls()
    assert plat.is_out_of_tree() and plat.device_type == "cpu" and plat.get_device() == "cpu"
    caps = plat.capabilities
    assert not (caps.supports_triton or caps.graph_capture or caps.piecewise_graph or caps.supports_pynccl)
    assert plat.get_dispatch_key_name() == "native"
    assert plat.get_compile_backend() == "eager"
    assert plat.get_torch_distributed_backend_str() == "gloo"
    assert str(plat.get_group_coordinator_device(1)) == "cpu"
    free, total = plat.get_available_memory()
    assert 0 < free <= total == plat.get_device_total_memory()


def test_platform_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.platforms")}
    assert eps.get("tpla_cpu") == f"{PLATFORM_MODULE}:activate"


def test_every_hook_target_imports_from_installed_sglang(cpu_platform):
    """An SGLang upgrade that moves one of these fails here, not silently at serve time
    (``HookRegistry.apply_hooks`` only logs a target it cannot resolve)."""
    assert cpu_platform.PIN_TARGET in cpu_platform.HOOK_TARGETS
    assert cpu_platform.FREE_MEM_TARGET in cpu_platform.HOOK_TARGETS
    for target in cpu_platform.HOOK_TARGETS:
        assert pkgutil.resolve_name(target) is not None, target
    assert callable(pkgutil.resolve_name(cpu_platform.PIN_TARGET))
    assert callable(pkgutil.resolve_name(cpu_platform.FREE_MEM_TARGET))


def _fresh_registries(monkeypatch):
    from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(HookRegistry, "_hooks", defaultdict(list))
    monkeypatch.setattr(AttentionBackendRegistry, "_handlers", dict(AttentionBackendRegistry._handlers))
    return HookRegistry, AttentionBackendRegistry


def test_install_registers_nothing_unless_selected(cpu_platform, monkeypatch):
    hooks, backends = _fresh_registries(monkeypatch)
    before = dict(backends._handlers)
    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    cpu_platform.install()
    assert not hooks._hooks and backends._handlers == before


def test_install_when_selected_registers_its_hooks(cpu_platform, monkeypatch):
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod
    from sglang.srt.plugins.hook_registry import HookType

    hooks, backends = _fresh_registries(monkeypatch)
    monkeypatch.setenv("SGLANG_PLATFORM", "tpla_cpu")
    cpu_platform.install()
    assert {t: [ht for ht, _, _ in hs] for t, hs in hooks._hooks.items()} == {
        "sglang.srt.utils.numa_utils.init_threads_binding": [HookType.AFTER],
        "sglang.srt.utils.common.get_free_cpu_memory": [HookType.AROUND],
        "sglang.srt.disaggregation.mooncake.conn.MooncakeKVSender.__init__": [HookType.AFTER],
        # DeepSeek's MHA prefill (attn_mha) on torch_native: SDPA over the given q/k/v
        "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend": [HookType.AROUND],
        # block-FP8 checkpoints on the CPU: a plain-PyTorch block-FP8 GEMM and fp32 activations
        "sglang.srt.layers.quantization.fp8.Fp8Config.get_supported_act_dtypes": [HookType.AFTER],
        "sglang.srt.layers.quantization.fp8_utils.block_quant_to_tensor_quant": [HookType.REPLACE],
        "sglang.srt.layers.quantization.fp8_utils.dispatch_w8a8_block_fp8_linear": [HookType.AROUND],
    }
    sender = SimpleNamespace(supports_host_tensor_indices=True)
    cpu_platform._no_host_tensor_indices(None, sender)
    assert sender.supports_host_tensor_indices is False
    handler = backends.get_handler("torch_native")
    assert handler is cpu_platform._hopper_method
    _serverless_handlers(monkeypatch)
    assert handler(_attn(), _fb([8], [3])) is AttnForwardMethod.MLA
    assert handler(_attn(), _fb([0], [8])) is AttnForwardMethod.MHA_ONE_SHOT


# ------------------------------------------------------- extend methods: what a Hopper server takes


def _serverless_handlers(monkeypatch):
    """SGLang's handlers read ``get_exec().deterministic`` from the server's published config."""
    from sglang.srt.models.deepseek_common import attention_backend_handler

    off = SimpleNamespace(deterministic=SimpleNamespace(enable_deterministic_inference=False))
    monkeypatch.setattr(attention_backend_handler, "get_exec", lambda: off)


def _attn(disable_chunked_prefix_cache=True, kv_cache_dtype="auto"):
    """The attributes SGLang's DeepSeek handlers read off ``DeepseekV2AttentionMLA``."""
    return SimpleNamespace(layer_id=0, qk_rope_head_dim=64, chunked_prefix_cache_threshold=8192, kv_cache_dtype=kv_cache_dtype,
                           disable_chunked_prefix_cache=disable_chunked_prefix_cache, flashinfer_mla_disable_ragged=False)


def _fb(prefix, extend, mode="EXTEND"):
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(forward_mode=getattr(ForwardMode, mode), extend_prefix_lens_cpu=list(prefix),
                           extend_seq_lens_cpu=list(extend), seq_lens_cpu=torch.tensor([p + n for p, n in zip(prefix, extend)]),
                           get_max_chunk_capacity=lambda: 128 * 1024)


def test_extend_method_is_sglangs_fa3_pick_with_prefix_hits_on_mla(cpu_platform, monkeypatch, caplog):
    """fa3 is SGLang 0.5.23's default for MLA models on Hopper; the platform returns its handler's pick:
    MHA (one-shot) for a fresh prompt, the absorbed MLA path for prefix hits (SGLang disables the chunked
    prefix cache for torch_native, and an MHA pick over a prefix, as with it on, is MLA here too); with an
    fp8 KV cache the absorbed path for fresh prompts too."""
    from sglang.srt.models.deepseek_common.attention_backend_handler import handle_attention_fa3
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod as M

    _serverless_handlers(monkeypatch)
    h = cpu_platform._hopper_method
    fresh = _fb([0, 0], [8, 9])
    assert h(_attn(), fresh) is handle_attention_fa3(_attn(), fresh) is M.MHA_ONE_SHOT
    assert h(_attn(), _fb([6, 0], [3, 9])) is handle_attention_fa3(_attn(), _fb([6, 0], [3, 9])) is M.MLA
    assert h(_attn(), _fb([1], [1], "DECODE")) is M.MLA
    big = _fb([9000], [10])  # over SGLANG_CHUNKED_PREFIX_CACHE_THRESHOLD with the chunked prefix cache on
    assert handle_attention_fa3(_attn(False), big) is M.MHA_ONE_SHOT and h(_attn(False), big) is M.MLA
    # an fp8 KV cache: fa3's MHA would run on fp8-cast q/k/v; here the absorbed path reads the stored rows
    fp8 = _attn(kv_cache_dtype="fp8_e4m3")
    assert handle_attention_fa3(fp8, fresh) is M.MHA_ONE_SHOT and h(fp8, fresh) is M.MLA
    monkeypatch.setattr(cpu_platform, "_TRACE", True)
    with caplog.at_level("INFO", logger="sglang_tpla"):
        h(_attn(), fresh)
    assert "torch_native -> MHA_ONE_SHOT, mode EXTEND, prefix lens [0, 0], extend lens [8, 9]" in caplog.text


def _native_backend(pool):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    runner = SimpleNamespace(device="cpu", token_to_kv_pool=pool, req_to_token_pool=SimpleNamespace(req_to_token=None))
    return TorchNativeAttnBackend(runner)


def _mla_pool(kv_dtype=None, latent_range=None):
    import torch

    from sglang_tpla.patches.kv_pool import TPLAMLATokenToKVPool

    return TPLAMLATokenToKVPool(
        32, page_size=1, dtype=kv_dtype or torch.float32, kv_lora_rank=512, qk_rope_head_dim=64, layer_num=1,
        device="cpu", enable_memory_saver=False, latent_range=latent_range or (0, 512), full_kv_lora_rank=512,
    )  # fmt: skip


def test_mha_extend_is_causal_attention_over_the_given_qkv(cpu_platform):
    """DeepSeek's MHA call (attn_mha: 192-wide q/k, 128-wide v, save_kv_cache=False) over an MLA pool:
    each request attends causally over its own given k/v; SGLang's torch_native would read the pool."""
    import torch
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    torch.manual_seed(0)
    h, lens, scale = 4, [5, 3], 0.1
    layer = SimpleNamespace(layer_id=1, tp_q_head_num=h, tp_k_head_num=h, tp_v_head_num=h, qk_head_dim=192,
                            v_head_dim=128, scaling=scale)
    q, k, v = torch.randn(8, h, 192), torch.randn(8, h, 192), torch.randn(8, h, 128)
    fb = _fb([0, 0], lens)
    backend = _native_backend(_mla_pool())
    out = cpu_platform._mha_extend(TorchNativeAttnBackend.forward_extend, backend, q, k, v, layer, fb, save_kv_cache=False)
    want, start = [], 0
    for n in lens:
        s = slice(start, start + n)
        logits = torch.einsum("qhd,khd->hqk", q[s], k[s]) * scale
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        want.append(torch.einsum("hqk,khd->qhd", logits.softmax(-1), v[s]))
        start += n
    assert out.shape == (8, h * 128)
    torch.testing.assert_close(out.view(8, h, 128), torch.cat(want), rtol=1e-5, atol=1e-5)
    # everything else is SGLang's own extend (here: the absorbed call, which writes its row)
    calls = []
    cpu_platform._mha_extend(lambda *a, **kw: calls.append(kw) or "orig", backend, q, k, v, layer, fb, save_kv_cache=True)
    assert calls == [{"save_kv_cache": True}]
    with pytest.raises(NotImplementedError, match="prefix hits take MLA"):
        cpu_platform._mha_extend(TorchNativeAttnBackend.forward_extend, backend, q, k, v, layer, _fb([2, 0], [3, 5]),
                                 save_kv_cache=False)


@pytest.mark.parametrize("kv_dtype", ["float32", "float8_e4m3fn"])
def test_sglang_mha_prefill_writes_sliced_rows_into_the_tpla_pool(kv_dtype, monkeypatch):
    """SGLang's own MHA prefill write (``DeepseekMHAForwardMixin._set_mla_kv_buffer``, the CPU branch: the
    full 576-wide latent row through ``set_kv_buffer``) lands as this rank's latent slice + RoPE key."""
    import torch
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc  # noqa: F401  (what the write goes through)
    from sglang.srt.models.deepseek_common.attention_forward_methods import forward_mha
    from sglang.srt.runtime_context import get_parallel

    dtype = getattr(torch, kv_dtype)
    pool = _mla_pool(dtype, latent_range=(256, 512))
    monkeypatch.setattr(forward_mha, "get_token_to_kv_pool", lambda: pool)
    torch.manual_seed(0)
    latent = torch.randn(3, 1, 576)  # SGLang's fetched latent, [T, 1, 512 + 64]
    kv_a, k_pe = torch.randn(3, 512), torch.randn(3, 1, 64)  # normalized latent, roped key
    attn = SimpleNamespace(attn_mha=SimpleNamespace(layer_id=0), kv_lora_rank=512)
    fb = SimpleNamespace(out_cache_loc=torch.tensor([4, 7, 9]), out_cache_loc_is_physical=False)
    with get_parallel().override(dcp_enabled=False):
        forward_mha.DeepseekMHAForwardMixin._set_mla_kv_buffer(attn, latent, kv_a, k_pe, fb)
    got = pool.get_key_buffer(0)[torch.tensor([4, 7, 9])].view(3, -1)
    want = torch.cat([kv_a[:, 256:], k_pe[:, 0]], dim=-1).to(dtype)
    assert got.shape == (3, 320) and got.dtype == dtype
    assert torch.equal(got.float(), want.float())


def test_server_arg_defaults(cpu_platform, monkeypatch):
    from sglang.srt.model_executor.cuda_graph_config import Backend, default_cuda_graph_config

    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "placeholder")  # restored (unset) afterwards
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND")
    args = SimpleNamespace(device=None, attention_backend=None, sampling_backend=None,
                           cuda_graph_config=default_cuda_graph_config(), tp_size=2, pp_size=1, dp_size=1)
    cpu_platform.TPLACpuPlatform().apply_server_args_defaults(args)
    assert (args.device, args.attention_backend, args.sampling_backend) == ("cpu", "torch_native", "pytorch")
    assert args.cuda_graph_config.decode.backend == args.cuda_graph_config.prefill.backend == Backend.DISABLED
    assert args.sleep_on_idle is True  # an idle TP=2 server otherwise polls at ~1.5 cores (measured 2026-12-06)
    bind = os.environ["SGLANG_CPU_OMP_THREADS_BIND"].split("|")
    assert len(bind) == 2 and all(cpu_platform.parse_cpu_list(b) for b in bind)
    # an explicit choice is kept
    args = SimpleNamespace(device=None, attention_backend="triton", sampling_backend="pytorch",
                           cuda_graph_config=None, tp_size=1, pp_size=1, dp_size=1)
    cpu_platform.TPLACpuPlatform().apply_server_args_defaults(args)
    assert args.attention_backend == "triton"


def test_core_lists_and_pinning(cpu_platform, monkeypatch):
    assert cpu_platform.core_lists(2, [0, 1]) == "0|1"
    assert cpu_platform.core_lists(2, [0, 1, 2, 3]) == "0,1|2,3"
    assert cpu_platform.core_lists(4, [0, 1]) == "0|1|0|1"
    assert cpu_platform.core_lists(1, [3, 5]) == "3,5"
    assert cpu_platform.parse_cpu_list("0, 2-4,7") == {0, 2, 3, 4, 7}

    calls = []
    monkeypatch.setattr(cpu_platform.os, "sched_setaffinity", lambda pid, cores: calls.append(("cpus", set(cores))))
    monkeypatch.setattr(cpu_platform.torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    mine = sorted(os.sched_getaffinity(0))
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    assert cpu_platform._pin_rank("x") == "x" and not calls  # no explicit binding: leave SGLang's default
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", f"{mine[0]}|{mine[-1]}")
    assert cpu_platform._pin_rank(str(mine[-1]), numa_index=1, world_size=2) == str(mine[-1])
    assert calls == [("cpus", {mine[-1]}), ("threads", 1)]
