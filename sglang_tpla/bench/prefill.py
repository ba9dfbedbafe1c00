"""Prefill benchmark: long prompts in chunks through real servers, stock MLA vs TPLA side by side.

    python -m sglang_tpla.bench.prefill [--model-path M] [--tp 2] [--lens 2048 8192 16384]
        [--chunk 2048] [--repeats 1] [--max-rss-gb 8] [--out results/prefill.md] [-- extra sglang.launch_server flags]

Each server (stock MLA, then TPLA with ``{"g": tp, "transform": "hadamard"}``) is started alone,
sent ``--repeats`` prompts per length (lengths ascending, the same random token ids for both servers, each prompt
new to the radix cache) with ``max_new_tokens=1``, and measured: wall time of the request
(prefill of every chunk + one decode step) and the schedulers' peak resident memory (``VmHWM``,
the largest over the TP ranks) after start-up and after each prompt.  Every chunk after the
first is an extend over a cached prefix, which TPLA serves with its own exact-MLA extend over the
latent-split pool (``kernels/torch_extend.py``).  Without ``--model-path`` a tiny DeepSeek-V3
(real MLA dims, random weights, 32K positions) is built in a temporary folder.  On the CPU
platform this measures the CPU code paths only; it says nothing about GPU prefill speed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def _scheduler_status_kib(server, field: str) -> int:
    """The largest ``field`` (``VmHWM``, ``VmRSS``) of ``/proc/PID/status`` among the server's
    scheduler processes, in KiB."""
    import psutil

    peak = 0
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "scheduler" not in " ".join(p.cmdline()):
                continue
            with open(f"/proc/{p.pid}/status") as f:
                peak = max(peak, next(int(line.split()[1]) for line in f if line.startswith(field)))
        except (psutil.Error, OSError, StopIteration):
            continue
    return peak


def scheduler_peak_mib(server) -> float:
    """The largest ``VmHWM`` among the server's scheduler processes, in MiB."""
    return _scheduler_status_kib(server, "VmHWM") / 1024


class RssGuard:
    """Stops ``server`` when a scheduler's resident memory passes ``limit_gb`` (polled every 0.5 s), so
    a server that would take the machine's memory fails alone, recorded, instead of the kernel's OOM
    killer picking a process."""

    def __init__(self, server, limit_gb: float):
        self.server, self.limit_kib, self.tripped = server, limit_gb * 2**20, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._done.wait(0.5):
            try:
                rss = _scheduler_status_kib(self.server, "VmRSS")
            except Exception:  # noqa: BLE001 - the server is going away
                return
            if rss > self.limit_kib:
                self.tripped = rss / 2**20
                os.killpg(self.server.proc.pid, signal.SIGKILL)  # at once: SIGTERM's grace lets it grow on
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def run_server(name, model_path, tp, args, env, lens, prompts, log_dir, max_rss_gb: float) -> dict:
    """One server, the prompts in ascending length.  A request that fails (a scheduler past
    ``max_rss_gb``, or killed) is recorded with what the server did, and the longer prompts are not sent."""
    from sglang_tpla.serving import ServerProcess

    srv = ServerProcess(model_path, tp=tp, args=args, env=env, log_path=Path(log_dir) / f"{name}.log", name=name)
    with srv:
        row = {"idle_mib": scheduler_peak_mib(srv), "s": {}, "mib": {}, "failed": {}}
        for n in lens:
            times, guard, t0 = [], RssGuard(srv, max_rss_gb), time.perf_counter()
            try:
                with guard:
                    for prompt in prompts[n]:  # each new to the radix cache
                        t0 = time.perf_counter()
                        srv.post("/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}, timeout=3600)
                        times.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - the failure is the measurement
                time.sleep(2)  # let a dying server's launcher exit
                rc = srv.proc.poll()
                why = (f"a scheduler passed {max_rss_gb:g} GB resident ({guard.tripped:.1f} GB), the benchmark stopped the server"
                       if guard.tripped else f"server exited with {rc}" if rc is not None else "server still up")
                row["failed"][n] = f"{type(e).__name__} after {time.perf_counter() - t0:.0f} s; {why}"
                print(f"[prefill] {name}: {n} tokens failed: {row['failed'][n]}; {srv.log_tail()[-1500:]}", flush=True)
                break
            row["s"][n] = statistics.median(times)
            row["mib"][n] = scheduler_peak_mib(srv)
            print(f"[prefill] {name}: {n} tokens in {row['s'][n]:.2f} s, scheduler peak {row['mib'][n]:.0f} MiB", flush=True)
    return row


def _cells(mla: dict, tp: dict, n: int) -> str:
    def cell(row, key):
        if n in row["failed"]:
            return f"failed: {row['failed'][n]}"
        return "not sent" if n not in row[key] else f"{row[key][n]:.2f}" if key == "s" else f"{row[key][n]:.0f}"

    def ratio(key):
        return f"{tp[key][n] / mla[key][n]:.2f}x" if n in tp[key] and n in mla[key] else "-"

    return f"| {n} | {cell(mla, 's')} | {cell(tp, 's')} | {ratio('s')} | {cell(mla, 'mib')} | {cell(tp, 'mib')} | {ratio('mib')} |"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m sglang_tpla.bench.prefill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", help="a DeepSeek-architecture model (default: a tiny random one, built here)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--lens", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--chunk", type=int, default=2048, help="--chunked-prefill-size of both servers")
    ap.add_argument("--mem-gb", default="1", help="SGLANG_TPLA_CPU_MEM_GB on the CPU platform (fixed KV budget)")
    ap.add_argument("--repeats", type=int, default=1, help="prompts per length (each new to the radix cache); the time is their median")
    ap.add_argument("--max-rss-gb", type=float, default=8.0,
                    help="stop a server whose scheduler passes this resident memory and record the failure (default 8)")
    ap.add_argument("--out", help="also write the markdown table here")
    a = ap.parse_args(argv)
    lens = sorted(a.lens)
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model_path
        if model is None:
            from sglang_tpla.tiny_model import build_tiny_model_dir

            model = str(build_tiny_model_dir(Path(tmp) / "model", seed=3, max_position_embeddings=32768))
        rng = random.Random(0)
        prompts = {n: [[rng.randrange(3, 500) for _ in range(n)] for _ in range(a.repeats)] for n in lens}
        common = ["--chunked-prefill-size", str(a.chunk), "--context-length", str(max(lens) + 64), *extra]
        env = {"SGLANG_TPLA_CPU_MEM_GB": a.mem_gb}
        tpla = ["--decode-attention-backend", "tpla", "--json-model-override-args", f'{{"tpla": {{"g": {a.tp}, "transform": "hadamard"}}}}']
        rows = {
            "MLA": run_server("mla", model, a.tp, common, env, lens, prompts, tmp, a.max_rss_gb),
            "TPLA": run_server("tpla", model, a.tp, common + tpla, env, lens, prompts, tmp, a.max_rss_gb),
        }
    mla, tp = rows["MLA"], rows["TPLA"]
    lines = [
        f"Prefill, TP={a.tp}, chunks of {a.chunk} tokens, {a.repeats} request(s) per length (+1 decode step; median time); "
        f"peak = largest scheduler VmHWM so far (idle after start-up: MLA {mla['idle_mib']:.0f} MiB, TPLA {tp['idle_mib']:.0f} MiB)",
        "",
        "| prompt | MLA s | TPLA s | TPLA/MLA time | MLA peak MiB | TPLA peak MiB | TPLA/MLA peak |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_cells(mla, tp, n) for n in lens]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
