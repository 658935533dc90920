"""The layer x role view of a placement, without torch (``loraplace plan``, :meth:`Placement.matrix
<loraplace.placement.resolve.Placement.matrix>`, and the report's allocation tables)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

from loraplace.placement.strategies import layer_span


def rank_rows(entries: Iterable[tuple[str | None, int | None, str, int]], stacks: dict[Any, int],
              columns: list[str]) -> list[dict[str, Any]]:
    """Rows of the layer x role matrix: the rank in each (layer, role) cell.

    Args:
        entries: ``(stack, layer, role, rank)`` per adapted module (stack and layer None outside the blocks).
        stacks: block stack -> number of layers, in display order.
        columns: the roles, in display order.

    Returns:
        ``{"stack", "layers": "0-11", "cells": {role: rank or None}}`` per run of consecutive layers
        with identical cells; a cell holds ``"8/16"`` when a role's modules in one layer got different
        ranks; modules outside the blocks form a last row with stack None and layers ``"-"``.
    """
    cells: dict[tuple, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for stack, layer, role, rank in entries:
        cells[(stack, layer)][role].add(int(rank))

    def row_cells(key) -> dict[str, Any]:
        found = cells.get(key, {})
        out = {}
        for role in columns:
            ranks = sorted(found.get(role, ()))
            out[role] = None if not ranks else ranks[0] if len(ranks) == 1 else "/".join(map(str, ranks))
        return out

    rows: list[dict[str, Any]] = []
    for stack, count in stacks.items():
        run_start, run_cells = 0, row_cells((stack, 0))
        for layer in range(1, int(count) + 1):
            current = row_cells((stack, layer)) if layer < count else None
            if current != run_cells:
                rows.append({"stack": stack, "layers": layer_span(run_start, layer - 1), "cells": run_cells})
                run_start, run_cells = layer, current  # type: ignore[assignment]
    outer = [row_cells(k) for k in cells if k[1] is None]
    if outer:
        rows.append({"stack": None, "layers": "-",
                     "cells": {r: next((c[r] for c in outer if c[r] is not None), None) for r in columns}})
    return rows
