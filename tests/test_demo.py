"""The main job's served comparison and the text demo, without servers (fakes answer like SGLang), plus the
main job's fp32 reference part on the trained model with small settings.  The real servers run in
tests/test_launch.py (the demo script) and in `bash run.sh main`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sglang_tpla import demo
from sglang_tpla.eval import Doc

VOCAB = 16


def _logprobs(step: int, shift: float) -> list[float]:
    logits = torch.tensor([math.sin(3 * v + step) + (shift if v == step % VOCAB else 0.0) for v in range(VOCAB)])
    return torch.log_softmax(logits.double(), -1).tolist()


class FakeServer:
    """Answers greedy and teacher-forced /generate requests the way SGLang does; TPLA is a slightly
    different distribution and a larger pool."""

    started: list = []

    def __init__(self, model_path, tp, args, env, log_path, name):
        self.tpla = "tpla" in args
        self.args = args
        FakeServer.started.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def max_total_num_tokens(self):
        return 1800 if self.tpla else 1000

    def generate(self, ids, n):
        return [3] * n, [-1.0] * n, {}

    def post(self, path, body):
        from sglang_tpla.patches.forced_decode import PARAM

        forced = body["sampling_params"]["custom_params"][PARAM]
        assert body["top_logprobs_num"] == VOCAB and body["custom_logit_processor"]
        rows = [_logprobs(k, 0.3 if self.tpla else 0.0) for k in range(len(forced))]
        return {"meta_info": {
            "output_token_logprobs": [[rows[k][t], t, None] for k, t in enumerate(forced)],
            "output_top_logprobs": [[[lp, v, None] for v, lp in enumerate(row)] for row in rows],
        }}


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    return tmp_path


def test_compare_served_teacher_forces_both_servers_and_reports(model_dir, monkeypatch):
    monkeypatch.setattr(demo, "ServerProcess", FakeServer)
    FakeServer.started = []
    docs = [Doc([0, 5, 6, 7], [8, 9, 10, 11, 12, 13]), Doc([0, 4, 4], [1, 2, 3, 4, 5, 6])]
    mla, tpla = demo.compare_served(model_dir, 2, {"g": 2, "transform": "hadamard"}, model_dir, docs,
                                    new_tokens=4, progress=lambda m: None)
    mla_args, tpla_args = (s.args for s in FakeServer.started)
    for args in (mla_args, tpla_args):  # what forcing needs, as in sglang_tpla.eval
        assert "--enable-custom-logit-processor" in args and "--disable-overlap-schedule" in args
    assert "--decode-attention-backend" not in mla_args
    assert json.loads(tpla_args[tpla_args.index("--json-model-override-args") + 1]) == {
        "tpla": {"g": 2, "transform": "hadamard"}}
    assert len(mla.forced.dists) == 2 and mla.forced.dists[0].shape == (6, VOCAB)
    table = demo.results_markdown(mla, tpla, 2, 2)
    assert "| 1,000 | 1,800 | 1.800x |" in table
    assert "teacher-forced top-1 agreement with MLA | 1.000 |" in table
    kl = float(table.split("nats: mean / max | 0 | ")[1].split(" / ")[0])
    assert 0 < kl < 0.1


def test_compare_served_refuses_a_server_that_does_not_force(model_dir, monkeypatch):
    class Broken(FakeServer):
        def post(self, path, body):
            out = super().post(path, body)
            out["meta_info"]["output_token_logprobs"][0][1] = 15  # not the document's token
            return out

    monkeypatch.setattr(demo, "ServerProcess", Broken)
    with pytest.raises(RuntimeError, match="teacher forcing failed"):
        demo.compare_served(model_dir, 1, {}, model_dir, [Doc([0, 1], [2, 3])], new_tokens=2, progress=lambda m: None)


def test_text_demo_sends_tokenized_prompts_and_prints_text(capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo.TRAINED_MODEL))
    sent = []

    def post(body):
        sent.append(body)
        return {"text": " returns the value", "output_ids": [5, 6]}

    done = demo.complete_texts(post, tok, ["Open file and return a stream."], 8, {"repetition_penalty": 1.3})
    assert sent[0]["input_ids"][0] == 0  # BOS, as in training
    assert sent[0]["sampling_params"] == {"max_new_tokens": 8, "temperature": 0, "repetition_penalty": 1.3}
    demo.print_completions(done)
    out = capsys.readouterr().out
    assert "[demo] prompt: 'Open file and return a stream.'" in out and "[demo] completion: ' returns the value'" in out


def test_text_demo_names_the_fix_for_a_bad_model_path(tmp_path):
    with pytest.raises(SystemExit, match="has no config.json"):
        demo.main(["--model-path", str(tmp_path)])


def test_main_job_reference_part_on_the_trained_model():
    from sglang_tpla.__main__ import reference_rows
    from sglang_tpla.eval import load_docs

    docs, _ = load_docs("heldout", str(demo.TRAINED_MODEL), 1, 16, 4, 4096)
    rows = {(r["transform"], r["mode"], r["g"]): r for r in reference_rows(str(demo.TRAINED_MODEL), docs, groups=(2,))}
    assert rows[("hadamard", "mla (folded)", 1)]["mean_kl"] < 1e-8  # the fold alone is exact
    had = rows[("hadamard", "pd_sep/exact-norm", 2)]
    assert 0 < had["mean_kl"] < 1.0 and len(rows) == 10
