"""A 4K-token prompt in 1024-token chunks at TP=2: every chunk after the first is an extend over a
cached prefix on TPLA's latent-split pool (exact MLA, the prefix latent all-gathered chunk by chunk,
bounded memory: ``kernels/torch_extend.py``).  Prompt and first-token log-probs equal stock MLA's;
the schedulers' peak RSS is printed side by side (the bound itself is measured in
``tests/test_torch_extend.py``; 16K prompts are in ``python -m sglang_tpla.bench.prefill``).

Stock MLA runs in 512-token chunks: on the CPU platform SGLang's torch_native MLA extend holds
``[chunk, heads, prefix]`` tensors, and at 2048-token chunks over a 16K prompt a scheduler was
OOM-killed at 6.5 GB on this 24 GB machine (an 8K prompt, measured once: max |dlogprob| 5.3e-6,
scheduler peak RSS 5.1 GB for MLA in 512-token chunks vs 2.5 GB for TPLA in 2048-token chunks).
Chunking does not change the log-probs."""

import random

import pytest

from sglang_tpla.bench.prefill import scheduler_peak_mib
from sglang_tpla.serving import ServerProcess
from sglang_tpla.tiny_model import build_tiny_model_dir

from serving_utils import BUDGET, FP32

pytestmark = pytest.mark.slow

PROMPT_LEN, CHUNK, MLA_CHUNK = 4096, 1024, 512
TOL = 2e-4  # fp32, max |logprob difference| over all prompt positions and the first decoded token


def _scored(server, prompt):
    out = server.post("/generate", {
        "input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True},
    })  # fmt: skip
    meta = out["meta_info"]
    prompt_lps = [float(t[0]) for t in meta["input_token_logprobs"][1:]]  # the first has no logprob
    return prompt_lps, float(meta["output_token_logprobs"][0][0]), int(meta["output_token_logprobs"][0][1])


def test_long_prompt_in_chunks_equals_stock_mla(tmp_path_factory):
    model_dir = build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=3, max_position_embeddings=32768)
    logs = tmp_path_factory.mktemp("logs")
    common = FP32 + ["--context-length", str(PROMPT_LEN + 64)]
    mla = ServerProcess(
        model_dir, tp=2, env=BUDGET, args=common + ["--chunked-prefill-size", str(MLA_CHUNK)], log_path=logs / "mla.log", name="mla-long"
    )
    tpla = ServerProcess(
        model_dir, tp=2, env=BUDGET, log_path=logs / "tpla.log", name="tpla-long",
        args=common + ["--chunked-prefill-size", str(CHUNK), "--decode-attention-backend", "tpla", "--json-model-override-args", '{"tpla": {"g": 2, "transform": "hadamard"}}'],
    )  # fmt: skip
    rng = random.Random(0)
    prompt = [rng.randrange(3, 500) for _ in range(PROMPT_LEN)]
    mla.start(), tpla.start()
    try:
        mla.wait_ready(), tpla.wait_ready()
        lp_mla, first_mla, tok_mla = _scored(mla, prompt)
        lp_tpla, first_tpla, tok_tpla = _scored(tpla, prompt)
        rss = scheduler_peak_mib(mla), scheduler_peak_mib(tpla)
        chunks = tpla.log_text().count("Prefill batch")
    finally:
        mla.stop(), tpla.stop()
    diff = max(abs(a - b) for a, b in zip(lp_mla, lp_tpla))
    print(f"{PROMPT_LEN}-token prompt, {CHUNK}-token chunks (MLA {MLA_CHUNK}): max |dlogprob| over the prompt {diff:.2e}, first token "
          f"{abs(first_mla - first_tpla):.2e}; scheduler peak RSS MLA {rss[0]:.0f} MiB, TPLA {rss[1]:.0f} MiB; prefill batches {chunks}")
    assert len(lp_mla) == len(lp_tpla) == PROMPT_LEN - 1
    assert chunks >= PROMPT_LEN // CHUNK
    assert tok_mla == tok_tpla and abs(first_mla - first_tpla) < TOL
    assert diff < TOL
