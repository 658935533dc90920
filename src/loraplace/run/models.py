"""Finding and loading models: the embedded default, local folders, hub ids, and a small
built-in table of well-known configs so that ``loraplace plan`` works offline. Which head a model
is loaded with is its task's (:mod:`loraplace.run.tasks`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoTokenizer

from loraplace import assets
from loraplace.errors import LoraplaceError
from loraplace.run.quantization import bnb_config, check_quantization, prepare_quantized
from loraplace.run.tasks import get_task, task_of

# Architecture configs of well-known checkpoints (values from their config.json), so that
# `loraplace plan` needs neither weights nor network for them.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "microsoft/DialoGPT-small": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "microsoft/DialoGPT-medium": dict(model_type="gpt2", n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024),
    "microsoft/DialoGPT-large": dict(model_type="gpt2", n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(model_type="gpt2", n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192, head_dim=64,
    ),
}
KNOWN_CONFIGS["openai-community/gpt2"] = KNOWN_CONFIGS["gpt2"]
KNOWN_CONFIGS["openai-community/gpt2-medium"] = KNOWN_CONFIGS["gpt2-medium"]


def resolve_model_path(model: str, allow_fetch: bool = True) -> str:
    """The path or hub id to hand to ``from_pretrained``; the embedded alias becomes its cache folder."""
    if model in (assets.EMBEDDED_MODEL, f"embedded:{assets.EMBEDDED_MODEL}"):
        return str(assets.ensure_model(allow_fetch=allow_fetch))
    if assets.is_gguf_file(model):  # dequantized once into the cache, then a folder like any other
        return str(assets.ensure_gguf_model(model))
    return model


def load_config(model: str) -> tuple[Any, str]:
    """A model's config without weights, and where it came from.

    Order: the embedded model's cache, a local GGUF file (dequantized into the cache once:
    :func:`loraplace.assets.ensure_gguf_model`), a local folder, the hub (or its local cache), then
    the built-in table. Returns ``(config, source)`` with source one of ``"embedded"``, ``"gguf"``,
    ``"local"``, ``"hub cache"``, ``"hub"``, ``"built-in table"``.
    """

    if model in (assets.EMBEDDED_MODEL, f"embedded:{assets.EMBEDDED_MODEL}"):
        if (assets.model_dir() / ".complete").exists():
            return AutoConfig.from_pretrained(assets.model_dir()), "embedded"
        model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if assets.is_gguf_file(model):
        return AutoConfig.from_pretrained(resolve_model_path(model)), "gguf"
    if Path(model).is_dir():
        try:
            return AutoConfig.from_pretrained(model), "local"
        except (OSError, ValueError) as e:
            raise LoraplaceError(f"{model} is a folder but holds no readable config.json: {e}") from None
    # The Hugging Face cache first, then the built-in table, and only then the network (whose
    # retries take tens of seconds when offline).
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True), "hub cache"
    except (OSError, ValueError):
        pass
    if model in KNOWN_CONFIGS:
        values = dict(KNOWN_CONFIGS[model])
        return CONFIG_MAPPING[values.pop("model_type")](**values), "built-in table"
    hub_error: Exception | None = None
    try:
        # offline() is read per call: huggingface_hub reads HF_HUB_OFFLINE only once, at import.
        return AutoConfig.from_pretrained(model, local_files_only=assets.offline()), "hub"
    except (OSError, ValueError) as e:
        hub_error = e
    known = ", ".join(sorted(KNOWN_CONFIGS))
    raise LoraplaceError(
        f"unknown model {model!r}: not a local folder, not reachable on the Hugging Face hub "
        f"({type(hub_error).__name__}), and not in the built-in table ({known})"
    )


def meta_model(config: Any) -> nn.Module:
    """The model's module tree with no memory behind its weights (meta device), with the head of
    its task (:func:`loraplace.run.tasks.task_of`): a causal LM, a seq2seq LM (T5, BART) or a sequence
    classifier (BERT, RoBERTa)."""
    with torch.device("meta"):
        return get_task(task_of(config)).auto_class.from_config(config)


def load_tokenizer(path: str):

    path = resolve_model_path(path) if assets.is_gguf_file(path) else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=assets.offline())
    except (OSError, ValueError) as e:
        raise LoraplaceError(f"could not load the tokenizer of {path!r}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        # Padding positions never carry a label, so any token id works; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, task: str = "causal-lm", num_labels: int | None = None,
               dtype: torch.dtype = torch.float32, quantization: str = "none",
               device: torch.device | None = None) -> nn.Module:
    """Load a model's weights with the head of task ``task`` (a name in :data:`loraplace.run.tasks.TASKS`;
    float32 by default: adapters train in float32 and the matmuls run under autocast).
    ``num_labels`` sizes a classification head. ``device``: where the model goes (None: stays
    on the CPU).

    ``quantization`` nf4 or int8 quantizes the linear projections with bitsandbytes while loading,
    straight onto ``device`` (a quantized model cannot be cast afterwards), and prepares the model
    for LoRA training (:func:`loraplace.run.quantization.prepare_quantized`); the rest (embeddings,
    norms, a tied or separate output head) stays ``dtype``.

    Raises:
        LoraplaceError: the model cannot be loaded, or bitsandbytes cannot run ``quantization`` on
            ``device`` (:func:`loraplace.run.quantization.check_quantization`).
    """

    path = resolve_model_path(path) if assets.is_gguf_file(path) else path
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": assets.offline()}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    quantized = quantization != "none"
    if quantized:
        device = device if device is not None else torch.device("cpu")
        check_quantization(quantization, device)
        # Without a device_map transformers would quantize onto the first GPU whatever device was asked.
        kwargs.update(quantization_config=bnb_config(quantization), device_map={"": str(device)})
    try:
        model = get_task(task).auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        where = "local folder" if os.path.isdir(path) else "hub id"
        raise LoraplaceError(f"could not load model {path!r} ({where}): {_first_line(e)}") from None
    model.config.use_cache = False
    if quantized:
        return prepare_quantized(model)
    return model.to(device) if device is not None else model


def plain_linears(model: nn.Module) -> list[nn.Linear]:
    """The model's plain ``nn.Linear`` modules with a float32 weight, except one whose weight is the
    input embedding (a tied vocabulary projection stays as it is: the embedding lookup reads it).

    These are the weights that run in ``dtype`` under autocast: rounded once at load
    (:func:`round_linear_weights`) and, where frozen, held in ``dtype`` while training
    (:func:`loraplace.run.training.frozen_weights_as`). Quantized projections (bitsandbytes'
    ``Linear4bit`` and ``Linear8bitLt``: subclasses of ``nn.Linear``, with 4- or 8-bit integer
    weights) are not among them: their storage must stay as bitsandbytes packed it.
    """
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    emb_weight = getattr(emb, "weight", None)
    return [m for m in model.modules()
            if type(m) is nn.Linear and m.weight is not emb_weight and m.weight.dtype == torch.float32]


def round_linear_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Round the float32 weights (and biases) of the model's :func:`plain_linears` to ``dtype``
    precision, in place, keeping float32 storage: ``w.copy_(w.to(dtype))``. Returns how
    many modules were rounded. Rounding is idempotent: a later round trip through ``dtype``
    changes nothing.
    """
    modules = plain_linears(model)
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(m.weight.to(dtype))  # in place: storage (and any sharing) is kept
            if m.bias is not None and m.bias.dtype == torch.float32:
                m.bias.copy_(m.bias.to(dtype))
    return len(modules)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
