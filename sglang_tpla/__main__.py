"""Main job: ``python -m sglang_tpla`` (what ``bash run.sh main`` runs).

1. KV-cache bytes per token per device, MLA vs TPLA (DeepSeek-V3, Kimi-K2 shapes).
2. The shipped trained tiny DeepSeek-V3 (``tests/assets/tiny-deepseek-trained``; or ``--model-path``)
   served twice through the real ``sglang.launch_server`` at ``--tp`` (default 2): exact MLA and
   TPLA, side by side: KV capacity at the same memory budget, decode throughput, and agreement on
   held-out text, teacher-forced (both servers score the same contexts, decode step by decode
   step).  Without a GPU it runs on the project's CPU platform.
3. TPLA vs exact MLA through the fp32 reference model on the same weights and held-out text
   (transforms none / Hadamard, pd-sep and TPLA everywhere, exact and slice-local RMSNorm, g = 2, 4).

The full fidelity report (more documents, longer continuations, PCA / fit / lsq variants) is
``results/fidelity/results.md``, made by ``python -m sglang_tpla.eval`` (docs/fidelity.md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from .shapes import kv_bytes_table

DEFAULT_DOCS = 4


def _model_and_docs(model_path: str | None, num_docs: int, prompt_len: int, decode_len: int, seed: int, tmp: Path):
    """(model folder, eval.Doc list, where the text came from, built_random_model)."""
    from .demo import TRAINED_MODEL
    from .eval import find_heldout, load_docs

    built = False
    if model_path is None:
        if (TRAINED_MODEL / "config.json").is_file():
            model_path = str(TRAINED_MODEL)
        else:  # an installed wheel has no tests/assets
            from .tiny_model import build_tiny_model_dir

            model_path, built = str(build_tiny_model_dir(tmp / "tiny-model", seed=seed)), True
            print(f"(the trained model {TRAINED_MODEL} is not there: using a random-weight tiny model; "
                  "its numbers only show that the approximation is visible)\n")
    vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    data = "heldout" if find_heldout(model_path) else "random"
    docs, source = load_docs(data, model_path, num_docs, prompt_len, decode_len, vocab, seed)
    return model_path, docs, source, built


def reference_rows(model_path: str, docs, groups=(2, 4), seed: int = 0) -> list[dict]:
    """fp32 reference, teacher-forced on ``docs``: divergence of each TPLA variant from exact MLA on the
    decode positions (all documents pooled)."""
    import torch

    from .compare import divergence
    from .reference_model import AttentionMode, ReferenceDeepseek
    from .tiny_model import load_model
    from .transforms import fold_state_dict, make_rotation

    cfg, sd = load_model(model_path, dtype=torch.float32)
    layers = cfg["num_hidden_layers"]
    jobs = [(t, "mla (folded)", 1, None) for t in ("none", "hadamard")]
    jobs += [(t, f"{kind}/{norm}-norm", g, (kind, norm)) for t in ("none", "hadamard") for g in groups
             for kind in ("pd_sep", "tpla") for norm in ("exact", "local")]

    def decode_rows(model, mode):
        return torch.cat([model.score(d.prompt + d.continuation, len(d.prompt), mode)[len(d.prompt):] for d in docs])

    from tqdm import tqdm

    # one thread: these small matmuls gain nothing from two, and lose ~10x when other processes share the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = decode_rows(ReferenceDeepseek(cfg, sd), AttentionMode("mla"))
        rows, models = [], {}
        for transform, label, g, kind_norm in tqdm(jobs, desc="fp32 reference", unit="variant", leave=False):
            if transform not in models:
                rot = make_rotation(transform, cfg["kv_lora_rank"], seed=seed)
                models[transform] = ReferenceDeepseek(cfg, fold_state_dict(sd, rot))
            if kind_norm is None:
                mode = AttentionMode("mla")
            else:  # the served default mu inv_p: p_j = 1/g for none / Hadamard, so mu_j = g
                mode = AttentionMode(kind_norm[0], g=g, norm=kind_norm[1], mu=[[float(g)] * g] * layers)
            div = divergence(base, decode_rows(models[transform], mode))
            rows.append({"transform": transform, "mode": label, "g": g, **div.__dict__})
    finally:
        torch.set_num_threads(threads)
    return rows


def main(argv=None) -> int:
    from .compare import rows_markdown
    from .demo import FIDELITY_REPORT

    ap = argparse.ArgumentParser(prog="python -m sglang_tpla", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="model to serve (default: the shipped trained tiny DeepSeek-V3, "
                    "tests/assets/tiny-deepseek-trained)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tpla-g", type=int, default=None, help="latent groups (default: the TP size)")
    ap.add_argument("--tpla-transform", default="hadamard", choices=("none", "hadamard", "pca", "fit"))
    ap.add_argument("--tpla-calibration")
    ap.add_argument("--skip-serving", action="store_true", help="only the table and the fp32 reference comparison")
    ap.add_argument("--log-dir", help="server logs (default: a temporary folder)")
    ap.add_argument("--num-docs", type=int, default=DEFAULT_DOCS, help="held-out documents (prompts)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per document (prefill)")
    ap.add_argument("--decode-len", type=int, default=64, help="teacher-forced decode steps per document")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per request for the throughput row")
    ap.add_argument("--ref-docs", type=int, default=2, help="documents for the fp32 reference comparison (the first ones)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t_start = time.time()

    print("## KV-cache bytes per token per device (bf16, all layers)\n")
    print(kv_bytes_table(), flush=True)

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="sglang-tpla-main-"))
    model, docs, source, built = _model_and_docs(args.model_path, args.num_docs, args.prompt_len, args.decode_len,
                                                 args.seed, log_dir)
    text = f"{len(docs)} documents of {source}: {args.prompt_len}-token prompts, {args.decode_len} teacher-forced tokens"

    if not args.skip_serving:
        from .demo import compare_served, results_markdown

        env = {"SGLANG_TPLA_CPU_MEM_GB": os.environ.get("SGLANG_TPLA_CPU_MEM_GB", "1")}
        opts = {"transform": args.tpla_transform}
        if args.tpla_g:
            opts["g"] = args.tpla_g
        if args.tpla_calibration:
            opts["calibration"] = args.tpla_calibration
        print(f"\n## Served side by side through sglang.launch_server: {model}\n\n{text}.\n", flush=True)
        mla, tpla = compare_served(model, args.tp, opts, log_dir, docs, env=env, new_tokens=args.new_tokens)
        print()
        print(results_markdown(mla, tpla, args.tp, args.tpla_g or args.tp))
        print(f"\nlogs: {log_dir}. Teacher-forced: both servers see the document's own tokens as context at every "
              "step, so the rows compare their next-token distributions on identical contexts (position 0 comes "
              "from prefill, exact MLA in both). On a plain CPU the throughput row compares two CPU servers and "
              "says nothing about GPU decode speed; the capacity row holds on any device.")

    ref_docs = docs[: max(1, args.ref_docs)]
    print(f"\n## TPLA vs exact MLA through the fp32 reference model ({'random' if built else 'trained'} weights)\n\n"
          f"{model}; the first {len(ref_docs)} of the {text}; divergence from exact MLA on the decode positions; "
          "mu inv_p (the served default).\n", flush=True)
    t0 = time.time()
    print(rows_markdown(reference_rows(model, ref_docs, seed=args.seed)))
    print(f"\n(computed in {time.time() - t0:.1f} s)")
    print(f"\nFull fidelity report (served, TP=4, g=2 and 4, PCA / fit / lsq variants, 256 teacher-forced steps): "
          f"{FIDELITY_REPORT} and results/fidelity/kl_agreement_vs_position.png; how to rerun it: docs/fidelity.md.")
    print(f"Main job done in {time.time() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
