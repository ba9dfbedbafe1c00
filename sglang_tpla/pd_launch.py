"""Start a PD-disaggregated deployment: exact-MLA prefill node(s), TPLA decode node(s), router.

    python -m sglang_tpla.pd_launch --model-path M --prefill-tp 1 --decode-tp 2 --g 2 \\
        --transform hadamard --log-dir logs/pd [--demo] [--hold]

* Prefill nodes run stock SGLang MLA (``--disaggregation-mode prefill``); with a transform
  other than ``none`` they fold it at load (``{"tpla": {"transform": ...}}``) unless
  the checkpoint was converted offline (``python -m sglang_tpla.convert``).  The plugin must
  be installed there (it sends each decode rank its latent slice).
* Decode nodes run TPLA (``--decode-attention-backend tpla``, ``--disaggregation-mode decode``).
* ``sglang_router`` routes each request to one prefill and one decode node.

Every host, port and transfer option is a flag; start-up is health-checked node by node
(nodes start concurrently); on exit (end of ``--demo``, Ctrl-C or SIGTERM) exactly the
processes started here are stopped.  All logs go to ``--log-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .serving import ServerError, ServerProcess, default_env, free_port


@dataclass
class PDSpec:
    model_path: str
    prefill_tp: int = 1
    decode_tp: int = 2
    g: int | None = None  # latent groups on the decode node; None = decode TP
    transform: str = "hadamard"
    seed: int = 0
    calibration: str | None = None
    mu: str | None = None
    num_prefill: int = 1
    host: str = "127.0.0.1"
    router_port: int | None = None
    transfer_backend: str = "mooncake_tcp"
    ib_device: str | None = None
    page_size: int = 1
    fold_on_prefill: bool = True  # False: the checkpoint is converted, prefill needs no options
    prefill_args: list[str] = field(default_factory=list)
    decode_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)  # extra sglang_router.launch_router args (health checks, retries)
    env: dict = field(default_factory=dict)
    log_dir: str = "pd-logs"
    startup_timeout: float = 900.0

    def tpla_options(self, decode: bool) -> dict:
        opts: dict = {"transform": self.transform, "seed": self.seed}
        if self.calibration:
            opts["calibration"] = self.calibration
        if self.transform == "fit":  # one fitted rotation per g: both nodes must pick the same one
            opts["g"] = self.g or self.decode_tp
        if decode:
            if self.g is not None:
                opts["g"] = self.g
            if self.mu:
                opts["mu"] = self.mu
        return opts


def _cpu() -> bool:
    return default_env().get("SGLANG_PLATFORM") == "tpla_cpu"


class PDDeployment:
    """The processes of one PD deployment; a context manager that stops exactly them."""

    def __init__(self, spec: PDSpec):
        self.spec = spec
        self.log_dir = Path(spec.log_dir).resolve()
        self.prefills: list[ServerProcess] = []
        self.decode: ServerProcess | None = None
        self.bootstrap_ports: list[int] = []
        self.router_port = spec.router_port or free_port()
        self.router: subprocess.Popen | None = None
        self._router_log = None

    # ------------------------------------------------------------------ construction

    def _common(self) -> list[str]:
        s = self.spec
        args = ["--disaggregation-transfer-backend", s.transfer_backend, "--page-size", str(s.page_size)]
        if s.ib_device:
            args += ["--disaggregation-ib-device", s.ib_device]
        if _cpu():  # the prefill send path records CUDA events under overlap scheduling
            args += ["--disable-overlap-schedule"]
        return args

    def node_env(self) -> dict:
        """Environment of every server of this deployment (spec.env plus the loopback settings)."""
        env = {**self.spec.env}
        if self.spec.transfer_backend == "mooncake_tcp" and self.spec.host in ("127.0.0.1", "localhost"):
            env.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
            # mooncake 0.3.13.post1's acknowledged TCP framing (v2) left transfers hanging on this
            # loopback setup, stock SGLang MLA included: the receiver's socket held the request
            # unread while its transport thread sat idle, and the sender gave up after 30 s.  The
            # legacy framing does not wait for the receiver's acknowledgement; the PD tests check
            # every received row against a digest of what was sent.
            env.setdefault("MC_TCP_PROTO", "1")
        return env

    def build(self) -> "PDDeployment":
        s = self.spec
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(s.num_prefill):
            bport = free_port()
            args = ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bport), *self._common()]
            if s.fold_on_prefill and s.transform != "none":
                args += ["--json-model-override-args", json.dumps({"tpla": s.tpla_options(decode=False)})]
            self.prefills.append(
                ServerProcess(s.model_path, s.prefill_tp, [*args, *s.prefill_args], env=self.node_env(),
                              log_path=self.log_dir / f"prefill{i}.log", name=f"prefill{i}",
                              startup_timeout=s.startup_timeout, ready_path="/health")
            )
            self.bootstrap_ports.append(bport)
        dargs = [
            "--disaggregation-mode", "decode", "--decode-attention-backend", "tpla",
            "--json-model-override-args", json.dumps({"tpla": s.tpla_options(decode=True)}), *self._common(),
        ]
        self.decode = ServerProcess(s.model_path, s.decode_tp, [*dargs, *s.decode_args], env=self.node_env(),
                                    log_path=self.log_dir / "decode.log", name="decode",
                                    startup_timeout=s.startup_timeout, ready_path="/health")
        return self

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "PDDeployment":
        if self.decode is None:
            self.build()
        nodes = [*self.prefills, self.decode]
        for n in nodes:
            print(f"[pd] starting {n.name}: {' '.join(n.command[1:])}", flush=True)
            n.start()
        for n in nodes:
            n.wait_ready()
            print(f"[pd] {n.name} ready at {n.url} (log {n.log_path})", flush=True)
        cmd = [
            sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
            "--host", self.spec.host, "--port", str(self.router_port), "--policy", "round_robin",
            "--prometheus-host", self.spec.host, "--prometheus-port", str(free_port()),
        ]
        for p, b in zip(self.prefills, self.bootstrap_ports):
            cmd += ["--prefill", p.url, str(b)]
        cmd += ["--decode", self.decode.url, *self.spec.router_args]
        print(f"[pd] starting router: {' '.join(cmd[1:])}", flush=True)
        self._router_log = open(self.log_dir / "router.log", "w")
        self.router = subprocess.Popen(cmd, env=default_env(), stdout=self._router_log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(self.log_dir))
        self._wait_router()
        print(f"[pd] router ready at {self.url}", flush=True)
        return self

    def _wait_router(self, timeout: float = 600.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.router.poll() is not None:
                raise ServerError(f"router exited with code {self.router.returncode}; see {self.log_dir / 'router.log'}")
            try:
                self.post({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}}, timeout=60)
                return
            except (urllib.error.URLError, ConnectionError, OSError, KeyError):
                time.sleep(2)
        raise ServerError(f"router not serving after {timeout:.0f} s; see {self.log_dir / 'router.log'}")

    def restart_prefill(self, i: int = 0) -> ServerProcess:
        """Start prefill node ``i`` again (after it died or was killed) with the same command, port and
        bootstrap port, so that the router and the decode node reach it at the addresses they know;
        its log goes to ``prefill{i}.restart{n}.log``."""
        old = self.prefills[i]
        old.stop()  # whatever is left of its process group
        n = len(list(self.log_dir.glob(f"prefill{i}.restart*.log"))) + 1
        new = ServerProcess(old.model_path, old.tp, old.args, env=old.env, log_path=self.log_dir / f"prefill{i}.restart{n}.log",
                            port=old.port, name=f"prefill{i}", startup_timeout=old.startup_timeout, ready_path=old.ready_path)
        self.prefills[i] = new
        new.start()
        return new.wait_ready()

    def stop(self) -> None:
        if self.router is not None and self.router.poll() is None:
            try:
                os.killpg(self.router.pid, signal.SIGTERM)
                self.router.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.router.pid, signal.SIGKILL)
                self.router.wait()
        if self._router_log:
            self._router_log.close()
            self._router_log = None
        for n in [self.decode, *self.prefills]:
            if n is not None:
                n.stop()

    def __enter__(self) -> "PDDeployment":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.router_port}"

    def post(self, body: dict, timeout: float = 600.0) -> dict:
        req = urllib.request.Request(self.url + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def generate(self, input_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float], dict]:
        out = self.post({
            "input_ids": list(input_ids),
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
            "return_logprob": True,
        })
        lp = out["meta_info"]["output_token_logprobs"]
        return [int(t[1]) for t in lp], [float(t[0]) for t in lp], out["meta_info"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_tpla.pd_launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", help="HF checkpoint dir; default: build the tiny DeepSeek model in --log-dir")
    p.add_argument("--prefill-tp", type=int, default=1)
    p.add_argument("--decode-tp", type=int, default=2)
    p.add_argument("--g", type=int, default=None, help="latent groups on the decode node (default: decode TP)")
    p.add_argument("--transform", default="hadamard", choices=["none", "hadamard", "pca", "fit"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration", help="transform file for --transform pca or fit (same file on both nodes)")
    p.add_argument("--mu", choices=["one", "inv_p", "lsq"])
    p.add_argument("--converted", action="store_true",
                   help="the checkpoint was converted by sglang_tpla.convert: prefill nodes get no TPLA options")
    p.add_argument("--num-prefill", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1", help="address the router binds (nodes bind 127.0.0.1 here)")
    p.add_argument("--router-port", type=int)
    p.add_argument("--transfer-backend", default="mooncake_tcp", choices=["mooncake", "mooncake_tcp"])
    p.add_argument("--ib-device", help="--disaggregation-ib-device for RDMA mooncake")
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--prefill-args", default="", help="extra sglang.launch_server args for prefill nodes (one string)")
    p.add_argument("--decode-args", default="", help="extra sglang.launch_server args for the decode node (one string)")
    p.add_argument("--log-dir", default="pd-logs")
    p.add_argument("--demo", action="store_true", help="send a few requests through the router, print them, stop")
    p.add_argument("--hold", action="store_true", help="keep serving until Ctrl-C / SIGTERM")
    return p


def main(argv: list[str] | None = None) -> int:
    import shlex

    a = _parser().parse_args(argv)
    log_dir = Path(a.log_dir)
    model = a.model_path
    if model is None:
        from .tiny_model import build_tiny_model_dir

        model = str(build_tiny_model_dir(log_dir / "tiny-model"))
        print(f"[pd] no --model-path: built the tiny DeepSeek model at {model}", flush=True)
    spec = PDSpec(
        model_path=model, prefill_tp=a.prefill_tp, decode_tp=a.decode_tp, g=a.g, transform=a.transform, seed=a.seed,
        calibration=a.calibration, mu=a.mu, num_prefill=a.num_prefill, host=a.host, router_port=a.router_port,
        transfer_backend=a.transfer_backend, ib_device=a.ib_device, page_size=a.page_size,
        fold_on_prefill=not a.converted, prefill_args=shlex.split(a.prefill_args), decode_args=shlex.split(a.decode_args),
        log_dir=str(log_dir),
    )
    dep = PDDeployment(spec)
    def _interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIGINT inherited as ignored)
    try:
        dep.start()
        if a.demo:
            for prompt in ([5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24]):
                toks, lps, meta = dep.generate(prompt, 8)
                print(f"[pd] prompt {prompt} -> {toks} (logprobs {[round(x, 3) for x in lps]})", flush=True)
        if a.hold:
            print(f"[pd] serving at {dep.url}; Ctrl-C stops every process started here", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("[pd] stopping", flush=True)
    finally:
        dep.stop()
        print(f"[pd] stopped; logs in {dep.log_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
