"""Rank layout of TPLA: which latent slice and which heads each TP rank owns.

TP size ``tp`` is split into ``g`` latent groups (paper §4.4).  Group ``j`` owns the
latent columns ``[j*D, (j+1)*D)`` with ``D = kv_lora_rank // g``; the ``tp // g`` ranks of
a group share that slice and split the attention heads among themselves.  Ranks are
numbered group-major: rank ``r`` is in group ``r // (tp // g)`` and owns head shard
``r % (tp // g)`` of its group.  ``g == 1`` is plain head-sharded MLA; ``g == tp`` gives
every rank all heads and its own slice.

Pure Python: no torch, no sglang.
"""

from __future__ import annotations

from dataclasses import dataclass

# Per-rank latent widths the decode kernels are built for (kernels/: D_CKV constexpr).
SUPPORTED_SLICE_WIDTHS = (512, 256, 128, 64)


class TPLALayoutError(ValueError):
    """An impossible TP / latent-group / head combination; the message says what to change."""


@dataclass(frozen=True)
class RankSlice:
    rank: int
    group: int  # latent group id j
    head_shard: int  # index of this rank inside its group
    latent_start: int
    latent_end: int
    head_start: int
    head_end: int

    @property
    def latent_width(self) -> int:
        return self.latent_end - self.latent_start

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start


@dataclass(frozen=True)
class TPLALayout:
    tp: int
    g: int
    num_heads: int
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64

    def __post_init__(self):
        check_layout(self.tp, self.g, self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim)

    @property
    def ranks_per_group(self) -> int:
        return self.tp // self.g

    @property
    def slice_width(self) -> int:
        return self.kv_lora_rank // self.g

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.ranks_per_group

    @property
    def row_width(self) -> int:
        """Width of one rank's KV pool row: its latent slice plus the replicated RoPE key."""
        return self.slice_width + self.qk_rope_head_dim

    @property
    def mla_row_width(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    def group_of(self, rank: int) -> int:
        self._check_rank(rank)
        return group_of_rank(self.tp, self.g, rank)

    def latent_range(self, group: int) -> tuple[int, int]:
        if not 0 <= group < self.g:
            raise IndexError(f"latent group {group} out of range for g={self.g}")
        return group * self.slice_width, (group + 1) * self.slice_width

    def rank_slice(self, rank: int) -> RankSlice:
        self._check_rank(rank)
        group, shard = divmod(rank, self.ranks_per_group)
        lo, hi = self.latent_range(group)
        h = self.heads_per_rank
        return RankSlice(rank, group, shard, lo, hi, shard * h, (shard + 1) * h)

    def ranks(self) -> list[RankSlice]:
        return [self.rank_slice(r) for r in range(self.tp)]

    def group_ranks(self, group: int) -> list[int]:
        self.latent_range(group)
        return list(range(group * self.ranks_per_group, (group + 1) * self.ranks_per_group))

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.tp:
            raise IndexError(f"rank {rank} out of range for tp={self.tp}")


def group_of_rank(tp: int, g: int, rank: int) -> int:
    """Latent group of attention-TP rank ``rank`` (group-major: ranks ``[j*tp/g, (j+1)*tp/g)`` form group j)."""
    if not 0 <= rank < tp or g <= 0 or tp % g:
        raise TPLALayoutError(f"rank {rank} / TP {tp} / g {g}: need 0 <= rank < TP and g dividing TP")
    return rank // (tp // g)


def check_layout(
    tp: int,
    g: int,
    num_heads: int,
    kv_lora_rank: int = 512,
    qk_rope_head_dim: int = 64,
) -> None:
    """Refuse impossible combinations with a message that names the fix (fail closed)."""
    for name, value in (("tp", tp), ("g", g), ("num_heads", num_heads), ("kv_lora_rank", kv_lora_rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TPLALayoutError(f"TPLA: {name} must be a positive integer, got {value!r}")
    if not isinstance(qk_rope_head_dim, int) or qk_rope_head_dim < 0:
        raise TPLALayoutError(f"TPLA: qk_rope_head_dim must be a non-negative integer, got {qk_rope_head_dim!r}")
    divisors = [d for d in range(1, tp + 1) if tp % d == 0]
    if tp % g:
        raise TPLALayoutError(
            f"TPLA: latent group count g={g} must divide the TP size tp={tp}; "
            f"choose g in {divisors} (g=tp gives every rank its own latent slice)."
        )
    if kv_lora_rank % g:
        raise TPLALayoutError(
            f"TPLA: g={g} does not divide kv_lora_rank={kv_lora_rank}; choose g so that kv_lora_rank/g is one of "
            f"{list(SUPPORTED_SLICE_WIDTHS)}."
        )
    width = kv_lora_rank // g
    if width not in SUPPORTED_SLICE_WIDTHS:
        ok = [kv_lora_rank // w for w in SUPPORTED_SLICE_WIDTHS if kv_lora_rank % w == 0 and kv_lora_rank // w in divisors]
        raise TPLALayoutError(
            f"TPLA: per-rank latent slice width kv_lora_rank/g = {kv_lora_rank}/{g} = {width} is not supported by the "
            f"decode kernels (supported widths: {list(SUPPORTED_SLICE_WIDTHS)}); use g in {ok or [1]}."
        )
    per_group = tp // g
    if num_heads % per_group:
        ok = [d for d in divisors if num_heads % (tp // d) == 0 and kv_lora_rank % d == 0
              and kv_lora_rank // d in SUPPORTED_SLICE_WIDTHS]
        raise TPLALayoutError(
            f"TPLA: the {per_group} ranks of each latent group (tp/g = {tp}/{g}) must split num_heads={num_heads} "
            f"evenly; choose g in {ok} or a TP size whose tp/g divides {num_heads}."
        )
