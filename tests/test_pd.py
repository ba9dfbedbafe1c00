"""PD disaggregation on CPU, for real: exact-MLA prefill node(s) -> TPLA decode node over mooncake (TCP).

One module-scoped set of processes per deployment (slow):

* a single TPLA server (TP=2, g=2, Hadamard) gives the expected tokens and logprobs;
* prefill TP=1 -> decode TP=2 through sglang_router, plus a second prefill node in another
  latent basis (identity) that the decode node must refuse.

Prefill TP=2 -> decode TP=2 is in test_pd_tp2.py (its own module, so that the two
deployments never run at the same time).

Every decode rank's received rows are compared with what the prefill rank sent through
digests of the sliced bytes (``SGLANG_TPLA_PD_DIGEST_DIR``), keyed by decode rank and pages.
"""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_utils import BUDGET, FP32, NEW_TOKENS, PROMPTS, tiny_model

from pd_utils import assert_same, check_digests, deploy, digests, served

from sglang_tpla.serving import ServerProcess, free_port

pytestmark = pytest.mark.slow

TPLA = json.dumps({"tpla": {"g": 2, "transform": "hadamard", "seed": 0}})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory, seed=3)


@pytest.fixture(scope="module")
def expected(model, tmp_path_factory):
    """Greedy tokens/logprobs of one ordinary TPLA server (exact prefill, TPLA decode)."""
    log = tmp_path_factory.mktemp("single") / "server.log"
    args = [*FP32, "--decode-attention-backend", "tpla", "--json-model-override-args", TPLA]
    with ServerProcess(model, tp=2, args=args, env=BUDGET, log_path=log, name="tpla-single") as srv:
        return [srv.generate(p, NEW_TOKENS)[:2] for p in PROMPTS]


@pytest.fixture(scope="module")
def deployment_a(model, tmp_path_factory, expected):
    dep = deploy(model, tmp_path_factory, 1, "pd-a")
    dep.build()
    # A prefill node in another basis (unrotated checkpoint), not behind the router.
    bport = free_port()
    stranger = ServerProcess(
        model, tp=1, name="prefill-identity", env=dep.node_env(),
        args=[*FP32, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bport), *dep._common()],
        log_path=dep.log_dir / "prefill-identity.log", ready_path="/health",
    )
    stranger.bootstrap_port = bport
    stranger.start()
    try:
        with dep:
            stranger.wait_ready()
            yield dep, stranger
    finally:
        stranger.stop()


def test_prefill_tp1_to_decode_tp2(deployment_a, expected):
    dep, _ = deployment_a
    assert_same(served(dep), expected)
    check_digests(dep, len(PROMPTS))


def _loads(url: str) -> dict:
    with urllib.request.urlopen(url + "/v1/loads", timeout=30) as r:
        return json.loads(r.read())["loads"][0]


def test_burst_through_router_no_failures_no_leaked_slots(deployment_a):
    dep, _ = deployment_a
    idle = _loads(dep.decode.url)["num_used_tokens"]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 40))] for _ in range(50)]
    failures = []

    def one(p):
        try:
            toks, _, _ = dep.generate(p, rng.randrange(1, 12))
            return len(toks)
        except Exception as e:  # noqa: BLE001
            failures.append(repr(e))
            return 0

    with ThreadPoolExecutor(8) as pool:
        lengths = list(pool.map(one, prompts))
    assert not failures, failures[:3]
    assert all(n > 0 for n in lengths)
    assert _loads(dep.decode.url)["num_used_tokens"] == idle


def test_mismatched_basis_is_refused_before_any_transfer(deployment_a):
    dep, stranger = deployment_a
    room = random.randrange(1 << 62)
    body = {
        "input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "bootstrap_host": "127.0.0.1", "bootstrap_port": stranger.bootstrap_port, "bootstrap_room": room,
    }
    results: dict = {}
    sent_before = len(digests(dep)[0])

    def send(name, url):
        req = urllib.request.Request(url + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                results[name] = json.loads(r.read())
        except urllib.error.HTTPError as e:
            results[name] = {"http_error": e.code, "body": e.read().decode(errors="replace")}

    # The prefill side of a refused request waits for its bootstrap timeout: do not wait for it.
    threads = [threading.Thread(target=send, args=(n, u), daemon=True) for n, u in (("prefill", stranger.url), ("decode", dep.decode.url))]
    for t in threads:
        t.start()
    threads[1].join(300)
    text = json.dumps(results.get("decode"))
    assert "latent basis mismatch" in text and "identity" in text and "hadamard:seed=0" in text, text
    assert "latent basis mismatch" in dep.decode.log_text()
    assert len(digests(dep)[0]) == sent_before  # nothing was sent to the decode node
    # the decode node keeps serving its own prefill node
    assert dep.generate(PROMPTS[1], 2)[0]
