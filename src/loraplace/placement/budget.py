"""Budget matching: choose each strategy's rank so that it trains as many parameters as a
reference.

A LoRA placement trains ``sum_m r_m * experts_m * (in_m + out_m)`` parameters, so the rank
that meets a target is arithmetic, not search: with ``S`` the summed ``experts * (in + out)``
of the modules whose rank is free, the uniform rank is ``round(target / S)``. When that lands
more than ``tolerance`` (0.5%) from the target (few, large modules per rank step), the rank is
``floor(target / S)`` everywhere and ``+1`` on just enough modules (largest first, then in
model order) to come nearest the target; PEFT applies such per-module ranks through
``rank_pattern``. Ranks a strategy fixes itself (``ffn[r=8]+attention``) are kept; only the
other terms' rank is chosen. Alpha is kept as configured; the chosen modules carry the uniform
rank as their scale rank, from which the study's update-scale rule (:mod:`loraplace.placement.scale`)
gives every one of them the same scale.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from loraplace.errors import LoraplaceError
from loraplace.placement.params import uniform_rank
from loraplace.placement.resolve import Placement, resolve_placement
from loraplace.placement.strategies import Strategy, parse_strategy

DEFAULT_TOLERANCE = 0.005
"""A uniform rank within 0.5% of the target is kept; beyond that some modules get rank + 1.
Half a percent each way keeps any two matched arms within 1% of each other."""

def budget_target(model: nn.Module, reference: str | int, r: int, alpha: float) -> int:
    """The parameter count to match: ``reference`` itself if a count, else the trainable
    parameters of the reference strategy (a spec, as :func:`parse_budget_reference` returns it)
    at rank ``r``."""
    if isinstance(reference, int):
        return reference
    return resolve_placement(model, parse_strategy(reference), r, alpha).lora_params


def match_placement(placement: Placement, target: int, reference: str | int,
                    tolerance: float = DEFAULT_TOLERANCE, fixed: set[str] | None = None) -> Placement:
    """A copy of ``placement`` with ranks chosen to train ``target`` parameters.

    Args:
        placement: the strategy resolved at any rank (its modules and fixed ranks are kept).
        target: parameters to match.
        reference: what ``target`` came from, for the report.
        tolerance: relative deviation accepted for a uniform rank.
        fixed: names of modules whose rank the strategy fixed (left unchanged).

    Returns:
        The matched placement; its ``budget`` holds reference, target, achieved, deviation_pct,
        ranks (role -> ranks), method (``"uniform"``, ``"uniform+1"`` or ``"rank-1 floor"``) and
        scale_rank (the uniform rank, from which every chosen module's update scale is computed).
    """
    fixed = fixed or set()
    free = [m for m in placement.modules if m.name not in fixed]
    fixed_params = sum(m.params for m in placement.modules if m.name in fixed)
    size = sum(m.size for m in free)
    goal = target - fixed_params
    ranks: dict[str, int] = {}
    if goal < size:
        # Even rank 1 everywhere exceeds the budget; dropping modules would change the placement.
        method = "rank-1 floor"
        ranks = {m.name: 1 for m in free}
    else:
        uniform = uniform_rank(goal, size)
        if abs(uniform * size - goal) <= tolerance * target:
            method = "uniform"
            ranks = {m.name: uniform for m in free}
        else:
            method = "uniform+1"
            base = goal // size
            ranks = {m.name: base for m in free}
            remaining = goal - base * size
            # Largest modules first, then model order: deterministic, and each step can only
            # bring the total nearer the target.
            for m in sorted(free, key=lambda m: -m.size):
                if abs(remaining - m.size) < abs(remaining):
                    ranks[m.name] += 1
                    remaining -= m.size
    scale_r = uniform_rank(goal, size)
    modules = [replace(m, r=ranks[m.name], scale_r=scale_r) if m.name in ranks else m for m in placement.modules]
    matched = replace(placement, modules=modules, warnings=list(placement.warnings))
    achieved = matched.lora_params
    matched.budget = {
        "reference": reference,
        "target": target,
        "achieved": achieved,
        "deviation_pct": 100.0 * (achieved - target) / target,
        "ranks": matched.ranks(),
        "method": method,
        "scale_rank": scale_r,
    }
    too_wide = sorted({m.role for m in matched.modules if m.r > min(m.in_features, m.out_features)})
    if too_wide:
        matched.warnings.append(
            f"matched ranks exceed min(in, out) of some {', '.join(too_wide)} modules: those adapters "
            "cannot use their full rank, so the parameter match overstates their capacity"
        )
    if method == "rank-1 floor":
        matched.warnings.append(
            f"budget {target:,} is below what rank 1 on every module of {placement.strategy!r} costs "
            f"({achieved:,}); kept rank 1 rather than drop modules"
        )
    return matched


def fixed_rank_modules(model: nn.Module, strategy: Strategy, r: int, alpha: float) -> set[str]:
    """Names of modules whose rank a term of ``strategy`` sets with ``r=`` (last term wins)."""
    names: set[str] = set()
    for term in strategy.terms:
        single = Strategy(term.text, terms=(term,))
        picked = {m.name for m in resolve_placement(model, single, r, alpha).modules}
        if term.r is not None:
            names |= picked
        else:
            names -= picked
    return names


def resolve_matched(model: nn.Module, strategy: Strategy, r: int, alpha: float, reference: str | int,
                    tolerance: float = DEFAULT_TOLERANCE) -> Placement:
    """``strategy`` on ``model`` with ranks chosen to match ``reference``'s parameter count
    (``reference``: a parameter count, or a strategy spec as :func:`parse_budget_reference` returns it).

    Literal strategies are matched too: PEFT's suffix rule fixes their modules, not their rank.

    Raises:
        LoraplaceError: a strategy that sets ``r=`` on every term (no rank left to choose), or
            any resolution error of the strategy or the reference.
    """
    if strategy.has_fixed_ranks:
        raise LoraplaceError(
            f"strategy {strategy.name!r} sets r= on every term, so --match-budget has no rank to choose; "
            "drop r= from at least one term, or leave --match-budget out"
        )

    target = budget_target(model, reference, r, alpha)
    placement = resolve_placement(model, strategy, r, alpha)
    fixed = fixed_rank_modules(model, strategy, r, alpha) if not strategy.is_literal else set()
    return match_placement(placement, target, reference, tolerance, fixed)
