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
        # block-FP8 checkpoints on the CPU: a plain-PyTorch block-FP8 GEMM and fp32 activations
        "sglang.srt.layers.quantization.fp8.Fp8Config.get_supported_act_dtypes": [HookType.AFTER],
        "sglang.srt.layers.quantization.fp8_utils.block_quant_to_tensor_quant": [HookType.REPLACE],
        "sglang.srt.layers.quantization.fp8_utils.dispatch_w8a8_block_fp8_linear": [HookType.AROUND],
    }
    sender = SimpleNamespace(supports_host_tensor_indices=True)
    cpu_platform._no_host_tensor_indices(None, sender)
    assert sender.supports_host_tensor_indices is False
    handler = backends.get_handler("torch_native")
    fb = SimpleNamespace(forward_mode=SimpleNamespace(is_extend=lambda: True, name="EXTEND"),
                         extend_prefix_lens_cpu=[8], extend_seq_lens_cpu=[3])
    assert handler(SimpleNamespace(layer_id=0), fb) is AttnForwardMethod.MLA


def test_server_arg_defaults(cpu_platform, monkeypatch):
    from sglang.srt.model_executor.cuda_graph_config import Backend, default_cuda_graph_config

    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "placeholder")  # restored (unset) afterwards
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND")
    args = SimpleNamespace(device=None, attention_backend=None, sampling_backend=None,
                           cuda_graph_config=default_cuda_graph_config(), tp_size=2, pp_size=1, dp_size=1)
    cpu_platform.TPLACpuPlatform().apply_server_args_defaults(args)
    assert (args.device, args.attention_backend, args.sampling_backend) == ("cpu", "torch_native", "pytorch")
    assert args.cuda_graph_config.decode.backend == args.cuda_graph_config.prefill.backend == Backend.DISABLED
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
