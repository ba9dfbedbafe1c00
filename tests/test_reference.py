"""The fp32 reference attention: MLA vs TPLA, paging/strides/raggedness, options, and a 2-process all-reduce."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sglang_tpla import reference as R
from sglang_tpla.layout import TPLALayout

H, NOPE, ROPE, V, HID, LAT = 8, 128, 64, 128, 96, 512
SCALE = 1 / math.sqrt(NOPE + ROPE)


def make_problem(lens, page_size=1, seed=0, shuffle=True):
    """Random queries, weights and a paged [slots, 576] cache holding ragged requests."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lens)
    q_nope = torch.randn(b, H, NOPE, generator=gen)
    q_pe = torch.randn(b, H, ROPE, generator=gen)
    w = R.MLAAttentionWeights(
        torch.randn(H, NOPE, LAT, generator=gen) / math.sqrt(NOPE),
        torch.randn(H, LAT, V, generator=gen) / math.sqrt(LAT),
        torch.randn(HID, H * V, generator=gen) / math.sqrt(H * V),
    )
    pages = [math.ceil(n / page_size) for n in lens]
    total_pages = sum(pages) + 3
    order = torch.randperm(total_pages, generator=gen) if shuffle else torch.arange(total_pages)
    buf = torch.zeros(total_pages * page_size + page_size, LAT + ROPE)  # slot 0.. padding sink at the end
    req_to_token = torch.zeros(b + 2, max(lens + [1]) + 4, dtype=torch.int32)
    req_pool_indices = torch.tensor([b + 1 - i for i in range(b)], dtype=torch.int64)  # non-trivial mapping
    nxt = 0
    for i, n in enumerate(lens):
        for pos in range(n):
            page = int(order[nxt + pos // page_size])
            req_to_token[req_pool_indices[i], pos] = page * page_size + pos % page_size
        nxt += pages[i]
    buf.normal_(generator=gen)
    cache = R.PagedLatentCache(buf[:, :LAT], buf[:, LAT:], req_to_token, req_pool_indices, torch.tensor(lens))
    return q_nope, q_pe, w, cache


def contiguous_copy(cache):
    """The same contexts laid out contiguously, request after request, in fresh dense tensors."""
    ckv, kpe, rows = [], [], []
    start = 0
    for b in range(cache.batch_size):
        c, k = cache.gather(b)
        ckv.append(c)
        kpe.append(k)
        rows.append(torch.arange(start, start + c.shape[0]))
        start += c.shape[0]
    width = max([len(r) for r in rows] + [1])
    r2t = torch.zeros(cache.batch_size, width, dtype=torch.int32)
    for b, r in enumerate(rows):
        r2t[b, : len(r)] = r
    return R.PagedLatentCache(
        torch.cat(ckv).clone(), torch.cat(kpe).clone(), r2t, torch.arange(cache.batch_size), cache.seq_lens.clone()
    )


def naive_tpla(q_nope, q_pe, cache, w, layout, mu=None):
    """float64 loops over requests, groups and heads: the oracle's oracle."""
    out = torch.zeros(q_nope.shape[0], HID, dtype=torch.float64)
    d = layout.slice_width
    for b in range(cache.batch_size):
        ckv, kpe = (t.double() for t in cache.gather(b))
        if ckv.shape[0] == 0:
            continue
        v = torch.zeros(H, V, dtype=torch.float64)
        for j in range(layout.g):
            s = slice(j * d, (j + 1) * d)
            for h in range(H):
                ql = q_nope[b, h].double() @ w.w_kc[h, :, s].double()
                logits = SCALE * ((1 if mu is None else mu[j]) * (ckv[:, s] @ ql) + kpe @ q_pe[b, h].double())
                v[h] += (torch.softmax(logits, 0) @ ckv[:, s]) @ w.w_vc[h, s].double()
        out[b] = v.reshape(-1) @ w.o_proj.double().T
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_g1_equals_exact_mla_bit_for_bit(tp):
    q_nope, q_pe, w, cache = make_problem([5, 1, 17, 9], page_size=4)
    mla = R.mla_decode(q_nope, q_pe, cache, w, SCALE, tp=tp)
    tpla = R.tpla_decode(q_nope, q_pe, cache, w, SCALE, TPLALayout(tp, 1, H))
    assert torch.equal(tpla, mla)
    # the equality above is MLA vs itself when g=1; this one can fail: the float64 loop oracle
    torch.testing.assert_close(mla.double(), naive_tpla(q_nope, q_pe, cache, w, TPLALayout(tp, 1, H)), rtol=1e-5, atol=1e-5)
    ranks = sum(R.tpla_rank_decode(q_nope, q_pe, cache, w, SCALE, TPLALayout(tp, 1, H), r) for r in range(tp))
    torch.testing.assert_close(ranks, mla, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tp,g", [(2, 2), (4, 2), (4, 4), (8, 8)])
def test_tpla_matches_naive_oracle_and_differs_from_mla(tp, g):
    q_nope, q_pe, w, cache = make_problem([7, 12, 3], page_size=2, seed=g)
    lay = TPLALayout(tp, g, H)
    tpla = R.tpla_decode(q_nope, q_pe, cache, w, SCALE, lay)
    torch.testing.assert_close(tpla.double(), naive_tpla(q_nope, q_pe, cache, w, lay), rtol=1e-5, atol=1e-5)
    mla = R.mla_decode(q_nope, q_pe, cache, w, SCALE)
    rel = ((tpla - mla).norm() / mla.norm()).item()
    print(f"TPLA tp={tp} g={g} vs exact MLA: relative L2 difference {rel:.3e}")
    assert rel > 1e-3  # an approximation, and the test says how large


@pytest.mark.parametrize("page_size", [1, 4])
def test_paged_strided_ragged_equal_contiguous(page_size):
    lens = [0, 1, 13, 6, 1, 30]
    q_nope, q_pe, w, cache = make_problem(lens, page_size=page_size, seed=3)
    assert not cache.ckv.is_contiguous()  # views of one [slots, 576] row buffer
    dense = contiguous_copy(cache)
    lay = TPLALayout(2, 2, H)
    for fn in (lambda c: R.mla_decode(q_nope, q_pe, c, w, SCALE), lambda c: R.tpla_decode(q_nope, q_pe, c, w, SCALE, lay)):
        paged, contig = fn(cache), fn(dense)
        torch.testing.assert_close(paged, contig, rtol=1e-6, atol=1e-6)
        assert torch.equal(paged[0], torch.zeros(HID))  # an empty context contributes nothing
    # kv_indptr / kv_indices describe exactly the same tokens
    indptr, indices = cache.kv_indptr_indices()
    assert indptr.tolist() == [0, 0, 1, 14, 20, 21, 51]
    assert torch.equal(indices[indptr[2] : indptr[3]], cache.slots(2).int())


def test_slice_only_cache_equals_reading_columns_of_full_cache():
    q_nope, q_pe, w, cache = make_problem([9, 4], seed=5)
    lay = TPLALayout(4, 2, H)
    for r in range(4):
        s = lay.rank_slice(r)
        sliced = R.PagedLatentCache(
            cache.ckv[:, s.latent_start : s.latent_end].clone(), cache.kpe, cache.req_to_token, cache.req_pool_indices, cache.seq_lens
        )
        full = R.tpla_rank_decode(q_nope, q_pe, cache, w, SCALE, lay, r)
        assert torch.equal(R.tpla_rank_decode(q_nope, q_pe, sliced, w, SCALE, lay, r), full)


def test_mu_scales_only_the_latent_logit():
    q_nope, q_pe, w, cache = make_problem([11], seed=6)
    lay = TPLALayout(2, 2, H)
    zero_pe = R.PagedLatentCache(cache.ckv, torch.zeros_like(cache.kpe), cache.req_to_token, cache.req_pool_indices, cache.seq_lens)
    # without a RoPE term, mu=2 is the same as doubling the softmax scale
    torch.testing.assert_close(
        R.tpla_decode(q_nope, q_pe, zero_pe, w, SCALE, lay, mu=[2.0, 2.0]),
        R.tpla_decode(q_nope, q_pe, zero_pe, w, 2 * SCALE, lay),
    )
    # with only a RoPE term, mu has no effect
    zero_q = torch.zeros_like(q_nope)
    assert torch.equal(
        R.tpla_decode(zero_q, q_pe, cache, w, SCALE, lay, mu=[3.0, 0.5]), R.tpla_decode(zero_q, q_pe, cache, w, SCALE, lay)
    )
    torch.testing.assert_close(
        R.tpla_decode(q_nope, q_pe, cache, w, SCALE, lay, mu=[3.0, 0.5]).double(),
        naive_tpla(q_nope, q_pe, cache, w, lay, mu=[3.0, 0.5]),
        rtol=1e-5,
        atol=1e-5,
    )
    assert R.logit_scales("inv_p", 2, [0.8, 0.2]) == pytest.approx([1.25, 5.0])
    assert R.logit_scales("one", 2) is None
    with pytest.raises(ValueError, match="energy fractions"):
        R.logit_scales("inv_p", 2)


def test_local_rmsnorm_with_true_fractions_equals_exact():
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(6, 512, generator=gen) * torch.linspace(2, 0.2, 512)
    exact = R.normalize_latent(c, eps=0.0)
    for t in range(6):  # per token, the true shard energy fractions make the local norm exact
        p = c[t].double().view(4, 128).pow(2).sum(1) / c[t].double().pow(2).sum()
        torch.testing.assert_close(R.normalize_latent(c[t : t + 1], 0.0, "local", 4, p), exact[t : t + 1], rtol=1e-5, atol=1e-6)
    local = R.normalize_latent(c, 0.0, "local", 4)  # with p = 1/g: unit RMS in every slice
    torch.testing.assert_close(local.view(6, 4, 128).pow(2).mean(-1), torch.ones(6, 4), rtol=1e-5, atol=1e-5)
    assert (local - exact).abs().max() > 0.1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, tp, g, result_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    q_nope, q_pe, w, cache = make_problem([5, 19, 1], page_size=2, seed=9)
    lay = TPLALayout(tp, g, H)
    part = torch.zeros(3, HID)
    for r in range(rank, tp, world):  # each process plays tp/world ranks
        part += R.tpla_rank_decode(q_nope, q_pe, cache, w, SCALE, lay, r)
    dist.all_reduce(part)
    if rank == 0:
        torch.save(part, result_path)
    dist.destroy_process_group()


@pytest.mark.parametrize("tp,g", [(2, 2), (2, 1), (4, 2)])
def test_all_reduce_in_two_processes_equals_single_process(tmp_path, tp, g):
    out = tmp_path / "out.pt"
    mp.start_processes(_rank_worker, args=(2, _free_port(), tp, g, str(out)), nprocs=2, join=True, start_method="spawn")
    q_nope, q_pe, w, cache = make_problem([5, 19, 1], page_size=2, seed=9)
    single = R.tpla_decode(q_nope, q_pe, cache, w, SCALE, TPLALayout(tp, g, H))
    torch.testing.assert_close(torch.load(out), single, rtol=1e-5, atol=1e-6)
