"""Shared helpers of the PD disaggregation tests (no tests here)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request

from serving_utils import BUDGET, FP32, NEW_TOKENS, PROMPTS

from sglang_tpla.pd_launch import PDDeployment, PDSpec


# The router's health checks, for the fault tests: a killed node refuses connections, so two failed
# probes 3 s apart mark it unhealthy within ~6 s (defaults: every 60 s, 3 failures: up to 3 min).
# SGLang's /health waits up to 20 s for its scheduler (it runs a 1-token generation when idle), so
# the probe timeout stays above that: a node that is only busy is never marked unhealthy.
FAST_HEALTH = ["--health-check-interval-secs", "3", "--health-failure-threshold", "2", "--health-check-timeout-secs", "30"]

# A prefill node waits this long (default 300 s) for the decode node of a request to fetch its KV: a
# request the router sends while its decode node is dead (before the router marks it unhealthy) waits
# that long for its error.
FAULT_ENV = {"SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "30"}


def deploy(model, tmp_path_factory, prefill_tp: int, name: str, page_size: int = 1, router_args=(), env=None):
    """A PD deployment (prefill TP ``prefill_tp`` -> decode TP=2, g=2, Hadamard); ``page_size`` on both
    nodes (GPU deployments use 16-64: the transfer moves whole pages of sliced rows)."""
    log_dir = tmp_path_factory.mktemp(name)
    spec = PDSpec(
        model_path=str(model), prefill_tp=prefill_tp, decode_tp=2, g=2, transform="hadamard", page_size=page_size,
        prefill_args=list(FP32), decode_args=list(FP32),
        env={**BUDGET, "SGLANG_TPLA_PD_DIGEST_DIR": str(log_dir / "digests"), **(env or {})}, log_dir=str(log_dir),
        router_args=list(router_args),
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


# ---------------------------------------------------------------------- fault tests


def loads(url: str) -> dict:
    """A node's ``/v1/loads`` (``num_used_tokens``: KV slots held by requests)."""
    with urllib.request.urlopen(url + "/v1/loads", timeout=30) as r:
        return json.loads(r.read())["loads"][0]


def wait_used_tokens(url: str, want: int, timeout: float) -> float:
    """Seconds until the node's used tokens equal ``want``; fails after ``timeout`` s."""
    t0 = time.time()
    while True:
        got = loads(url)
        if got["num_used_tokens"] == want:
            return time.time() - t0
        if time.time() - t0 > timeout:
            raise AssertionError(f"used tokens {got['num_used_tokens']} != {want} after {timeout:.0f} s: {got}")
        time.sleep(0.5)


def get_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def open_stream(dep, input_ids, max_new_tokens: int, chunks: int, timeout: float = 120):
    """A streaming greedy request through the router; returns (connection, response, the first
    ``chunks`` parsed chunks).  Each chunk holds the output ids so far."""
    conn = http.client.HTTPConnection(dep.spec.host, dep.router_port, timeout=timeout)
    body = {"input_ids": list(input_ids), "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, (resp.status, resp.read()[:500])
    got = []
    while len(got) < chunks:
        line = resp.readline()
        assert line, f"stream ended after {len(got)} chunks"
        if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
            got.append(json.loads(line[5:]))
    return conn, resp, got


def close_stream(conn, resp) -> None:
    """Drop a streaming connection as a client that goes away does (the socket, not a graceful read)."""
    try:
        if conn.sock is not None:
            conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    resp.close()
    conn.close()


def request_outcome(dep, input_ids, max_new_tokens: int, timeout: float) -> dict:
    """Send one greedy request through the router and say how it ended (never raises)."""
    t0 = time.time()
    body = {"input_ids": list(input_ids), "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    try:
        out = dep.post(body, timeout=timeout)
        return {"ok": True, "ids": out.get("output_ids"), "s": time.time() - t0}
    except urllib.error.HTTPError as e:
        return {"ok": False, "http": e.code, "body": e.read().decode(errors="replace")[:300], "s": time.time() - t0}
    except (urllib.error.URLError, ConnectionError, OSError, http.client.HTTPException) as e:
        return {"ok": False, "error": repr(e), "s": time.time() - t0}


def kill_group(server) -> None:
    """SIGKILL a server's whole process group (launcher, schedulers, detokenizer): a crashed node."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)


def group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group, as 'pid command'."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[2]) == pgid and rest[0] != "Z":
            out.append(f"{d} {name}")
    return out


def groups_left(pgids: dict, timeout: float = 30) -> dict:
    """The process groups (name -> pgid) that still have a live process after ``timeout`` s (a killed
    process takes a moment to exit)."""
    deadline = time.time() + timeout
    while True:
        left = {name: group_members(pgid) for name, pgid in pgids.items()}
        left = {k: v for k, v in left.items() if v}
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)
