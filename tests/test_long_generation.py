"""Fast checks of the issue-17 tools: long_generation (teacher-forced KL vs position, windows, doubling),
retrieval_eval (tokenisation split, greedy with a forced tail) and worst_case (attention statistics, build).
Tiny random models, a few positions; no sglang."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sglang_tpla import long_generation as L
from sglang_tpla import worst_case as W
from sglang_tpla.reference_model import AttentionMode, ReferenceDeepseek
from sglang_tpla.tiny_model import build_tiny_model_dir, load_model

TINY = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, q_lora_rank=32, vocab_size=64, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lg") / "model"
    build_tiny_model_dir(d, seed=3, **TINY)
    gen = torch.Generator().manual_seed(0)
    lines = []
    for n in (40, 12, 15, 30, 9):  # two long documents, three short ones
        ids = torch.randint(4, TINY["vocab_size"], (n,), generator=gen).tolist()
        lines.append(json.dumps({"text": " ".join(f"w{i}" for i in ids)}))
    (d / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_window_means_and_doubling_on_hand_made_inputs():
    assert L.window_means([1, 2, 3, 4, 5], 2) == [1.5, 3.5, 5.0]
    # first window mean 1; the third window (steps 5..6) is the first with mean >= 2
    kl = [1, 1, 1.5, 1.5, 2, 2, 4, 4]
    assert L.doubling_step(kl, window=2) == 5
    assert L.doubling_step(kl, window=2, factor=4.0) == 7
    assert L.doubling_step([1, 1, 1.9, 1.9, 1.2, 0.5], window=2) is None  # never
    assert L.doubling_step([0, 0, 1, 1], window=2) is None  # a zero first window cannot double
    s = L.summary({"v": {"kl": [9.0] + kl, "top1": [1.0] * 9}}, window=2)["v"]
    assert s["kl_prefill_row"] == 9.0 and s["kl_windows"] == [1, 1.5, 2, 4] and s["doubling_step"] == 5
    assert s["kl_max_window_ratio"] == 4 and s["kl_mean"] == pytest.approx(sum(kl) / 8)


def test_sequences_long_docs_first_then_concatenated_short_ones(tiny_dir):
    seqs, where = L.sequences(str(tiny_dir), "heldout", 25, 3)
    assert where == ["doc 0", "doc 3", "docs 1..2 concatenated"]
    assert all(len(s) == 25 for s in seqs)
    assert seqs[2][12] == L.EOS  # doc 1 (12 tokens), then </s>, then doc 2


@pytest.mark.parametrize("kind,g", [("mla", 1), ("pd_sep", 2), ("tpla", 2)])
def test_chunked_teacher_forcing_equals_score(tiny_dir, kind, g):
    cfg, sd = load_model(tiny_dir, dtype=torch.float32)
    model = ReferenceDeepseek(cfg, sd)
    mode = AttentionMode(kind, g=g, mu=None if g == 1 else [[2.0, 2.0]])
    ids = list(range(4, 30))
    want = model.score(ids, 7, mode)
    assert torch.equal(L.teacher_forced_logits(model, ids, 7, mode, chunk=1), want)
    got = L.teacher_forced_logits(model, ids, 7, mode, chunk=8)
    assert (got - want).abs().max() < 1e-4


def test_mla_against_itself_gives_zero_kl_and_full_agreement(tiny_dir):
    scorer = L.Scorer(str(tiny_dir), chunk=4)
    mla = L.variant_from_spec("mla")
    seqs, _ = L.sequences(str(tiny_dir), "heldout", 20, 2)
    per = L.compare(scorer, [mla], seqs, 5, log=lambda m: None)["MLA"]
    assert len(per["kl"]) == 15
    assert max(per["kl"]) == 0.0 and min(per["top1"]) == 1.0
    had = L.variant_from_spec("hadamard:2:pd_sep")
    per = L.compare(scorer, [had], seqs, 5, log=lambda m: None)[had.name]
    assert per["kl"][0] < 1e-9  # pd-sep: the prefill row is exact MLA
    assert max(per["kl"][1:]) > 1e-6  # decode steps are not


def test_attention_stats_uniform_and_one_hot():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]])
    mx, ent, first, inv_l, log_l = W.attention_stats(p, torch.tensor([4, 4]))
    assert mx == pytest.approx(1.25) and ent == pytest.approx(math.log(4)) and first == pytest.approx(0.25)
    # the uniform baseline counts the causal window, not the keys with nonzero weight
    assert inv_l == pytest.approx(0.5) and log_l == pytest.approx(2 * math.log(4))


def test_worst_case_build_scales_queries_only(tmp_path):
    a, b = W.build(tmp_path / "a", seed=0, q_scale=1.0, vocab=64), W.build(tmp_path / "b", seed=0, q_scale=4.0, vocab=64)
    (_, sd_a), (cfg_b, sd_b) = load_model(a), load_model(b)
    assert cfg_b["tpla_worst_case"] == {"seed": 0, "q_scale": 4.0} and cfg_b["hidden_size"] == 512
    for k in sd_a:
        want = sd_a[k] * 4 if k.endswith("q_b_proj.weight") else sd_a[k]
        assert torch.equal(sd_b[k], want), k
    r1, r4 = W.sharpness(a, num_seqs=1, seq_len=24, from_pos=8), W.sharpness(b, num_seqs=1, seq_len=24, from_pos=8)
    assert r4["mean_max_weight"] > r1["mean_max_weight"] and r4["mean_entropy"] < r1["mean_entropy"]
    assert r1["uniform_entropy"] == pytest.approx(sum(math.log(k) for k in range(9, 25)) / 16)


def test_retrieval_greedy_with_forced_tail(tiny_dir):
    from sglang_tpla.retrieval_eval import greedy

    cfg, sd = load_model(tiny_dir, dtype=torch.float32)
    model = ReferenceDeepseek(cfg, sd)
    mode = AttentionMode("mla")
    ids = list(range(4, 20))
    # all prefilled: ReferenceDeepseek.generate (no EOS stop in the first steps of this seed, or a shorter prefix)
    want, _ = model.generate(ids, 4, mode)
    got = greedy(model, ids, len(ids), mode, 4)
    assert got == want[: len(got)]
    # exact MLA: forcing the tail as decode steps gives the same tokens as prefilling it
    assert greedy(model, ids, 10, mode, 4) == got


def test_retrieval_candidates_and_tokenized_split():
    from pathlib import Path

    from tokenizers import Tokenizer

    from sglang_tpla import retrieval as R
    from sglang_tpla.retrieval_eval import candidate_values, tokenize

    tok = Tokenizer.from_file(str(Path(__file__).parent / "assets" / "tiny-deepseek-trained" / "tokenizer.json"))
    for ex in R.build_task(1, 8):
        vals = candidate_values(ex)
        assert len(vals) == 12 and ex.answer in vals and all(len(v) == 5 for v in vals)
        t = tokenize(tok, ex)
        assert 0 < t["split"] < len(t["prompt"]) and t["answer"]
        assert tok.decode(t["prompt"][t["split"]:]).strip().startswith(R.LOOKUP.strip())


def test_rewrite_report_from_json(tmp_path):
    kl_h, kl_f = [0.0] + [1e-2] * 8, [0.0] + [1e-3] * 4 + [2e-3] * 4
    per = {"hadamard g=2 pd-sep": {"kl": kl_h, "top1": [1.0] * 9}, "fit g=2 pd-sep": {"kl": kl_f, "top1": [1.0] * 9}}
    res = {"meta": {"date": "d", "commit": "c", "command": "cmd", "model_path": "m", "calibration": None, "data": "heldout",
                    "gen_len": 8, "window": 4, "chunk": 4, "threads": 1, "cpu_seconds": 1.0},
           "results": {"64": {"num_seqs": 1, "sources": ["doc 0"], "per_position": per}}, "crosscheck": None, "score_check": None}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    L.run(["--rewrite-report", str(path)])
    md = (tmp_path / "results.md").read_text()
    assert "| fit g=2 pd-sep | 1.500e-03 | 1.000e-03 | 2.000e-03 | 2.00 | 1.0000 | 1.0000 | step 5 |" in md
    assert "| 64 | g=2 pd-sep | 6.7x | 10.0x | 5.0x |" in md
    assert "report rewritten from results.json" in md and (tmp_path / "kl_vs_position.png").exists()


def test_worst_case_goals_table(tmp_path):
    rows = [{"variant": "MLA", "perplexity": 100.0, "top1_agreement": 1.0, "kl_mean": 0.0},
            {"variant": "hadamard g=2 pd-sep", "perplexity": 102.0, "top1_agreement": 0.9, "kl_mean": 0.03},
            {"variant": "fit g=2 pd-sep", "perplexity": 99.0, "top1_agreement": 0.99, "kl_mean": 0.01}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": rows}))
    md = W.goals_markdown([f"run A={path}"])
    assert "| run A | hadamard g=2 pd-sep | +2.00 % | 0.9000 | 3.000e-02 | - |" in md
    assert "| run A | fit g=2 pd-sep | -1.00 % | 0.9900 | 1.000e-02 | 3.00x |" in md


def test_issue17_tools_do_not_import_sglang():
    import subprocess
    import sys

    code = ("import sys, sglang_tpla.long_generation, sglang_tpla.retrieval_eval, sglang_tpla.worst_case; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sglang', 'triton', 'flashinfer')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
