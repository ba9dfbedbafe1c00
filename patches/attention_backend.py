"""The ``tpla`` attention backend: TPLA decode over this rank's latent slice.

Seams (SGLang 0.5.23):

* ``sglang.srt.layers.attention.attention_registry.register_attention_backend("tpla")``: the
  factory SGLang calls for ``--decode-attention-backend tpla``.
* ``sglang.srt.arg_groups.choices.ATTENTION_BACKEND_CHOICES``: ``tpla`` appended so the CLI
  accepts it.
* ``AttentionBackendRegistry.register("tpla", ...)``: the DeepSeek forward-method handler
  for batches run by this backend (absorbed MLA).

The backend receives queries of all heads of the rank's group (``[T, Hg, D + 64]``), writes
the new row (already sliced) into the latent-split pool and attends over the slice, the
latent used as V.  The implementation is chosen per rank by :mod:`sglang_tpla.kernels.select`
and logged: FlashInfer MLA (``head_dim_ckv = 512/g``, planned once per step) on CUDA, the
Triton kernel as fallback, the plain-PyTorch path (the fp32 reference math) on CPU.

Also AFTER ``sglang.srt.arg_groups.cuda_graph_hook.handle_cuda_graph_config``: CUDA graphs
are switched off when ``tpla`` is selected (no capture support yet), with a log line.
"""

from __future__ import annotations

import logging
import os

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_tpla.reference import latent_attention

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
)


def _flashinfer_version() -> str | None:
    try:
        import flashinfer

        return flashinfer.__version__
    except Exception:  # noqa: BLE001 - missing or broken install: not usable
        return None


def choose_implementation(device: torch.device, d_ckv: int, dtype: torch.dtype):
    from sglang_tpla.kernels.select import choose

    sm = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return choose(
        device.type, d_ckv, str(dtype).removeprefix("torch."), sm,
        _flashinfer_version() if device.type == "cuda" else None, os.environ.get("SGLANG_TPLA_IMPL") or None,
    )


class TPLAAttnBackend(AttentionBackend):
    """Decode attention over the rank's latent slice, all heads of its group, own softmax."""

    def __init__(self, model_runner):
        super().__init__()
        self.runtime = runtime_for(model_runner.model_config.hf_config)  # validates: refuses non-MLA models
        self.device = torch.device(model_runner.device)
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.choice = choose_implementation(self.device, self.runtime.layout.slice_width, model_runner.kv_cache_dtype)
        logger.info("TPLA attention backend: implementation %r (%s)", self.choice.impl, self.choice.reason)
        self._flashinfer = None
        self._need_plan = False
        self.kv_indptr = self.kv_indices = None
        self._slots = None

    def init_forward_metadata(self, forward_batch):
        """Once per step: the batch's token slots (``kv_indptr`` / ``kv_indices``, int32)."""
        if not forward_batch.forward_mode.is_decode_or_idle():
            self._slots = None
            return
        r2t = self.req_to_token_pool.req_to_token
        lens = forward_batch.seq_lens_cpu.tolist() if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens.tolist()
        self._slots = [r2t[int(i), : int(n)].long() for i, n in zip(forward_batch.req_pool_indices.tolist(), lens)]
        if self.choice.impl != "torch":
            indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
            indptr[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
            self.kv_indptr = indptr.to(self.device)
            self.kv_indices = (torch.cat(self._slots) if self._slots else torch.zeros(0, dtype=torch.long)).to(self.device, torch.int32)
            self._need_plan = True  # FlashInfer: plan at the first layer, reuse for the others

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        d = layer.v_head_dim
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        rows = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        if self.choice.impl == "flashinfer":
            out = self._flashinfer_runner(layer, q.dtype).run(q[..., :d], q[..., d:], rows)
        elif self.choice.impl == "triton":
            from sglang_tpla.kernels.tpla_decode import tpla_decode_attention

            flat = rows.view(rows.shape[0], -1)
            out = tpla_decode_attention(q[..., :d], q[..., d:], flat[:, :d], flat[:, d:], self.kv_indptr, self.kv_indices, layer.scaling)
        else:
            flat = rows.view(rows.shape[0], -1)
            out = q.new_empty(q.shape[0], layer.tp_q_head_num, d)
            for b, slots in enumerate(self._slots):
                ctx = flat[slots]
                out[b] = latent_attention(
                    q[b : b + 1, :, :d].float(), q[b : b + 1, :, d:].float(), ctx[:, :d].float(), ctx[:, d:].float(), layer.scaling
                )[0].to(out.dtype)
        return out.reshape(q.shape[0], -1)

    def _flashinfer_runner(self, layer, dtype):
        from sglang_tpla.kernels.flashinfer_decode import FlashInferTPLADecode

        if self._flashinfer is None:
            self._flashinfer = FlashInferTPLADecode(
                self.device, self.choice.flashinfer_backend, layer.tp_q_head_num, layer.v_head_dim,
                layer.qk_head_dim - layer.v_head_dim, layer.scaling, dtype,
            )
        if self._need_plan:
            self._flashinfer.plan(self.kv_indptr, self.kv_indices)
            self._need_plan = False
        return self._flashinfer

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        raise RuntimeError(
            "the tpla backend serves decode only; prefill stays exact MLA on the prefill backend "
            "(use --decode-attention-backend tpla, not --attention-backend tpla)"
        )


def _no_cuda_graphs(result, server_args, *args, **kwargs):
    """AFTER handle_cuda_graph_config: the tpla backend has no graph-capture support yet, so
    CUDA graphs are switched off (decode and prefill) when it is selected, and the log says so."""
    from sglang.srt.arg_groups.cuda_graph_hook import declare_resolution, resolving_view
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    cfg = resolving_view(server_args)
    if BACKEND_NAME not in (cfg.decode_attention_backend, cfg.attention_backend):
        return result
    graphs = cfg.cuda_graph_config
    if graphs is None or all(getattr(graphs, p).backend == Backend.DISABLED for p in Phase.ALL):
        return result
    for phase in Phase.ALL:
        graphs = with_phase(graphs, phase, backend=Backend.DISABLED)
    declare_resolution(server_args, "_tpla_no_cuda_graphs", cuda_graph_config=graphs)
    logger.warning("TPLA: CUDA graphs disabled: the tpla decode backend does not support graph capture yet")
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

    HookRegistry.register(HOOK_TARGETS[4], _no_cuda_graphs, HookType.AFTER)
