"""One run of a study as a self-contained job: a :class:`RunSpec` goes in, a :class:`RunResult`
comes out, and the run's files land in its own folder. Nothing here knows about other runs,
so an executor may run them in any process or on any machine."""

from __future__ import annotations

import re
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from loraplace.config import LoraSettings
from loraplace.data import PreparedData
from loraplace.errors import LoraplaceError
from loraplace.study.files import atomic_write_json, atomic_write_text
from loraplace.study.records import RunResult, RunSpec
from loraplace.tasks import Task

if TYPE_CHECKING:
    from loraplace.evaluation import EvalResult
    from loraplace.measure import PeakMemory
    from loraplace.training import TrainOutcome


class RunContext:
    """What runs of one process share: the tokenizer, the base model (loaded once and reused:
    adapters are unloaded after each run) and the tokenized data."""

    def __init__(self, allow_fetch: bool = True):
        self.allow_fetch = allow_fetch
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._data: dict[tuple, Any] = {}
        self.prepared = 0  # data preparations (tokenizations) this context ran itself
        self._tasks: dict[str, str] = {}  # model -> the name of the task its architecture implies

    def tokenizer(self, model: str):
        from loraplace.models import load_tokenizer, resolve_model_path

        if model not in self._tokenizers:
            self._tokenizers[model] = load_tokenizer(resolve_model_path(model, self.allow_fetch))
        return self._tokenizers[model]

    def task(self, spec: RunSpec) -> Task:
        """The spec's task record; ``auto`` follows the model's architecture (:func:`loraplace.tasks.task_of`)."""
        from loraplace.models import load_config, resolve_model_path
        from loraplace.tasks import get_task, task_of

        if spec.task != "auto":
            return get_task(spec.task)
        if spec.model not in self._tasks:
            self._tasks[spec.model] = task_of(load_config(resolve_model_path(spec.model, self.allow_fetch))[0])
        return get_task(self._tasks[spec.model])

    def base_model(self, model: str, device: torch.device, task: Task, num_labels: int | None = None,
                   round_to: torch.dtype | None = None, quantization: str = "none"):
        """The loaded base model with the head of ``task``, shared by the runs (one in memory at a time).

        ``quantization`` (nf4, int8) quantizes its projections with bitsandbytes at load and prepares
        it for LoRA training once (:func:`loraplace.quantization.prepare_quantized`); rounding leaves
        the quantized weights alone. The quantization is part of the cache key.

        ``round_to`` (bfloat16 or float16: the run's autocast dtype, else None) rounds the
        frozen linear weights once at load (:func:`loraplace.models.round_linear_weights`).
        Training holds those weights in that dtype and writes them back as float32
        (:func:`loraplace.training.frozen_weights_as`), which leaves rounded values: rounding them
        at load instead makes every run of the study, the base row included, see the same weights
        (bit for bit, whatever ran before), and changes no result, since autocast rounds them to
        the same values at every matmul. A float32 copy of the weights to restore after each run
        would cost a second model's memory. The rounding dtype is part of the cache key.
        """
        from loraplace.models import load_model, resolve_model_path, round_linear_weights

        key = (model, str(device), task.name, num_labels, str(round_to), quantization)
        if key not in self._models:
            self._models.clear()  # one base model in memory at a time
            from transformers import set_seed

            set_seed(0)  # a classification head is initialised at load: the same head for every run
            loaded = load_model(resolve_model_path(model, self.allow_fetch), task.name, num_labels,
                                quantization=quantization, device=device)
            if loaded.config.pad_token_id is None:  # classifiers find the last token by the pad id
                loaded.config.pad_token_id = self.tokenizer(model).pad_token_id
            if round_to is not None:
                round_linear_weights(loaded, round_to)
            self._models[key] = loaded
        return self._models[key]

    @staticmethod
    def data_key(spec: RunSpec, task: Task) -> tuple:
        """What the tokenized data of ``spec`` depends on (runs with the same key share it)."""
        return (spec.model, spec.dataset, task.name, spec.train.max_length, spec.train.loss_on, spec.data.eval_size,
                spec.data.split_seed, spec.data.max_train_examples)

    def add_data(self, key: tuple, data: PreparedData) -> None:
        """Use ``data``, prepared elsewhere (the Ray driver), for the runs of ``key``."""
        self._data.setdefault(key, data)

    def has_data(self, key: tuple) -> bool:
        return key in self._data

    def data(self, spec: RunSpec, task: Task) -> PreparedData:
        """The spec's tokenized train and eval splits, prepared by its task (:attr:`Task.prepare`)."""
        key = self.data_key(spec, task)
        if key not in self._data:
            self.prepared += 1
            self._data[key] = task.prepare(
                spec.dataset, self.tokenizer(spec.model), eval_size=spec.data.eval_size,
                max_length=spec.train.max_length, split_seed=spec.data.split_seed, loss_on=spec.train.loss_on,
                max_train_examples=spec.data.max_train_examples, allow_fetch=self.allow_fetch)
        return self._data[key]


def wrapped_adapters(peft_model, adapter: str = "default") -> dict[str, tuple[int, float]]:
    """What PEFT actually wrapped: name in the base model -> (rank, alpha).

    A wrapped module keeps its name; a wrapped MoE expert parameter (``lora.ParamWrapper``,
    possibly nested as ``experts.base_layer``) is reported as ``<module>.<parameter>``, the
    name the placement uses.
    """
    from peft.tuners.lora import LoraLayer, ParamWrapper

    found = {}
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.r:
            continue
        if isinstance(module, ParamWrapper):
            name = f"{name.replace('.base_layer', '')}.{module.parameter_name}"
        found[name] = (module.r[adapter], module.lora_alpha[adapter])
    return found


def adapter_update_norms(peft_model, placement, adapter: str = "default") -> list[dict[str, Any]]:
    """Post-hoc importance of a trained arm: per adapted module, the Frobenius norm of the update its
    adapter learned, ``||(alpha / r) B A||`` (PEFT's ``get_delta_weight``, which also orients GPT-2's
    Conv1D weights), in the placement's module order. Expert parameters have no single delta and are
    left out."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    found: dict[str, float] = {}
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper) and adapter in module.r:
                found[name] = float(module.get_delta_weight(adapter).float().norm())
    return [{"name": m.name, "role": m.role, "stack": m.stack, "layer": m.layer, "r": m.r, "norm": found[m.name]}
            for m in placement.modules if m.name in found]


def lora_config_for(placement, lora: LoraSettings, task_type: str = "CAUSAL_LM"):
    """The PEFT ``LoraConfig`` that adapts exactly ``placement``: its modules as
    ``target_modules``, MoE expert parameters as ``target_parameters``, and per-module ranks and
    alphas through ``rank_pattern`` / ``alpha_pattern``.

    PEFT matches a pattern key ``k`` against a module name ``n`` with
    ``re.match(rf"(.*\.)?({k})$", n)``: a bare name would also match any module whose name ends in
    ``.<name>``, and its dots match any character. Keys are therefore ``^`` + the escaped exact
    name, which matches that one name only.

    Raises:
        LoraplaceError: expert parameters with ``lora.dropout`` > 0 (PEFT has no dropout for them).
    """
    from collections import Counter

    from peft import LoraConfig

    if placement.parameter_names and lora.dropout > 0:
        raise LoraplaceError(
            f"strategy {placement.strategy!r} adapts mixture-of-experts parameters, for which PEFT has no "
            f"adapter dropout; set lora.dropout=0 (got {lora.dropout:g}) or leave the experts out (e.g. attention)"
        )
    # The most common rank/alpha is the default; only the others need a pattern.
    r = Counter(m.r for m in placement.modules).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in placement.modules).most_common(1)[0][0]
    key = lambda name: "^" + re.escape(name)  # noqa: E731
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=lora.dropout, bias="none", task_type=task_type,
        target_modules=placement.module_names,
        target_parameters=placement.parameter_names or None,
        rank_pattern={key(m.name): m.r for m in placement.modules if m.r != r},
        alpha_pattern={key(m.name): m.alpha for m in placement.modules if m.alpha != alpha},
    )


def check_wrapped(peft_model, placement, trainable: int) -> None:
    """Fail loudly unless PEFT wrapped exactly the planned modules, at the planned ranks and
    alphas, and the model trains exactly the planned number of parameters.

    Raises:
        LoraplaceError: naming up to five differing modules.
    """
    wrapped = wrapped_adapters(peft_model)
    planned = {m.name: (m.r, m.alpha) for m in placement.modules}
    if set(wrapped) != set(planned):
        extra = sorted(set(wrapped) - set(planned))[:5]
        missing = sorted(set(planned) - set(wrapped))[:5]
        raise LoraplaceError(
            f"PEFT wrapped a different module set than planned for {placement.strategy!r}: "
            f"unexpected {extra}, missing {missing}"
        )
    differ = [f"{n}: r={wrapped[n][0]} alpha={wrapped[n][1]:g}, planned r={planned[n][0]} alpha={planned[n][1]:g}"
              for n in planned if (wrapped[n][0], float(wrapped[n][1])) != (planned[n][0], float(planned[n][1]))]
    if differ:
        raise LoraplaceError(
            f"PEFT applied other ranks/alphas than planned for {placement.strategy!r}: " + "; ".join(differ[:5])
        )
    if trainable != placement.lora_params:
        raise LoraplaceError(
            f"trainable parameters {trainable:,} differ from the plan's {placement.lora_params:,}"
        )


def unload_adapters(peft_model) -> Any:
    """Remove every adapter and hand back the base model exactly as it was before
    ``get_peft_model``.

    ``peft_model.unload()`` alone is not enough: a module PEFT trains in full
    (``modules_to_save``, e.g. a classifier's new head) sits in a ``ModulesToSaveWrapper`` that
    keeps the untouched original next to a trained copy, and ``unload`` puts the trained copy
    into the model, so the next run on the shared base model would start from this run's head.
    Each such wrapper (any ``AuxiliaryTrainingWrapper``) is first replaced by its original
    module; ``unload`` then removes the LoRA layers (restoring their untouched base layers).
    """
    from peft.utils.other import AuxiliaryTrainingWrapper

    base = peft_model.get_base_model()
    wrappers = [(name, m) for name, m in base.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    for name, wrapper in wrappers:
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, wrapper.original_module)
    return peft_model.unload()


UNIFORM_FRACTION = 0.9  # eval loss at or above this share of ln(V) counts as "about uniform"
GOOD_START_FRACTION = 0.75  # a first training loss at or below this share of ln(V) was clearly better


def uniform_loss(model, num_labels: int | None = None) -> float | None:
    """The loss of predicting the uniform distribution: ln(number of classes) for a classifier
    (``num_labels`` given), ln(vocabulary size) otherwise (rows of the output embedding, else
    ``config.vocab_size``)."""
    import math

    if num_labels is not None:
        return math.log(num_labels) if num_labels > 1 else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    size = getattr(getattr(out, "weight", None), "shape", (None,))[0]
    size = size or getattr(getattr(model, "config", None), "vocab_size", None)
    return math.log(size) if size and size > 1 else None


def divergence(log_history: list[dict], eval_loss: float | None, uniform: float | None) -> str | None:
    """Why a run that finished (no NaN/inf) diverged, or None.

    ``first`` is the first logged training loss (step 1: the model before any update). A run
    diverged when

    (a) its eval loss is at or above ``UNIFORM_FRACTION`` (0.9) of the uniform-prediction loss
        ``uniform`` = ln(V) (V: vocabulary size, or number of classes), i.e. it predicts about as
        badly as a uniform guess or worse, although ``first`` was at most ``GOOD_START_FRACTION``
        (0.75) of it: the model was clearly better than uniform when training began (a
        random-init model starts at about ln(V) and is never flagged by this rule); or
    (b) the loss exploded: a later logged training loss, or the final eval loss, is more than
        twice ``first`` and at least 1 nat above it.
    """
    losses = [float(e["loss"]) for e in log_history if "loss" in e]
    if not losses:
        return None
    first = losses[0]
    if (uniform is not None and eval_loss is not None and eval_loss >= UNIFORM_FRACTION * uniform
            and first <= GOOD_START_FRACTION * uniform):
        return (f"eval loss {eval_loss:.4f} is about the uniform-prediction loss ln(V) = {uniform:.4f} "
                f"(>= {UNIFORM_FRACTION:g} of it), although the first training loss was {first:.4f}")
    later = [(f"training loss {x:.4f}", x) for x in losses[1:]]
    if eval_loss is not None:
        later.append((f"eval loss {eval_loss:.4f}", eval_loss))
    for what, x in later:
        if x > 2 * first and x >= first + 1.0:
            return f"{what} exploded: more than twice the first training loss {first:.4f} and >= 1 nat above it"
    return None


@dataclass
class RunSetup:
    """What :meth:`RunRecipe.prepare` hands to the other phases: the shared, loaded pieces of the run."""

    run_dir: Path
    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    task: Task
    tokenizer: Any
    data: PreparedData
    base: Any  # the shared base model (RunContext.base_model)
    collator: Callable
    base_params: int
    uniform_loss: float | None  # ln(V) or ln(classes): see divergence

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        from loraplace.training import autocast_dtype

        return autocast_dtype(self.precision)


@dataclass
class Adapters:
    """What :meth:`RunRecipe.wrap_and_check` made: the PEFT-wrapped base model and its checked counts."""

    peft_model: Any
    placement: Any  # loraplace.placement.Placement
    trainable: int  # adapters + a classifier's head
    head: int  # of trainable: a classifier's new head, trained in full (PEFT's modules_to_save)
    total: int  # base + adapter parameters
    method: str | None = None  # a baseline that is more than a placement: eva, adalora
    callbacks: list = field(default_factory=list)  # the method's Trainer callbacks (AdaLoRA's allocator)

    @property
    def rank(self) -> int | None:
        """The rank of every adapted module, or None where they differ."""
        ranks = {r for rs in self.placement.ranks().values() for r in rs}
        return ranks.pop() if len(ranks) == 1 else None


class RunRecipe:
    """One run, phase by phase, each returning what it made (torchtune's recipes read the same way):

    :meth:`prepare` (device, precision, task, tokenizer, data, base model, collator; :meth:`load` without
    writing anything) ->
    :meth:`use_base` for the base row, or :meth:`wrap_and_check` (placement -> PEFT config -> wrap
    -> :func:`check_wrapped` -> counts) then :meth:`train` -> :meth:`evaluate` -> :meth:`record`
    (the :class:`RunResult`). Each phase writes the run file of what it made: ``config.json``,
    ``modules.json``, ``train_log.json`` and ``adapter_norms.json``, ``eval_examples.json``, ``result.json``.
    :func:`execute_run` calls them in order and owns the failure handling.
    """

    def __init__(self, spec: RunSpec, ctx: RunContext,
                 on_step: Callable[[int, int, float | None], None] | None = None):
        self.spec, self.ctx, self.on_step = spec, ctx, on_step

    def prepare(self) -> RunSetup:
        run_dir = Path(self.spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", self.spec.model_dump())
        return self.load()

    def load(self) -> RunSetup:
        """What the run shares with the others (loaded once per process by the :class:`RunContext`),
        without creating or writing anything in the run's folder."""
        from loraplace.models import pick_device
        from loraplace.placement import total_params
        from loraplace.training import autocast_dtype, resolve_precision

        spec, ctx = self.spec, self.ctx
        run_dir = Path(spec.run_dir)
        device = pick_device(spec.device)
        precision = resolve_precision(spec.train.precision, device)
        task = ctx.task(spec)
        tokenizer = ctx.tokenizer(spec.model)
        data = ctx.data(spec, task)
        num_labels = len(data.labels) if data.labels is not None else None  # classification: the classes
        base = ctx.base_model(spec.model, device, task, num_labels, round_to=autocast_dtype(precision),
                              quantization=spec.quantization)
        return RunSetup(run_dir=run_dir, device=device, precision=precision, task=task, tokenizer=tokenizer,
                        data=data, base=base, collator=task.collator(tokenizer.pad_token_id),
                        base_params=total_params(base), uniform_loss=uniform_loss(base, num_labels))

    def use_base(self, setup: RunSetup):
        """The base row evaluates the base model as it is; returns it."""
        from loraplace.evaluation import check_selective_loss

        atomic_write_json(setup.run_dir / "modules.json", {"strategy": "base", "modules": []})
        if setup.task.selective_logits:  # the base row is evaluated with the fast loss too: check it first
            train = setup.data.train
            check_selective_loss(setup.base, setup.collator([train[i] for i in range(min(2, len(train)))]))
        return setup.base

    def wrap_and_check(self, setup: RunSetup) -> Adapters:
        from peft import get_peft_model
        from transformers import set_seed

        from loraplace.placement import parse_strategy, resolve_arm, total_params, trainable_params
        from loraplace.placement.arms import Arm

        spec = self.spec
        method = parse_strategy(Arm.parse(spec.strategy).strategy).method
        callbacks: list = []
        eva_state = None
        if method == "adalora":
            placement, lora_config, callbacks = self._adalora(setup)
        else:
            # An arm "attention~full" is the strategy with ranks matched to full's budget.
            placement = resolve_arm(setup.base, spec.strategy, spec.lora.r, spec.lora.alpha, ranks=spec.ranks,
                                    budget=spec.budget)
            if method == "eva":
                eva_state = self._eva_state(setup)
            lora_config = lora_config_for(placement, spec.lora, task_type=setup.task.peft_task_type)
        atomic_write_json(setup.run_dir / "modules.json", placement.to_dict())
        set_seed(spec.seed)  # adapter initialisation depends on the seed only
        with warnings.catch_warnings():
            # PEFT checks rank_pattern keys against wrapped modules only, so keys of expert
            # parameters look unused although they apply; check_wrapped verifies every rank.
            warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys",
                                    category=RuntimeWarning)
            peft_model = get_peft_model(setup.base, lora_config)
        trainable = trainable_params(peft_model)
        # A classifier's new head trains in full beside the adapters (PEFT's modules_to_save).
        head = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and ".modules_to_save." in n)
        try:
            if method == "adalora":
                from loraplace.baselines import check_adalora_wrapped

                check_adalora_wrapped(peft_model, placement, trainable - head)
            else:
                if eva_state is not None:
                    from loraplace.baselines import apply_eva

                    apply_eva(peft_model, eva_state)
                check_wrapped(peft_model, placement, trainable - head)
        except BaseException:
            unload_adapters(peft_model)  # the shared base model must come back unchanged
            raise
        return Adapters(peft_model=peft_model, placement=placement, trainable=trainable, head=head,
                        total=total_params(peft_model), method=method, callbacks=callbacks)

    def _adalora(self, setup: RunSetup):
        """AdaLoRA on the modules of ``full``, its final rank budget set to meet the arm's parameter
        budget: ``(initial placement, AdaLoraConfig, [its allocator callback])``."""
        from loraplace.baselines import AdaLoraCallback, adalora_config, adalora_placement
        from loraplace.placement.arms import REFERENCE_STRATEGY, Arm
        from loraplace.placement.auto import slot_placement
        from loraplace.placement.budget import budget_target

        spec = self.spec
        reference = Arm.parse(spec.strategy).reference
        reference = reference if reference is not None else REFERENCE_STRATEGY
        target = budget_target(setup.base, reference, spec.lora.r, spec.lora.alpha)
        full = slot_placement(setup.base)
        full.modules = [replace(m, alpha=spec.lora.alpha) for m in full.modules]
        config, info = adalora_config(full, spec.lora, total_steps=spec.train.max_steps, target_params=target,
                                      task_type=setup.task.peft_task_type)
        placement = adalora_placement(full, config)
        placement.strategy = spec.strategy
        placement.budget = {"reference": reference, "target": target, "method": "adalora", **info}
        return placement, config, [AdaLoraCallback()]

    def _eva_state(self, setup: RunSetup):
        """EVA's initial A matrices for this run: the ones the study computed once
        (:func:`loraplace.study.allocations.eva_allocation`), carried in the spec; checked against
        the stored ranks."""
        from safetensors.torch import load as load_tensors

        spec = self.spec
        if not spec.eva_state:
            raise LoraplaceError(f"arm {spec.strategy!r}: the study's EVA initialisation is missing from the run")
        state = load_tensors(spec.eva_state)
        ranks = {name: int(w.shape[0]) for name, w in state.items() if w.shape[0] > 0}
        if ranks != spec.ranks:
            raise LoraplaceError(f"arm {spec.strategy!r}: the stored EVA initialisation has other ranks than the "
                                 "stored allocation; delete both files in allocations/ to recompute them")
        return state

    def train(self, setup: RunSetup, adapters: Adapters) -> TrainOutcome:
        """Decide gradient checkpointing from the memory plan (``auto``: on only when the run would not
        fit in the device's free memory without it), then train; the decision and the estimates go
        into the outcome (the result's ``memory_plan``)."""
        from loraplace.memory_plan import plan_checkpointing
        from loraplace.training import train_adapters

        spec, model = self.spec, adapters.peft_model
        plan = plan_checkpointing(spec.train.gradient_checkpointing, model, adapters.placement, setup.data.train,
                                  spec.train, precision=setup.precision, device=setup.device, task=setup.task.name,
                                  lora_dropout=spec.lora.dropout, quantization=getattr(spec, "quantization", "none"),
                                  dropout_masks=spec.lora.dropout_masks)
        settings = spec.train.model_copy(update={"gradient_checkpointing": plan.enabled})
        outcome = train_adapters(
            model, setup.data.train, setup.collator, settings, seed=spec.seed, precision=setup.precision,
            device=setup.device, output_dir=setup.run_dir / "trainer", on_step=self.on_step, nll_fn=setup.task.nll,
            check_selective=setup.task.selective_logits,
            eval_loss=lambda: self._evaluate(setup, model, by_length=True).loss, callbacks=adapters.callbacks,
            dropout_masks=spec.lora.dropout_masks,
        )
        outcome.memory_plan = plan.record()
        atomic_write_json(setup.run_dir / "train_log.json", outcome.log_history)
        if adapters.method == "adalora":
            self._adalora_outcome(setup, adapters)
        atomic_write_json(setup.run_dir / "adapter_norms.json", {"modules": self._norms(adapters)})
        return outcome

    def _adalora_outcome(self, setup: RunSetup, adapters: Adapters) -> None:
        """What AdaLoRA's allocator left: the final ranks and parameters, into the placement's budget
        record (the result's ``final_params``) and ``adalora.json``."""
        from loraplace.baselines import adalora_final_ranks, adalora_params

        ranks = adalora_final_ranks(adapters.peft_model)
        initial, final = adalora_params(adapters.peft_model)
        budget = adapters.placement.budget
        budget.update(initial_params=initial, final_params=final, achieved=final,
                      deviation_pct=100.0 * (final - budget["target"]) / budget["target"])
        history = adapters.callbacks[0].history if adapters.callbacks else []
        atomic_write_json(setup.run_dir / "adalora.json", {"final_ranks": ranks, "initial_params": initial,
                                                           "final_params": final, "budget": budget,
                                                           "allocator_calls": len(history), "history": history})

    def _norms(self, adapters: Adapters) -> list[dict[str, Any]]:
        if adapters.method != "adalora":
            return adapter_update_norms(adapters.peft_model, adapters.placement)
        from loraplace.baselines import adalora_final_ranks, adalora_update_norms

        norms, ranks = adalora_update_norms(adapters.peft_model), adalora_final_ranks(adapters.peft_model)
        return [{"name": m.name, "role": m.role, "stack": m.stack, "layer": m.layer, "r": ranks.get(m.name, 0),
                 "norm": norms[m.name]} for m in adapters.placement.modules if m.name in norms]

    def evaluate(self, setup: RunSetup, model) -> EvalResult:
        """The final evaluation on the held-out split, with the all-token sums where the task has them."""
        ev = self._evaluate(setup, model, all_tokens=setup.task.all_token_sums)
        examples = {"nll_sum": ev.nll_sums, "n_tokens": ev.n_tokens, "batch": ev.batch_of}
        optional = {"nll_sum_all_tokens": ev.nll_sums_all, "n_tokens_all": ev.n_tokens_all,
                    "nll_sum_pad": ev.nll_sums_pad, "n_pad": ev.n_pad, "correct": ev.correct}
        examples.update({k: v for k, v in optional.items() if v})  # causal LMs / classifiers only
        atomic_write_json(setup.run_dir / "eval_examples.json", examples)
        return ev

    def _evaluate(self, setup: RunSetup, model, **kwargs) -> EvalResult:
        from loraplace.evaluation import evaluate_nll

        return evaluate_nll(model, setup.data.eval, setup.collator, batch_size=self.spec.train.eval_batch_size,
                            device=setup.device, autocast_dtype=setup.autocast_dtype, nll_fn=setup.task.nll, **kwargs)

    def record(self, setup: RunSetup, memory: PeakMemory, *, adapters: Adapters | None,
               outcome: TrainOutcome | None, ev: EvalResult | None, error: str | None) -> RunResult:
        """The run's :class:`RunResult` from what the phases made (None: not reached), written to
        ``result.json``. ``error`` marks the run failed."""
        from loraplace.measure import device_description, library_versions

        spec, is_base = self.spec, self.spec.kind == "base"
        placement = adapters.placement if adapters else None
        budget = (placement.budget or {}) if placement else {}
        losses = [e["loss"] for e in outcome.log_history if "loss" in e] if outcome else []
        reason = divergence(outcome.log_history, ev.loss, setup.uniform_loss) if outcome and ev else None
        trainable = 0 if is_base else adapters.trainable if adapters else None
        total = setup.base_params if is_base else adapters.total if adapters else None
        result = RunResult(
            run_id=spec.run_id, kind=spec.kind, strategy=spec.strategy, seed=spec.seed, position=spec.position,
            status="failed" if error else "ok", error=error, task=setup.task.name, model=spec.model,
            dataset=spec.dataset, device=device_description(setup.device), precision=setup.precision,
            quantization=spec.quantization, versions=library_versions(), base_params=setup.base_params,
            # the adapters (lora rows that got that far)
            r=adapters.rank if adapters else None, alpha=spec.lora.alpha if adapters else None,
            dropout=spec.lora.dropout if adapters else None,
            modules=[m.name for m in placement.modules] if placement else [],
            roles=placement.roles() if placement else [], warnings=placement.warnings if placement else [],
            ranks=placement.ranks() if placement else {}, head_params=adapters.head if adapters else None,
            trainable_params=trainable, total_params=total,
            trainable_pct=100.0 * trainable / total if total else None,
            match_budget=budget.get("reference"), budget_target=budget.get("target"),
            budget_deviation_pct=budget.get("deviation_pct"), final_params=budget.get("final_params"),
            # training
            train_time_s=outcome.seconds if outcome else None, train_steps=outcome.steps if outcome else None,
            train_real_tokens=outcome.real_tokens if outcome else None,
            train_label_tokens=outcome.label_tokens if outcome else None,
            train_tokens_per_s=outcome.tokens_per_second if outcome else None,
            final_train_loss=losses[-1] if losses else None, speed_choices=outcome.choices if outcome else {},
            diverged=reason is not None, diverged_reason=reason,
            # evaluation; exp(cross-entropy) of a class label is no perplexity: classification reports accuracy
            eval_loss=ev.loss if ev else None,
            perplexity=ev.perplexity if ev and setup.task.has_perplexity else None,
            eval_accuracy=ev.accuracy if ev else None, eval_nll_sum=ev.nll_sum if ev else None,
            eval_tokens=ev.tokens if ev else None, eval_examples=len(ev.n_tokens) if ev else None,
            eval_time_s=ev.seconds if ev else None,
            # memory (the run's own: see PeakMemory)
            peak_memory_mib=memory.peak_mib, memory_kind=memory.kind, memory_start_mib=memory.start_mib,
            peak_memory_increase_mib=memory.increase_mib, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            memory_estimate_mib=outcome.memory_plan.get("estimate_mib") if outcome else None,
            memory_plan=outcome.memory_plan if outcome else {},
        )
        atomic_write_json(setup.run_dir / "result.json", result.model_dump())
        return result


def execute_run(spec: RunSpec, ctx: RunContext,
                on_step: Callable[[int, int, float | None], None] | None = None) -> RunResult:
    """Run one job end to end (the phases of :class:`RunRecipe`) and write its files into ``spec.run_dir``.

    A run that fails (non-finite loss, out of memory, ...) returns ``status='failed'`` with the
    reason (and, for an unexpected error, its traceback in ``error.txt``); input errors
    (:class:`LoraplaceError`) and Ctrl-C propagate to the caller. A run that finishes but diverged
    without a NaN (:func:`divergence`) stays ``ok`` with ``diverged=True`` and its reason.

    Runs are independent of what ran before in the process: the shared base model comes back
    unchanged after each arm (:func:`unload_adapters`; frozen weights rounded once at load, see
    :meth:`RunContext.base_model`), and memory is the run's own (:class:`loraplace.measure.PeakMemory`:
    released at the start, then start, peak and increase).
    """
    from loraplace.measure import PeakMemory
    from loraplace.training import NonFiniteLoss

    recipe = RunRecipe(spec, ctx, on_step)
    setup = recipe.prepare()
    adapters = outcome = ev = error = None
    memory = PeakMemory(setup.device)
    try:
        with memory:
            if spec.kind == "base":
                model = recipe.use_base(setup)
            else:
                adapters = recipe.wrap_and_check(setup)
                outcome = recipe.train(setup, adapters)
                model = adapters.peft_model
            ev = recipe.evaluate(setup, model)
    except NonFiniteLoss as e:
        error = str(e)
    except (LoraplaceError, KeyboardInterrupt):
        raise
    except Exception as e:  # a failed run is recorded and the study goes on
        error = f"{type(e).__name__}: {e}"
        atomic_write_text(setup.run_dir / "error.txt", traceback.format_exc())
    finally:
        if adapters is not None:
            # restores the base modules (and a classifier's untrained head) for the next run
            unload_adapters(adapters.peft_model)
    return recipe.record(setup, memory, adapters=adapters, outcome=outcome, ev=ev, error=error)
