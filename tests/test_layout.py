import pytest

from sglang_tpla.layout import TPLALayout, TPLALayoutError, check_layout


def test_rank_slices_deepseek_v3_tp8_g2():
    lay = TPLALayout(tp=8, g=2, num_heads=128)
    assert (lay.ranks_per_group, lay.slice_width, lay.heads_per_rank, lay.row_width) == (4, 256, 32, 320)
    s = lay.rank_slice(5)
    assert (s.group, s.head_shard) == (1, 1)
    assert (s.latent_start, s.latent_end, s.head_start, s.head_end) == (256, 512, 32, 64)
    assert lay.group_ranks(1) == [4, 5, 6, 7]


@pytest.mark.parametrize("tp,g,heads", [(1, 1, 8), (2, 1, 8), (2, 2, 8), (4, 2, 64), (8, 8, 128), (8, 4, 16), (4, 4, 2)])
def test_every_head_and_latent_column_is_covered_exactly_once(tp, g, heads):
    lay = TPLALayout(tp=tp, g=g, num_heads=heads)
    seen = {}
    for s in lay.ranks():
        assert s.latent_width == 512 // g and s.num_heads == heads * g // tp
        for h in range(s.head_start, s.head_end):
            for col in range(s.latent_start, s.latent_end, 64):
                seen[(h, col)] = seen.get((h, col), 0) + 1
    assert len(seen) == heads * 8 and set(seen.values()) == {1}


def test_g1_is_plain_head_sharding():
    lay = TPLALayout(tp=4, g=1, num_heads=16)
    assert [(s.head_start, s.head_end, s.latent_start, s.latent_end) for s in lay.ranks()] == [
        (0, 4, 0, 512), (4, 8, 0, 512), (8, 12, 0, 512), (12, 16, 0, 512)
    ]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(tp=4, g=3, num_heads=16), "must divide the TP size tp=4; choose g in [1, 2, 4]"),
        (dict(tp=6, g=3, num_heads=12), "does not divide kv_lora_rank=512"),
        (dict(tp=16, g=16, num_heads=16), "slice width kv_lora_rank/g = 512/16 = 32 is not supported"),
        (dict(tp=8, g=1, num_heads=12), "must split num_heads=12 evenly; choose g in [2, 4, 8]"),
        (dict(tp=0, g=1, num_heads=8), "tp must be a positive integer"),
        (dict(tp=2, g=2, num_heads=8, kv_lora_rank=384), "384/2 = 192 is not supported"),
    ],
)
def test_impossible_layouts_are_refused_with_the_fix(kwargs, needle):
    with pytest.raises(TPLALayoutError) as e:
        check_layout(**kwargs)
    assert needle in str(e.value)


def test_layout_constructor_validates():
    with pytest.raises(TPLALayoutError):
        TPLALayout(tp=2, g=4, num_heads=8)
    with pytest.raises(IndexError):
        TPLALayout(tp=2, g=2, num_heads=8).rank_slice(2)
