"""Shared helpers of the PD disaggregation tests (no tests here)."""

from __future__ import annotations

import json

from serving_utils import BUDGET, FP32, NEW_TOKENS, PROMPTS

from sglang_tpla.pd_launch import PDDeployment, PDSpec


def deploy(model, tmp_path_factory, prefill_tp: int, name: str, page_size: int = 1):
    """A PD deployment (prefill TP ``prefill_tp`` -> decode TP=2, g=2, Hadamard); ``page_size`` on both
    nodes (GPU deployments use 16-64: the transfer moves whole pages of sliced rows)."""
    log_dir = tmp_path_factory.mktemp(name)
    spec = PDSpec(
        model_path=str(model), prefill_tp=prefill_tp, decode_tp=2, g=2, transform="hadamard", page_size=page_size,
        prefill_args=list(FP32), decode_args=list(FP32),
        env={**BUDGET, "SGLANG_TPLA_PD_DIGEST_DIR": str(log_dir / "digests")}, log_dir=str(log_dir),
    )
    return PDDeployment(spec)


def digests(dep) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for f in sorted((dep.log_dir / "digests").glob("*.jsonl")) for line in f.read_text().splitlines()]
    return [r for r in recs if r["side"] == "prefill"], [r for r in recs if r["side"] == "decode" and r["room"]]


def sent_digest(sent: list[dict], rec: dict) -> str | None:
    """XOR of the latest prefill chunks (before ``rec``) to the same decode rank that cover its pages."""
    latest: dict[int, dict] = {}
    for r in sorted(sent, key=lambda r: r["time"]):
        if r["rank"] == rec["rank"] and r["time"] <= rec["time"] and set(r["pages"]) <= set(rec["pages"]):
            for p in r["pages"]:
                latest[p] = r
    if set(latest) != set(rec["pages"]):
        return None
    acc = 0
    for r in {id(r): r for r in latest.values()}.values():
        if not set(r["pages"]) <= set(latest) or any(latest[p] is not r for p in r["pages"]):
            return None
        acc ^= int(r["digest"], 16)
    return f"{acc:016x}"


def check_digests(dep, n_requests: int) -> None:
    sent, received = digests(dep)
    assert len(received) >= 2 * n_requests, received  # both decode ranks of every request (+ the router probe)
    assert {r["rank"] for r in received} == {0, 1}
    for r in received:
        assert sent_digest(sent, r) == r["digest"], f"decode rank {r['rank']} rows differ from what was sent: {r}"
    # the two decode ranks hold different latent slices of the same tokens
    by_room: dict = {}
    for r in received:
        by_room.setdefault(r["room"], {})[r["rank"]] = r
    for pair in by_room.values():
        assert pair[0]["pages"] == pair[1]["pages"] and pair[0]["digest"] != pair[1]["digest"]


def served(dep):
    return [dep.generate(p, NEW_TOKENS)[:2] for p in PROMPTS]


def assert_same(got, want):
    for (toks, lps), (w_toks, w_lps) in zip(got, want):
        assert toks == w_toks
        assert max(abs(a - b) for a, b in zip(lps, w_lps)) < 1e-5
