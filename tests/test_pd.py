"""PD disaggregation on CPU, for real: exact-MLA prefill node(s) -> TPLA decode node over mooncake (TCP).

One module-scoped set of processes per deployment (slow):

* the fp32 reference in pd-sep mode (TPLA g=2, Hadamard) gives the expected tokens and logprobs;
* prefill TP=1 -> decode TP=2 through sglang_router (16-token pages), plus a second prefill node in another
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
from serving_utils import FP32, NEW_TOKENS, PROMPTS, reference, tiny_model, tpla_mode

from pd_utils import assert_same, check_digests, deploy, digests, served

from sglang_tpla.serving import ServerProcess, free_port

pytestmark = pytest.mark.slow

TPLA = json.dumps({"tpla": {"g": 2, "transform": "hadamard", "seed": 0}})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory, seed=3)


@pytest.fixture(scope="module")
def ref(model):
    return reference(model, "hadamard")


@pytest.fixture(scope="module")
def expected(ref):
    """Greedy tokens/logprobs of the fp32 reference in pd-sep mode (exact prefill, TPLA g=2 decode):
    the oracle every single TPLA server is itself tested against (test_serving_tp2.py)."""
    return [ref.generate(p, NEW_TOKENS, tpla_mode("pd_sep", 2, ref)) for p in PROMPTS]


@pytest.fixture(scope="module")
def deployment_a(model, tmp_path_factory):
    dep = deploy(model, tmp_path_factory, 1, "pd-a", page_size=16)  # pages of 16 tokens, the single server's are 1
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


def test_load_through_router_no_failures_no_leaked_slots(deployment_a, ref):
    """200 requests, prompts of 16 to 2048 tokens (log-uniform) and 1 to 16 new tokens, at concurrency 16
    through the router: zero failures, the decode node's used tokens back to idle, and a random sample of
    the outputs equal to the fp32 pd-sep reference (all 200 would cost minutes of reference compute)."""
    dep, _ = deployment_a
    idle = _loads(dep.decode.url)["num_used_tokens"]
    rng = random.Random(0)
    reqs = [([rng.randrange(3, 500) for _ in range(int(16 * 128 ** rng.random()))], rng.randrange(1, 17)) for _ in range(200)]
    failures = []

    def one(req):
        try:
            return dep.generate(*req)[:2]
        except Exception as e:  # noqa: BLE001
            failures.append(repr(e))
            return None

    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, reqs))
    print(f"load: {len(reqs)} requests, prompt tokens {sum(len(p) for p, _ in reqs)} (max {max(len(p) for p, _ in reqs)}), "
          f"failures {len(failures)}")
    assert not failures, failures[:3]
    assert all(len(toks) == n for (toks, _), (_, n) in zip(outs, reqs))
    assert _loads(dep.decode.url)["num_used_tokens"] == idle
    mode = tpla_mode("pd_sep", 2, ref)
    for i in rng.sample(range(len(reqs)), 6):
        (prompt, n), (toks, lps) = reqs[i], outs[i]
        want_toks, want_lps = ref.generate(prompt, n, mode)
        assert toks == want_toks, (i, len(prompt))
        assert max(abs(a - b) for a, b in zip(lps, want_lps)) < 1e-4, (i, len(prompt))


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
