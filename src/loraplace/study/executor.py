"""Executors run a list of :class:`RunSpec` jobs and hand back each :class:`RunResult` as it
finishes. The local one runs them in this process, one after another, sharing the loaded base
model and data through a :class:`RunContext`; a distributed executor implements the same
``submit`` and needs no change to the runs (:mod:`loraplace.study.ray_executor`)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol

from loraplace.records import RunResult, RunSpec
from loraplace.run.context import RunContext
from loraplace.study.runs import execute_run

StepHook = Callable[[RunSpec, int, int, "float | None"], None]


class Executor(Protocol):
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

    def submit(self, specs: Iterable[RunSpec]) -> Iterator[RunResult]:
        for spec in specs:
            if self.on_start:
                self.on_start(spec)
            hook = (lambda step, total, loss, _s=spec: self.on_step(_s, step, total, loss)) if self.on_step else None
            yield execute_run(spec, self.ctx, on_step=hook)
