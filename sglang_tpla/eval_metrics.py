"""Metric functions of the fidelity evaluation (pure Python + torch; no sglang, no server).

Conventions: a "distribution" is a ``[N, V]`` tensor of log-probabilities (one row per
continuation position); position ``k`` predicts continuation token ``k``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def dense_logprobs(top_logprobs: Sequence[Sequence[Sequence]], vocab_size: int) -> torch.Tensor:
    """SGLang's ``output_top_logprobs`` (per position a list of ``(logprob, token_id, text)``)
    -> ``[N, V]`` float64 log-probabilities.  With ``top_logprobs_num = V`` the rows are the full
    distribution; tokens missing from a row get ``-inf``."""
    out = torch.full((len(top_logprobs), vocab_size), float("-inf"), dtype=torch.float64)
    for i, row in enumerate(top_logprobs):
        for entry in row:
            out[i, int(entry[1])] = float(entry[0])
    return out


def perplexity(token_logprobs: Sequence[float]) -> float:
    """``exp(-mean log p)`` of the realised tokens."""
    if not len(token_logprobs):
        return float("nan")
    return math.exp(-sum(token_logprobs) / len(token_logprobs))


def kl_per_position(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row, in nats: ``sum_v p_v (log p_v - log q_v)`` (rows are
    log-probabilities; terms with ``p_v = 0`` contribute 0).  Returns ``[N]`` float64."""
    logp, logq = logp.double(), logq.double()
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1).clamp_min(0.0)


def top1_agreement(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per position, 1.0 where both distributions have the same most likely token."""
    return (logp.argmax(-1) == logq.argmax(-1)).double()


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first position where ``a`` and ``b`` differ; ``min(len)`` if they never do."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def equal_fraction(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions (over ``min(len)``) where ``a[i] == b[i]``."""
    n = min(len(a), len(b))
    return sum(1 for i in range(n) if a[i] == b[i]) / n if n else float("nan")


def bucket_means(values: Sequence[float], edges: Sequence[int]) -> list[float]:
    """Mean of ``values[edges[i]:edges[i+1]]`` for each bucket (``nan`` for an empty bucket)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        part = list(values[lo:hi])
        out.append(sum(part) / len(part) if part else float("nan"))
    return out


def early_late_edges(n: int) -> list[int]:
    """Two buckets over ``n`` positions: early ``[0, n/2)`` and late ``[n/2, n)``."""
    return [0, n // 2, n]


def binned(values: Sequence[float], n_bins: int) -> tuple[list[float], list[float]]:
    """Equal-width position bins: (bin centres, bin means), for plots."""
    n = len(values)
    if n == 0:
        return [], []
    n_bins = max(1, min(n_bins, n))
    edges = [round(i * n / n_bins) for i in range(n_bins + 1)]
    centres = [(lo + hi - 1) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
    return centres, bucket_means(values, edges)
