"""Latent energy spectrum of a model: how much of the MLA latent's energy the top-k PCA components hold.

``python -m sglang_tpla.spectrum --model-path M [M2 ...] [--data heldout] [--num-tokens N]`` prints,
per model and layer, the share of the latent energy in the top 16/64/128/256 principal components
(a markdown table; ``--json FILE`` also writes the numbers).

The vector measured is the one the TPLA cache stores and slices: the RMS-normalised pre-gain latent
``u = c / RMS(c)``, ``c`` = the first ``kv_lora_rank`` columns of ``kv_a_proj_with_mqa(x)`` (the
``kv_a_layernorm`` gain is folded into ``kv_b_proj`` in this project's convention, so it is not
part of the cached vector).  This is the same vector, and the same definition, as the calibration
file's second moments (:meth:`sglang_tpla.reference_model.ReferenceDeepseek.latent_second_moments`,
``sglang_tpla.eval.latent_spectrum``):

* ``uncentred`` (the default, what TPLA's slicing error depends on): eigenvalues of ``E[u u^T]``.
* ``centred``: eigenvalues of the covariance ``E[(u - m)(u - m)^T]`` (the mean direction removed).
* ``gain``: uncentred, of ``u * gamma`` (the unfolded cache of stock MLA), for comparison.
* ``logit``: whether the attention reads those directions: with ``v_i``, ``lambda_i`` the uncentred PCA of
  ``u`` and ``Q = E[a a^T]`` the second moment of the absorbed queries ``a = q_nope W_UK * gamma`` (all
  heads; ``a . u`` is the latent part of the attention logit), the share
  ``sum_{i<=k} lambda_i v_i^T Q v_i / sum_i lambda_i v_i^T Q v_i`` of the mean squared latent logit
  ``E[(a . u)^2] = tr(Q E[u u^T])`` (query and key from independent tokens) carried by the top ``k``
  components.  A latent whose energy sits in directions no query reads would show a spread
  ``uncentred`` but a concentrated ``logit`` row.

The text comes from the model folder's ``heldout.jsonl`` (``--data heldout``) or a ``.txt`` /
``.jsonl`` file, tokenised with the folder's tokenizer into windows of ``--seq-len`` tokens.
The statistics are taken with the batched :class:`sglang_tpla.train.TrainableDeepseek` (fp32,
exact MLA, causal prefill), which is checked against the fp32 reference model in the tests.

Pure PyTorch + tokenizers: no sglang.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

KS = (16, 64, 128, 256)
KINDS = ("uncentred", "centred", "gain", "logit")


def text_windows(model_path: str | Path, data: str = "heldout", seq_len: int = 256, num_tokens: int = 16384) -> torch.Tensor:
    """``[N, seq_len]`` token windows (``<s> text </s>`` per document, concatenated) from held-out text."""
    from tokenizers import Tokenizer

    model_path = Path(model_path)
    src = model_path / "heldout.jsonl" if data == "heldout" else Path(data)
    if src.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in src.read_text().splitlines() if line.strip()]
    else:
        texts = [t for t in src.read_text().split("\n\n") if t.strip()]
    tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    stream: list[int] = []
    for e in tok.encode_batch(texts):
        stream += e.ids + [1]
        if len(stream) >= num_tokens:
            break
    n = max(1, min(len(stream), num_tokens) // seq_len)
    if len(stream) < seq_len:
        raise ValueError(f"{src}: only {len(stream)} tokens, need at least --seq-len {seq_len}")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def latent_moments(cfg: dict, sd: dict[str, torch.Tensor], windows: torch.Tensor, batch: int = 4) -> list[dict]:
    """Per layer: ``second`` = sum of ``u u^T``, ``first`` = sum of ``u`` (float64), ``n`` tokens, ``gamma``,
    ``query`` = sum over tokens and heads of ``a a^T`` (absorbed queries ``a = q_nope W_UK * gamma``)."""
    from .reference import normalize_latent
    from .train import load_trainable

    model = load_trainable(cfg, sd).eval()
    r, eps = cfg["kv_lora_rank"], float(cfg["rms_norm_eps"])
    stats = [{"second": torch.zeros(r, r, dtype=torch.float64), "first": torch.zeros(r, dtype=torch.float64), "n": 0,
              "gamma": layer.self_attn.kv_a_layernorm.weight.detach().double().clone(),
              "query": torch.zeros(r, r, dtype=torch.float64)} for layer in model.model.layers]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, inp, out, i=i):
            u = normalize_latent(out[..., :r].reshape(-1, r), eps, "exact").double()
            stats[i]["second"] += u.T @ u
            stats[i]["first"] += u.sum(0)
            stats[i]["n"] += u.shape[0]
        hooks.append(layer.self_attn.kv_a_proj_with_mqa.register_forward_hook(hook))
        att = layer.self_attn
        w_uk = att.kv_b_proj.weight.detach().double().view(att.heads, att.nope + att.vdim, r)[:, : att.nope]

        def qhook(mod, inp, out, i=i, att=att, w_uk=w_uk):
            q_nope = out.reshape(-1, att.heads, att.nope + att.rope)[..., : att.nope].double()
            a = torch.einsum("thn,hnr->thr", q_nope, w_uk).reshape(-1, r) * stats[i]["gamma"]
            stats[i]["query"] += a.T @ a
        hooks.append((att.q_b_proj if att.q_lora else att.q_proj).register_forward_hook(qhook))
    try:
        for i in range(0, windows.shape[0], batch):
            model(windows[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
    return stats


def energy_fractions(eigenvalues: torch.Tensor, ks=KS) -> list[float]:
    ev = eigenvalues.double().clamp_min(0).sort(descending=True).values
    return [float(ev[:k].sum() / ev.sum()) for k in ks]


def spectra(stats: list[dict], ks=KS) -> dict[str, list[list[float]]]:
    """``{kind: [per layer [share in top k for k in ks]]}`` for the kinds of the module docstring."""
    out: dict[str, list[list[float]]] = {k: [] for k in KINDS}
    for s in stats:
        m2 = s["second"] / s["n"]
        mean = s["first"] / s["n"]
        g = s["gamma"]
        out["uncentred"].append(energy_fractions(torch.linalg.eigvalsh(m2), ks))
        out["centred"].append(energy_fractions(torch.linalg.eigvalsh(m2 - torch.outer(mean, mean)), ks))
        out["gain"].append(energy_fractions(torch.linalg.eigvalsh(g[:, None] * m2 * g[None, :]), ks))
        lam, vec = torch.linalg.eigh(m2)
        w = (lam.clamp_min(0) * torch.einsum("ri,rs,si->i", vec, s["query"], vec)).flip(0)  # largest lambda first
        out["logit"].append([float(w[:k].sum() / w.sum()) for k in ks])
    return out


def mean_share(stats: list[dict]) -> list[float]:
    """Per layer the share of the uncentred energy in the mean direction: ``|E u|^2 / E|u|^2``."""
    return [float((s["first"] / s["n"]).pow(2).sum() / (torch.trace(s["second"]) / s["n"])) for s in stats]


def model_spectrum(model_path: str | Path, data: str = "heldout", seq_len: int = 256, num_tokens: int = 16384, ks=KS) -> dict:
    from .tiny_model import load_model

    cfg, sd = load_model(model_path, dtype=torch.float32)
    wins = text_windows(model_path, data, seq_len, num_tokens)
    stats = latent_moments(cfg, sd, wins)
    return {"model": str(model_path), "tokens": int(wins.numel()), "ks": list(ks), **spectra(stats, ks),
            "mean_share": mean_share(stats)}


def markdown(results: list[dict]) -> str:
    ks = results[0]["ks"]
    lines = []
    head = " | ".join(f"top {k}" for k in ks)
    for kind in KINDS:
        note = {"uncentred": " (the cached vector `u = c / RMS(c)`; what TPLA's slicing error depends on)",
                "centred": " (covariance of `u`)", "gain": " (`u * gamma`, the unfolded stock-MLA cache)",
                "logit": " (share of the mean squared latent logit `E[(a . u)^2]` in the top-k components of `u`)"}[kind]
        lines += [f"**{kind}**{note}", "",
                  f"| model | layer | {head} |", "|---|---|" + "---|" * len(ks)]
        for r in results:
            for i, row in enumerate(r[kind]):
                lines.append(f"| {Path(r['model']).name} | {i} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
        lines.append("")
    lines += ["Share of the uncentred energy in the mean direction `|E u|^2 / E|u|^2`:", ""]
    for r in results:
        lines.append(f"- {Path(r['model']).name} ({r['tokens']} tokens): " + ", ".join(f"layer {i} {v:.4f}" for i, v in enumerate(r["mean_share"])))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_tpla.spectrum", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", nargs="+", required=True)
    p.add_argument("--data", default="heldout", help="'heldout' (the folder's heldout.jsonl) or a .txt/.jsonl file")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the numbers to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = [model_spectrum(m, a.data, a.seq_len, a.num_tokens) for m in a.model_path]
    print(markdown(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
