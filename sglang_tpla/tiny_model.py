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
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return cfg, sd


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
