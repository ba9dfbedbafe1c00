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
  attention torch_native, sampling pytorch, CUDA graphs off, ``--sleep-on-idle``, one core list
  per TP rank in ``SGLANG_CPU_OMP_THREADS_BIND``).
* :func:`install` (called from the ``sglang.srt.plugins`` entry point in every process),
  only when the platform is selected:

  - ``AttentionBackendRegistry.register("torch_native", ...)``: DeepSeek's forward method is
    what a Hopper server picks, SGLang's own ``handle_attention_fa3`` (fa3 is SGLang 0.5.23's
    default attention backend for MLA models on sm90:
    ``arg_groups/model_override_base.get_default_attn_backend``).  A fresh prompt (no cached
    prefix) gets ``MHA_ONE_SHOT``: SGLang's ``forward_normal_prepare`` writes the full latent
    row into the KV pool and ``attn_mha`` attends over the new tokens' per-head K/V.  A prefix
    hit or a later chunk of a chunked prefill gets the absorbed ``MLA`` path: SGLang itself
    switches the chunked prefix cache off for torch_native
    (``misc_utils.maybe_disable_chunked_prefix_cache``), so fa3's handler returns MLA for every
    prefix, as Hopper does for prefixes under ``SGLANG_CHUNKED_PREFIX_CACHE_THRESHOLD`` (8192);
    an MHA method with a prefix (which would read per-head K/V rebuilt from the pool) is mapped
    to MLA here, and so is a fresh prompt with an fp8 KV cache (fa3's fp8 MHA rounds q/k/v, a
    model neither torch_native nor the reference has; the absorbed path reads the stored rows).  With ``SGLANG_TPLA_CPU_TRACE_ATTN=1`` the handler logs, once per extend batch
    (layer 0), the method it returns and the prefix/extend lengths, and the MHA hook below logs
    each MHA extend it runs (layer 0), so a test can see which SGLang path served a batch.
  - AROUND ``sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend``:
    DeepSeek's MHA call (``attn_mha``: ``k``/``v`` given, ``save_kv_cache=False``, head dims
    ``nope + rope`` and ``v_head_dim``) over an MLA pool is causal SDPA over the given q/k/v,
    per request.  SGLang's torch_native extend always reads K/V from the pool's
    buffers, which in an MLA pool are the latent rows, not these per-head keys.  Every other
    extend (the absorbed MLA call, non-MLA models) is SGLang's own.
  - AFTER ``sglang.srt.utils.numa_utils.init_threads_binding``: pin each TP rank's process
    to its cores and thread count (SGLang pins only with AMX/arm64; without it TP=2
    throughput collapses ~10-30x on a small machine).
  - AROUND ``sglang.srt.utils.common.get_free_cpu_memory``, only when
    ``SGLANG_TPLA_CPU_MEM_GB`` is set: report that fixed amount of free memory, so two
    servers get exactly the same KV budget (the capacity comparison in the tests and the
    main job); otherwise SGLang reads psutil as usual.  The fixed figure does not shrink when
    the weights load, so by default the KV budget ignores the weights.  With
    ``SGLANG_TPLA_CPU_MEM_COUNT_WEIGHTS=1`` it counts them the way a GPU does: once the model
    is loaded (:meth:`TPLACpuPlatform.post_load_model`), the free memory reported is the fixed
    amount minus the bytes of every tensor the model holds in this rank's process
    (parameters, buffers and tensor attributes such as ``w_kc``/``w_vc`` and TPLA's slices,
    each storage once), so a server that keeps more weight bytes gets fewer KV tokens.
* Block-FP8 checkpoints (DeepSeek-V3 / R1 / Kimi-K2 format: float8_e4m3fn weights with
  128x128-block ``weight_scale_inv``), served with SGLang's own ``Fp8LinearMethod``:

  - AROUND ``sglang.srt.layers.quantization.fp8_utils.dispatch_w8a8_block_fp8_linear``: the
    block-FP8 GEMM every ``Fp8LinearMethod`` binds at construction is
    :func:`block_fp8_linear_cpu` (plain PyTorch: dequantize the weight blocks, ``fp8 *
    scale_inv`` in float32, cast to the activation dtype, ``F.linear``).  The activations
    are *not* quantized (SGLang's Triton/DeepGEMM kernels quantize them to e4m3 per 1x128
    group on a GPU): weight-only FP8, so an fp32 server equals an fp32 model on the
    dequantized weights.
  - REPLACE ``sglang.srt.layers.quantization.fp8_utils.block_quant_to_tensor_quant`` (what
    SGLang's DeepSeek loader calls off CUDA to turn the block-FP8 ``kv_b_proj`` into
    per-tensor FP8 ``w_kc``/``w_vc``, whose ``bmm_fp8`` is CUDA-only): dequantize to the
    model dtype instead, as SGLang does on CUDA (there to bf16), so MLA's absorbed bmm runs
    in the model dtype.
  - AFTER ``sglang.srt.layers.quantization.fp8.Fp8Config.get_supported_act_dtypes``: allow
    float32 activations too (the tests serve ``--dtype float32``; the weights stay FP8).

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
    "sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods.AttnForwardMethod.MHA",
    "sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods.AttnForwardMethod.MHA_ONE_SHOT",
    "sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods.AttnForwardMethod.MHA_CHUNKED_KV",
    "sglang.srt.model_executor.cuda_graph_config.with_phase",
    "sglang.srt.model_executor.cuda_graph_config.Phase",
    "sglang.srt.model_executor.cuda_graph_config.Backend.DISABLED",
)
# DeepSeek's extend method: what SGLang's handler for the Hopper default (fa3) picks.
HOPPER_HANDLER_TARGET = "sglang.srt.models.deepseek_common.attention_backend_handler.handle_attention_fa3"
MHA_EXTEND_TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend"
HOOK_TARGETS = HOOK_TARGETS + (HOPPER_HANDLER_TARGET, MHA_EXTEND_TARGET)
# Block-FP8 on CPU (registered with the rest, only when the platform is selected).
FP8_DISPATCH_TARGET = "sglang.srt.layers.quantization.fp8_utils.dispatch_w8a8_block_fp8_linear"
FP8_TENSOR_QUANT_TARGET = "sglang.srt.layers.quantization.fp8_utils.block_quant_to_tensor_quant"
FP8_DTYPES_TARGET = "sglang.srt.layers.quantization.fp8.Fp8Config.get_supported_act_dtypes"
HOOK_TARGETS = HOOK_TARGETS + (FP8_DISPATCH_TARGET, FP8_TENSOR_QUANT_TARGET, FP8_DTYPES_TARGET)

TRACE_ENV = "SGLANG_TPLA_CPU_TRACE_ATTN"
MEM_ENV = "SGLANG_TPLA_CPU_MEM_GB"
COUNT_WEIGHTS_ENV = "SGLANG_TPLA_CPU_MEM_COUNT_WEIGHTS"


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
        # An idle SGLang scheduler polls its sockets in a loop, a whole core each; on this platform the
        # ranks share the machine's cores with other servers and the client, so rank 0 sleeps in
        # SGLang's own IdleSleeper (zmq poll: a request wakes it at once; the other ranks wait in
        # their broadcast from rank 0).
        server_args.sleep_on_idle = True
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

    def post_load_model(self, model) -> None:
        """Called by ModelRunner.load_model once the weights are loaded and post-processed
        (after SGLang's and TPLA's ``post_load_weights``), before the KV pool is sized: log
        this rank's resident weight bytes and remember the model for the weight-counting
        free-memory figure (``SGLANG_TPLA_CPU_MEM_COUNT_WEIGHTS``)."""
        import weakref

        from .weights import resident_weight_bytes

        global _model_ref
        _model_ref = weakref.ref(model)
        logger.info("tpla_cpu: rank weight bytes %d (%.2f MiB, every tensor the model holds after load)",
                    resident_weight_bytes(model), resident_weight_bytes(model) / (1 << 20))


def _hopper_method(attn, forward_batch):
    """Handler for ``AttentionBackendRegistry`` key ``"torch_native"``
    (``sglang.srt.models.deepseek_common.attention_backend_handler.AttentionBackendRegistry``,
    consulted by ``sglang.srt.models.deepseek_v2.DeepseekV2AttentionMLA.dispatch_attn_forward_method``):
    the method SGLang's ``handle_attention_fa3`` returns (a Hopper server's default), except that
    an MHA method becomes the absorbed MLA path

    * over a cached prefix (torch_native reads no chunked prefix; SGLang disables the chunked
      prefix cache for it, so fa3's handler already returns MLA there), and
    * with a quantized KV cache (``--kv-cache-dtype fp8_e4m3``): fa3 runs the MHA prefill on
      fp8-cast q/k/v (``FlashAttentionBackend.prepare_paged_mha_query``), which neither
      torch_native nor the project's fp32 reference models; the absorbed path attends over the
      fp8 rows as stored, the rounding the served fp8 tests compare against.
    """
    from sglang.srt.models.deepseek_common.attention_backend_handler import handle_attention_fa3
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod

    method = handle_attention_fa3(attn, forward_batch)
    mode = forward_batch.forward_mode
    if not mode.is_extend():
        return method
    prefix = forward_batch.extend_prefix_lens_cpu
    why = ""
    if method in (AttnForwardMethod.MHA, AttnForwardMethod.MHA_ONE_SHOT, AttnForwardMethod.MHA_CHUNKED_KV):
        kv = str(getattr(attn, "kv_cache_dtype", "auto"))
        if prefix and any(prefix):
            why = f" (fa3 picks {method.name}; torch_native reads no per-head prefix K/V)"
        elif "fp8" in kv or "fp4" in kv:
            why = f" (fa3 picks {method.name}; {kv} KV cache: the absorbed path reads the rounded rows)"
        if why:
            method = AttnForwardMethod.MLA
    if _TRACE and getattr(attn, "layer_id", 0) == 0:
        logger.info(
            "tpla_cpu attn: torch_native -> %s, mode %s, prefix lens %s, extend lens %s%s",
            method.name, getattr(mode, "name", mode), prefix, forward_batch.extend_seq_lens_cpu, why,
        )
    return method


def _mha_extend(orig, self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
    """AROUND ``TorchNativeAttnBackend.forward_extend``: DeepSeek's MHA prefill over an MLA pool.

    SGLang's ``forward_normal_core`` (methods MHA / MHA_ONE_SHOT / MHA_CHUNKED_KV) calls
    ``attn_mha`` (``H`` heads, ``qk_head_dim = nope + rope``, ``v_head_dim``; 192 / 128 for
    DeepSeek-V3) with ``k``/``v`` made from the new tokens' latent by ``kv_b_proj`` and
    ``save_kv_cache=False`` (``_set_mla_kv_buffer`` has written the latent row already).
    SGLang's torch_native extend would read K and V from the pool's buffers instead: in an MLA
    pool those are the latent rows.  Here each request's queries attend causally over its own
    given keys and values (``torch.nn.functional.scaled_dot_product_attention``, the layer's
    scaling); every other extend is SGLang's own.  A cached prefix cannot be served here (its
    per-head K/V are not in the call): the handler routes prefix hits to MLA, so one raises.

    Which calls: an extend over an MLA pool (a pool with ``kv_lora_rank``) that brings its own
    ``k``/``v`` and writes nothing (``save_kv_cache=False``).  SGLang's absorbed MLA call on
    torch_native always writes (``forward_absorb_core``: ``save_kv_cache = True``); the head
    dims cannot tell the two apart (TPLA g=4 rows are ``128 + 64``, DeepSeek's MHA head dim).
    """
    if save_kv_cache or k is None or v is None or not hasattr(self.token_to_kv_pool, "kv_lora_rank"):
        return orig(self, q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
    from torch.nn.functional import scaled_dot_product_attention

    prefix = forward_batch.extend_prefix_lens_cpu
    if (prefix and any(prefix)) or getattr(forward_batch, "mha_return_lse", False):
        raise NotImplementedError(
            "tpla_cpu: torch_native runs DeepSeek's MHA prefill (attn_mha) only over the new tokens of requests "
            f"without a cached prefix (prefix lens {prefix}); prefix hits take MLA"
        )
    lens = [int(n) for n in forward_batch.extend_seq_lens_cpu]
    if _TRACE and layer.layer_id == 0:
        logger.info("tpla_cpu attn: torch_native MHA extend (attn_mha, k/v given, no pool read), prefix lens %s, "
                    "extend lens %s", prefix, lens)
    h, hk = layer.tp_q_head_num, layer.tp_k_head_num
    q_ = q.reshape(-1, h, layer.qk_head_dim)
    k_ = k.reshape(-1, hk, layer.qk_head_dim).to(q.dtype)
    v_ = v.reshape(-1, layer.tp_v_head_num, layer.v_head_dim).to(q.dtype)
    o = q.new_empty(q_.shape[0], h, layer.v_head_dim)
    start = 0
    for n in lens:
        s = slice(start, start + n)
        o[s] = scaled_dot_product_attention(
            q_[s].transpose(0, 1), k_[s].transpose(0, 1), v_[s].transpose(0, 1),
            is_causal=True, scale=layer.scaling, enable_gqa=h != hk,
        ).transpose(0, 1)
        start += n
    return o.view(-1, h * layer.v_head_dim)


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


_model_ref = None  # weakref to this process's loaded model (post_load_model)


def _fixed_free_memory(orig, *args, **kwargs):
    """AROUND ``sglang.srt.utils.common.get_free_cpu_memory``: a fixed budget from
    ``SGLANG_TPLA_CPU_MEM_GB`` (GiB), if set; psutil otherwise.  With
    ``SGLANG_TPLA_CPU_MEM_COUNT_WEIGHTS=1`` the loaded model's tensor bytes are subtracted
    (a GPU's free memory after loading: the KV budget pays for the weights)."""
    gb = os.environ.get(MEM_ENV)
    if not gb:
        return orig(*args, **kwargs)
    free = int(float(gb) * (1 << 30))
    model = _model_ref() if _model_ref is not None else None
    if model is not None and os.environ.get(COUNT_WEIGHTS_ENV, "") not in ("", "0"):
        from .weights import resident_weight_bytes

        free -= resident_weight_bytes(model)
    return free


# --------------------------------------------------------------------------- block FP8


def block_fp8_linear_cpu(input, weight, block_size, weight_scale, input_scale=None, bias=None, **_unused):
    """SGLang's block-FP8 linear (``w8a8_block_fp8_linear`` signature) in plain PyTorch.

    ``weight`` float8_e4m3fn ``[N, K]`` with float32 ``weight_scale`` ``[ceil(N/bn), ceil(K/bk)]``:
    dequantized block by block in float32 (``fp8 * scale``), cast to the activation dtype, then
    ``F.linear``.  Activations are not quantized.  A pre-quantized input (``input_scale`` given:
    fp8 ``input`` with per-token 1 x ``bk`` group scales, SGLang's fused norm+quant output) is
    dequantized the same way and the output is bf16, as SGLang's kernels return it.
    """
    import torch.nn.functional as F

    from sglang_tpla.tiny_model import dequantize_block_fp8

    bn, bk = int(block_size[0]), int(block_size[1])
    if input_scale is not None:
        x2 = input.reshape(-1, input.shape[-1])
        s = input_scale.reshape(x2.shape[0], -1).float().repeat_interleave(bk, 1)[:, : x2.shape[1]]
        x = (x2.float() * s).reshape(input.shape)
        out_dtype = torch.bfloat16
    else:
        x, out_dtype = input, input.dtype
    w = dequantize_block_fp8(weight, weight_scale, (bn, bk)).to(x.dtype)
    out = F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    return out.to(out_dtype)


def _dispatch_block_fp8_linear(orig, *args, **kwargs):
    """AROUND ``fp8_utils.dispatch_w8a8_block_fp8_linear``: every block-FP8 linear runs :func:`block_fp8_linear_cpu`."""
    return block_fp8_linear_cpu


def _dequant_kv_b(weight, weight_scale, block_size, *args, **kwargs):
    """REPLACE ``fp8_utils.block_quant_to_tensor_quant`` (SGLang's DeepSeek loader, off CUDA): the
    block-FP8 ``kv_b_proj`` dequantized to the model dtype (the loader runs under SGLang's
    ``set_default_torch_dtype``) and no per-tensor scale, so ``w_kc``/``w_vc`` take the plain bmm."""
    from sglang_tpla.tiny_model import dequantize_block_fp8

    return dequantize_block_fp8(weight, weight_scale, tuple(block_size)).to(torch.get_default_dtype()), None


def _fp8_act_dtypes(result, *args, **kwargs):
    """AFTER ``Fp8Config.get_supported_act_dtypes``: float32 too (weight-only FP8 on this platform)."""
    return list(result) + [torch.float32] if torch.float32 not in result else result


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
    AttentionBackendRegistry.register("torch_native", _hopper_method)
    HookRegistry.register(MHA_EXTEND_TARGET, _mha_extend, HookType.AROUND)
    HookRegistry.register(PIN_TARGET, _pin_rank, HookType.AFTER)
    HookRegistry.register(FREE_MEM_TARGET, _fixed_free_memory, HookType.AROUND)
    HookRegistry.register(PD_SENDER_TARGET, _no_host_tensor_indices, HookType.AFTER)
    HookRegistry.register(FP8_DISPATCH_TARGET, _dispatch_block_fp8_linear, HookType.AROUND)
    HookRegistry.register(FP8_TENSOR_QUANT_TARGET, _dequant_kv_b, HookType.REPLACE)
    HookRegistry.register(FP8_DTYPES_TARGET, _fp8_act_dtypes, HookType.AFTER)
