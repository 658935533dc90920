"""Automatic arms resolved once per study: score the base model's modules, allocate each automatic
arm's ranks, store both, and hand every run of the arm the same explicit placement.

Files (in the study folder, written with the atomic writer, read back on ``--resume`` instead of
recomputed, so that a resumed or a Ray study trains what the first command chose):

* ``importance/<score>.json`` (+ CSV and a layer x role heatmap): the score curves of every slot
  (:mod:`loraplace.importance`), computed on the first ``importance.batches`` batches of a seeded
  permutation of the training split (never the eval split);
* ``allocations/<arm>.json``: the arm's ranks per module, its budget and its predicted gain
  (:func:`loraplace.methods.auto.auto_placement`, via the arm's method);
* ``allocations/<arm>.<suffix>.safetensors``: an initial adapter state computed from data once
  (EVA's A; a data-driven ``init=``, :data:`loraplace.methods.INITIALISERS`).

The ranks travel inside each :class:`~loraplace.records.RunSpec` (``ranks``, ``budget``), so a
worker on another machine needs no shared filesystem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save as save_tensors

from loraplace.config import ImportanceSettings, StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.files import atomic_write_bytes, atomic_write_json
from loraplace.importance import ImportanceResult, get_score, score_batches, score_slots, write_importance
from loraplace.methods import INITIALISERS, method_of
from loraplace.placement.arms import Arm
from loraplace.placement.strategies import DATA_INITS, parse_strategy
from loraplace.records import RunSpec
from loraplace.run.context import RunContext
from loraplace.study.runs import RunRecipe
from loraplace.study.specs import run_id_for

ALLOCATION_FORMAT = "loraplace-allocation/1"
SCORING_SEED = 0
"""Seed of the permutation of the training split that the scoring batches are drawn from."""


def allocated_per_study(label: str) -> bool:
    """True for the label of an arm that needs something computed once per study: its method's
    allocation (with or without a budget reference) or a data-driven initialisation (``init=eva``)."""
    return method_of(label).per_study(Arm.parse(label))


def allocation_path(study_dir: Path, label: str) -> Path:
    """``allocations/<label as a safe file name>.json`` (the run id of the arm without its seed)."""
    return Path(study_dir) / "allocations" / (run_id_for(label, 0).removesuffix("-s0") + ".json")


def state_path(study_dir: Path, label: str) -> Path | None:
    """``allocations/<arm>.<suffix>.safetensors``: the initial adapter state a per-study method
    stores beside its allocation (EVA's A matrices: ``.eva.safetensors``; a data-driven ``init=``:
    ``.init.safetensors``); None for an arm without one."""
    suffix = method_of(label).state_suffix_for(Arm.parse(label))
    return allocation_path(study_dir, label).with_suffix(f".{suffix}.safetensors") if suffix else None


def importance_path(study_dir: Path, score: str) -> Path:
    return Path(study_dir) / "importance" / f"{score}.json"


def scoring_batches(setup, settings: ImportanceSettings) -> list[dict]:
    """The batches every importance score (and EVA) of a study reads: those of
    :func:`loraplace.importance.score_batches` (a permutation of the training split seeded with
    :data:`SCORING_SEED`), moved to the run's device."""
    batches = score_batches(setup.data.train, setup.collator, batches=settings.batches,
                            batch_size=settings.batch_size, seed=SCORING_SEED)
    return [{k: v.to(setup.device) if torch.is_tensor(v) else v for k, v in batch.items()} for batch in batches]


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoraplaceError(f"cannot read {path}: {e}; delete it to recompute it") from None


@dataclass
class Allocated:
    """What :func:`compute_allocations` made where the model is loaded (the local process or a Ray
    worker), for the driver to write: allocation records and initial adapter states by arm label
    (states as safetensors bytes), and the importance results it computed, as JSON dicts."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: dict[str, bytes] = field(default_factory=dict)
    importance: dict[str, dict[str, Any]] = field(default_factory=dict)


def resolve_allocations(config: StudyConfig, study_dir: Path, specs: list[RunSpec], allocate: Callable[..., Allocated],
                        note: Callable[[str], None] = lambda text: None) -> list[RunSpec]:
    """``specs`` with the stored (or now computed) allocation of every automatic arm in their
    ``ranks`` and ``budget``; other specs unchanged.

    Args:
        config: the study (its ``importance`` settings, ``lora.r`` and ``lora.alpha``).
        study_dir: where ``importance/`` and ``allocations/`` live.
        specs: the runs this command will execute.
        allocate: the executor's ``allocate`` (:func:`compute_allocations` where the runs train: the
            local executor's own context, so that the model is loaded once, or a Ray worker, with the
            device and precision the runs will use); called as
            ``allocate(config, template, labels, stored_importance, note)``.
        note: told what is being computed (it takes time).

    Raises:
        LoraplaceError: unreadable stored files, or an allocation the budget cannot meet.
    """
    labels = list(dict.fromkeys(s.strategy for s in specs if s.kind in ("lora", "tune") and allocated_per_study(s.strategy)))
    if not labels:
        return specs
    stored = {label: _read(allocation_path(study_dir, label)) for label in labels
              if allocation_path(study_dir, label).is_file()}
    for label, record in stored.items():
        if record.get("arm") != label or not isinstance(record.get("ranks"), dict):
            raise LoraplaceError(f"{allocation_path(study_dir, label)} is not the allocation of {label!r}; "
                                 "delete it to recompute it")
    missing = [label for label in labels if label not in stored]
    if missing:
        template = [s for s in specs if s.strategy == missing[0]][0]
        needed = {score for label in missing for score in method_of(label).scores(Arm.parse(label))}
        known = {score: _read(importance_path(study_dir, score)) for score in sorted(needed)
                 if importance_path(study_dir, score).is_file()}
        made = allocate(config, template, missing, known, note)
        for score, data in made.importance.items():
            write_importance(ImportanceResult.from_dict(data), importance_path(study_dir, score).parent,
                             r=config.lora.r)
        for label, state in made.states.items():
            path = state_path(study_dir, label)
            path.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            atomic_write_bytes(path, state)  # type: ignore[arg-type]
        for label, record in made.records.items():
            allocation_path(study_dir, label).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(allocation_path(study_dir, label), record)
        stored.update(made.records)
    states = {}
    for label in stored:
        path = state_path(study_dir, label)
        if path is None:
            continue
        if not path.is_file():
            raise LoraplaceError(f"{path} is missing; delete {allocation_path(study_dir, label)} to recompute "
                                 f"the allocation of {label!r}")
        states[label] = path.read_bytes()
    return [s.model_copy(update={"ranks": stored[s.strategy]["ranks"], "budget": stored[s.strategy]["budget"],
                                 "init_state": states.get(s.strategy)})
            if s.strategy in stored else s for s in specs]


def compute_allocations(config: StudyConfig, template: RunSpec, labels: list[str], ctx: RunContext,
                        known: dict[str, dict[str, Any]], note: Callable[[str], None] = lambda text: None) -> Allocated:
    """Score what the arms' methods read (the importance results in ``known``, by score name, are
    reused) and allocate each arm once, on the base model ``ctx`` loads for ``template`` (so with the
    device and precision its runs will use). Writes nothing: the driver stores what comes back."""
    setup = RunRecipe(template, ctx).load()
    arms = {label: Arm.parse(label) for label in labels}
    scores_needed = sorted({score for label, arm in arms.items() for score in method_of(label).scores(arm)})
    results: dict[str, Any] = {score: ImportanceResult.from_dict(known[score]) for score in scores_needed
                               if score in known}
    made = Allocated()
    batches: list | None = None
    passes: dict = {}  # a pass two scores (gradient and adam) or two initialisers (eva, default_scaled) read runs once

    def scoring() -> list[dict]:
        nonlocal batches
        if batches is None:
            batches = scoring_batches(setup, config.importance)
        return batches

    for score in scores_needed:
        if score in results:
            continue
        note(f"scoring the modules of {config.model} for automatic placement ({score} score, "
             f"{len(scoring())} batches)")
        result = score_slots(setup.base, scoring(), score, config.importance.max_rank, nll_fn=setup.task.nll,
                             device=setup.device, shared=passes)
        result.model, result.dataset = config.model, (config.dataset if get_score(score).needs_data else None)
        results[score] = result
        made.importance[score] = result.to_dict()
    for label, arm in arms.items():
        method = method_of(label)
        if not method.scores(arm) and method.allocated_per_study:  # a hand-picked arm's placement needs no data
            note(f"allocating {label} ({method.title}) from the inputs of {config.model} "
                 f"({len(scoring())} batches)")
        placement, state = method.allocate(setup, arm, config, scoring, results)
        init = parse_strategy(arm.strategy).init
        if state is None and init in DATA_INITS:
            note(f"computing the {init} initialisation of {label} from the inputs of {config.model} "
                 f"({len(scoring())} batches)")
            state = INITIALISERS.get_entry(init).compute(setup.base, placement, scoring(), setup.task.peft_task_type,
                                                         shared=passes)
        if state is not None:
            made.states[label] = state_bytes(state)
        budget = placement.budget or {}
        score = budget.get("score") or method.name
        made.records[label] = {
            "format": ALLOCATION_FORMAT, "arm": label, "score": score, "mode": budget.get("mode"),
            "draw": budget.get("draw"), "step": budget.get("step"), "max_r": budget.get("max_r"),
            "importance_file": f"importance/{score}.json" if score in results else None,
            "budget": budget, "predicted_gain": budget.get("predicted_gain"),
            "ranks": {m.name: m.r for m in placement.modules}, "placement": placement.to_dict(),
            "matrix": placement.matrix(),
        }
    return made


def state_bytes(state: dict) -> bytes:
    """An initial adapter state (name -> tensor; rank-0 entries left out) as safetensors bytes."""
    return save_tensors({name: w.detach().to("cpu", dtype=torch.float32).contiguous()
                         for name, w in state.items() if w.shape[0] > 0})
