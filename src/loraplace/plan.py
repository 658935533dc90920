"""``loraplace plan``: every strategy's placement on a model from its config alone (meta device, no
weights), with parameter counts and the memory plan of each row; automatic arms from given or
computed importance scores."""

from __future__ import annotations

from typing import Any

from loraplace.errors import LoraplaceError
from loraplace.methods import method_of
from loraplace.placement.arms import (
    ARM_SEPARATOR,
    REFERENCE_STRATEGY,
    check_groups,
    is_groups,
    parse_arm,
    parse_budget_reference,
    study_arms,
)
from loraplace.placement.budget import budget_target
from loraplace.placement.groups import expand_groups
from loraplace.placement.params import total_params
from loraplace.placement.resolve import resolve_placement
from loraplace.placement.scale import DEFAULT_SCALE, SCALE_RULES
from loraplace.placement.strategies import layer_ranges, parse_strategies, parse_strategy
from loraplace.run.device import pick_device, resolve_precision
from loraplace.run.memory_plan import device_free_mib, estimate_memory
from loraplace.run.models import load_config, meta_model


def build_plan(model: str, strategies: list[str], r: int, alpha: float,
               match_budget: str | int | None = None, scores: dict[str, Any] | None = None,
               score_for: Any = None, batch_size: int = 8, max_length: int = 256, precision: str = "auto",
               device: str = "auto", scale: str = DEFAULT_SCALE) -> dict[str, Any]:
    """Placements of every strategy on ``model`` from its config alone (meta device, no weights).

    Args:
        model: hub id, local folder or embedded alias.
        strategies: strategy specs (built-in names or the strategy language; an entry may name its
            budget reference, ``ffn~attention``).
        r, alpha: the default rank and alpha.
        match_budget: a reference strategy or parameter count; each strategy then also gets a
            budget-matched row (``STRATEGY~REFERENCE``) right after its own.
        scores: importance results by score name, for automatic strategies (``auto[...]``).
        score_for: called with a score name that ``scores`` lacks, returns its importance result
            (computing it needs the model's weights and data); None: such a strategy is an error.
        batch_size, max_length, precision, device: the training settings the memory estimate of
            each row is for (:func:`loraplace.run.memory_plan.estimate_memory`; the study defaults).
        scale: the update-scale rule (:mod:`loraplace.placement.scale`) the rows' alphas follow.

    Returns:
        ``{"model", "config_source", "model_type", "base_params", "full_lora_params", "r", "alpha",
        "match_budget", "budget_target", "memory", "strategies": [row, ...]}``; a row is the placement's
        ``to_dict()`` (exact module names, ranks) plus counts, ``by_role``, ``matrix`` and ``memory``
        (estimated peak MiB without and with gradient checkpointing, and the components); ``memory``
        says which device, how much of its memory is free (None: unknown) and which settings.
    """
    if scale not in SCALE_RULES:
        raise LoraplaceError(f"unknown update-scale rule {scale!r}; known: {', '.join(SCALE_RULES)}")
    for spec in strategies:  # unknown strategies and references fail here, naming them
        if is_groups(spec):
            check_groups(spec)
        else:
            parse_arm(spec)
    concrete = [s for s in strategies if ARM_SEPARATOR not in s and not is_groups(s)]
    if concrete:
        parse_strategies(concrete)  # repeats fail here
    reference = parse_budget_reference(match_budget) if match_budget not in (None, "") else None
    config, source = load_config(model)
    skeleton = meta_model(config)
    strategies = expand_groups(strategies, skeleton)
    base = total_params(skeleton)
    full = resolve_placement(skeleton, parse_strategy(REFERENCE_STRATEGY), r, alpha).lora_params
    target = budget_target(skeleton, reference, r, alpha) if reference is not None else None
    scores = dict(scores or {})
    placements = []
    for arm in study_arms(strategies, reference):
        method = method_of(arm)
        for score in sorted(method.scores(arm) - set(scores)):
            if score_for is None:
                raise LoraplaceError(f"{arm.label!r} needs {score} importance scores: give --scores")
            scores[score] = score_for(score)
        placement = method.plan_placement(skeleton, arm, r, alpha, scores, scale)
        if arm.reference is not None:
            placement.strategy = arm.label
        placements.append((parse_strategy(arm.strategy), placement))

    dev = pick_device(device)
    memory = {"device": dev.type, "free_mib": device_free_mib(dev), "batch_size": batch_size,
              "max_length": max_length, "precision": resolve_precision(precision, dev)}
    rows = []
    for strategy, p in placements:
        rows.append({
            **p.to_dict(),
            "description": strategy.description,
            "trainable_params": p.lora_params,
            "total_params": base + p.lora_params,
            "trainable_pct_of_total": 100.0 * p.lora_params / (base + p.lora_params),
            "trainable_pct_of_base": 100.0 * p.lora_params / base,
            "params_vs_full_pct": 100.0 * p.lora_params / full,
            "by_role": {role: layer_ranges(layers) for role, layers in p.by_role().items()},
            "matrix": p.matrix(),
            "memory": _plan_memory(config, skeleton, p, memory, dev),
        })
    return {"model": model, "config_source": source, "model_type": config.model_type, "base_params": base,
            "full_lora_params": full, "r": r, "alpha": alpha, "scale": scale, "match_budget": reference, "budget_target": target,
            "memory": memory, "strategies": rows}


def _plan_memory(config: Any, skeleton: Any, placement: Any, memory: dict[str, Any], device: Any) -> dict[str, Any]:
    """A plan row's memory: estimated peak MiB without and with gradient checkpointing, and the
    components of the one without; None values where the config has no sizes the plan knows."""
    kwargs = dict(batch_size=memory["batch_size"], max_length=memory["max_length"], precision=memory["precision"],
                  device=device, skeleton=skeleton)
    try:
        without = estimate_memory(config, placement, gradient_checkpointing=False, **kwargs)
        checkpointed = estimate_memory(config, placement, gradient_checkpointing=True, **kwargs)
    except ValueError:
        return {"total_mib": None, "with_checkpointing_mib": None, "components_mib": {}}
    return {"total_mib": round(without.total, 1), "with_checkpointing_mib": round(checkpointed.total, 1),
            "needed_mib": round(without.needed_mib, 1), "needed_with_checkpointing_mib": round(checkpointed.needed_mib, 1),
            "components_mib": without.components()}
