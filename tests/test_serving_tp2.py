"""Real SGLang servers on CPU at TP=2: TPLA g=2 against the fp32 reference, exact prefill,
KV capacity, SGLang's own serving benchmark, which SGLang extend method serves a fresh prompt
(MHA, as on a Hopper server) and a prefix hit (absorbed MLA), and a 2K-token prompt in chunks.

The TPLA server is started as ``sglang serve`` (SGLang 0.5.23's recommended entry point: it loads the
plugins before it builds the server, like ``python -m sglang.launch_server``, so TPLA needs nothing of
its own there); stock MLA as ``python -m sglang.launch_server``.  One pair of servers serves every test
here (the suite's time is mostly server starts).

Long prompt: 2048 tokens in 512-token chunks, so every chunk after the first is an extend over
a cached prefix on the latent-split pool (exact MLA, the prefix latent all-gathered chunk by chunk,
bounded memory: ``kernels/torch_extend.py``); prompt and first-token log-probs equal stock MLA's (also
in 512-token chunks) and the fp32 reference model's (fed the prompt in 512-token chunks).  On the CPU
platform SGLang's torch_native MLA extend holds ``[chunk, heads, prefix]`` tensors: its scheduler was
OOM-killed at 16K on this 24 GB machine, so the 16K setting (``SGLANG_TPLA_TEST_LONG_PROMPT=16384``)
checks against the reference alone; a 4K prompt took 5.5 minutes of the suite, hence 2K here.  Chunking
does not change the log-probs; it only matters for prompts longer than a chunk, so the
short-prompt tests are unaffected."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglang_tpla.bench.prefill import scheduler_peak_mib
from sglang_tpla.kernels.torch_extend import memory_bound_bytes
from sglang_tpla.reference_model import AttentionMode
from sglang_tpla.serving import ServerProcess
from sglang_tpla.tiny_model import build_tiny_model_dir

from serving_utils import BUDGET, FP32, NEW_TOKENS, PROMPTS, reference, served_vs_reference, tpla_mode

pytestmark = pytest.mark.slow

# The CPU platform logs the extend method per batch (layer 0) and each MHA extend it runs.
TRACE = {**BUDGET, "SGLANG_TPLA_CPU_TRACE_ATTN": "1"}


# SGLANG_TPLA_TEST_LONG_PROMPT=16384: the long prompt at the size, 16K tokens in 2048-token chunks;
# minutes of CPU, so the suite runs 2K.  Above 4K the stock MLA server is not asked (on a 24 GB machine its
# scheduler was OOM-killed at 16K, 2026-12-06: rank 0 at 9.1 GB in SGLang's torch_native MLA extend) and the
# oracle is the fp32 reference model alone, fed the prompt in chunks (it shares no code with the served path).
PROMPT_LEN = int(os.environ.get("SGLANG_TPLA_TEST_LONG_PROMPT", "2048"))
ASK_STOCK_MLA = PROMPT_LEN <= 4096
CHUNK, MLA_CHUNK = (512, 512) if ASK_STOCK_MLA else (2048, 1024)
REF_CHUNK = 512  # the reference model's own chunks: [512, heads, prefix] fp32 logits, 256 MB at 16K
LONG_TOL = 2e-4  # fp32, max |logprob difference| over all prompt positions and the first decoded token
CONTEXT = ["--context-length", str(PROMPT_LEN + 64)]


def sglang_cli() -> str:
    exe = Path(sys.executable).parent / "sglang"  # the console script of the environment that runs the tests
    return str(exe) if exe.exists() else shutil.which("sglang")


class SglangServe(ServerProcess):
    """A :class:`ServerProcess` started as ``sglang serve`` instead of ``python -m sglang.launch_server``."""

    @property
    def command(self) -> list[str]:
        return [sglang_cli(), "serve", "--model-path", self.model_path, "--tp", str(self.tp),
                "--host", "127.0.0.1", "--port", str(self.port), *self.args]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=2, max_position_embeddings=32768)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def mla_and_hadamard(model_dir, logs):
    assert sglang_cli(), "the sglang console script is not installed"
    mla = ServerProcess(model_dir, tp=2, env=TRACE, args=FP32 + CONTEXT + ["--chunked-prefill-size", str(MLA_CHUNK)],
                        log_path=logs / "mla.log", name="mla-tp2")
    had = SglangServe(
        model_dir, tp=2, env=TRACE, log_path=logs / "tpla-hadamard.log", name="tpla-tp2-hadamard-serve",
        args=FP32 + CONTEXT + ["--chunked-prefill-size", str(CHUNK), "--decode-attention-backend", "tpla",
                               "--json-model-override-args", json.dumps({"tpla": {"g": 2, "transform": "hadamard", "seed": 0}})],
    )
    mla.start(), had.start()
    try:
        yield mla.wait_ready(), had.wait_ready()
    finally:
        mla.stop(), had.stop()


def test_sglang_serve_runs_tpla_through_the_plugin(mla_and_hadamard):
    _, had = mla_and_hadamard
    assert had.command[1] == "serve"
    assert "TPLA on: attn TP 2, g=2" in had.log_text(), had.log_tail()


def test_tpla_hadamard_matches_fp32_reference_with_prefix_reuse(mla_and_hadamard, model_dir):
    _, had = mla_and_hadamard
    ref = reference(model_dir, "hadamard", seed=0)
    rows = served_vs_reference(had, ref, tpla_mode("pd_sep", 2, ref))
    print("hadamard (cached, tokens equal, max|dlogprob|):", rows)
    assert rows[1][0] >= 6, "second prompt should reuse the cached prefix (exact extend over the sliced pool)"
    for cached, equal, diff in rows:
        assert equal and diff < 1e-4, rows


def test_first_token_is_exact_mla_and_decode_is_not(mla_and_hadamard):
    mla, had = mla_and_hadamard
    differs = 0.0
    for prompt in PROMPTS:
        t_mla, lp_mla, _ = mla.generate(prompt, NEW_TOKENS)
        t_tpla, lp_tpla, _ = had.generate(prompt, NEW_TOKENS)
        assert t_tpla[0] == t_mla[0] and abs(lp_tpla[0] - lp_mla[0]) < 1e-4  # prefill is exact MLA
        differs = max(differs, max(abs(a - b) for a, b in zip(lp_mla[1:], lp_tpla[1:])))
    print(f"TPLA g=2 decode vs MLA: max |dlogprob| {differs:.3e}")
    assert differs > 1e-3  # decode is TPLA, an approximation


def test_fresh_prompt_takes_sglangs_mha_prefill_and_a_prefix_hit_the_absorbed_path(mla_and_hadamard):
    """The extend method a Hopper server takes (SGLang's fa3 handler, the default for MLA models on sm90):
    a fresh prompt runs SGLang's MHA prefill (``forward_normal_one_shot``: it writes the full 576-wide
    latent rows, which TPLA's pool slices), a radix-cache prefix hit the absorbed MLA extend; stock MLA
    and TPLA alike.  The fp32-reference comparisons above serve both paths."""
    fresh, hit = [70, 71, 72, 73, 74, 75, 76, 77], [70, 71, 72, 73, 74, 75, 90, 91, 92]
    for server in mla_and_hadamard:
        before = len(server.log_text())
        server.generate(fresh, 2)
        _, _, meta = server.generate(hit, 2)
        assert meta.get("cached_tokens", 0) == 6
        log = server.log_text()[before:]
        mha_runs = [line for line in log.splitlines() if "torch_native MHA extend" in line]
        assert "torch_native -> MHA_ONE_SHOT, mode EXTEND, prefix lens [0], extend lens [8]" in log, log[-3000:]
        assert any("prefix lens [0], extend lens [8]" in line for line in mha_runs), log[-3000:]
        assert "torch_native -> MLA, mode EXTEND, prefix lens [6], extend lens [3]" in log, log[-3000:]
        assert not any("prefix lens [6]" in line for line in mha_runs), mha_runs


def test_kv_capacity_at_same_budget(mla_and_hadamard):
    mla, had = mla_and_hadamard
    n_mla, n_tpla = mla.max_total_num_tokens(), had.max_total_num_tokens()
    print(f"max_total_num_tokens at the same budget: MLA {n_mla}, TPLA g=2 {n_tpla} ({n_tpla / n_mla:.3f}x)")
    assert n_tpla >= 0.98 * 576 / 320 * n_mla


def test_sglang_serving_benchmark_has_no_failures(mla_and_hadamard, model_dir, tmp_path):
    _, had = mla_and_hadamard
    r = subprocess.run(
        [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang", "--base-url", had.url,
         "--dataset-name", "random-ids", "--tokenizer", str(model_dir), "--num-prompts", "12",
         "--random-input-len", "48", "--random-output-len", "12", "--random-range-ratio", "0.5",
         "--max-concurrency", "4", "--seed", "1"],
        capture_output=True, text=True, timeout=900, env=had.env, cwd=tmp_path,  # it writes a result file
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    ok = re.search(r"Successful requests:\s+(\d+)", out)
    assert ok and int(ok.group(1)) == 12, out[-3000:]
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    assert failed is None or int(failed.group(1)) == 0


def _scored(server, prompt):
    out = server.post("/generate", {
        "input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True},
    })  # fmt: skip
    meta = out["meta_info"]
    prompt_lps = [float(t[0]) for t in meta["input_token_logprobs"][1:]]  # the first has no logprob
    return prompt_lps, float(meta["output_token_logprobs"][0][0]), int(meta["output_token_logprobs"][0][1])


def _reference_scored(model_dir, prompt, chunk):
    """``_scored``'s triple from the fp32 reference model (exact MLA), fed ``chunk`` tokens at a time over
    its own cache: memory grows with the chunk, not the prompt."""
    ref, lps = reference(model_dir), []
    cache = ref.new_cache()
    with torch.no_grad():
        for start in range(0, len(prompt), chunk):
            logits = ref.forward(prompt[start : start + chunk], start, cache, AttentionMode("mla"), decode=False)
            lps.append(torch.log_softmax(logits.double(), -1))
    lp = torch.cat(lps)
    targets = torch.tensor(prompt[1:])
    first = int(lp[-1].argmax())
    return lp[:-1].gather(1, targets[:, None])[:, 0].tolist(), float(lp[-1, first]), first


def test_long_prompt_in_chunks_equals_stock_mla(mla_and_hadamard, model_dir):
    """Prompt and first-token log-probs equal stock MLA's (up to 4K; the stock server is not asked above,
    see ``ASK_STOCK_MLA``) and the fp32 reference model's, and TPLA's scheduler peak grows by at most the
    stated extend bound (``memory_bound_bytes`` for one chunk) over its peak after a two-chunk prompt,
    which runs every per-chunk step of the long prompt (SGLang's MHA prefill of the first chunk, one
    extend over a one-chunk prefix, logits and log-probs) with the shortest prefix: memory that grew
    with the prefix (e.g. ``[chunk, heads, prefix]`` logits: 470 MB at 16K) would exceed it.  At the
    suite's 2K (512-token chunks, prefixes up to 1.5K) such logits would be only ~12 MB, under the ~100 MiB
    bound: there the check catches gross growth only; the 16K setting is the discriminating one.  (Against
    a one-chunk prompt, which runs no extend, the 16K growth was 134 MiB, 2026-12-06: the extend's own
    per-chunk work is not free; what is bounded is its growth with the prefix.)"""
    mla, tpla = mla_and_hadamard
    rng = random.Random(0)
    _scored(tpla, [rng.randrange(3, 500) for _ in range(2 * CHUNK)])  # two chunks: one extend, one-chunk prefix
    peak_two_chunks = scheduler_peak_mib(tpla)
    prompt = [rng.randrange(3, 500) for _ in range(PROMPT_LEN)]
    before = tpla.log_text().count("Prefill batch")
    lp_tpla, first_tpla, tok_tpla = _scored(tpla, prompt)
    peak = scheduler_peak_mib(tpla)
    chunks = tpla.log_text().count("Prefill batch") - before
    oracles = {"fp32 reference": _reference_scored(model_dir, prompt, REF_CHUNK)}
    if ASK_STOCK_MLA:
        oracles[f"stock MLA ({MLA_CHUNK}-token chunks)"] = _scored(mla, prompt)
    cfg = json.loads((model_dir / "config.json").read_text())
    bound_mib = memory_bound_bytes(CHUNK, cfg["num_attention_heads"] // 2, cfg["kv_lora_rank"]) / 2**20
    print(f"{PROMPT_LEN}-token prompt, TPLA in {CHUNK}-token chunks ({chunks} prefill batches): scheduler peak RSS "
          f"{peak:.0f} MiB, +{peak - peak_two_chunks:.0f} MiB over a two-chunk prompt (stated extend bound {bound_mib:.0f} MiB)")
    for name, (lp, first, tok) in oracles.items():
        diff = max(abs(a - b) for a, b in zip(lp, lp_tpla))
        print(f"  vs {name}: max |dlogprob| over the prompt {diff:.2e}, first token {abs(first - first_tpla):.2e}, "
              f"same first token {tok == tok_tpla}")
        assert len(lp) == len(lp_tpla) == PROMPT_LEN - 1, name
        assert tok == tok_tpla and abs(first - first_tpla) < LONG_TOL, name
        assert diff < LONG_TOL, name
    if ASK_STOCK_MLA:
        print(f"  stock MLA scheduler peak RSS {scheduler_peak_mib(mla):.0f} MiB")
    assert chunks >= PROMPT_LEN // CHUNK
    assert peak - peak_two_chunks <= bound_mib
