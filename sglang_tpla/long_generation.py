"""Long-generation fidelity of TPLA vs exact MLA on the fp32 reference model (issue #17 item 3).

    python -m sglang_tpla.long_generation --model-path M --calibration FILE \\
        --variant hadamard:2:pd_sep --variant fit:2:tpla ... --prompt-len 64 1024 --gen-len 2048 \\
        [--num-docs 4] [--window 64] [--crosscheck results/fidelity/results.json --crosscheck-variant hadamard:2:pd_sep] \\
        --out DIR
    python -m sglang_tpla.long_generation --rewrite-report DIR/results.json   # results.md + plot from the json

For each prompt length and each held-out sequence, the fp32 reference model
(:class:`sglang_tpla.reference_model.ReferenceDeepseek`, ``score``) prefills the prompt and then
**teacher-forces** the next ``--gen-len`` tokens one decode step at a time, once with exact MLA and
once per variant (the variant's transform folded into the weights and its
:class:`~sglang_tpla.reference_model.AttentionMode` built by :func:`sglang_tpla.eval.reference_mode`,
the same code the served evaluation's reference check uses).  Per position: KL(MLA || variant) over
the full vocabulary and top-1 agreement (same argmax), mean over the sequences.

Positions: ``k = 0`` is the prefill's last row (exact in pd-sep); ``k = 1 .. gen_len`` are the decode
steps.  The doubling analysis uses the decode steps only: window ``w`` holds steps
``w*W + 1 .. (w+1)*W``; a variant's KL "doubles" at the first step of the first window whose mean
KL is at least twice the first window's ("never" if none).

Sequences: held-out documents (the model folder's ``heldout*`` file, tokenized as the served
evaluation does) long enough for ``prompt + gen_len + 1`` tokens, in file order, each cut to that
length; if too few are long enough, the shorter documents are concatenated (file order, ``</s>``
between them) and cut into more.

Writes ``results.md``, ``results.json`` and ``kl_vs_position.png`` into ``--out``.  Pure PyTorch
(+ matplotlib for the plot): no sglang.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

import torch

from . import eval as E
from . import eval_metrics as M

EOS = 1


# --------------------------------------------------------------------------- analysis (pure functions)


def window_means(values, window: int) -> list[float]:
    """Means of consecutive windows of ``window`` values (a shorter last window is kept)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    vals = [float(v) for v in values]
    return [sum(vals[i : i + window]) / len(vals[i : i + window]) for i in range(0, len(vals), window)]


def doubling_step(decode_kl, window: int = 64, factor: float = 2.0) -> int | None:
    """First decode step (1-based) of the first window whose mean KL is >= ``factor`` x the first
    window's mean; None if no window gets there (or the first window's mean is 0)."""
    means = window_means(decode_kl, window)
    if not means or means[0] <= 0:
        return None
    for w, m in enumerate(means[1:], 1):
        if m >= factor * means[0]:
            return w * window + 1
    return None


# --------------------------------------------------------------------------- data


def sequences(model_path: str, data: str, need: int, num: int) -> tuple[list[list[int]], list[str]]:
    """``num`` token sequences of ``need`` tokens (see the module docstring) and where each came from."""
    path = E.find_heldout(model_path) if data == "heldout" else Path(data)
    if path is None or not Path(path).exists():
        raise SystemExit(f"[long_generation] no held-out data {data!r} for {model_path}")
    docs = E._read_docs(Path(path), model_path)
    out, where, short = [], [], []
    for i, d in enumerate(docs):
        if len(d) >= need and len(out) < num:
            out.append(d[:need])
            where.append(f"doc {i}")
        elif len(d) < need:
            short.append((i, d))
    if len(out) < num:
        stream, first = [], []
        for i, d in short:
            first += [i] * (len(d) + 1)
            stream += d + [EOS]
        for s in range(0, len(stream) - need + 1, need):
            if len(out) >= num:
                break
            out.append(stream[s : s + need])
            where.append(f"docs {first[s]}..{first[s + need - 1]} concatenated")
    if len(out) < num:
        raise SystemExit(f"[long_generation] only {len(out)} sequences of {need} tokens in {path}")
    return out, where


# --------------------------------------------------------------------------- scoring


def variant_from_spec(spec: str, seed: int = 0, calibration: str | None = None) -> E.Variant:
    if spec.lower() == "mla":
        return E.Variant("MLA", None, "mla")
    return E.make_variant(*E.parse_variant_spec(spec), seed=seed, calibration=calibration)


class Scorer:
    """Teacher-forced log-probs of the fp32 reference model for MLA and the variants (one folded model
    per transform, built on first use)."""

    def __init__(self, model_path: str, calibration: str | None = None, seed: int = 0, chunk: int = 256):
        from .tiny_model import load_model

        self.chunk = chunk
        self.cfg, self.sd = load_model(model_path, dtype=torch.float32)
        self.calib = None
        if calibration:
            from .calibration import Calibration

            self.calib = Calibration.load(calibration)
        self.seed = seed
        self.models: dict = {}

    def mode(self, variant: E.Variant):
        rm = E.reference_mode(variant, self.cfg["num_hidden_layers"], self.calib)
        if rm is None:
            raise SystemExit(f"[long_generation] {variant.name} needs --calibration")
        key, rots, mode = rm
        if key not in self.models:
            self.models[key] = E.reference_model_for(self.cfg, self.sd, key, rots, self.seed)
        return self.models[key], mode

    def logprobs(self, variant: E.Variant, ids: list[int], prompt_len: int) -> torch.Tensor:
        """``[len(ids) - prompt_len, V]`` float64 log-probs: row ``k`` predicts ``ids[prompt_len + k]``
        (row 0 from the prefill, row ``k >= 1`` from decode step ``k``)."""
        model, mode = self.mode(variant)
        logits = teacher_forced_logits(model, ids, prompt_len, mode, self.chunk)
        return torch.log_softmax(logits[prompt_len - 1 : len(ids) - 1].double(), -1)


@torch.no_grad()
def teacher_forced_logits(model, ids: list[int], prompt_len: int, mode, chunk: int = 256) -> torch.Tensor:
    """What ``model.score(ids, prompt_len, mode)`` returns, computed faster: the prompt as one prefill,
    then the teacher-forced tokens as decode steps ``chunk`` at a time.  ``ReferenceDeepseek.forward``
    with ``decode=True`` runs every token of a chunk as a decode step (TPLA in pd-sep) over the cache and
    the chunk's earlier tokens (causal), so each row is the same computation as one ``score`` step: with
    teacher forcing a token's cached latent does not depend on later tokens.  ``chunk=1`` is ``score``."""
    if not 1 <= prompt_len <= len(ids):
        raise ValueError("prompt_len must be in [1, len(ids)]")
    cache = model.new_cache()
    out = [model.forward(ids[:prompt_len], 0, cache, mode, decode=False)]
    for s in range(prompt_len, len(ids), chunk):
        out.append(model.forward(ids[s : s + chunk], s, cache, mode, decode=True))
    return torch.cat(out)


def compare(scorer: Scorer, variants: list[E.Variant], seqs: list[list[int]], prompt_len: int, log=print) -> dict:
    """Per variant name: per-position KL(MLA || variant) and top-1 agreement, mean over ``seqs``."""
    mla = E.Variant("MLA", None, "mla")
    sums = {v.name: {"kl": None, "top1": None} for v in variants}
    for n, ids in enumerate(seqs):
        t0 = time.time()
        base = scorer.logprobs(mla, ids, prompt_len)
        log(f"[long_generation] prompt {prompt_len}, seq {n + 1}/{len(seqs)}: MLA {time.time() - t0:.0f} s")
        for v in variants:
            t0 = time.time()
            lp = scorer.logprobs(v, ids, prompt_len)
            kl, agree = M.kl_per_position(base, lp), M.top1_agreement(base, lp)
            s = sums[v.name]
            s["kl"] = kl if s["kl"] is None else s["kl"] + kl
            s["top1"] = agree if s["top1"] is None else s["top1"] + agree
            log(f"[long_generation]   {v.name}: {time.time() - t0:.0f} s, KL mean {float(kl.mean()):.3e}, "
                f"top-1 {float(agree.mean()):.3f}")
    return {name: {"kl": (s["kl"] / len(seqs)).tolist(), "top1": (s["top1"] / len(seqs)).tolist()} for name, s in sums.items()}


def summary(per_pos: dict, window: int) -> dict:
    """Windowed means over the decode steps and the doubling step, per variant."""
    out = {}
    for name, pp in per_pos.items():
        kl_dec, top_dec = pp["kl"][1:], pp["top1"][1:]
        km, tm = window_means(kl_dec, window), window_means(top_dec, window)
        out[name] = {
            "kl_prefill_row": pp["kl"][0], "kl_mean": sum(kl_dec) / len(kl_dec), "top1_mean": sum(top_dec) / len(top_dec),
            "kl_windows": km, "top1_windows": tm, "kl_first_window": km[0], "kl_last_window": km[-1],
            "kl_max_window_ratio": max(km) / km[0] if km[0] > 0 else math.nan,
            "kl_last_window_ratio": km[-1] / km[0] if km[0] > 0 else math.nan,
            "doubling_step": doubling_step(kl_dec, window),
        }
    return out


# --------------------------------------------------------------------------- reports


def write_plot(path: Path, results: dict, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pls = sorted(results, key=int)
    fig, axes = plt.subplots(2, len(pls), figsize=(6.5 * len(pls), 8), sharex=True, squeeze=False)
    for c, pl in enumerate(pls):
        for name, s in results[pl]["summary"].items():
            x = [w * window + (window + 1) / 2 for w in range(len(s["kl_windows"]))]
            style = "-" if "pd-sep" in name else "--"
            axes[0][c].plot(x, [max(v, 1e-12) for v in s["kl_windows"]], style, marker="o", ms=2.5, label=name)
            axes[1][c].plot(x, s["top1_windows"], style, marker="o", ms=2.5, label=name)
        axes[0][c].set_yscale("log")
        axes[0][c].set_title(f"prompt {pl} tokens, {results[pl]['num_seqs']} sequences, {window}-step windows")
        axes[0][c].set_ylabel("KL(MLA || variant), nats")
        axes[1][c].set_ylabel("top-1 agreement with MLA")
        axes[1][c].set_xlabel("decode step")
        axes[0][c].grid(True, which="both", alpha=0.3)
        axes[1][c].grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("TPLA vs exact MLA, teacher-forced, fp32 reference model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transform_ratios(results: dict, a: str = "hadamard", b: str = "fit") -> list[dict]:
    """KL of transform ``a`` over KL of ``b`` for every variant pair that differs only in the transform."""
    out = []
    for pl in sorted(results, key=int):
        summ = results[pl]["summary"]
        for name, sa in summ.items():
            if not name.startswith(a + " "):
                continue
            sb = summ.get(b + name[len(a):])
            if sb and sb["kl_mean"] > 0 and sb["kl_first_window"] > 0 and sb["kl_last_window"] > 0:
                out.append({"prompt_len": int(pl), "which": name[len(a) + 1:], "mean": sa["kl_mean"] / sb["kl_mean"],
                            "first": sa["kl_first_window"] / sb["kl_first_window"],
                            "last": sa["kl_last_window"] / sb["kl_last_window"]})
    return out


def write_markdown(path: Path, meta: dict, results: dict, cross: dict | None, score_check: dict | None = None) -> None:
    w = meta["window"]
    lines = [
        "# Long generation: TPLA vs exact MLA out to " f"{meta['gen_len']} decode steps (fp32 reference model)", "",
        f"- date: {meta['date']}", f"- git commit: {meta['commit']}", f"- command: `{meta['command']}`",
        f"- model: {meta['model_path']}; calibration: {meta['calibration']}", f"- data: {meta['data']}",
        f"- CPU time: {meta['cpu_seconds']:.0f} s ({meta['threads']} thread(s))",
        *([f"- report rewritten from results.json by `{meta['report_command']}`"] if meta.get("report_command") else []), "",
        "These numbers come from the fp32 reference model (`ReferenceDeepseek`, decode steps teacher-forced in chunks"
        + ("; checked against `ReferenceDeepseek.score` below" if score_check else "") + "), not from a served run. "
        "The served evaluation matches that model to a max |dlogprob| of about 5e-4 (results/fidelity/results.md).",
        "", f"Position 0 is the prefill's last row. Steps 1..{meta['gen_len']} are decode steps, teacher-forced. "
        "KL(MLA || variant) is in nats over the full vocabulary. Top-1 means both argmaxes agree. Both are "
        f"means over the sequences. Windows hold {w} decode steps. 'doubles at' is the first step of the first "
        f"window whose mean KL is at least twice the first window's (steps 1..{w}).", "",
    ]
    for pl in sorted(results, key=int):
        r = results[pl]
        lines += [f"## Prompt {pl} tokens ({r['num_seqs']} sequences: {', '.join(r['sources'])})", "",
                  "| variant | KL mean | KL steps 1-" f"{w} | KL last window | max window / first | top-1 mean | top-1 last window | KL doubles at |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in r["summary"].items():
            d = "never" if s["doubling_step"] is None else f"step {s['doubling_step']}"
            lines.append(f"| {name} | {s['kl_mean']:.3e} | {s['kl_first_window']:.3e} | {s['kl_last_window']:.3e} | "
                         f"{s['kl_max_window_ratio']:.2f} | {s['top1_mean']:.4f} | {s['top1_windows'][-1]:.4f} | {d} |")
        lines.append("")
    pairs = transform_ratios(results)
    if pairs:
        lines += ["## Hadamard KL / fit KL (same g, same mode)", "",
                  "| prompt | g, mode | KL mean | steps 1-" f"{w} | last window |", "|---|---|---|---|---|"]
        lines += [f"| {r['prompt_len']} | {r['which']} | {r['mean']:.1f}x | {r['first']:.1f}x | {r['last']:.1f}x |" for r in pairs]
        lines.append("")
    if cross:
        lines += ["## Cross-check against the served evaluation", "",
                  f"Served file: {cross['served_file']}, variant {cross['variant']}, prompt {cross['prompt_len']}, "
                  f"positions 0..{cross['positions'] - 1}.", ""]
        lines += [f"- {k}" for k in cross["lines"]]
        lines.append("")
    if score_check:
        lines += ["## Chunked teacher forcing vs `ReferenceDeepseek.score`", "",
                  f"The decode steps run {meta['chunk']} at a time through `ReferenceDeepseek.forward(..., decode=True)` "
                  "(each row is one decode step over the cache; see `teacher_forced_logits`). On the first sequence "
                  f"of prompt {score_check['prompt_len']}, positions 0..{score_check['steps']}, against `score` "
                  "(one decode step per call): max |dlogprob| per variant:", ""]
        lines += [f"- {k}: {v:.2e}" for k, v in score_check["max_abs_dlogprob"].items()]
        lines.append("")
    lines += ["![KL and top-1 agreement vs decode step](kl_vs_position.png)", ""]
    path.write_text("\n".join(lines))


def check_against_score(scorer: Scorer, variants: list[E.Variant], args, results: dict) -> dict:
    """Max |chunked - score| log-prob over the first ``--check-score`` decode steps of the first sequence."""
    pl = args.prompt_len[0]
    ids = sequences(args.model_path, args.data, pl + args.gen_len + 1, 1)[0][0][: pl + args.check_score + 1]
    out = {}
    for v in variants:
        model, mode = scorer.mode(v)
        with torch.no_grad():
            want = torch.log_softmax(model.score(ids, pl, mode)[pl - 1 : len(ids) - 1].double(), -1)
        got = scorer.logprobs(v, ids, pl)
        out[v.name] = float((got - want).abs().max())
        print(f"[long_generation] chunked vs score, {v.name}: max |dlogprob| {out[v.name]:.2e}", flush=True)
    return {"prompt_len": pl, "steps": args.check_score, "max_abs_dlogprob": out}


def crosscheck(scorer: Scorer, served_file: str, spec: str, seed: int, calibration: str | None, ours: dict | None) -> dict:
    """Re-score the served evaluation's own documents with the reference model and compare per-position
    KL / top-1 with what the server gave; also compare with our long-sequence numbers (other documents)."""
    served = json.loads(Path(served_file).read_text())
    v = variant_from_spec(spec, seed, calibration)
    row = next((r for r in served["results"] if r["variant"] == v.name), None)
    if row is None:
        raise SystemExit(f"[long_generation] {served_file} has no variant {v.name!r}")
    docs = served["docs"]
    p = len(docs[0]["prompt"])
    n = len(docs[0]["continuation"])
    # served positions k = 0..n-1 predict continuation token k: reference rows p-1 .. p+n-2 of prompt+continuation
    per = compare(scorer, [v], [d["prompt"] + d["continuation"] for d in docs], p, log=lambda m: None)[v.name]
    kl_ref, top_ref = per["kl"], per["top1"]
    kl_srv, top_srv = row["per_position"]["kl"], row["per_position"]["top1_agreement"]
    lines = [
        f"Same {len(docs)} documents as the served run, reference model vs served: mean KL {sum(kl_ref) / n:.3e} vs "
        f"{sum(kl_srv) / n:.3e}; max |per-position KL difference| {max(abs(a - b) for a, b in zip(kl_ref, kl_srv)):.2e}; "
        f"top-1 {sum(top_ref) / n:.4f} vs {sum(top_srv) / n:.4f}.",
    ]
    out = {"served_file": served_file, "variant": v.name, "prompt_len": p, "positions": n,
           "reference_kl": kl_ref, "reference_top1": top_ref, "served_kl_mean": sum(kl_srv) / n,
           "reference_kl_mean": sum(kl_ref) / n, "served_top1_mean": sum(top_srv) / n, "reference_top1_mean": sum(top_ref) / n}
    if ours and str(p) in ours and v.name in ours[str(p)]["per_position"]:
        pp = ours[str(p)]["per_position"][v.name]
        k, t = pp["kl"][:n], pp["top1"][:n]
        lines.append(f"This run's {ours[str(p)]['num_seqs']} long sequences (other documents), positions 0..{len(k) - 1}: "
                     f"mean KL {sum(k) / len(k):.3e}, top-1 {sum(t) / len(t):.4f}. The documents differ, so only the order of "
                     "magnitude is comparable.")
        out["ours_kl_mean"], out["ours_top1_mean"] = sum(k) / len(k), sum(t) / len(t)
    out["lines"] = lines
    return out


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_tpla.long_generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--calibration", help="transform file (python -m sglang_tpla.calibrate): needed for pca / fit")
    p.add_argument("--variant", action="append", required=True, help="TRANSFORM:G:MODE[:NORM[:MU]] as in sglang_tpla.eval (repeatable)")
    p.add_argument("--data", default="heldout", help="'heldout' (heldout* in the model folder) or a .jsonl/.json/.txt file")
    p.add_argument("--prompt-len", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--gen-len", type=int, default=2048, help="teacher-forced decode steps")
    p.add_argument("--num-docs", type=int, default=4)
    p.add_argument("--window", type=int, default=64, help="decode steps per window (doubling analysis, plot)")
    p.add_argument("--seed", type=int, default=0, help="Hadamard sign seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=256, help="teacher-forced decode steps per reference forward (1: ReferenceDeepseek.score itself)")
    p.add_argument("--check-score", type=int, default=0, metavar="N",
                   help="compare the chunked log-probs with ReferenceDeepseek.score on the first N decode steps of one sequence")
    p.add_argument("--crosscheck", help="a served sglang_tpla.eval results.json: re-score its documents and compare")
    p.add_argument("--crosscheck-variant", default="hadamard:2:pd_sep")
    p.add_argument("--out", required=True)
    p.add_argument("--rewrite-report", metavar="RESULTS_JSON",
                   help="alone: rewrite results.md and the plot from a results.json of this tool (no scoring)")
    return p


def rewrite_report(path: str, argv: list[str] | None) -> dict:
    """Rewrite ``results.md`` and the plot next to a ``results.json`` of this tool from its per-position data
    (summaries recomputed; the run's meta kept, with the rewriting command added)."""
    path = Path(path)
    res = json.loads(path.read_text())
    meta, results = res["meta"], res["results"]
    for r in results.values():
        r["summary"] = summary(r["per_position"], meta["window"])
    meta["report_command"] = " ".join(["python -m sglang_tpla.long_generation", *(argv if argv is not None else sys.argv[1:])])
    path.write_text(json.dumps(res, indent=1))
    write_markdown(path.parent / "results.md", meta, results, res.get("crosscheck"), res.get("score_check"))
    write_plot(path.parent / "kl_vs_position.png", results, meta["window"])
    return res


def run(argv: list[str] | None = None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--rewrite-report"]:
        if len(argv) != 2:
            raise SystemExit("usage: python -m sglang_tpla.long_generation --rewrite-report RESULTS_JSON")
        return rewrite_report(argv[1], argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu0 = time.process_time()
    variants = [variant_from_spec(s, args.seed, args.calibration) for s in args.variant]
    scorer = Scorer(args.model_path, args.calibration, args.seed, args.chunk)
    results = {}
    for pl in args.prompt_len:
        seqs, where = sequences(args.model_path, args.data, pl + args.gen_len + 1, args.num_docs)
        per = compare(scorer, variants, seqs, pl, log=lambda m: print(m, flush=True))
        results[str(pl)] = {"num_seqs": len(seqs), "sources": where, "per_position": per, "summary": summary(per, args.window)}
    score_check = check_against_score(scorer, [E.Variant("MLA", None, "mla"), *variants], args, results) if args.check_score else None
    cross = crosscheck(scorer, args.crosscheck, args.crosscheck_variant, args.seed, args.calibration, results) if args.crosscheck else None
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": E._git_commit(),
        "command": " ".join(["python -m sglang_tpla.long_generation", *(argv if argv is not None else sys.argv[1:])]),
        "model_path": args.model_path, "calibration": args.calibration, "data": args.data, "gen_len": args.gen_len,
        "window": args.window, "chunk": args.chunk, "threads": args.threads, "cpu_seconds": time.process_time() - cpu0,
        "source": "fp32 reference model (sglang_tpla.reference_model.ReferenceDeepseek.score)",
    }
    res = {"meta": meta, "results": results, "crosscheck": cross, "score_check": score_check}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    write_markdown(out / "results.md", meta, results, cross, score_check)
    write_plot(out / "kl_vs_position.png", results, args.window)
    print((out / "results.md").read_text(), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
