"""PD disaggregation on CPU, for real: exact-MLA prefill node(s) -> TPLA decode node over mooncake (TCP).

One module-scoped set of processes per deployment (slow):

* the fp32 reference in pd-sep mode (TPLA g=2, Hadamard) gives the expected tokens and logprobs;
* prefill TP=1 -> decode TP=2 through sglang_router (16-token pages), plus a second prefill node in another
  latent basis (identity) that the decode node must refuse.

The fault tests run last, on the same deployment (a client disconnecting mid-decode, the prefill node
killed and started again, then the decode node killed: the very last test); the module's teardown then
checks that no process of the deployment is left.

Prefill TP=2 -> decode TP=2 is in test_pd_tp2.py (its own module, so that the two
deployments never run at the same time).

Every decode rank's received rows are compared with what the prefill rank sent through
digests of the sliced bytes (``SGLANG_TPLA_PD_DIGEST_DIR``), keyed by decode rank and pages.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_utils import FP32, NEW_TOKENS, PROMPTS, reference, tiny_model, tpla_mode

from pd_utils import (
    FAST_HEALTH, FAULT_ENV, assert_same, check_digests, close_stream, deploy, digests, get_json, groups_left, kill_group, loads, open_stream,
    request_outcome, served, wait_used_tokens,
)

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
    # pages of 16 tokens (the single server's are 1); fast router health checks for the fault tests
    dep = deploy(model, tmp_path_factory, 1, "pd-a", page_size=16, router_args=FAST_HEALTH, env=FAULT_ENV)
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
    groups = {}  # the process group of every server started for this module
    try:
        with dep:
            stranger.wait_ready()
            groups.update({"router": dep.router.pid, "decode": dep.decode.proc.pid, "prefill0": dep.prefills[0].proc.pid,
                           "prefill-identity": stranger.proc.pid})
            yield dep, stranger
    finally:
        stranger.stop()
    groups["prefill0 (restarted)"] = dep.prefills[0].proc.pid  # the fault tests start it again
    left = groups_left(groups)
    assert not left, f"processes left behind after teardown: {left}"


def test_prefill_tp1_to_decode_tp2(deployment_a, expected):
    dep, _ = deployment_a
    assert_same(served(dep), expected)
    check_digests(dep, len(PROMPTS))


def test_load_through_router_no_failures_no_leaked_slots(deployment_a, ref):
    """200 requests, prompts of 16 to 2048 tokens (log-uniform) and 1 to 16 new tokens, at concurrency 16
    through the router: zero failures, the decode node's used tokens back to idle, and a random sample of
    the outputs equal to the fp32 pd-sep reference (all 200 would cost minutes of reference compute)."""
    dep, _ = deployment_a
    idle = _idle_tokens(dep.decode.url)
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
    wait_used_tokens(dep.decode.url, idle, timeout=30)
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
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # the stranger stopped meanwhile
            results[name] = {"error": repr(e)}

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


# ---------------------------------------------------------------------- faults (destructive ones last)


def _idle_tokens(url: str) -> int:
    """The decode node's used tokens with nothing in flight: the least of a few reads (the router's
    health probe briefly runs a 1-token request on an idle node)."""
    reads = []
    for _ in range(3):
        reads.append(loads(url)["num_used_tokens"])
        time.sleep(0.3)
    return min(reads)


def _worker(dep, kind: str) -> dict:
    workers = [w for w in get_json(dep.url + "/workers")["workers"] if w["worker_type"] == kind]
    assert len(workers) == 1, workers
    return workers[0]


def _wait_worker_health(dep, kind: str, healthy: bool, timeout: float) -> float:
    t0 = time.time()
    while _worker(dep, kind)["is_healthy"] != healthy:
        assert time.time() - t0 < timeout, f"router: {kind} worker not is_healthy={healthy} after {timeout:.0f} s: {_worker(dep, kind)}"
        time.sleep(0.5)
    return time.time() - t0


def test_client_disconnect_mid_decode_frees_its_kv(deployment_a, expected):
    """A streaming client closes its connection to the router mid-decode.

    Lost: that request only (the tokens it had not read). Not lost: its KV on the decode node (the
    router drops its stream from the decode node and SGLang aborts the request: the decode node's used
    tokens are back to idle within 30 s, where the request, left running, would decode 3000 tokens, over
    a minute here), and a request served by the router while the stream was decoding (equal to the fp32
    reference)."""
    dep, _ = deployment_a
    idle = _idle_tokens(dep.decode.url)
    conn, resp, chunks = open_stream(dep, [9, 8, 7, 6, 5], 3000, chunks=5)
    try:
        assert loads(dep.decode.url)["num_used_tokens"] > idle
        assert_same([dep.generate(PROMPTS[0], NEW_TOKENS)[:2]], expected[:1])  # batched with the stream
        assert loads(dep.decode.url)["num_running_reqs"] >= 1  # the stream is still decoding
        rid = chunks[-1]["meta_info"]["id"]
    finally:
        close_stream(conn, resp)
    freed = wait_used_tokens(dep.decode.url, idle, timeout=30)
    print(f"client disconnect: decode KV back to idle {freed:.1f} s after the client closed (request {rid})")


def test_prefill_node_killed_mid_run_then_restarted(deployment_a, expected):
    """The prefill node is killed (SIGKILL to its process group) with 4 requests in flight (2000-token
    prompts), then started again on the same HTTP and bootstrap ports.

    Lost: the in-flight requests whose prefill response had not reached the router: the router answers
    each with an HTTP error (503 once its retries find no healthy prefill node) within 60 s of the kill
    (at least one is lost: the kill is sent while the prefill node holds them; in a trial run a request
    already decoding on the decode node was lost too: the router needs the prefill response). Not lost: the decode node (still answering, and its used
    tokens back to idle within 90 s of the kill: SGLang's decode-side heartbeat declares the prefill node
    lost after 2 missed probes 5 s apart and fails its transfers, whose KV is released after the 30 s
    deferred-release timeout, no drain ack coming from a dead node); the router (still running; its
    /workers marks the prefill node unhealthy); service: once the prefill node is back, requests through
    the router succeed within 90 s (the router's health checks mark it healthy again) and equal the
    fp32 reference; an in-flight request that did complete equals the same request served afterwards."""
    dep, stranger = deployment_a
    # The refusal test is done with it; the restart below is a server start, and idle SGLang schedulers
    # poll in a loop (the decode node's two take most of the machine's 2 cores meanwhile).
    stranger.stop()
    old = dep.prefills[0]
    try:
        idle = _idle_tokens(dep.decode.url)
        rng = random.Random(1)
        prompts = [[rng.randrange(3, 500) for _ in range(2000)] for _ in range(4)]
        outcomes: list = [None] * len(prompts)

        def run(i):
            o = request_outcome(dep, prompts[i], 4, timeout=120)
            outcomes[i] = {**o, "end": time.time()}

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(prompts))]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while True:  # kill once the prefill node holds the requests (or the decode node has reserved their KV)
            p = loads(old.url)
            d = p.get("disaggregation") or {}
            held = p["num_running_reqs"] + p["num_waiting_reqs"] + d.get("prefill_bootstrap_queue_reqs", 0) + d.get("prefill_inflight_queue_reqs", 0)
            if held or loads(dep.decode.url)["num_used_tokens"] > idle:
                break
            assert time.time() < deadline and not any(outcomes), (p, outcomes)
            time.sleep(0.05)
        kill_group(old)
        t_kill = time.time()
        print(f"prefill kill: prefill node held {held} requests ({p})")
        for t in threads:
            t.join(max(0.0, t_kill + 90 - time.time()))
        print("prefill kill: outcomes", [{k: v for k, v in o.items() if k != "ids"} if o else None for o in outcomes])
        assert all(o is not None for o in outcomes), "a request still hangs 90 s after the kill"
        assert all(o["end"] - t_kill < 60 for o in outcomes), outcomes
        failed = [o for o in outcomes if not o["ok"]]
        assert failed, "no request was in flight when the prefill node was killed"
        assert all(o.get("http", 0) >= 500 for o in failed), failed

        # The decode node notices (its heartbeat), before the prefill node can come back.
        deadline = t_kill + 60
        while "Lost connection with prefill instance" not in dep.decode.log_text():
            assert time.time() < deadline, "the decode node did not notice the lost prefill node in 60 s"
            time.sleep(0.5)
        restarted: dict = {}

        def restart():
            t0 = time.time()
            try:
                dep.restart_prefill(0)
            except BaseException as e:  # noqa: BLE001
                restarted["error"] = e
            restarted["s"] = time.time() - t0

        restarter = threading.Thread(target=restart, daemon=True)
        restarter.start()  # a server start: overlap it with the decode node's KV release
        assert get_json(dep.decode.url + "/get_server_info")  # the decode node answers
        assert dep.router.poll() is None
        assert _worker(dep, "prefill")["is_healthy"] is False
        freed = wait_used_tokens(dep.decode.url, idle, timeout=max(1.0, t_kill + 90 - time.time()))
        print(f"prefill kill: decode KV back to idle {time.time() - t_kill:.1f} s after the kill (waited {freed:.1f} s)")
        restarter.join()
        assert "error" not in restarted, restarted.get("error")
        print(f"prefill kill: prefill node restarted in {restarted['s']:.1f} s")

        t0, refused = time.time(), []
        while True:  # the router takes the node back after its health checks
            o = request_outcome(dep, PROMPTS[0], NEW_TOKENS, timeout=60)
            if o["ok"]:
                break
            refused.append(o)
            assert time.time() - t0 < 90, refused[-3:]
            time.sleep(1)
        print(f"prefill kill: router serving again {time.time() - t0:.1f} s after the restart ({len(refused)} refused)")
        assert_same(served(dep), expected)
        for prompt, o in zip(prompts, outcomes):
            if o["ok"]:
                assert o["ids"] == request_outcome(dep, prompt, 4, timeout=120)["ids"]
    finally:
        if dep.prefills[0] is old and old.proc.poll() is not None:  # killed but not restarted: the next tests need it
            dep.restart_prefill(0)


def test_decode_node_killed_last(deployment_a):
    """The decode node is killed (SIGKILL to its process group) with a streaming and a plain request
    decoding. The module's last test: no decode node is left.

    Lost: both requests: each client gets an error, not a hang: the stream breaks (no final ``[DONE]``)
    within 30 s; the plain request ends with an HTTP 5xx or a dropped connection within 60 s (if the
    router retries it, the retry's prefill node waits for the dead decode node for at most
    SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT, 30 s here: FAULT_ENV). Not lost: the router (still running;
    its /workers marks the decode node unhealthy within 30 s, from its health checks (FAST_HEALTH), and
    it then refuses a new request within 30 s), the prefill node (still answering), and the teardown:
    the fixture checks that no process group of the deployment is left."""
    dep, _ = deployment_a
    conn, resp, _ = open_stream(dep, [9, 8, 7, 6, 5], 3000, chunks=3)
    plain: dict = {}
    streaming = loads(dep.decode.url)["num_used_tokens"]
    th = threading.Thread(target=lambda: plain.update(request_outcome(dep, [3 + i % 497 for i in range(1000)], 3000, timeout=90), end=time.time()),
                          daemon=True)
    th.start()
    deadline = time.time() + 60
    while True:  # both decoding: the plain one's 1000 prompt tokens held, nothing waiting for KV
        d = loads(dep.decode.url)
        q = d.get("disaggregation") or {}
        if (d["num_running_reqs"] >= 2 and d["num_used_tokens"] >= streaming + 1000
                and not q.get("decode_prealloc_queue_reqs") and not q.get("decode_transfer_queue_reqs")):
            break
        assert time.time() < deadline and not plain, (plain, d)
        time.sleep(0.1)
    kill_group(dep.decode)
    t_kill = time.time()
    ended = None
    try:
        while True:
            line = resp.readline()
            if not line or line.strip() == b"data: [DONE]":
                ended = line
                break
    except (http.client.HTTPException, OSError) as e:
        ended = e
    stream_s = time.time() - t_kill
    close_stream(conn, resp)
    print(f"decode kill: stream ended with {ended!r} after {stream_s:.1f} s")
    assert ended != b"data: [DONE]\n" and stream_s < 30

    assert dep.router.poll() is None
    _wait_worker_health(dep, "decode", False, timeout=max(1.0, t_kill + 30 - time.time()))
    print(f"decode kill: router marks the decode node unhealthy {time.time() - t_kill:.1f} s after the kill")
    th.join(max(0.0, t_kill + 60 - time.time()))
    print(f"decode kill: plain request {plain}")
    assert plain and not plain["ok"] and plain["end"] - t_kill < 60, plain
    after = request_outcome(dep, PROMPTS[0], 4, timeout=30)
    print(f"decode kill: a new request: {after}")
    assert not after["ok"] and after["s"] < 30, after
    assert dep.router.poll() is None
    assert get_json(dep.prefills[0].url + "/get_server_info")
