"""Rank allocation under a parameter budget: which slots get an adapter, at which rank.

Every slot (a module an adapter can go on) has a score curve ``gain(k)``: the predicted gain of a
rank-``k`` adapter on it (:mod:`loraplace.importance`). A rank step of ``s`` on a slot with
``in + out = size`` costs ``s * size`` parameters and gains ``gain(k + s) - gain(k)``.
:func:`allocate` takes rank steps greedily by gain per parameter (a max-heap over the slots' next
steps) until the budget is spent. With concave curves (diminishing returns, as the gradient and
activation scores give) this is the classic greedy for a separable concave knapsack: it is
optimal up to the last step. The sequence of steps does not depend on the budget, only where it
stops, so a larger budget gives every slot at least the rank a smaller one gave (monotone), and the
same scores always give the same allocation (ties go to the slot earlier in the model).

The stop rule: the next step is taken while it fits; the first step that does not fit is taken
too when that lands nearer the budget than stopping, and within the tolerance. Only when that leaves the result further than
``tolerance`` (1%) from the budget (a budget of a few steps of large slots) do the later steps that
still fit fill the rest, in the same order; monotonicity is then not guaranteed. A result still
outside the tolerance means the step is too coarse for the budget (an error says so).

Modes (the ``mode=`` option of the ``auto`` strategy):

* ``best``: the greedy above;
* ``worst``: the same greedy on the *least* gain per parameter (a falsification check: if scores
  mean anything, this arm should be worst);
* ``uniform``: the slots ``best`` chose, all at one rank matched to the budget
  (:func:`~loraplace.placement.budget.match_placement`): separates "where" from "how much";
* random placements are ``best`` on random scores (:func:`random_curves`).

Nothing here needs torch.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from loraplace.errors import LoraplaceError

DEFAULT_TOLERANCE = 0.01
"""An allocation must land within 1% of its parameter budget."""


@dataclass(frozen=True)
class SlotCurve:
    """One slot as the allocator sees it.

    Attributes:
        name: the module's exact name.
        size: parameters per unit of rank (``in + out``; times the experts for an expert parameter).
        curve: ``curve[k - 1]`` = gain of a rank-``k`` adapter, for ``k = 1..len(curve)``.
        max_rank: the highest rank this slot may get (e.g. ``min(in, out)``); None: ``len(curve)``.
    """

    name: str
    size: int
    curve: tuple[float, ...]
    max_rank: int | None = None

    def gain(self, k: int) -> float:
        """Gain of a rank-``k`` adapter: 0 at ``k = 0``."""
        if k <= 0:
            return 0.0
        if k > len(self.curve):
            raise LoraplaceError(f"slot {self.name}: rank {k} is beyond its score curve (max {len(self.curve)})")
        return float(self.curve[k - 1])


def _cap(slot: SlotCurve, max_r: int, step: int) -> int:
    top = min(max_r, len(slot.curve), slot.max_rank if slot.max_rank is not None else max_r)
    return (top // step) * step


def allocate(slots: Sequence[SlotCurve], budget: int, *, step: int = 2, max_r: int = 64, mode: str = "best",
             tolerance: float = DEFAULT_TOLERANCE) -> dict[str, int]:
    """Ranks for ``slots`` that spend ``budget`` parameters (within ``tolerance``).

    Args:
        slots: the candidate slots, in model order (ties go to the earlier one).
        budget: parameters to spend.
        step: rank granularity: every rank is a multiple of it.
        max_r: the highest rank any slot gets (also capped by its curve and its own ``max_rank``).
        mode: ``best`` (most gain per parameter first) or ``worst`` (least first).
        tolerance: relative deviation from ``budget`` accepted.

    Returns:
        slot name -> rank, for the slots that got a rank (> 0), in the order of ``slots``.

    Raises:
        LoraplaceError: bad arguments, a budget that the slots cannot absorb even at ``max_r``, or one
            that the step cannot meet within ``tolerance``.
    """
    if mode not in ("best", "worst"):
        raise LoraplaceError(f"allocation mode {mode!r}: expected best or worst")
    if step < 1 or max_r < step:
        raise LoraplaceError(f"rank step {step} and max rank {max_r}: need 1 <= step <= max rank")
    if budget < 1:
        raise LoraplaceError(f"parameter budget {budget} must be at least 1")
    if not slots:
        raise LoraplaceError("no slots to allocate ranks to")
    sign = -1.0 if mode == "best" else 1.0
    ranks = [0] * len(slots)
    caps = [_cap(s, max_r, step) for s in slots]
    capacity = sum(c * s.size for c, s in zip(caps, slots))
    if capacity < budget * (1 - tolerance):
        raise LoraplaceError(
            f"budget {budget:,} is more than the {len(slots)} slots can take at rank <= {max_r} ({capacity:,}); "
            "raise max_r or lower the budget"
        )

    def entry(i: int) -> tuple[float, int]:
        s, k = slots[i], ranks[i]
        ratio = (s.gain(k + step) - s.gain(k)) / (step * s.size)
        if not math.isfinite(ratio):
            raise LoraplaceError(f"slot {s.name}: score {ratio} is not finite")
        return sign * ratio, i

    heap = [entry(i) for i in range(len(slots)) if caps[i] >= step]
    heapq.heapify(heap)
    used = 0
    while heap:  # the greedy prefix
        _, i = heapq.heappop(heap)
        cost = step * slots[i].size
        if used + cost > budget:
            over = used + cost - budget
            if over < budget - used and over <= tolerance * budget:  # the overshoot lands nearer, and near
                ranks[i] += step
                used += cost
            else:
                heapq.heappush(heap, entry(i))
            break
        ranks[i] += step
        used += cost
        if ranks[i] < caps[i]:
            heapq.heappush(heap, entry(i))
    if abs(used - budget) > tolerance * budget:
        # Fill: the next steps in the same order that still fit (a slot whose step does not fit is
        # dropped: its later steps cost as much). Only small budgets, a few steps large, get here.
        while heap and used < budget:
            _, i = heapq.heappop(heap)
            cost = step * slots[i].size
            if used + cost <= budget:
                ranks[i] += step
                used += cost
                if ranks[i] < caps[i]:
                    heapq.heappush(heap, entry(i))
    deviation = abs(used - budget) / budget
    if deviation > tolerance:
        smallest = min(s.size for s in slots) * step
        raise LoraplaceError(
            f"rank steps of {step} cannot meet the budget {budget:,} within {tolerance:.0%} (got {used:,}, "
            f"{100 * (used - budget) / budget:+.2f}%); one step costs {smallest:,} to "
            f"{max(s.size for s in slots) * step:,} parameters: "
            + ("use step=1 or a larger budget" if step > 1 else "use a larger budget")
        )
    return {s.name: r for s, r in zip(slots, ranks) if r > 0}


def predicted_gain(slots: Sequence[SlotCurve], ranks: dict[str, int]) -> float:
    """Sum of the slots' gains at ``ranks`` (a rank beyond a slot's curve counts at its last point)."""
    by_name = {s.name: s for s in slots}
    return float(sum(by_name[n].gain(min(r, len(by_name[n].curve))) for n, r in ranks.items() if n in by_name))


def random_curves(slots: Sequence[SlotCurve], draw: int) -> list[SlotCurve]:
    """The slots with random scores: slot ``i`` gets ``u_i * size * H_k`` (``u_i`` uniform in
    (0, 1), ``H_k = 1 + 1/2 + ... + 1/k``), so that its gain per parameter is ``u_i`` times a
    shape-free diminishing curve: :func:`allocate` then places rank at random, with diminishing
    returns. ``draw`` seeds the draw (the same draw gives the same placement)."""
    rng = np.random.default_rng(draw)
    u = rng.uniform(1e-3, 1.0, size=len(slots))
    out = []
    for s, ui in zip(slots, u):
        harmonic = np.cumsum(1.0 / np.arange(1, len(s.curve) + 1))
        out.append(SlotCurve(s.name, s.size, tuple(float(ui * s.size * h) for h in harmonic), s.max_rank))
    return out
