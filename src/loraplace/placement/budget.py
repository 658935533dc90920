"""Budget matching: choose each strategy's rank so that it trains as many parameters as a
reference.

A LoRA placement trains ``sum_m r_m * experts_m * (in_m + out_m)`` parameters, so the rank
that meets a target is arithmetic, not search: with ``S`` the summed ``experts * (in + out)``
of the modules whose rank is free, the uniform rank is ``round(target / S)``. When that lands
more than ``tolerance`` (0.5%) from the target (few, large modules per rank step), the rank is
``floor(target / S)`` everywhere and ``+1`` on just enough modules (largest first, then in
model order) to come nearest the target; PEFT applies such per-module ranks through
``rank_pattern``. Ranks a strategy fixes itself (``ffn[r=8]+attention``) are kept; only the
other terms' rank is chosen. Alpha is kept as configured (the LoRA paper's convention: fix
alpha, vary r), so the update scale alpha / r follows the rank.
"""

from __future__ import annotations

import re
from dataclasses import replace
from torch import nn

from loraplace.errors import LoraplaceError
from loraplace.placement.resolve import Placement, resolve_placement
from loraplace.placement.strategies import Strategy, parse_strategy

DEFAULT_TOLERANCE = 0.005
"""A uniform rank within 0.5% of the target is kept; beyond that some modules get rank + 1.
Half a percent each way keeps any two matched arms within 1% of each other."""

_COUNT = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgG]?)$")


def parse_budget(value: str | int) -> str | int:
    """``--match-budget`` as given: a parameter count (``6291456``, ``6_291_456``, ``6.3M``,
    ``500k``) becomes an int; anything else is a reference strategy spec, checked here.

    Raises:
        LoraplaceError: a count below 1, or a spec that is not a valid strategy.
    """
    if isinstance(value, bool):
        raise LoraplaceError(f"match_budget {value!r} is neither a parameter count nor a strategy")
    if isinstance(value, int):
        count = value
    else:
        text = str(value).strip().replace("_", "")
        m = _COUNT.match(text)
        if not m:
            try:
                parse_strategy(text)
            except LoraplaceError as e:
                raise LoraplaceError(
                    f"match_budget {value!r} is neither a parameter count (like 6291456 or 6.3M) nor a valid "
                    f"reference strategy: {e}"
                ) from None
            return "".join(text.split())
        scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m[2].lower()]
        count = round(float(m[1]) * scale)
    if count < 1:
        raise LoraplaceError(
            f"match_budget {value!r}: a parameter budget must be at least 1; "
            "give a count like 6291456 or 6.3M, or a reference strategy like full"
        )
    return count


def budget_target(model: nn.Module, reference: str | int, r: int, alpha: float) -> int:
    """The parameter count to match: ``reference`` itself if a count, else the trainable
    parameters of the reference strategy at rank ``r``."""
    reference = parse_budget(reference)
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
        ranks (role -> ranks) and method (``"uniform"``, ``"uniform+1"`` or ``"rank-1 floor"``).
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
        uniform = max(1, round(goal / size))
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
    modules = [replace(m, r=ranks[m.name]) if m.name in ranks else m for m in placement.modules]
    matched = replace(placement, modules=modules, warnings=list(placement.warnings))
    achieved = matched.lora_params
    matched.budget = {
        "reference": reference,
        "target": target,
        "achieved": achieved,
        "deviation_pct": 100.0 * (achieved - target) / target,
        "ranks": matched.ranks(),
        "method": method,
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
    """``strategy`` on ``model`` with ranks chosen to match ``reference``'s parameter count.

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
    return match_placement(placement, target, parse_budget(reference), tolerance, fixed)


ARM_SEPARATOR = "~"
"""Separates a strategy from its budget reference in an arm label: ``attention~full``."""


def arm_label(strategy: str, reference: str | int | None) -> str:
    """The label of a study arm: the strategy, or ``STRATEGY~REFERENCE`` when budget-matched."""
    return strategy if reference is None else f"{strategy}{ARM_SEPARATOR}{reference}"


def split_arm(label: str) -> tuple[str, str | int | None]:
    """``"attention~full"`` -> ``("attention", "full")``; ``"attention"`` -> ``("attention", None)``."""
    strategy, sep, reference = label.partition(ARM_SEPARATOR)
    return (strategy, parse_budget(reference)) if sep else (strategy, None)


def resolve_arm(model: nn.Module, label: str, r: int, alpha: float) -> Placement:
    """The placement of a study arm: a plain strategy at rank ``r``, or (``STRATEGY~REFERENCE``)
    the strategy with ranks matched to the reference's budget."""
    spec, reference = split_arm(label)
    strategy = parse_strategy(spec)
    if reference is None:
        return resolve_placement(model, strategy, r, alpha)
    return resolve_matched(model, strategy, r, alpha, reference)
