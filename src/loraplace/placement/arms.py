"""Study arms: what one row of a study trains.

An arm is a strategy, optionally with its ranks matched to a budget reference:
``attention`` (the strategy at the study's rank) or ``attention~full`` (the strategy with ranks
chosen to train as many parameters as the reference ``full``, see
:mod:`loraplace.placement.budget`). An arm is built once, as an :class:`Arm`; its text label
is what run ids, results files and reports show, and is parsed back (:meth:`Arm.parse`) only
where it is read from stored files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from loraplace.errors import LoraplaceError
from loraplace.placement.budget import parse_budget_reference, resolve_matched
from loraplace.placement.strategies import parse_strategy

if TYPE_CHECKING:
    from torch import nn

    from loraplace.placement.resolve import Placement

REFERENCE_STRATEGY = "full"
"""The full-LoRA arm every other arm is compared with: the results' ``params_vs_full_pct`` and
``delta_eval_loss``, the report's reference arm and ``% of full`` column, and the plan's
``vs full-LoRA`` column are all taken against the arm of this strategy."""

ARM_SEPARATOR = "~"
"""Separates a strategy from its budget reference in an arm label: ``attention~full``."""


@dataclass(frozen=True)
class Arm:
    """One arm of a study.

    Attributes:
        strategy: the strategy spec text (``"attention@last:12"``).
        reference: the budget reference of a matched arm: a strategy spec (``"full"``) or a
            parameter count (``6291456``); None for an arm at the study's rank.
    """

    strategy: str
    reference: str | int | None = None

    @property
    def label(self) -> str:
        """``"attention"``, or ``"attention~full"`` for a budget-matched arm: the arm's name in run
        ids, results and reports."""
        return self.strategy if self.reference is None else f"{self.strategy}{ARM_SEPARATOR}{self.reference}"

    @classmethod
    def parse(cls, label: str) -> "Arm":
        """The arm of a stored label: ``"attention~6.3M"`` -> ``Arm("attention", 6_300_000)``.

        Raises:
            LoraplaceError: a reference that is neither a count nor a valid strategy.
        """
        strategy, sep, reference = label.partition(ARM_SEPARATOR)
        return cls(strategy, parse_budget_reference(reference) if sep else None)


def parse_arm(spec: str) -> Arm:
    """An arm as written in a strategy list: a strategy (``attention``), or a strategy with its budget
    reference (``ffn~attention``, ``auto~1.8M``); both parts are checked.

    Raises:
        LoraplaceError: an invalid strategy or reference, or a reference on a strategy that fixes
            every rank itself.
    """
    arm = Arm.parse("".join(spec.split()))
    strategy = parse_strategy(arm.strategy)
    if arm.reference is not None and strategy.has_fixed_ranks:
        raise LoraplaceError(f"arm {spec!r}: {strategy.name!r} sets r= on every term, so a budget reference has no "
                             "rank to choose; drop r= from one term or the reference")
    return Arm(strategy.name, arm.reference)


def study_arms(strategies: Sequence[str], match_budget: str | int | None) -> list[Arm]:
    """A study's arms in order, without repeats: every strategy, each followed by its arm matched
    to ``match_budget`` (a reference as :func:`~loraplace.placement.budget.parse_budget_reference`
    returns it) when one is given. The reference strategy itself gets no matched arm: it would
    repeat the unmatched one. An entry that names its own reference (``ffn~attention``) is that
    one arm."""
    arms: list[Arm] = []
    for spec in strategies:
        arm = parse_arm(spec)
        found = [arm]
        if arm.reference is None and match_budget is not None and arm.strategy != match_budget:
            found.append(Arm(arm.strategy, match_budget))
        arms.extend(a for a in found if a not in arms)
    return arms


def resolve_arm(model: nn.Module, arm: Arm | str, r: int, alpha: float, ranks: dict[str, int] | None = None,
                budget: dict | None = None) -> Placement:
    """The placement of a study arm on ``model``: the strategy at rank ``r``, or, for a matched
    arm, the strategy with ranks matched to the reference's budget. A ``str`` is a stored label
    (a :class:`~loraplace.study.records.RunSpec`'s ``strategy``), read with :meth:`Arm.parse`.

    An automatic arm (``auto[...]``) is resolved once per study (:mod:`loraplace.study.allocations`):
    its explicit ``ranks`` (module -> rank) and ``budget`` record must be given.

    Raises:
        LoraplaceError: an automatic arm without ``ranks``, or any resolution error.
    """
    from loraplace.placement.resolve import resolve_placement

    arm = Arm.parse(arm) if isinstance(arm, str) else arm
    strategy = parse_strategy(arm.strategy)
    if strategy.allocated_per_study:
        if not ranks:
            raise LoraplaceError(f"arm {arm.label!r} is placed from data once per study; its stored allocation "
                                 "(ranks per module) is missing")
        from loraplace.placement.auto import explicit_placement

        # every module keeps the update scale alpha / r of the rank the allocation was made for
        # (EVA: the LoraConfig rank it ran at)
        scale_rank = (budget or {}).get("eva_r", r) if strategy.method == "eva" else r
        arm_alpha = strategy.auto.alpha if strategy.auto and strategy.auto.alpha else alpha
        return explicit_placement(model, arm.label, ranks, scale_rank, arm_alpha, budget)
    if strategy.method == "adalora":
        raise LoraplaceError(f"arm {arm.label!r}: AdaLoRA places its ranks during training (see loraplace.baselines)")
    if arm.reference is None:
        return resolve_placement(model, strategy, r, alpha)
    return resolve_matched(model, strategy, r, alpha, arm.reference)
