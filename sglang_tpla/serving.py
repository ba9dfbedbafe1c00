"""Start, query and stop real ``sglang.launch_server`` processes (tests, main job, benchmarks).

A :class:`ServerProcess` runs SGLang's own launcher in its own process group on a free
loopback port, logs to a file, waits until the server answers a generate request, and on
exit terminates exactly the processes it started.  Without CUDA it selects the project's
CPU platform (``SGLANG_PLATFORM=tpla_cpu``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_env() -> dict:
    env = dict(os.environ)
    # The servers import the same sglang_tpla checkout as this process, whatever checkout the
    # environment's editable install points at.
    import sglang_tpla

    here = str(Path(sglang_tpla.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("SGLANG_HOST_IP", "127.0.0.1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        cuda = False
    if not cuda:
        env.setdefault("SGLANG_PLATFORM", "tpla_cpu")
    return env


class ServerProcess:
    def __init__(
        self,
        model_path: str | Path,
        tp: int = 1,
        args: list[str] | tuple[str, ...] = (),
        env: dict | None = None,
        log_path: str | Path | None = None,
        port: int | None = None,
        name: str = "sglang",
        startup_timeout: float = 600.0,
        ready_path: str = "/health_generate",
    ):
        self.model_path = str(model_path)
        self.tp = tp
        self.args = list(args)
        self.env = {**default_env(), **(env or {})}
        self.port = port or free_port()
        self._auto_port = port is None  # a port this class chose may be retaken before the server binds it
        self.name = name
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/{name}-{self.port}.log")
        self.startup_timeout = startup_timeout
        self.ready_path = ready_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path, "--tp", str(self.tp),
            "--host", "127.0.0.1", "--port", str(self.port), *self.args,
        ]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=str(self.log_path.parent),  # never the repository root
        )
        return self

    def _lost_its_port(self) -> bool:
        """The HTTP port this class chose was taken between choosing and binding (SGLang's launcher then
        keeps running without a listener)."""
        return self._auto_port and f"{self.port}): address already in use" in self.log_text()

    def wait_ready(self, port_retries: int = 2) -> "ServerProcess":
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if port_retries and self._lost_its_port():
                port_retries -= 1
                self.stop()
                self.port = free_port()
                self.start()
                deadline = time.time() + self.startup_timeout
                continue
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=30) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(2)
        self.stop()
        raise ServerError(f"{self.name} not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def wait_exit(self, timeout: float = 600.0) -> int:
        """For launches that must fail: wait for the process to exit and return its code."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:  # the launcher's children (schedulers, detokenizer) share its process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def post(self, path: str, body: dict, timeout: float = 600.0) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def get(self, path: str, timeout: float = 60.0) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def generate(self, input_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float], dict]:
        """Greedy generation; returns (tokens, their logprobs, meta_info)."""
        out = self.post(
            "/generate",
            {
                "input_ids": list(input_ids),
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
                "return_logprob": True,
            },
        )
        lp = out["meta_info"]["output_token_logprobs"]
        return [int(t[1]) for t in lp], [float(t[0]) for t in lp], out["meta_info"]

    def max_total_num_tokens(self) -> int:
        """What SGLang itself reported for the KV pool (its startup log line)."""
        found = re.findall(r"max_total_num_tokens=(\d+)", self.log_text())
        if not found:
            raise ServerError(f"{self.name}: no max_total_num_tokens in the log")
        return int(found[-1])
