"""Automatic placement: an ``auto`` arm resolved to explicit per-module ranks.

An ``auto`` strategy (:class:`~loraplace.placement.strategies.AutoOptions`) has no modules of its
own: :func:`auto_placement` scores the modules of ``full`` (its slots) with an importance score
and allocates rank under the arm's budget (:mod:`loraplace.placement.allocate`). The study does
this once and stores the ranks (``allocations/*.json``); every seed then trains exactly that
placement through :func:`explicit_placement`, whatever executor runs it.

Scaling: every module of an automatic arm trains at one update scale, the scale that a uniform arm
of the same budget on the same slots has under the study's rule (``lora.scale``,
:mod:`loraplace.placement.scale`), whatever rank it got. With alpha fixed per module instead, a rank-2
slot would train at 8x the update scale of a rank-16 one, and the allocation would change the
learning rate as well as the capacity of each slot; with the study's ``alpha / r`` for every module
(before ``lora.scale``), automatic arms trained at another scale than the matched arms they were
compared with.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from torch import nn

from loraplace.adapters import check_init
from loraplace.config import StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.methods.base import Method, full_stand_in, register, stored_ranks
from loraplace.placement.allocate import SlotCurve, allocate, predicted_gain, random_curves
from loraplace.placement.arms import REFERENCE_STRATEGY, Arm
from loraplace.placement.budget import budget_target, match_placement
from loraplace.placement.resolve import Placement, explicit_placement, slot_placement
from loraplace.placement.scale import DEFAULT_SCALE, apply_scale
from loraplace.placement.strategies import AutoOptions, Strategy, parse_strategy

DEFAULT_STEP = 2
"""Rank granularity of an allocation unless ``step=`` says otherwise."""
MAX_RANK_FACTOR = 4
"""Without ``max_r=``, no slot gets more than this multiple of the study's rank."""


def auto_settings(strategy: Strategy, r: int, alpha: float, max_rank: int | None = None) -> tuple[int, int, float]:
    """``(step, max_r, alpha)`` of an automatic strategy at the study's ``r`` and ``alpha``
    (``max_rank``: the length of the score curves, which caps ``max_r``)."""
    options = strategy.auto
    assert options is not None
    step = options.step or DEFAULT_STEP
    max_r = options.max_r or max(MAX_RANK_FACTOR * r, step)
    if max_rank is not None and options.score != "random":
        if options.max_r and options.max_r > max_rank:
            raise LoraplaceError(f"strategy {strategy.name!r}: max_r={options.max_r} is beyond the scores' curves "
                                 f"(importance.max_rank={max_rank}); raise importance.max_rank")
        max_r = min(max_r, max_rank)
    if max_r < step:
        raise LoraplaceError(f"strategy {strategy.name!r}: max rank {max_r} is below the rank step {step}")
    return step, max_r, options.alpha or alpha


def slot_curves(slots: Placement, scores: Any | None, max_r: int) -> list[SlotCurve]:
    """The slots with their score curves (``scores``: an :class:`loraplace.importance.ImportanceResult`,
    or anything with ``slots`` of ``name`` and ``curve``); None gives flat placeholder curves of
    length ``max_r`` (for random scores, which need shapes only).

    Raises:
        LoraplaceError: a slot the scores do not cover (scores of another model).
    """
    curves: Mapping[str, Any] = {s.name: tuple(s.curve) for s in scores.slots} if scores is not None else {}
    out = []
    for m in slots.modules:
        if scores is not None and m.name not in curves:
            raise LoraplaceError(f"the importance scores have no entry for module {m.name}: were they computed "
                                 "on another model?")
        curve = curves[m.name] if scores is not None else tuple(0.0 for _ in range(max_r))
        out.append(SlotCurve(m.name, m.size, curve, max_rank=min(m.in_features, m.out_features)))
    return out


def auto_placement(model: nn.Module, arm: Arm, r: int, alpha: float, scores: Any | None,
                   scale: str = DEFAULT_SCALE) -> Placement:
    """The placement of an automatic arm: its slots scored, rank allocated under its budget.

    Args:
        model: the base model (meta weights suffice: only shapes are read here).
        arm: the arm (``auto[...]``, with a budget reference or none: then ``full`` at rank ``r``).
        r, alpha: the study's rank and alpha.
        scores: the importance result of the arm's score (None for ``score=random``).
        scale: the study's update-scale rule.

    Returns:
        The placement at explicit ranks; its ``budget`` holds reference, target, achieved,
        deviation_pct, method (the mode), score, step, max_r, draw and predicted_gain.
    """
    strategy = parse_strategy(arm.strategy)
    options = strategy.auto
    if options is None:
        raise LoraplaceError(f"{arm.label!r} is not an automatic strategy")
    if (scores is None) != (options.score == "random"):
        raise LoraplaceError(f"{arm.label!r} needs {'no' if options.score == 'random' else options.score} scores")
    reference = arm.reference if arm.reference is not None else REFERENCE_STRATEGY
    target = budget_target(model, reference, r, alpha)
    slots = slot_placement(model)
    step, max_r, arm_alpha = auto_settings(strategy, r, alpha, getattr(scores, "max_rank", None))
    curves = slot_curves(slots, scores, max_r)
    if options.score == "random":
        curves = random_curves(curves, options.draw or 0)
    ranks = allocate(curves, target, step=step, max_r=max_r, mode="worst" if options.mode == "worst" else "best")
    chosen = replace(slots, modules=[replace(m, r=ranks[m.name]) for m in slots.modules if m.name in ranks])
    if options.mode == "uniform":
        chosen = match_placement(chosen, target, reference)
        ranks = {m.name: m.r for m in chosen.modules}
    placement = apply_scale(explicit_placement(model, arm.label, ranks, arm_alpha, target=target), scale, r)
    placement.warnings = list(chosen.warnings)
    placement.budget = {
        "reference": reference, "target": target, "achieved": placement.lora_params,
        "deviation_pct": 100.0 * (placement.lora_params - target) / target, "ranks": placement.ranks(),
        "method": f"auto: {options.mode}", "score": options.score, "mode": options.mode, "step": step,
        "max_r": max_r, "draw": options.draw if options.score == "random" else None,
        "predicted_gain": predicted_gain(curves, ranks),
    }
    return placement


def check_auto(model: nn.Module, arm: Arm, r: int, alpha: float, max_rank: int) -> None:
    """Fail before anything trains when an automatic arm's budget cannot be allocated on ``model``
    (more than its slots take at ``max_r``, or a rank step too coarse for it): the allocation is
    tried on random scores, which exercise the same limits as real ones."""
    strategy = parse_strategy(arm.strategy)
    auto_settings(strategy, r, alpha, max_rank)
    probe = Arm(f"auto[score=random,mode={strategy.auto.mode}"  # type: ignore[union-attr]
                + "".join(f",{k}={v}" for k, v in (("step", strategy.auto.step), ("max_r", strategy.auto.max_r))  # type: ignore[union-attr]
                          if v) + "]", arm.reference)
    try:
        auto_placement(model, probe, r, alpha, None)
    except LoraplaceError as e:
        raise LoraplaceError(f"arm {arm.label!r}: {e}") from None


class AutoMethod(Method):
    """``auto[...]``: ranks allocated once per study from an importance score (:func:`auto_placement`)."""

    name = "auto"
    allocated_per_study = True

    def check(self, skeleton: nn.Module, arm: Arm, config: StudyConfig) -> None:
        if config.quantization != "none":
            # The weight score would read bitsandbytes' packed integers as weights; the others are untried.
            raise LoraplaceError(
                f"strategy {arm.label!r}: automatic placement scores the base model's modules, which is not "
                f"supported on a quantized base model (quantization={config.quantization}); "
                "score and allocate with quantization=none, or leave the auto[...] arms out"
            )
        check_auto(skeleton, arm, config.lora.r, config.lora.alpha, config.importance.max_rank)
        # its slots are full's modules; its ranks come later (an odd one fails orthogonal when the run starts)
        check_init(skeleton, full_stand_in(skeleton, config), _options(arm).init, config.quantization, ranks=False)

    def stand_in(self, skeleton: nn.Module, arm: Arm, config: StudyConfig) -> Placement:
        return full_stand_in(skeleton, config)

    def scores(self, arm: Arm) -> set[str]:
        score = _options(arm).score
        return set() if score == "random" else {score}

    def plan_placement(self, skeleton: nn.Module, arm: Arm, r: int, alpha: float,
                       scores: dict[str, Any], scale: str = DEFAULT_SCALE) -> Placement:
        return auto_placement(skeleton, arm, r, alpha, scores.get(_options(arm).score), scale)

    def allocate(self, setup: Any, arm: Arm, config: StudyConfig, batches: Any,
                 scores: dict[str, Any]) -> tuple[Placement, dict | None]:
        return self.plan_placement(setup.base, arm, config.lora.r, config.lora.alpha, scores, config.lora.scale), None

    def placement(self, model: nn.Module, arm: Arm, r: int, alpha: float, ranks: dict[str, int] | None = None,
                  budget: dict | None = None, scale: str = DEFAULT_SCALE) -> Placement:
        # every module at the scale of a uniform arm of the budget on the chosen slots (module docstring)
        return apply_scale(explicit_placement(model, arm.label, stored_ranks(arm, ranks), _options(arm).alpha or alpha,
                                              budget), scale, r)


def _options(arm: Arm) -> AutoOptions:
    options = parse_strategy(arm.strategy).auto
    if options is None:
        raise LoraplaceError(f"{arm.label!r} is not an automatic strategy")
    return options


AUTO = register(AutoMethod())
