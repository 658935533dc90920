"""Write the report: from stored study folders to tables (Markdown, CSV, LaTeX), figures (PNG
300 dpi + SVG), ``report.md``, ``recommendations.json`` and a self-contained ``report.html``
(:func:`write_report`), in the folder :func:`default_report_dir` names."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from loraplace.placement.arms import parse_param_count
from loraplace.report import doc, figures, tables
from loraplace.report.analysis import build_arms, build_groups, order_note, run_label, worse_than_base
from loraplace.report.auto import AUTO_METHOD, auto_section
from loraplace.report.doc import Bullets, Heading, Para
from loraplace.report.load import load_studies
from loraplace.report.perplexity import OPTIONAL_FIELDS, diagnose, explain
from loraplace.report.recommend import recommendations, significance_rule
from loraplace.report.stats import DEFAULT_RESAMPLES


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


_ENV_LIBS = ("torch", "transformers", "peft", "loraplace")


def _names(labels: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"`{x}`" for x in labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


def _environment_blocks(groups, several_groups: bool) -> list:
    """A prominent warning per group whose successful runs ran in different environments."""
    out = []
    for g in groups:
        diffs = g.environment()
        if not diffs:
            continue
        where = f" in group **{g.name}**" if several_groups else ""
        items = [f"**{d.what}**: " + "; ".join(f"`{v}` for {_names(runs)}" for v, runs in d.values.items())
                 for d in diffs]
        losses = any(d.affects == "times and losses" for d in diffs)
        out.append(Para(
            f"**Warning: mixed environments{where}.** The successful runs differ in "
            + ", ".join(d.what for d in diffs) + ", so their training times, throughput and memory are not comparable"
            + (" and, because the precision differs, neither are their eval losses (different numerics): treat "
               "loss comparisons across precisions with caution" if losses else "")
            + ". Which runs differ in what:"))
        out.append(Bullets(items))
    return out


def _flag_blocks(studies) -> list:
    """One sentence each naming the diverged runs (and why) and the runs worse than the base model."""
    several = len(studies) > 1
    diverged, worse = [], []
    for s in studies:
        for run in s.runs:
            if run.diverged:
                reason = run.result.diverged_reason or run.result.error or "no reason recorded"
                diverged.append(f"`{run_label(run, s, several)}` ({reason})")
            elif worse_than_base(run, s):
                worse.append(run_label(run, s, several))
    out = []
    if diverged:
        out.append(Para(f"**Diverged runs ({len(diverged)}), excluded from every statistic, front, comparison and "
                        "recommendation** (listed in the runs table): " + "; ".join(diverged) + "."))
    if worse:
        out.append(Para(f"**Runs that end worse than the base model ({len(worse)})**, kept in the statistics and "
                        "flagged in the tables: " + _names(worse, limit=20) + "."))
    return out


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
    fig_dir, tab_dir = out / "figures", out / "tables"
    for d in (fig_dir, tab_dir):
        d.mkdir(parents=True, exist_ok=True)

    arms = build_arms(studies)
    groups = build_groups(studies, arms, resamples=resamples)
    several_groups = len(groups) > 1
    title = "LoRA placement report: " + ", ".join(s.label for s in studies)
    blocks: list = [Heading(1, title)]
    versions = next((r.result.versions for s in studies for r in s.runs if r.result.versions), {})
    blocks.append(Para(
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by loraplace {versions.get('loraplace', '')} from the stored "
        "results of " + ", ".join(f"`{s.dir}`" for s in studies) + " (nothing re-run). Eval loss is the token-weighted "
        "mean negative log-likelihood in nats per token on the held-out split, lower is better; "
        "perplexity = exp(eval loss)."
    ))
    if several_groups:
        blocks.append(Para(
            "These studies do not share an eval set (different data, split or tokenization), so their eval losses are "
            "not on the same scale: comparisons, fronts and recommendations are made within each group of "
            "comparable studies (" + "; ".join(f"**{g.name}**" for g in groups) + "), and figures only place them "
            "side by side."
        ))
    blocks += _environment_blocks(groups, several_groups)
    blocks += _flag_blocks(studies)
    time_note = order_note(groups)

    # ---- recommendations
    blocks.append(Heading(2, "Recommendations", "recommendations"))
    all_recs = {}
    for g in groups:
        if several_groups:
            blocks.append(Heading(3, f"Group: {g.name}"))
        recs = recommendations(g, budget)
        all_recs[g.name] = [r.__dict__ for r in recs]
        blocks.append(Bullets([f"**{r.title}.** {r.text}" for r in recs] or ["No successful LoRA runs to compare."]))
    blocks.append(Para("**How to read these (the significance rule of the whole report).** " + significance_rule(resamples)))

    # ---- tables
    blocks.append(Heading(2, "Results per strategy", "results"))
    written = [tables.summary_table(arms, time_note)]
    blocks.append(written[-1])
    blocks.append(Heading(2, "Paired comparisons", "comparisons"))
    any_comp = False
    for g in groups:
        for t in (tables.comparison_table(g, several_groups), tables.pairwise_table(g, several_groups)):
            if t is not None:
                any_comp = True
                written.append(t)
                blocks.append(t)
    if not any_comp:
        blocks.append(Para("No paired comparison was possible (fewer than two successful arms with per-example "
                           "eval data)."))

    # ---- figures
    blocks.append(Heading(2, "Figures", "figures"))
    figs = figures.all_figures(groups, arms, fig_dir, time_note)
    blocks += figs or [Para("Nothing to plot: no successful runs.")]

    # ---- automatic placement (only for studies that hold importance or allocation files)
    auto_blocks, auto_tables = auto_section(studies, groups, fig_dir)
    blocks += auto_blocks
    written += auto_tables

    # ---- perplexity methodology
    blocks.append(Heading(2, "Perplexity methodology check", "perplexity"))
    blocks.append(Para(
        "loraplace reports perplexity = exp(Σᵢ nllᵢ / Σᵢ nᵢ): the exponential of the token-weighted mean NLL over "
        "the response tokens of the eval split. Below, the same per-example NLLs are aggregated the common wrong ways. "
        "Exponentiating before averaging (per batch or per example) always gives at least the exponential of the same "
        "average (Jensen's inequality), so a perplexity computed that way next to a loss averaged the same way is "
        "higher than exp(loss); weighting batches or examples equally instead of by tokens moves the value either way."
    ))
    missing_any = False
    for s in studies:
        res = tables.perplexity_table(s, arms)
        if res is None:
            blocks.append(Para(f"{s.label}: no per-example eval data stored; the check needs eval_examples.json."))
            continue
        t, per_run = res
        if len(studies) > 1:
            blocks.append(Heading(3, s.label))
        written.append(t)
        blocks.append(t)
        lora_run = next(((a, r, aggs) for a, r, aggs in per_run if a.kind == "lora"), per_run[0])
        d = diagnose(lora_run[2])
        blocks.append(Para(f"On run `{lora_run[1].result.run_id}`: " + explain(d)))
        stored = lora_run[1].result.perplexity
        if stored is not None and abs(stored / d.correct - 1) > 1e-6:
            blocks.append(Para(f"**Warning:** the stored perplexity of `{lora_run[1].result.run_id}` ({stored:.6g}) "
                               f"differs from exp(token-weighted mean NLL) of its stored examples ({d.correct:.6g})."))
        missing_any = missing_any or bool(d.missing)
    if missing_any:
        blocks.append(Para("The prompt- and padding-token variants need per-example fields that this study's evaluation "
                           "did not record in eval_examples.json: " +
                           "; ".join(f"`{k}` ({v})" for k, v in OPTIONAL_FIELDS.items()) + "."))

    # ---- setup, runs, method
    blocks.append(Heading(2, "Setup", "setup"))
    written.append(tables.setup_table(studies))
    blocks.append(written[-1])
    blocks.append(Heading(2, "All runs", "runs"))
    written.append(tables.runs_table(studies))
    blocks.append(written[-1])
    blocks.append(Heading(2, "Methods", "methods"))
    blocks.append(Bullets([
        "Seeds: every strategy is trained once per seed; the seed sets the adapter initialisation and the data order "
        "(the same order for every strategy of a seed). Mean ± sd and a 95% t-distribution CI over seeds "
        "(mean ± t₀.₉₇₅,ₙ₋₁·sd/√n) are shown; with one seed the CI is undefined and shown as such.",
        "Paired comparisons: the eval set is identical for every run of a study, so per-example NLLs are paired. "
        f"A paired bootstrap ({resamples:,} resamples) draws eval examples with replacement (the same draw for both "
        "arms and every seed) and, with several seeds, seeds with replacement; each draw recomputes the "
        "token-weighted eval losses and their difference. CI: 2.5th–97.5th percentile; p: two-sided, from the "
        "bootstrap distribution centred on the null.",
        "Significance, one rule for the whole report. " + significance_rule(),
        "Memory: for each run, its peak minus the memory in use when it started (the loaded base model and data), "
        "i.e. the increase over the loaded model, what the run itself needed, shown beside the run's peak and start. "
        "The measure is the process RSS on CPU and CUDA max allocated memory on a GPU; the table headers name it. "
        f"Studies stored before the start was recorded show only the process peak (marked {tables.PROCESS_PEAK}), "
        "which includes the loaded model and memory held from earlier runs of the same process.",
        "Run order: each run records its place in the study's execution order. When two arms ran in the same "
        "relative order for every seed (one seed, or every seed in the same order), a time difference between them "
        "may be an order effect, so the report gives no time-dominance verdict for them (untested for order); when "
        "the order varied across seeds (the study rotates the arm order per seed) the Welch test over seeds stands."
        + (" In this report: " + time_note[len("Run order: "):] if time_note else ""),
        "Diverged runs (training diverged without a NaN, e.g. an eval loss near ln(vocabulary size)) are listed and "
        "flagged but treated like failed runs: kept out of every statistic, front, comparison and recommendation. "
        "Runs whose eval loss ends above the base model's are flagged (worse than base) and stay in the statistics.",
        "Environment: device, precision and the versions of " + ", ".join(_ENV_LIBS) + " are recorded per run; "
        "when the successful runs of a group differ in any of them, a warning at the top of the report names the "
        "runs, because their times (and, for precision, their losses) are then not comparable.",
        "Pareto front: strategies for which no other is both cheaper (trainable parameters, or mean training time) and "
        "lower in mean eval loss. Knee: the front point farthest below the chord joining the front's ends, with "
        "parameters on a log scale and both axes scaled to [0, 1].",
        "Throughput: non-pad training tokens per second of wall-clock training time (periodic evaluation included).",
    ] + ([AUTO_METHOD] if auto_blocks else [])))

    # ---- write
    for t in written:
        (tab_dir / f"{t.name}.md").write_text(doc.table_markdown(t))
        (tab_dir / f"{t.name}.csv").write_text(doc.table_csv(t))
        (tab_dir / f"{t.name}.tex").write_text(doc.table_latex(t))
    (out / "recommendations.json").write_text(json.dumps(all_recs, indent=2, default=str))
    (out / "report.md").write_text(doc.to_markdown(blocks, out))
    html_path = out / "report.html"
    html_path.write_text(doc.to_html(blocks, title))
    return html_path
