"""What a TPLA decode rank receives from an exact-MLA prefill rank in PD disaggregation.

The prefill node keeps full MLA rows ``[latent (R) | RoPE (rope)]`` per token; TPLA decode
rank ``r`` of a ``d``-way attention TP with ``g`` latent groups keeps only
``[latent[lo:hi] | RoPE]`` with ``[lo, hi)`` the columns of its group (``hi - lo = R / g``;
group-major ranks, :mod:`sglang_tpla.layout`).  The decode rank announces its row width in
its registration (``dst_kv_item_len = page_size * (R/g + rope) * elem``); the prefill rank
infers ``g`` and the slice from it and refuses what it cannot serve.

Rows are packed contiguously (in the decode pool's row layout) before they are sent, so a
transfer moves one contiguous run of destination pages per layer instead of one small
copy per token and per column range.

Pure PyTorch: no sglang.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from .layout import group_of_rank


class PDLayoutError(ValueError):
    """A prefill/decode pairing the sliced transfer cannot serve; the message names the fix."""


@dataclass(frozen=True)
class PeerSlice:
    """The columns of a full MLA row that one decode rank keeps."""

    kv_lora_rank: int
    rope: int
    g: int
    group: int

    @property
    def latent_start(self) -> int:
        return self.group * (self.kv_lora_rank // self.g)

    @property
    def latent_end(self) -> int:
        return (self.group + 1) * (self.kv_lora_rank // self.g)

    @property
    def row_width(self) -> int:
        return self.kv_lora_rank // self.g + self.rope


def peer_slice(
    *,
    src_item_len: int,
    dst_item_len: int,
    page_size: int,
    elem_size: int,
    kv_lora_rank: int,
    rope: int,
    dst_attn_tp_size: int,
    dst_tp_rank: int,
) -> PeerSlice | None:
    """The slice a decode rank expects, ``None`` for a plain MLA peer (full rows).

    Item lengths are per page, in bytes, as SGLang registers them.
    """
    unit = page_size * elem_size
    full = kv_lora_rank + rope
    if src_item_len != unit * full:
        raise PDLayoutError(
            f"prefill KV item length {src_item_len} B is not one full MLA row per token "
            f"({page_size} x ({kv_lora_rank}+{rope}) x {elem_size} B); only plain MLA prefill pools can feed TPLA decode"
        )
    if dst_item_len == src_item_len:
        return None
    if dst_item_len <= 0 or dst_item_len % unit:
        raise PDLayoutError(
            f"decode KV item length {dst_item_len} B is not a whole number of {elem_size}-byte elements per token "
            f"at page size {page_size}: check that both nodes use the same --page-size and --kv-cache-dtype"
        )
    width = dst_item_len // unit - rope
    if width <= 0 or width > kv_lora_rank or kv_lora_rank % width:
        raise PDLayoutError(
            f"decode rows are {dst_item_len // unit} wide, which is not a latent slice R/g + {rope} of R={kv_lora_rank}: "
            "the decode node is neither plain MLA nor TPLA for this model"
        )
    g = kv_lora_rank // width
    if dst_attn_tp_size % g:
        raise PDLayoutError(f"decode attention TP {dst_attn_tp_size} is not a multiple of its latent groups g={g}")
    return PeerSlice(kv_lora_rank, rope, g, group_of_rank(dst_attn_tp_size, g, dst_tp_rank))


def contiguous_runs(dst_pages: Sequence[int] | np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive destination pages: ``(position, first_page, count)``."""
    pages = np.asarray(dst_pages, dtype=np.int64)
    if pages.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [pages.size]])
    return [(int(s), int(pages[s]), int(e - s)) for s, e in zip(starts, ends)]


def pack_slice(src: torch.Tensor, pages: torch.Tensor, sl: PeerSlice, page_size: int, out: torch.Tensor) -> torch.Tensor:
    """Gather ``[latent[lo:hi] | RoPE]`` of ``pages`` from a full-row pool buffer into ``out``.

    ``src``: one layer's pool buffer (any shape whose last dim is ``R + rope``);
    ``out``: ``[len(pages), page_size, R/g + rope]`` of the same dtype (the staging view).
    """
    full = sl.kv_lora_rank + sl.rope
    rows = src.reshape(-1, page_size, full)
    w = sl.latent_end - sl.latent_start
    out[..., :w] = rows[pages, :, sl.latent_start : sl.latent_end]
    out[..., w:] = rows[pages, :, sl.kv_lora_rank :]
    return out


def page_digest(layer: int, page: int, data: torch.Tensor) -> int:
    """64-bit digest of one page of one layer (bytes as stored) at its destination page index."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{layer}:{page}:".encode())
    h.update(data.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def xor_digest(items: Iterable[int]) -> int:
    """Order-independent combination of page digests (chunks may arrive in any grouping)."""
    acc = 0
    for d in items:
        acc ^= d
    return acc
