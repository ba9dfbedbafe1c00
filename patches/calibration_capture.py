"""Calibration capture: latent statistics of exact MLA prefill, taken inside a real SGLang server.

Active only when ``SGLANG_TPLA_CALIBRATE_DIR`` is set (``python -m sglang_tpla.calibrate`` sets
it for the server it starts); otherwise :func:`install` registers nothing.

Hooks (SGLang 0.5.23):

* AROUND ``sglang.srt.models.deepseek_v2.DeepseekV2AttentionMLA.dispatch_attn_forward_method``:
  extend batches take the absorbed MLA path (``AttnForwardMethod.MLA``), the one path where
  the pre-norm latent and the absorbed query both exist (the MHA prefill paths never absorb).
* AROUND ``sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla.DeepseekMLAForwardMixin.forward_absorb_prepare``:
  for extend batches, a forward pre-hook on the layer's ``kv_a_layernorm`` (registered once per
  layer) records its input, the pre-norm latent ``c [T, r]``; after the original returns,
  ``q_nope_out [T, H_loc, r]`` (``q_nope @ W_UK``) is the absorbed query.  Attention-TP rank 0
  adds ``u^T u`` (float64, ``u = c / RMS(c)`` with the layer's eps, the ORIGINAL basis) and
  the token count per layer, the key sum ``sum u`` and the absorbed-query moment
  ``sum (a*gamma)^T (a*gamma)`` over its tokens and heads (for the ``fit`` transform), and keeps a reservoir sample of (query * gamma, key u) pairs
  (random head of its own heads, random causally visible key of the same request) for the
  ``lsq`` logit scales.
* AFTER ``sglang.srt.models.deepseek_common.deepseek_weight_loader.DeepseekV2WeightLoaderMixin.post_load_weights``:
  records the model identity exactly as :func:`sglang_tpla.patches.weights.model_identity`
  computes it (so the file is accepted at load) and refuses a server whose latent basis is
  not the checkpoint's own (TPLA on, a PD prefill fold, or a converted checkpoint).

Capture runs only while ``$DIR/armed`` exists; its content is a run id, and a new id resets
the accumulators (the launcher's warm-up and readiness requests are not counted).  A daemon
thread writes ``$DIR/moments.pt`` (tmp + rename) when there is new data and none came for
>= 1 s.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

logger = logging.getLogger("sglang_tpla")

ENV_DIR = "SGLANG_TPLA_CALIBRATE_DIR"
ENV_PAIRS = "SGLANG_TPLA_CALIBRATE_PAIRS"  # reservoir size per layer for the lsq fit (default 512; 0 = off)
MOMENTS_FILE = "moments.pt"
ARMED_FILE = "armed"
IDLE_FLUSH_S = 1.0

_MLA_CLS = "sglang.srt.models.deepseek_v2.DeepseekV2AttentionMLA"
_MIXIN = "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla.DeepseekMLAForwardMixin"
HOOK_TARGETS = (
    _MLA_CLS + ".dispatch_attn_forward_method",
    _MIXIN + ".forward_absorb_prepare",
    "sglang.srt.models.deepseek_common.deepseek_weight_loader.DeepseekV2WeightLoaderMixin.post_load_weights",
)


class _State:
    def __init__(self, directory: str, pairs: int):
        self.dir = directory
        self.max_pairs = pairs
        self.lock = threading.Lock()
        self.run_id: str | None = None
        self.identity: dict | None = None
        self.error: str | None = None
        self.num_layers = 0
        self.reset()
        self.dirty = False
        self.last_update = 0.0
        self._armed_checked = -1
        self.thread = threading.Thread(target=self._flush_loop, name="tpla-calibrate-flush", daemon=True)
        self.thread.start()

    def reset(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.key_sums: dict[int, torch.Tensor] = {}
        self.q_sums: dict[int, torch.Tensor] = {}
        self.q_counts: dict[int, int] = {}
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.seen: dict[int, int] = {}
        self.gen = torch.Generator().manual_seed(0)

    # ------------------------------------------------------------------ arming

    def armed(self) -> bool:
        """Read the run id (once per forward: layer 0 checks); a new id resets the sums."""
        try:
            with open(os.path.join(self.dir, ARMED_FILE)) as f:
                run_id = f.read().strip() or None
        except OSError:
            run_id = None
        if run_id is not None and run_id != self.run_id:
            with self.lock:
                self.run_id = run_id
                self.reset()
                self.dirty, self.last_update = True, time.time()
        return run_id is not None

    # ------------------------------------------------------------------ accumulation

    def add(self, layer: int, c: torch.Tensor, eps: float, q_abs: torch.Tensor, gamma: torch.Tensor, seq_lens) -> None:
        u = c.double()
        u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)
        uu = (u.T @ u).cpu()
        us = u.sum(0).cpu()
        a = (q_abs.double() * gamma.double()).reshape(-1, u.shape[1])
        aa = (a.T @ a).cpu()
        pairs = self._sample_pairs(layer, u, q_abs, gamma, seq_lens) if self.max_pairs > 0 else None
        with self.lock:
            if layer in self.sums:
                self.sums[layer] += uu
                self.counts[layer] += u.shape[0]
                self.key_sums[layer] += us
                self.q_sums[layer] += aa
                self.q_counts[layer] += a.shape[0]
            else:
                self.sums[layer], self.counts[layer] = uu, u.shape[0]
                self.key_sums[layer], self.q_sums[layer], self.q_counts[layer] = us, aa, a.shape[0]
            if pairs is not None:
                self._reservoir(layer, *pairs)
            self.dirty, self.last_update = True, time.time()

    def _sample_pairs(self, layer, u, q_abs, gamma, seq_lens):
        t = u.shape[0]
        m = min(self.max_pairs, t)
        if m == 0:
            return None
        # request of each token and its start, so keys stay causal inside the same request
        lens = torch.as_tensor(list(seq_lens), dtype=torch.long)
        starts = torch.cumsum(lens, 0) - lens
        req = torch.repeat_interleave(torch.arange(len(lens)), lens)
        qi = torch.randint(0, t, (m,), generator=self.gen)
        st = starts[req[qi]]
        ki = st + (torch.rand(m, generator=self.gen) * (qi - st + 1).double()).long().clamp(max=qi - st)
        hi = torch.randint(0, q_abs.shape[1], (m,), generator=self.gen)
        dev = q_abs.device
        q = (q_abs[qi.to(dev), hi.to(dev)].float() * gamma.float()).cpu()
        k = u[ki.to(dev)].float().cpu()
        return q, k

    def _reservoir(self, layer, q, k) -> None:
        n = self.max_pairs
        if layer not in self.q:
            self.q[layer] = torch.zeros(0, q.shape[1])
            self.k[layer] = torch.zeros(0, k.shape[1])
            self.seen[layer] = 0
        have = self.q[layer].shape[0]
        take = min(n - have, q.shape[0])
        if take > 0:
            self.q[layer] = torch.cat([self.q[layer], q[:take]])
            self.k[layer] = torch.cat([self.k[layer], k[:take]])
            self.seen[layer] += take
        for i in range(take, q.shape[0]):  # classic reservoir: keep each candidate with prob n/seen
            self.seen[layer] += 1
            j = int(torch.randint(0, self.seen[layer], (1,), generator=self.gen))
            if j < n:
                self.q[layer][j] = q[i]
                self.k[layer][j] = k[i]

    # ------------------------------------------------------------------ flushing

    def snapshot(self) -> dict:
        layers = sorted(self.sums)
        return {
            "run_id": self.run_id,
            "identity": self.identity,
            "error": self.error,
            "layers": layers,
            "sums": [self.sums[i].clone() for i in layers],
            "counts": [self.counts[i] for i in layers],
            "key_sums": [self.key_sums[i].clone() for i in layers],
            "query_sums": [self.q_sums[i].clone() for i in layers],
            "query_counts": [self.q_counts[i] for i in layers],
            "lsq_queries": [self.q.get(i, torch.zeros(0)).clone() for i in layers],
            "lsq_keys": [self.k.get(i, torch.zeros(0)).clone() for i in layers],
        }

    def flush(self) -> None:
        with self.lock:
            snap = self.snapshot()
            self.dirty = False
        path = os.path.join(self.dir, MOMENTS_FILE)
        tmp = path + f".tmp{os.getpid()}"
        torch.save(snap, tmp)
        os.replace(tmp, path)

    def _flush_loop(self) -> None:
        while True:
            time.sleep(0.2)
            try:
                if self.dirty and time.time() - self.last_update >= IDLE_FLUSH_S:
                    self.flush()
            except Exception:  # noqa: BLE001 - never kill the server over a statistics file
                logger.exception("TPLA calibration: flushing %s failed", self.dir)


_state: _State | None = None


def _is_rank0() -> bool:
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().attn_tp_group.rank_in_group == 0


def _get_state() -> _State | None:
    global _state
    if _state is None:
        if not _is_rank0():
            return None
        _state = _State(os.environ[ENV_DIR], int(os.environ.get(ENV_PAIRS, "512") or 0))
    return _state


def _dispatch(orig, self, forward_batch):
    method = orig(self, forward_batch)
    if forward_batch.forward_mode.is_decode_or_idle() or getattr(self, "tpla", None) is not None:
        return method
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod

    return AttnForwardMethod.MLA


def _record_input(module, args):
    module._tpla_calib_input = args[0]


def _prepare(orig, self, positions, hidden_states, forward_batch, *args, **kwargs):
    mode = forward_batch.forward_mode
    if not mode.is_extend() or mode.is_target_verify() or getattr(self, "tpla", None) is not None:
        return orig(self, positions, hidden_states, forward_batch, *args, **kwargs)
    state = _get_state()
    if state is None:
        return orig(self, positions, hidden_states, forward_batch, *args, **kwargs)
    if self.layer_id == 0:
        state._armed_now = state.armed()
    if not getattr(state, "_armed_now", False):
        return orig(self, positions, hidden_states, forward_batch, *args, **kwargs)
    ln = self.kv_a_layernorm
    if not getattr(ln, "_tpla_calib_hooked", False):
        ln.register_forward_pre_hook(_record_input)
        ln._tpla_calib_hooked = True
    ln._tpla_calib_input = None
    out = orig(self, positions, hidden_states, forward_batch, *args, **kwargs)
    c = ln._tpla_calib_input
    ln._tpla_calib_input = None
    if c is None:
        raise RuntimeError("TPLA calibration: kv_a_layernorm was not called in forward_absorb_prepare; cannot capture")
    c = c.reshape(-1, self.kv_lora_rank)
    q_abs = out[2]  # q_nope_out [T, H_loc, r]
    if q_abs.shape[-1] == self.qk_nope_head_dim and self.qk_nope_head_dim != self.kv_lora_rank:
        # backends that fuse the W_UK bmm into attention hand back the un-absorbed q_nope
        q_abs = torch.einsum("thn,hnr->thr", q_abs.float(), self.w_kc.float())
    elif q_abs.shape[-1] != self.kv_lora_rank:
        raise RuntimeError(f"TPLA calibration: unexpected absorbed query shape {tuple(q_abs.shape)}")
    seq_lens = forward_batch.extend_seq_lens_cpu
    if c.shape[0] != sum(seq_lens):  # padded batches: keep the real tokens
        c, q_abs = c[: sum(seq_lens)], q_abs[: sum(seq_lens)]
    state.add(self.layer_id, c, float(ln.variance_epsilon), q_abs, ln.weight.data, seq_lens)
    return out


def _after_load(result, self, *args, **kwargs):
    if kwargs.get("is_nextn") or (args and args[0]):
        return result
    layers = [self.model.layers[i].self_attn for i in range(self.model.start_layer, self.model.end_layer)]
    problems = []
    if getattr(self.config, "tpla_transform", None):
        problems.append("the checkpoint was converted by sglang_tpla.convert (rotated latent)")
    from .runtime import tpla_requested

    if tpla_requested() or any(getattr(a, "tpla", None) is not None for a in layers):
        problems.append("TPLA is on (--decode-attention-backend tpla)")
    if getattr(self.config, "tpla", None):
        problems.append('"tpla" options were given')
    state = _get_state()
    if problems:
        raise RuntimeError(
            "TPLA calibration needs the checkpoint's own latent basis (plain MLA), but " + "; ".join(problems)
            + ". Calibrate the original, unconverted checkpoint without TPLA options."
        )
    if state is not None:
        from .weights import model_identity

        state.identity = model_identity(self, layers).__dict__
        state.num_layers = len(layers)
        state.dirty, state.last_update = True, time.time()
    return result


def install() -> None:
    if not os.environ.get(ENV_DIR):
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGETS[0], _dispatch, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS[1], _prepare, HookType.AROUND)
    HookRegistry.register(HOOK_TARGETS[2], _after_load, HookType.AFTER)
