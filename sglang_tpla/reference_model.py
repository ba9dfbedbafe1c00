"""fp32 reference forward of a dense DeepSeek-V2/V3 model with MLA, pd-sep TPLA or TPLA everywhere.

The whole-model oracle for the SGLang integration and the fidelity evaluation.  One
sequence at a time; attention runs through :mod:`sglang_tpla.reference`.

Modes (``AttentionMode.kind``):

* ``mla``: exact MLA everywhere.
* ``pd_sep``: the prompt is prefilled with exact MLA (exact RMSNorm, exact softmax);
  every decode step runs TPLA over the sliced cache; the latent of decoded tokens is
  normalised with ``norm`` (``exact`` or the paper's ``local``).
* ``tpla``: TPLA everywhere, prompt included (the paper's plain "TPLA" rows).

Weights are taken as they are: fold a transform into them first
(:func:`sglang_tpla.transforms.fold_state_dict`) to evaluate Hadamard or PCA.

Pure PyTorch: no sglang.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .reference import MLAAttentionWeights, absorb_query, latent_attention, normalize_latent

MODES = ("mla", "pd_sep", "tpla")


@dataclass
class AttentionMode:
    kind: str = "mla"
    g: int = 1
    norm: str = "exact"
    # per layer: g energy fractions p_j (local RMSNorm correction, mu='inv_p'); None = 1/g
    energy_fractions: Sequence[Sequence[float]] | None = None
    # per layer: g logit scales mu_j on the latent logit; None = no scaling
    mu: Sequence[Sequence[float]] | None = None
    # storage dtype of the KV cache (e.g. torch.float8_e4m3fn): cached rows are rounded through
    # it, scale 1, as SGLang's MLA pool stores them; None = rows kept in the compute dtype
    kv_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.kind not in MODES:
            raise ValueError(f"unknown attention mode {self.kind!r}; choose one of {list(MODES)}")


# --------------------------------------------------------------------------- rope


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_cos_sin(cfg: dict, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T, rope/2]`` for DeepSeek's (yarn) rotary embedding, in float64."""
    dim, base = cfg["qk_rope_head_dim"], float(cfg.get("rope_theta", 10000.0))
    idx = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / base**idx
    attn_scale = 1.0
    rs = cfg.get("rope_scaling") or {}
    if rs:
        kind = rs.get("type", rs.get("rope_type"))
        if kind not in ("yarn", "deepseek_yarn"):
            raise ValueError(f"reference model supports yarn rope scaling only, got {kind!r}")
        factor = float(rs["factor"])
        orig = int(rs["original_max_position_embeddings"])
        low = max(math.floor(_yarn_correction_dim(rs.get("beta_fast", 32), dim, base, orig)), 0)
        high = min(math.ceil(_yarn_correction_dim(rs.get("beta_slow", 1), dim, base, orig)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extra_mask = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extra_mask) + inv_freq * extra_mask
        attn_scale = yarn_get_mscale(factor, rs.get("mscale", 1.0)) / yarn_get_mscale(factor, rs.get("mscale_all_dim", 0.0))
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return freqs.cos() * attn_scale, freqs.sin() * attn_scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J (interleaved) rotation, as DeepSeek uses: pairs ``(x[2i], x[2i+1])``; ``x [T, ..., rope]``."""
    shape = [x.shape[0]] + [1] * (x.dim() - 2) + [cos.shape[-1]]
    c, s = cos.float().view(shape), sin.float().view(shape)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)


def softmax_scale(cfg: dict) -> float:
    scale = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    rs = cfg.get("rope_scaling") or {}
    if rs and rs.get("mscale_all_dim"):
        m = yarn_get_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
        scale = scale * m * m
    return scale


# --------------------------------------------------------------------------- model


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class ReferenceDeepseek:
    """A dense DeepSeek-V2/V3 (or Kimi-K2 shaped) model in fp32, HF weight names."""

    def __init__(self, cfg: dict, state_dict: dict[str, torch.Tensor]):
        if cfg.get("first_k_dense_replace", 0) < cfg["num_hidden_layers"]:
            raise ValueError("the reference model covers dense layers only (first_k_dense_replace >= num_hidden_layers)")
        self.cfg = cfg
        self.sd = {k: v.float() for k, v in state_dict.items()}
        self.eps = float(cfg["rms_norm_eps"])
        self.heads = cfg["num_attention_heads"]
        self.nope, self.rope, self.vdim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        self.r = cfg["kv_lora_rank"]
        self.sm_scale = softmax_scale(cfg)
        self.attn_w = [
            MLAAttentionWeights.from_kv_b_proj(
                self.sd[f"model.layers.{i}.self_attn.kv_b_proj.weight"],
                self.sd[f"model.layers.{i}.self_attn.o_proj.weight"],
                self.heads,
                self.nope,
                self.vdim,
            )
            for i in range(cfg["num_hidden_layers"])
        ]

    @property
    def num_layers(self) -> int:
        return self.cfg["num_hidden_layers"]

    def new_cache(self) -> list[dict]:
        """Per layer: cached latent ``[L, R]`` (normalised, gain applied), RoPE key ``[L, rope]``,
        and the pre-norm latent ``c [L, R]`` (for calibration statistics)."""
        return [
            {"ckv": torch.zeros(0, self.r), "kpe": torch.zeros(0, self.rope), "c": torch.zeros(0, self.r)}
            for _ in range(self.num_layers)
        ]

    def forward(
        self, input_ids: Sequence[int], start_pos: int, cache: list[dict], mode: AttentionMode, decode: bool
    ) -> torch.Tensor:
        """Run tokens at positions ``start_pos ..``; appends to ``cache``; returns logits ``[T, V]``.

        ``decode`` marks a decode step (TPLA in pd_sep); otherwise the tokens are prefill.
        """
        sd = self.sd
        ids = torch.as_tensor(list(input_ids), dtype=torch.long)
        t = ids.numel()
        positions = torch.arange(start_pos, start_pos + t)
        cos, sin = rope_cos_sin(self.cfg, positions)
        h = sd["model.embed_tokens.weight"][ids]
        use_tpla = mode.kind == "tpla" or (mode.kind == "pd_sep" and decode)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            x = _rms(h, sd[p + "input_layernorm.weight"], self.eps)
            h = h + self._attention(i, x, cos, sin, cache[i], mode, use_tpla)
            x = _rms(h, sd[p + "post_attention_layernorm.weight"], self.eps)
            m = p + "mlp."
            h = h + (F.silu(x @ sd[m + "gate_proj.weight"].T) * (x @ sd[m + "up_proj.weight"].T)) @ sd[m + "down_proj.weight"].T
        h = _rms(h, sd["model.norm.weight"], self.eps)
        return h @ sd["lm_head.weight"].T

    def _attention(self, i, x, cos, sin, layer_cache, mode: AttentionMode, use_tpla: bool) -> torch.Tensor:
        sd, a = self.sd, f"model.layers.{i}.self_attn."
        t = x.shape[0]
        if a + "q_a_proj.weight" in sd:
            q = _rms(x @ sd[a + "q_a_proj.weight"].T, sd[a + "q_a_layernorm.weight"], self.eps) @ sd[a + "q_b_proj.weight"].T
        else:
            q = x @ sd[a + "q_proj.weight"].T
        q = q.view(t, self.heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        kv = x @ sd[a + "kv_a_proj_with_mqa.weight"].T
        c, k_pe = kv.split([self.r, self.rope], dim=-1)
        q_pe, k_pe = apply_rope(q_pe, cos, sin), apply_rope(k_pe, cos, sin)

        # what goes into the cache: exact RMSNorm (prefill / exact decode) or the local one
        gamma = sd[a + "kv_a_layernorm.weight"]
        if use_tpla and mode.norm == "local":
            p = None if mode.energy_fractions is None else mode.energy_fractions[i]
            ckv_new = normalize_latent(c, self.eps, "local", mode.g, p) * gamma
        else:
            ckv_new = normalize_latent(c, self.eps, "exact") * gamma
        if mode.kv_dtype is not None:
            ckv_new, k_pe = ckv_new.to(mode.kv_dtype).to(x.dtype), k_pe.to(mode.kv_dtype).to(x.dtype)
        start = layer_cache["ckv"].shape[0]
        layer_cache["ckv"] = torch.cat([layer_cache["ckv"], ckv_new])
        layer_cache["kpe"] = torch.cat([layer_cache["kpe"], k_pe])
        layer_cache["c"] = torch.cat([layer_cache["c"], c])

        w = self.attn_w[i]
        ckv, kpe = layer_cache["ckv"], layer_cache["kpe"]
        if not use_tpla:
            o = latent_attention(absorb_query(q_nope, w.w_kc), q_pe, ckv, kpe, self.sm_scale, None, start)
            v = torch.einsum("thr,hrv->thv", o, w.w_vc)
        else:
            g, width = mode.g, self.r // mode.g
            v = None
            for j in range(g):
                lo, hi = j * width, (j + 1) * width
                mu = None if mode.mu is None else float(mode.mu[i][j])
                o = latent_attention(absorb_query(q_nope, w.w_kc[:, :, lo:hi]), q_pe, ckv[:, lo:hi], kpe, self.sm_scale, mu, start)
                part = torch.einsum("thr,hrv->thv", o, w.w_vc[:, lo:hi])
                v = part if v is None else v + part
        return v.reshape(t, -1) @ w.o_proj.T

    # ------------------------------------------------------------------ drivers

    def score(self, ids: Sequence[int], prefill_len: int, mode: AttentionMode) -> torch.Tensor:
        """Teacher-forced logits ``[len(ids), V]``: the first ``prefill_len`` tokens as one
        prefill, every later token as its own decode step."""
        if not 1 <= prefill_len <= len(ids):
            raise ValueError("prefill_len must be in [1, len(ids)]")
        cache = self.new_cache()
        out = [self.forward(ids[:prefill_len], 0, cache, mode, decode=False)]
        for pos in range(prefill_len, len(ids)):
            out.append(self.forward(ids[pos : pos + 1], pos, cache, mode, decode=True))
        return torch.cat(out)

    def latent_second_moments(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per layer ``E[u^T u]`` (float64) of the RMS-normalised pre-gain latent ``u = c / RMS(c)``
        over all tokens of ``sequences`` (exact MLA prefill): the statistics PCA is fit on."""
        acc = [torch.zeros(self.r, self.r, dtype=torch.float64) for _ in range(self.num_layers)]
        n = 0
        for ids in sequences:
            cache = self.new_cache()
            self.forward(ids, 0, cache, AttentionMode("mla"), decode=False)
            for i, layer in enumerate(cache):
                u = normalize_latent(layer["c"], self.eps, "exact").double()
                acc[i] += u.T @ u
            n += len(ids)
        return [a / max(n, 1) for a in acc]

    def generate(self, prompt: Sequence[int], max_new_tokens: int, mode: AttentionMode) -> tuple[list[int], list[float]]:
        """Greedy generation; returns the new tokens and their log-probabilities."""
        cache = self.new_cache()
        logits = self.forward(prompt, 0, cache, mode, decode=False)[-1]
        tokens, logprobs = [], []
        pos = len(prompt)
        for step in range(max_new_tokens):
            lp = torch.log_softmax(logits.double(), -1)
            tok = int(lp.argmax())
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            if step + 1 < max_new_tokens:
                logits = self.forward([tok], pos, cache, mode, decode=True)[0]
                pos += 1
        return tokens, logprobs
