"""Precision: which autocast dtype a device gets for a ``*.amp`` setting, and the autocast context.
The trainers, the CAM stage and their benchmarks all take it from here."""
from __future__ import annotations

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16): there
    oneDNN's bf16 convolutions train the small backbone 2-3x faster than float32 (README,
    *Performance*); elsewhere bf16 on the CPU is emulated and slower than float32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(f()) for f in checks if f is not None)


def amp_dtype(amp: str, device: torch.device, field: str = "train.amp"):
    """The autocast dtype for ``amp`` on ``device``: bf16/fp16 on CUDA; on the CPU bf16 only where
    the CPU has native bf16 (``cpu_has_native_bf16``), else None (float32). fp16 autocast is for
    CUDA only (None on the CPU). ``none`` is float32 everywhere."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"{field}: expected one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if torch.device(device).type == "cuda":
        return dtype
    return dtype if dtype is torch.bfloat16 and cpu_has_native_bf16() else None


def autocast(device, dtype):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op for None (float32)."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32,
                          enabled=dtype is not None)
