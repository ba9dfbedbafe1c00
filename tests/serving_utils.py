"""Shared helpers for the real-server tests (no tests here)."""

from __future__ import annotations

from pathlib import Path

import torch

from sglang_tpla.reference_model import AttentionMode, ReferenceDeepseek
from sglang_tpla.tiny_model import build_tiny_model_dir, load_model
from sglang_tpla.transforms import fold_state_dict, make_rotation

# Two prompts sharing a 6-token prefix: the second request hits the radix cache.
PROMPTS = ([5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 40, 41, 42])
NEW_TOKENS = 10
FP32 = ["--dtype", "float32"]
# A fixed KV budget for every test server (the tpla_cpu platform reports it as the free
# memory): bounded RAM on the 24 GB CI machine, and comparable max_total_num_tokens.
BUDGET = {"SGLANG_TPLA_CPU_MEM_GB": "1"}


def tiny_model(tmp_path_factory, seed: int = 0) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=seed)


def reference(model_dir: Path, transform: str = "none", seed: int = 0) -> ReferenceDeepseek:
    cfg, sd = load_model(model_dir, dtype=torch.float32)
    if transform != "none":
        sd = fold_state_dict(sd, make_rotation(transform, cfg["kv_lora_rank"], seed=seed))
    return ReferenceDeepseek(cfg, sd)


def tpla_mode(kind: str, g: int, ref: ReferenceDeepseek, **kw) -> AttentionMode:
    """``ref``'s mode for a server with the default ``mu: inv_p`` and a balanced transform
    (none / Hadamard: ``p_j = 1/g``, so ``mu_j = g``)."""
    return AttentionMode(kind, g=g, mu=[[float(g)] * g] * ref.num_layers if g > 1 else None, **kw)


def served_vs_reference(server, ref: ReferenceDeepseek, mode: AttentionMode):
    """[(cached_tokens, tokens_equal, max |logprob diff|)] for PROMPTS, in order."""
    rows = []
    for prompt in PROMPTS:
        toks, lps, meta = server.generate(prompt, NEW_TOKENS)
        ref_toks, ref_lps = ref.generate(prompt, NEW_TOKENS, mode)
        rows.append((meta.get("cached_tokens", 0), toks == ref_toks, max(abs(a - b) for a, b in zip(lps, ref_lps))))
    return rows
