"""Training one adapter placement with the Hugging Face Trainer.

The Trainer runs the loop; loraplace plugs in through its extension points only:

* ``compute_loss`` (:class:`PlacementTrainer`): summed NLL over the targets from the task's
  per-example loss (:attr:`loraplace.run.tasks.Task.nll`; for causal LMs
  :func:`loraplace.run.evaluation.token_nll`, which projects to the vocabulary only where a label
  is), normalised by the targets of the whole (accumulated) batch;
* a collator that pads to the longest example, and length-grouped sampling whose shuffles come
  from a generator of their own, seeded from the run seed (:meth:`PlacementTrainer._get_train_sampler`);
* ``get_batch_samples``: the labelled-token count of each optimizer step, counted by loraplace
  (:func:`target_counter`), not by the Trainer, whose count changed meaning across versions;
* ``bf16`` autocast where the hardware runs it fast, with float32 adapter weights; the frozen base
  projections are held in bfloat16 while training (:func:`frozen_weights_as`), which saves
  autocast's per-call weight casts and changes no number;
* on CPU, eager attention (faster backward than SDPA's at these lengths) and a LoRA dropout
  that draws its mask with ``torch.rand`` (see :class:`MaskDropout`);
* optional gradient checkpointing (``train.gradient_checkpointing``, :func:`checkpointing`),
  switched on and off by loraplace around the warm-up and the training, not by the Trainer (whose
  switch would miss the warm-up and leave an input-embedding hook on the shared base model);
  ``auto`` is decided from the memory plan (:func:`loraplace.run.memory_plan.plan_checkpointing`);
* optional ``torch.compile`` of each decoder layer (``train.compile``, :func:`compiled_layers`);
* a callback for progress, and a non-finite-loss check that fails the run with its reason.

Before the timer starts, :func:`train_adapters` checks the selective-logits loss against the
model's own logits (:func:`loraplace.run.evaluation.check_selective_loss`) and runs one untimed
warm-up forward and backward (:func:`warm_up`) that leaves the random state, the gradients and the
weights as they were.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_layers import GradientCheckpointingLayer

from loraplace.config import TrainSettings
from loraplace.data import IGNORE_INDEX
from loraplace.run.device import autocast_dtype, fast_attention
from loraplace.run.evaluation import check_selective_loss, token_nll
from loraplace.run.memory_plan import plan_checkpointing
from loraplace.run.models import plain_linears

_clock = time.perf_counter  # the training timer (a module attribute so that tests can stand in for it)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf."""


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
    modules = [m for m in plain_linears(model) if not m.weight.requires_grad]
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


class SharedMasks:
    """Which dropout output each recent input tensor got, so that adapters reading the *same*
    tensor (q/k/v of one attention block, gate/up of one MLP: called one after another on one
    hidden-state tensor) share one mask and one output instead of drawing one each.

    Each adapter still sees its input with every element kept with probability ``1 - p`` and
    scaled by ``1 / (1 - p)``: the distribution of any single adapter's training is unchanged, only
    the masks of sibling adapters are the same draw (as in PEFT, a module's own q/k/v would be
    independent). An input is matched by identity (a weak reference) and its version counter: a
    tensor that was freed, modified in place, or a different tensor (another layer, a
    recomputation under gradient checkpointing) never matches. The ``keep`` most recent outputs
    are held (under checkpointing nothing else keeps them between sibling calls): one layer's
    few tensors at most.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.entries: list[tuple] = []  # (weakref input, version, p, output)

    def get(self, x: torch.Tensor, p: float) -> torch.Tensor | None:
        for ref, version, q, out in self.entries:
            if ref() is x and version == x._version and q == p:
                return out
        return None

    def put(self, x: torch.Tensor, p: float, out: torch.Tensor) -> None:

        self.entries = [(weakref.ref(x), x._version, p, out)] + self.entries[: self.keep - 1]

    def clear(self) -> None:
        self.entries = []


class MaskDropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout``: keep each element with probability ``1 - p`` and scale
    the kept ones by ``1 / (1 - p)``. The mask comes from ``torch.rand`` (``u >= p``) instead of
    ``bernoulli_``, which is about 30% faster on CPU, where LoRA dropout's random numbers were a
    quarter of a training step. Same distribution; another random stream (still seeded).

    With ``shared`` (a :class:`SharedMasks`), adapters that read the same input tensor get the same
    output (one mask for all of them). Under autocast that output is cast to the autocast dtype
    here, once, rather than by each adapter's ``lora_A`` matmul, so the siblings also share the
    16-bit copy that backward keeps; the numbers are those autocast's own cast gives.
    """

    def __init__(self, p: float, shared: SharedMasks | None = None):
        super().__init__()
        self.p = float(p)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            if self.shared is not None and self.shared.entries:
                self.shared.clear()  # evaluation: release the last training outputs
            return x
        if self.shared is not None:
            out = self.shared.get(x, self.p)
            if out is not None:
                return out
        # Multiplying by the boolean mask first keeps only that mask for backward (as nn.Dropout
        # does), not a float copy of it.
        out = x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))
        if self.shared is not None:
            device = x.device.type
            if torch.is_autocast_enabled(device) and x.dtype == torch.float32:
                out = out.to(torch.get_autocast_dtype(device))
            self.shared.put(x, self.p, out)
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", shared masks" if self.shared is not None else "")


def use_mask_dropout(model: nn.Module, shared: bool = False) -> int:
    """Swap PEFT's LoRA dropout modules (``nn.Dropout``) for :class:`MaskDropout`; returns how many.
    With ``shared``, adapters that read the same input tensor share one mask (:class:`SharedMasks`)."""
    masks = SharedMasks() if shared else None
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name in list(dropouts.keys()):
            if type(dropouts[name]) is nn.Dropout and dropouts[name].p > 0:
                dropouts[name] = MaskDropout(dropouts[name].p, masks)
                swapped += 1
    return swapped


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


@contextlib.contextmanager
def checkpointing(model: nn.Module, enabled: bool):
    """Gradient (activation) checkpointing of the decoder layers inside the block, off again after it.

    Non-reentrant ``torch.utils.checkpoint`` (``use_reentrant=False``): it needs no input that
    requires grad, so the input-embedding hook transformers adds when switching it on
    (``enable_input_require_grads``) is removed again unless it was there before; on exit the
    layers' flags and that hook are as before, so the shared base model's next arm runs as it
    would alone. It preserves the random state for the recomputation, so LoRA dropout masks are
    the same in the forward and its recomputation. Yields whether it is on.
    """
    if not enabled:
        yield False
        return
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing; set train.gradient_checkpointing=false")
    had_hooks = bool(getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None))
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5.2x: the older name
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not had_hooks and hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()
    try:
        yield True
    finally:
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()
        if not had_hooks and hasattr(base, "disable_input_require_grads"):
            base.disable_input_require_grads()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (transformers' ``GradientCheckpointingLayer`` subclasses: the
    decoder and encoder layers of current architectures)."""

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def compiled_layers(model: nn.Module, enabled: bool):
    """``torch.compile`` each decoder layer (regional compilation, ``dynamic=True``: one graph for
    every sequence length and batch size instead of one per shape) inside the block; yields how
    many layers were compiled. On exit the layers run eagerly again and dynamo's caches are reset,
    so each arm pays its own compilation (a shared cache would make an arm's time depend on the
    arms before it)."""
    if not enabled:
        yield 0
        return
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"train.compile: no decoder layers found in {type(model).__name__}; set train.compile=false")
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()


def target_counter(nll_fn: Callable, model: nn.Module) -> Callable[[dict], torch.Tensor]:
    """How many targets ``nll_fn`` counts in a batch, from the labels alone (no forward pass).

    ``nll_fn.count_targets(batch)`` where the function has one; else, as the per-example counts of
    this project's loss functions: one per class label for classification (labels ``(B,)``), every
    label that is not -100 for encoder-decoders (the decoder's position t predicts label t), and
    for causal LMs (:func:`~loraplace.run.evaluation.token_nll`) the labels at positions t >= 1 (position
    t-1 predicts label t; label 0 is never a target).
    """
    own = getattr(nll_fn, "count_targets", None)
    if callable(own):
        return own
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    shifted = not getattr(getattr(base, "config", None), "is_encoder_decoder", False)

    def count(batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        if shifted and labels.dim() > 1:
            labels = labels[:, 1:]
        return (labels != IGNORE_INDEX).sum()

    return count


class EpochOrder(torch.utils.data.Sampler):
    """A shuffling sampler whose epoch ``e`` order is the ``e``-th draw of a generator seeded with
    ``seed``, whatever iterated before: :meth:`set_epoch` (the Trainer calls it, through
    accelerate, before every epoch, also after resuming) restores the generator's state at the
    start of that epoch (kept from the iteration before, else reseeded and the earlier epochs'
    draws repeated). Straight through, the orders are those of one generator drawn epoch after epoch."""

    def __init__(self, sampler, seed: int):
        self.sampler, self.seed = sampler, seed
        sampler.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self._states = {0: sampler.generator.get_state()}  # epoch -> generator state at its start

    def set_epoch(self, epoch: int) -> None:
        if epoch not in self._states:
            self.sampler.generator.manual_seed(self.seed)
            for _ in range(epoch):
                list(self.sampler)  # draws one epoch's permutation
        else:
            self.sampler.generator.set_state(self._states[epoch])
        self.epoch = epoch

    def __iter__(self):
        order = list(self.sampler)  # the whole epoch's draw, so the state after it is known now
        self._states[self.epoch + 1] = self.sampler.generator.get_state()
        self.epoch += 1  # where set_epoch is not called (a plain DataLoader), the next epoch follows
        return iter(order)

    def __len__(self) -> int:
        return len(self.sampler)


class PlacementTrainer(Trainer):
    """Trainer whose loss is the token-weighted mean NLL over labelled tokens (selective logits).

    The loss of one optimizer step is (summed NLL over every labelled token of its micro-batches) /
    (labelled tokens of the step), counted by :func:`target_counter` before the first backward of
    the step (:meth:`get_batch_samples`) and checked against the counts ``nll_fn`` returns. The
    Trainer's own count (``num_items_in_batch``) is not used: its meaning changed across
    transformers versions (shifted or unshifted labels, encoder-decoders).
    """

    # The loss is already the step's token mean: training_step must not divide it by the
    # accumulation steps (transformers >= 5 reads this attribute; older versions read
    # model_accepts_loss_kwargs and a non-None num_items_in_batch, which get_batch_samples returns).
    loss_is_scaled_for_ga = True

    def __init__(self, *args, nll_fn: Callable = token_nll, **kwargs):
        super().__init__(*args, **kwargs)
        # Per-example (nll_sum, n_tokens, ...) of a batch: the task's loss (loraplace.run.tasks.Task.nll).
        self.nll_fn = nll_fn
        self.count_targets = target_counter(nll_fn, self.model)
        # For transformers versions without loss_is_scaled_for_ga: with this flag and a non-None
        # num_items_in_batch, their training_step does not divide by the accumulation steps either.
        self.model_accepts_loss_kwargs = True
        self.real_tokens = 0  # non-padding input tokens seen in training
        self.label_tokens = 0
        self._step_counts: collections.deque[int] = collections.deque()  # per micro-batch, this step
        self._step_total = 0  # labelled tokens of the current optimizer step

    def _get_train_sampler(self, *args, **kwargs):
        """The Trainer's sampler (length-grouped), shuffled by a generator of its own seeded from
        ``data_seed`` (else ``seed``): without one, ``LengthGroupedSampler`` draws each epoch's
        permutation from the global torch RNG, which LoRA dropout and adapter initialisation also
        consume, so from the second epoch on the batches would depend on the strategy.
        (``TrainingArguments.data_seed`` alone does not help: transformers passes it to accelerate,
        which uses it only to reseed a plain ``RandomSampler``.) Each epoch's order is a function of
        the seed and the epoch alone (:class:`EpochOrder`), so a run resumed from a checkpoint in
        a later epoch sees the batches a run trained straight through sees."""
        sampler = super()._get_train_sampler(*args, **kwargs)
        if sampler is not None and hasattr(sampler, "generator") and sampler.generator is None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochOrder(sampler, int(seed))
        return sampler

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """The micro-batches of one optimizer step, and loraplace's own count of their targets
        (returned as ``num_items_in_batch``; :meth:`compute_loss` uses its own copy)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        counts = [int(self.count_targets(batch)) for batch in batch_samples]
        self._step_counts = collections.deque(counts)
        self._step_total = sum(counts)
        return batch_samples, torch.tensor(max(self._step_total, 1), device=self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Accelerate applies mixed precision by wrapping ``model.forward``; token_nll calls the
        # model's body and head directly (selective logits), so enter the autocast here.
        with self.accelerator.autocast():
            nll_sum, n_tokens = self.nll_fn(model, inputs)[:2]
        count = int(n_tokens.sum())
        if model.training and self._step_counts:
            expected = self._step_counts.popleft()
            if count != expected:
                raise RuntimeError(
                    f"loss normalisation: the loss function counted {count} targets in a micro-batch where "
                    f"loraplace counted {expected} from its labels; give the loss function a "
                    "count_targets(batch) attribute that counts as it does"
                )
            denom = max(self._step_total, 1)
        else:  # outside an optimizer step (not used by loraplace): this batch's token mean
            denom = max(count, 1)
        loss = nll_sum.sum() / denom
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss ({loss.item()}) at step {self.state.global_step}")
        if model.training:
            self.real_tokens += int(inputs["attention_mask"].sum())
            self.label_tokens += count
        return (loss, None) if return_outputs else loss


def _rng_devices(device: torch.device) -> dict:
    """``fork_rng`` arguments that fork the CPU generator and the one of ``device``."""
    if device.type == "cpu":
        return {"devices": []}
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if device.type == "cuda" else 0
    return {"devices": [index], "device_type": device.type}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def warm_up(model: nn.Module, batch: dict[str, torch.Tensor], nll_fn: Callable, *,
            autocast: Callable[[], contextlib.AbstractContextManager], device: torch.device) -> float:
    """One forward and backward of ``batch`` in training mode under ``autocast()``, that leaves
    everything training depends on as it was; returns its seconds.

    It pays the one-time costs (lazy initialisation, allocator growth, kernel selection) that
    would otherwise be timed in whichever arm runs first. The random state is forked (LoRA dropout
    draws from it), every parameter's gradient is put back as it was (None before training), no
    optimizer exists yet, and the model's train/eval mode is restored. Call it in the same
    attention implementation and frozen-weight precision as training.
    """
    start = _clock()
    was_training = model.training
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        with torch.random.fork_rng(**_rng_devices(device)):
            model.train()
            with autocast():
                nll_sum, n_tokens = nll_fn(model, batch)[:2]
            loss = nll_sum.sum() / n_tokens.sum().clamp(min=1)
            loss.backward()
            _synchronize(device)
    finally:
        for p, grad in grads:
            p.grad = grad
        model.train(was_training)
    return _clock() - start


def _first_features(train_dataset, n: int) -> list[dict]:
    """``n`` examples for the warm-up and the selective-logits check: the longest (the length-grouped
    sampler starts with the longest example, so the warm-up grows memory to what training needs)."""
    size = len(train_dataset)
    order = list(range(size))
    if "length" in (getattr(train_dataset, "column_names", None) or ()):
        lengths = list(train_dataset["length"])
        order.sort(key=lambda i: -lengths[i])
    return [train_dataset[i] for i in order[:min(n, size)]]


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


class _StopAt(TrainerCallback):
    """Ends training after optimizer step ``step`` (the learning-rate schedule stays the full
    run's) and, with ``save``, saves the Trainer's checkpoint there (adapter weights, optimizer,
    scheduler, random states, trainer state), from which a later call continues."""

    def __init__(self, step: int, save: bool):
        self.step, self.save = step, save

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = self.save


@dataclass
class TrainOutcome:
    seconds: float  # training wall time, after the untimed warm-up
    steps: int
    real_tokens: int
    label_tokens: int
    log_history: list[dict] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)  # speed choices made (attention, dropout, weights, warmup)
    warmup_seconds: float = 0.0  # the untimed warm-up forward and backward (0: none)
    selective_check: tuple[float, float] | None = None  # (selective, full-logits) loss of the check batch
    memory_plan: dict = field(default_factory=dict)  # gradient checkpointing's decision and the estimates (memory_plan)

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else math.nan


def train_adapters(model: nn.Module, train_dataset, collator, settings: TrainSettings, *, seed: int,
                   precision: str, device: torch.device, output_dir: Path,
                   on_step: Callable[[int, int, float | None], None] | None = None,
                   eval_loss: Callable[[], float] | None = None,
                   nll_fn: Callable = token_nll, warmup: bool = True,
                   check_selective: bool = True, callbacks: Sequence[TrainerCallback] = (),
                   dropout_masks: str = "independent", stop_at: int | None = None,
                   resume_from: Path | None = None) -> TrainOutcome:
    """Train the adapters of a PEFT-wrapped model for ``settings.max_steps`` optimizer steps.

    ``nll_fn`` gives the per-example loss sums of a batch: the task's
    :attr:`~loraplace.run.tasks.Task.nll` (default: causal-LM :func:`~loraplace.run.evaluation.token_nll`).
    ``eval_loss`` (called every ``settings.eval_every`` steps when given) returns the held-out loss
    for the eval-loss curve; its time is not excluded from ``seconds``. ``callbacks`` are added to
    the Trainer (a method's own step hooks, such as AdaLoRA's allocator). ``dropout_masks``:
    ``independent`` (one LoRA dropout mask per adapter, as PEFT) or ``shared`` (adapters that read
    the same input share one; :class:`SharedMasks`).

    The data order depends only on ``seed`` (and the dataset), never on the strategy, so every
    arm of a study sees the same batches in the same order.

    Before the timer starts: with ``check_selective`` (a loss on selective logits:
    :attr:`~loraplace.run.tasks.Task.selective_logits`, the causal LM's ``token_nll``), the
    selective-logits loss is compared with the model's own full-logits loss on the first training
    examples (:func:`~loraplace.run.evaluation.check_selective_loss`; raises
    :class:`~loraplace.run.evaluation.SelectiveLossMismatch`); with ``warmup``, one untimed forward and
    backward (:func:`warm_up`) whose time is ``TrainOutcome.warmup_seconds``. Neither changes the
    random state, the gradients or the weights, so the training is the same with or without them.

    ``stop_at`` (a step below ``settings.max_steps``) stops there and saves the Trainer's checkpoint
    in ``output_dir/checkpoint-<step>``; ``resume_from`` (such a checkpoint) continues from it, with
    its optimizer, scheduler, random states and place in the data: a run trained in pieces equals
    one trained straight through (tests/test_tuning.py). ``TrainOutcome`` then counts the steps
    from the start, and the time and tokens of this call only.
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
    for callback in callbacks:  # e.g. AdaLoRA's rank allocator (loraplace.methods.AdaLoraCallback)
        trainer.add_callback(callback)
    if stop_at is not None and stop_at < settings.max_steps:
        trainer.add_callback(_StopAt(stop_at, save=True))
    trainer.remove_callback(PrinterCallback)  # progress and the log go through on_step and log_history
    swapped = use_mask_dropout(model, shared=dropout_masks == "shared")
    choices = {"lora_dropout": ("mask, shared by adapters of one input" if dropout_masks == "shared" else "mask")
               if swapped else "none"}
    features = _first_features(train_dataset, settings.batch_size) if (warmup or check_selective) else []
    run_device = trainer.args.device
    selective = None
    if check_selective and features:
        # float32 weights, eval mode, no autocast, random state untouched (forked)
        with torch.random.fork_rng(**_rng_devices(run_device)):
            selective = check_selective_loss(trainer.model, collator(features[:2]))
    warmup_seconds = 0.0
    gradient_checkpointing, memory_plan = settings.gradient_checkpointing, {}
    if gradient_checkpointing == "auto":  # a caller without its own decision (a study's run decides before)

        plan = plan_checkpointing("auto", model, None, train_dataset, settings, precision=precision, device=device)
        gradient_checkpointing, memory_plan = plan.enabled, plan.record()
    with frozen_weights_as(model, autocast_dtype(precision)), attention_as(model, fast_attention(device)) as attn, \
            checkpointing(model, gradient_checkpointing) as ckpt, compiled_layers(model, settings.compile) as compiled:
        choices.update(attention=attn, frozen_weights=str(autocast_dtype(precision) or torch.float32),
                       gradient_checkpointing="on (non-reentrant)" if ckpt else "off")
        if compiled:
            choices["compile"] = f"{compiled} decoder layers, dynamic shapes (compiled in the untimed warm-up)"
        if warmup and features:
            batch = {k: v.to(run_device) if torch.is_tensor(v) else v for k, v in collator(features).items()}
            warmup_seconds = warm_up(trainer.model, batch, nll_fn, autocast=trainer.accelerator.autocast,
                                     device=run_device)
        choices["warmup"] = "1 batch, untimed" if warmup_seconds else "none"
        start = _clock()
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        seconds = _clock() - start
    return TrainOutcome(
        seconds=seconds,
        steps=trainer.state.global_step,
        real_tokens=trainer.real_tokens,
        label_tokens=trainer.label_tokens,
        log_history=list(trainer.state.log_history),
        choices=choices,
        warmup_seconds=warmup_seconds,
        selective_check=selective,
        memory_plan=memory_plan,
    )
