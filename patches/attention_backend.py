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
latent used as V.  The implementation is chosen by device and logged: a plain-PyTorch path
on CPU (the fp32 reference math, batched per request).
"""

from __future__ import annotations

import logging

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
)


def choose_implementation(device: torch.device) -> tuple[str, str]:
    """(implementation, reason) for this device."""
    if device.type == "cpu":
        return "torch", "CPU device: plain-PyTorch path"
    return "torch", f"{device.type} device: GPU kernels are not wired in yet, using the plain-PyTorch path"


class TPLAAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        self.runtime = runtime_for(model_runner.model_config.hf_config)  # validates: refuses non-MLA models
        self.device = torch.device(model_runner.device)
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.impl, reason = choose_implementation(self.device)
        logger.info("TPLA attention backend: implementation %r (%s)", self.impl, reason)
        self._slots = None

    def init_forward_metadata(self, forward_batch):
        if not forward_batch.forward_mode.is_decode_or_idle():
            self._slots = None
            return
        r2t = self.req_to_token_pool.req_to_token
        lens = forward_batch.seq_lens_cpu.tolist() if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens.tolist()
        self._slots = [r2t[int(i), : int(n)].long() for i, n in zip(forward_batch.req_pool_indices.tolist(), lens)]

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        d = layer.v_head_dim
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        rows = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        rows = rows.view(rows.shape[0], -1)
        out = q.new_empty(q.shape[0], layer.tp_q_head_num, d)
        for b, slots in enumerate(self._slots):
            ctx = rows[slots]
            out[b] = latent_attention(
                q[b : b + 1, :, :d].float(), q[b : b + 1, :, d:].float(), ctx[:, :d].float(), ctx[:, d:].float(), layer.scaling
            )[0].to(out.dtype)
        return out.view(q.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        raise RuntimeError(
            "the tpla backend serves decode only; prefill stays exact MLA on the prefill backend "
            "(use --decode-attention-backend tpla, not --attention-backend tpla)"
        )


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
