"""The batched, tiled extend attention (``kernels/torch_extend.py``) against the per-request fp32
reference, and its memory bound measured in a fresh process."""

import json
import subprocess
import sys

import pytest
import torch

from sglang_tpla.kernels.torch_extend import extend_attention, plan_extend, tile_sizes
from sglang_tpla.reference import latent_attention


def _reference(ql, qp, ckv, kpe, prefix_lens, ext_lens, scale, mu):
    out, k0, q0 = [], 0, 0
    for p, e in zip(prefix_lens, ext_lens):
        out.append(latent_attention(ql[q0 : q0 + e], qp[q0 : q0 + e], ckv[k0 : k0 + p + e], kpe[k0 : k0 + p + e], scale, mu, causal_offset=p))
        k0, q0 = k0 + p + e, q0 + e
    return torch.cat(out)


@pytest.mark.parametrize(
    "heads,prefix_lens,ext_lens,budget,mu",
    [
        (4, [5, 0, 37, 300], [3, 7, 1, 40], 1 << 12, 1.5),  # many tiles and chunks, ragged, one-token extend
        (2, [0], [50], 1 << 10, None),  # no prefix: plain causal prefill
        (3, [100, 0], [1, 1], 1 << 22, None),  # one tile, one chunk
        (8, [0, 64, 0], [16, 16, 17], 1 << 12, 2.0),  # tiles straddling requests
    ],
)
def test_extend_attention_equals_per_request_reference(heads, prefix_lens, ext_lens, budget, mu):
    g = torch.Generator().manual_seed(len(prefix_lens) + heads)
    d, kv = 32, [p + e for p, e in zip(prefix_lens, ext_lens)]
    ckv, kpe = torch.randn(sum(kv), d, generator=g), torch.randn(sum(kv), 64, generator=g)
    ql, qp = torch.randn(sum(ext_lens), heads, d, generator=g), torch.randn(sum(ext_lens), heads, 64, generator=g)
    plan = plan_extend(prefix_lens, ext_lens, "cpu", heads, budget)
    q_tile, kv_chunk = tile_sizes(heads, budget)
    assert q_tile * heads * kv_chunk <= budget
    calls = []
    out = extend_attention(ql, qp, lambda a, b: calls.append((a, b)) or (ckv[a:b], kpe[a:b]), plan, 0.3, mu)
    ref = _reference(ql, qp, ckv, kpe, prefix_lens, ext_lens, 0.3, mu)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5), (out - ref).abs().max()
    assert len(calls) == len(set(calls)) and all(b - a <= kv_chunk for a, b in calls)  # each chunk gathered once


_PROBE = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from sglang_tpla.kernels.torch_extend import extend_attention, plan_extend, memory_bound_bytes
torch.set_num_threads(1)
T, P, H, D = 2048, int(sys.argv[2]), 8, 512
ckv, kpe = torch.randn(P + T, D), torch.randn(P + T, 64)
ql, qp = torch.randn(T, H, D), torch.randn(T, H, 64)
out = torch.zeros(T, H, D)  # the output's pages are touched before the baseline (it is not extra memory)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
plan = plan_extend([P], [T], "cpu", H)
extend_attention(ql, qp, lambda a, b: (ckv[a:b], kpe[a:b]), plan, 0.05, out=out)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra": peak - base, "bound": memory_bound_bytes(T, H, D), "naive": T * H * (P + T) * 4}))
"""


def _probe(prefix: int) -> dict:
    import os

    # A fixed mmap threshold: large blocks go back to the OS when freed, so the peak RSS measures
    # live memory, not glibc's heap slack (its dynamic threshold otherwise keeps freed tiles).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _PROBE, repo, str(prefix)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_extend_memory_stays_under_the_stated_bound_and_does_not_grow_with_the_prefix():
    """A 2048-token extend over a 1K and a 16K-token prefix (8 heads, D 512), each in a fresh process:
    the peak extra memory (ru_maxrss) stays under ``memory_bound_bytes`` and does not grow with the
    prefix, while a direct softmax would hold ``[T, H, P + T]`` fp32 logits."""
    short, long = _probe(1024), _probe(16384)
    print(f"extend 2048 tokens: extra peak {short['extra'] / 2**20:.1f} MiB over a 1K prefix, {long['extra'] / 2**20:.1f} MiB "
          f"over 16K; stated bound {long['bound'] / 2**20:.1f} MiB; direct softmax logits over 16K {long['naive'] / 2**20:.0f} MiB")
    assert long["extra"] <= long["bound"] < long["naive"] / 4
    assert long["extra"] <= 1.15 * short["extra"] + (8 << 20)
