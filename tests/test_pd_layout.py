"""Latent-slice PD transfer math: which columns each decode rank gets, packing, runs, digests."""

import pytest
import torch

from sglang_tpla.layout import TPLALayout
from sglang_tpla.pd_layout import PDLayoutError, contiguous_runs, pack_slice, page_digest, peer_slice, xor_digest

R, ROPE = 512, 64


def _slice(d_tp, g, rank, page=1, elem=2):
    return peer_slice(
        src_item_len=page * (R + ROPE) * elem, dst_item_len=page * (R // g + ROPE) * elem, page_size=page,
        elem_size=elem, kv_lora_rank=R, rope=ROPE, dst_attn_tp_size=d_tp, dst_tp_rank=rank,
    )


@pytest.mark.parametrize("d_tp,g", [(2, 2), (4, 2), (4, 4), (8, 2), (8, 4)])
def test_peer_slice_matches_decode_layout(d_tp, g):
    layout = TPLALayout(d_tp, g, num_heads=16, kv_lora_rank=R, qk_rope_head_dim=ROPE)
    for rank in range(d_tp):
        sl, rs = _slice(d_tp, g, rank, page=4), layout.rank_slice(rank)
        assert (sl.g, sl.group, sl.latent_start, sl.latent_end) == (g, rs.group, rs.latent_start, rs.latent_end)
        assert sl.row_width == layout.row_width


def test_plain_mla_peer_gets_no_slice():
    assert peer_slice(src_item_len=1152, dst_item_len=1152, page_size=1, elem_size=2, kv_lora_rank=R, rope=ROPE,
                      dst_attn_tp_size=2, dst_tp_rank=1) is None


@pytest.mark.parametrize(
    "dst_row,d_tp,match",
    [(64 + 100, 2, "not a latent slice"), (64, 2, "not a latent slice"), (128 + 64, 2, "not a multiple"),
     (600, 2, "not a latent slice")],
)
def test_unservable_peers_are_refused(dst_row, d_tp, match):
    with pytest.raises(PDLayoutError, match=match):
        peer_slice(src_item_len=576 * 2, dst_item_len=dst_row * 2, page_size=1, elem_size=2, kv_lora_rank=R,
                   rope=ROPE, dst_attn_tp_size=d_tp, dst_tp_rank=0)


def test_prefill_must_hold_full_rows_and_same_element_size():
    with pytest.raises(PDLayoutError, match="full MLA row"):
        peer_slice(src_item_len=320 * 2, dst_item_len=320 * 2 - 2, page_size=1, elem_size=2, kv_lora_rank=R,
                   rope=ROPE, dst_attn_tp_size=2, dst_tp_rank=0)
    with pytest.raises(PDLayoutError, match="kv-cache-dtype"):
        peer_slice(src_item_len=576 * 2, dst_item_len=321, page_size=1, elem_size=2, kv_lora_rank=R, rope=ROPE,
                   dst_attn_tp_size=2, dst_tp_rank=0)


def test_contiguous_runs():
    assert contiguous_runs([]) == []
    assert contiguous_runs([5, 6, 7, 2, 3, 9]) == [(0, 5, 3), (3, 2, 2), (5, 9, 1)]
    assert contiguous_runs([4]) == [(0, 4, 1)]


@pytest.mark.parametrize("page", [1, 4])
def test_pack_slice_takes_group_columns_and_rope(page):
    g, group = 4, 2
    pool = torch.randn(10 * page, 1, R + ROPE)
    sl = _slice(4, g, rank=group, page=page, elem=4)
    pages = torch.tensor([7, 1, 3])
    out = torch.empty(3, page, sl.row_width)
    pack_slice(pool, pages, sl, page, out)
    rows = pool.reshape(-1, page, R + ROPE)[pages]
    assert torch.equal(out[..., : R // g], rows[..., group * R // g : (group + 1) * R // g])
    assert torch.equal(out[..., R // g :], rows[..., R:])


def test_digest_detects_content_position_and_layer():
    a = torch.arange(8, dtype=torch.float16)
    base = page_digest(0, 3, a)
    assert base == page_digest(0, 3, a.clone())
    assert base != page_digest(1, 3, a) and base != page_digest(0, 4, a)
    b = a.clone()
    b[5] += 1
    assert base != page_digest(0, 3, b)
    assert xor_digest([1, 2, 4]) == xor_digest([4, 1, 2]) == 7
