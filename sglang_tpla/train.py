"""Train a small DeepSeek-V3-architecture model (real MLA dims) on a local corpus, on CPU.

``python -m sglang_tpla.train --out DIR [--minutes M] [--steps N] [--seed S]`` builds the corpus
and a byte-level BPE tokenizer, trains, and writes a complete model directory (same layout as
:func:`sglang_tpla.tiny_model.build_tiny_model_dir`: ``config.json``, ``model.safetensors`` in
bf16, ``tokenizer.json`` + ``tokenizer_config.json``) plus ``training_curve.csv``/``.png``,
``TRAINING.md``, and the held-out documents (``heldout.jsonl``, one ``{"source", "text"}`` per
line, and ``heldout.txt``, the same texts separated by blank lines) for the fidelity evaluation.

Corpus (no hub, no network; the same files exist on every machine built from the project's
Debian image with the project venv), built by :func:`build_corpus`:

* ``stdlib``: docstrings (module, class and function; ``ast.get_docstring``) of the ``*.py``
  files of the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``),
  skipping ``site-packages``, ``test``/``tests``, ``idlelib``, ``lib2to3``, ``turtledemo``;
  one document per module.
* ``licenses``: the files of ``/usr/share/common-licenses``.
* ``debian-copyright``: ``/usr/share/doc/*/copyright`` (the first 6000 characters of each).
* ``pypi-readme``: the long description (the body after the header block) of every
  ``*.dist-info/METADATA`` in the interpreter's ``purelib`` (the venv's site-packages).

Every file list is sorted; paragraphs (blank-line separated, whitespace-normalised) are
deduplicated across the whole corpus in that order (license texts repeat a lot); documents
left with fewer than 200 characters are dropped.  Documents go to held-out when
``sha1(f"{seed}:{source}:{name}") % 40 == 0`` (about 2.5 %).

Options for a model whose latent is spread out (``tests/assets/tiny-deepseek-spread``; see
``results/fidelity/spectrum.md``): ``--heads`` (default 4); ``--retrieval-frac F`` replaces that share of each
batch's windows by synthetic key/value retrieval documents (:mod:`sglang_tpla.retrieval`; the held-out
perplexity stays on natural text only, and the exact match on ``retrieval.build_task(seed=1, n=32)`` (12
records, or ``MAX`` of ``--retrieval-pairs`` if fewer) is recorded at every evaluation); ``--answer-weight W``
counts the looked-up values' tokens ``W`` times in the loss (the only tokens learnt by copying);
``--retrieval-pairs MIN MAX`` / ``--retrieval-queries N`` set the records and lookups per training document
(fewer records: an easier start); ``--embedding-mean S``: see :func:`add_embedding_mean`;
``--kv-parametrization direct`` (``--init pytorch``): queries, keys and values trained without MLA's low-rank factors and saved as MLA
weights (:func:`mla_state_dict`; the factorised model did not learn induction,
``results/fidelity/retrieval/README.md``); ``--latent-spread L`` adds ``L`` times :func:`spread_penalty`
(``log(r / participation ratio)`` of the batch's uncentred second moment of the cached latent
``u = c / RMS(c)``, mean over layers) to the loss. Every run records the latent spectrum (:mod:`sglang_tpla.spectrum`) of
the saved weights.

The trainable module :class:`TrainableDeepseek` uses exactly the HF DeepSeek-V3 weight names of
:func:`sglang_tpla.tiny_model.random_state_dict` and is checked against
:class:`sglang_tpla.reference_model.ReferenceDeepseek` (mode ``mla``) in ``tests/test_train.py``.

Pure PyTorch + tokenizers (+ matplotlib for the plot): no sglang.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import json
import math
import os
import platform
import re
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .reference_model import rope_cos_sin, softmax_scale
from .tiny_model import save_model, tiny_config, write_tokenizer_config

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0 (bos), 1 (eos), 2 (pad): as tiny_config
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
_MIN_DOC_CHARS = 200
_MAX_COPYRIGHT_CHARS = 6000  # debian copyright files: first 6000 chars (mostly license boilerplate and name lists)
_HELDOUT_MOD = 40  # held-out: 1 document in 40


# --------------------------------------------------------------------------- corpus


@dataclass
class Document:
    source: str
    name: str
    text: str


def _stdlib_docs(stdlib: Path) -> list[tuple[str, str]]:
    out = []
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib)
        if any(part in _SKIP_STDLIB_DIRS for part in rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        docs = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node, clean=True)
                if d and len(d) >= 40 and d not in docs:
                    docs.append(d)
        if docs:
            out.append((str(rel), "\n\n".join(docs)))
    return out


def _read_text_files(paths) -> list[tuple[str, str]]:
    out, seen = [], set()
    for p in paths:
        try:
            real = p.resolve()
            if real in seen or not real.is_file():
                continue
            seen.add(real)
            out.append((str(p), real.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return out


def _metadata_descriptions(purelib: Path) -> list[tuple[str, str]]:
    out = []
    for name, text in _read_text_files(sorted(purelib.glob("*.dist-info/METADATA"))):
        head, sep, body = text.partition("\n\n")
        if sep and body.strip():
            out.append((Path(name).parent.name, body))
    return out


def corpus_sources() -> dict[str, object]:
    """Where the corpus comes from on this machine (recorded in TRAINING.md)."""
    return {
        "stdlib": sysconfig.get_paths()["stdlib"],
        "purelib": sysconfig.get_paths()["purelib"],
        "licenses": "/usr/share/common-licenses",
        "debian_doc": "/usr/share/doc",  # */copyright
        "python": platform.python_version(),
    }


def _paragraph_key(p: str) -> str:
    return hashlib.sha1(" ".join(p.split()).lower().encode()).hexdigest()


def build_corpus(seed: int = 0, sources: dict | None = None, max_chars: int | None = None) -> tuple[list[Document], list[Document]]:
    """Deterministic (train, held-out) document lists; see the module docstring."""
    src = sources or corpus_sources()
    raw: list[tuple[str, str, str]] = []
    raw += [("stdlib", n, t) for n, t in _stdlib_docs(Path(src["stdlib"]))]
    raw += [("licenses", n, t) for n, t in _read_text_files(sorted(Path(src["licenses"]).glob("*")))]
    raw += [("debian-copyright", n, t[:_MAX_COPYRIGHT_CHARS]) for n, t in _read_text_files(sorted(Path(src["debian_doc"]).glob("*/copyright")))]
    raw += [("pypi-readme", n, t) for n, t in _metadata_descriptions(Path(src["purelib"]))]
    seen: set[str] = set()
    train, held = [], []
    total = 0
    for source, name, text in raw:
        text = text.replace("\r\n", "\n").replace("\t", "    ")
        paras = []
        for p in re.split(r"\n\s*\n", text):
            p = p.rstrip()
            if not p.strip():
                continue
            k = _paragraph_key(p)
            if k in seen:
                continue
            seen.add(k)
            paras.append(p)
        body = "\n\n".join(paras).strip()
        if len(body) < _MIN_DOC_CHARS:
            continue
        doc = Document(source, name, body)
        h = int(hashlib.sha1(f"{seed}:{source}:{name}".encode()).hexdigest(), 16)
        (held if h % _HELDOUT_MOD == 0 else train).append(doc)
        total += len(body)
        if max_chars is not None and total >= max_chars:
            break
    return train, held


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts, vocab_size: int = 4096):
    """Byte-level BPE (``tokenizers``); ids 0..2 are ``<s>``, ``</s>``, ``<pad>``; encodings start with ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    return tok


def save_bpe_tokenizer(path: str | Path, tok) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return write_tokenizer_config(path)


def encode_documents(tok, docs: list[Document]) -> list[list[int]]:
    """Token ids per document: ``<s> text </s>``."""
    encs = tok.encode_batch([d.text for d in docs])
    return [e.ids + [1] for e in encs]


# --------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _lin(i: int, o: int) -> nn.Linear:
    return nn.Linear(i, o, bias=False)


class Attention(nn.Module):
    """MLA, non-absorbed.  ``direct_kv`` (``--kv-parametrization direct``): queries, keys and values straight
    from the normalised residual (``q_proj``, ``kv_proj``, ``k_pe_proj``) instead of through the query low-rank
    and the latent; :func:`mla_state_dict` writes the same function as MLA weights."""

    def __init__(self, cfg: dict, direct_kv: bool = False):
        super().__init__()
        hid, self.heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.nope, self.rope, self.vdim, self.r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
        eps = float(cfg["rms_norm_eps"])
        qk = self.nope + self.rope
        self.q_lora = bool(cfg.get("q_lora_rank")) and not direct_kv
        if self.q_lora:
            self.q_a_proj = _lin(hid, cfg["q_lora_rank"])
            self.q_a_layernorm = RMSNorm(cfg["q_lora_rank"], eps)
            self.q_b_proj = _lin(cfg["q_lora_rank"], self.heads * qk)
        else:
            self.q_proj = _lin(hid, self.heads * qk)
        self.direct_kv = direct_kv
        if direct_kv:
            self.k_pe_proj = _lin(hid, self.rope)
            self.kv_proj = _lin(hid, self.heads * (self.nope + self.vdim))
        else:
            self.kv_a_proj_with_mqa = _lin(hid, self.r + self.rope)
            self.kv_a_layernorm = RMSNorm(self.r, eps)
            self.kv_b_proj = _lin(self.r, self.heads * (self.nope + self.vdim))
        self.o_proj = _lin(self.heads * self.vdim, hid)
        self.scale = softmax_scale(cfg)
        self.keep_latent = False  # set by train(): keep u = c / RMS(c) of the last forward (spread penalty)
        self.last_u = None

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(b, t, self.heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], -1)
        if self.direct_kv:
            k_pe, kv = self.k_pe_proj(x), self.kv_proj(x).view(b, t, self.heads, self.nope + self.vdim)
        else:
            c, k_pe = self.kv_a_proj_with_mqa(x).split([self.r, self.rope], -1)
            if self.keep_latent:
                self.last_u = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.kv_a_layernorm.eps)
            kv = self.kv_b_proj(self.kv_a_layernorm(c)).view(b, t, self.heads, self.nope + self.vdim)
        k_nope, v = kv.split([self.nope, self.vdim], -1)
        q_pe = _rope(q_pe, cos, sin)
        k_pe = _rope(k_pe.unsqueeze(2), cos, sin).expand(b, t, self.heads, self.rope)
        qh = torch.cat([q_nope, q_pe], -1).transpose(1, 2)
        kh = torch.cat([k_nope, k_pe], -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, kh, v.transpose(1, 2), is_causal=True, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.heads * self.vdim))


def _rope(x, cos, sin):
    """Interleaved (GPT-J) rotation as :func:`sglang_tpla.reference_model.apply_rope`; ``x [B, T, H, rope]``, cos ``[T, rope/2]``."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.gate_proj = _lin(cfg["hidden_size"], cfg["intermediate_size"])
        self.up_proj = _lin(cfg["hidden_size"], cfg["intermediate_size"])
        self.down_proj = _lin(cfg["intermediate_size"], cfg["hidden_size"])

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: dict, direct_kv: bool = False):
        super().__init__()
        eps = float(cfg["rms_norm_eps"])
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        if direct_kv:  # gains at 1, not trained: mla_state_dict's latent is then the same length at every token
            self.input_layernorm.weight.requires_grad_(False)
        self.self_attn = Attention(cfg, direct_kv)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Backbone(nn.Module):
    def __init__(self, cfg: dict, direct_kv: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([Layer(cfg, direct_kv) for _ in range(cfg["num_hidden_layers"])])
        self.norm = RMSNorm(cfg["hidden_size"], float(cfg["rms_norm_eps"]))


class TrainableDeepseek(nn.Module):
    """Dense DeepSeek-V3 with MLA (non-absorbed, causal, full sequences); ``state_dict()`` keys are the HF names
    (``direct_kv``: but for each layer's ``q_proj``/``kv_proj``/``k_pe_proj``; :func:`mla_state_dict` gives the
    HF ones)."""

    def __init__(self, cfg: dict, direct_kv: bool = False):
        super().__init__()
        if cfg.get("first_k_dense_replace", 0) < cfg["num_hidden_layers"]:
            raise ValueError("dense layers only")
        narrow = min(cfg["kv_lora_rank"], cfg.get("q_lora_rank") or cfg["kv_lora_rank"])
        if direct_kv and cfg["hidden_size"] > narrow:
            raise ValueError(f"direct queries/keys/values need hidden_size <= kv_lora_rank and q_lora_rank "
                             f"({cfg['hidden_size']} > {narrow}): the latents that mla_state_dict writes are "
                             "isometric copies of the normalised residual")
        self.cfg, self.direct_kv = cfg, direct_kv
        self.model = _Backbone(cfg, direct_kv)
        self.lm_head = _lin(cfg["hidden_size"], cfg["vocab_size"])

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "TrainableDeepseek":
        gen = torch.Generator().manual_seed(seed)
        n_layers = self.cfg["num_hidden_layers"]
        with torch.no_grad():
            for name, p in sorted(self.named_parameters()):
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                else:
                    s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, T]`` (positions 0..T-1) -> logits ``[B, T, V]``."""
        t = ids.shape[1]
        cos, sin = rope_cos_sin(self.cfg, torch.arange(t))
        cos, sin = cos.float(), sin.float()
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.model.norm(h))


def mla_state_dict(model: TrainableDeepseek, seed: int = 0) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as a DeepSeek checkpoint (HF names, fp32).  For a ``direct_kv`` model each layer's
    keys and values go through the latent exactly: with ``n`` the normalised residual (input gains 1, so
    ``|n|^2 = hidden``) and ``Q [r, hidden]`` orthonormal columns (seeded), ``kv_a_proj_with_mqa = [Q; W_pe]``
    makes ``c = Q n`` (``|c|^2 = hidden`` at every token), ``kv_a_layernorm`` (gain 1) multiplies it by
    ``sqrt(r / hidden)``, and ``kv_b_proj = W_kv Q^T sqrt(hidden / r)`` gives back ``W_kv n`` (up to the norms'
    eps).  The latent then has rank ``hidden``.  With a ``q_lora_rank`` the queries go through ``q_a_proj``,
    ``q_a_layernorm``, ``q_b_proj`` the same way."""
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if not model.direct_kv:
        return sd
    r, hid = model.cfg["kv_lora_rank"], model.cfg["hidden_size"]
    gen = torch.Generator().manual_seed(seed + 3)
    for i in range(model.cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}.self_attn."
        q, _ = torch.linalg.qr(torch.randn(r, hid, generator=gen, dtype=torch.float64))
        w_pe, w_kv = sd.pop(pre + "k_pe_proj.weight"), sd.pop(pre + "kv_proj.weight")
        sd[pre + "kv_a_proj_with_mqa.weight"] = torch.cat([q.float(), w_pe])
        sd[pre + "kv_a_layernorm.weight"] = torch.ones(r)
        sd[pre + "kv_b_proj.weight"] = (w_kv.double() @ q.T * math.sqrt(hid / r)).float()
        if rq := model.cfg.get("q_lora_rank"):
            q, _ = torch.linalg.qr(torch.randn(rq, hid, generator=gen, dtype=torch.float64))
            w_q = sd.pop(pre + "q_proj.weight")
            sd[pre + "q_a_proj.weight"] = q.float()
            sd[pre + "q_a_layernorm.weight"] = torch.ones(rq)
            sd[pre + "q_b_proj.weight"] = (w_q.double() @ q.T * math.sqrt(hid / rq)).float()
    return sd


def load_trainable(cfg: dict, state_dict: dict[str, torch.Tensor]) -> TrainableDeepseek:
    m = TrainableDeepseek(cfg)
    m.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return m


# --------------------------------------------------------------------------- training


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``[N, seq_len + 1]`` windows (inputs + shifted targets) of a token stream."""
    n = (stream.numel() - 1) // seq_len
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return stream[idx]


@torch.no_grad()
def mean_nll(model: TrainableDeepseek, wins: torch.Tensor, batch: int = 8) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, wins.shape[0], batch):
        w = wins[i : i + batch]
        logits = model(w[:, :-1])
        tot += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        n += w[:, 1:].numel()
    model.train()
    return tot / max(n, 1)


def unigram_nll(train_stream: torch.Tensor, targets: torch.Tensor, vocab: int) -> float:
    """Held-out mean NLL of an add-one-smoothed unigram model fit on the training tokens."""
    counts = torch.bincount(train_stream, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[targets.flatten()].mean())


def spread_penalty(u: torch.Tensor) -> torch.Tensor:
    """``log(r * sum(lambda^2) / (sum lambda)^2)`` of the batch's uncentred second moment ``M = U^T U / N`` of the
    cached latent ``u [.., r]`` (``lambda`` its eigenvalues, ``||M||_F^2 = sum lambda^2``): 0 for an isotropic
    latent, ``log r`` for a rank-1 one (``r`` / participation ratio)."""
    u = u.reshape(-1, u.shape[-1]).float()
    m = u.T @ u / u.shape[0]
    return torch.log(u.shape[-1] * m.pow(2).sum() / torch.diagonal(m).sum().pow(2))


def retrieval_windows(tok, seed: int, start_doc: int, n: int, seq_len: int, n_pairs: tuple[int, int] = (4, 16),
                      n_queries: int = 6) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``n`` ``[seq_len + 1]`` windows of :func:`sglang_tpla.retrieval.training_document` s ``start_doc, ..``
    (``n_pairs``, ``n_queries`` as there; ``<s> text </s>`` each, packed, the last one cut); returns the
    windows, a ``[n, seq_len + 1]`` bool mask of the tokens that are looked-up values
    (:func:`sglang_tpla.retrieval.answer_spans`: what the model can only get right by copying from the
    records), and the next document index."""
    from .retrieval import answer_spans, training_document

    rows, masks, i = [], [], start_doc
    for _ in range(n):
        ids: list[int] = []
        mask: list[bool] = []
        while len(ids) < seq_len + 1:
            text = training_document(seed, i, n_pairs=n_pairs, n_queries=n_queries)
            enc = tok.encode(text)
            spans = answer_spans(text)
            ids += enc.ids + [1]
            mask += [any(lo < b and hi > a for a, b in spans) for lo, hi in enc.offsets] + [False]
            i += 1
        rows.append(ids[: seq_len + 1])
        masks.append(mask[: seq_len + 1])
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool), i


@torch.no_grad()
def retrieval_exact_match(model: "TrainableDeepseek", tok, seed: int = 1, n: int = 32, n_pairs: int = 12) -> float:
    """Greedy exact match on :func:`sglang_tpla.retrieval.build_task` (``seed``, ``n``, ``n_pairs``) with the
    trainable model (exact MLA, full recompute per generated token)."""
    from . import retrieval as R

    model.eval()
    outs, exs = [], R.build_task(seed, n, n_pairs=n_pairs)
    for ex in exs:
        ids = tok.encode(ex.prompt).ids
        new: list[int] = []
        for _ in range(len(tok.encode(ex.answer, add_special_tokens=False).ids) + 1):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == 1:
                break
            new.append(nxt)
        outs.append(tok.decode(new))
    model.train()
    return R.score(outs, exs)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean NLL of ``targets [B, T]`` under ``logits [B, T, V]``; with ``weight [B, T]`` the weighted mean
    (``--answer-weight``: the looked-up values count that many times; the reported loss is this mean)."""
    if weight is None:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (nll * weight.flatten()).sum() / weight.sum()


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class TrainArgs:
    out: str
    minutes: float = 22.0
    steps: int = 0  # 0: as many as fit in `minutes` (schedule length fixed after 10 steps)
    seed: int = 0
    seq_len: int = 512
    batch: int = 4
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 16
    vocab: int = 4096
    layers: int = 3
    hidden: int = 512  # >= kv_lora_rank: a narrower model has a rank-deficient latent (see main())
    heads: int = 4
    intermediate: int = 768
    max_corpus_chars: int | None = None
    threads: int = 1
    retrieval_frac: float = 0.0  # share of each batch's windows that are synthetic retrieval documents
    latent_spread: float = 0.0  # weight of spread_penalty (mean over layers) in the loss
    answer_weight: float = 1.0  # loss weight of the looked-up values' tokens in retrieval windows
    retrieval_pairs: tuple[int, int] = (4, 16)  # records per training document (uniform in this range)
    retrieval_queries: int = 6  # lookups per training document (at most its records)
    embedding_mean: float = 0.0  # see add_embedding_mean() (from-scratch runs only)
    final_windows: int = 0  # held-out windows for the final perplexity (0: all)
    init_from: str | None = None  # continue from this model folder (its config, weights and tokenizer)
    fixed_latent_input: bool = False  # see fix_latent_input()
    kv_parametrization: str = "latent"  # "direct": q/k/v trained without the low-rank factors (TrainableDeepseek)
    init: str = "normal"  # "normal": N(0, 0.02) (init_weights); "pytorch": the torch.nn modules' defaults


FIXED_BY_LATENT_INPUT = ("model.embed_tokens.weight", "input_layernorm.weight", "self_attn.kv_a_proj_with_mqa.weight")


def fix_latent_input(model: "TrainableDeepseek", seed: int, reinit: bool = True) -> list[str]:
    """The ``--fixed-latent-input`` lever: what feeds the cached latent is set once and not trained
    (``reinit=False``, when continuing a model trained this way: only frozen).

    * token embeddings ``N(0, 1)`` (unit RMS: the residual stream's random, full-rank part stays as large
      as what the blocks add to it at their initial scale);
    * every layer's ``kv_a_proj_with_mqa``: the latent rows orthonormal when ``hidden >= kv_lora_rank`` (``c = Q x``
      keeps the spectrum of the normalised residual ``x``), orthonormal columns when ``hidden < kv_lora_rank``
      (an isometry: ``|c| = |x|`` is the same at every token, so ``kv_a_layernorm`` only scales by a constant and
      keys and values are linear in ``x``, as in multi-head attention); RoPE rows ``N(0, 1/hidden)``;
    * every ``input_layernorm`` gain at 1 (it could otherwise shrink channels of ``x``).

    Returns the names of the frozen parameters."""
    gen = torch.Generator().manual_seed(seed + 1)
    frozen = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(FIXED_BY_LATENT_INPUT):
                continue
            if not reinit:
                pass
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("input_layernorm.weight"):
                p.fill_(1.0)
            else:
                r, hid = model.cfg["kv_lora_rank"], p.shape[1]
                if r <= hid:
                    q, _ = torch.linalg.qr(torch.randn(hid, r, generator=gen))  # [hid, r], orthonormal columns
                    p[:r].copy_(q.T)
                else:
                    q, _ = torch.linalg.qr(torch.randn(r, hid, generator=gen))  # [r, hid], orthonormal columns
                    p[:r].copy_(q)
                p[r:].copy_(torch.randn(p.shape[0] - r, hid, generator=gen) / math.sqrt(hid))
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def add_embedding_mean(model: "TrainableDeepseek", scale: float, seed: int) -> None:
    """The ``--embedding-mean S`` lever: add one shared vector, ``S`` times the mean row norm long, to every token
    embedding.  DeepSeek's projections and norms have no bias, so on random tokens (keys, values) nothing in
    the residual stream is the same at every position, and a query cannot ask for a position (the previous
    token, the one after a match) before the embeddings have learnt such a direction; the shared vector gives
    it from the start.  Measured with a 2-layer model (``results/fidelity/retrieval/README.md``): a repeated
    random sequence is copied from 32 tokens back within 600 steps with ``S = 1`` (loss 0.003) and not at all
    without (6.235, chance 6.23).  A fixed distance is reachable by position alone: with varying distances (the
    retrieval documents, the probe's ``shifted`` task) it does not help; ``--kv-parametrization direct`` does."""
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        e = model.model.embed_tokens.weight
        d = torch.randn(e.shape[1], generator=gen)
        e += scale * e.norm(dim=1).mean() * d / d.norm()


def train(a: TrainArgs, command: str = "") -> dict:
    if a.embedding_mean and a.init_from:
        raise ValueError("--embedding-mean shapes a fresh initialisation; drop it with --init-from (the model "
                         "continued keeps its own embeddings)")
    direct = a.kv_parametrization == "direct"
    if direct and (a.init_from or a.latent_spread or a.fixed_latent_input):
        raise ValueError("--kv-parametrization direct trains keys and values without the latent: it cannot be "
                         "combined with --init-from, --latent-spread or --fixed-latent-input")
    torch.manual_seed(a.seed)
    t_start = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    train_docs, held_docs = build_corpus(a.seed, max_chars=a.max_corpus_chars)
    by_source: dict[str, list[int]] = {}
    for d in train_docs + held_docs:
        s = by_source.setdefault(d.source, [0, 0])
        s[0] += 1
        s[1] += len(d.text)
    print(f"[corpus] train {len(train_docs)} docs {sum(len(d.text) for d in train_docs):,} chars; "
          f"held-out {len(held_docs)} docs {sum(len(d.text) for d in held_docs):,} chars; {by_source}", flush=True)

    if a.init_from:
        from tokenizers import Tokenizer

        from .tiny_model import load_model

        tok = Tokenizer.from_file(str(Path(a.init_from) / "tokenizer.json"))
        init_cfg, init_sd = load_model(a.init_from, dtype=torch.float32)
        print(f"[init] continuing from {a.init_from} (its config, weights and tokenizer)", flush=True)
    else:
        tok = train_tokenizer((d.text for d in train_docs), a.vocab)
    vocab = tok.get_vocab_size()
    train_stream = torch.tensor([i for ids in encode_documents(tok, train_docs) for i in ids], dtype=torch.long)
    held_stream = torch.tensor([i for ids in encode_documents(tok, held_docs) for i in ids], dtype=torch.long)
    print(f"[tokens] vocab {vocab}; train {train_stream.numel():,} tokens; held-out {held_stream.numel():,} tokens", flush=True)

    cfg = tiny_config(
        num_hidden_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
        vocab_size=vocab, intermediate_size=a.intermediate, torch_dtype="bfloat16",
    )
    if a.init_from:
        cfg = init_cfg
        model = load_trainable(cfg, init_sd)
    else:
        torch.manual_seed(a.seed)  # the "pytorch" initialisation draws from the global generator
        model = TrainableDeepseek(cfg, direct_kv=direct)
        if a.init == "normal":
            model.init_weights(a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] {n_params:,} parameters", flush=True)
    if a.fixed_latent_input:
        frozen = fix_latent_input(model, a.seed, reinit=not a.init_from)
        print(f"[model] fixed, not trained: {len(frozen)} tensors ({', '.join(FIXED_BY_LATENT_INPUT)})", flush=True)
    if a.embedding_mean:
        add_embedding_mean(model, a.embedding_mean, a.seed)
        print(f"[model] a shared vector {a.embedding_mean} x the mean embedding norm added to every embedding",
              flush=True)

    train_wins = windows(train_stream, a.seq_len)
    held_wins = windows(held_stream, a.seq_len)
    gen = torch.Generator().manual_seed(a.seed)
    eval_idx = torch.randperm(held_wins.shape[0], generator=gen)[: a.eval_windows]
    eval_wins = held_wins[eval_idx]
    uni_nll_eval = unigram_nll(train_stream, eval_wins[:, 1:], vocab)

    n_retr = int(round(a.retrieval_frac * a.batch))
    em_pairs = min(12, a.retrieval_pairs[1])  # the exact match's records: 12, or fewer when trained on fewer
    n_text = a.batch - n_retr
    retr_doc = 0
    if n_retr:
        print(f"[retrieval] {n_retr} of {a.batch} windows per batch are synthetic retrieval documents", flush=True)
    for layer in model.model.layers:
        layer.self_attn.keep_latent = a.latent_spread > 0
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 and p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    budget = a.minutes * 60.0
    t0 = time.time()
    # the cosine schedule needs a length: the first steps calibrate the expected step count
    total_steps = a.steps or 10**9
    order = torch.randperm(train_wins.shape[0], generator=gen)
    pos = 0
    rows = []
    ema = None
    step = 0
    from tqdm import tqdm

    # progress with ETA on stderr; a time-bounded run knows its step count after 10 steps
    bar = tqdm(total=a.steps or None, unit="step", desc="train", file=sys.stderr, dynamic_ncols=True, leave=False)
    while step < total_steps:
        if pos + n_text > order.numel():
            order = torch.randperm(train_wins.shape[0], generator=gen)
            pos = 0
        w = train_wins[order[pos : pos + n_text]]
        pos += n_text
        if n_retr:
            rw, rmask, retr_doc = retrieval_windows(tok, a.seed, retr_doc, n_retr, a.seq_len, a.retrieval_pairs,
                                                    a.retrieval_queries)
            w = torch.cat([w, rw])
            weight = torch.cat([torch.zeros(n_text, a.seq_len + 1, dtype=torch.bool), rmask])[:, 1:]
            weight = 1.0 + (a.answer_weight - 1.0) * weight.float()
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, total_steps, a.lr, a.warmup)
        logits = model(w[:, :-1])
        loss = token_loss(logits, w[:, 1:], weight if n_retr and a.answer_weight != 1.0 else None)
        total = loss
        if a.latent_spread > 0:
            pen = torch.stack([spread_penalty(layer.self_attn.last_u) for layer in model.model.layers]).mean()
            total = loss + a.latent_spread * pen
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip))
        opt.step()
        step += 1
        loss_v = loss.item()
        ema = loss_v if ema is None else 0.9 * ema + 0.1 * loss_v
        elapsed = time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
        if step == 10 and not a.steps:
            # time-bounded run: fix the schedule length from the measured step time (incl. eval overhead)
            per_step = elapsed / step * (1 + 0.6 * a.eval_windows / (a.batch * a.eval_every))
            total_steps = max(step + 1, int(budget / per_step))
            print(f"[schedule] {elapsed / step:.2f} s/step -> {total_steps} steps in {a.minutes} min", flush=True)
            bar.total = total_steps
            bar.refresh()
        last = step == total_steps or elapsed > budget
        if step % a.eval_every == 0 or last or step == 1:
            held = mean_nll(model, eval_wins)
            rows.append({"step": step, "tokens": step * a.batch * a.seq_len, "elapsed_s": round(elapsed, 1),
                         "lr": opt.param_groups[0]["lr"], "train_loss": round(loss_v, 4), "train_loss_ema": round(ema, 4),
                         "heldout_nll": round(held, 4), "heldout_ppl": round(math.exp(held), 2), "grad_norm": round(gnorm, 3)})
            eta = f" (ETA {elapsed / step * (total_steps - step) / 60:.1f} min)" if total_steps < 10**9 else ""
            extra = f" spread {pen.item():.3f}" if a.latent_spread > 0 else ""
            if n_retr:
                rows[-1]["retrieval_em"] = retrieval_exact_match(model, tok, n_pairs=em_pairs)
                extra += f" retrieval exact match {rows[-1]['retrieval_em']:.3f}"
            print(f"[step {step}/{total_steps}] {elapsed:7.0f}s{eta} loss {loss_v:.3f} (ema {ema:.3f}) held-out ppl "
                  f"{math.exp(held):.1f} (unigram {math.exp(uni_nll_eval):.1f}) lr {opt.param_groups[0]['lr']:.2e} |g| {gnorm:.2f}{extra}", flush=True)
        if last:
            break
    bar.close()
    train_s = time.time() - t0
    for layer in model.model.layers:
        layer.self_attn.keep_latent, layer.self_attn.last_u = False, None

    # final: whole held-out set, bf16 weights as saved (what serving and the evaluation see)
    sd = {k: v.to(torch.bfloat16) for k, v in mla_state_dict(model, a.seed).items()}
    final_model = load_trainable(cfg, sd)
    final_wins = held_wins[: a.final_windows] if a.final_windows else held_wins
    final_nll = mean_nll(final_model, final_wins)
    uni_nll = unigram_nll(train_stream, final_wins[:, 1:], vocab)
    print(f"[final] held-out ppl {math.exp(final_nll):.2f} (bf16 weights, {final_wins.shape[0]} windows) vs unigram "
          f"{math.exp(uni_nll):.2f}", flush=True)
    from .spectrum import KS, latent_moments, spectra

    spec = spectra(latent_moments(cfg, sd, held_wins[: max(1, 16384 // (a.seq_len + 1)), :-1]))
    print("[spectrum] uncentred energy of u = c / RMS(c) in the top " + "/".join(map(str, KS)) + " PCA components: "
          + "; ".join(f"layer {i} " + "/".join(f"{v:.3f}" for v in row) for i, row in enumerate(spec["uncentred"])), flush=True)
    retr_em = retrieval_exact_match(final_model, tok, n_pairs=em_pairs) if n_retr else None
    if retr_em is not None:
        print(f"[retrieval] exact match {retr_em:.3f} (retrieval.build_task(seed=1, n=32, n_pairs={em_pairs}), bf16 "
              "weights, greedy)", flush=True)

    save_model(out, cfg, sd)
    save_bpe_tokenizer(out, tok)
    with open(out / "heldout.jsonl", "w") as f:
        for d in held_docs:
            f.write(json.dumps({"source": d.source, "name": d.name, "text": d.text}) + "\n")
    (out / "heldout.txt").write_text("\n\n".join(d.text for d in held_docs) + "\n")
    with open(out / "training_curve.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    _plot(rows, math.exp(uni_nll_eval), out / "training_curve.png")
    summary = {
        "params": n_params, "vocab": vocab, "steps": step, "schedule_steps": total_steps, "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "train_tokens_seen": step * a.batch * a.seq_len, "train_tokens": int(train_stream.numel()),
        "heldout_tokens": int(held_stream.numel()), "heldout_windows": int(final_wins.shape[0]),
        "heldout_ppl": round(math.exp(final_nll), 3), "unigram_ppl": round(math.exp(uni_nll), 3),
        "model_bytes": (out / "model.safetensors").stat().st_size,
        "load_avg_end": round(os.getloadavg()[0], 1),
        "heads": a.heads, "retrieval_frac": a.retrieval_frac, "answer_weight": a.answer_weight,
        "retrieval_pairs": list(a.retrieval_pairs), "retrieval_queries": a.retrieval_queries,
        "embedding_mean": a.embedding_mean, "latent_spread": a.latent_spread,
        "fixed_latent_input": a.fixed_latent_input, "kv_parametrization": a.kv_parametrization, "init": a.init,
        "retrieval_exact_match": retr_em, "retrieval_exact_match_records": em_pairs if n_retr else None,
        "spectrum_uncentred_top16_64_128_256": [[round(v, 4) for v in row] for row in spec["uncentred"]],
    }
    _write_report(out, a, cfg, summary, by_source, train_docs, held_docs, rows, command)
    return summary


def _plot(rows, uni_ppl, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [math.exp(r["train_loss_ema"]) for r in rows], label="train ppl (EMA)")
    ax.plot(steps, [r["heldout_ppl"] for r in rows], label="held-out ppl", marker="o", ms=3)
    ax.axhline(uni_ppl, color="gray", ls="--", label=f"unigram ppl {uni_ppl:.0f}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity (BPE tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _write_report(out, a, cfg, s, by_source, train_docs, held_docs, rows, command):
    src = corpus_sources()
    lines = [
        "# Trained tiny DeepSeek-V3 (real MLA dims)",
        "",
        f"Command: `{command}`",
        "",
        "## Corpus",
        "",
        f"Built by `sglang_tpla.train.build_corpus(seed={a.seed})` from local files only (no hub): docstrings of the "
        f"Python {src['python']} standard library at `{src['stdlib']}` (skipping test/idlelib/lib2to3/turtledemo), "
        f"`/usr/share/common-licenses/*`, `/usr/share/doc/*/copyright`, and the long descriptions in "
        f"`{src['purelib']}/*.dist-info/METADATA`. Sorted file lists, paragraph-level dedup, documents < {_MIN_DOC_CHARS} chars dropped, "
        "held-out = documents with `sha1(f'{seed}:{source}:{name}') % 40 == 0`; debian copyright files truncated to their first 6000 chars.",
        "",
        "| source | documents | chars |",
        "|---|---|---|",
        *[f"| {k} | {v[0]} | {v[1]:,} |" for k, v in by_source.items()],
        "",
        f"Train: {len(train_docs)} documents, {sum(len(d.text) for d in train_docs):,} chars, {s['train_tokens']:,} tokens. "
        f"Held-out: {len(held_docs)} documents, {sum(len(d.text) for d in held_docs):,} chars, {s['heldout_tokens']:,} tokens "
        "(`heldout.jsonl`, `heldout.txt`).",
        "",
        f"Tokenizer: byte-level BPE (`tokenizers`), vocab {s['vocab']}, `<s>`=0 (prepended), `</s>`=1, `<pad>`=2.",
        "",
        "## Model",
        "",
        f"DeepseekV3ForCausalLM, {cfg['num_hidden_layers']} dense layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads, "
        f"intermediate {cfg['intermediate_size']}, q_lora_rank {cfg['q_lora_rank']}, kv_lora_rank {cfg['kv_lora_rank']}, "
        f"qk_nope {cfg['qk_nope_head_dim']}, qk_rope {cfg['qk_rope_head_dim']}, v {cfg['v_head_dim']}, yarn rope (factor 4). "
        f"**{s['params']:,} parameters**, `model.safetensors` bf16 {s['model_bytes']:,} bytes.",
        "",
        "## Training",
        "",
        f"AdamW (betas 0.9/0.95, weight decay {a.weight_decay}), peak lr {a.lr}, {a.warmup} warmup steps then cosine to 10 %, "
        f"grad clip {a.clip}, batch {a.batch} x seq {a.seq_len}, seed {a.seed}, {a.threads} CPU thread(s) "
        f"(load average at the end {s['load_avg_end']}). "
        f"{s['steps']} steps ({s['train_tokens_seen']:,} tokens seen), {s['train_seconds']:.0f} s training, {s['total_seconds']:.0f} s total.",
        "",
        f"Reproduce without the wall-time dependence (same seed, same schedule): `python -m sglang_tpla.train --out DIR "
        f"--seed {a.seed} --batch {a.batch} --seq-len {a.seq_len} --lr {a.lr} --eval-every {a.eval_every} "
        f"--threads {a.threads} --layers {a.layers} --hidden {a.hidden} --heads {a.heads} --intermediate {a.intermediate} "
        f"--weight-decay {a.weight_decay} --retrieval-frac {a.retrieval_frac} --answer-weight {a.answer_weight} "
        f"--retrieval-pairs {a.retrieval_pairs[0]} {a.retrieval_pairs[1]} --retrieval-queries {a.retrieval_queries} "
        f"--embedding-mean {a.embedding_mean} --latent-spread {a.latent_spread} "
        f"{'--fixed-latent-input ' if a.fixed_latent_input else ''}"
        f"--kv-parametrization {a.kv_parametrization} --init {a.init} "
        + (f"--init-from {a.init_from} " if a.init_from else "") + f"--steps {s['schedule_steps']} --minutes 100000`"
        + ("" if s["steps"] == s["schedule_steps"] else f" (this run stopped at step {s['steps']} on the wall-time budget)") + ".",
        "",
        "| step | tokens | train loss (EMA) | held-out ppl |",
        "|---|---|---|---|",
        *[f"| {r['step']} | {r['tokens']:,} | {r['train_loss_ema']} | {r['heldout_ppl']} |" for r in rows],
        "",
        "(curve rows: held-out ppl on a fixed sample of held-out windows; `training_curve.csv`, `training_curve.png`)",
        "",
        "## Result",
        "",
        f"Held-out perplexity ({'the first ' if a.final_windows else 'all '}{s['heldout_windows']} held-out windows of {a.seq_len} tokens, bf16 weights as saved): "
        f"heldout_ppl = {s['heldout_ppl']}",
        "",
        f"Unigram perplexity (add-one unigram fit on the training tokens, same held-out targets): unigram_ppl = {s['unigram_ppl']}",
        "",
        "```json",
        json.dumps(s, indent=2),
        "```",
        "",
    ]
    (out / "TRAINING.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_tpla.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="model folder to write (required unless --export-corpus)")
    p.add_argument("--export-corpus", metavar="FILE",
                   help="only write the training documents as JSON lines ({\"text\": ...}; calibration data disjoint "
                   "from the held-out set) and exit")
    p.add_argument("--minutes", type=float, default=22.0, help="training wall-time budget (default 22)")
    p.add_argument("--steps", type=int, default=0, help="cosine schedule length in steps; training still stops at --minutes "
                   "(default 0: as many as fit in --minutes, measured over the first 10 steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512, help="training window length in tokens (default 512)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out evaluation every N steps (default 100)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512, help="hidden size (default 512; keep it >= kv_lora_rank 512)")
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--heads", type=int, default=4, help="attention heads (qk_nope 128, rope 64, v 128 each; default 4)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the matrices (default 0.1)")
    p.add_argument("--retrieval-frac", type=float, default=0.0,
                   help="share of each batch's windows that are synthetic key/value retrieval documents "
                   "(sglang_tpla.retrieval; default 0)")
    p.add_argument("--answer-weight", type=float, default=1.0,
                   help="loss weight of the looked-up values' tokens in the retrieval windows (the only tokens "
                   "learnt by copying from the context; default 1)")
    p.add_argument("--retrieval-pairs", type=int, nargs=2, default=[4, 16], metavar=("MIN", "MAX"),
                   help="records per retrieval training document, uniform in [MIN, MAX] (default 4 16; the "
                   "evaluation task has 12)")
    p.add_argument("--retrieval-queries", type=int, default=6,
                   help="lookups per retrieval training document, at most its records (default 6)")
    p.add_argument("--embedding-mean", type=float, default=0.0,
                   help="add one shared vector, this many times the mean embedding norm long, to every token "
                   "embedding at initialisation (positional attention on random tokens; default 0)")
    p.add_argument("--latent-spread", type=float, default=0.0,
                   help="weight of the latent spread penalty (log r/participation ratio of the batch's cached-latent "
                   "second moment, mean over layers; default 0)")
    p.add_argument("--final-windows", type=int, default=0,
                   help="held-out windows for the final perplexity (default 0: all; for quick experiments)")
    p.add_argument("--fixed-latent-input", action="store_true",
                   help="a lever that spreads the cached latent: token embeddings N(0,1), the latent down-projection "
                   "orthonormal and the input RMSNorm gains at 1, none of them trained")
    p.add_argument("--kv-parametrization", choices=("latent", "direct"), default="latent",
                   help="direct: train queries, keys and values straight from the normalised residual (multi-head "
                   "attention with MLA's head dims and RoPE; input RMSNorm gains fixed at 1) and save them as MLA "
                   "weights that compute the same function (a latent of rank hidden; needs --hidden <= 192). With the "
                   "factorised projections the model did not learn induction on CPU budgets "
                   "(results/fidelity/retrieval); default latent")
    p.add_argument("--init", choices=("normal", "pytorch"), default="normal",
                   help="normal: N(0, 0.02) weights (o/down projections scaled by depth); pytorch: torch.nn's "
                   "defaults (Linear U(+-1/sqrt(fan_in)), Embedding N(0, 1)); default normal")
    p.add_argument("--init-from", help="continue training this model folder (its config, weights and tokenizer; "
                   "--layers/--hidden/--heads/--intermediate are ignored)")
    args = p.parse_args(argv)
    if args.export_corpus:
        train_docs, _ = build_corpus(args.seed)
        with open(args.export_corpus, "w") as f:
            for d in train_docs:
                f.write(json.dumps({"source": d.source, "name": d.name, "text": d.text}) + "\n")
        print(f"[corpus] wrote {len(train_docs)} training documents to {args.export_corpus}", flush=True)
        return 0
    if not args.out:
        p.error("--out is required")
    if args.hidden < 512:
        # the latent c = W_DKV x then spans at most `hidden` of its 512 dimensions: PCA puts all of it in
        # the first shards and TPLA with PCA becomes exact for g <= 512 / hidden, which says nothing about
        # real models (DeepSeek-V3: hidden 7168)
        print(f"[train] warning: --hidden {args.hidden} < kv_lora_rank 512: the latent is rank-deficient "
              f"(rank <= {args.hidden}); PCA fidelity measured on this model is not representative", flush=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    # Flush float32 denormals to zero: with the retrieval-only mix, steps slowed from 0.61 s to 3.46 s by
    # step 388 on 2 cores, and stay at 0.65-0.81 s with this (results/fidelity/retrieval/README.md).
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cmd = "python -m sglang_tpla.train " + " ".join(sys.argv[1:] if argv is None else argv)
    s = train(TrainArgs(out=args.out, minutes=args.minutes, steps=args.steps, seed=args.seed, batch=args.batch, lr=args.lr,
                         seq_len=args.seq_len, eval_every=args.eval_every, threads=args.threads,
                         layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                         weight_decay=args.weight_decay, retrieval_frac=args.retrieval_frac,
                         latent_spread=args.latent_spread, final_windows=args.final_windows,
                         answer_weight=args.answer_weight,
                         retrieval_pairs=tuple(args.retrieval_pairs), retrieval_queries=args.retrieval_queries,
                         embedding_mean=args.embedding_mean,
                         init_from=args.init_from, fixed_latent_input=args.fixed_latent_input,
                         kv_parametrization=args.kv_parametrization, init=args.init), cmd)
    print(json.dumps(s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
