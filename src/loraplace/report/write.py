"""Write the report: from stored study folders to tables (Markdown, CSV, LaTeX), figures (PNG
300 dpi + SVG), ``report.md``, ``recommendations.json`` and a self-contained ``report.html``
(:func:`write_report`), in the folder :func:`default_report_dir` names."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from loraplace.placement.arms import parse_param_count
from loraplace.report import doc
from loraplace.report.context import ReportContext
from loraplace.report.load import load_studies
from loraplace.report.sections import SECTIONS
from loraplace.report.stats import DEFAULT_RESAMPLES
from loraplace.report.tuning import at_tuned_rates


def default_report_dir(study_dirs: list[Path]) -> Path:
    """``STUDY_DIR/report`` for one study; next to the studies, named after them, for several."""
    dirs = [Path(d) for d in study_dirs]
    if len(dirs) == 1:
        return dirs[0] / "report"
    parent = Path(*_common_parts([d.resolve() for d in dirs]))
    name = "report-" + "-vs-".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", d.name) for d in dirs)
    return parent / name[:120]


def _common_parts(paths: list[Path]) -> list[str]:
    parts = list(paths[0].parent.parts)
    for p in paths[1:]:
        other = list(p.parent.parts)
        n = 0
        while n < min(len(parts), len(other)) and parts[n] == other[n]:
            n += 1
        parts = parts[:n]
    return parts or ["."]


def write_report(study_dirs: list[Path], out_dir: Path | None = None, budget: int | str | None = None,
                 resamples: int = DEFAULT_RESAMPLES) -> Path:
    """Write the report of one or several study folders and return the path of ``report.html``
    (``report.md``, ``tables/`` and ``figures/`` lie next to it).

    Args:
        study_dirs: study folders written by ``loraplace run`` (each holds results.json).
        out_dir: where to write; default :func:`default_report_dir`.
        budget: trainable-parameter budget for the "best within budget" recommendation (a count,
            or text such as ``500k``: :func:`~loraplace.placement.budget.parse_param_count`).
        resamples: bootstrap draws per paired comparison.

    Raises:
        LoraplaceError: a folder is missing or holds no results; a budget that is not a count.
    """
    budget = parse_param_count(budget, what="--budget") if budget is not None else None
    studies = load_studies([Path(d) for d in study_dirs])
    out = Path(out_dir) if out_dir is not None else default_report_dir([s.dir for s in studies])
    tuned = [at_tuned_rates(s) for s in studies]
    # A tuned study that trained no arm at train.lr (tune.untuned false) is read at its tuned rates
    # throughout; its tuning section still reads its tuning runs.
    main = [replace(t, tuning=s.tuning) if t is not None and not s.untuned_runs else s for s, t in zip(studies, tuned)]
    ctx = ReportContext.build(main, out, budget, resamples)
    if any(t is not None and s.untuned_runs for s, t in zip(studies, tuned)):
        ctx.tuned = ReportContext.build([t or s for t, s in zip(tuned, studies)], out, budget, resamples)
    for d in (ctx.fig_dir, ctx.tab_dir):
        d.mkdir(parents=True, exist_ok=True)
    parts = [section(ctx) for section in SECTIONS]

    blocks = [b for p in parts for b in p.blocks]
    for t in (t for p in parts for t in p.tables):
        (ctx.tab_dir / f"{t.name}.md").write_text(doc.table_markdown(t))
        (ctx.tab_dir / f"{t.name}.csv").write_text(doc.table_csv(t))
        (ctx.tab_dir / f"{t.name}.tex").write_text(doc.table_latex(t))
    recommendations = {g: recs for p in parts for g, recs in p.recommendations.items()}
    (out / "recommendations.json").write_text(json.dumps(recommendations, indent=2, default=str))
    (out / "report.md").write_text(doc.to_markdown(blocks, out))
    html_path = out / "report.html"
    html_path.write_text(doc.to_html(blocks, ctx.title))
    return html_path
