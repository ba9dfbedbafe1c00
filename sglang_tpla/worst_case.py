"""The worst case for TPLA's transforms: a random-weight tiny DeepSeek-V3 with sharp attention (issue #17 item 2).

A random model's latent is full-rank by construction (no training has concentrated it), so ``pca``
and ``fit`` have no structure to exploit; scaling the query projection makes the attention sharp,
so each latent group's own softmax has more to get wrong.

    python -m sglang_tpla.worst_case build --out DIR [--seed 0] [--q-scale S] [--vocab 1024]
    python -m sglang_tpla.worst_case text --out FILE --vocab 1024 --num-tokens N --seed 1
    python -m sglang_tpla.worst_case sharpness --model-path DIR [DIR ...] [--num-seqs 4] [--seq-len 320] [--data heldout]
    python -m sglang_tpla.worst_case goals [LABEL=]EVAL_RESULTS_JSON [...]

* ``build``: :func:`sglang_tpla.tiny_model.build_tiny_model_dir` with the trained asset's shape (3
  dense layers, hidden 512, 4 heads, intermediate 768, q_lora_rank 192, real MLA dims), then every
  ``q_b_proj`` weight multiplied by ``--q-scale``: both parts of every attention logit (latent and
  RoPE) grow by that factor.  Nothing else changes.  The folder is reproducible from the seed and
  the scale, so it need not be kept.
* ``text``: seeded uniform random words ``w<id>`` (the tiny tokenizer's words), in paragraphs of 512,
  as calibration / spectrum data.
* ``goals``: from ``sglang_tpla.eval`` ``results.json`` files, per variant the perplexity change against
  the run's MLA row, top-1 agreement, mean KL and Hadamard's mean KL over the variant's (same g and mode).
* ``sharpness``: exact-MLA attention statistics of the fp32 reference model on seeded uniform random
  token sequences (or held-out text, ``--data``): per layer, the mean over heads and query positions
  ``>= --from-pos`` of the largest attention weight, of the attention entropy (nats) and of the weight on
  the first key, next to the uniform distribution's over each query's causal window (``1/L``, ``log L``).

Pure PyTorch: no sglang.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SHAPE = dict(num_hidden_layers=3, hidden_size=512, num_attention_heads=4, intermediate_size=768, q_lora_rank=192)


def build(out: str | Path, seed: int = 0, q_scale: float = 1.0, vocab: int = 1024) -> Path:
    """A random tiny model with the trained asset's shape and ``q_b_proj`` scaled by ``q_scale``."""
    from .tiny_model import build_tiny_model_dir, load_model, save_model

    out = Path(out)
    build_tiny_model_dir(out, seed=seed, vocab_size=vocab, **SHAPE)
    cfg, sd = load_model(out)
    for k in sd:
        if k.endswith("self_attn.q_b_proj.weight"):
            sd[k] = sd[k] * q_scale
    cfg["tpla_worst_case"] = {"seed": seed, "q_scale": q_scale}  # provenance; SGLang ignores unknown keys
    save_model(out, cfg, sd)
    return out


def random_ids(vocab: int, n: int, seed: int) -> list[int]:
    """``n`` seeded uniform token ids in ``[4, vocab)`` (no special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n,), generator=gen).tolist()


def write_text(path: str | Path, vocab: int, num_tokens: int, seed: int, paragraph: int = 512) -> Path:
    """Random words ``w<id>`` (one token each with the tiny tokenizer), paragraphs of ``paragraph`` words."""
    ids = random_ids(vocab, num_tokens, seed)
    paras = [" ".join(f"w{i}" for i in ids[j : j + paragraph]) for j in range(0, len(ids), paragraph)]
    path = Path(path)
    path.write_text("\n\n".join(paras) + "\n")
    return path


def attention_stats(probs: torch.Tensor, visible: torch.Tensor) -> tuple[float, float, float, float, float]:
    """Sums over the rows of ``probs [..., L]`` (one attention distribution per row) with ``visible [...]``
    the number of keys each row may see (its causal window): (max weight, entropy in nats, weight on the
    first key, 1/visible, log visible)."""
    p = probs.double().reshape(-1, probs.shape[-1])
    n = visible.double().expand(probs.shape[:-1]).reshape(-1)
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return (float(p.max(-1).values.sum()), float(ent.sum()), float(p[:, 0].sum()), float((1 / n).sum()),
            float(n.log().sum()))


def sharpness(model_path: str | Path, num_seqs: int = 4, seq_len: int = 320, from_pos: int = 64, seed: int = 0,
              data: str | None = None) -> dict:
    """Exact-MLA attention sharpness of a model on seeded uniform random token sequences, or (``data``:
    ``heldout`` or a text file, as :func:`sglang_tpla.spectrum.text_windows` reads it) on its first
    ``num_seqs`` windows of ``seq_len`` tokens."""
    from . import reference_model as RM
    from .tiny_model import load_model

    cfg, sd = load_model(model_path, dtype=torch.float32)
    model = RM.ReferenceDeepseek(cfg, sd)
    layers = cfg["num_hidden_layers"]
    acc = [[0.0, 0.0, 0.0, 0.0, 0.0, 0] for _ in range(layers)]
    state = {"layer": 0}
    orig = RM.latent_attention

    def recording(q_lat, q_pe, ckv, kpe, sm_scale, mu=None, causal_offset=None):
        # the reference's own logits, recomputed here to keep the probabilities
        lat = torch.einsum("thd,ld->thl", q_lat, ckv)
        logits = (lat + torch.einsum("thp,lp->thl", q_pe, kpe)) * sm_scale
        keys = torch.arange(ckv.shape[0])
        allowed = keys[None, :] <= (causal_offset + torch.arange(q_lat.shape[0]))[:, None]
        probs = torch.softmax(logits.masked_fill(~allowed[:, None, :], float("-inf")), -1)[from_pos:]
        visible = allowed.sum(-1)[from_pos:, None]  # [T, 1]: the causal window of each query row
        a = acc[state["layer"] % layers]
        for j, v in enumerate(attention_stats(probs, visible)):
            a[j] += v
        a[5] += probs.shape[0] * probs.shape[1]
        state["layer"] += 1
        return orig(q_lat, q_pe, ckv, kpe, sm_scale, mu, causal_offset)

    if data is None:
        seqs = [random_ids(cfg["vocab_size"], seq_len, seed + s) for s in range(num_seqs)]
    else:
        from .spectrum import text_windows

        seqs = text_windows(model_path, data, seq_len, num_seqs * seq_len)[:num_seqs].tolist()
    RM.latent_attention = recording
    try:
        for ids in seqs:
            model.forward(ids, 0, model.new_cache(), RM.AttentionMode("mla"), decode=False)
    finally:
        RM.latent_attention = orig
    rows = [{"layer": i, "mean_max_weight": a[0] / a[5], "mean_entropy": a[1] / a[5], "mean_first_key_weight": a[2] / a[5],
             "uniform_max_weight": a[3] / a[5], "uniform_entropy": a[4] / a[5]} for i, a in enumerate(acc)]
    return {"model": str(model_path), "q_scale": (cfg.get("tpla_worst_case") or {}).get("q_scale"),
            "data": data or f"uniform random token ids (seeds {seed}..{seed + num_seqs - 1})", "num_seqs": len(seqs), "seq_len": seq_len, "from_pos": from_pos, "seed": seed, "layers": rows,
            "mean_max_weight": sum(r["mean_max_weight"] for r in rows) / layers,
            "mean_entropy": sum(r["mean_entropy"] for r in rows) / layers,
            "uniform_entropy": rows[0]["uniform_entropy"], "uniform_max_weight": rows[0]["uniform_max_weight"]}


def sharpness_markdown(results: list[dict]) -> str:
    lines = ["| model | q scale | data | layer | mean max weight | mean entropy (nats) | weight on key 0 | uniform: max weight / entropy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["layers"]:
            lines.append(f"| {Path(r['model']).name} | {r['q_scale']} | {r['data']} | {row['layer']} | {row['mean_max_weight']:.3f} | "
                         f"{row['mean_entropy']:.3f} | {row['mean_first_key_weight']:.3f} | {row['uniform_max_weight']:.4f} / {row['uniform_entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def goals_markdown(eval_jsons: list[str | Path]) -> str:
    """Per variant of ``sglang_tpla.eval`` results.json files: perplexity change vs their MLA row, top-1
    agreement, mean KL, and Hadamard's mean KL over this variant's (same g and mode) - the quantities the
    issue's goals name."""
    lines = ["| run | variant | ppl vs MLA | top-1 agreement | KL mean | Hadamard KL / this KL |", "|---|---|---|---|---|---|"]
    for spec in eval_jsons:
        label, _, path = str(spec).rpartition("=")  # LABEL=PATH, or PATH (labelled by its folder)
        label = label or Path(path).parent.name
        res = json.loads(Path(path).read_text())
        rows = {r["variant"]: r for r in res["results"]}
        mla = rows["MLA"]["perplexity"]
        for name, r in rows.items():
            if name == "MLA":
                continue
            t = name.split(" ", 1)
            had = rows.get("hadamard " + t[1]) if len(t) == 2 else None
            ratio = f"{had['kl_mean'] / r['kl_mean']:.2f}x" if had and r is not had and r["kl_mean"] > 0 else "-"
            lines.append(f"| {label} | {name} | {100 * (r['perplexity'] / mla - 1):+.2f} % | "
                         f"{r['top1_agreement']:.4f} | {r['kl_mean']:.3e} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_tpla.worst_case", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="random tiny model with the trained asset's shape and scaled queries")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--q-scale", type=float, default=1.0)
    b.add_argument("--vocab", type=int, default=1024)
    t = sub.add_parser("text", help="seeded random words as calibration / spectrum text")
    t.add_argument("--out", required=True)
    t.add_argument("--vocab", type=int, default=1024)
    t.add_argument("--num-tokens", type=int, required=True)
    t.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("sharpness", help="exact-MLA attention sharpness on random token sequences")
    s.add_argument("--model-path", nargs="+", required=True)
    s.add_argument("--num-seqs", type=int, default=4)
    s.add_argument("--seq-len", type=int, default=320)
    s.add_argument("--from-pos", type=int, default=64, help="query positions counted: >= this")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data", help="'heldout' or a .txt/.jsonl file (spectrum.text_windows) instead of random ids")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--json", help="also write the numbers to this file")
    gl = sub.add_parser("goals", help="the issue's goal quantities from sglang_tpla.eval results.json files")
    gl.add_argument("results_json", nargs="+", help="PATH or LABEL=PATH")
    a = p.parse_args(argv)
    if a.cmd == "goals":
        print(goals_markdown(a.results_json), end="")
    elif a.cmd == "build":
        print(build(a.out, a.seed, a.q_scale, a.vocab))
    elif a.cmd == "text":
        print(write_text(a.out, a.vocab, a.num_tokens, a.seed))
    else:
        torch.set_num_threads(a.threads)
        res = [sharpness(m, a.num_seqs, a.seq_len, a.from_pos, a.seed, a.data) for m in a.model_path]
        print(sharpness_markdown(res))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
