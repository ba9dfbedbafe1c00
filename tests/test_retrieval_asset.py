"""The third trained asset: a model that does the key/value retrieval task under exact MLA (issue #17 item 4)."""

from pathlib import Path

import pytest
import torch

from sglang_tpla import retrieval as R
from sglang_tpla import train as T
from sglang_tpla.reference_model import AttentionMode, ReferenceDeepseek
from sglang_tpla.tiny_model import load_model, random_state_dict

RETRIEVAL = Path(__file__).parent / "assets" / "tiny-deepseek-retrieval"
# greedy exact match under MLA on build_task(1, 16, n_pairs=4): guessing a 4-digit value gets about 0, picking
# one of the 4 records' values at random 0.25; results/fidelity/retrieval/tiny-deepseek-retrieval measures 0.4+
MIN_EM = 0.25


pytestmark = pytest.mark.usefixtures("one_thread")


def _tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(RETRIEVAL / "tokenizer.json"))


def test_retrieval_asset_layout():
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "TRAINING.md",
              "training_curve.csv", "training_curve.png"):
        assert (RETRIEVAL / f).is_file(), f
    assert sum(f.stat().st_size for f in RETRIEVAL.rglob("*") if f.is_file()) <= 10 * 2**20
    cfg, sd = load_model(RETRIEVAL)
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]) == (512, 64, 128, 128)
    assert set(sd) == set(random_state_dict(cfg))
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert "--kv-parametrization direct" in (RETRIEVAL / "TRAINING.md").read_text()


def test_retrieval_asset_matches_reference():
    """The trainer's MLA module (latent path) and the reference model agree on a retrieval prompt."""
    cfg, sd = load_model(RETRIEVAL)
    ids = _tok().encode(R.build_task(1, 1, n_pairs=4)[0].prompt).ids
    with torch.no_grad():
        out = T.load_trainable(cfg, sd)(torch.tensor([ids]))[0]
    ref = ReferenceDeepseek(cfg, sd)
    torch.testing.assert_close(out, ref.forward(ids, 0, ref.new_cache(), AttentionMode("mla"), decode=False),
                               atol=1e-3, rtol=0)


def test_retrieval_asset_copies_under_mla():
    """Greedy exact match with the fp32 reference model (exact MLA, prefill + decode) on the first 16 examples of
    the evaluation task with 4 records: far above what guessing a 4-digit value gives (about 0)."""
    cfg, sd = load_model(RETRIEVAL)
    ref, tok = ReferenceDeepseek(cfg, sd), _tok()
    examples = R.build_task(1, 16, n_pairs=4)
    outs = []
    for ex in examples:
        n_ans = len(tok.encode(ex.answer, add_special_tokens=False).ids)
        new, _ = ref.generate(tok.encode(ex.prompt).ids, n_ans + 1, AttentionMode("mla"))
        outs.append(tok.decode([t for t in new if t != 1]))
    em = R.score(outs, examples)
    print(f"retrieval asset: MLA exact match {em:.3f} on 16 examples")
    assert em >= MIN_EM


def test_build_task_with_fewer_records_than_lookups():
    """n_pairs < n_queries: each document is asked for each of its records once (before: an IndexError)."""
    exs = R.build_task(1, 4, n_pairs=2, n_queries=4)
    keys = [ex.prompt.rsplit(R.LOOKUP, 1)[1][:-2] for ex in exs]
    assert len(exs) == 4 and keys[0] != keys[1] and keys[2] != keys[3]
    assert all(ex.prompt.count("\n- ") == 2 for ex in exs)
