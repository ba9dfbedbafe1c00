"""Tiny DeepSeek-V3-architecture models built locally (no hub): config, random weights, safetensors.

Real MLA dims (kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128),
few dense layers (``first_k_dense_replace >= num_hidden_layers``), a small hidden size, and
the keys SGLang reads from real DeepSeek configs (``moe_layer_freq``, ``topk_method``,
``scoring_func``, a yarn ``rope_scaling``).  HF transformers and SGLang load the same
directory, so both serve the same weights.

Pure PyTorch (+ safetensors): no sglang.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def tiny_config(
    num_hidden_layers: int = 2,
    hidden_size: int = 256,
    num_attention_heads: int = 8,
    q_lora_rank: int | None = 192,
    vocab_size: int = 512,
    intermediate_size: int = 512,
    max_position_embeddings: int = 4096,
    **overrides,
) -> dict:
    """A DeepSeek-V3 config dict with real MLA dims and dense layers only."""
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "moe_intermediate_size": 128,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_attention_heads,
        "n_shared_experts": 1,
        "n_routed_experts": 4,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512,
        "q_lora_rank": q_lora_rank,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": 2,
        "moe_layer_freq": 1,
        "first_k_dense_replace": num_hidden_layers,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_interleave": True,
        "rope_scaling": {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": max_position_embeddings // 4,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    if cfg["first_k_dense_replace"] < cfg["num_hidden_layers"]:
        raise ValueError("tiny models are dense-only: first_k_dense_replace must be >= num_hidden_layers")
    return cfg


def random_state_dict(cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random HF-layout weights with fan-in scaling and non-trivial norm gains."""
    gen = torch.Generator().manual_seed(seed)

    def lin(out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
        return (torch.randn(out_f, in_f, generator=gen) * (gain / math.sqrt(in_f))).to(dtype)

    def norm(n: int) -> torch.Tensor:
        return (0.5 + torch.rand(n, generator=gen)).to(dtype)

    hid, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, vdim, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    qk = nope + rope
    sd = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], hid, generator=gen).to(dtype)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(hid)
        sd[p + "post_attention_layernorm.weight"] = norm(hid)
        a = p + "self_attn."
        if cfg.get("q_lora_rank"):
            ql = cfg["q_lora_rank"]
            sd[a + "q_a_proj.weight"] = lin(ql, hid)
            sd[a + "q_a_layernorm.weight"] = norm(ql)
            sd[a + "q_b_proj.weight"] = lin(heads * qk, ql, )
        else:
            sd[a + "q_proj.weight"] = lin(heads * qk, hid, )
        sd[a + "kv_a_proj_with_mqa.weight"] = lin(r + rope, hid)
        sd[a + "kv_a_layernorm.weight"] = norm(r)
        sd[a + "kv_b_proj.weight"] = lin(heads * (nope + vdim), r, )
        sd[a + "o_proj.weight"] = lin(hid, heads * vdim)
        m = p + "mlp."
        sd[m + "gate_proj.weight"] = lin(cfg["intermediate_size"], hid)
        sd[m + "up_proj.weight"] = lin(cfg["intermediate_size"], hid)
        sd[m + "down_proj.weight"] = lin(hid, cfg["intermediate_size"])
    sd["model.norm.weight"] = norm(hid)
    sd["lm_head.weight"] = lin(cfg["vocab_size"], hid, gain=2.0)
    return sd


def save_model(path: str | Path, cfg: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (loadable by HF transformers and SGLang)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def load_model(path: str | Path, dtype: torch.dtype | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Config and state dict of a model dir; ``dtype`` casts the floating-point tensors.

    The fp32 reference must be built from ``dtype=torch.float32`` *before* a transform is
    folded in: folding keeps the input dtype, so folding a bf16 checkpoint as stored rounds the
    folded weights to bf16, while a server run with ``--dtype float32`` folds in fp32.

    A block-FP8 checkpoint (:func:`build_tiny_fp8_model_dir`, or any ``quantization_config``
    ``{"quant_method": "fp8", "weight_block_size": [bo, bi]}`` with ``<name>_scale_inv`` tensors)
    is dequantized when ``dtype`` is given (:func:`dequantize_state_dict`: ``fp8 * scale_inv``
    per block in float32, then ``dtype``; the ``_scale_inv`` tensors are dropped), so the
    reference runs on exactly the weights the CPU platform's block-FP8 linear multiplies with.
    With ``dtype=None`` the tensors are returned as stored (fp8 weights and their scales).
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    if dtype is not None:
        block = fp8_block_size(cfg)
        if block is not None:
            sd = dequantize_state_dict(sd, block)
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return cfg, sd


# --------------------------------------------------------------------------- block FP8 (DeepSeek-V3 format)

# DeepSeek-V3 / R1 / Kimi-K2 ``config.json`` ``quantization_config``.
FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max

# Linear weights DeepSeek-V3 stores in FP8 (attention projections and MLP / expert projections);
# everything else (embed_tokens, lm_head, every RMSNorm gain incl. q_a_layernorm / kv_a_layernorm,
# the MoE router ``mlp.gate`` and its ``e_score_correction_bias``) stays in the model dtype.
# SGLang's Fp8Config.get_quant_method quantizes every LinearBase layer (and FusedMoE experts) not in
# ignored_layers, and nothing else: ParallelLMHead / VocabParallelEmbedding are not LinearBase and
# the router (MoEGate) holds a plain parameter.  For MLA, SGLang's DeepSeek loader then dequantizes
# kv_b_proj into w_kc / w_vc at load (bf16 on CUDA; the CPU platform: the model dtype).
_FP8_LINEARS = (
    "self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.q_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight",
    "gate_proj.weight", "up_proj.weight", "down_proj.weight",
)


def fp8_block_size(cfg: dict) -> tuple[int, int] | None:
    """``(rows, cols)`` of a block-FP8 ``quantization_config``, else None."""
    qc = cfg.get("quantization_config") or {}
    bs = qc.get("weight_block_size")
    if str(qc.get("quant_method", "")).lower() != "fp8" or not bs or len(bs) != 2:
        return None
    return int(bs[0]), int(bs[1])


def is_fp8_linear(name: str) -> bool:
    """Is ``name`` a weight DeepSeek-V3 stores in block FP8 (a decoder layer's linear projection)?"""
    return name.startswith("model.layers.") and name.endswith(_FP8_LINEARS)


def quantize_block_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight quantization: float8_e4m3fn weight and float32 ``weight_scale_inv`` of
    shape ``[ceil(out/bo), ceil(in/bi)]`` with ``w ~= fp8 * scale_inv`` per block and
    ``scale_inv = amax(|block|) / 448`` (edge blocks partial)."""
    out_f, in_f = w.shape
    bo, bi = block
    so, si = math.ceil(out_f / bo), math.ceil(in_f / bi)
    pad = torch.zeros(so * bo, si * bi, dtype=torch.float32)
    pad[:out_f, :in_f] = w.float()
    blocks = pad.view(so, bo, si, bi)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(1e-12)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(so * bo, si * bi)[:out_f, :in_f].clone(memory_format=torch.contiguous_format), scale  # own storage, no padding


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """float32 ``weight * scale_inv``, one scale per ``block = (rows, cols)`` tile (edge tiles partial):
    the same product SGLang's ``block_quant_dequant`` and the CPU platform's block-FP8 linear form."""
    out_f, in_f = weight.shape
    bo, bi = block
    want = (math.ceil(out_f / bo), math.ceil(in_f / bi))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv of shape {tuple(scale_inv.shape)} does not fit a {out_f}x{in_f} weight with {bo}x{bi} blocks (expected {want})")
    s = scale_inv.float().repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
    return weight.float() * s


def quantize_state_dict(sd: dict[str, torch.Tensor], block: tuple[int, int] = (128, 128), model_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """DeepSeek-V3's layout: :func:`is_fp8_linear` weights as float8_e4m3fn plus ``<name>_scale_inv``,
    every other tensor cast to ``model_dtype``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if is_fp8_linear(k) and v.dim() == 2:
            out[k], out[k + "_scale_inv"] = quantize_block_fp8(v, block)
        else:
            out[k] = v.to(model_dtype) if v.is_floating_point() else v
    return out


def dequantize_state_dict(sd: dict[str, torch.Tensor], block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
    """float32 weights of a block-FP8 state dict (``_scale_inv`` tensors consumed); other tensors unchanged."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("_scale_inv") and k.removesuffix("_scale_inv") in sd:
            continue
        if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            s = sd.get(k + "_scale_inv")
            if s is None:
                raise ValueError(f"{k} is {v.dtype} but {k}_scale_inv is missing (only block-quantized FP8 is supported)")
            out[k] = dequantize_block_fp8(v, s, block)
        else:
            out[k] = v
    return out


def tiny_fp8_config(**overrides) -> dict:
    """:func:`tiny_config` with DeepSeek-V3's block-FP8 ``quantization_config`` and bf16 ``torch_dtype``.

    ``q_lora_rank`` defaults to 256: SGLang fuses ``q_a_proj`` with ``kv_a_proj_with_mqa`` and
    needs the q part to end on a 128-row block (DeepSeek-V3: 1536).  Per TP rank the
    head-sharded ``q_b_proj`` rows (``heads/TP * 192``) must fill whole 128-row blocks too, so
    ``heads/TP`` must be even (8 heads: TP 1, 2, 4).
    """
    overrides.setdefault("q_lora_rank", 256)
    overrides.setdefault("torch_dtype", "bfloat16")
    cfg = tiny_config(**overrides)
    cfg["quantization_config"] = dict(FP8_QUANT_CONFIG)
    return cfg


def build_tiny_fp8_model_dir(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """A complete tiny DeepSeek-V3 directory in DeepSeek-V3's published block-FP8 format.

    The random fp32 weights of :func:`random_state_dict` (same seed, same config) are quantized
    like the published checkpoints: every decoder-layer linear (``q_a_proj``, ``q_b_proj``,
    ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``, the MLP ``gate/up/down_proj``) to
    float8_e4m3fn with a 128x128-block float32 ``weight_scale_inv``; embeddings, ``lm_head`` and
    every norm gain stay bf16.  :func:`load_model` with a ``dtype`` dequantizes it again.
    """
    cfg = tiny_fp8_config(**config_overrides)
    block = fp8_block_size(cfg)
    save_model(path, cfg, quantize_state_dict(random_state_dict(cfg, seed=seed), block))
    return save_tokenizer(path, cfg["vocab_size"])


def save_tokenizer(path: str | Path, vocab_size: int) -> Path:
    """A small local word-level tokenizer (``tokenizer.json`` + config) for a tiny model dir.

    Token ids: 0 ``<s>``, 1 ``</s>``, 2 ``<unk>``, 3 ``<pad>``, then words ``w4`` .. so that
    any id below ``vocab_size`` decodes; ``transformers.AutoTokenizer`` loads it offline.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    path = Path(path)
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    return write_tokenizer_config(path, unk_token="<unk>")


def write_tokenizer_config(path: str | Path, model_max_length: int = 4096, **special_tokens) -> Path:
    """``tokenizer_config.json`` for a ``tokenizer.json`` in ``path`` (HF fast tokenizer, offline).

    ``bos_token`` ``<s>``, ``eos_token`` ``</s>`` and ``pad_token`` ``<pad>`` unless overridden.
    """
    path = Path(path)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    cfg.update(special_tokens)
    cfg["model_max_length"] = model_max_length
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def build_tiny_model_dir(path: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Config + fp32 random weights + tokenizer: a complete tiny model directory."""
    cfg = tiny_config(**config_overrides)
    save_model(path, cfg, random_state_dict(cfg, seed=seed))
    return save_tokenizer(path, cfg["vocab_size"])
