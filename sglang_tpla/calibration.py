"""The TPLA transform file: per-layer latent statistics, the PCA rotation they give, and whose model they fit.

A file holds, for every MLA layer, the second moment ``E[u^T u]`` (float64) of the
RMS-normalised pre-gain latent ``u = c / RMS(c)`` (what the folded cache stores, before
rotation), the PCA rotation and eigenvalues derived from it, the model identity
(architecture, ``kv_lora_rank``, layer count, a hash of the weights the statistics were
taken on) and a checksum over all of it.  Loading checks the checksum and the identity and
refuses a file made for another model with a message that names the fix.

Format 2 adds, per layer, a fixed random sample of (query, key) pairs from the calibration
prefill (``lsq_queries`` = absorbed query ``q_nope @ W_UK * gamma`` of one head,
``lsq_keys`` = ``u`` of one causally visible key of the same request, both in the ORIGINAL
basis).  The least-squares logit scales ``mu`` (mu mode ``lsq``) are fit from them at load
time in whatever basis the server uses (:func:`lsq_logit_scales`): the latent logit is
``a . u`` and, for an orthogonal ``U``, shard ``j``'s partial logit is ``(aU)_j . (uU)_j``,
so rotating the stored pairs gives exactly the pairs the rotated server would see.  This is
exact for the sample, works for PCA (whose rotation is only known after the moments) and
for any ``g`` without fourth-order statistics (``r^2 x r^2``), and costs
``2 * N * r * 4`` bytes per layer (N = 512 pairs: 2 MiB).  Format 1 files still load (no
``lsq`` data).

Pure PyTorch: no sglang.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from .transforms import pca, pca_energy_fractions, shard_energy_fractions

FORMAT = "sglang-tpla-calibration/3"
_FORMATS = ("sglang-tpla-calibration/1", "sglang-tpla-calibration/2", FORMAT)
CALIBRATE_HINT = (
    "build one on this model's weights with `python -m sglang_tpla.calibrate --model-path MODEL --tp N "
    "--data FILE --num-tokens K --out FILE`"
)


class CalibrationError(ValueError):
    """An unusable transform file; the message names the fix."""


@dataclass(frozen=True)
class ModelIdentity:
    architecture: str
    kv_lora_rank: int
    num_layers: int
    weights_hash: str

    def describe(self) -> str:
        return (
            f"{self.architecture} with {self.num_layers} layers, kv_lora_rank {self.kv_lora_rank}, "
            f"weights {self.weights_hash[:12]}"
        )


def weights_hash(latent_rows: list[torch.Tensor]) -> str:
    """A fingerprint of the latent down-projection rows (``kv_a_proj_with_mqa[:r]``) of every layer.

    Hashed in bfloat16 so that the same checkpoint served in bf16 or fp32 gives the same hash.
    """
    h = hashlib.sha256()
    for rows in latent_rows:
        t = rows.detach().to("cpu", torch.bfloat16).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Calibration:
    identity: ModelIdentity
    num_tokens: int
    second_moments: list[torch.Tensor]  # per layer [r, r], float64
    rotations: list[torch.Tensor]  # per layer [r, r], PCA (largest components first)
    eigenvalues: list[torch.Tensor]  # per layer [r]
    lsq_queries: list[torch.Tensor] | None = None  # per layer [N, r] float32, original basis (format 2)
    lsq_keys: list[torch.Tensor] | None = None  # per layer [N, r] float32, u = c / RMS(c), original basis
    key_means: list[torch.Tensor] | None = None  # per layer [r] float64, E[u] (format 3)
    query_moments: list[torch.Tensor] | None = None  # per layer [r, r] float64, E[a^T a] (format 3)
    fitted: dict[int, list[torch.Tensor]] | None = None  # g -> per layer [r, r] ('fit' transform)

    def __post_init__(self):
        if self.fitted is None:
            self.fitted = {}

    @classmethod
    def from_moments(
        cls,
        identity: ModelIdentity,
        moments: list[torch.Tensor],
        num_tokens: int,
        lsq_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
        key_means: list[torch.Tensor] | None = None,
        query_moments: list[torch.Tensor] | None = None,
    ) -> "Calibration":
        if len(moments) != identity.num_layers:
            raise CalibrationError(f"got statistics for {len(moments)} layers, the model has {identity.num_layers}")
        fits = [pca(m) for m in moments]
        qs = ks = None
        if lsq_pairs is not None:
            qs, ks = [q.float().contiguous() for q in lsq_pairs[0]], [k.float().contiguous() for k in lsq_pairs[1]]
            if len(qs) != identity.num_layers or len(ks) != identity.num_layers:
                raise CalibrationError(f"got logit pairs for {len(qs)} layers, the model has {identity.num_layers}")
        for name, stats in (("key means", key_means), ("query moments", query_moments)):
            if stats is not None and len(stats) != identity.num_layers:
                raise CalibrationError(f"got {name} for {len(stats)} layers, the model has {identity.num_layers}")
        return cls(
            identity, num_tokens, [m.double() for m in moments], [f.rotation for f in fits], [f.eigenvalues for f in fits],
            qs, ks,
            None if key_means is None else [m.double() for m in key_means],
            None if query_moments is None else [m.double() for m in query_moments],
        )

    @property
    def has_fit_statistics(self) -> bool:
        return bool(self.key_means) and bool(self.query_moments)

    def rotations_for(self, transform: str, g: int | None = None) -> list[torch.Tensor]:
        """Per layer the rotation of ``transform`` ('pca', or 'fit' for ``g``)."""
        if transform == "pca":
            return self.rotations
        if transform != "fit":
            raise ValueError(f"a calibration file holds no {transform!r} rotation")
        if g not in self.fitted:
            have = sorted(self.fitted) or "none"
            raise CalibrationError(
                f"this calibration file holds no fitted rotation for g={g} (it has: {have}); add one with "
                f"`python -m sglang_tpla.rotation_fit --calibration FILE --g {g}`"
            )
        return self.fitted[g]

    def shard_energy_fractions(self, layer: int, g: int, transform: str) -> torch.Tensor:
        """``p_j`` of ``layer`` in the basis of ``transform`` ('pca' or 'fit')."""
        if transform == "pca":
            return self.energy_fractions(layer, g)
        return shard_energy_fractions(self.second_moments[layer], self.rotations_for(transform, g)[layer], g)

    def energy_fractions(self, layer: int, g: int) -> torch.Tensor:
        return pca_energy_fractions(self.eigenvalues[layer], g)

    def logit_scales(
        self, mode: str, g: int, rotations=None, norm: str = "exact", pca_fractions: bool = False, eps: float = 1e-6,
    ) -> list[list[float]] | None:
        """Per layer the ``g`` values of ``mu`` for ``AttentionMode.mu`` of the reference model (None for 'one').

        ``rotations``: per layer the basis the model runs in (None = original); ``pca_fractions``: the
        energy fractions ``p_j`` come from this file's PCA (transform 'pca'), else ``1/g``.
        """
        if mode == "one":
            return None
        out = []
        for i in range(self.identity.num_layers):
            p = self.energy_fractions(i, g) if pca_fractions else torch.full((g,), 1.0 / g, dtype=torch.float64)
            if mode == "inv_p":
                out.append([1.0 / float(x) for x in p])
            elif mode == "lsq":
                rot = None if rotations is None else rotations[i]
                out.append([float(x) for x in self.lsq_logit_scales(i, g, rot, norm, p if norm == "local" else None, eps)])
            else:
                raise ValueError(f"unknown mu mode {mode!r}; choose one of ['one', 'inv_p', 'lsq']")
        return out

    @property
    def has_lsq(self) -> bool:
        return bool(self.lsq_queries) and all(q.shape[0] > 0 for q in self.lsq_queries)

    def lsq_logit_scales(
        self, layer: int, g: int, rotation: torch.Tensor | None = None, norm: str = "exact",
        energy_fractions=None, eps: float = 1e-6,
    ) -> torch.Tensor:
        """Least-squares ``mu_j`` (float64 ``[g]``, :func:`lsq_logit_scales`) for ``layer`` in the basis
        ``rotation`` (None = original)."""
        if not self.has_lsq:
            raise CalibrationError(
                f"this calibration file ({self.identity.describe()}) holds no logit pairs for mu 'lsq' "
                f"(format 1 or made with --lsq-pairs 0); recreate it: {CALIBRATE_HINT}"
            )
        return lsq_logit_scales(self.lsq_queries[layer], self.lsq_keys[layer], g, rotation, norm, energy_fractions, eps)

    # ------------------------------------------------------------------ I/O

    def _payload(self) -> dict:
        return {
            "format": FORMAT,
            "identity": self.identity.__dict__,
            "num_tokens": int(self.num_tokens),
            "second_moments": self.second_moments,
            "rotations": self.rotations,
            "eigenvalues": self.eigenvalues,
            "lsq_queries": self.lsq_queries,
            "lsq_keys": self.lsq_keys,
            "key_means": self.key_means,
            "query_moments": self.query_moments,
            "fitted": {int(g): rots for g, rots in self.fitted.items()},
        }

    @staticmethod
    def _checksum(payload: dict) -> str:
        buf = io.BytesIO()
        torch.save(payload, buf)
        return hashlib.sha256(buf.getvalue()).hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = self._payload()
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"payload": payload, "sha256": self._checksum(payload)}, tmp)
        tmp.replace(path)  # never leave a half-written file under the final name
        return path

    @classmethod
    def load(cls, path: str | Path, expect: ModelIdentity | None = None) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(
                f"TPLA calibration file {str(path)!r} does not exist; fix the path or {CALIBRATE_HINT}."
            )
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            payload, digest = blob["payload"], blob["sha256"]
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise CalibrationError(f"{path} is not a TPLA calibration file ({e}); {CALIBRATE_HINT}") from None
        if payload.get("format") not in _FORMATS:
            raise CalibrationError(f"{path} has format {payload.get('format')!r}, expected {FORMAT!r}; recreate it")
        if cls._checksum(payload) != digest:
            raise CalibrationError(f"{path} is corrupted (checksum mismatch); {CALIBRATE_HINT}")
        ident = ModelIdentity(**payload["identity"])
        if expect is not None:
            fields = ("architecture", "kv_lora_rank", "num_layers", "weights_hash")
            diff = [f for f in fields if getattr(ident, f) != getattr(expect, f)]
            if diff:
                raise CalibrationError(
                    f"{path} was calibrated for {ident.describe()}, but the served model is {expect.describe()} "
                    f"(differs in {', '.join(diff)}); {CALIBRATE_HINT}."
                )
        return cls(
            ident, payload["num_tokens"], payload["second_moments"], payload["rotations"], payload["eigenvalues"],
            payload.get("lsq_queries"), payload.get("lsq_keys"), payload.get("key_means"), payload.get("query_moments"),
            dict(payload.get("fitted") or {}),
        )


# --------------------------------------------------------------------------- least-squares logit scales


def lsq_normal_equations(
    queries: torch.Tensor,
    keys: torch.Tensor,
    g: int,
    rotation: torch.Tensor | None = None,
    norm: str = "exact",
    energy_fractions=None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A^T A [g, g], A^T s [g])`` in float64 for the pairs ``(queries[n], keys[n])``.

    ``A[n, j] = (qU)_j . k'_j`` is shard ``j``'s partial latent logit as the server computes
    it (``k' = kU``, or with ``norm='local'`` each slice renormalised to
    ``sqrt(g p_j) * slice / RMS(slice)``), ``s[n] = q . k`` the exact latent logit.
    """
    a, u = queries.double(), keys.double()
    if rotation is not None:
        rot = rotation.double()
        a, u = a @ rot, u @ rot
    n, r = a.shape
    if r % g:
        raise ValueError(f"g={g} does not divide the latent width {r}")
    s = (a * u).sum(-1)
    k = u.view(n, g, r // g)
    if norm == "local":
        p = torch.full((g,), 1.0 / g, dtype=torch.float64) if energy_fractions is None else torch.as_tensor(
            energy_fractions, dtype=torch.float64)
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * torch.sqrt(g * p)[:, None]
    elif norm != "exact":
        raise ValueError(f"unknown RMSNorm mode {norm!r}")
    big_a = (a.view(n, g, r // g) * k).sum(-1)  # [n, g]
    return big_a.T @ big_a, big_a.T @ s


def solve_normal_equations(ata: torch.Tensor, ats: torch.Tensor) -> torch.Tensor:
    """``argmin ||A mu - s||`` from the normal equations (minimum-norm if singular)."""
    return torch.linalg.lstsq(ata.double(), ats.double().unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def lsq_logit_scales(queries, keys, g, rotation=None, norm="exact", energy_fractions=None, eps=1e-6) -> torch.Tensor:
    """Per-shard ``mu_j = argmin sum_n (mu_j A[n, j] - s[n])^2 = (A^T s)_j / (A^T A)_jj``.

    Each latent group runs its OWN softmax over ``mu_j * s_j + rope``, so each shard's scaled
    partial logit must approximate the full logit by itself (the paper's Condition 2,
    ``Q'c^T ~ mu Q'_0 c_0^T ~ nu Q'_1 c_1^T``).  The joint fit ``sum_j mu_j s_j ~ s`` is
    degenerate: with exact RMSNorm ``sum_j s_j = s`` identically, so it always returns
    ``mu = 1`` (it is :func:`solve_normal_equations` of the same sums, kept for comparison).
    """
    ata, ats = lsq_normal_equations(queries, keys, g, rotation, norm, energy_fractions, eps)
    diag = ata.diagonal()
    return torch.where(diag > 0, ats / diag.clamp_min(1e-300), torch.ones_like(ats))
