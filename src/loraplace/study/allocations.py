"""Automatic arms resolved once per study: score the base model's modules, allocate each automatic
arm's ranks, store both, and hand every run of the arm the same explicit placement.

Files (in the study folder, written with the atomic writer, read back on ``--resume`` instead of
recomputed, so that a resumed or a Ray study trains what the first command chose):

* ``importance/<score>.json`` (+ CSV and a layer x role heatmap): the score curves of every slot
  (:mod:`loraplace.importance`), computed on the first ``importance.batches`` batches of a seeded
  permutation of the training split (never the eval split);
* ``allocations/<arm>.json``: the arm's ranks per module, its budget and its predicted gain
  (:func:`loraplace.placement.auto.auto_placement`).

The ranks travel inside each :class:`~loraplace.study.records.RunSpec` (``ranks``, ``budget``), so a
worker on another machine needs no shared filesystem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from loraplace.config import ImportanceSettings, StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.placement.arms import Arm
from loraplace.placement.strategies import parse_strategy
from loraplace.study.files import atomic_replace, atomic_write_json
from loraplace.study.plan import run_id_for
from loraplace.study.records import RunSpec

ALLOCATION_FORMAT = "loraplace-allocation/1"
SCORING_SEED = 0
"""Seed of the permutation of the training split that the scoring batches are drawn from."""


def allocated_per_study(label: str) -> bool:
    """True for the label of an arm whose ranks are allocated once per study (``auto[...]``, ``eva``,
    with or without a budget reference)."""
    return parse_strategy(Arm.parse(label).strategy).allocated_per_study


def allocation_path(study_dir: Path, label: str) -> Path:
    """``allocations/<label as a safe file name>.json`` (the run id of the arm without its seed)."""
    return Path(study_dir) / "allocations" / (run_id_for(label, 0).removesuffix("-s0") + ".json")


def eva_state_path(study_dir: Path, label: str) -> Path:
    """``allocations/<arm>.eva.safetensors``: an EVA arm's initial A matrices, beside its allocation."""
    return allocation_path(study_dir, label).with_suffix(".eva.safetensors")


def importance_path(study_dir: Path, score: str) -> Path:
    return Path(study_dir) / "importance" / f"{score}.json"


def scoring_batches(setup, settings: ImportanceSettings) -> list[dict]:
    """The batches every importance score (and EVA) of a study reads: those of
    :func:`loraplace.importance.score_batches` (a permutation of the training split seeded with
    :data:`SCORING_SEED`), moved to the run's device."""
    import torch

    from loraplace.importance import score_batches

    batches = score_batches(setup.data.train, setup.collator, batches=settings.batches,
                            batch_size=settings.batch_size, seed=SCORING_SEED)
    return [{k: v.to(setup.device) if torch.is_tensor(v) else v for k, v in batch.items()} for batch in batches]


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoraplaceError(f"cannot read {path}: {e}; delete it to recompute it") from None


def resolve_allocations(config: StudyConfig, study_dir: Path, specs: list[RunSpec], ctx,
                        note: Callable[[str], None] = lambda text: None) -> list[RunSpec]:
    """``specs`` with the stored (or now computed) allocation of every automatic arm in their
    ``ranks`` and ``budget``; other specs unchanged.

    Args:
        config: the study (its ``importance`` settings, ``lora.r`` and ``lora.alpha``).
        study_dir: where ``importance/`` and ``allocations/`` live.
        specs: the runs this command will execute.
        ctx: a :class:`~loraplace.study.runs.RunContext` that loads the base model and the data (the
            local executor's own, so that the model is loaded once).
        note: told what is being computed (it takes time).

    Raises:
        LoraplaceError: unreadable stored files, or an allocation the budget cannot meet.
    """
    labels = list(dict.fromkeys(s.strategy for s in specs if s.kind == "lora" and allocated_per_study(s.strategy)))
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
        stored.update(_allocate(config, study_dir, [s for s in specs if s.strategy == missing[0]][0], missing,
                                ctx, note))
    states = {label: eva_state_path(study_dir, label).read_bytes() for label in stored
              if eva_state_path(study_dir, label).is_file()}
    for label in stored:
        if parse_strategy(Arm.parse(label).strategy).method == "eva" and label not in states:
            raise LoraplaceError(f"{eva_state_path(study_dir, label)} is missing; delete "
                                 f"{allocation_path(study_dir, label)} to recompute EVA's allocation")
    return [s.model_copy(update={"ranks": stored[s.strategy]["ranks"], "budget": stored[s.strategy]["budget"],
                                 "eva_state": states.get(s.strategy)})
            if s.strategy in stored else s for s in specs]


def _allocate(config: StudyConfig, study_dir: Path, template: RunSpec, labels: list[str], ctx,
              note: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    from loraplace.importance import ImportanceResult, score_slots, write_importance
    from loraplace.placement.auto import auto_placement
    from loraplace.study.runs import RunRecipe

    setup = RunRecipe(template, ctx).load()
    autos = [label for label in labels if parse_strategy(Arm.parse(label).strategy).is_auto]
    scores_needed = sorted({parse_strategy(Arm.parse(label).strategy).auto.score for label in autos}  # type: ignore[union-attr]
                           - {"random"})
    results: dict[str, Any] = {}
    batches = None
    for score in scores_needed:
        path = importance_path(study_dir, score)
        if path.is_file():
            results[score] = ImportanceResult.load(path)
            continue
        if batches is None:
            batches = scoring_batches(setup, config.importance)
        note(f"scoring the modules of {config.model} for automatic placement ({score} score, "
             f"{len(batches)} batches)")
        result = score_slots(setup.base, batches, score, config.importance.max_rank, nll_fn=setup.task.nll,
                             device=setup.device)
        result.model, result.dataset = config.model, (None if score == "weight" else config.dataset)
        write_importance(result, path.parent, r=config.lora.r)
        results[score] = result
    records = {}
    for label in labels:
        arm = Arm.parse(label)
        if label not in autos:  # eva
            if batches is None:
                batches = scoring_batches(setup, config.importance)
            note(f"running EVA's SVD of the module inputs of {config.model} for {label} ({len(batches)} batches)")
            (placement, state), score = eva_allocation(setup, arm, config.lora, batches), "eva"
            save_eva_state(eva_state_path(study_dir, label), state)
        else:
            score = parse_strategy(arm.strategy).auto.score  # type: ignore[union-attr]
            placement = auto_placement(setup.base, arm, config.lora.r, config.lora.alpha, results.get(score))
        budget = placement.budget or {}
        record = {
            "format": ALLOCATION_FORMAT, "arm": label, "score": score, "mode": budget.get("mode"),
            "draw": budget.get("draw"), "step": budget.get("step"), "max_r": budget.get("max_r"),
            "importance_file": f"importance/{score}.json" if score in results else None,
            "budget": budget, "predicted_gain": budget.get("predicted_gain"),
            "ranks": {m.name: m.r for m in placement.modules}, "placement": placement.to_dict(),
            "matrix": placement.matrix(),
        }
        allocation_path(study_dir, label).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(allocation_path(study_dir, label), record)
        records[label] = record
    return records


def save_eva_state(path: Path, state: dict) -> None:
    """EVA's A matrices as safetensors (modules at rank 0 left out), written atomically."""
    import torch
    from safetensors.torch import save_file

    tensors = {name: w.detach().to("cpu", dtype=torch.float32).contiguous()
               for name, w in state.items() if w.shape[0] > 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_replace(path, lambda tmp: save_file(tensors, str(tmp)))


def eva_allocation(setup, arm: Arm, lora, batches: list[dict], eva_r: int | None = None):
    """EVA's placement of ``arm`` (``eva`` or ``eva~REFERENCE``) on the loaded base model: PEFT's EVA on
    the modules of ``full`` at the ``LoraConfig`` rank ``eva_r``, by default the uniform rank that
    spends the arm's budget on those modules (one EVA pass; EVA then moves rank between modules of
    different widths, so it trains about, not exactly, the budget: the record says how far).
    A search over the rank (``loraplace.baselines.eva_ranks`` without ``r``) would cost one whole
    EVA pass per candidate: 8 minutes each for SmolLM2-135M on 2 CPU cores.

    Returns:
        ``(placement, state)``: the placement (modules EVA gave rank 0 left out) with its ``budget``
        record (``eva_r``: the ``LoraConfig`` rank EVA ran at, which scales every module's alpha),
        and EVA's initial A matrices by module name.
    """
    from loraplace.baselines import eva_ranks
    from loraplace.placement.arms import REFERENCE_STRATEGY
    from loraplace.placement.auto import explicit_placement, slot_placement
    from loraplace.placement.budget import budget_target

    reference = arm.reference if arm.reference is not None else REFERENCE_STRATEGY
    target = budget_target(setup.base, reference, lora.r, lora.alpha)
    slots = slot_placement(setup.base)
    uniform = max(1, round(target / sum(m.size for m in slots.modules)))
    ranks, state, info = eva_ranks(setup.base, slots, lora, batches, target_params=target,
                                   task_type=setup.task.peft_task_type, r=eva_r or uniform)
    kept = {name: k for name, k in ranks.items() if k > 0}
    budget = {"reference": reference, "target": target, "achieved": info["achieved"],
              "deviation_pct": info["deviation_pct"], "method": "eva", "eva_r": info["r"], "rho": info["rho"],
              "tau": info["tau"], "seconds": info["seconds"], "forward_passes": info["forward_passes"],
              "dropped": len(ranks) - len(kept)}
    placement = explicit_placement(setup.base, arm.label, kept, info["r"], lora.alpha, budget)
    placement.budget["ranks"] = placement.ranks()  # type: ignore[index]
    return placement, state
