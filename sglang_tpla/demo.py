"""Serve one model twice, exact MLA and TPLA, and compare KV capacity, decode throughput and outputs.

Both servers are real ``sglang.launch_server`` processes with the same TP size and, on the
CPU platform, the same fixed KV memory budget, so ``max_total_num_tokens`` is comparable.
They run one after the other so that their timings do not disturb each other.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .serving import ServerProcess


@dataclass
class ServedResult:
    name: str
    max_total_num_tokens: int
    output_tokens: int
    seconds: float
    outputs: list[list[int]]

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    return [[4 + (7 * i + 13 * j) % (vocab - 4) for j in range(length)] for i in range(n)]


def run_one(name, model_path, tp, args, env, log_dir, prompts, new_tokens, concurrency, progress) -> ServedResult:
    progress(f"[{name}] starting sglang.launch_server (tp={tp}) ... log: {Path(log_dir) / (name + '.log')}")
    t0 = time.time()
    with ServerProcess(model_path, tp=tp, args=args, env=env, log_path=Path(log_dir) / f"{name}.log", name=name) as srv:
        progress(f"[{name}] ready in {time.time() - t0:.0f} s; max_total_num_tokens={srv.max_total_num_tokens()}")
        srv.generate(prompts[0], 4)  # warm-up
        start = time.time()
        with ThreadPoolExecutor(concurrency) as pool:
            outs = list(pool.map(lambda p: srv.generate(p, new_tokens)[0], prompts))
        elapsed = time.time() - start
        return ServedResult(name, srv.max_total_num_tokens(), sum(len(o) for o in outs), elapsed, outs)


def compare_served(
    model_path: str | Path,
    tp: int,
    tpla_options: dict,
    log_dir: str | Path,
    extra_args: list[str] = (),
    env: dict | None = None,
    num_prompts: int = 8,
    prompt_len: int = 32,
    new_tokens: int = 32,
    concurrency: int = 4,
    progress=print,
) -> tuple[ServedResult, ServedResult]:
    vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    prompts = _prompts(num_prompts, prompt_len, vocab)
    common = dict(model_path=model_path, tp=tp, env=env, log_dir=log_dir, prompts=prompts, new_tokens=new_tokens,
                  concurrency=concurrency, progress=progress)
    mla = run_one("mla", args=list(extra_args), **common)
    tpla_args = list(extra_args) + ["--decode-attention-backend", "tpla", "--json-model-override-args", json.dumps({"tpla": tpla_options})]
    tpla = run_one("tpla", args=tpla_args, **common)
    return mla, tpla


def results_markdown(mla: ServedResult, tpla: ServedResult, tp: int, g: int) -> str:
    same = sum(a == b for a, b in zip(mla.outputs, tpla.outputs))
    first_div = []
    for a, b in zip(mla.outputs, tpla.outputs):
        first_div.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))
    rows = [
        "| | MLA (head-sharded TP) | TPLA | TPLA / MLA |",
        "|---|---|---|---|",
        f"| KV pool (max_total_num_tokens) | {mla.max_total_num_tokens:,} | {tpla.max_total_num_tokens:,} | "
        f"{tpla.max_total_num_tokens / mla.max_total_num_tokens:.3f}x |",
        f"| output tokens/s ({len(mla.outputs)} requests) | {mla.tokens_per_second:.1f} | {tpla.tokens_per_second:.1f} | "
        f"{tpla.tokens_per_second / mla.tokens_per_second:.2f}x |",
        f"| greedy outputs identical to MLA | - | {same}/{len(mla.outputs)} | first divergence at token "
        f"{min(first_div)}..{max(first_div)} |",
    ]
    return f"TP={tp}, g={g}\n\n" + "\n".join(rows)
