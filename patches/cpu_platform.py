"""The project's development and CI platform: SGLang 0.5.23 serving on a plain CPU.

Stock SGLang cannot serve on a CPU without AMX and a CPU build of sgl-kernel (not on PyPI):
``SGLANG_USE_CPU_ENGINE=1`` imports the CUDA ``sgl_kernel`` and plain ``--device cpu`` falls
back to ``vllm._custom_ops`` for RoPE.  This out-of-tree platform (entry-point group
``sglang.srt.platforms``, name ``tpla_cpu``) makes the real ``python -m sglang.launch_server``
run a tiny DeepSeek model on any x86/ARM CPU at TP=1/2, so the end-to-end tests exercise
SGLang's real tokenizer manager, scheduler, KV pool, radix cache, chunked prefill, HTTP API
and PD transfer.  It is selected **only** by ``SGLANG_PLATFORM=tpla_cpu``: :func:`activate`
returns None otherwise (SGLang calls every platform plugin's ``activate()`` during
auto-discovery) and :func:`install` registers nothing.  It is not meant for production.

What it does (all through SGLang's plugin seams, no SGLang source change):

* :class:`TPLACpuPlatform` (an ``SRTPlatform``, ``PlatformEnum.OOT``): device cpu, no
  Triton / graph capture / pynccl (``PlatformCapabilities()``; for out-of-tree platforms
  ``parallel_state.init_model_parallel_group`` reads ``supports_pynccl``, so no
  ``use_pynccl=False`` hook is needed in 0.5.23), fused ops dispatch to ``forward_native``,
  eager compile backend with dynamo disabled, memory from psutil (``CpuDeviceMixin``),
  gloo process groups, CPU group coordinators, and server-arg defaults (device cpu,
  attention torch_native, sampling pytorch, CUDA graphs off, one core list per TP rank in
  ``SGLANG_CPU_OMP_THREADS_BIND``).
* :func:`install` (called from the ``sglang.srt.plugins`` entry point in every process),
  only when the platform is selected:

  - ``AttentionBackendRegistry.register("torch_native", -> MLA)``: DeepSeek prefill would
    otherwise take the MHA path (the default handler is triton's), which torch_native
    cannot serve from an MLA pool.  With ``SGLANG_TPLA_CPU_TRACE_ATTN=1`` the handler logs,
    once per extend batch (layer 0), the method and the prefix/extend lengths, so a test
    can see a radix-cache prefix hit go through the absorbed MLA extend.
  - AFTER ``sglang.srt.utils.numa_utils.init_threads_binding``: pin each TP rank's process
    to its cores and thread count (SGLang pins only with AMX/arm64; without it TP=2
    throughput collapses ~10-30x on a small machine).
  - AROUND ``sglang.srt.utils.common.get_free_cpu_memory``, only when
    ``SGLANG_TPLA_CPU_MEM_GB`` is set: report that fixed amount of free memory, so two
    servers get exactly the same KV budget (the capacity comparison in the tests and the
    main job); otherwise SGLang reads psutil as usual.

Note: ``HookRegistry.apply_hooks`` only *logs* a target it cannot resolve, so a moved
SGLang name silently disables a hook; ``HOOK_TARGETS`` lists every SGLang name used here
and the tests import them all.
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

# Patched targets (used by install() by name) and every other SGLang name this module uses.
PIN_TARGET = "sglang.srt.utils.numa_utils.init_threads_binding"
FREE_MEM_TARGET = "sglang.srt.utils.common.get_free_cpu_memory"
# PD prefill: host-side transfer indices use pinned memory and torch.cuda.Event (prefill.py).
PD_SENDER_TARGET = "sglang.srt.disaggregation.mooncake.conn.MooncakeKVSender.__init__"
HOOK_TARGETS = (
    PD_SENDER_TARGET,
    "sglang.srt.platforms.interface.SRTPlatform",
    "sglang.srt.platforms.cpu.CpuDeviceMixin",
    "sglang.srt.models.deepseek_common.attention_backend_handler.AttentionBackendRegistry",
    PIN_TARGET,
    FREE_MEM_TARGET,
    "sglang.srt.platforms.interface.PlatformCapabilities",
    "sglang.srt.platforms.device_mixin.PlatformEnum.OOT",
    "sglang.srt.plugins.hook_registry.HookRegistry",
    "sglang.srt.plugins.hook_registry.HookType.AFTER",
    "sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods.AttnForwardMethod.MLA",
    "sglang.srt.model_executor.cuda_graph_config.with_phase",
    "sglang.srt.model_executor.cuda_graph_config.Phase",
    "sglang.srt.model_executor.cuda_graph_config.Backend.DISABLED",
)

TRACE_ENV = "SGLANG_TPLA_CPU_TRACE_ATTN"
MEM_ENV = "SGLANG_TPLA_CPU_MEM_GB"


def selected() -> bool:
    return os.environ.get("SGLANG_PLATFORM") == PLATFORM_NAME


def activate() -> str | None:
    """Entry point of group ``sglang.srt.platforms``: the platform class, only when selected."""
    return f"{__name__}.TPLACpuPlatform" if selected() else None


def core_lists(tp: int, cores: list[int] | None = None) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` value: this process's cores split into ``tp`` groups.

    ``"0|1"`` for 2 ranks on 2 cores, ``"0,1|2,3"`` on 4; more ranks than cores share
    cores round-robin (``"0|1|0|1"``).
    """
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    per = max(1, len(cores) // tp)
    parts = [cores[i * per : (i + 1) * per] or [cores[i % len(cores)]] for i in range(tp)]
    return "|".join(",".join(str(c) for c in p) for p in parts)


_core_lists = core_lists  # old private name


def parse_cpu_list(text: str) -> set[int]:
    """``"0,2-3"`` -> ``{0, 2, 3}`` (the syntax of SGLANG_CPU_OMP_THREADS_BIND entries)."""
    cores: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cores.update(range(int(lo), int(hi) + 1))
        else:
            cores.add(int(part))
    return cores


class TPLACpuPlatform(CpuDeviceMixin, SRTPlatform):
    """SGLang platform for a plain CPU (no AMX, no sgl-kernel); ``SGLANG_PLATFORM=tpla_cpu``."""

    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"
    capabilities = PlatformCapabilities()  # no triton, no graph capture, no pynccl

    def apply_server_args_defaults(self, server_args) -> None:
        """Called by ``sglang.srt.arg_groups.platform_hook.handle_platform_defaults``.

        ``server_args`` is a recorder: every attribute written here is declared as a
        resolution of source ``platform:cpu``.  It runs after
        ``handle_cuda_graph_config``, so graphs are turned off in ``cuda_graph_config``
        itself (as SGLang's XPU rule does), not through the legacy ``disable_cuda_graph``.
        """
        server_args.device = "cpu"
        if server_args.attention_backend is None:
            server_args.attention_backend = "torch_native"
        if getattr(server_args, "sampling_backend", None) in (None, "flashinfer"):
            server_args.sampling_backend = "pytorch"
        try:
            from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

            cfg = server_args.cuda_graph_config
            if cfg is not None and any(getattr(cfg, p).backend != Backend.DISABLED for p in Phase.ALL):
                for phase in Phase.ALL:
                    cfg = with_phase(cfg, phase, backend=Backend.DISABLED)
                server_args.cuda_graph_config = cfg
        except (ImportError, AttributeError) as e:  # graph capture is off anyway (capabilities)
            logger.warning("tpla_cpu: could not switch CUDA graph config off: %s", e)
        tp = int(getattr(server_args, "tp_size", 1) or 1)
        pp = int(getattr(server_args, "pp_size", 1) or 1)
        dp = int(getattr(server_args, "dp_size", 1) or 1)
        ranks = tp * pp * dp
        # Inherited by the scheduler processes the launcher spawns; without it
        # numa_utils.init_threads_binding asserts ranks <= NUMA nodes.
        if ranks > 1 and not os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"):
            os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = core_lists(ranks)

    def get_device(self, device_id: int = 0) -> str:
        return "cpu"  # SGLang's get_device() fallback expects a device string

    def get_default_attention_backend(self) -> str:
        return "torch_native"

    def get_dispatch_key_name(self) -> str:
        return "native"  # BaseFusedOp runs forward_native (RMSNorm, RoPE, SiLU-and-mul)

    def get_compile_backend(self, mode: str | None = None) -> str:
        return "eager"

    def init_backend(self) -> None:
        import torch._dynamo

        torch._dynamo.config.disable = True  # else the first request spends ~40 s in inductor

    def get_torch_distributed_backend_str(self) -> str:
        return "gloo"

    def get_group_coordinator_device(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

    def is_pin_memory_available(self, device=None) -> bool:
        return False


def _mla_for_torch_native(attn, forward_batch):
    """Handler for ``AttentionBackendRegistry`` key ``"torch_native"``
    (``sglang.srt.models.deepseek_common.attention_backend_handler.AttentionBackendRegistry``,
    consulted by ``sglang.srt.models.deepseek_v2.DeepseekV2AttentionMLA.dispatch_attn_forward_method``):
    always the absorbed MLA path, which reads the prefix latent rows from the MLA pool."""
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod

    if _TRACE and getattr(attn, "layer_id", 0) == 0:
        mode = forward_batch.forward_mode
        if mode.is_extend():
            logger.info(
                "tpla_cpu attn: torch_native -> MLA (absorbed), mode %s, prefix lens %s, extend lens %s",
                getattr(mode, "name", mode), forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu,
            )
    return AttnForwardMethod.MLA


def _pin_rank(result, *args, **kwargs):
    """AFTER ``sglang.srt.utils.numa_utils.init_threads_binding``: pin this TP rank.

    SGLang returns this rank's core list (its ``SGLANG_CPU_OMP_THREADS_BIND`` entry) but only
    binds threads with AMX/arm64 (``sglang.srt.distributed.bootstrap._init_cpu_threads_env``);
    this sets the process affinity and torch's intra-op thread count to that list.  Only when
    ``SGLANG_CPU_OMP_THREADS_BIND`` is set (the platform sets it for more than one rank).
    """
    if not os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"):
        return result
    try:
        cores = parse_cpu_list(result) & os.sched_getaffinity(0)
    except (TypeError, ValueError):
        cores = set()
    if cores:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
        logger.info("tpla_cpu: rank numa_index=%s pinned to cores %s, %d threads",
                    kwargs.get("numa_index"), sorted(cores), len(cores))
    else:
        logger.warning("tpla_cpu: could not pin (core list %r)", result)
    return result


def _fixed_free_memory(orig, *args, **kwargs):
    """AROUND ``sglang.srt.utils.common.get_free_cpu_memory``: a fixed budget from
    ``SGLANG_TPLA_CPU_MEM_GB`` (GiB), if set; psutil otherwise."""
    gb = os.environ.get(MEM_ENV)
    return int(float(gb) * (1 << 30)) if gb else orig(*args, **kwargs)


_TRACE = False


def _no_host_tensor_indices(result, sender, *args, **kwargs):
    """AFTER MooncakeKVSender.__init__: take the device-index send path (the host path needs CUDA)."""
    sender.supports_host_tensor_indices = False


def install() -> None:
    """Register this platform's hooks through SGLang's own seams (only when selected)."""
    global _TRACE
    if not selected():
        return
    from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    _TRACE = os.environ.get(TRACE_ENV, "") not in ("", "0")
    AttentionBackendRegistry.register("torch_native", _mla_for_torch_native)
    HookRegistry.register(PIN_TARGET, _pin_rank, HookType.AFTER)
    HookRegistry.register(FREE_MEM_TARGET, _fixed_free_memory, HookType.AROUND)
    HookRegistry.register(PD_SENDER_TARGET, _no_host_tensor_indices, HookType.AFTER)
