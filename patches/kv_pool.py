"""Latent-split KV pool: each rank's MLA pool row is its ``512/g`` latent slice + the 64 RoPE dims.

Hooks (SGLang 0.5.23):

* AROUND ``sglang.srt.mem_cache.kv_cache_configurator.calculate_mla_kv_cache_dim``: the
  per-token cell size the memory budget uses becomes ``512/g + 64``, so the server fits
  ``576 / (512/g + 64)`` times more tokens (``max_total_num_tokens``).
* AROUND ``sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mla_kv_pool``:
  builds :class:`TPLAMLATokenToKVPool` instead of ``MLATokenToKVPool``.

The pool stays an ``MLATokenToKVPool`` subclass, so PD transfer and the radix cache still
recognise an MLA pool.  Full 576-wide rows written by SGLang's own MLA/MHA prefill paths
are sliced on write (only this rank's latent columns and the RoPE key are kept).
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

from .runtime import runtime_for

HOOK_TARGETS = (
    "sglang.srt.mem_cache.kv_cache_configurator.calculate_mla_kv_cache_dim",
    "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mla_kv_pool",
    "sglang.srt.mem_cache.memory_pool.MLATokenToKVPool",
)


class TPLAMLATokenToKVPool(MLATokenToKVPool):
    """An MLA pool whose rows hold one latent slice ``[lo, hi)`` plus the RoPE key."""

    def __init__(self, *args, latent_range: tuple[int, int], full_kv_lora_rank: int, **kwargs):
        self.latent_range = latent_range
        self.full_kv_lora_rank = full_kv_lora_rank
        kwargs["kv_lora_rank"] = latent_range[1] - latent_range[0]
        super().__init__(*args, **kwargs)

    def slice_row(self, row: torch.Tensor) -> torch.Tensor:
        """``[..., full + rope]`` -> ``[..., slice + rope]``; rows already sliced pass through."""
        if row.shape[-1] == self.kv_lora_rank + self.qk_rope_head_dim:
            return row
        lo, hi = self.latent_range
        return torch.cat([row[..., lo:hi], row[..., self.full_kv_lora_rank :]], dim=-1)

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, *args, **kwargs):
        return super().set_kv_buffer(layer, loc_info, self.slice_row(cache_k), cache_v, *args, **kwargs)

    def set_mla_kv_buffer(self, layer, loc_info, cache_k_nope, cache_k_rope, *args, **kwargs):
        if cache_k_nope.shape[-1] == self.full_kv_lora_rank and self.kv_lora_rank != self.full_kv_lora_rank:
            lo, hi = self.latent_range
            cache_k_nope = cache_k_nope[..., lo:hi].contiguous()
        return super().set_mla_kv_buffer(layer, loc_info, cache_k_nope, cache_k_rope, *args, **kwargs)


def _cell_dim(orig, *args, model_config, **kwargs):
    """AROUND calculate_mla_kv_cache_dim: ``512/g + 64`` per token when TPLA is on."""
    rt = runtime_for(model_config.hf_config)
    if rt is None:
        return orig(*args, model_config=model_config, **kwargs)
    return rt.layout.row_width


def _build_pool(orig, self, *, max_total_num_tokens, mla_pool_class):
    """AROUND KVCacheConfigurator._build_mla_kv_pool: the latent-split pool when TPLA is on."""
    rt = runtime_for(self.model_config.hf_config)
    if rt is None:
        return orig(self, max_total_num_tokens=max_total_num_tokens, mla_pool_class=mla_pool_class)
    if mla_pool_class is not MLATokenToKVPool or self.kv_shard_rank is not None:
        raise RuntimeError(
            f"TPLA cannot combine its latent-split pool with {mla_pool_class.__name__} / --enable-kv-cache-sharding; "
            "drop one of them."
        )
    s = rt.slice

    class _Pool(TPLAMLATokenToKVPool):
        def __init__(self_, *a, **k):
            super().__init__(*a, latent_range=(s.latent_start, s.latent_end), full_kv_lora_rank=rt.layout.kv_lora_rank, **k)

    _Pool.__name__ = _Pool.__qualname__ = "TPLAMLATokenToKVPool"
    return orig(self, max_total_num_tokens=max_total_num_tokens, mla_pool_class=_Pool)


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGETS[0], _cell_dim, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS[1], _build_pool, HookType.AROUND)
