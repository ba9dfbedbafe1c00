"""PD disaggregation: exact-MLA prefill nodes feeding TPLA decode nodes over mooncake.

Each TPLA decode rank keeps only its latent slice + RoPE (``patches/kv_pool.py``) and
registers that row width with the prefill node.  Stock SGLang would address the decode
pool with the prefill's 576-wide rows (``MooncakeKVManager._send_kvcache_generic``) and
corrupt it silently; these hooks make the prefill side send exactly each decode rank's
columns, packed contiguously, and make both sides agree on the latent basis first.

Hooks (SGLang 0.5.23, ``sglang.srt.disaggregation``):

Prefill side (the plugin is installed there; TPLA itself stays off):

* AROUND ``prefill.PrefillBootstrapQueue._init_kv_manager``: remembers the KV pool tensors
  on the transfer manager (the sliced sender packs from them) and registers its staging
  buffers.
* AROUND ``mooncake.conn.MooncakeKVManager.send_kvcache``: when the decode peer's
  registered ``dst_kv_item_len`` is a TPLA row (``R/g + rope``), packs each layer's
  ``[latent[lo:hi] | RoPE]`` rows of the chunk into a staging buffer (registered when the
  manager is built, one per transfer queue, ``SGLANG_TPLA_PD_STAGING_MB`` each) and sends
  one transfer per run of consecutive destination pages and layer; anything it cannot
  serve fails the request with the reason logged.  Plain MLA peers take SGLang's path.
* AFTER ``common.conn.CommonKVManager.register_to_bootstrap``: each prefill rank also
  publishes its latent basis (:class:`sglang_tpla.patches.runtime.NodeBasis`).
* AFTER ``common.conn.CommonKVBootstrapServer._setup_routes``: the bootstrap server gains a
  ``/tpla_basis`` route (PUT by prefill ranks, GET by decode ranks).

Decode side (TPLA on):

* AROUND ``common.conn.CommonKVReceiver.init``: before a request's first transfer from a
  prefill node, checks that node once: it runs this plugin, all its ranks share one
  basis equal to ours, same ``kv_lora_rank``, and no PP / CP / KV sharding.  A mismatch
  fails the request with a message naming both sides' settings; nothing is transferred.
* AROUND ``decode.DecodeTransferQueue._commit_transfer_to_req``: only with
  ``SGLANG_TPLA_PD_DIGEST_DIR`` set (debugging and the tests), digests of the received
  rows, comparable with the prefill side's digests of the bytes it sent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import time

import numpy as np
import torch

from sglang_tpla.pd_layout import PDLayoutError, contiguous_runs, pack_slice, page_digest, peer_slice, xor_digest

from .runtime import current, node_basis

logger = logging.getLogger("sglang_tpla")

HOOK_TARGETS = (
    "sglang.srt.disaggregation.prefill.PrefillBootstrapQueue._init_kv_manager",
    "sglang.srt.disaggregation.mooncake.conn.MooncakeKVManager.send_kvcache",
    "sglang.srt.disaggregation.common.conn.CommonKVManager.register_to_bootstrap",
    "sglang.srt.disaggregation.common.conn.CommonKVBootstrapServer._setup_routes",
    "sglang.srt.disaggregation.common.conn.CommonKVReceiver.init",
    "sglang.srt.disaggregation.decode.DecodeTransferQueue._commit_transfer_to_req",
    # used, not patched
    "sglang.srt.disaggregation.mooncake.conn.MooncakeKVManager._transfer_data",
    "sglang.srt.disaggregation.mooncake.conn.MooncakeKVManager._register_staging_memory",
    "sglang.srt.disaggregation.checksum.page_indices_for_request",
    "sglang.srt.utils.network.NetworkAddress",
)

DIGEST_ENV = "SGLANG_TPLA_PD_DIGEST_DIR"
STAGING_ENV = "SGLANG_TPLA_PD_STAGING_MB"
STAGING_DEFAULT_MB = 32
BASIS_ROUTE = "/tpla_basis"


# ----------------------------------------------------------------------------- prefill side


def _init_kv_manager(orig, self, *args, **kwargs):
    mgr = orig(self, *args, **kwargs)
    mgr._tpla_src_pool = self.token_to_kv_pool
    if hasattr(mgr, "_register_staging_memory") and getattr(mgr, "is_mla_backend", False):
        mgr._tpla_staging = _StagingPool(mgr, self.token_to_kv_pool.kv_buffer[0].device)
    return mgr


def _src_buffers(mgr) -> list[torch.Tensor]:
    bufs = getattr(mgr, "_tpla_src_buffers", None)
    if bufs is None:
        pool = getattr(mgr, "_tpla_src_pool", None)
        by_ptr = {t.data_ptr(): t for t in getattr(pool, "kv_buffer", [])}
        missing = [p for p in mgr.kv_args.kv_data_ptrs if p not in by_ptr]
        if pool is None or missing:
            raise PDLayoutError("the prefill KV pool buffers are not plain MLA layer buffers; cannot slice them")
        bufs = mgr._tpla_src_buffers = [by_ptr[p] for p in mgr.kv_args.kv_data_ptrs]
    return bufs


class _StagingPool:
    """Registered staging buffers of one prefill transfer manager, one per transfer queue.

    Like SGLang's own staging buffers they are allocated and registered with the transfer
    engine when the manager is built, so the memory they take is fixed and known at start-up
    and nothing is registered on the transfer path.  A sender takes a buffer for the whole of
    one chunk and gives it back.
    """

    def __init__(self, mgr, device: torch.device):
        count = max(1, len(getattr(mgr, "transfer_queues", ())))
        nbytes = int(float(os.environ.get(STAGING_ENV, str(STAGING_DEFAULT_MB))) * (1 << 20))
        self.nbytes = nbytes
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count if nbytes > 0 else 0):
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            mgr._register_staging_memory(buf.data_ptr(), nbytes)
            self._free.put(buf)

    @contextlib.contextmanager
    def take(self):
        if self.nbytes <= 0:
            raise PDLayoutError(f"{STAGING_ENV}=0 on this prefill node: it cannot send to TPLA decode nodes")
        buf = self._free.get()
        try:
            yield buf
        finally:
            self._free.put(buf)


def _send_kvcache(orig, self, mooncake_session_id, prefill_kv_indices, dst_kv_ptrs, dst_kv_indices, executor, *args, **kwargs):
    dst_item_len = kwargs.get("dst_kv_item_len")
    src_item_len = self.kv_args.kv_item_lens[0] if self.kv_args.kv_item_lens else None
    if dst_item_len is None or dst_item_len == src_item_len or not self.is_mla_backend:
        return orig(self, mooncake_session_id, prefill_kv_indices, dst_kv_ptrs, dst_kv_indices, executor, *args, **kwargs)
    info = self.decode_kv_args_table[mooncake_session_id]
    try:
        pool = getattr(self, "_tpla_src_pool", None)
        if pool is None:
            raise PDLayoutError("no prefill KV pool recorded")
        elem = pool.kv_buffer[0].element_size()
        sl = peer_slice(
            src_item_len=src_item_len, dst_item_len=dst_item_len, page_size=self.kv_args.page_size, elem_size=elem,
            kv_lora_rank=pool.kv_lora_rank, rope=pool.qk_rope_head_dim,
            dst_attn_tp_size=info.dst_attn_tp_size, dst_tp_rank=info.dst_tp_rank,
        )
        if len(dst_kv_ptrs) != len(self.kv_args.kv_data_ptrs) or kwargs.get("dst_device_kv_indices") is not None:
            raise PDLayoutError(
                f"prefill has {len(self.kv_args.kv_data_ptrs)} KV layers, the TPLA decode rank {len(dst_kv_ptrs)} "
                "(pipeline parallelism, speculative draft layers and HiSparse are not supported with TPLA decode)"
            )
        return _send_sliced(self, mooncake_session_id, prefill_kv_indices, dst_kv_ptrs, dst_kv_indices, sl, info.dst_tp_rank)
    except PDLayoutError as e:
        logger.error("TPLA PD: cannot send to decode rank %s (%s): %s", info.dst_tp_rank, mooncake_session_id, e)
        return -1


def _send_sliced(mgr, session_id, prefill_pages, dst_ptrs, dst_pages, sl, dst_rank) -> int:
    bufs = _src_buffers(mgr)
    pool = getattr(mgr, "_tpla_staging", None)
    if pool is None:
        raise PDLayoutError("no staging buffers on this transfer manager")
    with pool.take() as stage:
        return _send_packed(mgr, session_id, bufs, prefill_pages, dst_ptrs, dst_pages, sl, dst_rank, stage)


def _send_packed(mgr, session_id, bufs, prefill_pages, dst_ptrs, dst_pages, sl, dst_rank, stage) -> int:
    page = mgr.kv_args.page_size
    dtype, device = bufs[0].dtype, bufs[0].device
    elem = bufs[0].element_size()
    dst_item = page * sl.row_width * elem
    cap_pages = stage.numel() // dst_item
    if cap_pages == 0:
        raise PDLayoutError(f"staging buffer ({stage.numel()} B) smaller than one page ({dst_item} B): raise {STAGING_ENV}")
    src_idx = torch.as_tensor(np.asarray(prefill_pages, dtype=np.int64), device=device)
    dst_pages = np.asarray(dst_pages, dtype=np.int64)
    n = len(dst_pages)
    digests = [] if os.environ.get(DIGEST_ENV) else None
    # Work items (layer, first page, count), packed back to back until the buffer is full.
    items = [(l, s, min(cap_pages, n - s)) for l in range(len(bufs)) for s in range(0, n, cap_pages)]
    i = 0
    while i < len(items):
        used, blocks = 0, []
        while i < len(items) and used + items[i][2] <= cap_pages:
            layer, start, count = items[i]
            out = stage[used * dst_item : (used + count) * dst_item].view(dtype).view(count, page, sl.row_width)
            pack_slice(bufs[layer], src_idx[start : start + count], sl, page, out)
            for pos, first, run in contiguous_runs(dst_pages[start : start + count]):
                blocks.append((stage.data_ptr() + (used + pos) * dst_item, dst_ptrs[layer] + first * dst_item, run * dst_item))
            if digests is not None:
                digests.extend(page_digest(layer, int(p), out[k]) for k, p in enumerate(dst_pages[start : start + count]))
            used += count
            i += 1
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        ret = mgr._transfer_data(session_id, blocks)
        if ret != 0:
            return ret
    if digests is not None:
        _write_digest("prefill", dst_rank, dst_pages, xor_digest(digests))
    return 0


def _write_digest(side: str, rank: int, pages, digest: int, **extra) -> None:
    d = os.environ[DIGEST_ENV]
    os.makedirs(d, exist_ok=True)
    rec = {"side": side, "rank": int(rank), "pages": sorted(int(p) for p in pages), "digest": f"{digest:016x}",
           "time": time.time(), **extra}
    with open(os.path.join(d, f"{side}-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def _bootstrap_url(mgr) -> str:
    from sglang.srt.utils.network import NetworkAddress

    if mgr.dist_init_addr:
        host = NetworkAddress.parse(mgr.dist_init_addr).resolved().host
    else:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(mgr.bootstrap_host, mgr.bootstrap_host)
    return NetworkAddress(host, mgr.bootstrap_port).to_url() + BASIS_ROUTE


def _register_basis(result, self, *args, **kwargs) -> None:
    """AFTER register_to_bootstrap (prefill ranks): publish this rank's latent basis."""
    import requests

    b = node_basis()
    payload = {
        "rank": f"dp{self.attn_dp_rank}-cp{self.attn_cp_rank}-tp{self.attn_tp_rank}-pp{self.pp_rank}",
        "basis": None if b is None else b.fingerprint,
        "kv_lora_rank": None if b is None else b.kv_lora_rank,
        "qk_rope_head_dim": None if b is None else b.qk_rope_head_dim,
        "source": None if b is None else b.source,
    }
    url = _bootstrap_url(self)
    for attempt in range(5):
        try:
            if requests.put(url, json=payload, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0 + attempt)
    logger.error("TPLA PD: could not publish the latent basis to %s; TPLA decode nodes will refuse this prefill node", url)


def _setup_routes(result, self, *args, **kwargs) -> None:
    """AFTER CommonKVBootstrapServer._setup_routes: add the /tpla_basis route."""
    from aiohttp import web

    table: dict[str, dict] = {}

    async def handle(request):
        if request.method == "PUT":
            data = await request.json()
            table[str(data["rank"])] = data
            return web.Response(text="OK", status=200)
        return web.json_response({"ranks": table}, status=200)

    self.app.router.add_route("*", BASIS_ROUTE, handle)


# ----------------------------------------------------------------------------- decode side


def _peer_problem(kv_mgr, addr: str) -> str | None:
    """Why this TPLA decode node must not take KV from the prefill node at ``addr`` (None: fine)."""
    import requests

    rt, mine = current(), node_basis()
    info = kv_mgr.prefill_info_table.get(addr)
    if info is None:
        return None  # SGLang reports an unreachable prefill node itself
    if info.pp_size > 1 or info.attn_cp_size > 1 or info.enable_kv_cache_sharding:
        return (
            f"prefill node {addr} runs with pipeline parallelism / context parallelism / --enable-kv-cache-sharding "
            f"(pp={info.pp_size}, cp={info.attn_cp_size}, sharding={info.enable_kv_cache_sharding}); TPLA decode takes "
            "KV only from prefill nodes with full rows on every attention-TP rank: drop those options there"
        )
    expected = info.dp_size * info.attn_tp_size
    ranks: dict = {}
    deadline = time.monotonic() + 10.0
    while True:
        try:
            r = requests.get(f"http://{addr}{BASIS_ROUTE}", timeout=5)
        except requests.RequestException as e:
            return f"cannot reach the bootstrap server of prefill node {addr} ({e})"
        if r.status_code == 404:
            return (
                f"prefill node {addr} does not run the sglang-tpla plugin, so it would send full 576-wide rows into "
                "this node's latent-split pool: pip install sglang-tpla on the prefill node (TPLA stays off there) "
                "and restart it"
            )
        ranks = r.json().get("ranks", {}) if r.status_code == 200 else {}
        if len(ranks) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    bases = {(v.get("basis"), v.get("kv_lora_rank")) for v in ranks.values()}
    if not ranks or len(bases) != 1:
        return f"prefill node {addr}: its ranks published no single latent basis ({sorted(map(str, bases))})"
    (basis, r_lat), src = bases.pop(), next(iter(ranks.values())).get("source")
    if mine is None or rt is None:
        return "this decode node has not loaded TPLA weights yet"
    if r_lat != mine.kv_lora_rank:
        return f"prefill node {addr} serves kv_lora_rank={r_lat}, this node {mine.kv_lora_rank}: not the same model"
    if basis != mine.fingerprint:
        return (
            f"latent basis mismatch: prefill node {addr} is in basis {basis!r} ({src}), this TPLA decode node expects "
            f"{mine.fingerprint!r} ({mine.source}; tpla transform={rt.config.transform}, seed={rt.config.seed}, "
            f"calibration={rt.config.calibration}). Start the prefill node with the same "
            '--json-model-override-args \'{"tpla": {"transform": ..., "seed": ..., "calibration": ...}}\' '
            "(and --disaggregation-mode prefill), or serve the same converted checkpoint on both"
        )
    return None


def _receiver_init(orig, self, *args, **kwargs):
    """AROUND CommonKVReceiver.init: refuse an incompatible prefill node before any transfer."""
    if current() is None:
        return orig(self, *args, **kwargs)
    from sglang.srt.disaggregation.base.conn import KVPoll

    mgr = self.kv_mgr
    ok = mgr.__dict__.setdefault("_tpla_peers_ok", set())
    if self.bootstrap_addr not in ok:
        problem = _peer_problem(mgr, self.bootstrap_addr)
        if problem is not None:
            logger.error("TPLA PD: refusing request (room %s): %s", self.bootstrap_room, problem)
            mgr.record_failure(self.bootstrap_room, f"TPLA: {problem}")
            mgr.update_status(self.bootstrap_room, KVPoll.Failed)
            self.conclude_state = KVPoll.Failed
            return None
        ok.add(self.bootstrap_addr)
    return orig(self, *args, **kwargs)


def _commit_transfer(orig, self, decode_req, *args, **kwargs):
    result = orig(self, decode_req, *args, **kwargs)
    rt = current()
    if rt is None or not os.environ.get(DIGEST_ENV):
        return result
    from sglang.srt.disaggregation.checksum import page_indices_for_request

    req = decode_req.req
    pool = self.scheduler.token_to_kv_pool_allocator.get_kvcache()
    page = self.scheduler.token_to_kv_pool_allocator.page_size
    pages = page_indices_for_request(self.scheduler, req, len(req.origin_input_ids)).cpu()
    width = pool.kv_buffer[0].shape[-1]
    digests = []
    for layer, buf in enumerate(pool.kv_buffer):
        rows = buf.reshape(-1, page, width)[pages.to(buf.device)]
        digests.extend(page_digest(layer, int(p), rows[k]) for k, p in enumerate(pages.tolist()))
    _write_digest("decode", rt.rank, pages.tolist(), xor_digest(digests), room=int(req.bootstrap_room or 0))
    return result


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGETS[0], _init_kv_manager, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS[1], _send_kvcache, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS[2], _register_basis, HookType.AFTER)
    HookRegistry.register(HOOK_TARGETS[3], _setup_routes, HookType.AFTER)
    HookRegistry.register(HOOK_TARGETS[4], _receiver_init, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS[5], _commit_transfer, HookType.AROUND)
