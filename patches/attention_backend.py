"""The ``tpla`` attention backend: TPLA decode over this rank's latent slice.

Seams (SGLang 0.5.23):

* ``sglang.srt.layers.attention.attention_registry.register_attention_backend("tpla")``: the
  factory SGLang calls for ``--decode-attention-backend tpla``.
* ``sglang.srt.arg_groups.choices.ATTENTION_BACKEND_CHOICES``: ``tpla`` appended so the CLI
  accepts it.
* ``AttentionBackendRegistry.register("tpla", ...)``: the DeepSeek forward-method handler
  for batches run by this backend (absorbed MLA).
* AFTER ``sglang.srt.arg_groups.cuda_graph_hook.handle_cuda_graph_config``: decode CUDA graphs
  stay as SGLang resolved them (this backend captures); prefill-phase graphs are switched off
  (TPLA's extend path is not capture-safe), and the decision is logged.

The backend receives queries of all heads of the rank's group (``[T, Hg, D + 64]``), writes
the new row (already sliced) into the latent-split pool and attends over the slice, the latent
used as V.  The implementation is chosen per rank by :mod:`sglang_tpla.kernels.select` and
logged: FlashInfer MLA (``head_dim_ckv = 512/g``) on CUDA, the Triton kernel as fallback (and
for an fp8 KV cache), plain PyTorch on CPU.  Everything around the kernel is the same code on
every device.  ``prefill: tpla`` extend batches run in the DeepSeek hook
(:mod:`.deepseek_attention`), not in ``forward_extend``, on the same per-rank choice; this backend
only owns their FlashInfer wrapper (:meth:`TPLAAttnBackend.extend_flashinfer`).

Per decode step (``init_forward_metadata`` eager, ``init_forward_metadata_out_graph`` for CUDA
graphs): the CSR token slots are refilled in place into persistent buffers
(:class:`sglang_tpla.metadata.DecodeIndexBuffers`), sizes taken from SGLang's host
``seq_lens_cpu``; FlashInfer is planned once from host arrays.  No device value is read on
the host.  Graph mode (``init_cuda_graph_state``) has its own buffers sized ``max_bs *
context_len`` and, for FlashInfer, one ``use_cuda_graph`` wrapper per captured batch size
re-planned on replay with SGLang's sync-free ``fast_mla_decode_plan``; the Triton runner has a
fixed split count per batch size and preallocated workspace and output.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_tpla.metadata import DecodeIndexBuffers, gather_kv_indices

from .runtime import BACKEND_NAME, runtime_for

logger = logging.getLogger("sglang_tpla")

HOOK_TARGETS = (
    "sglang.srt.layers.attention.attention_registry.register_attention_backend",
    "sglang.srt.arg_groups.choices.ATTENTION_BACKEND_CHOICES",
    "sglang.srt.models.deepseek_common.attention_backend_handler.AttentionBackendRegistry",
    "sglang.srt.layers.attention.base_attn_backend.AttentionBackend",
    "sglang.srt.arg_groups.cuda_graph_hook.handle_cuda_graph_config",
    "sglang.srt.arg_groups.cuda_graph_hook.declare_resolution",
    "sglang.srt.arg_groups.cuda_graph_hook.resolving_view",
    "sglang.srt.model_executor.cuda_graph_config.with_phase",
    "sglang.srt.model_executor.cuda_graph_config.Phase",
    "sglang.srt.model_executor.cuda_graph_config.Backend",
    "sglang.kernels.ops.attention.kv_indices.create_flashinfer_kv_indices_triton",
    "sglang.srt.layers.attention.flashinfer_mla_backend.fast_mla_decode_plan",
    "sglang.srt.mem_cache.memory_pool.KVWriteLoc",
)


def _flashinfer_version() -> str | None:
    try:
        import flashinfer

        return flashinfer.__version__
    except Exception:  # noqa: BLE001 - missing or broken install: not usable
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def choose_implementation(device: torch.device, d_ckv: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None):
    from sglang_tpla.kernels.select import choose

    sm = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return choose(
        device.type, d_ckv, _dtype_name(dtype), sm,
        _flashinfer_version() if device.type == "cuda" else None, os.environ.get("SGLANG_TPLA_IMPL") or None,
        kv_dtype=_dtype_name(kv_dtype or dtype),
    )  # fmt: skip


def _sglang_index_fill(req_to_token, req_pool_indices, seq_lens, kv_indptr, out, nnz):
    """On CUDA: SGLang's own index kernel (one program per request), same result as
    :func:`sglang_tpla.metadata.gather_kv_indices`."""
    from sglang.kernels.ops.attention.kv_indices import create_flashinfer_kv_indices_triton

    bs = seq_lens.numel()
    if bs:
        create_flashinfer_kv_indices_triton[(bs,)](
            req_to_token, req_pool_indices, seq_lens, kv_indptr, None, out, req_to_token.stride(0)
        )


@dataclass
class DecodeStep:
    """What one decode step's layers read: the index buffers, the host max length (torch path)
    and, for FlashInfer, the planned wrapper."""

    buffers: DecodeIndexBuffers
    max_seq_len: int
    flashinfer: object | None = None


class TPLAAttnBackend(AttentionBackend):
    """Decode attention over the rank's latent slice, all heads of its group, own softmax."""

    def __init__(self, model_runner):
        super().__init__()
        self.runtime = runtime_for(model_runner.model_config.hf_config)  # validates: refuses non-MLA models
        if self.runtime is None:
            raise RuntimeError("the tpla attention backend was built but TPLA is off in this process")
        self.device = torch.device(model_runner.device)
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        translator = getattr(model_runner, "kv_index_translator", None)
        if translator is not None and getattr(translator, "is_translating", False):
            raise RuntimeError(
                "TPLA's latent-split pool is a static MLA pool; this server translates KV ids (a unified / "
                "virtual pool). Drop the option that enables it, or drop --decode-attention-backend tpla."
            )
        layout, s = self.runtime.layout, self.runtime.slice
        self.num_heads, self.d_ckv, self.d_pe = s.num_heads, layout.slice_width, layout.qk_rope_head_dim
        self.sm_scale = float(model_runner.model_config.scaling)
        self.q_dtype = model_runner.dtype
        self.kv_dtype = model_runner.kv_cache_dtype
        self.data_type, self.kv_cache_dtype = self.q_dtype, self.kv_dtype
        self.kv_scale = 1.0  # SGLang 0.5.23's MLA pool writes fp8 rows with a plain cast (no scale)
        self.max_context_len = model_runner.model_config.context_len
        self.choice = choose_implementation(self.device, self.d_ckv, self.q_dtype, self.kv_dtype)
        logger.info("TPLA attention backend: implementation %r (%s)", self.choice.impl, self.choice.reason)

        fill = _sglang_index_fill if self.device.type == "cuda" else gather_kv_indices
        self._fill = fill
        self.max_bs = int(self.req_to_token_pool.size)
        self.eager = DecodeIndexBuffers(self.max_bs, 4096, self.device, growable=True, fill=fill)
        self.graph: DecodeIndexBuffers | None = None
        self.forward_metadata: DecodeStep | None = None
        self._graph_wrappers: dict[int, object] = {}
        self._fi_workspace = None
        self._fi_eager = None
        self._fi_extend = None
        self._triton = None
        if self.choice.impl == "flashinfer":
            from sglang_tpla.kernels.flashinfer_decode import WORKSPACE_BYTES

            self._fi_workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
            self._fi_eager = self._flashinfer_runner()
        elif self.choice.impl == "triton":
            self._triton = self._triton_runner(self.max_bs)

    # ------------------------------------------------------------------ runners
    def _flashinfer_runner(self, graph_buffers=None):
        from sglang_tpla.kernels.flashinfer_decode import FlashInferTPLADecode

        fast_plan = None
        if graph_buffers is not None:
            from sglang.srt.layers.attention.flashinfer_mla_backend import fast_mla_decode_plan as fast_plan
        return FlashInferTPLADecode(
            self._fi_workspace, self.choice.flashinfer_backend, self.num_heads, self.d_ckv, self.d_pe, self.sm_scale,
            self.q_dtype, graph_buffers=graph_buffers, fast_plan=fast_plan,
        )  # fmt: skip

    def extend_flashinfer(self):
        """The rank's FlashInfer causal MLA wrapper for ``prefill: tpla`` extend batches (built on first
        use, on the decode wrapper's workspace: the two never run at once); the DeepSeek hook plans it
        once per forward batch (:func:`sglang_tpla.patches.deepseek_attention._kernel_extend_step`)."""
        if self._fi_extend is None:
            from sglang_tpla.kernels.flashinfer_extend import FlashInferTPLAExtend

            self._fi_extend = FlashInferTPLAExtend(
                self._fi_workspace, self.choice.flashinfer_backend, self.num_heads, self.d_ckv, self.d_pe,
                self.sm_scale, self.q_dtype,
            )  # fmt: skip
        return self._fi_extend

    def _triton_runner(self, max_batch: int):
        from sglang_tpla.kernels.triton_decode import TritonTPLADecode

        return TritonTPLADecode(
            self.device, self.num_heads, self.d_ckv, self.sm_scale, self.q_dtype, self.kv_dtype, max_batch,
            kv_scale=self.kv_scale,
        )  # fmt: skip

    # ------------------------------------------------------------------ metadata
    @staticmethod
    def _host_lens(forward_batch, bs: int) -> torch.Tensor:
        lens = forward_batch.seq_lens_cpu
        if lens is None:  # SGLang keeps it for backends with needs_cpu_seq_lens (the default)
            raise RuntimeError("TPLA decode needs ForwardBatch.seq_lens_cpu (host lengths); SGLang did not provide it")
        return lens[:bs]

    def _step(self, buffers: DecodeIndexBuffers, forward_batch, bs: int, lens_cpu: torch.Tensor, runner) -> DecodeStep:
        buffers.fill(self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens, lens_cpu, bs)
        if runner is not None:
            runner.plan(buffers.qo_indptr_cpu[: bs + 1], buffers.indptr_cpu, buffers.indices, buffers.lens_cpu)
        max_len = int(lens_cpu.max()) if bs else 0  # host tensor
        return DecodeStep(buffers, max_len, runner)

    def init_forward_metadata(self, forward_batch):
        """Eager, once per step: the batch's token slots (and the FlashInfer plan)."""
        if not forward_batch.forward_mode.is_decode_or_idle():
            self.forward_metadata = None
            return
        bs = forward_batch.batch_size
        self.forward_metadata = self._step(self.eager, forward_batch, bs, self._host_lens(forward_batch, bs), self._fi_eager)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf: torch.Tensor | None = None):
        """Persistent graph buffers; the Triton runner is rebuilt to cover ``max_bs`` if needed."""
        self.graph = DecodeIndexBuffers(max_bs, max_bs * self.max_context_len, self.device, growable=False, fill=self._fill)
        if kv_indices_buf is not None:
            self.graph.kv_indices = kv_indices_buf
        if self._triton is not None and max_bs > self._triton.max_batch:
            self._triton = self._triton_runner(max_bs)
        self._graph_wrappers.clear()
        logger.info("TPLA: decode CUDA graphs: capturing batch sizes up to %d (%s)", max_bs, self.choice.impl)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Capture (``in_capture``) and replay: refill the graph buffers in place; FlashInfer gets one
        graph wrapper per batch size, planned for real at capture and sync-free on replay."""
        if self.graph is None:
            raise RuntimeError("init_forward_metadata_out_graph before init_cuda_graph_state")
        mode = forward_batch.forward_mode
        if not mode.is_decode_or_idle():
            raise ValueError(f"the tpla backend captures decode only, got {mode}")
        bs = forward_batch.batch_size
        if forward_batch.seq_lens_cpu is None and in_capture:  # capture setup, outside the graph: may sync
            lens = forward_batch.seq_lens[:bs].cpu()
        else:
            lens = self._host_lens(forward_batch, bs)
        runner = None
        if self.choice.impl == "flashinfer":
            if in_capture:
                g = self.graph
                self._graph_wrappers[bs] = self._flashinfer_runner(
                    (g.qo_indptr[: bs + 1], g.kv_indptr[: bs + 1], g.kv_indices, g.kv_lens[:bs])
                )
            runner = self._graph_wrappers[bs]
        self.forward_metadata = self._step(self.graph, forward_batch, bs, lens, runner)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    # ------------------------------------------------------------------ forward
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        d = self.d_ckv
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        rows = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        step = self.forward_metadata
        if self.choice.impl == "flashinfer":
            out = step.flashinfer.run(q[..., :d], q[..., d:], rows)
        elif self.choice.impl == "triton":
            out = self._triton.run(q[..., :d], q[..., d:], rows, step.buffers.indptr, step.buffers.indices)
        else:
            from sglang_tpla.kernels.torch_decode import torch_decode_attention

            flat = rows.view(rows.shape[0], -1)
            out = torch_decode_attention(
                q[..., :d], q[..., d:], flat[:, :d], flat[:, d:], step.buffers.indptr, step.buffers.indices,
                layer.scaling, step.max_seq_len, kv_scale=self.kv_scale,
            )  # fmt: skip
        return out.reshape(q.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        raise RuntimeError(
            "the tpla backend serves decode only; prefill stays exact MLA on the prefill backend "
            "(use --decode-attention-backend tpla, not --attention-backend tpla)"
        )


def _graph_phases(result, server_args, *args, **kwargs):
    """AFTER handle_cuda_graph_config: with ``tpla`` selected, decode CUDA graphs stay as SGLang
    resolved them (this backend captures); prefill-phase graphs are switched off (TPLA's extend
    hooks build their tiling and indices from host lengths per batch, which a graph cannot replay).  Logged."""
    from sglang.srt.arg_groups.cuda_graph_hook import declare_resolution, resolving_view
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    cfg = resolving_view(server_args)
    if BACKEND_NAME not in (cfg.decode_attention_backend, cfg.attention_backend):
        return result
    graphs = cfg.cuda_graph_config
    decode = graphs.decode.backend if graphs is not None else Backend.DISABLED
    if graphs is not None and graphs.prefill.backend != Backend.DISABLED:
        logger.warning(
            "TPLA: prefill CUDA graphs (%s) disabled: TPLA's extend path is not capture-safe", graphs.prefill.backend
        )
        declare_resolution(
            server_args, "_tpla_prefill_graphs_off", cuda_graph_config=with_phase(graphs, Phase.PREFILL, backend=Backend.DISABLED)
        )
    logger.info("TPLA: decode CUDA graph backend as SGLang resolved it: %s (the tpla backend captures decode)", decode)
    return result


def _mla_handler(attn, forward_batch):
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod

    return AttnForwardMethod.MLA


def install() -> None:
    from sglang.srt.arg_groups import choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry

    if BACKEND_NAME not in choices.ATTENTION_BACKEND_CHOICES:
        choices.ATTENTION_BACKEND_CHOICES.append(BACKEND_NAME)
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(TPLAAttnBackend)
    AttentionBackendRegistry.register(BACKEND_NAME, _mla_handler)
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGETS[4], _graph_phases, HookType.AFTER)
