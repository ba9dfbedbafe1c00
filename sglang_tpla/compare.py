"""TPLA vs exact MLA on a built-in tiny DeepSeek-V3 config, through the fp32 reference model.

Random weights cannot show accuracy effects on real text; this comparison shows that the
math runs end to end and how large the approximation is at g = 2 and 4 for each
transform and mode.  Pure PyTorch: no sglang.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference_model import AttentionMode, ReferenceDeepseek
from .tiny_model import random_state_dict, tiny_config
from .transforms import fold_state_dict, make_rotation


@dataclass
class Divergence:
    max_abs_logprob_diff: float
    mean_kl: float  # KL(MLA || variant), nats per position
    top1_agreement: float


def divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> Divergence:
    lp_ref = torch.log_softmax(ref_logits.double(), -1)
    lp = torch.log_softmax(logits.double(), -1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
    return Divergence(
        float((lp_ref - lp).abs().max()),
        float(kl.mean()),
        float((lp_ref.argmax(-1) == lp.argmax(-1)).double().mean()),
    )


def tiny_comparison(prompt_len: int = 24, decode_len: int = 40, seed: int = 0, groups=(2, 4)) -> list[dict]:
    """Rows of (transform, mode, g, divergence from exact MLA) on random tiny-model weights."""
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=seed)
    ids = torch.randint(2, cfg["vocab_size"], (prompt_len + decode_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    base = ReferenceDeepseek(cfg, sd).score(ids, prompt_len, AttentionMode("mla"))
    decode = slice(prompt_len, None)
    rows = []
    for transform in ("none", "hadamard"):
        folded = fold_state_dict(sd, make_rotation(transform, cfg["kv_lora_rank"], seed=seed))
        model = ReferenceDeepseek(cfg, folded)
        exact = model.score(ids, prompt_len, AttentionMode("mla"))
        rows.append({"transform": transform, "mode": "mla (folded)", "g": 1, **divergence(base, exact).__dict__})
        for g in groups:
            for kind in ("pd_sep", "tpla"):
                for norm in ("exact", "local"):
                    mu = [[float(g)] * g] * cfg["num_hidden_layers"]  # the served default, mu inv_p (p_j = 1/g)
                    logits = model.score(ids, prompt_len, AttentionMode(kind, g=g, norm=norm, mu=mu))
                    d = divergence(base[decode], logits[decode])
                    rows.append({"transform": transform, "mode": f"{kind}/{norm}-norm", "g": g, **d.__dict__})
    return rows


def rows_markdown(rows: list[dict]) -> str:
    out = ["| transform | mode | g | max abs dlogprob | mean KL (nats) | top-1 agreement |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['transform']} | {r['mode']} | {r['g']} | {r['max_abs_logprob_diff']:.2e} | "
            f"{r['mean_kl']:.2e} | {r['top1_agreement']:.3f} |"
        )
    return "\n".join(out)
