"""GPU correctness check of every TPLA decode implementation against the fp32 reference.

Run by tests/gpu/run.sh on a machine with an NVIDIA GPU (torch + triton; FlashInfer optional).
Prints one line per case and exits non-zero if any case is off.
"""

import sys

import torch

from sglang_tpla.bench.kernels import implementations
from sglang_tpla.reference import latent_attention

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def main() -> int:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for dtype in (torch.bfloat16, torch.float16):
        for d in (512, 256, 128, 64):
            for heads in (16, 64, 128):
                lens = [0, 1, 7, 300, 4100]  # an empty request must give zeros in every implementation
                slots = sum(lens) + 8
                rows = torch.randn(slots, 1, d + 64, generator=gen).to(dev, dtype)
                q = (torch.randn(len(lens), heads, d + 64, generator=gen) * 0.2).to(dev, dtype)
                perm = torch.randperm(slots, generator=gen)[: sum(lens)]
                indptr = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
                indices = perm.to(dev, torch.int32)
                scale = 192 ** -0.5
                ref = torch.zeros(len(lens), heads, d)
                flat = rows.view(slots, -1).float().cpu()
                for b in range(len(lens)):
                    idx = perm[int(indptr[b]) : int(indptr[b + 1])].long()
                    ref[b] = latent_attention(q[b : b + 1, :, :d].float().cpu(), q[b : b + 1, :, d:].float().cpu(),
                                              flat[idx, :d], flat[idx, d:], scale)[0]
                for name, fn in implementations(dev, d, dtype).items():
                    out = fn(rows, q, indptr, indices, d, scale).float().cpu()
                    err = (out - ref).abs().max().item()
                    ok = err <= TOL[dtype] * max(1.0, ref.abs().max().item())
                    bad += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {name:16s} {str(dtype):15s} D={d:3d} H={heads:3d} max|err|={err:.2e}", flush=True)
    print(f"{bad} failing case(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
