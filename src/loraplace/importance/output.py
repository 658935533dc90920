"""Writing an importance result: its ``loraplace-importance/1`` JSON document, a CSV table with
one row per slot, and a layer x role heatmap of the gain per adapter parameter (PNG at 300 dpi
and SVG, in the report's figure style). Every file is replaced atomically."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import Normalize

from loraplace.errors import LoraplaceError
from loraplace.files import atomic_replace, atomic_write_json, atomic_write_text
from loraplace.importance.scores import ImportanceResult, get_score
from loraplace.placement.roles import ALL_ROLES
from loraplace.report.figures import _STYLE, DPI, WIDTH, heat_scale

CSV_COLUMNS = ("name", "role", "stack", "layer", "in_features", "out_features", "r", "gain_at_1", "gain_at_r",
               "gain_at_max_rank", "gain_per_param_at_r", "share_at_r")


def _check_rank(result: ImportanceResult, r: int) -> None:
    if not 1 <= r <= result.max_rank:
        raise LoraplaceError(f"rank r={r} is outside the scored range 1..{result.max_rank} of the {result.score} "
                             "score; score with a larger max_rank or pick a smaller r")


def slot_rows(result: ImportanceResult, r: int) -> list[dict[str, Any]]:
    """One row per slot, in model order, with the columns of :data:`CSV_COLUMNS`: the gain at
    rank 1, ``r`` and max_rank, the gain per adapter parameter at ``r`` (``gain(r) / (r (in + out))``)
    and the slot's share of the summed gain of every slot at ``r``.

    Raises:
        LoraplaceError: ``r`` outside 1..max_rank.
    """
    _check_rank(result, r)
    total = result.total_gain(r)
    return [{"name": s.name, "role": s.role, "stack": s.stack, "layer": s.layer, "in_features": s.in_features,
             "out_features": s.out_features, "r": r, "gain_at_1": s.gain(1), "gain_at_r": s.gain(r),
             "gain_at_max_rank": s.gain(result.max_rank), "gain_per_param_at_r": s.gain_per_param(r),
             "share_at_r": s.gain(r) / total if total > 0 else 0.0}
            for s in result.slots]


def role_shares(result: ImportanceResult, r: int) -> dict[str, float]:
    """Role -> the summed share of its slots in the total gain at rank ``r`` (roles in first-seen order)."""
    shares: dict[str, float] = {}
    for row in slot_rows(result, r):
        shares[row["role"]] = shares.get(row["role"], 0.0) + row["share_at_r"]
    return shares


def write_importance(result: ImportanceResult, out_dir: str | Path, *, r: int = 16) -> dict[str, Path]:
    """Write ``<score>.json``, ``<score>.csv`` and ``<score>_heatmap.png`` / ``.svg`` into ``out_dir``.

    Args:
        r: the rank the CSV's and the heatmap's per-parameter columns are read at (the study's rank).

    Returns:
        ``{"json", "csv", "png", "svg"}`` -> path.

    Raises:
        LoraplaceError: ``r`` outside 1..max_rank.
    """
    _check_rank(result, r)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{result.score}.json", "csv": out / f"{result.score}.csv"}
    atomic_write_json(paths["json"], result.to_dict())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(slot_rows(result, r))
    atomic_write_text(paths["csv"], buffer.getvalue())
    paths["png"], paths["svg"] = heatmap(result, out / f"{result.score}_heatmap", r)
    return paths


def _save_atomic(fig, path: Path, **kwargs) -> None:
    """``fig.savefig`` through the atomic writer (the temp file keeps the suffix: it picks the format)."""
    atomic_replace(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip("."), **kwargs), suffix=path.suffix)


@dataclass(frozen=True)
class HeatCells:
    """What :func:`heatmap` draws: per block stack a layer x role grid of colour positions.

    Attributes:
        roles: the columns, in :data:`~loraplace.placement.roles.ALL_ROLES` order.
        grids: per stack, ``grid[layer, role]`` = the cell's value on the colour scale (NaN: no slot).
        norm: the colour scale, one for every stack.
        note: the colour bar's note on the scale (empty for linear).
    """

    roles: list[str]
    grids: dict[str, np.ndarray]
    norm: Normalize
    note: str


def heat_cells(result: ImportanceResult, r: int) -> HeatCells:
    """The cells of :func:`heatmap`: ``gain(r) / (r (in + out))`` per slot inside the blocks,
    normalised to its maximum, on the report's colour scale
    (:func:`~loraplace.report.figures.heat_scale`) chosen over every stack's cells together.

    Raises:
        LoraplaceError: ``r`` outside 1..max_rank.
    """
    _check_rank(result, r)
    blocks = [s for s in result.slots if s.stack is not None and s.layer is not None]
    stacks = list(dict.fromkeys(s.stack for s in blocks))
    present = {s.role for s in blocks}
    roles = [role for role in ALL_ROLES if role in present] + sorted(present - set(ALL_ROLES))
    peak = max((s.gain_per_param(r) for s in blocks), default=0.0)
    grids = {stack: np.full((1 + max(s.layer for s in blocks if s.stack == stack), len(roles)), np.nan)
             for stack in stacks}
    for s in blocks:
        grids[s.stack][s.layer, roles.index(s.role)] = s.gain_per_param(r) / peak if peak > 0 else 0.0
    flat = np.concatenate([g.ravel() for g in grids.values()]) if grids else np.zeros(0)
    drawn, norm, note = heat_scale(flat)
    if not note:  # linear: the values are shares of the maximum
        norm = Normalize(vmin=0.0, vmax=1.0)
    offsets = np.cumsum([0] + [g.size for g in grids.values()])
    split = {stack: drawn[offsets[i]:offsets[i + 1]].reshape(grids[stack].shape) for i, stack in enumerate(grids)}
    return HeatCells(roles=roles, grids=split, norm=norm, note=note)


def heatmap(result: ImportanceResult, path_stem: str | Path, r: int) -> tuple[Path, Path]:
    """A layer x role heatmap of ``gain(r) / (r (in + out))``, normalised to its maximum over all
    slots, one panel per block stack (two for encoder-decoder models) on one colour scale; empty
    cells (a role a stack lacks) are left blank. Slots outside the blocks are not drawn. The scale
    is the report's (:func:`~loraplace.report.figures.heat_scale`: log when the values span 10x or
    more, percentile rank when zeros prevent a log, else linear), named on the colour bar, so that
    one outlying slot does not flatten the rest (:func:`heat_cells`).

    Returns:
        ``(png, svg)``: ``path_stem`` + ``.png`` (300 dpi) and ``.svg``.

    Raises:
        LoraplaceError: ``r`` outside 1..max_rank.
    """
    import matplotlib  # deferred: matplotlib is slow to import and only the heatmap needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = heat_cells(result, r)
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    where = "data-free prior" if not get_score(result.score).needs_data else f"{result.tokens:,} target tokens"
    model = Path(result.model).name or result.model or "model"
    title = (f"{result.score} score of {model}: gain per adapter parameter at r={r}, normalised to the maximum\n"
             f"{where}, {result.seconds:.1f} s")
    with plt.rc_context({**_STYLE, "axes.grid": False}):
        height = max(2.6, 0.16 * max((g.shape[0] for g in cells.grids.values()), default=1) + 1.6)
        fig, axes = plt.subplots(1, max(1, len(cells.grids)), figsize=(WIDTH, height), squeeze=False,
                                 layout="constrained")
        image = None
        for ax, (stack, grid) in zip(axes[0], cells.grids.items()):
            image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", norm=cells.norm,
                              interpolation="nearest")
            ax.set_xticks(range(len(cells.roles)), cells.roles, rotation=45, ha="right")
            ax.set_ylabel("layer")
            ax.yaxis.get_major_locator().set_params(integer=True)
            if len(cells.grids) > 1:
                ax.set_title(stack)
        if not cells.grids:
            axes[0][0].text(0.5, 0.5, "no slot inside the blocks", ha="center", va="center")
            axes[0][0].set_axis_off()
        if image is not None:
            fig.colorbar(image, ax=list(axes[0]), label=f"gain per parameter at r={r} (÷ max){cells.note}")
        fig.suptitle(title, fontsize=9)
        png, svg = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")
        _save_atomic(fig, png, dpi=DPI, facecolor="white")
        _save_atomic(fig, svg, facecolor="white")
        plt.close(fig)
    return png, svg
