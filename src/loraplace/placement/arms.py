"""Study arms: what one row of a study trains.

An arm is a strategy, optionally with its ranks matched to a budget reference:
``attention`` (the strategy at the study's rank) or ``attention~full`` (the strategy with ranks
chosen to train as many parameters as the reference ``full``, see
:mod:`loraplace.placement.budget`). An arm is built once, as an :class:`Arm`; its text label
is what run ids, results files and reports show, and is parsed back (:meth:`Arm.parse`) only
where it is read from stored files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from loraplace.errors import LoraplaceError
from loraplace.placement.strategies import parse_strategy

REFERENCE_STRATEGY = "full"
"""The full-LoRA arm every other arm is compared with: the results' ``params_vs_full_pct`` and
``delta_eval_loss``, the report's reference arm and ``% of full`` column, and the plan's
``vs full-LoRA`` column are all taken against the arm of this strategy."""

ARM_SEPARATOR = "~"
"""Separates a strategy from its budget reference in an arm label: ``attention~full``."""


_COUNT = re.compile(r"^(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)([kKmMgGbB]?)$")


_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


COUNT_EXAMPLES = "6291456, 6_291_456, 12,000, 1e6, 500k, 6.3M or 2B"


def parse_param_count(value: str | int, what: str = "parameter count") -> int:
    """A parameter count as people write it: ``6291456``, ``6_291_456``, ``12,000``, ``1e6``,
    ``500k``, ``6.3M``, ``2M``, ``1g``/``1B`` (k = 10^3, M = 10^6, G/B = 10^9; rounded to an int).

    Args:
        value: the text (or an int, returned as is once checked).
        what: the setting it comes from, for the error (``--budget``, ``match_budget``).

    Raises:
        LoraplaceError: not a count in one of these spellings, or a count below 1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise LoraplaceError(f"{what} {value!r} is not a parameter count; give e.g. {COUNT_EXAMPLES}")
    if isinstance(value, int):
        count = value
    else:
        m = _COUNT.match(value.strip().replace("_", "").replace(",", ""))
        if not m:
            raise LoraplaceError(f"{what} {value!r} is not a parameter count; give e.g. {COUNT_EXAMPLES}")
        count = round(float(m[1]) * _SCALE[m[2].lower()])
    if count < 1:
        raise LoraplaceError(f"{what} {value!r}: a parameter budget must be at least 1; give e.g. {COUNT_EXAMPLES}")
    return count


def parse_budget_reference(value: str | int) -> str | int:
    """``--match-budget`` as given: a parameter count (:func:`parse_param_count`) becomes an int;
    anything else is a reference strategy spec, checked here and returned without spaces.

    Raises:
        LoraplaceError: a count below 1, or a spec that is not a valid strategy.
    """
    if isinstance(value, bool):
        raise LoraplaceError(f"match_budget {value!r} is neither a parameter count nor a strategy")
    text = value if isinstance(value, int) else str(value).strip()
    if isinstance(text, int) or _COUNT.match(text.replace("_", "").replace(",", "")):
        return parse_param_count(text, what="match_budget")
    try:
        parse_strategy(text)
    except LoraplaceError as e:
        raise LoraplaceError(
            f"match_budget {value!r} is neither a parameter count (like 6291456 or 6.3M) nor a valid "
            f"reference strategy: {e}"
        ) from None
    return "".join(text.split())


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


GROUPS = "groups"
"""A strategy-list entry (``groups``, ``groups~REFERENCE``) that stands for one arm per group of slots
(:mod:`loraplace.placement.groups`), expanded once the model is known."""


GROUP_PARTS = 3
"""The layer groups of ``groups``: the stack in this many near-equal parts (thirds)."""


def slot_group(strategy: str) -> str | None:
    """Which kind of ``groups`` arm a strategy spec is: ``"role"`` (one role on every layer, e.g.
    ``attn.q``), ``"layers"`` (every role of ``full`` on one third of the layers, ``full@part:2/3``),
    or None for any other strategy."""
    parsed = parse_strategy(strategy)
    if parsed.method_name != "lora" or parsed.is_literal or len(parsed.terms) != 1:
        return None
    term = parsed.terms[0]
    if term.r is not None or term.alpha is not None:
        return None
    if term.layers is None and len(term.roles) == 1 and "*" not in term.roles[0]:
        return "role"
    if (parsed.name.partition("@")[0] == REFERENCE_STRATEGY and term.layers is not None
            and len(term.layers.items) == 1 and term.layers.items[0][0] == "part"
            and term.layers.items[0][2] == GROUP_PARTS):
        return "layers"
    return None


def is_groups(spec: str) -> bool:
    """True for a ``groups`` or ``groups~REFERENCE`` entry of a strategy list."""
    return "".join(spec.split()).partition(ARM_SEPARATOR)[0] == GROUPS


def check_groups(spec: str) -> None:
    """Fail with one line on a malformed ``groups`` entry (its reference is checked)."""
    _, sep, reference = "".join(spec.split()).partition(ARM_SEPARATOR)
    if sep:
        parse_budget_reference(reference)


def study_arms(strategies: Sequence[str], match_budget: str | int | None) -> list[Arm]:
    """A study's arms in order, without repeats: every strategy, each followed by its arm matched
    to ``match_budget`` (a reference as :func:`~loraplace.placement.budget.parse_budget_reference`
    returns it) when one is given. The reference strategy itself gets no matched arm: it would
    repeat the unmatched one. An entry that names its own reference (``ffn~attention``) is that
    one arm.

    Raises:
        LoraplaceError: a ``groups`` entry, which only the model can expand
            (:func:`loraplace.placement.groups.expand_groups`).
    """
    arms: list[Arm] = []
    for spec in strategies:
        if is_groups(spec):
            raise LoraplaceError(f"{spec!r} stands for arms that depend on the model; expand it first "
                                 "(loraplace.placement.groups.expand_groups)")
        arm = parse_arm(spec)
        found = [arm]
        if arm.reference is None and match_budget is not None and arm.strategy != match_budget:
            found.append(Arm(arm.strategy, match_budget))
        arms.extend(a for a in found if a not in arms)
    return arms


