"""Which TPLA decode implementation runs where, and why (logged by the ``tpla`` backend).

* CPU: the plain-PyTorch path (``torch``).
* CUDA: FlashInfer's MLA wrapper (primary) with ``head_dim_ckv = 512/g``: fa3 on Hopper for
  ckv in {128, 256, 512}, fa2 on SM80+ for ckv a multiple of 128.  Refused, with the Triton
  kernel as fallback, when flashinfer is missing or older than 0.7.2 (its fa3 kernel is
  silently wrong for ckv != 512 before that), when ckv is 64 (no FlashInfer MLA backend takes
  it), when the dtype is not fp16/bf16, or when the KV cache is fp8 (FlashInfer 0.7.2 reads
  fp8 MLA KV only at ckv 512 with a per-tensor scale plan; the Triton kernel reads fp8 rows at
  every slice width).
* ``SGLANG_TPLA_IMPL=torch|triton|flashinfer`` forces a choice (refused if impossible).

Pure Python (packaging only): no torch, no sglang.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_FLASHINFER = "0.7.2"
IMPLS = ("torch", "triton", "flashinfer")


@dataclass(frozen=True)
class Choice:
    impl: str
    reason: str
    flashinfer_backend: str | None = None  # "fa3" / "fa2"


def _version_ok(version: str) -> bool:
    from packaging.version import Version

    return Version(version) >= Version(MIN_FLASHINFER)


def flashinfer_refusal(
    sm: tuple[int, int] | None, d_ckv: int, dtype: str, version: str | None, kv_dtype: str | None = None
) -> tuple[str | None, str]:
    """(backend, "") if FlashInfer MLA can run this, else (None, why not)."""
    if kv_dtype is not None and kv_dtype.startswith("float8"):
        return None, (
            f"{kv_dtype} KV cache: FlashInfer MLA reads fp8 KV only at head_dim_ckv 512 (this slice is {d_ckv}); "
            "the Triton kernel reads fp8 rows"
        )
    if version is None:
        return None, "flashinfer is not installed"
    if not _version_ok(version):
        return None, f"flashinfer {version} < {MIN_FLASHINFER}: its fa3 MLA kernel is silently wrong for head_dim_ckv != 512"
    if d_ckv == 64:
        return None, "no FlashInfer MLA backend accepts head_dim_ckv 64 (TP slice 512/8)"
    if dtype not in ("float16", "bfloat16"):
        return None, f"FlashInfer MLA needs fp16/bf16 queries and KV, got {dtype}"
    if sm is None or sm < (8, 0):
        return None, f"FlashInfer MLA needs SM80+, device is {sm}"
    if (9, 0) <= sm < (10, 0) and d_ckv in (128, 256, 512):
        return "fa3", ""
    if d_ckv % 128 == 0:
        return "fa2", ""
    return None, f"head_dim_ckv {d_ckv} is not a multiple of 128 (fa2)"


def choose(
    device_type: str,
    d_ckv: int,
    dtype: str,
    sm: tuple[int, int] | None = None,
    flashinfer_version: str | None = None,
    forced: str | None = None,
    kv_dtype: str | None = None,
) -> Choice:
    """The implementation for one rank: ``dtype`` (queries) and ``kv_dtype`` (the KV cache, default
    ``dtype``) as torch dtype names (``"bfloat16"``, ``"float8_e4m3fn"``)."""
    if forced and forced not in IMPLS:
        raise ValueError(f"SGLANG_TPLA_IMPL={forced!r}: choose one of {list(IMPLS)}")
    if device_type != "cuda":
        if forced and forced != "torch":
            raise ValueError(f"SGLANG_TPLA_IMPL={forced} needs a CUDA device; this rank runs on {device_type}")
        return Choice("torch", f"{device_type} device: plain-PyTorch path")
    if forced == "torch":
        return Choice("torch", "forced by SGLANG_TPLA_IMPL=torch")
    backend, why_not = flashinfer_refusal(sm, d_ckv, dtype, flashinfer_version, kv_dtype)
    if forced == "flashinfer":
        if backend is None:
            raise ValueError(f"SGLANG_TPLA_IMPL=flashinfer refused: {why_not}")
        return Choice("flashinfer", "forced by SGLANG_TPLA_IMPL=flashinfer", backend)
    if forced == "triton":
        return Choice("triton", "forced by SGLANG_TPLA_IMPL=triton")
    if backend is not None:
        return Choice("flashinfer", f"FlashInfer {flashinfer_version} MLA {backend}, head_dim_ckv {d_ckv}, SM{sm[0]}{sm[1]}", backend)
    return Choice("triton", f"Triton fallback: {why_not}")
