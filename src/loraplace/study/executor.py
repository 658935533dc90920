"""Executors run a list of :class:`RunSpec` jobs and hand back each :class:`RunResult` as it
finishes. The local one runs them in this process, one after another, sharing the loaded base
model and data through a :class:`RunContext`; a distributed executor implements the same
``submit`` and needs no change to the runs (:mod:`loraplace.study.ray_executor`)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol

from loraplace.config import StudyConfig
from loraplace.records import RunResult, RunSpec
from loraplace.run.context import RunContext
from loraplace.study.allocations import Allocated, compute_allocations
from loraplace.study.runs import execute_run

StepHook = Callable[[RunSpec, int, int, "float | None"], None]


class Executor(Protocol):
    def allocate(self, config: StudyConfig, template: RunSpec, labels: list[str], known: dict[str, dict[str, Any]],
                 note: Callable[[str], None]) -> Allocated:
        """Compute the per-study allocations where the runs will train (same device and precision)."""
        ...

    def submit(self, specs: Iterable[RunSpec]) -> Iterator[RunResult]:
        """Run the jobs and yield each result as soon as it exists (order may differ)."""
        ...


class LocalExecutor:
    """Runs jobs sequentially in this process."""

    def __init__(self, on_step: StepHook | None = None, on_start: Callable[[RunSpec], None] | None = None,
                 allow_fetch: bool = True):
        self.on_step = on_step
        self.on_start = on_start
        self.ctx = RunContext(allow_fetch=allow_fetch)

    def allocate(self, config: StudyConfig, template: RunSpec, labels: list[str], known: dict[str, dict[str, Any]],
                 note: Callable[[str], None] = lambda text: None) -> Allocated:
        """The per-study allocations of ``labels`` (:func:`~loraplace.study.allocations.compute_allocations`),
        computed in this process on the base model the runs will share."""
        return compute_allocations(config, template, labels, self.ctx, known, note)

    def submit(self, specs: Iterable[RunSpec]) -> Iterator[RunResult]:
        for spec in specs:
            if self.on_start:
                self.on_start(spec)
            hook = (lambda step, total, loss, _s=spec: self.on_step(_s, step, total, loss)) if self.on_step else None
            yield execute_run(spec, self.ctx, on_step=hook)
