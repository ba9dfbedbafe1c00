"""Orthogonal latent transforms and their exact fold into DeepSeek MLA weights.

Convention: the latent is a row vector, ``c' = c @ U`` with ``U`` orthogonal
(``U.T @ U == I``).  Latent group ``j`` then keeps columns ``[j*D, (j+1)*D)`` of ``c'``.

The fold (paper §4.1, Proposition 1) on an HF-layout DeepSeek-V2/V3/Kimi-K2 state dict,
per layer ``i`` (prefix ``model.layers.{i}.self_attn.``):

* ``kv_b_proj.weight  <- kv_b_proj.weight @ diag(gamma) @ U``   (gamma absorbed, latent input columns rotated)
* ``kv_a_layernorm.weight <- 1``
* ``kv_a_proj_with_mqa.weight[:r] <- U.T @ kv_a_proj_with_mqa.weight[:r]``   (latent rows; RoPE rows untouched)

Because ``RMSNorm(1, c U) = RMSNorm(1, c) U`` for orthogonal ``U``, the folded, unsliced
model computes exactly what the original computes.  The fold only touches these three
tensors, so it is the same for the ``q_lora_rank=None`` (V2-Lite) layout.

Pure PyTorch: no sglang.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

TRANSFORM_KINDS = ("none", "hadamard", "pca", "fit")  # pca, fit: from a calibration file

_LAYER_KEY = re.compile(r"^(?P<prefix>.*\blayers\.(?P<idx>\d+)\.self_attn\.)kv_a_layernorm\.weight$")


def identity(d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.eye(d, dtype=dtype)


def sylvester_hadamard(d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (unnormalised) Sylvester Hadamard matrix of order ``d`` (a power of two)."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two size, got {d}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_signs(d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (d,), generator=gen).to(dtype) * 2 - 1


def randomized_hadamard(d: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``U = diag(s) @ H / sqrt(d)`` with seeded random signs ``s``.

    The signs act on the *input* coordinates.  ``H @ diag(s)`` would put them on the
    output coordinates, where they cancel inside every shard's dot product, so every
    seed would give the same TPLA result as plain ``H / sqrt(d)``.
    """
    return random_signs(d, seed, dtype)[:, None] * sylvester_hadamard(d, dtype) / math.sqrt(d)


@dataclass
class PCAResult:
    rotation: torch.Tensor  # [d, d], columns = principal directions, descending eigenvalue
    eigenvalues: torch.Tensor  # [d], descending


def pca(second_moment: torch.Tensor) -> PCAResult:
    """Eigenvectors of the latent second-moment matrix ``E[c^T c]``, largest first.

    Shard 0 gets the largest components.  Eigenvector signs are made deterministic
    (largest-magnitude entry of each column positive).
    """
    m = second_moment.to(torch.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"second moment must be a square matrix, got shape {tuple(m.shape)}")
    m = (m + m.T) / 2
    evals, evecs = torch.linalg.eigh(m)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(0), evecs[:, order]
    pivot = evecs.abs().argmax(0)
    signs = torch.sign(evecs[pivot, torch.arange(evecs.shape[1])])
    signs[signs == 0] = 1
    return PCAResult(evecs * signs, evals)


def shard_energy_fractions(second_moment: torch.Tensor, rotation: torch.Tensor, g: int) -> torch.Tensor:
    """``p_j``: the fraction of latent energy ``E||c'||^2`` that falls in shard ``j`` of ``c' = c U``.

    For a PCA rotation this is the sum of the shard's eigenvalues over the total.
    """
    m = second_moment.to(torch.float64)
    u = rotation.to(torch.float64)
    d = m.shape[0]
    if d % g:
        raise ValueError(f"g={g} does not divide the latent width {d}")
    diag = torch.einsum("ij,ik,kj->j", u, m, u)  # diag(U^T M U)
    per_shard = diag.view(g, d // g).sum(1)
    total = per_shard.sum()
    if total <= 0:
        raise ValueError("second moment has no energy; calibration data produced an all-zero latent")
    return per_shard / total


def pca_energy_fractions(eigenvalues: torch.Tensor, g: int) -> torch.Tensor:
    d = eigenvalues.numel()
    if d % g:
        raise ValueError(f"g={g} does not divide the latent width {d}")
    e = eigenvalues.to(torch.float64).clamp_min(0).view(g, d // g).sum(1)
    return e / e.sum()


# --------------------------------------------------------------------------- fold


def mla_layer_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[int, str]:
    """Map layer index -> ``'...layers.{i}.self_attn.'`` for every MLA layer in an HF state dict."""
    out = {}
    for key in state_dict:
        m = _LAYER_KEY.match(key)
        if m:
            out[int(m.group("idx"))] = m.group("prefix")
    return dict(sorted(out.items()))


def fold_layer(
    kv_a_proj_with_mqa: torch.Tensor,
    kv_a_layernorm: torch.Tensor,
    kv_b_proj: torch.Tensor,
    rotation: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold gamma and ``U`` into one layer's three tensors; returns new tensors in the input dtypes."""
    r = kv_a_layernorm.numel()
    if rotation.shape != (r, r):
        raise ValueError(f"rotation must be [{r}, {r}] for kv_lora_rank={r}, got {tuple(rotation.shape)}")
    if kv_b_proj.shape[1] != r or kv_a_proj_with_mqa.shape[0] < r:
        raise ValueError(
            f"unexpected MLA shapes: kv_a_proj_with_mqa {tuple(kv_a_proj_with_mqa.shape)}, kv_b_proj {tuple(kv_b_proj.shape)}"
        )
    u = rotation.to(torch.float64)
    gamma = kv_a_layernorm.to(torch.float64)
    a = kv_a_proj_with_mqa.to(torch.float64).clone()
    a[:r] = u.T @ a[:r]
    b = (kv_b_proj.to(torch.float64) * gamma[None, :]) @ u
    return (
        a.to(kv_a_proj_with_mqa.dtype),
        torch.ones_like(kv_a_layernorm),
        b.to(kv_b_proj.dtype),
    )


def fold_state_dict(
    state_dict: dict[str, torch.Tensor],
    rotations: dict[int, torch.Tensor] | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every MLA layer folded.

    ``rotations`` is one ``[r, r]`` matrix for all layers, or a dict layer -> matrix
    (PCA is per layer).  Tensors not touched by the fold are shared, not copied.
    """
    prefixes = mla_layer_prefixes(state_dict)
    if not prefixes:
        raise ValueError("no MLA layers found (expected keys like 'model.layers.0.self_attn.kv_a_layernorm.weight')")
    out = dict(state_dict)
    for idx, p in prefixes.items():
        u = rotations[idx] if isinstance(rotations, dict) else rotations
        a, ln, b = fold_layer(
            state_dict[p + "kv_a_proj_with_mqa.weight"],
            state_dict[p + "kv_a_layernorm.weight"],
            state_dict[p + "kv_b_proj.weight"],
            u,
        )
        out[p + "kv_a_proj_with_mqa.weight"] = a
        out[p + "kv_a_layernorm.weight"] = ln
        out[p + "kv_b_proj.weight"] = b
    return out


def make_rotation(kind: str, d: int, seed: int = 0, second_moment: torch.Tensor | None = None) -> torch.Tensor:
    """One ``[d, d]`` rotation of the named kind (``pca`` needs the layer's second moment)."""
    if kind == "none":
        return identity(d)
    if kind == "hadamard":
        return randomized_hadamard(d, seed)
    if kind == "pca":
        if second_moment is None:
            raise ValueError("the pca transform needs calibration statistics (a second-moment matrix per layer)")
        return pca(second_moment).rotation
    if kind == "fit":
        raise ValueError("the fit transform's rotations are stored in a calibration file (python -m sglang_tpla.rotation_fit)")
    raise ValueError(f"unknown TPLA transform {kind!r}; choose one of {list(TRANSFORM_KINDS)}")
