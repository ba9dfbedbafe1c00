"""Key/value retrieval under MLA and TPLA on the fp32 reference model (issue #17 item 4).

    python -m sglang_tpla.retrieval_eval --model-path M --calibration FILE \\
        --variant hadamard:2:pd_sep --variant fit:2:tpla ... [--seed 1] [--n 128] --out DIR

The task is :func:`sglang_tpla.retrieval.build_task` (``seed``, ``n``): records ``key = value``, then
``Lookup KEY =``; the answer is the 4-digit value.  Example ``i`` does not depend on ``n``, so the first
32 examples of ``seed=1`` are the set the trainer reports (``retrieval.build_task(seed=1, n=32)``).

Two settings, both with the fp32 reference model (:class:`~sglang_tpla.reference_model.ReferenceDeepseek`;
transform folded in and mode built by :func:`sglang_tpla.eval.reference_mode`, as in the served
evaluation's reference check):

* ``prompt prefilled``: the whole prompt is the prefill (what a server does with one request). In pd-sep the
  first answer token then comes from the exact prefill; only the later answer tokens are TPLA decode steps.
* ``lookup decoded``: the prefill ends before the last ``Lookup`` line; that line and the answer run as
  decode steps (teacher-forced), so the look-up itself goes through TPLA decode attention in every variant
  (a prompt that arrives as later turns of a conversation, or a stress test).

Metrics per variant and setting:

* greedy exact match (the first line of the greedy continuation equals the value; :func:`retrieval.exact_match`);
* multiple choice: the rank of the correct value among the values of all records in the prompt, by
  teacher-forced sequence log-prob (does the model prefer the right value to the other values it has seen);
* teacher-forced: mean log-prob per answer token, the share of examples whose first answer token is the
  argmax, and whose every answer token is the argmax;
* against MLA on the same answer positions: mean KL(MLA || variant) and argmax agreement.

Pure PyTorch + tokenizers: no sglang.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

from . import eval as E
from . import eval_metrics as M
from . import retrieval as R
from .long_generation import Scorer, variant_from_spec

EOS = 1
SETTINGS = ("prompt prefilled", "lookup decoded")


def tokenize(tok, ex: R.Example) -> dict:
    """Token ids of one example: ``prompt`` (with BOS, as the trainer encodes it), ``answer`` (no specials),
    and ``split``: the length of the prefix before the last ``Lookup`` line (a prefix of ``prompt``)."""
    prompt = tok.encode(ex.prompt).ids
    answer = tok.encode(ex.answer, add_special_tokens=False).ids
    pre = tok.encode(ex.prompt[: ex.prompt.rfind(R.LOOKUP)]).ids
    if prompt[: len(pre)] != pre:
        raise ValueError("the prefix before the last Lookup line does not tokenize to a prefix of the prompt")
    return {"prompt": prompt, "answer": answer, "split": len(pre)}


@torch.no_grad()
def greedy(model, ids: list[int], prefill_len: int, mode, max_new: int) -> list[int]:
    """Prefill ``ids[:prefill_len]``, force ``ids[prefill_len:]`` as decode steps, then ``max_new`` greedy
    decode steps (stops after EOS).  With ``prefill_len == len(ids)`` this is ``ReferenceDeepseek.generate``."""
    cache = model.new_cache()
    logits = model.forward(ids[:prefill_len], 0, cache, mode, decode=False)[-1]
    if prefill_len < len(ids):
        logits = model.forward(ids[prefill_len:], prefill_len, cache, mode, decode=True)[-1]
    pos, new = len(ids), []
    for step in range(max_new):
        tok = int(logits.argmax())
        new.append(tok)
        if tok == EOS or step + 1 == max_new:
            break
        logits = model.forward([tok], pos, cache, mode, decode=True)[0]
        pos += 1
    return new


def candidate_values(ex: R.Example) -> list[str]:
    """The values of every record in the example's prompt (the correct one among them), as answers ``" VALUE"``."""
    vals = []
    for line in ex.prompt.splitlines():
        if line.startswith(R.RECORD) and " = " in line:
            vals.append(" " + line.rsplit(" = ", 1)[1].strip())
    if ex.answer not in vals:
        raise ValueError("the answer is not among the record values")
    return vals


@torch.no_grad()
def choice_rank(model, mode, tok, t: dict, ex: R.Example, setting: str) -> int:
    """Rank (0 = best) of the correct value among all record values of the prompt, by teacher-forced sequence
    log-prob after the prompt (each candidate's tokens run as decode steps over a copy of the prompt's cache)."""
    prefill = len(t["prompt"]) if setting == SETTINGS[0] else t["split"]
    cache = model.new_cache()
    last = model.forward(t["prompt"][:prefill], 0, cache, mode, decode=False)[-1]
    if prefill < len(t["prompt"]):
        last = model.forward(t["prompt"][prefill:], prefill, cache, mode, decode=True)[-1]
    scores = {}
    for val in candidate_values(ex):
        ids = tok.encode(val, add_special_tokens=False).ids
        rows = [last]
        if len(ids) > 1:  # later tokens: decode steps over a copy of the cache (forward rebinds, never mutates)
            rows += list(model.forward(ids[:-1], len(t["prompt"]), [dict(c) for c in cache], mode, decode=True))
        lp = torch.log_softmax(torch.stack(rows).double(), -1)
        scores[val] = float(lp.gather(1, torch.tensor(ids)[:, None]).sum())
    best = sorted(scores, key=lambda v: -scores[v])
    return best.index(ex.answer)


def answer_logprobs(scorer: Scorer, v: E.Variant, t: dict, setting: str) -> torch.Tensor:
    """``[len(answer), V]`` teacher-forced log-probs at the answer positions."""
    ids = t["prompt"] + t["answer"]
    prefill = len(t["prompt"]) if setting == SETTINGS[0] else t["split"]
    lp = scorer.logprobs(v, ids, prefill)  # row k predicts ids[prefill + k]
    start = len(t["prompt"]) - prefill
    return lp[start : start + len(t["answer"])]


def evaluate(scorer: Scorer, tok, variants: list[E.Variant], examples: list[R.Example], log=print) -> dict:
    toks = [tokenize(tok, ex) for ex in examples]
    mla = E.Variant("MLA", None, "mla")
    out = {}
    for setting in SETTINGS:
        base = [answer_logprobs(scorer, mla, t, setting) for t in toks]
        rows = {}
        for v in [mla, *variants]:
            t0 = time.time()
            model, mode = scorer.mode(v)
            outs, lp_tok, first_ok, all_ok, kls, agree, ranks = [], [], 0, 0, [], [], []
            for t, ex, b in zip(toks, examples, base):
                ranks.append(choice_rank(model, mode, tok, t, ex, setting))
                prefill = len(t["prompt"]) if setting == SETTINGS[0] else t["split"]
                new = greedy(model, t["prompt"], prefill, mode, len(t["answer"]) + 1)
                outs.append(tok.decode([i for i in new if i != EOS]))
                lp = b if v.tpla is None else answer_logprobs(scorer, v, t, setting)
                ans = torch.tensor(t["answer"])
                lp_tok += lp.gather(1, ans[:, None])[:, 0].tolist()
                am = lp.argmax(-1)
                first_ok += int(am[0] == ans[0])
                all_ok += int(bool((am == ans).all()))
                kls += M.kl_per_position(b, lp).tolist()
                agree += M.top1_agreement(b, lp).tolist()
            em = [R.exact_match(o, ex.answer) for o, ex in zip(outs, examples)]
            rows[v.name] = {
                "exact_match": sum(em) / len(em), "exact_match_count": sum(em),
                "exact_match_first32": sum(em[:32]) / len(em[:32]),
                "answer_logprob_per_token": sum(lp_tok) / len(lp_tok),
                "first_token_argmax_correct": first_ok / len(toks), "all_tokens_argmax_correct": all_ok / len(toks),
                "choice_accuracy": sum(r == 0 for r in ranks) / len(ranks), "choice_mean_rank": sum(ranks) / len(ranks) + 1,
                "choice_candidates": sum(len(candidate_values(ex)) for ex in examples) / len(examples),
                "kl_vs_mla": sum(kls) / len(kls), "argmax_agreement_vs_mla": sum(agree) / len(agree),
                "greedy_outputs": outs[:8],
            }
            r = rows[v.name]
            log(f"[retrieval] {setting} | {v.name}: EM {r['exact_match_count']}/{len(em)}, logp/token "
                f"{r['answer_logprob_per_token']:.3f}, first-token argmax {r['first_token_argmax_correct']:.3f}, "
                f"choice {r['choice_accuracy']:.3f} (mean rank {r['choice_mean_rank']:.2f}), "
                f"KL {r['kl_vs_mla']:.3e} ({time.time() - t0:.0f} s)")
        out[setting] = rows
    return out


def write_markdown(path: Path, meta: dict, res: dict) -> None:
    lines = [
        "# Key/value retrieval: MLA vs TPLA (fp32 reference model)", "",
        f"- date: {meta['date']}", f"- git commit: {meta['commit']}", f"- command: `{meta['command']}`",
        f"- model: {meta['model_path']}; calibration: {meta['calibration']}",
        f"- task: `sglang_tpla.retrieval.build_task(seed={meta['seed']}, n={meta['n']}, n_pairs={meta['n_pairs']})` "
        f"({meta['n_pairs']} records, {meta['answer_tokens']:.2f} answer tokens on average, prompts of "
        f"{meta['prompt_tokens_min']}-{meta['prompt_tokens_max']} tokens); greedy and teacher-forced",
        f"- CPU time: {meta['cpu_seconds']:.0f} s ({meta['threads']} thread(s))", "",
        "These numbers come from the fp32 reference model (`ReferenceDeepseek`), not from a served run. The served "
        "evaluation matches that model to a max |dlogprob| of about 5e-4 (results/fidelity/results.md).", "",
        "EM: greedy exact match. logp/token: mean log-prob of the correct answer tokens, teacher-forced. "
        "first ok: the correct first answer token is the argmax. all ok: every answer token is the argmax "
        "(teacher-forced). choice: the correct value has the highest teacher-forced sequence log-prob among the "
        "values of all records in the prompt (chance = 1 / number of records); rank: its mean rank (1 = best). "
        "KL and argmax agreement are against MLA, at the answer positions.", "",
    ]
    for setting, rows in res.items():
        note = ("the whole prompt is prefilled; in pd-sep the first answer token comes from the exact prefill"
                if setting == SETTINGS[0] else "the last Lookup line and the answer run as decode steps")
        lines += [f"## {setting} ({note})", "",
                  f"| variant | EM (all {meta['n']}) | EM (first 32) | logp/token | first ok | all ok | choice | rank | KL vs MLA | argmax = MLA |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['exact_match_count']}/{meta['n']} | {r['exact_match_first32']:.3f} | "
                         f"{r['answer_logprob_per_token']:.4f} | {r['first_token_argmax_correct']:.3f} | "
                         f"{r['all_tokens_argmax_correct']:.3f} | {r['choice_accuracy']:.3f} | {r['choice_mean_rank']:.2f} | "
                         f"{r['kl_vs_mla']:.3e} | {r['argmax_agreement_vs_mla']:.4f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_tpla.retrieval_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--calibration", help="transform file (python -m sglang_tpla.calibrate): needed for pca / fit")
    p.add_argument("--variant", action="append", required=True, help="TRANSFORM:G:MODE[:NORM[:MU]] (repeatable)")
    p.add_argument("--seed", type=int, default=1, help="retrieval task seed (default 1, the trainer's)")
    p.add_argument("--n", type=int, default=32, help="examples")
    p.add_argument("--pairs", type=int, default=12,
                   help="records per prompt (default 12; a model trained on fewer, e.g. train --retrieval-pairs 2 4, "
                   "is evaluated on as many as it saw)")
    p.add_argument("--hadamard-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    return p


def run(argv: list[str] | None = None) -> dict:
    from tokenizers import Tokenizer

    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu0 = time.process_time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(Path(args.model_path) / "tokenizer.json"))
    examples = R.build_task(args.seed, args.n, n_pairs=args.pairs)
    variants = [variant_from_spec(s, args.hadamard_seed, args.calibration) for s in args.variant]
    scorer = Scorer(args.model_path, args.calibration, args.hadamard_seed)
    res = evaluate(scorer, tok, variants, examples, log=lambda m: print(m, flush=True))
    toks = [tokenize(tok, ex) for ex in examples]
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": E._git_commit(),
        "command": " ".join(["python -m sglang_tpla.retrieval_eval", *(argv if argv is not None else sys.argv[1:])]),
        "model_path": args.model_path, "calibration": args.calibration, "seed": args.seed, "n": args.n,
        "n_pairs": args.pairs, "answer_tokens": sum(len(t["answer"]) for t in toks) / len(toks),
        "prompt_tokens_min": min(len(t["prompt"]) for t in toks), "prompt_tokens_max": max(len(t["prompt"]) for t in toks),
        "threads": args.threads, "cpu_seconds": time.process_time() - cpu0,
        "source": "fp32 reference model (sglang_tpla.reference_model.ReferenceDeepseek)",
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1))
    write_markdown(out / "results.md", meta, res)
    print((out / "results.md").read_text(), flush=True)
    return {"meta": meta, "results": res}


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
