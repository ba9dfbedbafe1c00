"""Per-step decode metadata of the ``tpla`` backend: which token slots each request reads.

A decode batch of ``B`` requests reads, for request ``b``, the token slots
``req_to_token[req_pool_indices[b], :seq_lens[b]]`` of this rank's latent-split pool.  The
kernels take them in CSR form (int32, page size resolved: one entry per token):

* ``kv_indptr [B + 1]``: ``0, cumsum(seq_lens)``, on the device;
* ``kv_indices [nnz]``: the slots, request after request, on the device;
* ``kv_indptr_cpu`` / ``kv_lens_cpu``: the same lengths on the host, built from SGLang's
  ``seq_lens_cpu`` (FlashInfer plans from host arrays; the Triton kernel needs none).

:class:`DecodeIndexBuffers` owns persistent buffers and refills them in place once per step,
so a CUDA graph captured over them stays valid on replay.  Filling never reads device data
on the host (no ``.item()`` / ``.tolist()`` / ``.cpu()`` of a device tensor): the sizes come
from host arrays SGLang already keeps.  The gather itself is one vectorized op
(:func:`gather_kv_indices`); on CUDA the backend swaps in SGLang's own index kernel
(``create_flashinfer_kv_indices_triton``), which computes the same thing.

Pure torch: no SGLang import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# fill(req_to_token, req_pool_indices [B], seq_lens [B], kv_indptr [B+1], out [>= nnz], nnz)
IndexFill = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], None]


def gather_kv_indices(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    out: torch.Tensor,
    nnz: int,
) -> None:
    """``out[:nnz]`` = the token slots of every request, in order (vectorized, no host sync).

    ``nnz`` (a host int) must equal ``kv_indptr[-1]``; ``kv_indptr`` is ``[B + 1]`` on the
    device.  Token ``t`` belongs to request ``b = searchsorted(kv_indptr[1:], t, right)`` and
    sits at position ``t - kv_indptr[b]`` of that request's ``req_to_token`` row.
    """
    if nnz == 0:
        return
    tok = torch.arange(nnz, device=out.device, dtype=kv_indptr.dtype)
    req = torch.searchsorted(kv_indptr[1:], tok, right=True)
    pos = (tok - kv_indptr[req]).long()
    rows = req_pool_indices.long()[req]
    out[:nnz] = req_to_token[rows, pos].to(out.dtype)


class DecodeIndexBuffers:
    """Persistent CSR buffers for decode batches of up to ``max_bs`` requests and ``capacity``
    tokens in all (graph mode: ``max_bs * context_len``, as SGLang's MLA backends size theirs).

    With ``growable`` (eager mode) a step with more tokens than ``capacity`` reallocates the
    indices buffer (doubling, so it happens O(log) times over a server's life); graph buffers
    are never reallocated (a captured graph holds their addresses).
    """

    def __init__(self, max_bs: int, capacity: int, device, growable: bool = False, fill: IndexFill | None = None):
        device = torch.device(device)
        self.device = device
        self.max_bs = int(max_bs)
        self.growable = growable
        self.fill_fn = fill or gather_kv_indices
        self.kv_indptr = torch.zeros(self.max_bs + 1, dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros(max(int(capacity), 1), dtype=torch.int32, device=device)
        # Host arrays stay pageable: they are rewritten every step, and a non-blocking copy out of
        # pinned memory could still be in flight when the next step (overlap scheduler) rewrites them.
        self.kv_indptr_cpu = torch.zeros(self.max_bs + 1, dtype=torch.int32)
        self.kv_lens_cpu = torch.zeros(self.max_bs, dtype=torch.int32)
        self.qo_indptr_cpu = torch.arange(self.max_bs + 1, dtype=torch.int32)
        self.qo_indptr = torch.arange(self.max_bs + 1, dtype=torch.int32, device=device)
        self.kv_lens = torch.ones(self.max_bs, dtype=torch.int32, device=device)  # FlashInfer graph wrappers' buffer
        self.bs = 0
        self.nnz = 0

    def fill(
        self,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        bs: int,
    ) -> None:
        """Refill for the first ``bs`` requests.  ``seq_lens`` is on the device, ``seq_lens_cpu``
        is SGLang's host copy of the same lengths (``ForwardBatch.seq_lens_cpu``)."""
        if bs > self.max_bs:
            raise ValueError(f"decode batch of {bs} requests exceeds the {self.max_bs} these buffers were sized for")
        lens_cpu = self.kv_lens_cpu[:bs]
        lens_cpu.copy_(seq_lens_cpu[:bs])
        torch.cumsum(lens_cpu, 0, dtype=torch.int32, out=self.kv_indptr_cpu[1 : bs + 1])
        nnz = int(self.kv_indptr_cpu[bs]) if bs else 0  # host tensor: no device sync
        if nnz > self.kv_indices.numel():
            if not self.growable:
                raise ValueError(
                    f"decode batch reads {nnz} tokens, more than the {self.kv_indices.numel()} the graph buffers hold"
                )
            self.kv_indices = torch.zeros(max(nnz, 2 * self.kv_indices.numel()), dtype=torch.int32, device=self.device)
        torch.cumsum(seq_lens[:bs], 0, dtype=torch.int32, out=self.kv_indptr[1 : bs + 1])
        self.fill_fn(req_to_token, req_pool_indices[:bs], seq_lens[:bs], self.kv_indptr[: bs + 1], self.kv_indices, nnz)
        self.bs, self.nnz = bs, nnz

    # Views of the current step.
    @property
    def indptr(self) -> torch.Tensor:
        return self.kv_indptr[: self.bs + 1]

    @property
    def indices(self) -> torch.Tensor:
        return self.kv_indices[: self.nnz]

    @property
    def indptr_cpu(self) -> torch.Tensor:
        return self.kv_indptr_cpu[: self.bs + 1]

    @property
    def lens_cpu(self) -> torch.Tensor:
        return self.kv_lens_cpu[: self.bs]


# --------------------------------------------------------------------------- extend (prefill: tpla)


@dataclass
class ExtendIndex:
    """Index metadata of one ``prefill: tpla`` extend batch for the kernel routes (FlashInfer's causal
    MLA and the Triton multi-query kernel), built once per forward batch and read by every layer.

    Request ``b`` has ``P_b`` cached tokens and ``T_b`` new ones; its keys are its slots
    ``req_to_token[req_pool_indices[b], :P_b + T_b]`` (the new rows already written to the pool).
    Query token ``i`` of request ``b`` (row ``qo_indptr[b] + i`` of the batch) sees keys
    ``0 .. P_b + i`` (causal)."""

    kv_indptr: torch.Tensor  # [B + 1] int32, device: 0, cumsum(P_b + T_b)
    kv_indices: torch.Tensor  # [K] int32, device: the token slots, request after request
    q_req: torch.Tensor  # [T] int32, device: the request of each query row
    q_lim: torch.Tensor  # [T] int32, device: the last key position each row may see (P_b + i)
    qo_indptr_cpu: torch.Tensor  # [B + 1] int32, host: 0, cumsum(T_b)
    kv_indptr_cpu: torch.Tensor  # [B + 1] int32, host
    kv_lens_cpu: torch.Tensor  # [B] int32, host: P_b + T_b
    max_kv_len: int  # host
    num_tokens: int  # T, host


def build_extend_index(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens,
    extend_lens,
    fill: IndexFill | None = None,
) -> ExtendIndex:
    """:class:`ExtendIndex` from SGLang's host lengths (``extend_prefix_lens_cpu``,
    ``extend_seq_lens_cpu``): one host-to-device copy of the ``2B`` lengths, then device ops only
    (no device value is read on the host; no loop over requests).  ``fill``: the slot gather
    (default :func:`gather_kv_indices`; SGLang's index kernel on CUDA)."""
    prefix = [int(p) for p in prefix_lens]
    ext = [int(n) for n in extend_lens]
    if len(prefix) != len(ext):
        raise ValueError(f"{len(prefix)} prefix lengths but {len(ext)} extend lengths")
    bs = len(ext)
    host = torch.tensor(prefix + ext, dtype=torch.int32).view(2, bs)
    kv_lens_cpu = host.sum(0, dtype=torch.int32)
    kv_indptr_cpu = torch.zeros(bs + 1, dtype=torch.int32)
    qo_indptr_cpu = torch.zeros(bs + 1, dtype=torch.int32)
    torch.cumsum(kv_lens_cpu, 0, dtype=torch.int32, out=kv_indptr_cpu[1:])
    torch.cumsum(host[1], 0, dtype=torch.int32, out=qo_indptr_cpu[1:])
    nnz, total_q = int(kv_indptr_cpu[-1]), int(qo_indptr_cpu[-1])  # host tensors

    dev = req_pool_indices.device
    lens = host.to(dev)  # the one host-to-device copy
    pre, new = lens[0], lens[1]
    kv_lens = pre + new
    kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
    torch.cumsum(kv_lens, 0, dtype=torch.int32, out=kv_indptr[1:])
    qo_start = torch.cumsum(new, 0, dtype=torch.int32) - new
    q_req = torch.repeat_interleave(torch.arange(bs, dtype=torch.int32, device=dev), new, output_size=total_q)
    q_lim = pre[q_req] + torch.arange(total_q, dtype=torch.int32, device=dev) - qo_start[q_req]
    kv_indices = torch.empty(nnz, dtype=torch.int32, device=dev)
    (fill or gather_kv_indices)(req_to_token, req_pool_indices, kv_lens, kv_indptr, kv_indices, nnz)
    return ExtendIndex(
        kv_indptr, kv_indices, q_req, q_lim.to(torch.int32), qo_indptr_cpu, kv_indptr_cpu, kv_lens_cpu,
        int(kv_lens_cpu.max()) if bs else 0, total_q,
    )  # fmt: skip
