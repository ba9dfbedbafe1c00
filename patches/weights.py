"""Weights: fold the TPLA transform in at load time and build each rank's TPLA decode weights.

Hook (SGLang 0.5.23): AROUND
``sglang.srt.models.deepseek_common.deepseek_weight_loader.DeepseekV2WeightLoaderMixin.post_load_weights``,
which every loader runs after loading (``--load-format dummy`` too, via
``sglang.srt.model_loader.loader.post_load_weights``).  It runs inside ``model.load_weights``,
before the quant methods' ``process_weights_after_loading`` and before ModelRunner sizes the KV
pool (``alloc_memory_pool`` -> ``KVCacheConfigurator._profile_available_bytes`` reads the free
memory after ``load_model`` returns), so every tensor dropped here is already free when the pool
is sized.

Before SGLang splits ``kv_b_proj`` into ``w_kc``/``w_vc`` the transform is folded into this
rank's shards exactly (:func:`sglang_tpla.transforms.fold_layer`): the latent rows of the
replicated ``kv_a_proj_with_mqa`` (inside ``fused_qkv_a_proj_with_mqa``), the RMSNorm gain
and the latent columns of ``kv_b_proj``.  The folded model is still exact MLA, so prefill
(head-sharded, SGLang's own path) is unchanged.

Block-FP8 checkpoints (DeepSeek-V3 / R1 / Kimi-K2: float8_e4m3fn, ``weight_scale_inv`` per
128x128 block): a transform can only be folded into real numbers, so the two projections it
touches are dequantized (``fp8 * scale_inv`` in float32, then the model dtype) and kept in the
model dtype: ``kv_a_proj_with_mqa``'s rows are split off SGLang's fused FP8
``fused_qkv_a_proj_with_mqa`` (the fused module keeps only the ``q_a_proj`` rows and their
scale blocks, still FP8, as ``self_attn.q_a_proj``; the folded kv_a rows become a model-dtype
``self_attn.kv_a_proj_with_mqa``, SGLang's ``prepare_qkv_latent`` concatenates the two), and
``kv_b_proj`` becomes an unquantized linear (SGLang dequantizes it for ``w_kc``/``w_vc`` anyway;
its FP8 weight is still what the MHA prefill path would multiply with, so it must be folded
too).  The FP8 tensors they replace are released.  With transform ``none`` nothing is
dequantized.  Any other quantization of those two projections is refused at load with the fix.

TPLA's q and o projections keep no weight of their own: ``q_b_proj`` (``q_proj``) and
``o_proj`` stay SGLang's head-sharded modules with their own quant method (FP8 blocks run
SGLang's ``Fp8LinearMethod``), and the activations move instead (:mod:`sglang_tpla.comm`:
all-gather q and reduce-scatter the attention output over the ``g`` head peers, as DCP does).
Each attention module gets ``self.tpla`` with what TPLA adds: this rank's latent group's
columns of W_UK and rows of W_UV for the ``g*H/TP`` heads it attends (from this rank's and its
peers' ``kv_b_proj``, gathered once at load), and its peers.  SGLang's own ``w_kc``/``w_vc``
stay: the exact-MLA extend path (pd-sep prefill inside one server) uses them.  The log line
``TPLA: rank weight bytes`` gives this rank's resident weight bytes after all of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sglang_tpla.calibration import Calibration, ModelIdentity, weights_hash
from sglang_tpla.transforms import fold_layer, make_rotation

from .runtime import NodeBasis, TPLARuntime, prefill_basis, record_basis, runtime_for

logger = logging.getLogger("sglang_tpla")

HOOK_TARGETS = (
    "sglang.srt.models.deepseek_common.deepseek_weight_loader.DeepseekV2WeightLoaderMixin.post_load_weights",
    "sglang.srt.layers.quantization.fp8.Fp8LinearMethod.validate_block_quant_shapes",
    "sglang.srt.runtime_context.get_parallel",
    "sglang.srt.layers.linear.ReplicatedLinear",
    "sglang.srt.layers.quantization.unquant.UnquantizedLinearMethod",
)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_FP8 = (torch.float8_e4m3fn,)


class TPLAQuantError(RuntimeError):
    """A quantized projection TPLA cannot use; the message names the fix."""


@dataclass
class TPLALayerWeights:
    """One attention layer's TPLA decode weights on this rank (``Hg`` = heads of the rank)."""

    w_kc: torch.Tensor  # [Hg, nope, D]
    w_vc: torch.Tensor  # [Hg, D, v]
    num_heads: int
    latent_start: int
    latent_end: int
    runtime: TPLARuntime
    peers: object = None  # sglang_tpla.comm.HeadPeers: q all-gather / o reduce-scatter
    attn: object = None  # RadixAttention over the sliced pool, set by the attention hook
    # norm 'local': decode rows are this slice of the pre-norm latent over its own RMS, times
    # sqrt(g * p_j) (and the slice of the RMSNorm gain); None = exact RMSNorm over the full latent
    local_norm_scale: float | None = None


# --------------------------------------------------------------------------- weight bytes


def _tensors_of(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors_of(x)
    elif hasattr(obj, "__dataclass_fields__"):
        for f in obj.__dataclass_fields__:
            if f not in ("runtime", "peers", "attn"):
                yield from _tensors_of(getattr(obj, f, None))


def resident_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor ``model`` holds: parameters, buffers and tensor attributes of its
    modules (SGLang's ``w_kc``/``w_vc``/scales, TPLA's ``self.tpla`` slices), each storage counted
    once at its full size (a view keeps its whole storage alive).  Meta tensors count 0."""
    seen: dict[tuple, int] = {}
    for m in model.modules():
        items = list(m._parameters.values()) + list(m._buffers.values())
        items += [v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")]
        for t in _tensors_of(items):
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            seen[(t.device.type, st.data_ptr())] = st.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------- dequantization


def _block_size(module) -> tuple[int, int] | None:
    qm = getattr(module, "quant_method", None)
    bs = getattr(qm, "weight_block_size", None) or getattr(getattr(qm, "quant_config", None), "weight_block_size", None)
    return (int(bs[0]), int(bs[1])) if bs else None


def _method_name(module) -> str:
    qm = getattr(module, "quant_method", None)
    qc = getattr(qm, "quant_config", None)
    name = qc.get_name() if qc is not None and hasattr(qc, "get_name") else type(qm).__name__
    w = getattr(module, "weight", None)
    scales = ("block scales weight_scale_inv" if getattr(module, "weight_scale_inv", None) is not None
              else "per-tensor/channel weight_scale, no block scales" if getattr(module, "weight_scale", None) is not None
              else "no scales")
    return f"{name} ({type(qm).__name__}, weight {getattr(w, 'dtype', 'absent')}, {scales})"


def quant_kind(module) -> str:
    """``float``, ``block_fp8`` (float8_e4m3fn + float32 ``weight_scale_inv`` blocks) or ``other``."""
    w = getattr(module, "weight", None)
    if w is None:
        return "other"
    if w.dtype in _FLOATS:
        return "float"
    s = getattr(module, "weight_scale_inv", None)
    qm = getattr(module, "quant_method", None)
    if (w.dtype in _FP8 and s is not None and s.dtype == torch.float32 and _block_size(module) is not None
            and not getattr(qm, "use_mxfp8", False) and not getattr(s, "format_ue8m0", False)):
        return "block_fp8"
    return "other"


def dequantized(module, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
    """``module.weight`` (its ``rows``) as real numbers in ``dtype``: a float weight as is, a block-FP8
    one as ``fp8 * scale_inv`` per block in float32 (SGLang's ``block_quant_dequant``) then ``dtype``."""
    from sglang_tpla.tiny_model import dequantize_block_fp8

    kind = quant_kind(module)
    w = module.weight.data
    if kind == "float":
        return (w if rows is None else w[rows]).to(dtype)
    if kind != "block_fp8":
        raise TPLAQuantError(f"cannot dequantize {_method_name(module)}")
    bn, bk = _block_size(module)
    s = module.weight_scale_inv.data
    if rows is not None:
        lo, hi = rows.start or 0, w.shape[0] if rows.stop is None else rows.stop
        if lo % bn:
            raise TPLAQuantError(f"rows [{lo}, {hi}) do not start on a {bn}-row FP8 block")
        w, s = w[lo:hi], s[lo // bn : -(-hi // bn)]
    return dequantize_block_fp8(w, s, (bn, bk)).to(dtype)


def _refuse(attn, what: str, module, cfg, need: str) -> None:
    raise TPLAQuantError(
        f"TPLA (transform {cfg.transform!r}) {need} {what} of layer {attn.layer_id}, which is quantized as "
        f"{_method_name(module)}; TPLA can use only unquantized or block-FP8 (float8_e4m3fn + float32 "
        "weight_scale_inv, e.g. DeepSeek-V3 / R1 / Kimi-K2) projections there. Fix: serve the checkpoint with "
        "transform 'none' (nothing is folded, SGLang's own kernels run every quantized projection), or dequantize "
        "kv_a_proj_with_mqa / kv_b_proj (and q_a_proj) to bf16 first (for block-FP8, `python -m sglang_tpla.convert` "
        "does it while folding)."
    )


def _model_dtype(attn) -> torch.dtype:
    return attn.kv_a_layernorm.weight.dtype


def _kv_a_rows(attn) -> torch.Tensor:
    """The ``r + rope`` rows of ``kv_a_proj_with_mqa`` as real numbers (float32 for FP8, else as stored)."""
    r, rope = attn.kv_lora_rank, attn.qk_rope_head_dim
    if hasattr(attn, "fused_qkv_a_proj_with_mqa"):
        mod, lo = attn.fused_qkv_a_proj_with_mqa, attn.q_lora_rank
    else:
        mod, lo = attn.kv_a_proj_with_mqa, 0
    if quant_kind(mod) == "float":
        return mod.weight.data[lo : lo + r + rope]
    return dequantized(mod, torch.float32, slice(lo, lo + r + rope))


def _dense_linear(weight: torch.Tensor, prefix: str):
    """SGLang's unquantized ``ReplicatedLinear`` holding ``weight`` (no copy)."""
    from sglang.srt.layers.linear import ReplicatedLinear

    with torch.device("meta"):
        lin = ReplicatedLinear(weight.shape[1], weight.shape[0], bias=False, params_dtype=weight.dtype, prefix=prefix)
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    return lin


def _unquantize(module, weight: torch.Tensor) -> None:
    """Turn a quantized linear into an unquantized one holding ``weight`` (its FP8 tensors released)."""
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

    for name in ("weight_scale_inv", "weight_scale", "input_scale"):
        if name in module._parameters:
            del module._parameters[name]
        elif hasattr(module, name) and not isinstance(getattr(module, name), torch.nn.Module):
            setattr(module, name, None)
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    module.quant_method = UnquantizedLinearMethod()


def check_foldable(attn, cfg) -> None:
    """Refuse (with the fix) a layer whose kv_a / kv_b projections a transform cannot be folded into."""
    a_mod = attn.fused_qkv_a_proj_with_mqa if hasattr(attn, "fused_qkv_a_proj_with_mqa") else attn.kv_a_proj_with_mqa
    for what, mod in (("kv_a_proj_with_mqa (fused_qkv_a_proj_with_mqa)", a_mod), ("kv_b_proj", attn.kv_b_proj)):
        if quant_kind(mod) == "other":
            _refuse(attn, what, mod, cfg, "folds its latent rotation into")
    if hasattr(attn, "fused_qkv_a_proj_with_mqa") and quant_kind(a_mod) == "block_fp8":
        bn = _block_size(a_mod)[0]
        if attn.q_lora_rank % bn:
            raise TPLAQuantError(
                f"TPLA: layer {attn.layer_id}: q_lora_rank {attn.q_lora_rank} is not a multiple of the {bn}-row FP8 "
                "block, so q_a_proj and kv_a_proj_with_mqa share a scale block in fused_qkv_a_proj_with_mqa and the "
                "kv_a rows cannot be dequantized on their own. Fix: transform 'none', or dequantize the checkpoint's "
                "q_a_proj / kv_a_proj_with_mqa / kv_b_proj first (`python -m sglang_tpla.convert`)."
            )


def _fold(attn, rotation: torch.Tensor) -> dict:
    """Fold ``rotation`` into this layer; returns what was dequantized (module -> bytes added)."""
    r, rope = attn.kv_lora_rank, attn.qk_rope_head_dim
    dtype = _model_dtype(attn)
    fused = hasattr(attn, "fused_qkv_a_proj_with_mqa")
    a_mod = attn.fused_qkv_a_proj_with_mqa if fused else attn.kv_a_proj_with_mqa
    kvb = attn.kv_b_proj
    a_float, b_float = quant_kind(a_mod) == "float", quant_kind(kvb) == "float"
    off = attn.q_lora_rank if fused else 0
    b_in = kvb.weight.data if b_float else dequantized(kvb, torch.float32)
    a, ln, b = fold_layer(_kv_a_rows(attn), attn.kv_a_layernorm.weight.data, b_in, rotation)
    attn.kv_a_layernorm.weight.data.copy_(ln)
    added = {}
    if a_float:
        a_mod.weight.data[off : off + r + rope].copy_(a)
    elif fused:  # keep q_a_proj's rows FP8 (own module), kv_a rows in the model dtype
        bn = _block_size(a_mod)[0]
        a_mod.weight = torch.nn.Parameter(a_mod.weight.data[:off].clone(), requires_grad=False)
        a_mod.weight_scale_inv = torch.nn.Parameter(a_mod.weight_scale_inv.data[: off // bn].clone(), requires_grad=False)
        for k in ("output_size", "output_size_per_partition"):
            if hasattr(a_mod, k):
                setattr(a_mod, k, off)
        a_mod.logical_widths = [off]
        if hasattr(a_mod, "output_partition_sizes"):
            a_mod.output_partition_sizes = [off]
        attn.q_a_proj = a_mod
        del attn.fused_qkv_a_proj_with_mqa  # prepare_qkv_latent: cat(q_a_proj(x), kv_a_proj_with_mqa(x))
        attn.kv_a_proj_with_mqa = _dense_linear(a.to(dtype).contiguous(), a_mod.prefix.replace("fused_qkv_a_proj_with_mqa", "kv_a_proj_with_mqa") if hasattr(a_mod, "prefix") else "")
        added["kv_a_proj_with_mqa"] = a.numel() * (dtype.itemsize - 1)
    else:
        _unquantize(a_mod, a.to(dtype).contiguous())
        added["kv_a_proj_with_mqa"] = a.numel() * (dtype.itemsize - 1)
    if b_float:
        kvb.weight.data.copy_(b)
    else:
        _unquantize(kvb, b.to(dtype).contiguous())
        added["kv_b_proj"] = b.numel() * (dtype.itemsize - 1)
    return added


def _kv_b_heads(attn) -> torch.Tensor:
    """This rank's ``kv_b_proj`` rows ``[H/TP, nope + v, R]`` as real numbers in the model dtype:
    from the (float or block-FP8) ``kv_b_proj`` weight, else from SGLang's ``w_kc``/``w_vc``."""
    nope, vdim = attn.qk_nope_head_dim, attn.v_head_dim
    kvb = attn.kv_b_proj
    dtype = _model_dtype(attn)
    if quant_kind(kvb) != "other":
        return dequantized(kvb, dtype).unflatten(0, (-1, nope + vdim))
    w_kc, w_vc = getattr(attn, "w_kc", None), getattr(attn, "w_vc", None)
    scale = getattr(attn, "w_scale", None)
    if w_kc is not None and not getattr(attn, "use_deep_gemm_bmm", False):
        if w_kc.dtype in _FLOATS:
            return torch.cat([w_kc, w_vc.transpose(1, 2)], dim=1).to(dtype)
        if w_kc.dtype in _FP8 and scale is not None and scale.numel() == 1:
            return (torch.cat([w_kc.float(), w_vc.transpose(1, 2).float()], dim=1) * scale.float()).to(dtype)
    raise TPLAQuantError(
        f"TPLA needs layer {attn.layer_id}'s kv_b_proj (W_UK / W_UV) as real numbers to slice its latent columns, but it is "
        f"quantized as {_method_name(kvb)} and SGLang kept w_kc as {getattr(w_kc, 'dtype', None)}. Fix: serve a checkpoint "
        "whose kv_b_proj is unquantized or block-FP8 (DeepSeek-V3 format), or dequantize kv_b_proj to bf16 first."
    )


def _layer_weights(attn, rt: TPLARuntime, peers, mu: float | None, local_norm_scale: float | None = None) -> TPLALayerWeights:
    """W_UK columns / W_UV rows of this rank's latent slice for the heads it attends (its peers'
    stock shards, in peer order): this rank's kv_b rows all-gathered over its head peers."""
    s = rt.slice
    nope = attn.qk_nope_head_dim
    kvb = _kv_b_heads(attn)  # [H/TP, nope + v, R]
    if peers.coordinator is not None and peers.g > 1:
        kvb = peers.coordinator.all_gather(kvb.contiguous(), dim=0)  # [g*H/TP, nope + v, R]
    lat = slice(s.latent_start, s.latent_end)
    w_kc = kvb[:, :nope, lat].contiguous()
    if mu is not None:  # mu_j scales only the latent logit: fold it into this group's W_UK columns
        w_kc = (w_kc.float() * mu).to(w_kc.dtype)
    w_vc = kvb[:, nope:, lat].transpose(1, 2).contiguous()
    if w_kc.shape[0] != s.num_heads:
        raise RuntimeError(f"TPLA: layer {attn.layer_id}: gathered {w_kc.shape[0]} heads, layout says {s.num_heads}")
    return TPLALayerWeights(
        w_kc=w_kc, w_vc=w_vc, num_heads=s.num_heads, latent_start=s.latent_start, latent_end=s.latent_end,
        runtime=rt, peers=peers, local_norm_scale=local_norm_scale,
    )


def _latent_rows(attn) -> torch.Tensor:
    """``kv_a_proj_with_mqa[:r]`` as real numbers (FP8 dequantized, as the converter hashes it)."""
    return _kv_a_rows(attn)[: attn.kv_lora_rank]


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
    added: dict[str, int] = {}
    for attn, u in zip(layers, rotations):
        if u is not None:
            check_foldable(attn, cfg)
    for attn, u in zip(layers, rotations):
        if u is not None:
            for k, v in _fold(attn, u).items():
                added[k] = added.get(k, 0) + v
    if added:
        logger.info(
            "TPLA: dequantized FP8 projections to fold transform %s (kept in the model dtype; q_a_proj, q_b_proj, o_proj "
            "and the MLP stay FP8): %s",
            cfg.fingerprint(), ", ".join(f"{k} +{v / (1 << 20):.2f} MiB" for k, v in added.items()),
        )
    source = ("checkpoint converted by sglang_tpla.convert" if converted
              else "checkpoint as is" if cfg.transform == "none" else "folded at load")
    _record(self.config, cfg.fingerprint(), source)
    result = orig(self, is_nextn=is_nextn, weight_names=weight_names)
    if rt is None:  # PD prefill node: exact MLA in the agreed basis, nothing to slice
        logger.info("TPLA: PD prefill node, folded transform %s into %d layers (exact MLA)", cfg.fingerprint(), len(layers))
        return result
    from sglang_tpla.comm import head_peers, peer_heads

    g, group = rt.layout.g, rt.slice.group
    peers = head_peers(rt.layout.tp, g, rt.rank)
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
        attn.tpla = _layer_weights(attn, rt, peers, mu, scale)
    heads = peer_heads(rt.layout.tp, g, rt.rank, rt.layout.num_heads)
    tpla_bytes = sum(a.tpla.w_kc.untyped_storage().nbytes() + a.tpla.w_vc.untyped_storage().nbytes() for a in layers)
    logger.info(
        "TPLA: folded transform %s into %d layers and built per-rank decode weights (mu=%s, norm=%s); this rank attends "
        "heads %s (its head peers' SGLang shards: q all-gathered, o reduce-scattered; no q/o weight copies)",
        cfg.fingerprint(), len(layers), cfg.mu, cfg.norm, _ranges(heads),
    )
    logger.info(
        "TPLA: rank %d weight bytes %d (%.2f MiB resident after TPLA; its own W_UK/W_UV slices %.2f MiB)",
        rt.rank, resident_weight_bytes(self), resident_weight_bytes(self) / (1 << 20), tpla_bytes / (1 << 20),
    )
    return result


def _ranges(ids: list[int]) -> str:
    out, start = [], None
    for i, h in enumerate(ids):
        if start is None:
            start = h
        if i + 1 == len(ids) or ids[i + 1] != h + 1:
            out.append(f"[{start}, {h + 1})")
            start = None
    return " ".join(out)


def _block_shapes(orig, *args, **kwargs):
    """AROUND ``Fp8LinearMethod.validate_block_quant_shapes``: with TPLA requested, say what the
    refusal means and how to fix it (SGLang's head sharding cannot split an FP8 scale block)."""
    try:
        return orig(*args, **kwargs)
    except ValueError as e:
        from .runtime import tpla_requested

        if not tpla_requested():
            raise
        layer = args[0] if args else kwargs.get("layer")
        qc = args[1] if len(args) > 1 else kwargs.get("quant_config")
        bs = getattr(qc, "weight_block_size", None)
        raise ValueError(
            f"{e} ({getattr(layer, 'prefix', type(layer).__name__)}): with block-FP8 weights every TP rank's share of a "
            f"head-sharded projection must be whole {bs} blocks (TPLA keeps SGLang's sharding of q_b_proj / kv_b_proj / "
            "o_proj and never splits a scale block). Fix: choose a --tp-size for which (heads / TP) x (qk_nope + "
            "qk_rope) and (heads / TP) x (qk_nope + v) are multiples of the block rows (e.g. an even number of heads "
            "per rank for 128-row blocks), or dequantize the checkpoint to bf16."
        ) from None


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGETS[0], _post_load_weights, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS[1], _block_shapes, HookType.AROUND)
