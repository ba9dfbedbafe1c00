"""Block-FP8 (DeepSeek-V3 format) without a server: the tiny FP8 checkpoint, the CPU platform's
block-FP8 linear, TPLA's fold into dequantized FP8 projections, the head-peer collectives."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sglang_tpla.comm import HeadPeers, decode_step_costs, peer_heads, peer_positions
from sglang_tpla.layout import TPLALayout, TPLALayoutError
from sglang_tpla.tiny_model import (
    FP8_QUANT_CONFIG,
    build_tiny_fp8_model_dir,
    dequantize_block_fp8,
    is_fp8_linear,
    load_model,
    quantize_block_fp8,
    random_state_dict,
    tiny_fp8_config,
)
from sglang_tpla.transforms import fold_layer, make_rotation


# --------------------------------------------------------------------------- the checkpoint


def test_tiny_fp8_checkpoint_is_deepseek_v3_format(tmp_path):
    path = build_tiny_fp8_model_dir(tmp_path / "m", seed=3)
    cfg, raw = load_model(path)
    assert cfg["quantization_config"] == FP8_QUANT_CONFIG == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert cfg["q_lora_rank"] % 128 == 0
    fp8 = {k for k, v in raw.items() if v.dtype == torch.float8_e4m3fn}
    assert fp8 and fp8 == {k for k in raw if is_fp8_linear(k)}
    for k in fp8:
        s = raw[k + "_scale_inv"]
        assert s.dtype == torch.float32 and tuple(s.shape) == tuple(math.ceil(n / 128) for n in raw[k].shape), k
    rest = {k: v for k, v in raw.items() if k not in fp8 and not k.endswith("_scale_inv")}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.0.self_attn.q_a_layernorm.weight"} <= set(rest)
    assert all(v.dtype == torch.bfloat16 for v in rest.values())
    assert tuple(raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape) == (5, 2)  # 576 rows: edge block

    _, deq = load_model(path, dtype=torch.float32)  # dequantized, scales consumed
    assert not any(k.endswith("_scale_inv") for k in deq) and all(v.dtype == torch.float32 for v in deq.values())
    k = "model.layers.1.self_attn.kv_b_proj.weight"
    assert torch.equal(deq[k], dequantize_block_fp8(raw[k], raw[k + "_scale_inv"]))
    orig = random_state_dict(tiny_fp8_config(), seed=3)
    for k in fp8:
        assert (deq[k] - orig[k]).norm() / orig[k].norm() < 0.05, k  # e4m3: ~2^-4 relative per element


def test_quantize_roundtrip_and_edge_blocks():
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 300)[:, None]  # block scales spread over 4 decades
    q, s = quantize_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and tuple(s.shape) == (3, 2)
    d = dequantize_block_fp8(q, s)
    assert ((d - w).abs() <= 2 ** -3 * w.abs() + 1e-6 * s.max()).float().mean() > 0.99
    with pytest.raises(ValueError, match="expected"):
        dequantize_block_fp8(q, s[:2])


# --------------------------------------------------------------------------- CPU platform linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_block_fp8_linear_is_dequantize_then_matmul(dtype):
    from sglang_tpla.patches.cpu_platform import block_fp8_linear_cpu

    w, b = torch.randn(384, 256), torch.randn(384)
    q, s = quantize_block_fp8(w)
    x = torch.randn(2, 5, 256).to(dtype)
    got = block_fp8_linear_cpu(input=x, weight=q, block_size=[128, 128], weight_scale=s, input_scale=None, bias=b.to(dtype))
    want = F.linear(x, dequantize_block_fp8(q, s).to(dtype), b.to(dtype))
    assert got.dtype == dtype and got.shape == (2, 5, 384) and torch.equal(got, want)
    # pre-quantized activations (fp8 + per-token 1x128 group scales): dequantized, bf16 out
    xq, xs = quantize_block_fp8(x.float().reshape(10, 256), (1, 128))
    got = block_fp8_linear_cpu(xq, q, [128, 128], s, input_scale=xs)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(dequantize_block_fp8(xq, xs, (1, 128)), dequantize_block_fp8(q, s)), rtol=2e-2, atol=5e-2)


def test_cpu_platform_fp8_hooks(monkeypatch):
    import pkgutil

    from sglang_tpla.patches import cpu_platform as cp

    for t in (cp.FP8_DISPATCH_TARGET, cp.FP8_TENSOR_QUANT_TARGET, cp.FP8_DTYPES_TARGET):
        assert t in cp.HOOK_TARGETS
        mod, _, attr = t.rpartition(".")
        assert hasattr(pkgutil.resolve_name(mod), attr), t
    assert cp._dispatch_block_fp8_linear(None, weight_block_size=[128, 128]) is cp.block_fp8_linear_cpu
    assert cp._fp8_act_dtypes([torch.bfloat16, torch.half], None) == [torch.bfloat16, torch.half, torch.float32]
    q, s = quantize_block_fp8(torch.randn(256, 128))
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)  # SGLang's loader runs under set_default_torch_dtype(model dtype)
        w, scale = cp._dequant_kv_b(q, s, [128, 128])
    finally:
        torch.set_default_dtype(prev)
    assert scale is None and w.dtype == torch.float32 and torch.equal(w, dequantize_block_fp8(q, s))


def test_weight_counting_free_memory(monkeypatch):
    """SGLANG_TPLA_CPU_MEM_COUNT_WEIGHTS: the fixed budget minus the loaded model's tensor bytes."""
    import weakref

    from sglang_tpla.patches import cpu_platform as cp

    model = torch.nn.Linear(256, 128)  # 128*256*4 + 128*4 bytes
    monkeypatch.setenv(cp.MEM_ENV, "1")
    monkeypatch.setattr(cp, "_model_ref", weakref.ref(model))
    monkeypatch.delenv(cp.COUNT_WEIGHTS_ENV, raising=False)
    assert cp._fixed_free_memory(lambda: 0) == 1 << 30  # default: weights not counted (old behaviour)
    monkeypatch.setenv(cp.COUNT_WEIGHTS_ENV, "1")
    assert cp._fixed_free_memory(lambda: 0) == (1 << 30) - (128 * 256 + 128) * 4
    monkeypatch.delenv(cp.MEM_ENV)
    assert cp._fixed_free_memory(lambda: 123) == 123


# --------------------------------------------------------------------------- head peers


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("heads", [8, 16, 128])
def test_head_peers_give_each_latent_group_every_head_once(tp, heads):
    for g in (1, 2, 4, 8):
        try:
            lay = TPLALayout(tp=tp, g=g, num_heads=heads)
        except TPLALayoutError:
            continue
        for j in range(g):
            got = sorted(h for r in lay.group_ranks(j) for h in peer_heads(tp, g, r, heads))
            assert got == list(range(heads)), (tp, g, j)
        for r in range(tp):
            peers = peer_positions(tp, g, r)
            assert len(peer_heads(tp, g, r, heads)) == lay.heads_per_rank
            assert [lay.group_of(p) for p in peers] == list(range(g)) and r in peers
            assert len({p % (tp // g) for p in peers}) == 1  # one head shard
            # this rank's own SGLang shard sits at its latent group's position of the gathered heads
            h = heads // tp
            assert peer_heads(tp, g, r, heads)[lay.group_of(r) * h : (lay.group_of(r) + 1) * h] == list(range(r * h, (r + 1) * h))


class _FakeGroup:
    """A GroupCoordinator stand-in for one rank that knows every peer's tensor (the collective's result)."""

    def __init__(self, contributions, index):
        self.contributions, self.rank_in_group = contributions, index

    def all_gather(self, x, dim=-1):
        assert torch.equal(x, self.contributions[self.rank_in_group])
        return torch.cat(self.contributions, dim=dim)

    @property
    def device_group(self):  # CPU tensors take torch.distributed.reduce_scatter_tensor (patched in the test)
        return self

    def reduce_scatter_tensor(self, out, x):  # heads moved to dim 0 by HeadPeers
        mine = self.contributions[self.rank_in_group].movedim(1, 0)
        assert torch.equal(x, mine)
        out.copy_(sum(c.movedim(1, 0) for c in self.contributions).chunk(len(self.contributions), 0)[self.rank_in_group])


@pytest.mark.parametrize("tp,g", [(2, 2), (4, 2), (4, 4), (8, 2), (8, 4)])
def test_moving_activations_equals_resharded_weights(tp, g, monkeypatch):
    """Option (b) (stock shards + all-gather q + reduce-scatter o) computes what re-sharded q/o
    weights (option (a), TPLA's former copies) compute, for every rank layout."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "reduce_scatter_tensor", lambda out, x, group: group.reduce_scatter_tensor(out, x))
    torch.manual_seed(0)
    H, qk, v, ql, hid, T = 16, 6, 4, 10, 12, 3
    wq, wo, x = torch.randn(H * qk, ql, dtype=torch.float64), torch.randn(hid, H * v, dtype=torch.float64), torch.randn(T, ql, dtype=torch.float64)
    h = H // tp
    stock_q = [x @ wq[r * h * qk : (r + 1) * h * qk].T for r in range(tp)]
    partial = {r: torch.randn(T, g * h, v, dtype=torch.float64) for r in range(tp)}  # each rank's W_UV output over its slice
    total_b = total_a = 0
    for r in range(tp):
        peers = peer_positions(tp, g, r)
        heads = peer_heads(tp, g, r, H)
        idx = peers.index(r)
        q = HeadPeers(g, idx, _FakeGroup([stock_q[p] for p in peers], idx)).all_gather_q(stock_q[r])
        rows = torch.cat([wq[hh * qk : (hh + 1) * qk] for hh in heads])
        torch.testing.assert_close(q, x @ rows.T)  # (a): q_b_proj rows of this rank's heads
        mine = HeadPeers(g, idx, _FakeGroup([partial[p] for p in peers], idx)).reduce_scatter_heads(partial[r])
        total_b = total_b + mine.flatten(1, 2) @ wo[:, r * h * v : (r + 1) * h * v].T  # SGLang's o_proj shard
        cols = torch.cat([wo[:, hh * v : (hh + 1) * v] for hh in heads], dim=1)
        total_a = total_a + partial[r].flatten(1, 2) @ cols.T
    torch.testing.assert_close(total_b, total_a)


def _spawned_reduce_scatter(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        v = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3) * (rank + 1)
        got = HeadPeers(2, rank, SimpleNamespace(device_group=dist.group.WORLD)).reduce_scatter_heads(v)
        want = (torch.arange(24, dtype=torch.float32).reshape(2, 4, 3) * 3)[:, rank * 2 : (rank + 1) * 2]
        out.put((rank, torch.equal(got, want) and got.shape == (2, 2, 3)))
    finally:
        dist.destroy_process_group()


def test_cpu_reduce_scatter_over_gloo():
    """The CPU branch (torch.distributed over gloo: SGLang's reduce-scatter op has no CPU kernel)."""
    import torch.multiprocessing as mp

    from sglang_tpla.serving import free_port

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_spawned_reduce_scatter, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert res == {0: True, 1: True}


def test_decode_step_costs_deepseek_v3():
    c = decode_step_costs(hidden=7168, q_lora=1536, heads=128, tp=8, g=2)
    assert c["stock_qo_weight_bytes"] == (16 * 192 * 1536 + 7168 * 16 * 128) * 61
    assert c["a_extra_weight_bytes"] == c["stock_qo_weight_bytes"] and c["b_collectives_per_step"] == 122
    assert c["b_bytes_per_token_received"] == (16 * 192 + 16 * 128) * 2 * 61


# --------------------------------------------------------------------------- TPLA fold into FP8 projections


class _Lin(torch.nn.Module):
    """An SGLang linear as post_load_weights sees it: raw FP8 weight + block scales, Fp8LinearMethod-like."""

    def __init__(self, weight, scale=None, block=(128, 128), prefix=""):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        if scale is not None:
            self.weight_scale_inv = torch.nn.Parameter(scale, requires_grad=False)
            self.quant_method = SimpleNamespace(weight_block_size=list(block), quant_config=SimpleNamespace(get_name=lambda: "fp8"))
        self.prefix = prefix


def _attn(seed=0, ql=256, hid=256, heads=4, kv_b_fp8=True, a_fp8=True):
    torch.manual_seed(seed)
    r, rope, nope, v = 512, 64, 128, 128
    a = torch.randn(ql + r + rope, hid) / 16
    b = torch.randn(heads * (nope + v), r) / 16
    m = torch.nn.Module()
    m.fused_qkv_a_proj_with_mqa = _Lin(*quantize_block_fp8(a), prefix="model.layers.0.self_attn.fused_qkv_a_proj_with_mqa") if a_fp8 else _Lin(a)
    m.kv_b_proj = _Lin(*quantize_block_fp8(b)) if kv_b_fp8 else _Lin(b)
    m.kv_a_layernorm = torch.nn.Module()
    m.kv_a_layernorm.weight = torch.nn.Parameter(0.5 + torch.rand(r), requires_grad=False)
    for k, val in dict(q_lora_rank=ql, kv_lora_rank=r, qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=v, layer_id=0).items():
        setattr(m, k, val)
    return m


def test_fold_dequantizes_only_kv_a_and_kv_b_and_frees_the_fp8_tensors():
    from sglang_tpla.patches.weights import _fold, _kv_b_heads, _latent_rows, check_foldable, resident_weight_bytes

    attn = _attn()
    fused, kvb = attn.fused_qkv_a_proj_with_mqa, attn.kv_b_proj
    a_q, a_s = fused.weight.data.clone(), fused.weight_scale_inv.data.clone()
    b_q, b_s = kvb.weight.data.clone(), kvb.weight_scale_inv.data.clone()
    gain = attn.kv_a_layernorm.weight.data.clone()
    before = resident_weight_bytes(attn)
    from sglang_tpla.calibration import weights_hash

    assert weights_hash([_latent_rows(attn)]) == weights_hash([dequantize_block_fp8(a_q, a_s)[256 : 256 + 512]])
    u = make_rotation("hadamard", 512, seed=1)
    check_foldable(attn, SimpleNamespace(transform="hadamard"))
    added = _fold(attn, u)

    want_a, want_ln, want_b = fold_layer(dequantize_block_fp8(a_q, a_s)[256:], gain, dequantize_block_fp8(b_q, b_s), u)
    assert not hasattr(attn, "fused_qkv_a_proj_with_mqa")
    # q_a_proj: the same FP8 bytes and scale blocks, nothing dequantized
    assert attn.q_a_proj is fused and fused.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(fused.weight.view(torch.uint8), a_q[:256].view(torch.uint8)) and torch.equal(fused.weight_scale_inv, a_s[:2])
    assert fused.weight.untyped_storage().nbytes() == 256 * 256  # its own storage: the fused tensor is released
    assert type(attn.kv_a_proj_with_mqa).__name__ == "ReplicatedLinear" and attn.kv_a_proj_with_mqa.weight.dtype == gain.dtype
    torch.testing.assert_close(attn.kv_a_proj_with_mqa.weight, want_a)
    torch.testing.assert_close(attn.kv_a_layernorm.weight, want_ln)
    assert type(kvb.quant_method).__name__ == "UnquantizedLinearMethod" and "weight_scale_inv" not in kvb._parameters
    torch.testing.assert_close(kvb.weight, want_b)
    assert added == {"kv_a_proj_with_mqa": 576 * 256 * 3, "kv_b_proj": 1024 * 512 * 3}  # fp32 model dtype vs 1-byte fp8
    after = resident_weight_bytes(attn)
    assert after - before == sum(added.values()) - 5 * 2 * 4 - 8 * 4 * 4  # kv_a's 5 and kv_b's 8 x 4 scale blocks dropped
    torch.testing.assert_close(_kv_b_heads(attn), want_b.unflatten(0, (-1, 256)))


def test_fold_into_float_projections_stays_in_place():
    from sglang_tpla.patches.weights import _fold

    attn = _attn(a_fp8=False, kv_b_fp8=False)
    ptr = attn.fused_qkv_a_proj_with_mqa.weight.data_ptr()
    assert _fold(attn, make_rotation("hadamard", 512, seed=1)) == {}
    assert attn.fused_qkv_a_proj_with_mqa.weight.data_ptr() == ptr and not hasattr(attn, "q_a_proj")


def test_foldable_check_names_the_fix():
    from sglang_tpla.patches.weights import TPLAQuantError, check_foldable

    cfg = SimpleNamespace(transform="hadamard")
    attn = _attn()
    attn.kv_b_proj = _Lin(torch.zeros(1024, 512, dtype=torch.int8))  # e.g. w8a8_int8
    with pytest.raises(TPLAQuantError, match="transform 'none'") as e:
        check_foldable(attn, cfg)
    assert "kv_b_proj of layer 0" in str(e.value) and "sglang_tpla.convert" in str(e.value)
    per_tensor = _attn()
    del per_tensor.kv_b_proj.weight_scale_inv  # FP8 without block scales (per-tensor / per-channel)
    with pytest.raises(TPLAQuantError, match="block-FP8"):
        check_foldable(per_tensor, cfg)
    odd = _attn(ql=192)  # q_a / kv_a share a 128-row scale block
    with pytest.raises(TPLAQuantError, match="q_lora_rank 192 is not a multiple"):
        check_foldable(odd, cfg)
