"""Offline converter: fold a TPLA latent transform into a DeepSeek-V2/V3 / Kimi-K2 checkpoint.

``python -m sglang_tpla.convert --src CKPT --dst OUT --transform hadamard|pca [--seed S]
[--calibration FILE] [--mtp fold|keep] [--overwrite]``

The output is an ordinary HuggingFace-layout checkpoint that computes exactly the original
MLA (paper Proposition 1); only the basis of the 512-wide latent changes, per MLA layer
(:func:`sglang_tpla.transforms.fold_layer`):

* ``kv_a_proj_with_mqa.weight[:r] <- U.T @ kv_a_proj_with_mqa.weight[:r]`` (RoPE rows untouched)
* ``kv_a_layernorm.weight <- 1``
* ``kv_b_proj.weight <- kv_b_proj.weight @ diag(gamma) @ U``

so a stock SGLang prefill server (no plugin) fills its KV cache in the TPLA basis.
``U`` is the seeded randomized Hadamard matrix (``hadamard``) or the per-layer PCA rotation
of a calibration file (``pca``).  ``none`` is refused: it would fold nothing a decode node
needs (serve the source checkpoint as is).

Layers: every ``model.layers.{i}.self_attn`` with ``i < num_hidden_layers`` gets its
rotation; MLA layers beyond that (DeepSeek-V3 / Kimi-K2 MTP "nextn" layer 61, or any other
``...layers.{j}.self_attn`` in the checkpoint) are folded the same way with ``--mtp fold``
(the default; Hadamard only, a calibration file has no statistics for them) or left as they
are with ``--mtp keep``.

FP8 block-quantized checkpoints (``quantization_config`` ``{"quant_method": "fp8",
"weight_block_size": [bo, bi]}``, float8_e4m3fn weights with a ``<name>_scale_inv`` sibling of
shape ``[ceil(out/bo), ceil(in/bi)]``): in every folded layer the fp8 ones of ``q_a_proj``,
``kv_a_proj_with_mqa`` and ``kv_b_proj`` are dequantized in float32 (``fp8 * scale_inv`` per
block), folded in float64, written as bfloat16 (``--dequant-dtype``: the published checkpoints'
model dtype; ``float32`` keeps the fold exact for an fp32 server), their ``_scale_inv`` tensors
dropped, and the
modules listed in ``quantization_config["ignored_layers"]`` (and ``modules_to_not_convert``,
the HF transformers name; both hold the same list).  ``q_a_proj`` is listed because SGLang
fuses it with ``kv_a_proj_with_mqa`` into ``fused_qkv_a_proj_with_mqa`` and
``is_layer_skipped`` requires every shard of a fused layer to have the same scheme; the fused
name itself is listed too for quant configs that lack the packed-modules mapping.

Memory: tensors that the fold does not touch are copied byte for byte from the source file
(safetensors layout, fixed-size chunks); they are never deserialized.  A layer's tensors are
read only when the first of its outputs is written and kept only until its last output is
written, so the peak is one or two layers' attention projections plus a copy buffer, whatever
the checkpoint size.  Output shards keep the source file names and tensor order; the index
json is rewritten with the new sizes and without the dropped scale tensors.

Everything is written into a hidden temporary folder next to ``--dst`` and renamed at the
end, so a crash never leaves a complete-looking ``--dst``.

Pure PyTorch (the safetensors format is read and written here): no sglang.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .calibration import Calibration, CalibrationError, ModelIdentity, weights_hash
from .config import TPLAConfig
from .transforms import fold_layer, make_rotation

CONVERTIBLE = ("hadamard", "pca")
INDEX_NAME = "model.safetensors.index.json"
RECORD_KEY = "tpla_transform"
SKIP_DIRS = {".git", ".cache"}  # VCS data and huggingface_hub download metadata are not copied
_CHUNK = 64 << 20
_MAX_HEADER = 100 << 20

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_FLOATS = {"F64", "F32", "F16", "BF16"}
_FP8 = "F8_E4M3"

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<idx>\d+)\.self_attn\.)kv_a_layernorm\.weight$")
_MAIN = re.compile(r"^model\.layers\.(?P<idx>\d+)\.self_attn\.$")


class ConvertError(ValueError):
    """The conversion cannot go ahead; the message says what to change."""


def _log(msg: str) -> None:
    print(f"[tpla-convert] {msg}", file=sys.stderr, flush=True)


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------- safetensors I/O


@dataclass
class _Shard:
    path: Path
    data_start: int
    entries: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}, source order
    metadata: dict | None

    @classmethod
    def read(cls, path: Path) -> "_Shard":
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise ConvertError(f"{path} is not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER:
                    raise ConvertError(f"{path} is not a safetensors file (header of {n} bytes)")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"cannot read safetensors file {path}: {e}") from None
        meta = header.pop("__metadata__", None)
        entries = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
        return cls(path, 8 + n, entries, meta)

    def read_tensor(self, name: str) -> torch.Tensor:
        info = self.entries[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConvertError(f"{self.path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = list(info["shape"])
        numel = math.prod(shape)
        if numel * dtype.itemsize != end - begin:
            raise ConvertError(f"{self.path.name}: tensor {name} has {end - begin} bytes for shape {shape} {info['dtype']}")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(buf) != len(buf):
                raise ConvertError(f"{self.path} is truncated (tensor {name})")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


@dataclass
class _Item:
    """One output tensor: copied bytes from the source shard, or a computed tensor."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    src_offsets: tuple[int, int] | None = None  # copy from the source shard
    compute: Callable[[], torch.Tensor] | None = None


def _write_shard(path: Path, src: _Shard, items: list[_Item], metadata: dict | None) -> int:
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    for it in items:
        header[it.name] = {"dtype": it.dtype, "shape": it.shape, "data_offsets": [off, off + it.nbytes]}
        off += it.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out, open(src.path, "rb") as fin:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for it in items:
            if it.compute is None:
                begin, end = it.src_offsets
                fin.seek(src.data_start + begin)
                left = end - begin
                while left:
                    chunk = fin.read(min(_CHUNK, left))
                    if not chunk:
                        raise ConvertError(f"{src.path} is truncated (tensor {it.name})")
                    out.write(chunk)
                    left -= len(chunk)
            else:
                t = it.compute()
                if _DTYPE_NAMES.get(t.dtype) != it.dtype or list(t.shape) != it.shape:
                    raise AssertionError(f"internal: {it.name} computed as {t.dtype} {tuple(t.shape)}, planned {it.dtype} {it.shape}")
                if it.nbytes:
                    out.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        out.flush()
        os.fsync(out.fileno())
    return 8 + len(blob) + off


# --------------------------------------------------------------------------- FP8


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 ``weight * scale_inv`` with one scale per ``block = (rows, cols)`` tile (edge tiles partial)."""
    out_f, in_f = weight.shape
    bo, bi = block
    want = (math.ceil(out_f / bo), math.ceil(in_f / bi))
    if tuple(scale_inv.shape) != want:
        raise ConvertError(
            f"scale_inv of shape {tuple(scale_inv.shape)} does not fit a {out_f}x{in_f} weight with "
            f"{bo}x{bi} blocks (expected {want}); check quantization_config.weight_block_size"
        )
    s = scale_inv.float().repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
    return weight.float() * s


# --------------------------------------------------------------------------- plan


@dataclass
class _Layer:
    prefix: str  # 'model.layers.{i}.self_attn.'
    index: int
    main: bool  # a decoder layer (i < num_hidden_layers); else MTP / extra
    fold: bool
    rotation: torch.Tensor | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # key -> output dtype name
    dequantized: list[str] = field(default_factory=list)  # module names, e.g. '...self_attn.kv_b_proj'


class _Checkpoint:
    """Tensor inventory of a source checkpoint (headers only)."""

    def __init__(self, src: Path):
        self.src = src
        index_path = src / INDEX_NAME
        others = sorted(p for p in src.glob("*.safetensors.index.json") if p.name != INDEX_NAME)
        if not index_path.is_file() and others:
            if len(others) > 1:
                raise ConvertError(f"{src} has several safetensors index files {[p.name for p in others]}; keep one")
            index_path = others[0]
        self.index: dict | None = None
        self.index_name: str | None = None
        if index_path.is_file():
            self.index = json.loads(index_path.read_text())
            self.index_name = index_path.name
            wm = self.index.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise ConvertError(f"{index_path} has no weight_map")
            files = list(dict.fromkeys(wm.values()))
        else:
            files = sorted(p.name for p in src.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{src} holds no *.safetensors weights; this converter reads safetensors checkpoints only")
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise ConvertError(f"shard file(s) {missing} named by {self.index_name} are missing from {src}")
        self.shards = [_Shard.read(src / f) for f in files]
        self.where: dict[str, _Shard] = {}
        for sh in self.shards:
            for name in sh.entries:
                if name in self.where:
                    raise ConvertError(f"tensor {name} is in both {self.where[name].path.name} and {sh.path.name}")
                self.where[name] = sh
        if self.index is not None:
            wm = self.index["weight_map"]
            wrong = [k for k, f in wm.items() if k not in self.where or self.where[k].path.name != f]
            unlisted = [k for k in self.where if k not in wm]
            if wrong or unlisted:
                raise ConvertError(
                    f"{self.index_name} does not match its shards ({len(wrong)} tensor(s) misplaced or missing, "
                    f"e.g. {(wrong + unlisted)[:3]}, {len(unlisted)} unlisted); repair the checkpoint first"
                )

    def dtype(self, name: str) -> str:
        return self.where[name].entries[name]["dtype"]

    def shape(self, name: str) -> list[int]:
        return list(self.where[name].entries[name]["shape"])

    def read(self, name: str) -> torch.Tensor:
        return self.where[name].read_tensor(name)


def _fp8_block(cfg: dict) -> tuple[int, int] | None:
    qc = cfg.get("quantization_config") or {}
    if str(qc.get("quant_method", "")).lower() != "fp8":
        return None
    bs = qc.get("weight_block_size")
    if not bs or len(bs) != 2:
        return None
    return int(bs[0]), int(bs[1])


class _Loader:
    """Reads (and dequantizes) the float32 / source-dtype value of a projection weight."""

    def __init__(self, ckpt: _Checkpoint, block: tuple[int, int] | None):
        self.ckpt, self.block = ckpt, block

    def is_fp8(self, name: str) -> bool:
        dt = self.ckpt.dtype(name)
        if dt == _FP8:
            if self.block is None:
                raise ConvertError(
                    f"{name} is float8_e4m3fn but config.json has no block-wise fp8 quantization_config "
                    '({"quant_method": "fp8", "weight_block_size": [128, 128]}); only block-quantized FP8 is supported'
                )
            if name + "_scale_inv" not in self.ckpt.where:
                raise ConvertError(f"{name} is float8_e4m3fn but {name}_scale_inv is missing; only block-quantized FP8 with scale_inv tensors is supported")
            return True
        if dt not in _FLOATS:
            raise ConvertError(f"{name} has dtype {dt}; the fold needs float weights or block-quantized FP8")
        return False

    def value(self, name: str) -> torch.Tensor:
        if self.is_fp8(name):
            return dequantize_block_fp8(self.ckpt.read(name), self.ckpt.read(name + "_scale_inv"), self.block)
        return self.ckpt.read(name)


def _find_layers(ckpt: _Checkpoint, cfg: dict) -> list[_Layer]:
    n = int(cfg["num_hidden_layers"])
    layers = []
    for name in ckpt.where:
        m = _LAYER.match(name)
        if m:
            prefix, idx = m.group("prefix"), int(m.group("idx"))
            mm = _MAIN.match(prefix)
            layers.append(_Layer(prefix, idx, main=bool(mm) and idx < n, fold=True))
    layers.sort(key=lambda l: (not l.main, l.index, l.prefix))
    have = {l.index for l in layers if l.main}
    lacking = [i for i in range(n) if i not in have]
    if lacking:
        raise ConvertError(
            f"the checkpoint has no MLA attention tensors (model.layers.{{i}}.self_attn.kv_a_layernorm.weight) for "
            f"layer(s) {lacking[:8]}{'...' if len(lacking) > 8 else ''} of num_hidden_layers={n}; is it complete?"
        )
    for l in layers:
        need = [l.prefix + s for s in ("kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight")]
        gone = [k for k in need if k not in ckpt.where]
        if gone:
            raise ConvertError(f"MLA layer {l.prefix!r} lacks {gone}; is this a DeepSeek-V2/V3 / Kimi-K2 checkpoint?")
    return layers


def source_identity(ckpt: _Checkpoint, cfg: dict, loader: _Loader) -> ModelIdentity:
    """The calibration identity of the source checkpoint: latent rows of layers 0..N-1, dequantized."""
    n, r = int(cfg["num_hidden_layers"]), int(cfg["kv_lora_rank"])

    def rows() -> Iterator[torch.Tensor]:  # one layer in memory at a time
        for i in range(n):
            yield loader.value(f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight")[:r]

    arch = (cfg.get("architectures") or ["?"])[0]
    return ModelIdentity(architecture=arch, kv_lora_rank=r, num_layers=n, weights_hash=weights_hash(rows()))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not (src / "config.json").is_file():
        raise ConvertError(f"--src {src} is not a checkpoint folder (no config.json)")
    s, d = src.resolve(), dst.resolve()
    if s == d or (dst.exists() and src.exists() and os.path.samefile(src, dst)):
        raise ConvertError(f"--dst is the source folder {src}; choose a new folder for the converted checkpoint")
    if s in d.parents:
        raise ConvertError(f"--dst {dst} is inside --src {src}; choose a folder outside the source checkpoint")
    if d in s.parents:
        raise ConvertError(f"--src {src} is inside --dst {dst}; choose a --dst that does not contain the source")
    if dst.exists():
        if not dst.is_dir():
            raise ConvertError(f"--dst {dst} exists and is not a folder; remove it or choose another path")
        if any(dst.iterdir()) and not overwrite:
            raise ConvertError(f"--dst {dst} exists and is not empty; remove it, choose another folder, or pass --overwrite")


# --------------------------------------------------------------------------- convert


def convert(
    src: str | Path,
    dst: str | Path,
    transform: str,
    seed: int = 0,
    calibration: str | Path | None = None,
    mtp: str = "fold",
    overwrite: bool = False,
    dequant_dtype: str = "bfloat16",
) -> dict:
    """Convert ``src`` into ``dst``; returns the ``tpla_transform`` record written to ``dst/config.json``.

    ``dequant_dtype`` (``bfloat16``, ``float16`` or ``float32``) is the dtype the FP8 projections
    the fold dequantizes are written in (float checkpoints keep their own dtype)."""
    t0 = time.time()
    src, dst = Path(src), Path(dst)
    deq_name = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dequant_dtype)
    if deq_name is None:
        raise ConvertError(f"--dequant-dtype must be bfloat16, float16 or float32, got {dequant_dtype!r}")
    if transform == "none":
        raise ConvertError(
            "--transform none folds nothing a TPLA decode node needs (the gain fold alone does not change the "
            "latent basis); serve the source checkpoint as it is, or choose --transform hadamard or pca"
        )
    if transform not in CONVERTIBLE:
        raise ConvertError(f"unknown --transform {transform!r}; choose one of {list(CONVERTIBLE)}")
    if mtp not in ("fold", "keep"):
        raise ConvertError(f"--mtp must be 'fold' or 'keep', got {mtp!r}")
    if transform == "pca" and not calibration:
        raise ConvertError("--transform pca needs --calibration FILE, made on this checkpoint's weights (see sglang_tpla.calibration)")
    if transform == "hadamard" and calibration:
        raise ConvertError("--calibration is only used by --transform pca; drop it or use --transform pca")
    _check_paths(src, dst, overwrite)

    cfg = json.loads((src / "config.json").read_text())
    if RECORD_KEY in cfg:
        raise ConvertError(
            f"{src} is already converted ({RECORD_KEY}: {cfg[RECORD_KEY].get('fingerprint')!r}); "
            "convert the original checkpoint instead (folding twice would compose two transforms)"
        )
    arch = (cfg.get("architectures") or ["?"])[0]
    if not cfg.get("kv_lora_rank") or cfg.get("qk_rope_head_dim") is None or not cfg.get("num_hidden_layers"):
        raise ConvertError(
            f"{src} is not an MLA model ({arch}: config.json has no kv_lora_rank / qk_rope_head_dim); "
            "TPLA conversion is for DeepSeek-V2/V3 and Kimi-K2 checkpoints"
        )
    r = int(cfg["kv_lora_rank"])
    n = int(cfg["num_hidden_layers"])

    ckpt = _Checkpoint(src)
    block = _fp8_block(cfg)
    loader = _Loader(ckpt, block)
    layers = _find_layers(ckpt, cfg)
    _log(f"source {src}: {arch}, {n} layers, kv_lora_rank {r}, {len(ckpt.shards)} shard(s), {len(ckpt.where)} tensors"
         + (f", fp8 blocks {block[0]}x{block[1]}" if block else ""))

    # ---- rotations
    calib_sha = None
    calib_path = None
    if transform == "pca":
        calib_path = Path(calibration)
        ident = source_identity(ckpt, cfg, loader)
        try:
            calib = Calibration.load(calib_path, expect=ident)
        except CalibrationError as e:
            raise ConvertError(f"{e} (calibration must be taken on the source checkpoint --src {src})") from None
        calib_sha = _file_sha256(calib_path)
        for l in layers:
            if l.main:
                l.rotation = calib.rotations[l.index].to(torch.float64)
        extra = [l for l in layers if not l.main]
        if extra and mtp == "fold":
            raise ConvertError(
                f"the checkpoint has MLA layer(s) beyond num_hidden_layers={n} (MTP/nextn: "
                f"{[l.prefix for l in extra]}) and the calibration file has no statistics for them; pass --mtp keep "
                "to leave them in the original basis (exact), or use --transform hadamard"
            )
        del calib
    else:
        try:
            u = make_rotation("hadamard", r, seed)
        except ValueError as e:
            raise ConvertError(f"{e} (kv_lora_rank={r})") from None
        for l in layers:
            l.rotation = u
    for l in layers:
        if not l.main and mtp == "keep":
            l.fold, l.rotation = False, None

    # ---- what changes
    dropped: set[str] = set()
    owner: dict[str, _Layer] = {}
    for l in layers:
        if not l.fold:
            continue
        keys = [l.prefix + "kv_a_proj_with_mqa.weight", l.prefix + "kv_a_layernorm.weight", l.prefix + "kv_b_proj.weight"]
        if l.prefix + "q_a_proj.weight" in ckpt.where:
            keys.append(l.prefix + "q_a_proj.weight")
        for k in keys:
            if loader.is_fp8(k):
                l.outputs[k] = deq_name
                dropped.add(k + "_scale_inv")
                l.dequantized.append(k.removesuffix(".weight"))
            elif k.endswith("q_a_proj.weight"):
                continue  # not fp8: the fold does not touch it
            else:
                l.outputs[k] = ckpt.dtype(k)
            owner[k] = l

    def compute_layer(l: _Layer) -> dict[str, torch.Tensor]:
        p = l.prefix
        ka, kl, kb = p + "kv_a_proj_with_mqa.weight", p + "kv_a_layernorm.weight", p + "kv_b_proj.weight"
        a, ln, b = fold_layer(loader.value(ka), ckpt.read(kl), loader.value(kb), l.rotation)
        out = {ka: a, kl: ln, kb: b}
        kq = p + "q_a_proj.weight"
        if kq in l.outputs:
            out[kq] = loader.value(kq)
        res = {k: v.to(_DTYPES[l.outputs[k]]) for k, v in out.items()}
        deq = f", dequantized {[m.rsplit('.', 1)[-1] for m in l.dequantized]} -> {dequant_dtype}" if l.dequantized else ""
        _log(f"layer {l.prefix.removesuffix('.self_attn.')}: folded, {len(res)} tensors rewritten{deq}")
        return res

    # ---- disk space (exact output size is known from the plan)
    def out_nbytes(name: str) -> int:
        if name in owner:
            return math.prod(ckpt.shape(name)) * _DTYPES[owner[name].outputs[name]].itemsize
        b, e = ckpt.where[name].entries[name]["data_offsets"]
        return e - b

    total_out = sum(out_nbytes(k) for k in ckpt.where if k not in dropped)
    dst.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst.parent).free
    if free < total_out * 1.01 + (64 << 20):
        raise ConvertError(f"the converted weights need {_gb(total_out)} but {dst.parent} has {_gb(free)} free; free space or choose another --dst")

    tmp = dst.parent / f".{dst.name}.tpla-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        n_folded = 0

        def produce(name: str) -> torch.Tensor:
            nonlocal n_folded
            l = owner[name]
            if l.prefix not in pending:
                pending[l.prefix] = compute_layer(l)
                n_folded += 1
            vals = pending[l.prefix]
            t = vals.pop(name)
            if not vals:
                del pending[l.prefix]  # all of this layer's outputs are written: free them
            return t

        weight_map: dict[str, str] = {}
        written, t_write = 0, time.time()
        for si, sh in enumerate(ckpt.shards, 1):
            items: list[_Item] = []
            n_new = n_drop = 0
            for name, info in sh.entries.items():
                if name in dropped:
                    n_drop += 1
                    continue
                if name in owner:
                    n_new += 1
                    items.append(_Item(name, owner[name].outputs[name], list(info["shape"]), out_nbytes(name),
                                       compute=lambda name=name: produce(name)))
                else:
                    items.append(_Item(name, info["dtype"], list(info["shape"]), out_nbytes(name), src_offsets=tuple(info["data_offsets"])))
                weight_map[name] = sh.path.name
            _log(f"shard {si}/{len(ckpt.shards)} {sh.path.name}: {len(sh.entries)} tensors "
                 f"({n_new} rewritten, {n_drop} scale(s) dropped, {len(items) - n_new} copied)")
            size = _write_shard(tmp / sh.path.name, sh, items, sh.metadata)
            written += size
            took = time.time() - t_write
            eta = took / max(written, 1) * (total_out - written)
            _log(f"shard {si}/{len(ckpt.shards)} {sh.path.name}: wrote {_gb(size)}; "
                 f"{n_folded}/{sum(l.fold for l in layers)} layers folded, {len(pending)} held for later shards; "
                 f"{_gb(written)} of {_gb(total_out)} ({100 * written / max(total_out, 1):.0f} %) in {_eta(took)}, "
                 f"ETA {_eta(eta)}")
        if pending:
            raise AssertionError(f"internal: layers {sorted(pending)} not fully written")

        # ---- index
        if ckpt.index is not None:
            index = dict(ckpt.index)
            meta = dict(index.get("metadata") or {})
            meta["total_size"] = total_out
            index["metadata"] = meta
            index["weight_map"] = {k: weight_map[k] for k in ckpt.index["weight_map"] if k in weight_map}
            (tmp / ckpt.index_name).write_text(json.dumps(index, indent=2) + "\n")

        # ---- config
        folded = [l for l in layers if l.fold]
        record = {
            "kind": transform,
            "seed": int(seed) if transform == "hadamard" else None,
            "calibration_sha256": calib_sha,
            "fingerprint": TPLAConfig(
                transform=transform, seed=int(seed) if transform == "hadamard" else 0,
                calibration=str(calib_path) if calib_path else None,
            ).fingerprint(),
            "calibration_file": calib_path.name if calib_path else None,
            "folded_layers": [l.prefix.removesuffix(".self_attn.") for l in folded],
            "unfolded_layers": [l.prefix.removesuffix(".self_attn.") for l in layers if not l.fold],
        }
        out_cfg = dict(cfg)
        deq_modules = [m for l in folded for m in l.dequantized]
        if block is not None and deq_modules:
            qc = dict(out_cfg["quantization_config"])
            names: list[str] = list(qc.get("ignored_layers") or []) + list(qc.get("modules_to_not_convert") or [])
            for l in folded:
                p = l.prefix
                names += [p + "kv_a_proj_with_mqa", p + "kv_b_proj"]
                if p + "q_a_proj.weight" in ckpt.where:
                    names += [p + "q_a_proj", p + "fused_qkv_a_proj_with_mqa"]
            names = list(dict.fromkeys(names))
            qc["ignored_layers"] = names
            qc["modules_to_not_convert"] = names
            out_cfg["quantization_config"] = qc
            _log(f"quantization_config: {len(deq_modules)} projection(s) dequantized to {dequant_dtype}; "
                 f"{len(names)} module names in ignored_layers / modules_to_not_convert")
        out_cfg[RECORD_KEY] = record
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n")

        # ---- every other file, unchanged
        shard_names = {sh.path.name for sh in ckpt.shards}
        n_copied = 0
        for root, dirs, files in os.walk(src):
            rel = Path(root).relative_to(src)
            dirs[:] = sorted(d for d in dirs if not (rel == Path(".") and d in SKIP_DIRS))
            for f in sorted(files):
                relf = rel / f
                if rel == Path(".") and (f in shard_names or f == "config.json" or f == ckpt.index_name):
                    continue
                if f.endswith(".safetensors") or f.endswith(".safetensors.index.json"):
                    _log(f"warning: not copying {relf}: safetensors file not part of the checkpoint's index (it would hold unconverted weights)")
                    continue
                (tmp / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(root) / f, tmp / relf)  # follows symlinks (huggingface_hub snapshots)
                n_copied += 1
        _log(f"copied {n_copied} other file(s) unchanged")

        # ---- publish
        if dst.exists():
            _check_paths(src, dst, overwrite)
            old = dst.parent / f".{dst.name}.tpla-old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"done: {dst} ({record['fingerprint']}, {len(folded)} layers folded, {_gb(total_out)}) in {time.time() - t0:.1f} s")
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m sglang_tpla.convert",
        description="Fold a TPLA latent transform into a DeepSeek-V2/V3 / Kimi-K2 checkpoint, so a stock SGLang "
        "prefill server (no plugin) computes the original MLA with its KV cache in the TPLA basis.",
    )
    ap.add_argument("--src", required=True, help="source checkpoint folder (HF layout, safetensors)")
    ap.add_argument("--dst", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    ap.add_argument("--transform", required=True, choices=("hadamard", "pca", "none"),
                    help="hadamard (seeded randomized Hadamard) or pca (needs --calibration); none is refused")
    ap.add_argument("--seed", type=int, default=0, help="Hadamard sign seed (default 0; must match the decode nodes)")
    ap.add_argument("--calibration", help="TPLA calibration file for --transform pca, taken on --src")
    ap.add_argument("--mtp", choices=("fold", "keep"), default="fold",
                    help="MLA layers beyond num_hidden_layers (MTP/nextn): fold them too (default) or keep them unchanged")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst (only after the conversion succeeded)")
    ap.add_argument("--dequant-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                    help="block-FP8 checkpoints: dtype of the projections the fold dequantizes (q_a_proj, "
                    "kv_a_proj_with_mqa, kv_b_proj; default bfloat16, the published model dtype)")
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.dst, args.transform, seed=args.seed, calibration=args.calibration,
                mtp=args.mtp, overwrite=args.overwrite, dequant_dtype=args.dequant_dtype)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
