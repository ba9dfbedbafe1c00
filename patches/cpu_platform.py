"""The project's development and CI platform: SGLang 0.5.23 serving on a plain CPU.

Stock SGLang cannot serve on a CPU without AMX and a CPU build of sgl-kernel (not on PyPI).
This out-of-tree platform (entry-point group ``sglang.srt.platforms``, name ``tpla_cpu``)
makes the real ``python -m sglang.launch_server`` run a tiny DeepSeek model on any x86/ARM
CPU at TP=1/2, so the end-to-end tests exercise SGLang's real scheduler, KV pool, radix
cache, HTTP API and PD transfer.  It is **only** active when selected with
``SGLANG_PLATFORM=tpla_cpu``; it is not meant for production.

What it does (all through SGLang's plugin seams, no SGLang source change):

* :class:`TPLACpuPlatform` (an ``SRTPlatform``, ``PlatformEnum.OOT``): device cpu, no
  Triton / graph capture / pynccl, fused ops dispatch to ``forward_native``, eager compile
  backend with dynamo disabled, memory from psutil, gloo process groups, and server-arg
  defaults (device cpu, attention torch_native, sampling pytorch, CUDA graphs off, one
  core list per TP rank in ``SGLANG_CPU_OMP_THREADS_BIND``).
* :func:`install` (called from the ``sglang.srt.plugins`` entry point in every process),
  only when the platform is selected:

  - ``AttentionBackendRegistry.register("torch_native", -> MLA)``: DeepSeek prefill would
    otherwise take the MHA path, which torch_native cannot serve from an MLA pool.
  - AFTER ``sglang.srt.utils.numa_utils.init_threads_binding``: pin each TP rank's process
    to its cores and thread count (without it TP=2 throughput collapses ~30x).
  - AROUND ``sglang.srt.utils.common.get_free_cpu_memory``, only when
    ``SGLANG_TPLA_CPU_MEM_GB`` is set: report that fixed amount of free memory, so two
    servers get exactly the same KV budget (the capacity comparison in the tests and the
    main job); otherwise SGLang reads psutil as usual.
"""

from __future__ import annotations

import logging
import os

import torch
from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform

logger = logging.getLogger("sglang_tpla")

PLATFORM_NAME = "tpla_cpu"
HOOK_TARGETS = (
    "sglang.srt.platforms.interface.SRTPlatform",
    "sglang.srt.platforms.cpu.CpuDeviceMixin",
    "sglang.srt.models.deepseek_common.attention_backend_handler.AttentionBackendRegistry",
    "sglang.srt.utils.numa_utils.init_threads_binding",
    "sglang.srt.utils.common.get_free_cpu_memory",
)


def selected() -> bool:
    return os.environ.get("SGLANG_PLATFORM") == PLATFORM_NAME


def activate() -> str | None:
    """Entry point of group ``sglang.srt.platforms``: the platform class, only when selected."""
    return f"{__name__}.TPLACpuPlatform" if selected() else None


def _core_lists(tp: int) -> str:
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // tp)
    parts = [cores[i * per : (i + 1) * per] or [cores[i % len(cores)]] for i in range(tp)]
    return "|".join(",".join(str(c) for c in p) for p in parts)


class TPLACpuPlatform(CpuDeviceMixin, SRTPlatform):
    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"
    capabilities = PlatformCapabilities()  # no triton, no graph capture, no pynccl

    def apply_server_args_defaults(self, server_args) -> None:
        server_args.device = "cpu"
        if server_args.attention_backend is None:
            server_args.attention_backend = "torch_native"
        if getattr(server_args, "sampling_backend", None) in (None, "flashinfer"):
            server_args.sampling_backend = "pytorch"
        tp = int(getattr(server_args, "tp_size", 1) or 1)
        if tp > 1 and not os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"):
            os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = _core_lists(tp)

    def get_device(self, device_id: int = 0) -> str:
        return "cpu"  # SGLang's get_device() fallback expects a device string

    def get_default_attention_backend(self) -> str:
        return "torch_native"

    def get_dispatch_key_name(self) -> str:
        return "native"

    def get_compile_backend(self, mode: str | None = None) -> str:
        return "eager"

    def init_backend(self) -> None:
        import torch._dynamo

        torch._dynamo.config.disable = True  # else the first request spends ~40 s in inductor

    def get_group_coordinator_device(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

    def is_pin_memory_available(self, device=None) -> bool:
        return False


def _mla_for_torch_native(attn, forward_batch):
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod

    return AttnForwardMethod.MLA


def _pin_rank(result, *args, **kwargs):
    """AFTER init_threads_binding: pin this TP rank to its cores from SGLANG_CPU_OMP_THREADS_BIND."""
    bind = os.environ.get("SGLANG_CPU_OMP_THREADS_BIND")
    if bind:
        from sglang.srt.runtime_context import get_parallel

        try:
            rank = int(get_parallel().tp_rank)
        except Exception:  # noqa: BLE001 - not published yet: leave the default
            return result
        parts = bind.split("|")
        cores = {int(c) for c in parts[rank % len(parts)].split(",") if c.strip()}
        if cores:
            os.sched_setaffinity(0, cores)
            torch.set_num_threads(len(cores))
            logger.info("tpla_cpu: TP rank %d pinned to cores %s", rank, sorted(cores))
    return result


def _fixed_free_memory(orig, *args, **kwargs):
    """AROUND get_free_cpu_memory: a fixed budget (bytes) from SGLANG_TPLA_CPU_MEM_GB, if set."""
    gb = os.environ.get("SGLANG_TPLA_CPU_MEM_GB")
    return int(float(gb) * (1 << 30)) if gb else orig(*args, **kwargs)


def install() -> None:
    if not selected():
        return
    from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    AttentionBackendRegistry.register("torch_native", _mla_for_torch_native)
    HookRegistry.register(HOOK_TARGETS[3], _pin_rank, HookType.AFTER)
    HookRegistry.register(HOOK_TARGETS[4], _fixed_free_memory, HookType.AROUND)
