"""How much memory one training run needs, from the model's config alone (no weights).

:func:`estimate_memory` adds up, in MiB, what a run of loraplace's training path
(:func:`loraplace.run.training.train_adapters`, then the final evaluation) holds at its peak:

* **base weights**: every parameter at 4 bytes as loaded (:func:`loraplace.run.models.load_model`
  loads float32), except that with bf16/fp16 autocast the frozen linear weights
  (:func:`loraplace.run.models.plain_linears`) are held in that dtype while training
  (:func:`loraplace.run.training.frozen_weights_as` *replaces* the float32 storage, it does not add a
  copy): ``4 * (P - P_lin) + 2 * P_lin``. The evaluation after training sees them at 4 bytes again.
* **adapters**: ``P_lora = sum r * (in + out)`` (:attr:`loraplace.placement.Placement.lora_params`)
  float32 weights, float32 gradients, and AdamW's two float32 states: 4 + 4 + 8 bytes each.
* **activations**: the tensors autograd saves for backward, per decoder layer at ``E = B * T``
  tokens (B batch, T length, H hidden, I intermediate, ``d = heads * head_dim``, ``a`` = 2 bytes
  under 16-bit autocast, else 4). Read tensor by tensor off ``torch.autograd.graph.saved_tensors_hooks``
  on a LoRA-wrapped Llama (mask dropout, frozen weights, eager attention), and equal to what it saves
  to the byte in every layer but the first, which saves a little less (its input needs no gradient;
  ``tests/test_memory_plan.py`` checks the sum within 10%):

  - the two RMSNorms keep their float32 input and ``rsqrt``: ``2 * (4 E H + 4 E)``;
  - attention keeps Q, K and V, the last two after ``repeat_kv`` (``3 a E d``; SDPA also its
    output and log-sum-exp); a gated MLP keeps the gate output, its activation and the up output:
    ``3 a E I`` (counted so for every architecture: an upper bound for ungated MLPs);
  - each adapted module (in, out, r) keeps the dropout mask (``E in``, 1 byte), the input of
    ``lora_A`` (``a E in``), the output of ``lora_A`` (``a E r``) and, under autocast, the cached
    16-bit casts of A and B (``2 r (in + out)``). The frozen base weight needs no saved input.

  Layers before the first adapted one save nothing (nothing there needs a gradient). With
  gradient checkpointing (non-reentrant, per decoder layer) the forward keeps only each layer's
  input (``4 E H``), and backward recomputes one layer at a time: layer inputs plus one layer.
* **attention probabilities**: eager attention (what :func:`loraplace.run.training.fast_attention`
  trains with on CPU) keeps the float32 softmax output and, under 16-bit autocast, its cast:
  ``(4 + a) B heads T^2`` per layer (4 in float32, where the two are the same tensor). SDPA (the
  model's own implementation, used on CUDA) keeps none.
* **logits**: the training loss projects to the vocabulary only at labelled positions (selective
  logits, :func:`loraplace.run.evaluation.token_nll`), ``N = f * B * (T - 1)`` of them, in blocks of
  ``C = min(N, train_chunk(V))`` positions recomputed in backward; its peak is a block's backward,
  where its float32 log-softmax, incoming gradient and the gradient it makes are alive together:
  ``12 C V`` bytes, plus the head weight cast once to the autocast dtype (``a V H``). ``f``
  (``labelled_fraction``) is 1 by default, an upper bound (every token labelled,
  ``train.loss_on=all``); with ``loss_on=response`` it is the response share. Sequence-to-sequence
  models keep full logits at every decoder position (``(12 + a) B T V``).
* **backward workspace**: what one layer's backward adds where that exceeds the loss's peak (long
  sequences with eager attention): ``(2 a + 4) B heads T^2`` or ``4 a E I``.
* **allocator overhead** (CPU only): glibc serves blocks below its mmap threshold (at most 32 MiB)
  from its heap and keeps freed heap blocks resident (``mallinfo2`` at the peak of a 38 M-parameter
  float32 run: the heap had grown by 1,049 MiB, 546 MiB of it free blocks left between the saved
  activations during the forward). A run's resident memory therefore sits above
  its live tensors by about :data:`CPU_HEAP_RETENTION` (:data:`CPU_HEAP_RETENTION_CHECKPOINTED`
  with checkpointing, which recomputes layer by layer and churns the heap alike) times the
  heap-served activations of a float32 step without checkpointing. The only constants fitted to
  measurements, on one model size (``benchmarks/memory_plan_check.py``).
* **evaluation**: the final evaluation (no gradients, ``eval_batch_size`` rows, weights float32
  again): one layer's transient or the chunked vocabulary projection
  (:data:`loraplace.run.evaluation.EVAL_CHUNK` positions of a row at once), whichever is larger.
* **runtime overhead** (CPU only): the resident memory of a Python process that imported what a
  run imports, :data:`RUNTIME_OVERHEAD_CPU_MIB`. On CUDA the measure is allocated tensors
  (:class:`loraplace.run.measure.PeakMemory`), and the CUDA context is already out of the free memory
  that :func:`device_free_mib` reports.

The peak is ``max(training, evaluation)``; :attr:`MemoryEstimate.total` is it, in the measure
:class:`~loraplace.run.measure.PeakMemory` records (resident memory on CPU, allocated on CUDA).
``benchmarks/memory_plan_check.py`` compares it with measured peaks at three model sizes.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import psutil
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from loraplace.placement.params import total_params
from loraplace.placement.resolve import AdaptedModule, Placement
from loraplace.run.device import autocast_dtype, fast_attention, pick_device, resolve_precision
from loraplace.run.evaluation import EVAL_CHUNK, train_chunk
from loraplace.run.models import meta_model, plain_linears

MIB = 2**20

RUNTIME_OVERHEAD_CPU_MIB = 530.0
"""Resident memory of a process that imported what a run imports (torch, transformers' Llama model
and Trainer, PEFT, datasets, loraplace), after ``gc`` and ``malloc_trim``: 526-529 MiB measured on
2026-11-30 (torch 2.13 CPU, transformers 5.24, Python 3.11). ``import torch, transformers`` alone
is 242 MiB: transformers imports its model classes lazily."""

GLIBC_MMAP_THRESHOLD_MAX = 32 * MIB
"""glibc's ceiling for its dynamic mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``): larger
blocks are always mmapped and returned to the system when freed; smaller ones may come from the
heap, whose freed blocks stay resident."""

CPU_HEAP_RETENTION = 1.20
"""Resident heap memory that glibc keeps beyond the live tensors at a CPU run's peak, as a share of
the heap-served activations of one float32 step without checkpointing (its allocator overhead).
Calibrated on one model size, the 307 M-parameter one of ``benchmarks/memory_plan_check.py``
(float32, batch 4 x 256: 2,719 MiB above the live tensors against 2,264 MiB of such activations);
the other sizes and bf16 validate it there."""

CPU_HEAP_RETENTION_CHECKPOINTED = 0.72
"""The same with gradient checkpointing, calibrated on the same run (1,632 MiB against the same
2,264 MiB): recomputing layer by layer churns the heap like a full forward, but keeps less."""

AUTO_HEADROOM = 0.10
"""``train.gradient_checkpointing=auto`` leaves checkpointing off only when the run fits with this
share of its need to spare (the estimate is good to about 15%)."""

FREE_MEMORY_ENV = "LORAPLACE_FREE_MIB"
"""Environment variable that stands in for the device's free memory, in MiB (tests, or to plan for
less memory than the machine has)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a transformer that its activations depend on (from its config)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> "ModelShape":
        """Read from a transformers config (Llama, Mistral, Qwen, GPT-2, T5 and BERT names).

        Raises:
            ValueError: a config without a hidden size, a layer count or a head count.
        """
        c = config.get_text_config() if hasattr(config, "get_text_config") else config

        def first(*names: str) -> int | None:
            for name in names:
                value = getattr(c, name, None)
                if isinstance(value, int) and value > 0:
                    return value
            return None

        hidden = first("hidden_size", "n_embd", "d_model")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        heads = first("num_attention_heads", "n_head", "num_heads")
        if hidden is None or layers is None or heads is None:
            raise ValueError(f"{type(config).__name__} has no hidden size, layer count or head count that "
                             "loraplace knows; the memory plan cannot size its activations")
        if getattr(c, "is_encoder_decoder", False):  # T5, BART: the decoder's layers too
            layers += first("num_decoder_layers", "decoder_layers") or layers
        return cls(hidden=hidden, intermediate=first("intermediate_size", "n_inner", "d_ff") or 4 * hidden,
                   layers=layers, heads=heads, head_dim=first("head_dim", "d_kv") or hidden // heads, vocab=first("vocab_size") or 0)


@dataclass(frozen=True)
class MemoryEstimate:
    """A run's estimated peak memory, in MiB, by component (see the module docstring for each
    formula). ``total`` is the peak: ``max(training, evaluation)``."""

    base_weights: float  # while training (frozen linear weights in the autocast dtype)
    adapter_weights: float
    adapter_grads: float
    optimizer_states: float
    activations: float  # saved per-layer tensors (without the attention probabilities)
    attention_probs: float
    logits: float  # the training loss's vocabulary projection, at its peak (backward)
    backward_workspace: float  # one layer's backward beyond the loss's peak (long sequences)
    allocator_overhead: float  # CPU: freed heap blocks glibc keeps resident
    runtime_overhead: float  # CPU: the Python process with torch, transformers, PEFT
    base_weights_loaded: float  # as loaded, and during the final evaluation
    evaluation: float  # the final evaluation's transient (no gradients)
    gradient_checkpointing: bool
    device: str
    precision: str
    attention: str  # eager or sdpa, as training runs it
    batch_size: int
    length: int
    labelled_fraction: float
    model_loaded: bool = False  # the base model and its adapters already take memory (needed_mib leaves them out)

    @property
    def training(self) -> float:
        """The training peak: everything but the evaluation."""
        return (self.runtime_overhead + self.base_weights + self.adapter_weights + self.adapter_grads
                + self.optimizer_states + self.activations + self.attention_probs + self.logits
                + self.backward_workspace + self.allocator_overhead)

    @property
    def evaluation_peak(self) -> float:
        """The final evaluation's peak: weights as loaded, adapters, optimizer states (the Trainer may
        not be collected yet) and its transient."""
        return (self.runtime_overhead + self.base_weights_loaded + self.adapter_weights + self.optimizer_states
                + self.evaluation)

    @property
    def total(self) -> float:
        """The run's estimated peak, in the measure :class:`loraplace.run.measure.PeakMemory` records."""
        return max(self.training, self.evaluation_peak)

    @property
    def needed_mib(self) -> float:
        """What the run needs on top of what its process already holds: the total without the
        runtime overhead and, when ``model_loaded``, without the loaded weights and adapters."""
        held = self.base_weights_loaded + self.adapter_weights if self.model_loaded else 0.0
        return self.total - self.runtime_overhead - held

    def fits(self, free_mib: float, headroom: float = 0.0) -> bool:
        """Whether :attr:`needed_mib`, plus ``headroom`` of it, is within ``free_mib``."""
        return self.needed_mib * (1.0 + headroom) <= free_mib

    def components(self) -> dict[str, float]:
        """The components in MiB (rounded to 0.1), the training and evaluation peaks and the total."""
        names = ("base_weights", "adapter_weights", "adapter_grads", "optimizer_states", "activations",
                 "attention_probs", "logits", "backward_workspace", "allocator_overhead", "runtime_overhead",
                 "base_weights_loaded", "evaluation")
        out = {name: round(getattr(self, name), 1) for name in names}
        out.update(training=round(self.training, 1), evaluation_peak=round(self.evaluation_peak, 1),
                   total=round(self.total, 1))
        return out

    def breakdown(self, runtime: bool = True) -> str:
        """The larger parts of the total in words: ``weights 410, activations 2,723, ...`` (MiB);
        ``runtime=False`` leaves the runtime overhead out (the parts of :attr:`needed_mib`)."""
        if self.training >= self.evaluation_peak:
            parts = [("weights", self.base_weights),
                     ("adapters with gradients and optimizer", self.adapter_weights + self.adapter_grads
                      + self.optimizer_states),
                     ("activations", self.activations), ("attention probabilities", self.attention_probs),
                     ("logits", self.logits), ("backward workspace", self.backward_workspace),
                     ("allocator", self.allocator_overhead), ("runtime", self.runtime_overhead)]
        else:
            parts = [("weights", self.base_weights_loaded), ("evaluation", self.evaluation),
                     ("adapters and optimizer", self.adapter_weights + self.optimizer_states),
                     ("runtime", self.runtime_overhead)]
        return ", ".join(f"{name} {value:,.0f}" for name, value in parts if value >= 0.5
                         and (runtime or name != "runtime"))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self.components()}


def _bytes(terms: list[tuple[float, float]]) -> float:
    """Sum of ``count * size`` over ``(size_bytes, count)`` terms."""
    return sum(size * count for size, count in terms)


def _heap_bytes(terms: list[tuple[float, float]]) -> float:
    """The part of :func:`_bytes` in blocks that glibc may serve from its heap (below its mmap ceiling)."""
    return sum(size * count for size, count in terms if size < GLIBC_MMAP_THRESHOLD_MAX)


QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
"""Bytes per weight of a bitsandbytes-quantized projection: nf4 packs two 4-bit values per byte plus
an 8-bit absmax per block of 64 and a float32 one per 256 blocks (double quantisation); int8 one byte
(its per-row float32 scales are left out)."""


def _weights(skeleton: nn.Module, frozen_bytes: int, quantization: str = "none") -> tuple[float, float]:
    """``(bytes while training, bytes as loaded)`` of the base model's parameters: float32 as loaded;
    :func:`~loraplace.run.models.plain_linears` at ``frozen_bytes`` while training; with
    ``quantization`` (nf4, int8) those projections, the output head aside (bitsandbytes leaves it
    unquantized), at :data:`QUANTIZED_BYTES` throughout."""

    params = total_params(skeleton)
    linears = plain_linears(skeleton)
    count = lambda ms: sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in ms)  # noqa: E731
    linear = count(linears)
    if quantization in QUANTIZED_BYTES:
        head = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
        quantized = count([m for m in linears if m is not head])
        rest = params - quantized
        return (4 * (rest - (linear - quantized)) + frozen_bytes * (linear - quantized)
                + QUANTIZED_BYTES[quantization] * quantized,
                4 * rest + QUANTIZED_BYTES[quantization] * quantized)
    return 4 * (params - linear) + frozen_bytes * linear, 4 * params


def _active_layers(placement: Placement, layers: int) -> int:
    """Decoder layers that save activations: from the first adapted one on (all with an adapted
    embedding; none when only modules outside the blocks, such as the head, are adapted)."""
    if any(m.layer is None and m.role == "embed" for m in placement.modules) or len(placement.stacks) > 1:
        return layers  # (encoder-decoders: counted whole)
    adapted = [m.layer for m in placement.modules if m.layer is not None]
    return layers - min(adapted) if adapted else 0


# Roles that read one input tensor in a block (with shared dropout masks, one mask and one copy of
# the dropout output serve them all): the attention input, the FFN input, the encoder states.
_SAME_INPUT = {"attn.q": "attn", "attn.k": "attn", "attn.v": "attn", "attn.qkv": "attn",
               "mlp.gate": "mlp", "mlp.up": "mlp", "mlp.gate_up": "mlp", "xattn.k": "xattn.kv", "xattn.v": "xattn.kv"}


def _module_terms(placement: Placement, tokens: int, a: int, dropout: float,
                  shared_masks: bool = False) -> dict[int | None, list]:
    """Saved bytes of each adapted module, grouped by layer: ``{layer: [(size, count), ...]}``.
    With ``shared_masks`` (``lora.dropout_masks=shared``) the adapters of one input
    (:data:`_SAME_INPUT`) keep one dropout output and one mask between them."""
    out: dict[int | None, list] = {}
    seen: set[tuple] = set()
    for m in placement.modules:
        r = m.r * m.num_experts
        if m.role == "embed":  # PEFT's embedding adapter looks rows of A up: no dropout, no input copy
            out.setdefault(m.layer, []).append((a * tokens * r, 1))
            continue
        group = (m.layer, _SAME_INPUT.get(m.role, m.name))
        first = not (shared_masks and dropout > 0 and group in seen)
        seen.add(group)
        terms = [(a * tokens * m.in_features, 1 if first else 0), (a * tokens * r, 1)]
        if dropout > 0 and first:
            terms.append((tokens * m.in_features, 1))  # the boolean dropout mask
        if a == 2:
            terms.append((2 * r * (m.in_features + m.out_features), 1))  # autocast's cached casts of A and B
        out.setdefault(m.layer, []).extend(terms)
    return out


def estimate_memory(model_config: Any, placement: Placement, *, batch_size: int, max_length: int,
                    precision: str, gradient_checkpointing: bool, device: str | torch.device,
                    task: str = "causal-lm", lora_dropout: float = 0.1, eval_batch_size: int = 16,
                    labelled_fraction: float = 1.0, model_loaded: bool = False, quantization: str = "none",
                    skeleton: nn.Module | None = None, dropout_masks: str = "independent") -> MemoryEstimate:
    """The estimated peak memory of training ``placement`` on the model of ``model_config``.

    Args:
        model_config: a transformers config; the model is built on the meta device (no weights),
            so this works for any size. ``skeleton`` reuses one already built.
        placement: the adapted modules (:class:`~loraplace.placement.Placement`; for an arm
            allocated later, a stand-in with as many adapted modules, e.g. ``full``).
        batch_size, max_length: the training batch ``(B, T)``; T is the longest batch's length
            (the length-grouped sampler starts with the longest examples), at most ``max_length``.
        precision: ``auto``, ``bf16``, ``fp16`` or ``fp32`` (``auto`` as
            :func:`loraplace.run.device.resolve_precision` resolves it on ``device``).
        gradient_checkpointing: per decoder layer, as :func:`loraplace.run.training.checkpointing`.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps`` (or a ``torch.device``).
        task: ``causal-lm`` (selective logits), ``seq2seq`` (full logits at every decoder
            position) or ``classification`` (no vocabulary projection).
        lora_dropout: the adapters' dropout (> 0 keeps a mask per adapted module).
        dropout_masks: ``independent`` or ``shared`` (one mask per input tensor, ``lora.dropout_masks``).
        eval_batch_size: rows of an evaluation batch.
        labelled_fraction: share of the batch's positions that carry a label (1: an upper bound).
        model_loaded: the base model and adapters are already in memory (a run deciding on
            checkpointing): :attr:`MemoryEstimate.needed_mib` then leaves them out.
        quantization: ``none``, or ``nf4``/``int8`` for a bitsandbytes-quantized base model
            (weights only: its activations are counted as an unquantized model's; not validated).

    Returns:
        A :class:`MemoryEstimate` (MiB).
    """

    dev = device if isinstance(device, torch.device) else pick_device(device)
    precision = resolve_precision(precision, dev)
    a = 2 if autocast_dtype(precision) is not None else 4
    skeleton = skeleton if skeleton is not None else meta_model(model_config)
    shape = ModelShape.of(model_config)
    B, T, H, I, V = batch_size, max_length, shape.hidden, shape.intermediate, shape.vocab
    E, d, heads = B * T, shape.heads * shape.head_dim, shape.heads
    attention = fast_attention(dev) or getattr(model_config, "_attn_implementation", None) or "sdpa"
    # MPS's SDPA has no memory-efficient kernel for training: count it as eager (an upper bound).
    materialised = attention == "eager" or dev.type == "mps"

    def layer_terms(a: int) -> tuple[list, list]:
        """One decoder layer's saved tensors, adapted modules aside, and its attention probabilities:
        ``(size in bytes, count)`` each, at activation size ``a``."""
        layer = [(4 * E * H, 2), (4 * E, 2), (a * E * d, 3), (a * E * I, 3)]
        if not materialised:
            layer += [(a * E * d, 1), (4 * B * heads * T, 1)]  # SDPA's output and log-sum-exp
        probs = [(4 * B * heads * T * T, 1)] + ([(a * B * heads * T * T, 1)] if a != 4 else [])
        return layer, probs if materialised else []

    layer, probs = layer_terms(a)
    shared = dropout_masks == "shared"
    modules = _module_terms(placement, E, a, lora_dropout, shared)
    final = [(4 * E * H, 1), (4 * E, 1)]
    active = _active_layers(placement, shape.layers)
    all_modules = [t for terms in modules.values() for t in terms]
    if gradient_checkpointing:
        busiest = max((terms for key, terms in modules.items() if key is not None), key=_bytes, default=[])
        outside = modules.get(None, [])
        saved = [(4 * E * H, active)] + (layer + busiest if active else []) + outside + final
        saved_probs = probs if active else []
    else:
        saved = [(s, c * active) for s, c in layer] + all_modules + final
        saved_probs = [(s, c * active) for s, c in probs]

    if task == "classification":
        loss = []
    else:
        n = max(1, round(labelled_fraction * B * (T - 1))) if task == "causal-lm" else B * T
        if task == "causal-lm":  # blocks recomputed in backward (loraplace.run.evaluation._nll_recomputed)
            loss = [(4 * min(n, train_chunk(V)) * V, 3)] + ([(a * V * H, 1)] if a != 4 else [])
        else:
            loss = [(4 * n * V, 3), (a * n * V, 1)]
    workspace = max(_bytes([(a * B * heads * T * T, 2), (4 * B * heads * T * T, 1)]) if materialised else
                    3 * a * E * d, 4 * a * E * I)
    backward_extra = max(0.0, workspace - _bytes(loss)) if active else 0.0

    on_cpu = dev.type == "cpu"
    # glibc's retained heap scales with the forward's float32 temporaries (residual stream, norms,
    # dropout's random numbers, the LoRA branches), whatever the autocast dtype: counted as the
    # heap-served activations of a float32 step without checkpointing.
    layer32, probs32 = layer_terms(4)
    modules32 = [t for terms in _module_terms(placement, E, 4, lora_dropout, shared).values() for t in terms]
    basis = _heap_bytes([(s, c * active) for s, c in layer32 + probs32] + modules32)
    retention = CPU_HEAP_RETENTION_CHECKPOINTED if gradient_checkpointing else CPU_HEAP_RETENTION
    allocator = retention * basis if on_cpu else 0.0

    Ee = eval_batch_size * T
    chunk = min(T, EVAL_CHUNK)
    eval_layer = 3 * a * Ee * I + (4 * eval_batch_size * heads * T * T if materialised else 0)
    eval_head = (a + 8) * chunk * V if task == "causal-lm" else (a + 8) * Ee * V if task == "seq2seq" else 0
    evaluation = 3 * 4 * Ee * H + max(eval_layer, eval_head)

    train_w, loaded_w = _weights(skeleton, a, quantization)
    lora = placement.lora_params
    return MemoryEstimate(
        base_weights=train_w / MIB, adapter_weights=4 * lora / MIB, adapter_grads=4 * lora / MIB,
        optimizer_states=8 * lora / MIB, activations=_bytes(saved) / MIB, attention_probs=_bytes(saved_probs) / MIB,
        logits=_bytes(loss) / MIB, backward_workspace=backward_extra / MIB, allocator_overhead=allocator / MIB,
        runtime_overhead=RUNTIME_OVERHEAD_CPU_MIB if on_cpu else 0.0, base_weights_loaded=loaded_w / MIB,
        evaluation=evaluation / MIB, gradient_checkpointing=bool(gradient_checkpointing), device=dev.type,
        precision=precision, attention="eager" if materialised else str(attention), batch_size=B, length=T,
        labelled_fraction=labelled_fraction, model_loaded=model_loaded,
    )


def device_free_mib(device: str | torch.device) -> float | None:
    """Memory the device has free now, in MiB, or None where it cannot be known.

    ``LORAPLACE_FREE_MIB`` (:data:`FREE_MEMORY_ENV`), when set, is the answer. Otherwise CUDA:
    ``torch.cuda.mem_get_info`` (free memory of the device; this process's CUDA context is already
    out of it); CPU: ``psutil.virtual_memory().available``; MPS: the recommended working-set size
    minus what this process has allocated (``torch.mps``), where that torch has them.
    """

    forced = os.environ.get(FREE_MEMORY_ENV)
    if forced:
        try:
            return float(forced)
        except ValueError:
            raise ValueError(f"{FREE_MEMORY_ENV}={forced!r} is not a number of MiB (e.g. 4096)") from None
    dev = device if isinstance(device, torch.device) else torch.device("cpu" if device == "auto" else device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free / MIB
    if dev.type == "cpu":

        return psutil.virtual_memory().available / MIB
    if dev.type == "mps":
        mps = getattr(torch, "mps", None)
        recommended = getattr(mps, "recommended_max_memory", None)
        allocated = getattr(mps, "current_allocated_memory", None)
        if callable(recommended) and callable(allocated):
            return (recommended() - allocated()) / MIB
    return None


@dataclass(frozen=True)
class CheckpointingChoice:
    """Whether a run trains with gradient checkpointing, and why.

    Attributes:
        enabled: checkpointing on.
        reason: one line: the setting, or for ``auto`` the estimates and the free memory.
        without, checkpointed: the run's estimates without and with checkpointing (None: the
            model's config has no sizes the plan knows).
        free_mib: the device's free memory when it was decided (None: not known).
    """

    enabled: bool
    reason: str
    without: MemoryEstimate | None
    checkpointed: MemoryEstimate | None
    free_mib: float | None

    @property
    def estimate(self) -> MemoryEstimate | None:
        """The estimate of the configuration that runs."""
        return self.checkpointed if self.enabled else self.without

    def record(self) -> dict[str, Any]:
        """What a run's result keeps (:attr:`loraplace.records.RunResult.memory_plan`): the
        decision, the free memory, both estimates' needs and totals, and the components of the
        estimate of the configuration that ran (MiB)."""
        out: dict[str, Any] = {"gradient_checkpointing": self.reason,
                               "free_mib": None if self.free_mib is None else round(self.free_mib, 1)}
        if self.without is None or self.checkpointed is None or self.estimate is None:
            return out
        est = self.estimate
        return {**out, "estimate_mib": round(est.total, 1),
                "needed_without_checkpointing_mib": round(self.without.needed_mib, 1),
                "needed_with_checkpointing_mib": round(self.checkpointed.needed_mib, 1),
                "total_without_checkpointing_mib": round(self.without.total, 1),
                "total_with_checkpointing_mib": round(self.checkpointed.total, 1), "headroom": AUTO_HEADROOM,
                "batch_size": est.batch_size, "length": est.length, "precision": est.precision,
                "attention": est.attention, "labelled_fraction": est.labelled_fraction,
                "components_mib": est.components()}


def choose_checkpointing(setting: bool | Literal["auto"], without: MemoryEstimate | None,
                         checkpointed: MemoryEstimate | None, free_mib: float | None,
                         supported: bool = True) -> CheckpointingChoice:
    """Resolve ``train.gradient_checkpointing``: True and False as set; ``auto`` on only when the run
    would not fit in ``free_mib`` without it (with :data:`AUTO_HEADROOM` to spare) and checkpointing
    helps; off when the free memory or the estimate is unknown, or the model cannot checkpoint."""
    def choice(enabled: bool, reason: str) -> CheckpointingChoice:
        return CheckpointingChoice(enabled, reason, without, checkpointed, free_mib)

    if setting is not True and setting is not False and setting != "auto":
        raise ValueError(f"train.gradient_checkpointing must be true, false or auto, got {setting!r}")
    if setting != "auto":
        return choice(bool(setting), f"{'on' if setting else 'off'} (train.gradient_checkpointing={str(setting).lower()})")
    if not supported:
        return choice(False, "off (auto: the model does not support gradient checkpointing)")
    if without is None or checkpointed is None:
        return choice(False, "off (auto: no memory estimate for this model's config)")
    if free_mib is None:
        return choice(False, "off (auto: the device's free memory is unknown)")
    need, need_ckpt = without.needed_mib, checkpointed.needed_mib
    numbers = f"needs about {need:,.0f} MiB without, {need_ckpt:,.0f} MiB with; {free_mib:,.0f} MiB free"
    if without.fits(free_mib, AUTO_HEADROOM):
        return choice(False, f"off (auto: {numbers})")
    if checkpointed.fits(free_mib):
        return choice(True, f"on (auto: {numbers})")
    return choice(True, f"on (auto: {numbers}; it may still run out of memory)")


def adapted_placement(peft_model, adapter: str = "default") -> Placement:
    """The adapted modules of a PEFT-wrapped model as a :class:`~loraplace.placement.Placement`
    (exact names, shapes and ranks; the layer index read from the name), for callers of
    :func:`loraplace.run.training.train_adapters` that have no placement of their own."""

    modules = []
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.r:
            continue
        index = re.search(r"\.(\d+)\.", name)
        role = "embed" if isinstance(module.get_base_layer(), nn.Embedding) else "?"
        modules.append(AdaptedModule(name=name, role=role, layer=int(index.group(1)) if index else None,
                                     in_features=int(module.in_features), out_features=int(module.out_features),
                                     r=int(module.r[adapter]), alpha=float(module.lora_alpha[adapter])))
    return Placement(strategy="adapted", family="?", modules=modules, num_layers=0)


def _longest(train_dataset, max_length: int) -> int:
    """The longest training example (the length-grouped sampler's first batch), at most ``max_length``."""
    if "length" in (getattr(train_dataset, "column_names", None) or ()) and len(train_dataset):
        return min(max_length, int(max(train_dataset["length"])))
    return max_length


def plan_checkpointing(setting: bool | Literal["auto"], model, placement: Placement | None, train_dataset,
                       settings, *, precision: str, device: str | torch.device, task: str = "causal-lm",
                       lora_dropout: float = 0.1, quantization: str = "none",
                       dropout_masks: str = "independent") -> CheckpointingChoice:
    """Decide a run's gradient checkpointing (:func:`choose_checkpointing`) from its estimates with
    and without it and the device's free memory now (:func:`device_free_mib`).

    Args:
        model: the PEFT-wrapped model, loaded: the estimates leave its weights and adapters out of
            what the run still needs (``model_loaded``).
        placement: its adapted modules (None: read from ``model``, :func:`adapted_placement`).
        train_dataset: the training split; its longest example sets the length.
        settings: the run's :class:`~loraplace.config.TrainSettings` (batch size, max length,
            evaluation batch size).
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    try:

        kwargs = dict(batch_size=settings.batch_size, max_length=_longest(train_dataset, settings.max_length),
                      precision=precision, device=device, task=task, lora_dropout=lora_dropout,
                      eval_batch_size=settings.eval_batch_size, model_loaded=True, quantization=quantization,
                      dropout_masks=dropout_masks)
        placement = placement if placement is not None else adapted_placement(model)
        skeleton = meta_model(base.config)
        without = estimate_memory(base.config, placement, gradient_checkpointing=False, skeleton=skeleton, **kwargs)
        checkpointed = estimate_memory(base.config, placement, gradient_checkpointing=True, skeleton=skeleton,
                                       **kwargs)
    except Exception:  # noqa: BLE001 - the plan advises; a model it cannot size must still train
        without = checkpointed = None
    try:
        free = device_free_mib(device)
    except Exception:  # noqa: BLE001 - e.g. a malformed LORAPLACE_FREE_MIB: unknown, not a failed run
        free = None
    return choose_checkpointing(setting, without, checkpointed, free,
                                supported=bool(getattr(base, "supports_gradient_checkpointing", False)))
