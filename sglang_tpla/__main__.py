"""Main job: ``python -m sglang_tpla`` (what ``bash run.sh main`` runs).

1. KV-cache bytes per token per device, MLA vs TPLA (DeepSeek-V3, Kimi-K2 shapes).
2. The built-in tiny DeepSeek-V3 model (or ``--model-path``) served twice through the real
   ``sglang.launch_server`` at ``--tp`` (default 2): exact MLA and TPLA, side by side: KV
   capacity at the same memory budget, decode throughput, output agreement.  Without a GPU
   it runs on the project's CPU platform.
3. TPLA vs exact MLA through the fp32 reference model on the tiny config.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from .compare import rows_markdown, tiny_comparison
from .shapes import kv_bytes_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_tpla", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="model to serve (default: a built-in tiny DeepSeek-V3 with random fp32 weights)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tpla-g", type=int, default=None, help="latent groups (default: the TP size)")
    ap.add_argument("--tpla-transform", default="hadamard", choices=("none", "hadamard", "pca", "fit"))
    ap.add_argument("--tpla-calibration")
    ap.add_argument("--skip-serving", action="store_true", help="only the table and the fp32 reference comparison")
    ap.add_argument("--log-dir", help="server logs (default: a temporary folder)")
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--decode-len", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print("## KV-cache bytes per token per device (bf16, all layers)\n")
    print(kv_bytes_table(), flush=True)

    if not args.skip_serving:
        from .demo import compare_served, results_markdown
        from .tiny_model import build_tiny_model_dir

        log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="sglang-tpla-main-"))
        model, extra, env = args.model_path, [], {}
        if model is None:
            model = build_tiny_model_dir(log_dir / "tiny-model", seed=args.seed)
            extra = ["--dtype", "float32"]
            env = {"SGLANG_TPLA_CPU_MEM_GB": os.environ.get("SGLANG_TPLA_CPU_MEM_GB", "1")}
        opts = {"transform": args.tpla_transform}
        if args.tpla_g:
            opts["g"] = args.tpla_g
        if args.tpla_calibration:
            opts["calibration"] = args.tpla_calibration
        print(f"\n## Served side by side through sglang.launch_server: {model}\n", flush=True)
        mla, tpla = compare_served(model, args.tp, opts, log_dir, extra_args=extra, env=env)
        print()
        print(results_markdown(mla, tpla, args.tp, args.tpla_g or args.tp))
        print(f"\nlogs: {log_dir}. On a plain CPU the throughput column compares two CPU servers and says "
              "nothing about GPU decode speed; the capacity column holds on any device.")

    print(
        "\n## TPLA vs exact MLA on the built-in tiny DeepSeek-V3 config (fp32 reference, random weights)\n"
        f"prompt {args.prompt_len} tokens (prefill), then {args.decode_len} teacher-forced decode steps; "
        "divergence measured on the decode positions. Random weights: this shows the approximation is "
        "visible, not how large it is on a trained model.\n",
        flush=True,
    )
    t0 = time.time()
    print(rows_markdown(tiny_comparison(args.prompt_len, args.decode_len, args.seed)))
    print(f"\n(computed in {time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
