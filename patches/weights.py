"""Weights: fold the TPLA transform in at load time and build each rank's TPLA decode weights.

Hook (SGLang 0.5.23): AROUND
``sglang.srt.models.deepseek_common.deepseek_weight_loader.DeepseekV2WeightLoaderMixin.post_load_weights``,
which every loader runs after loading (``--load-format dummy`` too, via
``sglang.srt.model_loader.loader.post_load_weights``).

Before SGLang splits ``kv_b_proj`` into ``w_kc``/``w_vc`` the transform is folded into this
rank's shards exactly (:func:`sglang_tpla.transforms.fold_layer`): the latent rows of the
replicated ``kv_a_proj_with_mqa`` (inside ``fused_qkv_a_proj_with_mqa``), the RMSNorm gain
and the latent columns of ``kv_b_proj``.  The folded model is still exact MLA, so prefill
(head-sharded, SGLang's own path) is unchanged.  After it, the head-sharded ``q_b_proj``
(``q_proj``), ``kv_b_proj`` and ``o_proj`` shards are all-gathered once over the attention TP
group, and each attention module gets ``self.tpla`` with the decode weights of this rank:
its latent group's columns of W_UK / rows of W_UV and its heads inside the group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sglang_tpla.calibration import Calibration, ModelIdentity, weights_hash
from sglang_tpla.transforms import fold_layer, make_rotation

from .runtime import NodeBasis, TPLARuntime, prefill_basis, record_basis, runtime_for

logger = logging.getLogger("sglang_tpla")

HOOK_TARGETS = (
    "sglang.srt.models.deepseek_common.deepseek_weight_loader.DeepseekV2WeightLoaderMixin.post_load_weights",
    "sglang.srt.distributed.parallel_state.get_attn_tp_group",
)


@dataclass
class TPLALayerWeights:
    """One attention layer's TPLA decode weights on this rank (``Hg`` = heads of the rank)."""

    q_weight: torch.Tensor  # [Hg * (nope + rope), q_lora or hidden]
    w_kc: torch.Tensor  # [Hg, nope, D]
    w_vc: torch.Tensor  # [Hg, D, v]
    o_weight: torch.Tensor  # [hidden, Hg * v]
    num_heads: int
    latent_start: int
    latent_end: int
    runtime: TPLARuntime
    attn: object = None  # RadixAttention over the sliced pool, set by the attention hook
    # norm 'local': decode rows are this slice of the pre-norm latent over its own RMS, times
    # sqrt(g * p_j) (and the slice of the RMSNorm gain); None = exact RMSNorm over the full latent
    local_norm_scale: float | None = None


def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    from sglang.srt.distributed.parallel_state import get_attn_tp_group

    group = get_attn_tp_group()
    if group.world_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(group.world_size)]
    dist.all_gather(parts, t.contiguous(), group=group.device_group)
    return torch.cat(parts, dim=dim)


def _fold(attn, rotation: torch.Tensor) -> None:
    r = attn.kv_lora_rank
    if hasattr(attn, "fused_qkv_a_proj_with_mqa"):
        a_w, off = attn.fused_qkv_a_proj_with_mqa.weight, attn.q_lora_rank
    else:
        a_w, off = attn.kv_a_proj_with_mqa.weight, 0
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if a_w.dtype not in floats or attn.kv_b_proj.weight.dtype not in floats:
        raise RuntimeError(
            f"TPLA cannot fold a transform into quantized MLA projections ({a_w.dtype}, {attn.kv_b_proj.weight.dtype}); "
            "serve an unquantized (bf16/fp16/fp32) checkpoint or use transform 'none'."
        )
    rows = a_w.data[off : off + r + attn.qk_rope_head_dim]
    a, ln, b = fold_layer(rows, attn.kv_a_layernorm.weight.data, attn.kv_b_proj.weight.data, rotation)
    rows.copy_(a)
    attn.kv_a_layernorm.weight.data.copy_(ln)
    attn.kv_b_proj.weight.data.copy_(b)


def _layer_weights(attn, rt: TPLARuntime, mu: float | None, local_norm_scale: float | None = None) -> TPLALayerWeights:
    s = rt.slice
    nope, rope, vdim = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    q_mod = attn.q_b_proj if hasattr(attn, "q_b_proj") else attn.q_proj
    q_full = _gather(q_mod.weight.data, 0).unflatten(0, (-1, nope + rope))
    kvb = _gather(attn.kv_b_proj.weight.data, 0).unflatten(0, (-1, nope + vdim))  # [H, nope+v, R]
    o_full = _gather(attn.o_proj.weight.data, 1)  # [hidden, H*v]
    heads = slice(s.head_start, s.head_end)
    lat = slice(s.latent_start, s.latent_end)
    w_k, w_v = kvb[heads].split([nope, vdim], dim=1)
    w_kc = w_k[:, :, lat].contiguous()
    if mu is not None:  # mu_j scales only the latent logit: fold it into this group's W_UK columns
        w_kc = (w_kc.float() * mu).to(w_kc.dtype)
    return TPLALayerWeights(
        q_weight=q_full[heads].flatten(0, 1).contiguous(),
        w_kc=w_kc,
        w_vc=w_v[:, :, lat].transpose(1, 2).contiguous(),
        o_weight=o_full[:, s.head_start * vdim : s.head_end * vdim].contiguous(),
        num_heads=s.num_heads,
        latent_start=s.latent_start,
        latent_end=s.latent_end,
        runtime=rt,
        local_norm_scale=local_norm_scale,
    )


def _latent_rows(attn) -> torch.Tensor:
    if hasattr(attn, "fused_qkv_a_proj_with_mqa"):
        return attn.fused_qkv_a_proj_with_mqa.weight.data[attn.q_lora_rank : attn.q_lora_rank + attn.kv_lora_rank]
    return attn.kv_a_proj_with_mqa.weight.data[: attn.kv_lora_rank]


def model_identity(model, layers) -> ModelIdentity:
    cfg = model.config
    return ModelIdentity(
        architecture=(getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        kv_lora_rank=cfg.kv_lora_rank,
        num_layers=cfg.num_hidden_layers,
        weights_hash=weights_hash([_latent_rows(a) for a in layers]),
    )


def _file_rotations(calib: Calibration, cfg) -> list[torch.Tensor]:
    """The per-layer rotations a calibration file holds for ``cfg`` ('pca', or 'fit' for ``cfg.g``);
    a file without a fit for this g is refused with the command that adds one."""
    from sglang_tpla.calibration import CalibrationError

    try:
        return calib.rotations_for(cfg.transform, cfg.g)
    except CalibrationError as e:
        raise RuntimeError(f"TPLA transform {cfg.transform!r} with {cfg.calibration!r}: {e}") from None


def _record(hf_config, fingerprint: str, source: str) -> None:
    if getattr(hf_config, "kv_lora_rank", None):
        record_basis(NodeBasis(fingerprint, hf_config.kv_lora_rank, hf_config.qk_rope_head_dim, source))


def _post_load_weights(orig, self, is_nextn: bool = False, weight_names=None):
    """AROUND post_load_weights: fold the transform, let SGLang split w_kc/w_vc, then slice for TPLA."""
    rt = runtime_for(self.config)
    if is_nextn:
        return orig(self, is_nextn=is_nextn, weight_names=weight_names)
    cfg = rt.config if rt is not None else prefill_basis(self.config)
    if cfg is None:  # plain MLA: record the checkpoint's basis for the PD bootstrap exchange
        converted = getattr(self.config, "tpla_transform", None) or {}
        _record(self.config, converted.get("fingerprint", "identity"),
                "checkpoint converted by sglang_tpla.convert" if converted else "checkpoint as is")
        return orig(self, is_nextn=is_nextn, weight_names=weight_names)
    if self.model.start_layer != 0 or self.model.end_layer != self.config.num_hidden_layers:
        raise RuntimeError("TPLA does not support pipeline parallelism yet; run with --pp-size 1.")
    layers = [self.model.layers[i].self_attn for i in range(self.model.start_layer, self.model.end_layer)]
    if any(getattr(a, "tpla", None) is not None for a in layers):
        raise RuntimeError("TPLA does not support reloading weights into a running server (update_weights); restart it.")
    r = layers[0].kv_lora_rank
    hadamard = [make_rotation("hadamard", r, seed=cfg.seed)] * len(layers) if cfg.transform == "hadamard" else None
    calib = None
    converted = getattr(self.config, "tpla_transform", None)  # written by `python -m sglang_tpla.convert`
    if converted:
        if converted.get("fingerprint") != cfg.fingerprint():
            raise RuntimeError(
                f"TPLA: this checkpoint was converted with transform {converted.get('fingerprint')!r}, but the server is "
                f"configured for {cfg.fingerprint()!r}; set the same transform (and seed / calibration file) or serve "
                "the unconverted checkpoint."
            )
        if cfg.transform in ("pca", "fit"):  # the latent rows are already rotated: the identity check no longer applies
            calib = Calibration.load(cfg.calibration)
        rotations = [None] * len(layers)  # already folded into the checkpoint
        logger.info("TPLA: checkpoint already converted (%s); not folding again", converted.get("fingerprint"))
    elif cfg.transform in ("pca", "fit"):
        calib = Calibration.load(cfg.calibration, expect=model_identity(self, layers))
        rotations = _file_rotations(calib, cfg)
    elif hadamard is not None:
        rotations = hadamard
    else:
        rotations = [None] * len(layers)
    if calib is None and cfg.mu == "lsq":  # lsq fits mu on the file's logit pairs, for any transform
        calib = Calibration.load(cfg.calibration, expect=None if converted else model_identity(self, layers))
    # the latent basis the decode runs in (for the lsq fit), folded now or already by the converter
    basis = hadamard or (_file_rotations(calib, cfg) if cfg.transform in ("pca", "fit") else [None] * len(layers))
    for attn, u in zip(layers, rotations):
        if u is not None:
            _fold(attn, u)
    source = ("checkpoint converted by sglang_tpla.convert" if converted
              else "checkpoint as is" if cfg.transform == "none" else "folded at load")
    _record(self.config, cfg.fingerprint(), source)
    result = orig(self, is_nextn=is_nextn, weight_names=weight_names)
    if rt is None:  # PD prefill node: exact MLA in the agreed basis, nothing to slice
        logger.info("TPLA: PD prefill node, folded transform %s into %d layers (exact MLA)", cfg.fingerprint(), len(layers))
        return result
    g, group = rt.layout.g, rt.slice.group
    if cfg.mu == "lsq" and not calib.has_lsq:
        raise RuntimeError(
            f"TPLA mu 'lsq': calibration file {cfg.calibration!r} holds no logit pairs (made before format 2 or with "
            "--lsq-pairs 0); recreate it with `python -m sglang_tpla.calibrate ...` or use mu 'one'/'inv_p'."
        )
    for i, attn in enumerate(layers):
        mu, scale = None, None
        p_all = (calib.shard_energy_fractions(i, g, cfg.transform) if cfg.transform in ("pca", "fit")
                 else torch.full((g,), 1.0 / g, dtype=torch.float64))
        if cfg.mu == "inv_p" and g > 1:
            mu = 1.0 / float(p_all[group])
        elif cfg.mu == "lsq" and g > 1:
            fit = calib.lsq_logit_scales(
                i, g, basis[i], cfg.norm, p_all if cfg.norm == "local" else None, float(attn.kv_a_layernorm.variance_epsilon)
            )
            mu = float(fit[group])
            logger.info("TPLA: layer %d lsq logit scales %s (this rank: group %d)", i, [round(float(x), 4) for x in fit], group)
        if cfg.norm == "local":
            scale = float(torch.sqrt(g * p_all[group]))
        attn.tpla = _layer_weights(attn, rt, mu, scale)
    logger.info(
        "TPLA: folded transform %s into %d layers and built per-rank decode weights (mu=%s, norm=%s)",
        cfg.fingerprint(), len(layers), cfg.mu, cfg.norm,
    )
    return result


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGETS[0], _post_load_weights, HookType.AROUND)
