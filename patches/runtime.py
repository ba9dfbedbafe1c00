"""The TPLA state of one SGLang worker process: is TPLA on, its settings and this rank's slice.

Resolved once per process from SGLang's published server args (``sglang.srt.runtime_context``)
and the model's HF config, validated (fail closed), then shared by every hook.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sglang_tpla.config import TPLAConfig, from_sources, validate_for_model
from sglang_tpla.layout import RankSlice, TPLALayout

logger = logging.getLogger("sglang_tpla")

BACKEND_NAME = "tpla"


@dataclass(frozen=True)
class TPLARuntime:
    config: TPLAConfig
    layout: TPLALayout
    rank: int

    @property
    def slice(self) -> RankSlice:
        return self.layout.rank_slice(self.rank)


_cache: dict[int, TPLARuntime | None] = {}
_current: TPLARuntime | None = None


@dataclass(frozen=True)
class NodeBasis:
    """The latent basis this node's weights are in, exchanged at PD bootstrap.

    ``fingerprint`` is ``identity`` for an untouched checkpoint, else the transform's
    fingerprint (folded at load, or by ``python -m sglang_tpla.convert``).
    """

    fingerprint: str
    kv_lora_rank: int
    qk_rope_head_dim: int
    source: str  # how it came about, for error messages


_basis: NodeBasis | None = None


def record_basis(basis: NodeBasis) -> None:
    global _basis
    _basis = basis


def node_basis() -> NodeBasis | None:
    """This process's latent basis, once its weights are loaded (None before, or for non-MLA models)."""
    return _basis


def current() -> TPLARuntime | None:
    """The TPLA runtime of this process (None when TPLA is off or not resolved yet)."""
    return _current


def _disagg_mode() -> str:
    from sglang.srt.runtime_context import get_server_args

    return str(getattr(get_server_args(), "disaggregation_mode", "null") or "null")


def prefill_basis(hf_config) -> TPLAConfig | None:
    """A PD prefill node given TPLA options folds the transform at load (exact MLA, no slicing)."""
    opts = getattr(hf_config, "tpla", None)
    if not opts or tpla_requested() or _disagg_mode() != "prefill":
        return None
    return from_sources(opts)


def tpla_requested() -> bool:
    """True when this server was started with the ``tpla`` attention backend for decode."""
    from sglang.srt.runtime_context import get_server_args

    args = get_server_args()
    return BACKEND_NAME in (getattr(args, "decode_attention_backend", None), getattr(args, "attention_backend", None))


def runtime_for(hf_config) -> TPLARuntime | None:
    """The TPLA runtime of this process for ``hf_config``, or None when TPLA is off."""
    global _current
    key = id(hf_config)
    if key in _cache:
        return _cache[key]
    rt = None
    opts = getattr(hf_config, "tpla", None)
    if not _cache:  # once per process: patches/server_args.py refused these at argument resolution already;
        # again here on the resolved values, for a launcher that resolved its arguments before loading plugins
        from sglang.srt.runtime_context import get_server_args

        from sglang_tpla.patches.server_args import check

        check(get_server_args(), resolved=True, warn=False)
    if tpla_requested():
        from sglang.srt.runtime_context import get_parallel

        par = get_parallel()
        cfg = from_sources(opts)
        layout = validate_for_model(cfg, hf_config, par.attn_tp_size)
        rt = TPLARuntime(cfg, layout, par.attn_tp_rank)
        s = rt.slice
        logger.info(
            "TPLA on: attn TP %d, g=%d, transform=%s, rank %d -> latent group %d cols [%d, %d) + RoPE, heads [%d, %d), "
            "pool row %d (MLA: %d)",
            layout.tp, layout.g, cfg.fingerprint(), rt.rank, s.group, s.latent_start, s.latent_end,
            s.head_start, s.head_end, layout.row_width, layout.mla_row_width,
        )
    elif opts and _disagg_mode() == "prefill":
        from_sources(opts)  # validated; the transform is folded by patches/weights.py (prefill_basis)
    elif opts:
        from sglang_tpla.config import TPLAConfigError

        raise TPLAConfigError(
            'TPLA options were given ("tpla" in --json-model-override-args) but TPLA is off: '
            "add --decode-attention-backend tpla (or --disaggregation-mode prefill for a PD prefill node that "
            "folds the same transform), or drop the options."
        )
    _cache[key] = rt
    if rt is not None:
        _current = rt
    return rt
