"""The TPLA state of one SGLang worker process: is TPLA on, its settings and this rank's slice.

Resolved once per process from SGLang's published server args (``sglang.srt.runtime_context``)
and the model's HF config, validated (fail closed), then shared by every hook.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sglang_tpla.config import TPLAConfig, check_server_compat, from_sources, validate_for_model
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


def tpla_requested() -> bool:
    """True when this server was started with the ``tpla`` attention backend for decode."""
    from sglang.srt.runtime_context import get_server_args

    args = get_server_args()
    return BACKEND_NAME in (getattr(args, "decode_attention_backend", None), getattr(args, "attention_backend", None))


def runtime_for(hf_config) -> TPLARuntime | None:
    """The TPLA runtime of this process for ``hf_config``, or None when TPLA is off."""
    key = id(hf_config)
    if key in _cache:
        return _cache[key]
    rt = None
    opts = getattr(hf_config, "tpla", None)
    if tpla_requested():
        from sglang.srt.runtime_context import get_parallel, get_server_args

        args = get_server_args()
        check_server_compat(
            getattr(args, "attn_dp_size", 1), getattr(args, "dcp_size", 1), getattr(args, "pp_size", 1),
            getattr(args, "speculative_algorithm", None),
        )
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
    elif opts:
        from sglang_tpla.config import TPLAConfigError

        raise TPLAConfigError(
            'TPLA options were given ("tpla" in --json-model-override-args) but TPLA is off: '
            "add --decode-attention-backend tpla, or drop the options."
        )
    _cache[key] = rt
    return rt
