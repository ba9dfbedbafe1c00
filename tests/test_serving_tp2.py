"""Real SGLang servers on CPU at TP=2: TPLA g=2 against the fp32 reference, exact prefill,
KV capacity, SGLang's own serving benchmark, and which SGLang extend method serves a fresh prompt
(MHA, as on a Hopper server) and a prefix hit (absorbed MLA)."""

import re
import subprocess
import sys

import pytest

from sglang_tpla.serving import ServerProcess

from serving_utils import BUDGET, FP32, NEW_TOKENS, PROMPTS, reference, served_vs_reference, tiny_model, tpla_mode

pytestmark = pytest.mark.slow

# The CPU platform logs the extend method per batch (layer 0) and each MHA extend it runs.
TRACE = {**BUDGET, "SGLANG_TPLA_CPU_TRACE_ATTN": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory, seed=2)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


def _tpla(model_dir, logs, transform):
    return ServerProcess(
        model_dir, tp=2, env=TRACE, log_path=logs / f"tpla-{transform}.log", name=f"tpla-tp2-{transform}",
        args=FP32 + ["--decode-attention-backend", "tpla", "--json-model-override-args", f'{{"tpla": {{"g": 2, "transform": "{transform}"}}}}'],
    )


@pytest.fixture(scope="module")
def mla_and_hadamard(model_dir, logs):
    mla = ServerProcess(model_dir, tp=2, env=TRACE, args=FP32, log_path=logs / "mla.log", name="mla-tp2")
    had = _tpla(model_dir, logs, "hadamard")
    mla.start(), had.start()
    try:
        yield mla.wait_ready(), had.wait_ready()
    finally:
        mla.stop(), had.stop()


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
