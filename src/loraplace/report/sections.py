"""The report's sections, in the order they appear (:data:`SECTIONS`).

Every section is ``section(ctx: ReportContext) -> Part``: it reads the shared
:class:`~loraplace.report.context.ReportContext` and returns its blocks, the tables to write and,
for the recommendations, the entries of ``recommendations.json``
(:class:`~loraplace.report.context.Part`); a section with nothing to show returns an empty Part.
The two automatic-placement sections live in :mod:`~loraplace.report.auto`.
"""

from __future__ import annotations

import time

from loraplace.placement.scale import scale_description
from loraplace.report import figures, tables
from loraplace.report.analysis import ENV_LIBRARIES, run_label, worse_than_base
from loraplace.report.auto import AUTO_METHOD, after_training_section, before_training_section
from loraplace.report.context import Part, ReportContext
from loraplace.report.doc import Bullets, Heading, Para
from loraplace.report.perplexity import OPTIONAL_FIELDS, diagnose, explain
from loraplace.report.recommend import recommendations, significance_rule
from loraplace.report.tuning import tuning_section


def _names(labels: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"`{x}`" for x in labels[:limit])
    return shown + (f" and {len(labels) - limit} more" if len(labels) > limit else "")


# ------------------------------------------------------------------------------------ overview
def _environment_blocks(ctx: ReportContext) -> list:
    """A prominent warning per group whose successful runs ran in different environments."""
    out = []
    for g in ctx.groups:
        diffs = g.environment()
        if not diffs:
            continue
        where = f" in group **{g.name}**" if ctx.several_groups else ""
        items = [f"**{d.what}**: " + "; ".join(f"`{v}` for {_names(runs)}" for v, runs in d.values.items())
                 for d in diffs]
        numerics = [("the device (a CPU's thread count included)" if d.what == "device" else f"the {d.what}")
                    for d in diffs if d.affects == "times and losses"]
        out.append(Para(
            f"**Warning: mixed environments{where}.** The successful runs differ in "
            + ", ".join(d.what for d in diffs) + ", so their training times, throughput and memory are not comparable"
            + (f" and, because {' and '.join(numerics)} {'differ' if len(numerics) > 1 else 'differs'}, neither are "
               "their eval losses exactly (different numerics): treat small loss differences across them with caution"
               if numerics else "")
            + ". Which runs differ in what:"))
        out.append(Bullets(items))
    return out


def _flag_blocks(ctx: ReportContext) -> list:
    """One sentence each naming the diverged runs (and why) and the runs worse than the base model."""
    several = len(ctx.studies) > 1
    diverged, worse = [], []
    for s in ctx.studies:
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


def overview_section(ctx: ReportContext) -> Part:
    """Title, where the numbers come from, and the warnings a reader must see first (studies
    that cannot be compared, mixed environments, diverged and worse-than-base runs)."""
    studies = ctx.studies
    part = Part([Heading(1, ctx.title)])
    versions = next((r.result.versions for s in studies for r in s.runs if r.result.versions), {})
    part.blocks.append(Para(
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by loraplace {versions.get('loraplace', '')} from the stored "
        "results of " + ", ".join(f"`{s.dir}`" for s in studies) + " (nothing re-run). Eval loss is the token-weighted "
        "mean negative log-likelihood in nats per token on the held-out split, lower is better; "
        "perplexity = exp(eval loss)."
    ))
    if ctx.several_groups:
        part.blocks.append(Para(
            "These studies do not share an eval set (different data, split or tokenization), so their eval losses are "
            "not on the same scale: comparisons, fronts and recommendations are made within each group of "
            "comparable studies (" + "; ".join(f"**{g.name}**" for g in ctx.groups) + "), and figures only place them "
            "side by side."
        ))
    part.blocks += _environment_blocks(ctx) + _flag_blocks(ctx)
    return part


# ------------------------------------------------------------------------ recommendations, results
TUNED_LEAD = ("**At tuned learning rates.** Every arm is judged at the rate its tuning chose on the validation "
              "split, by its loss on the test split (the section Learning-rate tuning shows the choices and the "
              "comparisons). Results per strategy and Paired comparisons below show every arm at train.lr, the "
              "untuned study; where the two disagree, these recommendations stand.")


def recommendations_section(ctx: ReportContext) -> Part:
    """The recommendations of each group (also ``recommendations.json``) and the significance rule."""
    part = Part([Heading(2, "Recommendations", "recommendations")])
    if ctx.tuned is not None:
        part.blocks.append(Para(TUNED_LEAD))
    elif any(s.arms_tuned for s in ctx.studies):
        part.blocks.append(Para("**At tuned learning rates.** Every arm is judged at the rate its tuning chose on the "
                                "validation split, by its loss on the test split, here and in every table below "
                                "(`tune.untuned: false`: no arm trained at train.lr)."))
    source = ctx.verdicts
    for g in source.groups:
        if source.several_groups:
            part.blocks.append(Heading(3, f"Group: {g.name}"))
        recs = recommendations(g, ctx.budget)
        part.recommendations[g.name] = [r.__dict__ for r in recs]
        part.blocks.append(Bullets([f"**{r.title}.** {r.text}" for r in recs]
                                   or ["No successful LoRA runs to compare."]))
    part.blocks.append(Para("**How to read these (the significance rule of the whole report).** "
                            + significance_rule(ctx.resamples)))
    return part


def results_section(ctx: ReportContext) -> Part:
    """One row per strategy: losses, parameters, time, memory (mean, sd, t CI over seeds)."""
    part = Part([Heading(2, "Results per strategy", "results")])
    part.show(tables.summary_table(ctx.arms, ctx.time_note))
    return part


def comparisons_section(ctx: ReportContext) -> Part:
    """Each group's paired comparisons against the reference arm and between every pair."""
    part = Part([Heading(2, "Paired comparisons", "comparisons")])
    for g in ctx.groups:
        for t in (tables.comparison_table(g, ctx.several_groups), tables.pairwise_table(g, ctx.several_groups)):
            if t is not None:
                part.show(t)
    if not part.tables:
        part.blocks.append(Para("No paired comparison was possible (fewer than two successful arms with per-example "
                                "eval data)."))
    return part


def figures_section(ctx: ReportContext) -> Part:
    """Pareto fronts, losses, curves, time and placement figures (:func:`figures.all_figures`)."""
    figs = figures.all_figures(ctx.groups, ctx.arms, ctx.fig_dir, ctx.time_note)
    return Part([Heading(2, "Figures", "figures")] + (figs or [Para("Nothing to plot: no successful runs.")]))


# ------------------------------------------------------------------------------------ perplexity
def perplexity_section(ctx: ReportContext) -> Part:
    """The stored per-example NLLs aggregated the correct and the common wrong ways, per study."""
    part = Part([Heading(2, "Perplexity methodology check", "perplexity"), Para(
        "loraplace reports perplexity = exp(Σᵢ nllᵢ / Σᵢ nᵢ): the exponential of the token-weighted mean NLL over "
        "the response tokens of the eval split. Below, the same per-example NLLs are aggregated the common wrong ways. "
        "Exponentiating before averaging (per batch or per example) always gives at least the exponential of the same "
        "average (Jensen's inequality), so a perplexity computed that way next to a loss averaged the same way is "
        "higher than exp(loss); weighting batches or examples equally instead of by tokens moves the value either way."
    )])
    missing_any = False
    for s in ctx.studies:
        res = tables.perplexity_table(s, ctx.arms)
        if res is None:
            part.blocks.append(Para(f"{s.label}: no per-example eval data stored; the check needs eval_examples.json."))
            continue
        t, per_run = res
        if len(ctx.studies) > 1:
            part.blocks.append(Heading(3, s.label))
        part.show(t)
        lora_run = next(((a, r, aggs) for a, r, aggs in per_run if a.kind == "lora"), per_run[0])
        d = diagnose(lora_run[2])
        part.blocks.append(Para(f"On run `{lora_run[1].result.run_id}`: " + explain(d)))
        stored = lora_run[1].result.perplexity
        if stored is not None and abs(stored / d.correct - 1) > 1e-6:
            part.blocks.append(Para(f"**Warning:** the stored perplexity of `{lora_run[1].result.run_id}` "
                                    f"({stored:.6g}) differs from exp(token-weighted mean NLL) of its stored examples "
                                    f"({d.correct:.6g})."))
        missing_any = missing_any or bool(d.missing)
    if missing_any:
        part.blocks.append(Para("The prompt- and padding-token variants need per-example fields that this study's "
                                "evaluation did not record in eval_examples.json: " +
                                "; ".join(f"`{k}` ({v})" for k, v in OPTIONAL_FIELDS.items()) + "."))
    return part


# ------------------------------------------------------------------------- setup, runs, methods
def setup_section(ctx: ReportContext) -> Part:
    """Model, data, hyperparameters, versions and hardware of each study."""
    part = Part([Heading(2, "Setup", "setup")])
    part.show(tables.setup_table(ctx.studies))
    return part


def runs_section(ctx: ReportContext) -> Part:
    """Every run, failed and diverged ones included."""
    part = Part([Heading(2, "All runs", "runs")])
    part.show(tables.runs_table(ctx.studies))
    return part


def _learning_rate_note(ctx: ReportContext) -> str:
    """Whether the comparisons are taken at one learning rate (untuned) or at each arm's tuned rate."""
    untuned = [s for s in ctx.studies if not s.tuning]
    rates = sorted({float((s.config.get("train") or {}).get("lr", 0)) for s in untuned} - {0.0})
    text = ("Learning rate: " + (f"**untuned**: every arm trained at one learning rate "
                                 f"({', '.join(f'{lr:g}' for lr in rates) or 'train.lr'}), so a difference between arms "
                                 "may be a step-size effect (their best rates differ); `tune.lr` compares each arm at "
                                 "its own rate, chosen on a validation split (see the README)" if untuned else ""))
    both = [s for s in ctx.studies if s.tuning and not s.arms_tuned]
    if both:
        text += ("; " if untuned else "") + ("the *Learning-rate tuning* section compares the arms at their own "
                                             "rates, chosen on the validation split, and reports them on the test "
                                             "split (the tables above: every arm at train.lr)")
    if any(s.arms_tuned for s in ctx.studies):
        text += ("; " if untuned or both else "") + (
            "**tuned**: every arm at the rate its tuning chose on the validation split, reported on the test split, "
            "in every table (`tune.untuned: false`: no arm trained at train.lr)")
    return text + "."


def _scale_note(ctx: ReportContext) -> str:
    """The update-scale rule every arm of each study shared (``lora.scale``)."""
    rules = list(dict.fromkeys((s.config.get("lora") or {}).get("scale") for s in ctx.studies))
    known = [r for r in rules if r]
    text = "Update scale (the factor on each adapter's update, PEFT's alpha / r): "
    if known:
        text += "; ".join(f"`lora.scale = {r}`, {scale_description(r)}" for r in known) + (
            ". A module whose rank a study chose for a parameter budget (budget-matched, automatic and EVA arms; "
            "AdaLoRA through its lora_alpha) takes the rank of a uniform arm of that budget on the same modules, so "
            "every such arm trains at one scale, the scale its uniform counterpart has")
    if None in rules:
        text += ("; " if known else "") + ("studies stored before `lora.scale` existed: hand-picked and matched arms "
                                           "at alpha / r of each module, automatic and EVA arms at alpha over the "
                                           "study's (or EVA's) rank for every module, so their scales differ")
    return text + "."


def methods_section(ctx: ReportContext) -> Part:
    """How every number of the report was computed."""
    time_note = ctx.time_note
    return Part([Heading(2, "Methods", "methods"), Bullets([
        "Seeds: every strategy is trained once per seed; the seed sets the adapter initialisation and the data order "
        "(the same order for every strategy of a seed). Mean ± sd and a 95% t-distribution CI over seeds "
        "(mean ± t₀.₉₇₅,ₙ₋₁·sd/√n) are shown; with one seed the CI is undefined and shown as such.",
        "Paired comparisons: the eval set is identical for every run of a study, so per-example NLLs are paired. "
        f"A paired bootstrap ({ctx.resamples:,} resamples) draws eval examples with replacement (the same draw for "
        "both arms and every seed) and, with several seeds, seeds with replacement; each draw recomputes the "
        "token-weighted eval losses and their difference. CI: 2.5th–97.5th percentile; p: two-sided, from the "
        "bootstrap distribution centred on the null.",
        "Significance, one rule for the whole report. " + significance_rule(),
        _learning_rate_note(ctx),
        _scale_note(ctx),
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
        "Environment: device, precision and the versions of " + ", ".join(ENV_LIBRARIES) + " are recorded per run; "
        "when the successful runs of a group differ in any of them, a warning at the top of the report names the "
        "runs, because their times (and, for precision, their losses) are then not comparable.",
        "Pareto front: strategies for which no other is both cheaper (trainable parameters, or mean training time) and "
        "lower in mean eval loss. Knee: the front point farthest below the chord joining the front's ends, with "
        "parameters on a log scale and both axes scaled to [0, 1].",
        "Throughput: non-pad training tokens per second of wall-clock training time (periodic evaluation included).",
    ] + ([AUTO_METHOD] if ctx.auto_studies else []))])


# -------------------------------------------------------------------------------- the section list
SECTIONS = (
    overview_section,  # title, provenance, warnings
    recommendations_section,
    results_section,
    comparisons_section,
    tuning_section,  # learning-rate tuning: chosen rates, tuned comparisons, robustness of the verdicts
    figures_section,
    before_training_section,  # automatic placement: importance scores, allocations
    after_training_section,  # automatic placement: auto vs same-budget arms, post-hoc norms, score validity
    perplexity_section,
    setup_section,
    runs_section,
    methods_section,
)
