"""Publication figures (matplotlib, Agg backend): PNG at 300 dpi plus SVG, the Okabe-Ito
colourblind-safe palette, labelled axes with units. Every function returns the
:class:`~loraplace.report.doc.Figure` blocks it wrote (none when it has nothing to draw)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # noqa: E402  (before pyplot; no display needed)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, LogNorm, Normalize  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from loraplace.placement.roles import ALL_ROLES  # noqa: E402
from loraplace.report import fmt  # noqa: E402
from loraplace.report.analysis import ArmResults, Group  # noqa: E402
from loraplace.report.doc import Figure  # noqa: E402
from loraplace.report.stats import Interval  # noqa: E402

# Okabe & Ito (2008), yellow last (low contrast on white).
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DPI = 300
WIDTH = 7.0  # inches: a full text width

_STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.5, "savefig.bbox": "tight", "svg.fonttype": "path",
    "figure.dpi": 100, "lines.linewidth": 1.4,
}


class Palette:
    """Stable colours per strategy and markers per study across all figures of a report."""

    def __init__(self, arms: list[ArmResults]):
        strategies = list(dict.fromkeys(a.strategy for a in arms if a.kind == "lora"))
        self.colors = {s: OKABE_ITO[i % len(OKABE_ITO)] for i, s in enumerate(strategies)}
        studies = list(dict.fromkeys(a.study.label for a in arms))
        self.markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(studies)}

    def color(self, arm: ArmResults) -> str:
        return self.colors.get(arm.strategy, "#555555")

    def marker(self, arm: ArmResults) -> str:
        return self.markers.get(arm.study.label, "o")


def _save(fig, out_dir: Path, name: str) -> tuple[Path, Path]:
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    fig.savefig(png, dpi=DPI, facecolor="white")
    fig.savefig(svg, facecolor="white")
    plt.close(fig)
    return png, svg


def _err(iv: Interval | None) -> float:
    """Half-width of a CI for an error bar; 0 (no bar) when the CI is undefined (one seed)."""
    return iv.half_width if iv is not None and iv.half_width is not None else 0.0


def _n_note(arms: list[ArmResults]) -> str:
    ns = sorted({a.n for a in arms})
    if ns == [1]:
        return "One seed per strategy: no error bars (a seed-level CI needs at least two seeds)."
    if 1 in ns:
        return "Error bars: 95% t-CI over seeds; points without a bar have a single seed (CI undefined)."
    return f"Error bars: 95% t-CI over seeds (n = {', '.join(map(str, ns))})."


def _base_lines(ax, groups: list[Group], horizontal: bool = True) -> None:
    for g in groups:
        base = g.base_arm
        if base is None:
            continue
        label = "base model (no adapters)" + (f", {base.study.label}" if len(groups) > 1 else "")
        if horizontal:
            ax.axhline(base.loss.mean, color="#666666", linestyle=":", linewidth=1.0, label=label)
        else:
            ax.axvline(base.loss.mean, color="#666666", linestyle=":", linewidth=1.0, label=label)


def _legend_outside(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def pareto(groups: list[Group], pal: Palette, out_dir: Path, cost: str, time_note: str = "") -> list[Figure]:
    arms = [a for g in groups for a in g.lora_arms if cost == "params" or a.train_time is not None]
    if not arms:
        return []
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 4.2))
        xs_all = [a.trainable_params if cost == "params" else a.train_time.mean for a in arms]
        ys_all = [a.loss.mean for a in arms]
        x_span = (np.log10(max(xs_all) + 1) - np.log10(min(xs_all) + 1)) if cost == "params" else \
            (max(xs_all) - min(xs_all))
        y_span = max(ys_all) - min(ys_all)
        placed: list[tuple[float, float]] = []
        for a in arms:
            x = a.trainable_params if cost == "params" else a.train_time.mean
            xn = np.log10(x + 1) if cost == "params" else x
            # labels of points that (nearly) coincide are stacked instead of overprinted
            near = sum(1 for px, py in placed if abs(px - xn) <= 0.04 * (x_span or 1) and
                       abs(py - a.loss.mean) <= 0.06 * (y_span or 1))
            placed.append((xn, a.loss.mean))
            xerr = 0.0 if cost == "params" else _err(a.train_time)
            ax.errorbar(x, a.loss.mean, yerr=_err(a.loss), xerr=xerr or None, fmt=pal.marker(a), color=pal.color(a),
                        markersize=7, capsize=3, elinewidth=1, markeredgecolor="black", markeredgewidth=0.5,
                        label=a.key, zorder=3)
            ax.annotate(a.key, (x, a.loss.mean), textcoords="offset points", xytext=(7, 5 - 11 * near), fontsize=8)
        for g in groups:
            front = g.front(cost)
            if len(front) >= 1:
                xs = [p.cost for p in front]
                ys = [p.loss for p in front]
                ax.step(xs, ys, where="post", color="#333333", linestyle="--", linewidth=1.0, zorder=2,
                        label="Pareto front" + (f" ({g.name})" if len(groups) > 1 else ""))
            k = g.knee(cost) if cost == "params" else None
            if k is not None:
                ax.scatter([k.point.cost], [k.point.loss], s=260, facecolors="none", edgecolors="#D55E00",
                           linewidths=1.5, zorder=4, label="knee of the front")
        _base_lines(ax, groups)
        if cost == "params":
            ax.set_xscale("log")
            ticks = sorted({a.trainable_params for a in arms if a.trainable_params > 0})
            if len(ticks) <= 10:  # label the strategies' own parameter counts
                ax.set_xticks(ticks, [fmt.compact(t) for t in ticks])
                ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            else:
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt.compact(v)))
            ax.set_xlabel("Trainable parameters (count, log scale)")
            title = "Trainable parameters vs eval loss"
        else:
            ax.set_xlabel("Training time (s, wall clock)")
            title = "Training time vs eval loss"
        ax.set_ylabel("Eval loss (nats/token, lower is better)")
        ax.set_title(title)
        ax.margins(x=0.15, y=0.15)
        _legend_outside(ax)
        name = f"pareto_{cost}"
        png, svg = _save(fig, out_dir, name)
    what = "trainable parameters" if cost == "params" else "training time (x error bars: 95% t-CI)"
    return [Figure(name, f"Pareto scatter of {what} against mean eval loss; the dashed step line is the Pareto "
                         f"front (no strategy is both cheaper and better). {_n_note(arms)}"
                         + (f" {time_note}" if cost == "time" and time_note else ""), png, svg, alt=title)]


def eval_loss(groups: list[Group], pal: Palette, out_dir: Path) -> list[Figure]:
    arms = [a for g in groups for a in g.lora_arms]
    if not arms:
        return []
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 0.45 * len(arms) + 1.4))
        for i, a in enumerate(arms):
            ax.errorbar(a.loss.mean, i, xerr=_err(a.loss), fmt=pal.marker(a), color=pal.color(a), markersize=7,
                        capsize=4, markeredgecolor="black", markeredgewidth=0.5, zorder=3)
            seeds = [r.result.eval_loss for r in a.runs]
            ax.scatter(seeds, [i] * len(seeds), s=14, facecolors="none", edgecolors=pal.color(a), zorder=2,
                       label="single seeds" if i == 0 else None)
        _base_lines(ax, groups, horizontal=False)
        ax.set_yticks(range(len(arms)), [a.key for a in arms])
        ax.invert_yaxis()
        ax.set_xlabel("Eval loss (nats/token, lower is better)")
        ax.set_title("Eval loss per strategy (mean and 95% CI over seeds)")
        ax.grid(axis="y", alpha=0)
        _legend_outside(ax)
        png, svg = _save(fig, out_dir, "eval_loss")
    return [Figure("eval_loss", f"Mean eval loss per strategy; hollow circles are single seeds. {_n_note(arms)}",
                   png, svg, alt="Eval loss per strategy")]


def time_throughput(groups: list[Group], pal: Palette, out_dir: Path, time_note: str = "") -> list[Figure]:
    arms = [a for g in groups for a in g.lora_arms if a.train_time is not None]
    if not arms:
        return []
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 0.4 * len(arms) + 1.6), sharey=True)
        for ax, attr, label, title in (
            (axes[0], "train_time", "Training time (s, wall clock)", "Training time"),
            (axes[1], "throughput", "Throughput (training tokens/s, non-pad)", "Throughput"),
        ):
            for i, a in enumerate(arms):
                iv = getattr(a, attr)
                if iv is None:
                    continue
                ax.errorbar(iv.mean, i, xerr=_err(iv), fmt=pal.marker(a), color=pal.color(a), markersize=7,
                            capsize=4, markeredgecolor="black", markeredgewidth=0.5)
            ax.set_xlabel(label)
            ax.set_title(title)
            ax.grid(axis="y", alpha=0)
            ax.set_xlim(left=0)
        axes[0].set_yticks(range(len(arms)), [a.key for a in arms])
        axes[0].invert_yaxis()
        png, svg = _save(fig, out_dir, "time_throughput")
    return [Figure("time_throughput", f"Training time and throughput per strategy. {_n_note(arms)}"
                   + (f" {time_note}" if time_note else ""), png, svg, alt="Training time and throughput per strategy")]


def _curve(arm: ArmResults, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, mean, sd) of a logged quantity over the arm's seeds, on the steps all seeds logged."""
    per_seed = []
    for r in arm.runs:
        pts = {int(e["step"]): float(e[key]) for e in r.train_log if key in e and "step" in e}
        if key == "eval_loss" and r.result.train_steps and r.result.eval_loss is not None:
            pts.setdefault(int(r.result.train_steps), float(r.result.eval_loss))  # the final evaluation
        if pts:
            per_seed.append(pts)
    if not per_seed:
        return None
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    if not steps:
        return None
    vals = np.array([[p[s] for s in steps] for p in per_seed])
    sd = vals.std(axis=0, ddof=1) if len(per_seed) > 1 else np.zeros(len(steps))
    return np.array(steps), vals.mean(axis=0), sd


def loss_curves(groups: list[Group], pal: Palette, out_dir: Path) -> list[Figure]:
    panels = [g for g in groups if any(_curve(a, "loss") or _curve(a, "eval_loss") for a in g.lora_arms)]
    if not panels:
        return []
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(WIDTH if len(panels) == 1 else 4.0 * len(panels), 3.8),
                                 squeeze=False)
        for ax, g in zip(axes[0], panels):
            for a in g.lora_arms:
                for key, style, marker in (("loss", "-", "."), ("eval_loss", "--", "o")):
                    c = _curve(a, key)
                    if c is None:
                        continue
                    steps, mean, sd = c
                    ax.plot(steps, mean, linestyle=style, marker=marker, markersize=3, color=pal.color(a),
                            label=f"{a.key} {'train' if key == 'loss' else 'eval'}")
                    if a.n > 1:
                        ax.fill_between(steps, mean - sd, mean + sd, color=pal.color(a), alpha=0.15, linewidth=0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("Optimizer step")
            ax.set_ylabel("Loss (nats/token)")
            ax.set_title("Training (solid) and eval (dashed) loss" + (f": {g.name}" if len(panels) > 1 else ""))
        _legend_outside(axes[0][-1])
        png, svg = _save(fig, out_dir, "loss_curves")
    return [Figure("loss_curves", "Training loss (solid, as logged by the trainer) and eval loss (dashed, "
                   "token-weighted on the held-out split) per strategy; lines are means over seeds, bands ±1 sd.",
                   png, svg, alt="Training and eval loss curves")]


def placement(arms: list[ArmResults], out_dir: Path) -> list[Figure]:
    """Layer x role matrix of each LoRA arm: cell colour = LoRA rank (blank: no adapter)."""
    items = []
    for a in arms:
        if a.kind != "lora":
            continue
        mods = next((r.modules for r in a.runs + a.failed if r.modules and r.modules.get("modules")), None)
        if mods:
            items.append((a, mods))
    if not items:
        return []
    roles = list(dict.fromkeys(m["role"] for _, mods in items for m in mods["modules"]))
    n_layers = max(int(mods.get("num_layers") or 0) for _, mods in items)
    has_other = any(m["layer"] is None for _, mods in items for m in mods["modules"])
    cols = list(range(n_layers)) + (["other"] if has_other else [])
    max_r = max(int(m.get("r") or 1) for _, mods in items for m in mods["modules"])
    ncols = min(3, len(items))
    nrows = -(-len(items) // ncols)
    uniform = all(int(m.get("r") or 1) == max_r for _, mods in items for m in mods["modules"])
    cmap = (ListedColormap(["#0072B2"]) if uniform else plt.get_cmap("cividis_r")).with_extremes(bad="#F2F2F2")
    with plt.rc_context({**_STYLE, "axes.grid": False}):
        fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH, nrows * (0.28 * len(roles) + 1.3) + 0.3),
                                 squeeze=False, sharey=True)
        im = None
        for ax, (a, mods) in zip(axes.flat, items):
            grid = np.full((len(roles), len(cols)), np.nan)
            for m in mods["modules"]:
                j = cols.index("other") if m["layer"] is None else int(m["layer"])
                grid[roles.index(m["role"]), j] = float(m.get("r") or 1)
            im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=max_r,
                           interpolation="nearest")
            ax.set_title(f"{a.key}: {len(mods['modules'])} modules", fontsize=9)
            ax.set_yticks(range(len(roles)), roles)
            step = max(1, len(cols) // 8)
            ax.set_xticks(range(0, len(cols), step), [str(c) for c in cols[::step]])
            ax.set_xlabel("Layer (block index)")
            ax.set_xticks(np.arange(-0.5, len(cols), 1), minor=True)
            ax.set_yticks(np.arange(-0.5, len(roles), 1), minor=True)
            ax.grid(which="minor", color="white", linewidth=0.6)
            ax.tick_params(which="minor", length=0)
        for ax in list(axes.flat)[len(items):]:
            ax.set_visible(False)
        if im is not None and not uniform:
            fig.colorbar(im, ax=axes.ravel().tolist(), label="LoRA rank r", shrink=0.8)
        fig.suptitle("Where the adapters go: role x layer (filled: adapted, grey: not adapted)", fontsize=10)
        png, svg = _save(fig, out_dir, "placement")
    return [Figure("placement", "Placement matrix of each strategy: rows are module roles, columns are layers; "
                   f"a filled cell carries a LoRA adapter{f' (all rank r={max_r})' if uniform else ' (colour: rank r)'}.",
                   png, svg, alt="Placement matrices")]


def _heat_columns(cells: list[tuple[str, str | None, int | None, float]]) -> list[tuple[str | None, int | None]]:
    """The heatmap's columns: ``(stack, layer)`` per stack in first-seen order, layers ascending,
    then one column for the modules outside the blocks (layer None)."""
    stacks = list(dict.fromkeys(stack for _, stack, _, _ in cells))
    cols = [(stack, layer) for stack in stacks
            for layer in sorted({lay for _, st, lay, _ in cells if st == stack and lay is not None})]
    return cols + ([(None, None)] if any(layer is None for _, _, layer, _ in cells) else [])


LOG_SPAN = 10.0
"""A heatmap of positive values spanning at least this ratio (largest / smallest) is drawn on a log
scale: on a linear one, a few large cells would hold the top of the colour scale and the rest would
look alike."""


def heat_scale(values: np.ndarray) -> tuple[np.ndarray, Normalize, str]:
    """The colour scale of a heatmap of ``values`` (NaN: no value), so that its structure shows.

    * all positive and spanning at least :data:`LOG_SPAN`: a log scale of the values;
    * spanning that much but with zero or negative values (no log): each value's percentile rank
      among the cells (0: the smallest, 100: the largest), so one outlier cannot flatten the rest;
    * otherwise linear, from 0 for magnitudes.

    Returns:
        ``(what to draw, its norm, the colour bar's note on the scale)``; the note is empty for linear.
    """
    finite = values[np.isfinite(values)]
    if finite.size < 2 or finite.max() == finite.min():
        return values, Normalize(vmin=0.0 if finite.size and finite.min() >= 0 else None), ""
    low, high = finite.min(), finite.max()
    if low > 0 and high / low >= LOG_SPAN:
        return values, LogNorm(vmin=low, vmax=high), " (log scale)"
    positive = finite[finite > 0]
    if positive.size >= 2 and positive.max() / positive.min() >= LOG_SPAN:
        order = np.sort(finite)
        ranks = np.where(np.isfinite(values), 0.0, np.nan)
        mask = np.isfinite(values)
        # mean of the positions of ties (like scipy's rankdata "average"), as a percentile
        ranks[mask] = 100.0 * (np.searchsorted(order, values[mask], "left")
                               + np.searchsorted(order, values[mask], "right") - 1) / 2 / (finite.size - 1)
        return ranks, Normalize(vmin=0.0, vmax=100.0), " (percentile rank among cells)"
    return values, Normalize(vmin=0.0 if low >= 0 else None), ""


def layer_role_heatmap(cells: list[tuple[str, str | None, int | None, float]], out_dir: Path, name: str,
                       title: str, value_label: str, caption: str) -> list[Figure]:
    """A layer x role heatmap of one value per module (importance before training, adapter norms
    after it): rows are roles, columns layers (per stack), grey cells have no value; the colour
    scale is chosen so that its structure shows (:func:`heat_scale`, named on the colour bar).

    Args:
        cells: ``(role, stack, layer, value)`` per module; modules that share a cell are averaged;
            layer None: outside the blocks (one column "other").
        out_dir: figures folder; writes ``name.png`` (300 dpi) and ``name.svg``.
        title: figure title; value_label: colour-bar label, with units.
        caption: the report's caption.

    Returns:
        The one :class:`~loraplace.report.doc.Figure` written, or none without cells.
    """
    if not cells:
        return []
    roles = sorted(dict.fromkeys(c[0] for c in cells), key=lambda r: (ALL_ROLES.index(r) if r in ALL_ROLES
                                                                      else len(ALL_ROLES), r))
    cols = _heat_columns(cells)
    sums, counts = np.zeros((len(roles), len(cols))), np.zeros((len(roles), len(cols)))
    for role, stack, layer, value in cells:
        i, j = roles.index(role), cols.index((stack, layer) if layer is not None else (None, None))
        sums[i, j] += value
        counts[i, j] += 1
    grid = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    several = len({st for st, lay in cols if lay is not None}) > 1
    labels = ["other" if lay is None else f"{st}:{lay}" if several else str(lay) for st, lay in cols]
    with plt.rc_context({**_STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(WIDTH, 0.3 * len(roles) + 1.6))
        drawn, norm, note = heat_scale(grid)
        im = ax.imshow(np.ma.masked_invalid(drawn), aspect="auto", interpolation="nearest",
                       cmap=plt.get_cmap("viridis").with_extremes(bad="#F2F2F2"), norm=norm)
        ax.set_yticks(range(len(roles)), roles)
        step = max(1, len(cols) // 12)
        ax.set_xticks(range(0, len(cols), step), labels[::step])
        ax.set_xlabel("Layer (block index" + (", stack:layer)" if several else ")"))
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label=value_label + note, shrink=0.9)
        png, svg = _save(fig, out_dir, name)
    return [Figure(name, caption + (f" Colour{note.rstrip(')').replace(' (', ': ')}." if note else ""), png, svg,
                   alt=title)]


def all_figures(groups: list[Group], arms: list[ArmResults], out_dir: Path, time_note: str = "") -> list[Figure]:
    """``time_note``: what the run order means for the time comparisons (captions of the time figures)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pal = Palette(arms)
    figs: list[Figure] = []
    figs += pareto(groups, pal, out_dir, "params")
    figs += pareto(groups, pal, out_dir, "time", time_note)
    figs += eval_loss(groups, pal, out_dir)
    figs += loss_curves(groups, pal, out_dir)
    figs += time_throughput(groups, pal, out_dir, time_note)
    figs += placement(arms, out_dir)
    return figs
