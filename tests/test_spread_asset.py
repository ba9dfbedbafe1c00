"""The second trained asset (a spread-out latent), the latent spectrum tool, and the synthetic retrieval task."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sglang_tpla import retrieval as R
from sglang_tpla import spectrum as S
from sglang_tpla import train as T
from sglang_tpla.reference_model import AttentionMode, ReferenceDeepseek
from sglang_tpla.tiny_model import load_model, random_state_dict, tiny_config

ASSETS = Path(__file__).parent / "assets"
SPREAD = ASSETS / "tiny-deepseek-spread"
LOWRANK = ASSETS / "tiny-deepseek-trained"
# issue #17 item 1: in every layer the top 64 PCA components hold at most this share of the latent energy
TOP64_BOUND = 0.80

needs_spread = pytest.mark.skipif(not (SPREAD / "model.safetensors").exists(), reason="spread asset not built")


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- retrieval task


def test_retrieval_deterministic():
    assert R.build_task(3, 8) == R.build_task(3, 8)
    assert R.build_task(3, 8) != R.build_task(4, 8)
    assert R.training_document(0, 5) == R.training_document(0, 5)
    assert R.training_document(0, 5) != R.training_document(0, 6)
    # train and eval streams never share a document
    assert R.build_task(0, 1)[0].prompt.split("Lookup")[0] not in R.training_document(0, 0)


def test_retrieval_examples_are_answerable():
    for ex in R.build_task(1, 12, n_pairs=10, n_queries=3):
        assert ex.prompt.startswith(R.HEADER) and ex.prompt.endswith(" =")
        key = ex.prompt.rsplit(R.LOOKUP, 1)[1][:-2]
        records = dict(re.findall(r"^- (\S+) = (\d{4})$", ex.prompt, flags=re.M))
        assert len(records) == 10
        assert re.fullmatch(r" \d{4}", ex.answer) and records[key] == ex.answer.strip()
    doc = R.training_document(2, 0)
    records = dict(re.findall(r"^- (\S+) = (\d{4})$", doc, flags=re.M))
    lookups = re.findall(r"^Lookup (\S+) = (\d{4})$", doc, flags=re.M)
    assert lookups and all(records[k] == v for k, v in lookups)


def test_retrieval_scorer():
    ex = [R.Example("Records:\n- a-b = 0042\nLookup a-b =", " 0042"), R.Example("p", " 1234")]
    assert R.exact_match(" 0042\nLookup x", " 0042")
    assert R.exact_match("0042", " 0042")
    assert not R.exact_match(" 00421", " 0042")
    assert not R.exact_match(" 004", " 0042")
    assert not R.exact_match("\n0042", " 0042")
    assert R.score([" 0042\n", " 1235"], ex) == 0.5
    assert R.score([" 0042", "1234 \nfoo"], ex) == 1.0
    with pytest.raises(ValueError):
        R.score([" 0042"], ex)


def test_answer_spans_are_the_looked_up_values():
    for index in range(5):
        doc = R.training_document(3, index)
        lookups = re.findall(r"^Lookup \S+ = (\d{4})$", doc, flags=re.M)
        spans = R.answer_spans(doc)
        assert [doc[a:b] for a, b in spans] == lookups and len(lookups) >= 4
        # only lookup lines: the same value text inside a record line is not marked
        assert all(doc.startswith(R.LOOKUP, doc.rfind("\n", 0, a) + 1) for a, _ in spans)


def test_retrieval_windows_mark_exactly_the_looked_up_value_tokens():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(LOWRANK / "tokenizer.json"))
    wins, mask, nxt = T.retrieval_windows(tok, seed=3, start_doc=0, n=2, seq_len=1024)
    assert wins.shape == mask.shape == (2, 1025) and mask.dtype == torch.bool
    # the first window holds documents 0, 1, .. whole: its marked tokens decode to their lookups' values
    ids, values = wins[0].tolist(), []
    n_whole = ids.count(1) - (ids[-1] == 1)
    for i in range(n_whole):
        values += re.findall(r"^Lookup \S+ = (\d{4})$", R.training_document(3, i), flags=re.M)
    runs, prev = [], False  # contiguous marked runs, one per value
    last_eos = len(ids) - ids[::-1].index(1)
    for t, m in zip(ids[:last_eos], mask[0, :last_eos].tolist()):
        if m and prev:
            runs[-1].append(t)
        elif m:
            runs.append([t])
        prev = m
    assert [tok.decode(r).strip() for r in runs] == values
    assert nxt > n_whole


# --------------------------------------------------------------------------- spectrum tool


def test_spectrum_measures_the_reference_models_latent():
    """spectrum.latent_moments (batched trainable model) gives the reference model's E[u u^T] of u = c / RMS(c)."""
    cfg = tiny_config(num_hidden_layers=2)
    sd = random_state_dict(cfg, seed=5)
    ids = torch.randint(0, cfg["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    stats = S.latent_moments(cfg, sd, ids)
    ref = ReferenceDeepseek(cfg, sd).latent_second_moments([ids[0].tolist(), ids[1].tolist()])
    for s, m in zip(stats, ref):
        assert s["n"] == 80
        torch.testing.assert_close(s["second"] / s["n"], m, atol=1e-5, rtol=1e-4)
    # energy shares: a rank-2 second moment puts everything in the top 16
    ev = torch.tensor([3.0, 1.0] + [0.0] * 510)
    assert S.energy_fractions(ev, (1, 16)) == [0.75, 1.0]


def _spectrum(path: Path, tokens: int = 2048) -> dict:
    cfg, sd = load_model(path, dtype=torch.float32)
    stats = S.latent_moments(cfg, sd, S.text_windows(path, "heldout", seq_len=256, num_tokens=tokens))
    return S.spectra(stats)


@needs_spread
def test_spread_asset_latent_is_spread():
    """Measured here on 2048 held-out tokens (a small sample overstates the top components: the bound holds a
    fortiori for the 16K-token numbers in results/fidelity/spectrum.md)."""
    spec = _spectrum(SPREAD)
    top64 = [row[1] for row in spec["uncentred"]]
    print("spread asset, uncentred top-64 share per layer:", [round(v, 4) for v in top64])
    assert len(top64) == load_model(SPREAD)[0]["num_hidden_layers"]
    assert max(top64) <= TOP64_BOUND


@pytest.mark.skipif(not (LOWRANK / "model.safetensors").exists(), reason="trained asset not built")
def test_lowrank_asset_fails_the_bound():
    """The check above tells the assets apart: the first asset's latent sits in 16 directions."""
    spec = _spectrum(LOWRANK, tokens=1024)
    assert min(row[0] for row in spec["uncentred"]) > 0.99
    assert max(row[1] for row in spec["uncentred"]) > TOP64_BOUND


# --------------------------------------------------------------------------- the spread asset


@needs_spread
def test_spread_asset_layout():
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "TRAINING.md",
              "training_curve.csv", "training_curve.png", "heldout.jsonl", "heldout.txt"):
        assert (SPREAD / f).is_file(), f
    assert sum(f.stat().st_size for f in SPREAD.rglob("*") if f.is_file()) <= 50 * 2**20
    cfg, sd = load_model(SPREAD)
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]) == (512, 64, 128, 128)
    assert cfg["hidden_size"] >= cfg["kv_lora_rank"]
    assert set(sd) == set(random_state_dict(cfg))
    assert all(v.dtype == torch.bfloat16 for v in sd.values())


def _windows(path: Path, seq_len: int) -> torch.Tensor:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    docs = [T.Document(**{k: d[k] for k in ("source", "name", "text")}) for d in map(json.loads, open(path / "heldout.jsonl"))]
    return T.windows(torch.tensor([i for ids in T.encode_documents(tok, docs) for i in ids]), seq_len)


@needs_spread
def test_spread_asset_matches_reference():
    cfg, sd = load_model(SPREAD)
    ids = _windows(SPREAD, 96)[:1, :-1]
    with torch.no_grad():
        out = T.load_trainable(cfg, sd)(ids)[0]
    ref = ReferenceDeepseek(cfg, sd).forward(ids[0].tolist(), 0, ReferenceDeepseek(cfg, sd).new_cache(), AttentionMode("mla"), decode=False)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)


@needs_spread
def test_spread_asset_learned():
    """Beats an add-one unigram fit on the other held-out windows, on two held-out windows (fp32 reference, MLA)."""
    cfg, sd = load_model(SPREAD)
    ref = ReferenceDeepseek(cfg, sd)
    all_wins = _windows(SPREAD, 256)
    wins, rest = all_wins[:2], all_wins[2:].reshape(-1)
    targets = wins[:, 1:].reshape(-1)
    counts = torch.bincount(rest, minlength=cfg["vocab_size"]).double() + 1.0
    unigram_ppl = math.exp(float(-(counts[targets] / counts.sum()).log().mean()))
    nll = sum(float(F.cross_entropy(ref.forward(w[:-1].tolist(), 0, ref.new_cache(), AttentionMode("mla"), decode=False), w[1:],
                                    reduction="sum")) for w in wins)
    ppl = math.exp(nll / targets.numel())
    recorded = float(re.search(r"heldout_ppl = ([0-9.]+)", (SPREAD / "TRAINING.md").read_text()).group(1))
    print(f"spread asset held-out sample: ppl {ppl:.1f} vs unigram {unigram_ppl:.1f} (TRAINING.md: {recorded})")
    assert ppl < 0.6 * unigram_ppl
    assert 0.5 * recorded < ppl < 2.0 * recorded
