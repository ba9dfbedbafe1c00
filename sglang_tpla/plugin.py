"""SGLang plugin entry point (group ``sglang.srt.plugins``): installs every hook of this package.

SGLang calls :func:`register` in every process it starts (the launching process before it
resolves the server arguments, each scheduler / TP worker, detokenizer) before the model, KV
pool and attention backends are built, then applies the ``HookRegistry`` hooks.  Each hook
module in ``patches/`` registers only what its SGLang area needs and documents the exact
target it patches.
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

# One module per SGLang area; each exposes install().
HOOK_MODULES = (
    "sglang_tpla.patches.server_args",  # refusals at argument resolution, in the launching process
    "sglang_tpla.patches.cpu_platform",
    "sglang_tpla.patches.attention_backend",
    "sglang_tpla.patches.kv_pool",
    "sglang_tpla.patches.weights",
    "sglang_tpla.patches.deepseek_attention",
    "sglang_tpla.patches.forced_decode",  # teacher-forced decode for the fidelity eval (inert otherwise)
    "sglang_tpla.patches.calibration_capture",  # registers only with SGLANG_TPLA_CALIBRATE_DIR set
    "sglang_tpla.patches.disaggregation",
)

_installed = False


def register() -> None:
    global _installed
    if _installed:
        return
    for name in HOOK_MODULES:
        importlib.import_module(name).install()
    _installed = True
