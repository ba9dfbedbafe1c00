"""``sglang serve`` (SGLang 0.5.23's recommended entry point) with ``--decode-attention-backend tpla``.

``sglang serve`` loads the plugins (``sglang.srt.plugins``) before it builds the server, like
``python -m sglang.launch_server``, so TPLA needs nothing of its own there.  One real server on the
CPU platform at TP=2, g=2 (Hadamard): served log-probs match the fp32 pd-sep reference.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from sglang_tpla.serving import ServerProcess

from serving_utils import BUDGET, FP32, reference, served_vs_reference, tiny_model, tpla_mode

pytestmark = pytest.mark.slow


def sglang_cli() -> str:
    exe = Path(sys.executable).parent / "sglang"  # the console script of the environment that runs the tests
    return str(exe) if exe.exists() else shutil.which("sglang")


class SglangServe(ServerProcess):
    """A :class:`ServerProcess` started as ``sglang serve`` instead of ``python -m sglang.launch_server``."""

    @property
    def command(self) -> list[str]:
        return [sglang_cli(), "serve", "--model-path", self.model_path, "--tp", str(self.tp),
                "--host", "127.0.0.1", "--port", str(self.port), *self.args]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    assert sglang_cli(), "the sglang console script is not installed"
    args = FP32 + ["--decode-attention-backend", "tpla",
                   "--json-model-override-args", json.dumps({"tpla": {"g": 2, "transform": "hadamard", "seed": 0}})]
    srv = SglangServe(model_dir, tp=2, env=BUDGET, args=args, log_path=tmp_path_factory.mktemp("logs") / "serve.log",
                      name="sglang-serve-tpla")
    with srv:
        yield srv


def test_sglang_serve_runs_tpla_through_the_plugin(server, model_dir):
    assert server.command[1] == "serve"
    log = server.log_text()
    assert "TPLA on: attn TP 2, g=2" in log, server.log_tail()
    ref = reference(model_dir, "hadamard")
    rows = served_vs_reference(server, ref, tpla_mode("pd_sep", 2, ref))
    for cached, equal, diff in rows:
        assert equal and diff < 1e-4, rows
