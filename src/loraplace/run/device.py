"""The device and the precision of a run: one decision, made once by the recipe and recorded.

``pick_device`` resolves ``--device`` (auto: cuda > mps > cpu), ``resolve_precision`` resolves
``train.precision`` (auto: bf16 where the hardware runs it fast), and every other module (training,
evaluation, the memory plan, the store's environment record) asks these functions instead of
deciding again.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from loraplace.errors import LoraplaceError


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; anything else is checked and returned."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise LoraplaceError(f"unknown device {requested!r}; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and device.index:
        # The Trainer trains a single-process run on cuda:0, whatever the model was moved to.
        raise LoraplaceError(
            f"--device {requested}: pick the GPU with CUDA_VISIBLE_DEVICES={device.index} and --device cuda"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoraplaceError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LoraplaceError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA with bf16 support and on CPUs with AVX512-BF16/AMX, else ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def fast_attention(device: torch.device) -> str | None:
    """The attention implementation to train with: ``eager`` on CPU, where PyTorch's SDPA backward
    (flash-attention for CPU) took twice as long as eager's matmul-softmax-matmul for this
    project's sequence lengths (<= a few hundred tokens); None (keep the model's) elsewhere."""
    return "eager" if device.type == "cpu" else None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type
