"""Compute dtype: which mixed precision a run uses, its autocast region, and its peak memory."""

from __future__ import annotations

import resource
from contextlib import nullcontext

import torch

from ec_lora_t.training.config import MIXED_PRECISION_CHOICES

COMPUTE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_mixed_precision(mixed_precision: str, device_type: str) -> str:
    """'auto' -> bf16 on a CUDA GPU, 'no' (fp32) elsewhere; other values pass through."""
    if mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {mixed_precision!r}")
    if mixed_precision == "auto":
        return "bf16" if device_type == "cuda" else "no"
    return mixed_precision


def autocast(device: torch.device, mixed_precision: str):
    """The autocast region of a mixed precision on `device` ('auto' resolved), or no region for fp32."""
    mixed_precision = resolve_mixed_precision(mixed_precision, device.type)
    if mixed_precision == "no":
        return nullcontext()
    return torch.autocast(device.type, dtype=COMPUTE_DTYPES[mixed_precision])


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by torch, or the process's peak RSS on a CPU (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
