"""Which decode implementation the tpla backend picks, and the FlashInfer argument plumbing (no GPU)."""

import pytest
import torch

from sglang_tpla.kernels.select import choose

H100 = (9, 0)


@pytest.mark.parametrize(
    "device,d,dtype,sm,ver,impl,backend,why",
    [
        ("cpu", 256, "float32", None, None, "torch", None, "plain-PyTorch"),
        ("cuda", 256, "bfloat16", H100, "0.7.2", "flashinfer", "fa3", "MLA fa3"),
        ("cuda", 128, "float16", H100, "0.7.2.post1", "flashinfer", "fa3", "MLA fa3"),
        ("cuda", 256, "bfloat16", (8, 0), "0.7.2", "flashinfer", "fa2", "MLA fa2"),
        ("cuda", 256, "bfloat16", H100, "0.7.1", "triton", None, "silently wrong"),
        ("cuda", 256, "bfloat16", H100, None, "triton", None, "not installed"),
        ("cuda", 64, "bfloat16", H100, "0.7.2", "triton", None, "head_dim_ckv 64"),
        ("cuda", 256, "float32", H100, "0.7.2", "triton", None, "fp16/bf16"),
        ("cuda", 256, "bfloat16", (7, 5), "0.7.2", "triton", None, "SM80+"),
    ],
)
def test_selection(device, d, dtype, sm, ver, impl, backend, why):
    c = choose(device, d, dtype, sm, ver)
    assert (c.impl, c.flashinfer_backend) == (impl, backend)
    assert why in c.reason


def test_forcing():
    assert choose("cuda", 64, "bfloat16", H100, "0.7.2", forced="torch").impl == "torch"
    assert choose("cuda", 256, "bfloat16", H100, "0.7.2", forced="triton").impl == "triton"
    with pytest.raises(ValueError, match="head_dim_ckv 64"):
        choose("cuda", 64, "bfloat16", H100, "0.7.2", forced="flashinfer")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        choose("cpu", 256, "float32", forced="triton")
    with pytest.raises(ValueError, match="choose one of"):
        choose("cuda", 256, "bfloat16", H100, "0.7.2", forced="fast")


class StandInWrapper:
    """Records what FlashInferTPLADecode hands to BatchMLAPagedAttentionWrapper."""

    instances = []

    def __init__(self, workspace, backend, use_cuda_graph=False, **buffers):
        self.backend, self.use_cuda_graph, self.buffers, self.plans, self.runs = backend, use_cuda_graph, buffers, [], []
        StandInWrapper.instances.append(self)

    def plan(self, **kw):
        self.plans.append(kw)

    def run(self, query, kv_cache):
        self.runs.append((query, kv_cache))
        return torch.zeros(query[0].shape)


def test_flashinfer_plumbing_strided_views_host_plan_arrays_and_one_plan_per_step():
    from sglang_tpla.kernels.flashinfer_decode import FlashInferTPLADecode

    d, h = 256, 16
    pool = torch.randn(40, 1, d + 64, dtype=torch.bfloat16)  # the rank's [slots, 1, D + 64] buffer
    fi = FlashInferTPLADecode(torch.empty(8), "fa3", h, d, 64, 0.1, torch.bfloat16, wrapper_cls=StandInWrapper)
    w = StandInWrapper.instances[-1]
    assert w.backend == "fa3" and not w.use_cuda_graph
    with pytest.raises(RuntimeError, match="before plan"):
        fi.run(torch.zeros(2, h, d), torch.zeros(2, h, 64), pool)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    fi.plan(i32([0, 1, 2]), i32([0, 3, 8]), i32([4, 5, 6, 9, 10, 11, 12, 13]), i32([3, 5]))
    (plan,) = w.plans
    meta = plan["metadata"]  # flashinfer's real MLAPlanMetadata.csr (it imports without CUDA)
    qo, indptr, indices, lens = meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.kv_len_arr
    assert all(t.dtype == torch.int32 for t in (qo, indptr, indices, lens))
    assert qo.tolist() == [0, 1, 2] and lens.tolist() == [3, 5] and indptr.tolist() == [0, 3, 8]
    assert (plan["head_dim_ckv"], plan["head_dim_kpe"], plan["page_size"], plan["num_heads"]) == (d, 64, 1, h)
    assert (plan["query_layout"], plan["kv_cache_layout"], plan["causal"]) == ("split", "split", False)
    for _ in range(3):  # three layers reuse the step's plan
        fi.run(torch.zeros(2, h, d, dtype=torch.bfloat16), torch.zeros(2, h, 64, dtype=torch.bfloat16), pool)
    assert len(w.plans) == 1 and len(w.runs) == 3
    ckv, kpe = w.runs[0][1]
    assert ckv.shape == (40, 1, d) and kpe.shape == (40, 1, 64)
    assert ckv.data_ptr() == pool.data_ptr() and kpe.data_ptr() == pool.data_ptr() + d * pool.element_size()  # no copy
    assert ckv.stride() == pool.stride()


def test_backend_reports_cpu_choice():
    from sglang_tpla.patches.attention_backend import choose_implementation

    c = choose_implementation(torch.device("cpu"), 256, torch.float32)
    assert c.impl == "torch"


@pytest.mark.parametrize("d", [512, 256])
def test_fp8_kv_cache_goes_to_triton_and_says_why(d):
    c = choose("cuda", d, "bfloat16", H100, "0.7.2", kv_dtype="float8_e4m3fn")
    assert c.impl == "triton" and "float8_e4m3fn KV cache" in c.reason
    assert choose("cpu", d, "bfloat16", kv_dtype="float8_e4m3fn").impl == "torch"
