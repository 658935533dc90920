"""Training one adapter placement with the Hugging Face Trainer.

The Trainer runs the loop; loraplace plugs in through its extension points only:

* ``compute_loss`` (:class:`PlacementTrainer`): summed NLL over labelled tokens from
  :func:`loraplace.evaluation.token_nll`, which projects to the vocabulary only where a label
  is, normalised by the labelled tokens of the whole (accumulated) batch;
* a collator that pads to the longest example, and length-grouped sampling;
* ``bf16`` autocast where the hardware runs it fast, with float32 adapter weights; the frozen base
  projections are held in bfloat16 while training (:func:`frozen_weights_as`), which saves
  autocast's per-call weight casts and changes no number;
* on CPU, eager attention (faster backward than SDPA's at these lengths) and a LoRA dropout
  that draws its mask with ``torch.rand`` (see :class:`MaskDropout`);
* a callback for progress, and a non-finite-loss check that fails the run with its reason.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from loraplace.config import TrainSettings
from loraplace.evaluation import token_nll


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf."""


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


def _frozen_linears(model: nn.Module) -> list[nn.Linear]:
    """The frozen ``nn.Linear`` modules of a model whose weight is not shared with the input
    embedding (a tied vocabulary projection stays as it is: the embedding lookup reads it)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    emb_weight = getattr(emb, "weight", None)
    return [m for m in model.modules()
            if type(m) is nn.Linear and not m.weight.requires_grad and m.weight is not emb_weight
            and m.weight.dtype == torch.float32]


@contextlib.contextmanager
def frozen_weights_as(model: nn.Module, dtype: torch.dtype | None):
    """Hold the frozen linear weights (the base model's projections) in ``dtype`` inside the block.

    Under autocast a float32 linear weight is cast to bfloat16 at every forward call; holding it in
    bfloat16 skips that copy and halves its memory, with the same numbers: autocast would round it
    to the same bfloat16 values. Adapter weights, norms and embeddings stay float32. On exit the
    weights return to float32 (holding the rounded values, which autocast maps to the same
    bfloat16 weights), so adapters created later on the same base model start in float32.
    """
    if dtype is None or dtype == torch.float32:
        yield
        return
    modules = _frozen_linears(model)
    for m in modules:
        m.weight.data = m.weight.data.to(dtype)
        if m.bias is not None and not m.bias.requires_grad:
            m.bias.data = m.bias.data.to(dtype)
    try:
        yield
    finally:
        for m in modules:
            m.weight.data = m.weight.data.to(torch.float32)
            if m.bias is not None and m.bias.dtype == dtype:
                m.bias.data = m.bias.data.to(torch.float32)


class MaskDropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout``: keep each element with probability ``1 - p`` and scale
    the kept ones by ``1 / (1 - p)``. The mask comes from ``torch.rand`` (``u >= p``) instead of
    ``bernoulli_``, which is about 30% faster on CPU, where LoRA dropout's random numbers were a
    quarter of a training step. Same distribution; another random stream (still seeded)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # Multiplying by the boolean mask first keeps only that mask for backward (as nn.Dropout
        # does), not a float copy of it.
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_mask_dropout(model: nn.Module) -> int:
    """Swap PEFT's LoRA dropout modules (``nn.Dropout``) for :class:`MaskDropout`; returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name in list(dropouts.keys()):
            if type(dropouts[name]) is nn.Dropout and dropouts[name].p > 0:
                dropouts[name] = MaskDropout(dropouts[name].p)
                swapped += 1
    return swapped


def fast_attention(device: torch.device) -> str | None:
    """The attention implementation to train with: ``eager`` on CPU, where PyTorch's SDPA backward
    (flash-attention for CPU) took twice as long as eager's matmul-softmax-matmul for this
    project's sequence lengths (<= a few hundred tokens); None (keep the model's) elsewhere."""
    return "eager" if device.type == "cpu" else None


@contextlib.contextmanager
def attention_as(model: nn.Module, implementation: str | None):
    """Switch a transformers model's attention implementation inside the block, then restore it."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = getattr(base, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if implementation is None or current is None or current == implementation or not hasattr(base, "set_attn_implementation"):
        yield current
        return
    try:
        base.set_attn_implementation(implementation)
    except (ValueError, ImportError):
        yield current
        return
    try:
        yield base.config._attn_implementation
    finally:
        base.set_attn_implementation(current)


class PlacementTrainer(Trainer):
    """Trainer whose loss is the token-weighted mean NLL over labelled tokens (selective logits)."""

    def __init__(self, *args, nll_fn: Callable = token_nll, **kwargs):
        super().__init__(*args, **kwargs)
        # Per-example (nll_sum, n_tokens, ...) of a batch: token_nll for causal LMs, the task's
        # own function for seq2seq and classification (loraplace.tasks).
        self.nll_fn = nll_fn
        # Our compute_loss divides by num_items_in_batch itself: ask the Trainer to count it and not
        # to divide again by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.real_tokens = 0  # non-padding input tokens seen in training
        self.label_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Accelerate applies mixed precision by wrapping ``model.forward``; token_nll calls the
        # model's body and head directly (selective logits), so enter the autocast here.
        with self.accelerator.autocast():
            nll_sum, n_tokens = self.nll_fn(model, inputs)[:2]
        count = n_tokens.sum()
        denom = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
        loss = nll_sum.sum() / denom
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss ({loss.item()}) at step {self.state.global_step}")
        if model.training:
            self.real_tokens += int(inputs["attention_mask"].sum())
            self.label_tokens += int(count)
        return (loss, None) if return_outputs else loss


class _StepHook(TrainerCallback):
    def __init__(self, on_step: Callable[[int, int, float | None], None]):
        self.on_step = on_step
        self.last_loss: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):
        self.on_step(state.global_step, state.max_steps, self.last_loss)


class _PeriodicEval(TrainerCallback):
    """Appends ``{"step", "eval_loss"}`` to the log every ``every`` steps (not at the last step:
    the run's final evaluation covers it)."""

    def __init__(self, every: int, eval_loss: Callable[[], float]):
        self.every = every
        self.eval_loss = eval_loss

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            state.log_history.append({"step": state.global_step, "eval_loss": self.eval_loss()})


@dataclass
class TrainOutcome:
    seconds: float
    steps: int
    real_tokens: int
    label_tokens: int
    log_history: list[dict] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)  # speed choices made (attention, dropout, weights)

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else math.nan


def train_adapters(model: nn.Module, train_dataset, collator, settings: TrainSettings, *, seed: int,
                   precision: str, device: torch.device, output_dir: Path,
                   on_step: Callable[[int, int, float | None], None] | None = None,
                   eval_loss: Callable[[], float] | None = None,
                   nll_fn: Callable = token_nll) -> TrainOutcome:
    """Train the adapters of a PEFT-wrapped model for ``settings.max_steps`` optimizer steps.

    ``nll_fn`` gives the per-example loss sums of a batch (default: causal-LM
    :func:`~loraplace.evaluation.token_nll`). ``eval_loss`` (called every ``settings.eval_every`` steps when given) returns the held-out loss
    for the eval-loss curve; its time is not excluded from ``seconds``.

    The data order depends only on ``seed`` (and the dataset), never on the strategy, so every
    arm of a study sees the same batches in the same order.
    """
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_steps=settings.max_steps,
        learning_rate=settings.lr,
        lr_scheduler_type=settings.scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="no",
        report_to=list(settings.report_to) or "none",
        seed=seed,
        data_seed=seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device.type == "cpu",
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = PlacementTrainer(
        nll_fn=nll_fn, model=model, args=args, train_dataset=train_dataset, data_collator=collator,
        callbacks=[_StepHook(on_step)] if on_step else None,
    )
    if eval_loss is not None and settings.eval_every:
        trainer.add_callback(_PeriodicEval(settings.eval_every, eval_loss))
    trainer.remove_callback(PrinterCallback)  # progress and the log go through on_step and log_history
    choices = {"lora_dropout": "mask" if use_mask_dropout(model) else "none"}
    start = time.perf_counter()
    with frozen_weights_as(model, autocast_dtype(precision)), attention_as(model, fast_attention(device)) as attn:
        choices.update(attention=attn, frozen_weights=str(autocast_dtype(precision) or torch.float32))
        trainer.train()
    seconds = time.perf_counter() - start
    return TrainOutcome(
        seconds=seconds,
        steps=trainer.state.global_step,
        real_tokens=trainer.real_tokens,
        label_tokens=trainer.label_tokens,
        log_history=list(trainer.state.log_history),
        choices=choices,
    )
