"""One run of a study as a self-contained job: a :class:`RunSpec` goes in, a :class:`RunResult`
comes out, and the run's files land in its own folder. Nothing here knows about other runs,
so an executor may run them in any process or on any machine."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from peft import get_peft_model
from transformers import set_seed

from loraplace.adapters import SavedWeights, initial_adapters, save_base_weights, unload_adapters
from loraplace.data import PreparedData
from loraplace.errors import LoraplaceError
from loraplace.files import atomic_write_json, atomic_write_text
from loraplace.methods import Method, method_of
from loraplace.placement.arms import Arm
from loraplace.placement.params import total_params, trainable_params
from loraplace.placement.strategies import DATA_INITS, parse_strategy
from loraplace.records import RunResult, RunSpec
from loraplace.run.context import RunContext
from loraplace.run.device import autocast_dtype, device_description, pick_device, resolve_precision
from loraplace.run.evaluation import EvalResult, check_selective_loss, evaluate_nll
from loraplace.run.measure import PeakMemory, library_versions
from loraplace.run.memory_plan import plan_checkpointing
from loraplace.run.tasks import Task
from loraplace.run.training import NonFiniteLoss, TrainOutcome, train_adapters

UNIFORM_FRACTION = 0.9  # eval loss at or above this share of ln(V) counts as "about uniform"
GOOD_START_FRACTION = 0.75  # a first training loss at or below this share of ln(V) was clearly better


def uniform_loss(model, num_labels: int | None = None) -> float | None:
    """The loss of predicting the uniform distribution: ln(number of classes) for a classifier
    (``num_labels`` given), ln(vocabulary size) otherwise (rows of the output embedding, else
    ``config.vocab_size``)."""

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

        return autocast_dtype(self.precision)


@dataclass
class Adapters:
    """What :meth:`RunRecipe.wrap_and_check` made: the PEFT-wrapped base model and its checked counts."""

    peft_model: Any
    placement: Any  # loraplace.placement.Placement
    trainable: int  # adapters + a classifier's head
    head: int  # of trainable: a classifier's new head, trained in full (PEFT's modules_to_save)
    total: int  # base + adapter parameters
    method: Method  # the arm's adapter method (loraplace.methods)
    callbacks: list = field(default_factory=list)  # the method's Trainer callbacks
    init: str | None = None  # PEFT's init_lora_weights where not its default (pissa, olora, ...)
    saved: SavedWeights = field(default_factory=list)  # base weights the init rewrote, put back on unload
    initial: dict = field(default_factory=dict)  # starting (A, B) where B A started nonzero: norms of the change

    def unload(self) -> Any:
        """The shared base model back as it was before the run (:func:`unload_adapters`)."""
        return unload_adapters(self.peft_model, self.saved)

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
        self.validation_loss: float | None = None  # a tuning run's, after its rung (evaluate)

    def prepare(self) -> RunSetup:
        run_dir = Path(self.spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", self.spec.model_dump())
        return self.load()

    def load(self) -> RunSetup:
        """What the run shares with the others (loaded once per process by the :class:`RunContext`),
        without creating or writing anything in the run's folder."""

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

        atomic_write_json(setup.run_dir / "modules.json", {"strategy": "base", "modules": []})
        if setup.task.selective_logits:  # the base row is evaluated with the fast loss too: check it first
            train = setup.data.train
            check_selective_loss(setup.base, setup.collator([train[i] for i in range(min(2, len(train)))]))
        return setup.base

    def wrap_and_check(self, setup: RunSetup) -> Adapters:
        """The arm's method places it and builds its PEFT config; PEFT wraps the shared base model;
        the method initialises the adapters and checks that PEFT did exactly what was planned."""
        spec = self.spec
        method = method_of(spec.strategy)
        # An arm "attention~full" is the strategy with ranks matched to full's budget.
        placement, lora_config, callbacks = method.adapters(setup.base, spec, setup.task.peft_task_type)
        atomic_write_json(setup.run_dir / "modules.json", placement.to_dict())
        set_seed(spec.seed)  # adapter initialisation depends on the seed only
        init = getattr(lora_config, "init_lora_weights", True)
        named = parse_strategy(Arm.parse(spec.strategy).strategy).init  # a data-driven init is applied next
        init = named if named in DATA_INITS else init if isinstance(init, str) else None
        saved = save_base_weights(setup.base, placement, init)  # an init like PiSSA rewrites them
        with warnings.catch_warnings():
            # PEFT checks rank_pattern keys against wrapped modules only, so keys of expert
            # parameters look unused although they apply; check_wrapped verifies every rank.
            warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys",
                                    category=RuntimeWarning)
            peft_model = get_peft_model(setup.base, lora_config)
        trainable = trainable_params(peft_model)
        # A classifier's new head trains in full beside the adapters (PEFT's modules_to_save).
        head = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and ".modules_to_save." in n)
        adapters = Adapters(peft_model=peft_model, placement=placement, trainable=trainable, head=head,
                            total=total_params(peft_model), method=method, callbacks=callbacks,
                            init=init, saved=saved)
        try:
            method.initialise(peft_model, spec)
            method.check_wrapped(peft_model, placement, trainable - head)
            adapters.initial = initial_adapters(peft_model)
        except BaseException:
            adapters.unload()  # the shared base model must come back unchanged
            raise
        return adapters

    def train(self, setup: RunSetup, adapters: Adapters) -> TrainOutcome:
        """Decide gradient checkpointing from the memory plan (``auto``: on only when the run would not
        fit in the device's free memory without it), then train; the decision and the estimates go
        into the outcome (the result's ``memory_plan``)."""

        spec, model = self.spec, adapters.peft_model
        plan = plan_checkpointing(spec.train.gradient_checkpointing, model, adapters.placement, setup.data.train,
                                  spec.train, precision=setup.precision, device=setup.device, task=setup.task.name,
                                  lora_dropout=spec.lora.dropout, quantization=getattr(spec, "quantization", "none"),
                                  dropout_masks=spec.lora.dropout_masks)
        settings = spec.train.model_copy(update={"gradient_checkpointing": plan.enabled})
        # The learning curve reads the validation split where the study has one (choices are made there).
        curve_split = setup.data.validation if setup.data.validation is not None else setup.data.eval
        outcome = train_adapters(
            model, setup.data.train, setup.collator, settings, seed=spec.seed, precision=setup.precision,
            device=setup.device, output_dir=setup.run_dir / "trainer", on_step=self.on_step, nll_fn=setup.task.nll,
            check_selective=setup.task.selective_logits,
            eval_loss=lambda: self._evaluate(setup, model, split=curve_split, by_length=True).loss,
            callbacks=adapters.callbacks, dropout_masks=spec.lora.dropout_masks,
            **self._rung(setup),
        )
        outcome.memory_plan = plan.record()
        atomic_write_json(setup.run_dir / "train_log.json", outcome.log_history)
        adapters.method.after_training(model, adapters.placement, adapters.callbacks, setup.run_dir)
        if spec.train.save_adapters:
            self._save_adapters(setup, model)
        norms = adapters.method.update_norms(model, adapters.placement, adapters.initial)
        atomic_write_json(setup.run_dir / "adapter_norms.json", {"modules": norms})
        return outcome

    def _rung(self, setup: RunSetup) -> dict[str, Any]:
        """A tuning run's ``stop_at`` and ``resume_from`` (:func:`train_adapters`): the checkpoint of
        its previous rung, written from ``spec.resume_files`` where this folder lacks it (a worker's)."""
        tune = self.spec.tune
        if self.spec.kind != "tune" or tune is None:
            return {}
        out: dict[str, Any] = {"stop_at": tune.stop_at}
        if tune.resume_step is not None:
            checkpoint = setup.run_dir / "trainer" / f"checkpoint-{tune.resume_step}"
            if not (checkpoint / "trainer_state.json").is_file():
                if not self.spec.resume_files:
                    raise LoraplaceError(f"tuning run {self.spec.run_id}: its checkpoint at step {tune.resume_step} "
                                         f"is missing ({checkpoint}); delete runs/{self.spec.run_id} to retrain it")
                for rel, data in self.spec.resume_files.items():
                    target = checkpoint / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
            out["resume_from"] = checkpoint
        return out

    def _save_adapters(self, setup: RunSetup, model) -> None:
        """``adapter/``: the trained adapter as PEFT saves it, written into a temp folder and renamed
        into place once complete, so that ``adapter/`` never holds a half-written adapter."""
        target = setup.run_dir / "adapter"
        tmp = Path(tempfile.mkdtemp(dir=setup.run_dir, prefix=".adapter."))
        try:
            model.save_pretrained(str(tmp))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def evaluate(self, setup: RunSetup, model) -> EvalResult | None:
        """The final evaluation on the held-out (eval, or test) split, with the all-token sums where
        the task has them. A tuning run is evaluated on the validation split after every rung
        (:attr:`validation_loss`), and on the test split only at the last rung, after the choices
        that read validation losses (None before)."""
        spec = self.spec
        if spec.kind == "tune" and spec.tune is not None:
            if setup.data.validation is None:
                raise LoraplaceError(f"tuning run {spec.run_id}: the study has no validation split "
                                     "(data.validation_size is 0)")
            self.validation_loss = self._evaluate(setup, model, split=setup.data.validation).loss
            if spec.tune.stop_at < spec.train.max_steps:
                return None
        ev = self._evaluate(setup, model, all_tokens=setup.task.all_token_sums)
        examples = {"nll_sum": ev.nll_sums, "n_tokens": ev.n_tokens, "batch": ev.batch_of}
        optional = {"nll_sum_all_tokens": ev.nll_sums_all, "n_tokens_all": ev.n_tokens_all,
                    "nll_sum_pad": ev.nll_sums_pad, "n_pad": ev.n_pad, "correct": ev.correct}
        examples.update({k: v for k, v in optional.items() if v})  # causal LMs / classifiers only
        atomic_write_json(setup.run_dir / "eval_examples.json", examples)
        return ev

    def _evaluate(self, setup: RunSetup, model, split=None, **kwargs) -> EvalResult:
        """Evaluate on ``split`` (default: the eval split)."""
        split = setup.data.eval if split is None else split
        return evaluate_nll(model, split, setup.collator, batch_size=self.spec.train.eval_batch_size,
                            device=setup.device, autocast_dtype=setup.autocast_dtype, nll_fn=setup.task.nll, **kwargs)

    def record(self, setup: RunSetup, memory: PeakMemory, *, adapters: Adapters | None,
               outcome: TrainOutcome | None, ev: EvalResult | None, error: str | None) -> RunResult:
        """The run's :class:`RunResult` from what the phases made (None: not reached), written to
        ``result.json``. ``error`` marks the run failed."""

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
            dropout=spec.lora.dropout if adapters else None, init=adapters.init if adapters else None,
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
        if spec.kind == "tune" and spec.tune is not None:
            result = self._tune_fields(result, failed=error is not None)
        atomic_write_json(setup.run_dir / "result.json", result.model_dump())
        return result

    def _tune_fields(self, result: RunResult, failed: bool) -> RunResult:
        """A tuning run's rate, rung and validation losses, with the time and tokens of its earlier
        rungs added (``train_steps`` already counts from the start: the Trainer resumed there)."""
        tune = self.spec.tune
        before = tune.before
        losses = dict(before.get("validation_losses", {}))
        if not failed and self.validation_loss is not None:
            losses[str(tune.stop_at)] = self.validation_loss
        update: dict[str, Any] = {
            "tune_lr": tune.lr, "tune_rung": tune.rung if not failed else (tune.rung - 1 if tune.rung else None),
            "validation_losses": losses, "validation_loss": losses[max(losses, key=int)] if losses else None}
        for key in ("train_time_s", "train_real_tokens", "train_label_tokens"):
            if getattr(result, key) is not None and before.get(key) is not None:
                update[key] = getattr(result, key) + before[key]
        if update.get("train_time_s"):
            update["train_tokens_per_s"] = (update.get("train_real_tokens") or 0) / update["train_time_s"]
        return result.model_copy(update=update)


def execute_run(spec: RunSpec, ctx: RunContext,
                on_step: Callable[[int, int, float | None], None] | None = None) -> RunResult:
    """Run one job end to end (the phases of :class:`RunRecipe`) and write its files into ``spec.run_dir``.

    A run that fails (non-finite loss, out of memory, ...) returns ``status='failed'`` with the
    reason (and, for an unexpected error, its traceback in ``error.txt``); input errors
    (:class:`LoraplaceError`) and Ctrl-C propagate to the caller. A run that finishes but diverged
    without a NaN (:func:`divergence`) stays ``ok`` with ``diverged=True`` and its reason.

    Runs are independent of what ran before in the process: the shared base model comes back
    unchanged after each arm (:func:`unload_adapters`; frozen weights rounded once at load, see
    :meth:`RunContext.base_model`), and memory is the run's own (:class:`loraplace.run.measure.PeakMemory`:
    released at the start, then start, peak and increase).
    """

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
            # restores the base modules (their weights where an init rewrote them, and a classifier's
            # untrained head) for the next run
            adapters.unload()
    return recipe.record(setup, memory, adapters=adapters, outcome=outcome, ev=ev, error=error)


def failed_result(spec: RunSpec, error: str) -> RunResult:
    """The row of a run that never returned a result of its own (its process or worker died)."""

    return RunResult(run_id=spec.run_id, kind=spec.kind, strategy=spec.strategy, seed=spec.seed, status="failed",
                     error=error, model=spec.model, dataset=spec.dataset, position=spec.position,
                     quantization=spec.quantization, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
