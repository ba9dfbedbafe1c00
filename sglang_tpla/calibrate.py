"""Calibrate a TPLA transform file by running the model through SGLang itself.

    python -m sglang_tpla.calibrate --model-path M --tp N --data FILE --num-tokens K --out FILE \
        [--seq-len L] [--batch B] [--lsq-pairs N] [--fit-g G ...] [-- extra sglang.launch_server args, e.g. --dtype float32]

Starts a real ``sglang.launch_server`` (plain exact MLA, ``--disable-radix-cache`` so every
token is computed, no TPLA options) with ``SGLANG_TPLA_CALIBRATE_DIR`` set, which switches on
:mod:`sglang_tpla.patches.calibration_capture`.  The data file (plain text, or JSON lines with
a ``"text"`` field) is tokenized with the model's tokenizer, concatenated and cut into windows
of ``--seq-len`` tokens; exactly ``--num-tokens`` prompt tokens are sent as ``/generate``
requests with ``max_new_tokens=1`` (``--batch`` at a time).  When the server's flushed token
count equals what was sent, the per-layer second moments of ``u = c / RMS(c)`` and the
logit-pair sample for ``mu='lsq'`` go into a :class:`~sglang_tpla.calibration.Calibration`
with the model identity the server computed (what ``patches/weights.py`` checks at load), saved
atomically to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .calibration import Calibration, ModelIdentity


class CalibrateError(SystemExit):
    """A refused calibration run; the message names the fix (exit code 2)."""

    def __init__(self, msg: str):
        super().__init__(f"sglang_tpla.calibrate: error: {msg}")
        self.msg = msg


# --------------------------------------------------------------------------- data


def read_texts(path: str | Path) -> list[str]:
    """Documents of a plain-text file (one document) or a JSON-lines file (``"text"`` per line)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrateError(f"cannot read --data {str(path)!r} ({e}); pass a UTF-8 text or .jsonl file") from None
    texts: list[str] = []
    if path.suffix in (".jsonl", ".json") or raw.lstrip().startswith("{"):
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrateError(f"--data {path}: line {n} is not JSON ({e}); use one JSON object per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CalibrateError(f'--data {path}: line {n} has no string "text" field; write {{"text": "..."}} per line')
            texts.append(obj["text"])
    else:
        texts = [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrateError(f"--data {path} holds no text; give a file with calibration text")
    return texts


def token_stream(texts: list[str], tokenizer) -> list[int]:
    """Token ids of all documents, concatenated (each document starts with BOS if the tokenizer adds one)."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"])
    return ids


def make_windows(ids: list[int], num_tokens: int, seq_len: int) -> list[list[int]]:
    """Exactly ``num_tokens`` tokens in windows of ``seq_len`` (the last one may be shorter)."""
    if num_tokens < 1 or seq_len < 1:
        raise CalibrateError("--num-tokens and --seq-len must be positive")
    if len(ids) < num_tokens:
        raise CalibrateError(
            f"the data holds only {len(ids)} tokens but --num-tokens is {num_tokens}; "
            f"add more text or pass --num-tokens {len(ids)} or less"
        )
    ids = ids[:num_tokens]
    return [ids[i : i + seq_len] for i in range(0, num_tokens, seq_len)]


def check_mla(model_path: str | Path) -> dict:
    cfg_path = Path(model_path) / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
    else:  # a hub id: let transformers resolve it
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(model_path), trust_remote_code=True).to_dict()
    if not cfg.get("kv_lora_rank"):
        arch = (cfg.get("architectures") or ["?"])[0]
        raise CalibrateError(
            f"{model_path} ({arch}) is not an MLA model (its config has no kv_lora_rank): TPLA calibration needs "
            "DeepSeek-V2/V3 or Kimi-K2 style latent attention; pass such a model"
        )
    if cfg.get("tpla_transform"):
        raise CalibrateError(
            f"{model_path} was converted by sglang_tpla.convert (rotated latent); calibrate the original checkpoint"
        )
    return cfg


# --------------------------------------------------------------------------- server side results


def read_moments(directory: Path) -> dict | None:
    path = directory / "moments.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a concurrent replace; read again next time
        return None


def calibration_from_snapshot(snap: dict, num_layers: int) -> Calibration:
    if snap.get("identity") is None:
        raise RuntimeError("the server recorded no model identity (was the capture hook installed?)")
    ident = ModelIdentity(**snap["identity"])
    layers = list(snap["layers"])
    if layers[:num_layers] != list(range(num_layers)):
        raise RuntimeError(f"the server captured layers {layers}, expected 0..{num_layers - 1}")
    counts = snap["counts"][:num_layers]
    if len(set(counts)) != 1:
        raise RuntimeError(f"layers saw different token counts {counts}")
    n = counts[0]
    moments = [s / n for s in snap["sums"][:num_layers]]
    pairs = None
    if snap["lsq_queries"] and all(q.numel() for q in snap["lsq_queries"][:num_layers]):
        pairs = (snap["lsq_queries"][:num_layers], snap["lsq_keys"][:num_layers])
    key_means = query_moments = None
    if snap.get("key_sums") and snap.get("query_sums"):  # servers from before format 3 do not send them
        key_means = [s / n for s in snap["key_sums"][:num_layers]]
        query_moments = [s / max(c, 1) for s, c in zip(snap["query_sums"][:num_layers], snap["query_counts"][:num_layers])]
    return Calibration.from_moments(ident, moments, n, lsq_pairs=pairs, key_means=key_means, query_moments=query_moments)


# --------------------------------------------------------------------------- driver


def _progress_bar(total: int):
    """tqdm bar over the prompt tokens sent (rate and ETA), on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="calibrate", file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1)


def run(args, server_args: list[str]) -> Path:
    from .serving import ServerProcess

    cfg = check_mla(args.model_path)
    bad = [g for g in args.fit_g if g < 2 or int(cfg["kv_lora_rank"]) % g]
    if bad:
        raise CalibrateError(f"--fit-g {bad}: each g must be >= 2 and divide kv_lora_rank {cfg['kv_lora_rank']}")
    texts = read_texts(args.data)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.model_path), trust_remote_code=True)
    windows = make_windows(token_stream(texts, tok), args.num_tokens, args.seq_len)
    sent = sum(len(w) for w in windows)
    num_layers = int(cfg["num_hidden_layers"])

    work = Path(tempfile.mkdtemp(prefix="tpla-calibrate-"))
    ours = server_env(args, work)
    server = ServerProcess(
        args.model_path, tp=args.tp, env=ours, log_path=work / "server.log", name="tpla-calibrate",
        args=["--disable-radix-cache", *server_args],
    )
    # plain MLA in the checkpoint's basis: no TPLA option may reach the server through the environment
    server.env = {
        k: v for k, v in server.env.items() if not k.startswith("SGLANG_TPLA_") or k in _KEEP_ENV or k in ours
    }
    print(f"calibrate: {sent} tokens in {len(windows)} windows of <= {args.seq_len}; server log {server.log_path}",
          file=sys.stderr)
    print("calibrate: starting the server (1-3 minutes on a small CPU; a large model takes its load time) ...",
          file=sys.stderr, flush=True)
    with server:
        run_id = uuid.uuid4().hex
        (work / "armed").write_text(run_id)
        lock = threading.Lock()
        bar = _progress_bar(sent)

        def send(ids):
            server.post("/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
            with lock:
                bar.update(len(ids))

        with ThreadPoolExecutor(max_workers=max(1, args.batch)) as pool:
            list(pool.map(send, windows))
        bar.close()
        deadline = time.time() + args.flush_timeout
        snap = None
        while time.time() < deadline:
            snap = read_moments(work)
            if snap and snap.get("run_id") == run_id and snap["counts"] and snap["counts"][0] == sent:
                break
            time.sleep(0.5)
        else:
            got = snap["counts"][0] if snap and snap.get("run_id") == run_id and snap["counts"] else 0
            raise RuntimeError(
                f"the server flushed statistics for {got} tokens, {sent} were sent (waited {args.flush_timeout:.0f} s); "
                f"see {server.log_path}"
            )
    cal = calibration_from_snapshot(snap, num_layers)
    if args.fit_g:
        from .rotation_fit import fit_calibration

        fit_calibration(cal, args.fit_g, args.fit_steps, log=lambda m: print(m, file=sys.stderr, flush=True))
    out = cal.save(args.out)  # tmp + rename: a rerun replaces the file atomically
    shutil.rmtree(work, ignore_errors=True)  # kept (with the server log) only when something failed
    print(
        f"calibrate: wrote {out} ({cal.identity.describe()}, {cal.num_tokens} tokens, "
        f"{0 if not cal.has_lsq else cal.lsq_queries[0].shape[0]} logit pairs per layer)",
        file=sys.stderr,
    )
    return out


_KEEP_ENV = ("SGLANG_TPLA_CPU_MEM_GB", "SGLANG_TPLA_ENV_ROOT", "SGLANG_TPLA_CPU_TRACE_ATTN")
CPU_MEM_DEFAULT_GB = "1"


def server_env(args, work: Path) -> dict[str, str]:
    """What the calibration server's environment gets from us: the capture hook's folder and pair count, and
    the CPU platform's KV budget (``--cpu-mem-gb``, else ``$SGLANG_TPLA_CPU_MEM_GB``, else 1 GiB; SGLang's own
    default sizes the pool from all free memory, 8-13 GB for a tiny model on a 24 GB machine).  A GPU server
    ignores the budget (``--mem-fraction-static`` as usual)."""
    mem = args.cpu_mem_gb or os.environ.get("SGLANG_TPLA_CPU_MEM_GB") or CPU_MEM_DEFAULT_GB
    return {"SGLANG_TPLA_CALIBRATE_DIR": str(work), "SGLANG_TPLA_CALIBRATE_PAIRS": str(args.lsq_pairs),
            "SGLANG_TPLA_CPU_MEM_GB": str(mem)}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m sglang_tpla.calibrate",
        description="Capture TPLA calibration statistics (latent second moments, lsq logit pairs) through SGLang. "
        "Unknown arguments are passed to sglang.launch_server.",
    )
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--data", required=True, help="UTF-8 text, or JSON lines with a \"text\" field")
    ap.add_argument("--num-tokens", type=int, required=True, help="prompt tokens to run (exactly)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per request window")
    ap.add_argument("--batch", type=int, default=8, help="requests in flight")
    ap.add_argument("--lsq-pairs", type=int, default=512, help="(query, key) pairs per layer kept for mu='lsq' (0: none)")
    ap.add_argument("--fit-g", type=int, nargs="+", default=[], metavar="G",
                    help="also fit the 'fit' transform's rotation for these g (sglang_tpla.rotation_fit)")
    ap.add_argument("--fit-steps", type=int, default=200, help="optimizer steps per layer for --fit-g")
    ap.add_argument("--flush-timeout", type=float, default=120.0)
    ap.add_argument("--cpu-mem-gb", help="KV budget in GiB of the server on SGLang's CPU platform (default: "
                    f"$SGLANG_TPLA_CPU_MEM_GB, else {CPU_MEM_DEFAULT_GB}); no effect on a GPU")
    return ap


def main(argv: list[str] | None = None) -> int:
    args, server_args = parser().parse_known_args(argv)
    if server_args and server_args[0] == "--":
        server_args = server_args[1:]
    run(args, server_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
