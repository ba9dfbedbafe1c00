"""Collectives of TPLA's q and o projections: activations move, SGLang's head-sharded weights stay.

SGLang shards ``q_b_proj`` (``q_proj``) and ``o_proj`` by heads over the attention TP group: TP
rank ``k`` holds heads ``[k*H/TP, (k+1)*H/TP)`` (its *stock shard*).  A TPLA rank attends
``H*g/TP`` heads over its ``512/g`` latent slice (:mod:`sglang_tpla.layout`).  With the layout's
group-major numbering, the ``g`` ranks ``{j*TP/g + s : j < g}`` (one per latent group, the same
head shard ``s``) are this rank's *head peers*: together they hold ``g`` stock shards, and each of
them attends exactly those ``g*H/TP`` heads over its own slice.  So per decode layer:

* q: every rank runs SGLang's own ``q_b_proj`` for its stock heads (its quant method unchanged:
  block FP8, bf16, ...), then the peers **all-gather** it -> the ``g*H/TP`` heads this rank
  attends (peer order: latent group 0's stock shard first).
* o: after attention and its W_UV rows each rank holds ``[T, g*H/TP, v]`` partial over its
  slice; a **reduce-scatter** over the peers sums the ``g`` slices and leaves each rank the
  heads of its own stock shard, which SGLang's own ``o_proj`` (row-parallel, its quant method)
  projects; SGLang's usual all-reduce then sums the ranks, as for stock MLA.

This is what SGLang's decode context parallelism does with its ``dcp_group`` (all-gather q,
reduce-scatter the output, ``sglang/srt/layers/dcp/comm.py``); no q or o weight is copied.
For ``g == TP`` the peers are the whole attention TP group; for ``g == 1`` a rank is its own
peer and nothing moves.  For ``1 < g < TP`` a rank's heads are its peers' stock shards (e.g.
TP=4, g=2: rank 0 attends stock shards 0 and 2), not the contiguous ``head_start..head_end`` of
:meth:`sglang_tpla.layout.TPLALayout.rank_slice`; the sum over heads and groups (the model's
output) is the same.

Group construction (:func:`head_peers`) is collective: every rank of the world calls it once
(TPLA builds its weights in ``post_load_weights``, on every rank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger("sglang_tpla")

GROUP_NAME = "tpla_head_peers"


def peer_positions(tp: int, g: int, rank: int) -> list[int]:
    """Attention-TP ranks sharing ``rank``'s head set, in latent-group order (pure)."""
    if g <= 0 or tp % g or not 0 <= rank < tp:
        raise ValueError(f"rank {rank} / TP {tp} / g {g}: need 0 <= rank < TP and g dividing TP")
    per = tp // g
    return [j * per + rank % per for j in range(g)]


def peer_groups(tp: int, g: int) -> list[list[int]]:
    """Every head-peer group of one attention TP group of size ``tp`` (positions), each in latent-group order."""
    return [peer_positions(tp, g, s) for s in range(tp // g)]


def peer_heads(tp: int, g: int, rank: int, num_heads: int) -> list[int]:
    """The global head ids ``rank`` attends, in the order the all-gather delivers them (peer order)."""
    if num_heads % tp:
        raise ValueError(f"num_heads={num_heads} is not divisible by TP {tp}")
    h = num_heads // tp
    return [p * h + i for p in peer_positions(tp, g, rank) for i in range(h)]


@dataclass
class HeadPeers:
    """This rank's head peers: ``coordinator`` is SGLang's ``GroupCoordinator`` over them (None when ``g == 1``)."""

    g: int
    index: int  # this rank's position among its peers (= its latent group)
    coordinator: object = None

    def all_gather_q(self, q: torch.Tensor) -> torch.Tensor:
        """``[T, h*(nope+rope)]`` of this rank's stock heads -> ``[T, g*h*(nope+rope)]`` of its peers' heads."""
        if self.coordinator is None or self.g == 1:
            return q
        return self.coordinator.all_gather(q.contiguous(), dim=-1)

    def reduce_scatter_heads(self, v: torch.Tensor) -> torch.Tensor:
        """``[T, g*h, d]`` partial over this rank's latent slice -> ``[T, h, d]``: its stock heads summed over the g slices."""
        if self.coordinator is None or self.g == 1:
            return v
        if v.device.type == "cpu":  # SGLang's reduce-scatter custom op has no CPU kernel: torch's (gloo) directly
            import torch.distributed as dist

            x = v.movedim(1, 0).contiguous()
            out = x.new_empty((x.shape[0] // self.g,) + tuple(x.shape[1:]))
            dist.reduce_scatter_tensor(out, x, group=self.coordinator.device_group)
            return out.movedim(0, 1)
        return self.coordinator.reduce_scatter_along_dim(v, dim=1)


_cache: dict[tuple[int, int, int], HeadPeers] = {}


def head_peers(tp: int, g: int, rank: int) -> HeadPeers:
    """This process's :class:`HeadPeers` (built once; collective on first use when ``1 < g < tp``)."""
    key = (tp, g, rank)
    if key in _cache:
        return _cache[key]
    index = peer_positions(tp, g, rank).index(rank)
    if g == 1:
        peers = HeadPeers(1, 0, None)
    else:
        from sglang.srt.runtime_context import get_parallel

        tp_group = get_parallel().attn_tp_group
        if tp_group.world_size != tp or tp_group.rank_in_group != rank:
            raise RuntimeError(f"TPLA: attention TP group has {tp_group.world_size} ranks (rank {tp_group.rank_in_group}), layout says TP {tp} rank {rank}")
        coordinator = tp_group if g == tp else _subgroup(tp, g)
        if coordinator.rank_in_group != index:
            raise RuntimeError(f"TPLA: head-peer group position {coordinator.rank_in_group}, expected {index}")
        peers = HeadPeers(g, index, coordinator)
    _cache[key] = peers
    logger.info("TPLA: head peers of attn TP rank %d: %s (g=%d)", rank, peer_positions(tp, g, rank), g)
    return peers


def _subgroup(tp: int, g: int):
    """A GroupCoordinator over this rank's head peers: one group per head shard of every attention
    TP group of the world (each rank takes part in creating all of them, as torch requires)."""
    import torch.distributed as dist
    from sglang.srt.distributed.parallel_state import init_model_parallel_group
    from sglang.srt.runtime_context import get_parallel

    world = get_parallel().world_group
    mine = list(get_parallel().attn_tp_group.ranks)
    all_tp = world.all_gather_object(mine) if world.world_size > len(mine) else [mine]
    tp_groups = sorted({tuple(r) for r in all_tp})
    group_ranks = [[tg[p] for p in positions] for tg in tp_groups for positions in peer_groups(tp, g)]
    backend = dist.get_backend(world.device_group)
    return init_model_parallel_group(group_ranks, world.local_rank, backend, group_name=GROUP_NAME)


def decode_step_costs(hidden: int, q_lora: int, heads: int, tp: int, g: int, nope: int = 128, rope: int = 64,
                      v: int = 128, layers: int = 61, weight_bytes: float = 1.0, act_bytes: int = 2) -> dict:
    """Per-rank, per-decode-step costs of the two ways to give a TPLA rank the q/o of its ``g*H/TP`` heads.

    ``a``: re-shard ``q_b_proj``/``o_proj`` to the rank's heads (weights read per step and held in
    memory grow by ``(g-1)`` stock shards), no extra collective.  ``b`` (this module): SGLang's
    stock shards, plus an all-gather of q and a reduce-scatter of the attention output over the
    ``g`` peers.  Bytes per decoded token for the collectives (``act_bytes`` per element).
    """
    h = heads // tp
    q_rows, o_cols = h * (nope + rope), h * v
    stock = (q_rows * q_lora + hidden * o_cols) * weight_bytes * layers
    return {
        "stock_qo_weight_bytes": stock,
        "a_extra_weight_bytes": (g - 1) * stock,  # read every step and held
        "b_collectives_per_step": 2 * layers if g > 1 else 0,
        "b_bytes_per_token_received": ((g - 1) * q_rows + (g - 1) * o_cols) * act_bytes * layers,
    }
