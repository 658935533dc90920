"""What every report section reads and what it returns.

:func:`~loraplace.report.write.write_report` builds one :class:`ReportContext` (the loaded
studies, their arms and comparison groups, where to write, the budget) and calls each of
:data:`~loraplace.report.sections.SECTIONS` on it; each returns a :class:`Part`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from loraplace.report.analysis import ArmResults, Group, build_arms, build_groups, order_note
from loraplace.report.doc import Block, Table
from loraplace.report.load import Study


@dataclass
class ReportContext:
    """The report's shared inputs, computed once."""

    studies: list[Study]
    arms: list[ArmResults]
    groups: list[Group]  # arms whose eval sets are identical; comparisons are made within one
    out: Path  # the report folder
    budget: int | None  # trainable-parameter budget of the "best within budget" recommendation
    resamples: int  # bootstrap draws per paired comparison
    tuned: ReportContext | None = None
    """The same studies with every arm at its tuned learning rate (a study that tuned; the others as they
    are), None when none tuned: the recommendations and the automatic arms' verdicts read it, since a
    verdict must hold with each arm at its own tuned rate."""

    @classmethod
    def build(cls, studies: list[Study], out: Path, budget: int | None, resamples: int) -> ReportContext:
        arms = build_arms(studies)
        return cls(studies, arms, build_groups(studies, arms, resamples=resamples), out, budget, resamples)

    @property
    def verdicts(self) -> ReportContext:
        """The context the verdicts read: :attr:`tuned` where a study tuned, else this one."""
        return self.tuned or self

    @property
    def fig_dir(self) -> Path:
        return self.out / "figures"

    @property
    def tab_dir(self) -> Path:
        return self.out / "tables"

    @property
    def several_groups(self) -> bool:
        return len(self.groups) > 1

    @cached_property
    def title(self) -> str:
        return "LoRA placement report: " + ", ".join(s.label for s in self.studies)

    @cached_property
    def time_note(self) -> str:
        """The run-order sentence of the time tables, figures and methods (:func:`order_note`)."""
        return order_note(self.groups)

    @cached_property
    def auto_studies(self) -> list[Study]:
        """The studies that hold importance or allocation files (the automatic-placement sections)."""
        return [s for s in self.studies if s.importance or s.allocations]


@dataclass
class Part:
    """What one section returns: its blocks (figures among them, already written to
    ``figures/``), the tables to write to ``tables/`` (those shown and any kept only there), and
    group name -> recommendations for ``recommendations.json``."""

    blocks: list[Block] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    recommendations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def __iadd__(self, other: Part) -> Part:
        self.blocks += other.blocks
        self.tables += other.tables
        self.recommendations.update(other.recommendations)
        return self

    def show(self, table: Table) -> None:
        """Show ``table`` here and write it to ``tables/``."""
        self.blocks.append(table)
        self.tables.append(table)
