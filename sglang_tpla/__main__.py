"""Main job: ``python -m sglang_tpla`` (what ``bash run.sh main`` runs)."""

from __future__ import annotations

import argparse
import time

from .compare import rows_markdown, tiny_comparison
from .shapes import kv_bytes_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_tpla", description=__doc__)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--decode-len", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print("## KV-cache bytes per token per device (bf16, all layers)\n")
    print(kv_bytes_table())
    print(
        "\n## TPLA vs exact MLA on the built-in tiny DeepSeek-V3 config (fp32 reference, random weights)\n"
        f"prompt {args.prompt_len} tokens (prefill), then {args.decode_len} teacher-forced decode steps; "
        "divergence measured on the decode positions.\n",
        flush=True,
    )
    t0 = time.time()
    print(rows_markdown(tiny_comparison(args.prompt_len, args.decode_len, args.seed)))
    print(f"\n(computed in {time.time() - t0:.1f} s on {__import__('torch').get_num_threads()} CPU threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
