"""Pareto fronts over (cost, loss), both minimised, and the knee of a front."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Point:
    key: str
    cost: float
    loss: float


def dominates(a: Point, b: Point) -> bool:
    """``a`` is no worse than ``b`` in both and better in at least one."""
    return a.cost <= b.cost and a.loss <= b.loss and (a.cost < b.cost or a.loss < b.loss)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Non-dominated points, sorted by cost (then loss)."""
    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: (p.cost, p.loss))


def dominators(points: Sequence[Point]) -> dict[str, list[Point]]:
    """key of each dominated point -> the points that dominate it (lowest loss first)."""
    out: dict[str, list[Point]] = {}
    for p in points:
        by = [q for q in points if q is not p and dominates(q, p)]
        if by:
            out[p.key] = sorted(by, key=lambda q: (q.loss, q.cost))
    return out


@dataclass(frozen=True)
class Knee:
    point: Point
    distance: float  # normalised distance from the chord between the front's ends (0..~0.7)


def knee(front: Sequence[Point], log_cost: bool = True) -> Knee | None:
    """The front point farthest from the straight line joining its two ends, after scaling cost
    (log10 when ``log_cost``: parameter counts span orders of magnitude) and loss to [0, 1].

    Only points below the chord (towards low cost and low loss) count: a front that bends the
    other way has no knee. Returns None when the front has fewer than three points (every point
    is an end), is flat, or has no point below its chord.
    """
    pts = sorted(front, key=lambda p: p.cost)
    if len(pts) < 3:
        return None
    xs = [math.log10(p.cost) if log_cost and p.cost > 0 else p.cost for p in pts]
    ys = [p.loss for p in pts]
    dx, dy = max(xs) - min(xs), max(ys) - min(ys)
    if dx <= 0 or dy <= 0:
        return None
    nx = [(x - min(xs)) / dx for x in xs]
    ny = [(y - min(ys)) / dy for y in ys]
    # chord from the first (cheapest, worst) to the last (dearest, best) point
    x0, y0, x1, y1 = nx[0], ny[0], nx[-1], ny[-1]
    length = math.hypot(x1 - x0, y1 - y0)
    best, best_d = None, -1.0
    for i in range(1, len(pts) - 1):
        d = ((x1 - x0) * (y0 - ny[i]) - (x0 - nx[i]) * (y1 - y0)) / length  # > 0: below the chord
        if d > best_d:
            best, best_d = pts[i], d
    return Knee(best, best_d) if best is not None and best_d > 0 else None
