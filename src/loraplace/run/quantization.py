"""Quantized base models (QLoRA): the frozen base projections held in 4 or 8 bits by bitsandbytes,
the adapters trained in float32 on top.

* ``nf4``: 4-bit NormalFloat with double quantisation (the block scales quantized again) and
  bfloat16 compute: QLoRA (Dettmers et al., 2023, arXiv:2305.14314).
* ``int8``: LLM.int8() (Dettmers et al., 2022, arXiv:2208.07339): 8-bit weights with a
  float16 path for outlier features.

transformers quantizes while loading (``BitsAndBytesConfig``), PEFT wraps the quantized layers
with its bitsandbytes LoRA layers and prepares the model (``prepare_model_for_kbit_training``);
loraplace adds a check that refuses, before anything trains, where bitsandbytes cannot run
(:func:`check_quantization`), and keeps the shared base model the same for every run
(:func:`prepare_quantized`). Parameters are counted by their real shape
(:func:`loraplace.placement.params.param_count`): a 4-bit tensor holds two weights per byte.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from typing import Any

import torch
from peft import prepare_model_for_kbit_training
from torch import nn
from transformers import BitsAndBytesConfig

from loraplace.errors import LoraplaceError

QUANTIZATIONS = ("none", "nf4", "int8")

BITSANDBYTES_MIN = "0.50.2"
"""The bitsandbytes version whose CPU backend was checked to train LoRA on 4-bit and 8-bit
models (the ``quant`` extra of pyproject.toml asks for it)."""

INSTALL_HINT = "pip install 'loraplace[quant]'"


def bnb_config(quantization: str):
    """The ``transformers.BitsAndBytesConfig`` of a quantization name, or None for ``none``."""
    if quantization == "none":
        return None

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise LoraplaceError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _drop_int8_cast_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_bitsandbytes() -> None:
    """Silence LLM.int8()'s note, at every evaluation call, that float32 inputs are cast to float16
    (how int8 matmuls work; the import-time warning of bitsandbytes' CPU backend is silenced in
    :mod:`loraplace`'s ``__init__``, before anything imports bitsandbytes)."""
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_note)  # once: a set


def check_quantization(quantization: str, device: torch.device) -> None:
    """Refuse a quantized base model where bitsandbytes cannot run it; nothing for ``none``.

    Raises:
        LoraplaceError: bitsandbytes is not installed, older than :data:`BITSANDBYTES_MIN`, or has
            no backend for ``device``; the message says what to install or change.
    """
    if quantization == "none":
        return
    need = f"quantization={quantization} needs bitsandbytes>={BITSANDBYTES_MIN}"
    fallback = "or set quantization=none"
    try:
        _quiet_bitsandbytes()
        bnb = importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise LoraplaceError(f"{need}, which is not installed ({e}); {INSTALL_HINT}, {fallback}") from None
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(bnb, "__version__", "0")
    if _version_tuple(version) < _version_tuple(BITSANDBYTES_MIN):
        raise LoraplaceError(f"{need}, found {version}; pip install -U 'loraplace[quant]', {fallback}")
    supported = set(getattr(bnb, "supported_torch_devices", ()))
    if device.type not in supported:
        raise LoraplaceError(
            f"{need} with a backend for {device.type}; bitsandbytes {version} runs on "
            f"{', '.join(sorted(supported)) or 'no device here'}: use --device cuda (a CUDA GPU) or --device cpu, "
            f"{fallback}"
        )


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The model's bitsandbytes layers (``Linear4bit``, ``Linear8bitLt``); [] without bitsandbytes."""
    try:
        import bitsandbytes as bnb  # deferred: optional (the quant extra), and slow to import
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def prepare_quantized(model: Any) -> Any:
    """Ready a freshly loaded quantized model for LoRA training, once, in place; returns it.

    PEFT's ``prepare_model_for_kbit_training`` with ``use_gradient_checkpointing=False``
    (loraplace switches checkpointing on and off itself: :func:`loraplace.run.training.checkpointing`):
    it freezes every parameter and casts float16/bfloat16 parameters that are not quantized
    (norms, embeddings, heads) to float32, which loading in float32 already did; without
    checkpointing it adds no input-gradient hook. Done at load, so every run starts from it.

    On CPUs with AVX512-BF16, bitsandbytes rewrites a 4-bit weight into a CPU inference layout at
    the first forward in eval mode without gradients (an evaluation); that layout rounds the
    block scales to bfloat16 and its matmul has no backward, so LoRA trained afterwards on the
    same model (the next run, or the rest of a run after a periodic evaluation) got no gradients
    at all. Switching it off keeps one layout and one code path for training and evaluation.
    """
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for layer in quantized_layers(model):
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    return model
