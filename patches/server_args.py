"""TPLA's refusals at SGLang's argument resolution, in the launching process, before anything is loaded.

Hook (SGLang 0.5.23): AROUND ``sglang.srt.server_args.ServerArgs.resolve_once``.  Every entry point
(``python -m sglang.launch_server``, ``sglang serve``, ``Engine``) loads the plugins, builds the
``ServerArgs`` record and calls ``resolve_once()`` once in the main process before it spawns a
scheduler; the record then reaches the workers already resolved (``_resolution_finished``), where
this hook does nothing.  The check runs on the operator's raw input *before* SGLang's own
resolution pipeline, so TPLA's message comes first (e.g. ``--dcp-size`` would otherwise be
stopped by SGLang's platform checks, and ``--dp-size N --enable-dp-attention`` is only turned into
``attn_dp_size`` by the pipeline).  What it refuses (:func:`sglang_tpla.config.check_server_compat`):
speculative decoding, DP attention, DCP, PP and mixed chunks with TPLA; a PD transfer backend
other than mooncake on a TPLA decode node; TPLA options (``"tpla"`` JSON or ``SGLANG_TPLA_<option>``
variables) while TPLA is off; a converted checkpoint (``tpla_transform`` in its config.json) served
with another transform.  Warnings (logged) for ``SGLANG_TPLA_*`` names that do nothing.

:func:`check` is also what ``patches/runtime.py`` calls once per worker (on the resolved values),
as a second line of defense for a launcher that resolved its arguments before loading plugins.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from sglang_tpla.config import check_server_compat
from sglang_tpla.patches.runtime import BACKEND_NAME

logger = logging.getLogger("sglang_tpla")

HOOK_TARGETS = ("sglang.srt.server_args.ServerArgs.resolve_once",)


def _tpla_json(raw) -> dict | None:
    if isinstance(raw, dict):
        return raw.get("tpla")
    try:
        return (json.loads(raw) or {}).get("tpla") if raw else None
    except (TypeError, ValueError, AttributeError):
        return None  # not JSON (or not an object): SGLang refuses it with its own message


def _converted_record(model_path) -> dict | None:
    """``tpla_transform`` of a local checkpoint's config.json (None for a hub id or a plain checkpoint)."""
    try:
        cfg = Path(str(model_path)) / "config.json"
        return json.loads(cfg.read_text()).get("tpla_transform") if cfg.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def check(args, *, resolved: bool = False, warn: bool = True) -> None:
    """Run :func:`check_server_compat` on a ``ServerArgs`` record: its raw input fields, or with
    ``resolved`` what SGLang's resolution decided (``resolution_result``)."""
    if resolved:
        from sglang.srt.arg_groups.overrides import resolution_result

        def get(name, default=None):
            value = resolution_result(args, name, default)
            return default if value is None else value
    else:
        def get(name, default=None):
            value = getattr(args, name, default)
            return default if value is None else value

    tpla_on = BACKEND_NAME in (get("decode_attention_backend"), get("attention_backend"))
    for line in check_server_compat(
        get("attn_dp_size", 1), get("dcp_size", 1), get("pp_size", 1), get("speculative_algorithm"),
        bool(get("enable_mixed_chunk", False)), tpla_on=tpla_on, enable_dp_attention=bool(get("enable_dp_attention", False)),
        disaggregation_mode=str(get("disaggregation_mode", "null")),
        transfer_backend=str(get("disaggregation_transfer_backend", "mooncake")),
        tpla_json=_tpla_json(get("json_model_override_args")), environ=dict(os.environ),
        converted=_converted_record(get("model_path")),
    ):
        if warn:
            logger.warning("TPLA: %s", line)


def _resolve_once(orig, self, *args, **kwargs):
    """AROUND ServerArgs.resolve_once: TPLA's check on the raw input, once, before SGLang resolves."""
    if not getattr(self, "_resolution_finished", False) and not getattr(self, "_resolution_failed", False):
        check(self)
    return orig(self, *args, **kwargs)


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGETS[0], _resolve_once, HookType.AROUND)
