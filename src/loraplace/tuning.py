"""Learning-rate tuning by synchronous successive halving: the rung schedule, which rates go on,
and the rate each arm gets. Pure functions of the stored tuning rows (no torch), shared by the
driver that runs the rungs (:mod:`loraplace.study.driver`) and the report that shows them.

Successive halving (Jamieson and Talwalkar 2016; Li et al., Hyperband 2018) over ``n`` candidate
rates with rate ``eta``: every rate trains to the first rung of steps; the best ``ceil(n / eta)``
by mean validation loss over the seeds go on, from their saved state, to a rung ``eta`` times
longer; and so on until one rate is left, which trains to the study's ``train.max_steps``. The
learning-rate schedule is always the full run's, so a rate that survives every rung has trained
exactly as a run trained straight through (``tests/test_tuning_resume.py``), and every arm is
reported at equal steps. With ``n = 4`` and ``eta = 3`` the rungs are ``T/9, T/3, T`` and the
halving trains ``(4/9 + 2 (1/3 - 1/9) + (1 - 1/3)) T = 1.56 T`` arm-steps instead of the grid's
``4 T`` (0.39x).

Only validation losses are read here (``validation_losses``: step -> loss at each finished rung);
the test (eval) loss of a tuning run is set only at the last rung, after every choice is made,
and never reaches a function of this module (``tests/test_tuning.py`` checks that changing it
changes no choice).

Why not Ray Tune's ASHA or Optuna's pruner: both are asynchronous (a rate is stopped by comparing
it with whatever has finished so far), so the choice would depend on the order and speed of the
workers, and a study run locally and on Ray could choose differently; both own the trial's
lifecycle and checkpoint storage, while a loraplace run is a row of the study store that the
local executor, the Ray executor, resume and the report already share. Synchronous halving is a
few lines over those rows and gives the same choice on any executor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from loraplace.records import RunResult


def survivors_count(n: int, eta: int) -> int:
    """How many of ``n`` rates go on to the next rung: ``ceil(n / eta)``."""
    return max(1, math.ceil(n / eta))


def rung_steps(max_steps: int, n_rates: int, eta: int, schedule: str = "halving", min_steps: int = 1) -> list[int]:
    """The step at which each rung ends, ascending; the last is ``max_steps``.

    ``grid``: one rung (every rate to the end). ``halving``: one rung per halving until one rate
    is left, plus the last, each ``eta`` times longer than the one before (rounded, at least one
    step more than the one before, none before ``min_steps``: Hyperband's minimum resource, against
    the short-horizon bias of a first rung of a few steps, where the highest rates lead; rungs that
    would coincide are merged, and then more than one rate trains to the last step).
    """
    if schedule == "grid" or n_rates <= 1:
        return [max_steps]
    halvings, n = 0, n_rates
    while n > 1:
        n = survivors_count(n, eta)
        halvings += 1
    steps: list[int] = []
    for k in range(halvings + 1):
        step = max(1, min_steps, round(max_steps / eta ** (halvings - k)))
        if steps and step <= steps[-1]:
            continue
        steps.append(min(step, max_steps))
    if steps[-1] != max_steps:
        steps.append(max_steps)
    return steps


def rung_sizes(max_steps: int, n_rates: int, eta: int, schedule: str = "halving", min_steps: int = 1) -> list[int]:
    """How many rates train in each rung of :func:`rung_steps` (``n``, ``ceil(n / eta)``, ..., 1)."""
    sizes = [n_rates]
    for _ in rung_steps(max_steps, n_rates, eta, schedule, min_steps)[1:]:
        sizes.append(survivors_count(sizes[-1], eta))
    return sizes


def _mean(values: Sequence[float | None]) -> float:
    """Mean over the seeds; a missing or non-finite loss (a failed run) makes it +inf."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return math.inf
    return sum(values) / len(values)  # type: ignore[arg-type]


def rate_losses(rows: Iterable[RunResult], arm: str, step: int) -> dict[float, float]:
    """Mean validation loss over the seeds of every rate of ``arm`` that finished the rung ending at
    ``step`` (+inf where a seed's run failed or lacks it); reads ``validation_losses`` only."""
    by_rate: dict[float, list[float | None]] = {}
    for r in rows:
        if r.kind == "tune" and r.strategy == arm and r.tune_lr is not None:
            by_rate.setdefault(r.tune_lr, []).append(r.validation_losses.get(str(step)))
    return {lr: _mean(v) for lr, v in by_rate.items()}


def best_rates(losses: dict[float, float], keep: int) -> list[float]:
    """The ``keep`` rates with the lowest loss, ascending by rate; ties go to the lower rate."""
    ranked = sorted(losses, key=lambda lr: (losses[lr], lr))
    return sorted(ranked[:keep])


@dataclass
class Choice:
    """An arm's tuning outcome: the chosen rate (None: every rate failed), the candidates, each
    rate's mean validation loss at the last rung it finished (and that rung's step), and whether
    the chosen rate is at an end of the grid."""

    arm: str
    rates: list[float]
    lr: float | None
    validation: dict[float, tuple[int, float]] = field(default_factory=dict)  # rate -> (step, mean loss)

    @property
    def edge(self) -> str | None:
        """``low`` or ``high`` when the chosen rate is the grid's lowest or highest: the optimum may
        lie outside it (widen the grid on that side)."""
        if self.lr is None or len(self.rates) < 2:
            return None
        return "low" if self.lr == min(self.rates) else "high" if self.lr == max(self.rates) else None


def alive_rates(rows: Sequence[RunResult], arm: str, rates: Sequence[float], steps: Sequence[int], rung: int,
                eta: int) -> list[float]:
    """The rates of ``arm`` that train in rung ``rung``: all at rung 0, then the best
    :func:`survivors_count` of the rates alive in the rung before, by its validation losses."""
    alive = sorted(rates)
    for k in range(1, rung + 1):
        losses = rate_losses(rows, arm, steps[k - 1])
        alive = best_rates({lr: losses.get(lr, math.inf) for lr in alive}, survivors_count(len(alive), eta))
    return alive


def choose(rows: Sequence[RunResult], arm: str, rates: Sequence[float], steps: Sequence[int], eta: int) -> Choice:
    """The arm's rate: the best by mean validation loss among the rates that trained to the last
    rung (None when none finished it)."""
    alive = alive_rates(rows, arm, rates, steps, len(steps) - 1, eta)
    final = rate_losses(rows, arm, steps[-1])
    finished = {lr: final[lr] for lr in alive if math.isfinite(final.get(lr, math.inf))}
    validation: dict[float, tuple[int, float]] = {}
    for step in steps:
        for lr, loss in rate_losses(rows, arm, step).items():
            if math.isfinite(loss):
                validation[lr] = (step, loss)
    lr = best_rates(finished, 1)[0] if finished else None
    return Choice(arm=arm, rates=sorted(rates), lr=lr, validation=validation)


def arm_steps(rows: Iterable[RunResult]) -> int:
    """Optimizer steps the tuning rows trained, summed over runs (the cost of a tuning schedule)."""
    return sum(r.train_steps or 0 for r in rows if r.kind == "tune")
