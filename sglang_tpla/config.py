"""TPLA options: where they come from, and their validation (fail closed, once, at start).

Options reach every SGLang process through either

* ``--json-model-override-args '{"tpla": {"g": 2, "transform": "hadamard"}}'`` (merged into
  the HF config, so every TP worker sees ``config.tpla``), or
* environment variables ``SGLANG_TPLA_G``, ``SGLANG_TPLA_TRANSFORM``, ``SGLANG_TPLA_SEED``,
  ``SGLANG_TPLA_CALIBRATION``, ``SGLANG_TPLA_MU``, ``SGLANG_TPLA_NORM``, ``SGLANG_TPLA_PREFILL`` (inherited by every worker).

The JSON form wins over the environment.  TPLA itself is switched on by the attention
backend name ``tpla`` (``--decode-attention-backend tpla``).

Pure Python: no sglang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .calibration import CALIBRATE_HINT
from .layout import TPLALayout, check_layout
from .transforms import TRANSFORM_KINDS

MU_CHOICES = ("one", "inv_p", "lsq")
NORM_CHOICES = ("exact", "local")
# prefill: "exact" = pd-sep (prompt/extend tokens run exact MLA), "tpla" = the paper's plain TPLA
# (extend tokens also attend over each rank's latent slice with their own softmax, like decode)
PREFILL_CHOICES = ("exact", "tpla")
_KEYS = {"g", "transform", "seed", "calibration", "mu", "norm", "prefill"}
_ENV = {
    "g": "SGLANG_TPLA_G",
    "transform": "SGLANG_TPLA_TRANSFORM",
    "seed": "SGLANG_TPLA_SEED",
    "calibration": "SGLANG_TPLA_CALIBRATION",
    "mu": "SGLANG_TPLA_MU",
    "norm": "SGLANG_TPLA_NORM",
    "prefill": "SGLANG_TPLA_PREFILL",
}


class TPLAConfigError(ValueError):
    """Invalid TPLA settings; the message names the fix."""


@dataclass(frozen=True)
class TPLAConfig:
    g: int | None = None  # latent groups; None = the attention TP size (every rank its own slice)
    transform: str = "hadamard"
    seed: int = 0
    calibration: str | None = None  # transform file for 'pca' and 'fit'
    # per-shard scale of the latent logit: 'inv_p' = 1/p_j (g for balanced transforms; the paper's recipe),
    # 'one' = unscaled, 'lsq' = least-squares mu_j fit on the calibration file's logit pairs
    mu: str = "inv_p"
    norm: str = "exact"  # 'local': decode rows normalised over their own latent slice (the paper's local RMSNorm)
    prefill: str = "exact"  # PREFILL_CHOICES: "exact" = pd-sep, "tpla" = TPLA everywhere

    def resolved_g(self, attn_tp_size: int) -> int:
        return attn_tp_size if self.g is None else self.g

    def fingerprint(self) -> str:
        """What a prefill node and a decode node must agree on (the latent basis).

        PCA is identified by the content of its calibration file, not its name.
        """
        if self.transform == "hadamard":
            return f"hadamard:seed={self.seed}"
        if self.transform == "pca":
            return f"pca:sha256={file_sha256(self.calibration)[:16] if self.calibration else '?'}"
        if self.transform == "fit":  # one fitted rotation per g in the file
            return f"fit:g={self.g}:sha256={file_sha256(self.calibration)[:16] if self.calibration else '?'}"
        return "identity"  # transform none: the checkpoint's own basis


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _choice(raw: dict, key: str, default: str, choices, what: str) -> str:
    value = str(raw.get(key, default))
    if value not in choices:
        raise TPLAConfigError(f"TPLA: unknown {what} {value!r}; choose one of {list(choices)}")
    return value


def from_sources(json_opts: dict | None = None, environ: dict | None = None) -> TPLAConfig:
    """Merge the JSON override (``config.tpla``) over the environment and validate types."""
    env = os.environ if environ is None else environ
    raw: dict = {k: env[v] for k, v in _ENV.items() if env.get(v) not in (None, "")}
    if json_opts:
        if not isinstance(json_opts, dict):
            raise TPLAConfigError(f'TPLA: "tpla" in --json-model-override-args must be an object, got {json_opts!r}')
        unknown = set(json_opts) - _KEYS
        if unknown:
            raise TPLAConfigError(f"TPLA: unknown option(s) {sorted(unknown)}; valid options are {sorted(_KEYS)}")
        raw.update(json_opts)
    try:
        g = None if raw.get("g") in (None, "", "auto") else int(raw["g"])
        seed = int(raw.get("seed", 0))
    except (TypeError, ValueError) as e:
        raise TPLAConfigError(f"TPLA: g and seed must be integers ({e}); e.g. SGLANG_TPLA_G=2") from None
    transform = _choice(raw, "transform", "hadamard", TRANSFORM_KINDS, "transform")
    mu = _choice(raw, "mu", "inv_p", MU_CHOICES, "mu mode")
    norm = _choice(raw, "norm", "exact", NORM_CHOICES, "norm")
    prefill = _choice(raw, "prefill", "exact", PREFILL_CHOICES, "prefill mode")
    calibration = raw.get("calibration") or None
    return TPLAConfig(g=g, transform=transform, seed=seed, calibration=calibration, mu=mu, norm=norm, prefill=prefill)


def validate_for_model(cfg: TPLAConfig, hf_config, attn_tp_size: int) -> TPLALayout:
    """Check the settings against the model and TP size; return the layout or raise."""
    kv_lora_rank = getattr(hf_config, "kv_lora_rank", None)
    if not kv_lora_rank or getattr(hf_config, "qk_rope_head_dim", None) is None:
        arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
        raise TPLAConfigError(
            f"TPLA needs an MLA model (DeepSeek-V2/V3, Kimi-K2: config with kv_lora_rank); {arch} has none. "
            "Drop --decode-attention-backend tpla for this model."
        )
    g = cfg.resolved_g(attn_tp_size)
    try:
        check_layout(attn_tp_size, g, hf_config.num_attention_heads, kv_lora_rank, hf_config.qk_rope_head_dim)
    except ValueError as e:
        raise TPLAConfigError(f"{e} (attention TP size {attn_tp_size}; set g with SGLANG_TPLA_G or {{\"tpla\": {{\"g\": ...}}}})") from None
    if cfg.mu == "lsq" and not cfg.calibration:
        raise TPLAConfigError(
            f"TPLA mu 'lsq' fits the logit scales on a calibration file ({CALIBRATE_HINT}); pass "
            '{"tpla": {"mu": "lsq", "calibration": "FILE"}} (or SGLANG_TPLA_CALIBRATION=FILE), or use mu "one"/"inv_p".'
        )
    if cfg.calibration and not Path(cfg.calibration).is_file():
        raise TPLAConfigError(
            f"TPLA calibration file {cfg.calibration!r} does not exist; fix the path or {CALIBRATE_HINT}."
        )
    if cfg.transform in ("pca", "fit"):
        if not cfg.calibration:
            raise TPLAConfigError(
                f"TPLA transform {cfg.transform!r} needs a calibration file ({CALIBRATE_HINT}); pass "
                f'{{"tpla": {{"transform": "{cfg.transform}", "calibration": "FILE"}}}} (or SGLANG_TPLA_CALIBRATION=FILE).'
            )
        if cfg.transform == "fit" and (cfg.g is None or cfg.g < 2):
            raise TPLAConfigError(
                "TPLA transform 'fit' has one fitted rotation per g, so g must be given explicitly and be >= 2 "
                '(e.g. {"tpla": {"transform": "fit", "g": 2, "calibration": "FILE"}}); the prefill node needs the same g.'
            )
        if not Path(cfg.calibration).is_file():
            raise TPLAConfigError(
                f"TPLA calibration file {cfg.calibration!r} does not exist; fix the path or {CALIBRATE_HINT}."
            )
    return TPLALayout(attn_tp_size, g, hf_config.num_attention_heads, kv_lora_rank, hf_config.qk_rope_head_dim)


def check_server_compat(
    attn_dp_size: int = 1, dcp_size: int = 1, pp_size: int = 1, speculative_algorithm=None, enable_mixed_chunk: bool = False
) -> None:
    """Refuse SGLang features the TPLA decode path does not support (fail closed at start)."""
    problems = []
    if enable_mixed_chunk:  # decode tokens inside an extend batch would run exact MLA, not TPLA
        problems.append("mixed chunks (--enable-mixed-chunk: their decode tokens would attend as prefill)")
    if (attn_dp_size or 1) > 1:
        problems.append(f"DP attention (--attn-dp-size {attn_dp_size})")
    if (dcp_size or 1) > 1:
        problems.append(f"decode context parallelism (--dcp-size {dcp_size})")
    if (pp_size or 1) > 1:
        problems.append(f"pipeline parallelism (--pp-size {pp_size})")
    if speculative_algorithm:
        problems.append(f"speculative decoding (--speculative-algorithm {speculative_algorithm})")
    if problems:
        raise TPLAConfigError(
            "TPLA (--decode-attention-backend tpla) does not support " + ", ".join(problems)
            + "; drop those flags or serve without TPLA."
        )
