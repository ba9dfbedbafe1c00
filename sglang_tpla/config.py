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


# PD transfer backends that know the sliced TPLA pool (patches/disaggregation.py); 'fake'
# moves no data (decode-only benchmarking with --fake-prefill).
PD_BACKENDS = ("mooncake", "mooncake_tcp", "fake")
# SGLANG_TPLA_* variables that are not TPLA options: test / tooling knobs that must keep working with TPLA off
# (CPU platform, calibration capture, PD staging and digests, run.sh), and the decode kernel choice, which does
# nothing unless TPLA is on (a warning then).
TOOLING_ENV = (
    "SGLANG_TPLA_CPU_MEM_GB", "SGLANG_TPLA_CPU_MEM_COUNT_WEIGHTS", "SGLANG_TPLA_CPU_TRACE_ATTN",
    "SGLANG_TPLA_CALIBRATE_DIR", "SGLANG_TPLA_CALIBRATE_PAIRS", "SGLANG_TPLA_PD_DIGEST_DIR",
    "SGLANG_TPLA_PD_STAGING_MB", "SGLANG_TPLA_ENV_ROOT",
)
TPLA_ONLY_ENV = ("SGLANG_TPLA_IMPL",)


def check_server_compat(
    attn_dp_size: int = 1, dcp_size: int = 1, pp_size: int = 1, speculative_algorithm=None,
    enable_mixed_chunk: bool = False, *, tpla_on: bool = True, enable_dp_attention: bool = False,
    disaggregation_mode: str = "null", transfer_backend: str = "mooncake", tpla_json=None,
    environ=None, converted: dict | None = None,
) -> list[str]:
    """Every refusal that SGLang's server arguments alone decide, before anything is loaded.

    ``tpla_on``: the server was given the ``tpla`` attention backend; ``tpla_json``: the ``"tpla"``
    object of ``--json-model-override-args``; ``environ``: the environment (None = empty);
    ``converted``: the ``tpla_transform`` record of the checkpoint's config.json
    (``python -m sglang_tpla.convert``), if any.  Raises :class:`TPLAConfigError` naming the fix;
    returns warnings for settings that do nothing here.
    """
    env = {} if environ is None else environ
    warnings = [
        f"{k} is not a TPLA setting (ignored); known ones: see docs/serving.md"
        for k in sorted(env)
        if k.startswith("SGLANG_TPLA_") and k not in _ENV.values() and k not in TOOLING_ENV + TPLA_ONLY_ENV
    ]
    if tpla_on:
        problems = []
        if enable_mixed_chunk:  # decode tokens inside an extend batch would run exact MLA, not TPLA
            problems.append("mixed chunks (--enable-mixed-chunk: their decode tokens would attend as prefill)")
        if enable_dp_attention or (attn_dp_size or 1) > 1:
            # DP attention shrinks the attention TP group (to 1 rank at --tp N --dp-size N --enable-dp-attention),
            # so nothing would be split; TPLA inside each DP group is not tested against the reference.
            flag = "--enable-dp-attention" if enable_dp_attention else f"--attn-dp-size {attn_dp_size}"
            problems.append(f"DP attention ({flag}: TPLA splits the latent over the attention TP group, which DP attention shrinks)")
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
        if disaggregation_mode == "decode" and transfer_backend not in PD_BACKENDS:
            raise TPLAConfigError(
                f"TPLA decode nodes receive latent slices only over --disaggregation-transfer-backend "
                f"{'|'.join(PD_BACKENDS[:2])} (got {transfer_backend}): other backends would write full 576-wide rows "
                "into the sliced pool. Use mooncake, or drop --decode-attention-backend tpla on this node."
            )
    env_opts = [f"{v}={env[v]}" for v in _ENV.values() if env.get(v) not in (None, "")]
    used = tpla_on or (disaggregation_mode == "prefill" and bool(tpla_json))
    if not used:
        given = (['"tpla" in --json-model-override-args'] if tpla_json else []) + env_opts
        if given:
            raise TPLAConfigError(
                f"TPLA options were given ({', '.join(given)}) but TPLA is off: add --decode-attention-backend tpla "
                "(or, for a PD prefill node that folds the same transform, --disaggregation-mode prefill with the "
                'options in --json-model-override-args \'{"tpla": {...}}\'), or drop the options.'
            )
        warnings += [f"{k}={env[k]} does nothing: TPLA is off" for k in TPLA_ONLY_ENV if env.get(k) not in (None, "")]
        return warnings
    cfg = from_sources(tpla_json or None, env)  # option values are checked here, before anything loads
    # pca / fit are identified by their calibration file's content; without a readable one they are refused at load
    comparable = cfg.transform not in ("pca", "fit") or (cfg.calibration and Path(cfg.calibration).is_file())
    if converted and comparable:
        if converted.get("fingerprint") != cfg.fingerprint():
            raise TPLAConfigError(
                f"TPLA: this checkpoint was converted with transform {converted.get('fingerprint')!r} "
                f"(tpla_transform in its config.json), but the server is configured for {cfg.fingerprint()!r}; set "
                "the same transform (and seed / calibration file) or serve the unconverted checkpoint."
            )
    return warnings
