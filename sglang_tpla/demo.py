"""Serving demos: MLA vs TPLA side by side (the main job), and text in / text out (``launch/cpu_demo.sh``).

:func:`compare_served` serves one model twice, exact MLA and TPLA, as real ``sglang.launch_server``
processes with the same TP size and, on the CPU platform, the same fixed KV memory budget (so
``max_total_num_tokens`` is comparable).  They run one after the other so that their timings do not
disturb each other.  Each server answers the same requests:

* greedy generation of every prompt (4 in flight): output tokens/s;
* the same documents **teacher-forced** through decode (:mod:`sglang_tpla.eval`'s
  ``forced_request``: SGLang's custom logit processor forces the document's next token at every
  step and the server returns the full next-token distribution of the unmodified logits), so
  "does TPLA agree with MLA" is decided on the same contexts, position by position, and not by
  where two greedy continuations first split on a near-tie.

``python -m sglang_tpla.demo`` (what ``launch/cpu_demo.sh`` runs) starts an exact-MLA prefill node,
a TPLA decode node and the router (:mod:`sglang_tpla.pd_launch`) on the shipped trained model, sends
text prompts and prints the prompts and completions as text.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .serving import ServerProcess

REPO = Path(__file__).resolve().parent.parent
TRAINED_MODEL = REPO / "tests" / "assets" / "tiny-deepseek-trained"
FIDELITY_REPORT = "results/fidelity/results.md"
DEMO_PROMPTS = (
    "Return True if the object is",
    "This program is free software; you can redistribute it",
    "The file is opened in",
)


@dataclass
class ServedResult:
    name: str
    max_total_num_tokens: int
    output_tokens: int
    seconds: float
    outputs: list[list[int]]
    forced: object = None  # sglang_tpla.eval.ServedRun: teacher-forced distributions
    startup_seconds: float = 0.0
    log_path: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds


def run_one(name, model_path, tp, args, env, log_dir, docs, vocab, new_tokens, concurrency, progress,
            variant=None) -> ServedResult:
    from . import eval as ev

    log = Path(log_dir) / f"{name}.log"
    progress(f"[{name}] starting sglang.launch_server (tp={tp}) ... log: {log}")
    t0 = time.time()
    with ServerProcess(model_path, tp=tp, args=args, env=env, log_path=log, name=name) as srv:
        up = time.time() - t0
        progress(f"[{name}] ready in {up:.0f} s; max_total_num_tokens={srv.max_total_num_tokens()}")
        srv.generate(docs[0].prompt, 4)  # warm-up
        start = time.time()
        with ThreadPoolExecutor(concurrency) as pool:
            outs = list(pool.map(lambda d: srv.generate(d.prompt, new_tokens)[0], docs))
        elapsed = time.time() - start
        progress(f"[{name}] {len(docs)} greedy requests in {elapsed:.1f} s; teacher-forcing "
                 f"{len(docs)} x {len(docs[0].continuation)} decode steps ...")
        run = ev.ServedRun(variant)
        with ThreadPoolExecutor(concurrency) as pool:
            forced = list(pool.map(lambda d: ev.forced_request(srv, d, vocab), docs))
        for doc, (toks, lps, dist) in zip(docs, forced):
            if toks != doc.continuation:
                raise RuntimeError(f"[{name}] teacher forcing failed: the server produced {toks[:8]}..., "
                                   f"the document continues {doc.continuation[:8]}... (see {log})")
            run.forced_tokens.append(toks)
            run.forced_logprobs.append(lps)
            run.dists.append(dist)
        run.greedy = outs
        run.seconds = time.time() - t0
        progress(f"[{name}] done in {time.time() - t0:.0f} s")
        return ServedResult(name, srv.max_total_num_tokens(), sum(len(o) for o in outs), elapsed, outs, run, up,
                            str(log))


def compare_served(
    model_path: str | Path,
    tp: int,
    tpla_options: dict,
    log_dir: str | Path,
    docs: list,
    extra_args: list[str] = (),
    env: dict | None = None,
    new_tokens: int = 32,
    concurrency: int = 4,
    dtype: str = "float32",
    progress=None,
) -> tuple[ServedResult, ServedResult]:
    """MLA, then TPLA with ``tpla_options``; ``docs`` are :class:`sglang_tpla.eval.Doc` (prompt + the
    continuation to force)."""
    from . import eval as ev

    progress = progress or (lambda msg: print(msg, flush=True))
    vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    common = dict(model_path=model_path, tp=tp, env=env, log_dir=log_dir, docs=docs, vocab=vocab,
                  new_tokens=new_tokens, concurrency=concurrency, progress=progress)
    mla_v = ev.Variant("MLA", None, "mla")
    g = tpla_options.get("g", tp)
    tpla_v = ev.Variant(f"{tpla_options.get('transform', 'hadamard')} g={g} pd-sep", dict(tpla_options), "pd_sep")
    mla = run_one("mla", args=ev.server_args(mla_v, dtype) + list(extra_args), variant=mla_v, **common)
    tpla = run_one("tpla", args=ev.server_args(tpla_v, dtype) + list(extra_args), variant=tpla_v, **common)
    return mla, tpla


def results_markdown(mla: ServedResult, tpla: ServedResult, tp: int, g: int) -> str:
    from . import eval as ev

    s_mla = ev.summarize(mla.forced, mla.forced)
    s = ev.summarize(tpla.forced, mla.forced)
    n_docs, n_pos = len(mla.forced.dists), len(mla.forced.dists[0])
    same = sum(a == b for a, b in zip(mla.outputs, tpla.outputs))
    rows = [
        "| | MLA (head-sharded TP) | TPLA | TPLA / MLA |",
        "|---|---|---|---|",
        f"| KV pool (max_total_num_tokens) | {mla.max_total_num_tokens:,} | {tpla.max_total_num_tokens:,} | "
        f"{tpla.max_total_num_tokens / mla.max_total_num_tokens:.3f}x |",
        f"| output tokens/s ({len(mla.outputs)} greedy requests) | {mla.tokens_per_second:.1f} | "
        f"{tpla.tokens_per_second:.1f} | {tpla.tokens_per_second / mla.tokens_per_second:.2f}x |",
        f"| teacher-forced perplexity ({n_docs} docs x {n_pos} positions) | {s_mla['perplexity']:.2f} | "
        f"{s['perplexity']:.2f} | {s['perplexity'] / s_mla['perplexity'] - 1:+.2%} |",
        f"| teacher-forced top-1 agreement with MLA | 1.000 | {s['top1_agreement']:.3f} | - |",
        f"| teacher-forced KL(MLA \\|\\| TPLA), nats: mean / max | 0 | {s['kl_mean']:.2e} / {s['kl_max']:.2e} | - |",
        f"| greedy outputs identical to MLA (informative only with a margin between the top tokens) | - | "
        f"{same}/{len(mla.outputs)} | - |",
    ]
    return f"TP={tp}, g={g}\n\n" + "\n".join(rows)


# --------------------------------------------------------------------------- text demo (launch/cpu_demo.sh)


@dataclass
class Completion:
    prompt: str
    text: str
    tokens: list[int] = field(default_factory=list)


def complete_texts(post, tokenizer, prompts, max_new_tokens: int, sampling: dict | None = None) -> list[Completion]:
    """Send each text prompt as token ids (BOS first, as in training) through ``post(body) -> dict``
    and decode the completion."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        params = {"max_new_tokens": max_new_tokens, "temperature": 0, **(sampling or {})}
        res = post({"input_ids": ids, "sampling_params": params})
        toks = res.get("output_ids") or []
        text = res.get("text")
        if text is None:
            text = tokenizer.decode(toks, skip_special_tokens=True)
        out.append(Completion(prompt, text, toks))
    return out


def print_completions(completions: list[Completion], file=None) -> None:
    file = file or sys.stdout
    for c in completions:
        print(f"[demo] prompt: {c.prompt!r}", file=file)
        print(f"[demo] completion: {c.text!r}", file=file, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sglang_tpla.demo",
        description="PD demo on CPU: an exact-MLA prefill node, a TPLA decode node and the router serve the "
        "shipped trained tiny model; text prompts in, text completions out. Extra flags go to "
        "python -m sglang_tpla.pd_launch.",
    )
    p.add_argument("--model-path", default=str(TRAINED_MODEL), help="default: the shipped trained tiny DeepSeek-V3")
    p.add_argument("--prompt", action="append", help=f"text prompt (repeatable; default: {len(DEMO_PROMPTS)} built-in)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--frequency-penalty", type=float, default=1.0,
                   help="SGLang sampling frequency_penalty (default 1.0: greedy decoding of the tiny model otherwise "
                   "falls into runs of newlines; 0: plain greedy)")
    p.add_argument("--prefill-tp", type=int, default=1)
    p.add_argument("--decode-tp", type=int, default=2)
    p.add_argument("--g", type=int, default=None, help="latent groups on the decode node (default: decode TP)")
    p.add_argument("--transform", default="hadamard", choices=["none", "hadamard", "pca", "fit"])
    p.add_argument("--calibration", help="transform file for --transform pca or fit")
    p.add_argument("--log-dir", default="pd-demo-logs")
    p.add_argument("--hold", action="store_true", help="keep serving after the prompts until Ctrl-C / SIGTERM")
    return p


def main(argv: list[str] | None = None) -> int:
    from .pd_launch import PDDeployment, PDSpec

    a = _parser().parse_args(argv)
    model = Path(a.model_path)
    if not (model / "config.json").is_file():
        raise SystemExit(f"sglang_tpla.demo: error: --model-path {model} has no config.json; pass a HF checkpoint "
                         f"folder (the default {TRAINED_MODEL} ships with a git clone of this repository)")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model))
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"sglang_tpla.demo: error: no tokenizer in {model} ({e}); the text demo needs a model "
                         "folder with tokenizer files (tokenizer.json)") from None
    prompts = a.prompt or list(DEMO_PROMPTS)
    spec = PDSpec(model_path=str(model.resolve()), prefill_tp=a.prefill_tp, decode_tp=a.decode_tp, g=a.g,
                  transform=a.transform, calibration=a.calibration, log_dir=a.log_dir,
                  prefill_args=["--dtype", "float32"], decode_args=["--dtype", "float32"])
    dep = PDDeployment(spec)

    def _interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    answered = False
    try:
        print(f"[demo] {model.name}: exact-MLA prefill node (TP={a.prefill_tp}) -> TPLA decode node (TP={a.decode_tp}, "
              f"g={a.g or a.decode_tp}, {a.transform}) -> router; every server takes 1-3 minutes to start on a small CPU",
              flush=True)
        dep.start()
        sampling = {"frequency_penalty": a.frequency_penalty} if a.frequency_penalty else {}
        print_completions(complete_texts(dep.post, tok, prompts, a.max_new_tokens, sampling))
        answered = True
        if a.hold:
            print(f"[demo] serving at {dep.url} (POST /generate with \"text\"); Ctrl-C stops every process started here",
                  flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("[demo] stopping", flush=True)
    finally:
        dep.stop()
        print(f"[demo] stopped; logs in {dep.log_dir}", flush=True)
    return 0 if answered else 130  # interrupted before the prompts were answered


if __name__ == "__main__":
    raise SystemExit(main())
