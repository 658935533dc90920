"""Parameter counting: the one place where LoRA and model sizes are computed.

A LoRA adapter on a linear map ``W0: in -> out`` adds ``A: (r, in)`` and ``B: (out, r)``,
i.e. ``r * (in + out)`` trainable parameters (no bias), and computes
``x -> W0 x + (alpha / r) B A x`` (Hu et al., 2021, arXiv:2106.09685).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lora_param_count(in_features: int, out_features: int, r: int, experts: int = 1) -> int:
    """Trainable parameters of one LoRA adapter: ``r * (in + out)``.

    ``experts`` > 1 is a mixture-of-experts parameter of shape (experts, out, in): PEFT gives
    every expert its own rank-r pair (``A: (r * experts, in)``, ``B: (out, r * experts)``).
    An ``nn.Embedding(num, dim)`` adapter is ``r * (num + dim)``: pass num as in_features.
    """
    return experts * r * (in_features + out_features)


def uniform_rank(params: int, size: int) -> int:
    """The uniform rank at which modules of summed ``size`` (``experts * (in + out)``) train nearest
    ``params`` parameters, at least 1 (budget matching's uniform rank)."""
    return max(1, round(params / size)) if size > 0 else 1


def param_count(p: torch.Tensor) -> int:
    """The number of weights a parameter holds.

    ``p.numel()``, except for a quantized 4-bit weight (bitsandbytes ``Params4bit``): it packs two
    4-bit values per byte into a ``(out * in / 2, 1)`` tensor, so its numel is half the real count,
    which its ``quant_state.shape`` ``(out, in)`` keeps. An 8-bit weight is one byte per value.
    """
    quant_state = getattr(p, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def total_params(model: nn.Module) -> int:
    """All parameters of a model, shared (tied) tensors counted once, quantized ones by their real
    shape (:func:`param_count`). Works on meta tensors."""
    return sum(param_count(p) for p in model.parameters())  # parameters() already deduplicates


def trainable_params(model: nn.Module) -> int:
    """Parameters with ``requires_grad``: what the optimizer updates."""
    return sum(param_count(p) for p in model.parameters() if p.requires_grad)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module, or None.

    Covers ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 family; weight stored as (in, out)).
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight: torch.Tensor = module.weight
        return int(weight.shape[0]), int(module.nf)
    return None


def linear_modules(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear-like module of a model: name -> (in_features, out_features), in model order."""
    found = {}
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None:
            found[name] = shape
    return found
