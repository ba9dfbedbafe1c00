"""The TPLA transform file: per-layer latent statistics, the PCA rotation they give, and whose model they fit.

A file holds, for every MLA layer, the second moment ``E[u^T u]`` (float64) of the
RMS-normalised pre-gain latent ``u = c / RMS(c)`` (what the folded cache stores, before
rotation), the PCA rotation and eigenvalues derived from it, the model identity
(architecture, ``kv_lora_rank``, layer count, a hash of the weights the statistics were
taken on) and a checksum over all of it.  Loading checks the checksum and the identity and
refuses a file made for another model with a message that names the fix.

Pure PyTorch: no sglang.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from .transforms import pca, pca_energy_fractions

FORMAT = "sglang-tpla-calibration/1"
# How a user gets a file today (the calibration CLI through SGLang is not written yet).
CALIBRATE_HINT = "build one on this model's weights with sglang_tpla.calibration.Calibration.from_moments(...).save(FILE)"


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

    @classmethod
    def from_moments(cls, identity: ModelIdentity, moments: list[torch.Tensor], num_tokens: int) -> "Calibration":
        if len(moments) != identity.num_layers:
            raise CalibrationError(f"got statistics for {len(moments)} layers, the model has {identity.num_layers}")
        fits = [pca(m) for m in moments]
        return cls(identity, num_tokens, [m.double() for m in moments], [f.rotation for f in fits], [f.eigenvalues for f in fits])

    def energy_fractions(self, layer: int, g: int) -> torch.Tensor:
        return pca_energy_fractions(self.eigenvalues[layer], g)

    # ------------------------------------------------------------------ I/O

    def _payload(self) -> dict:
        return {
            "format": FORMAT,
            "identity": self.identity.__dict__,
            "num_tokens": int(self.num_tokens),
            "second_moments": self.second_moments,
            "rotations": self.rotations,
            "eigenvalues": self.eigenvalues,
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
        if payload.get("format") != FORMAT:
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
        return cls(ident, payload["num_tokens"], payload["second_moments"], payload["rotations"], payload["eigenvalues"])
