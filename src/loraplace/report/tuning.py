"""The learning-rate tuning section: each arm's chosen rate, the validation losses it was chosen
on, the paired comparisons of the arms at their tuned rates, and how the verdicts of the untuned
comparison (every arm at ``train.lr``) hold up at tuned rates.

Choices are recomputed from the stored validation losses with :mod:`loraplace.tuning` (the
driver's own functions); the test (eval) losses enter only the comparisons of the arms at their
chosen rates, never a choice.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from loraplace.config import TuneSettings
from loraplace.report import figures, fmt
from loraplace.report.analysis import ArmResults, Group, build_arms, build_groups
from loraplace.report.context import Part, ReportContext
from loraplace.report.doc import Bullets, Figure, Heading, Para, Table
from loraplace.report.load import RunData, Study
from loraplace.report.stats import PairedComparison, kendall
from loraplace.tuning import Choice, arm_steps, choose, rung_steps


def tune_settings(study: Study) -> TuneSettings | None:
    """The study's ``tune`` settings, None when it tuned nothing."""
    raw = study.config.get("tune") or {}
    settings = TuneSettings.model_validate(raw) if raw else None
    return settings if settings is not None and settings.lr is not None and study.tuning else None


def study_choices(study: Study, settings: TuneSettings, steps: list[int]) -> list[Choice]:
    """Each arm's :class:`~loraplace.tuning.Choice` over the rungs ending at ``steps``, in the order the arms appear."""
    rows = [r.result for r in study.tuning]
    arms = list(dict.fromkeys(r.strategy for r in rows))
    return [choose(rows, arm, settings.rates(), steps, settings.eta) for arm in arms]


def tuned_study(study: Study, choices: list[Choice]) -> Study:
    """The study as if each arm had run at its chosen rate: its base row plus, per arm, the tuning
    runs at the chosen rate (which trained to the last step and hold test losses), as arm rows
    (their ``tune_lr`` kept); its importance and allocation files as they are (the automatic arms'
    placements do not depend on the rate)."""
    chosen = {c.arm: c.lr for c in choices if c.lr is not None}
    runs = [r for r in study.runs if r.result.kind == "base"]
    for run in study.tuning:
        if chosen.get(run.result.strategy) == run.result.tune_lr and run.result.eval_loss is not None:
            runs.append(replace(run, result=run.result.model_copy(update={"kind": "lora"})))
    return replace(study, runs=runs, tuning=[])


def at_tuned_rates(study: Study) -> Study | None:
    """:func:`tuned_study` at the rates the study's stored validation losses choose; None when the
    study tuned nothing."""
    settings = tune_settings(study)
    if settings is None:
        return None
    max_steps = int((study.config.get("train") or {}).get("max_steps", 0))
    steps = rung_steps(max_steps, len(settings.rates()), settings.eta, settings.schedule, settings.min_steps)
    return tuned_study(study, study_choices(study, settings, steps))


def verdict(c: PairedComparison | None) -> str:
    """``a better``, ``b better`` (Holm-adjusted p below the report's alpha) or ``n.s.``; ``-`` without a test."""
    if c is None:
        return "-"
    return ("a better" if c.diff < 0 else "b better") if c.significant() else "n.s."


def _pair(group: Group, a: str, b: str) -> PairedComparison | None:
    """The family's comparison of arms ``a`` and ``b``, oriented as a minus b."""
    family = group.family
    if (a, b) in family:
        return family[(a, b)]
    if (b, a) in family:
        return family[(b, a)].flipped()
    return None


def robustness(untuned: Group, tuned: Group) -> tuple[list[tuple[str, str, PairedComparison | None,
                                                                  PairedComparison | None]], float | None]:
    """Every pair of arms in both comparisons with its untuned and tuned comparison, and Kendall's
    tau between the two rankings by mean eval (test) loss."""
    keys = [a.key for a in tuned.lora_arms if any(u.key == a.key for u in untuned.lora_arms)]
    pairs = [(a, b, _pair(untuned, a, b), _pair(tuned, a, b)) for i, a in enumerate(keys) for b in keys[i + 1:]]
    mean = {}
    for group, name in ((untuned, "u"), (tuned, "t")):
        for arm in group.lora_arms:
            if arm.key in keys and arm.loss is not None:
                mean[(name, arm.key)] = arm.loss.mean
    ranked = [k for k in keys if ("u", k) in mean and ("t", k) in mean]
    tau = kendall([mean[("u", k)] for k in ranked], [mean[("t", k)] for k in ranked])
    return pairs, tau


def _flip(before: str, after: str) -> str:
    if before == after or "-" in (before, after):
        return ""
    if "n.s." in (before, after):
        return "lost" if after == "n.s." else "gained"
    return "**reversed**"


def _figure(study: Study, choices: list[Choice], out_dir: Path) -> Figure | None:
    """Validation loss against learning rate per arm (log x, chosen rate starred, test loss at it
    hollow), beside the rungs' validation curves (loss at each rung's last step)."""
    plt = figures.plt
    arms = [c for c in choices if c.validation]
    if not arms:
        return None
    with plt.rc_context(figures._STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(figures.WIDTH, 3.6), layout="constrained")
        for i, c in enumerate(arms):
            colour = figures.OKABE_ITO[i % len(figures.OKABE_ITO)]
            rates = sorted(c.validation)
            left.plot(rates, [c.validation[lr][1] for lr in rates], marker=figures.MARKERS[i % len(figures.MARKERS)],
                      color=colour, label=c.arm, markersize=4)
            if c.lr is not None:
                left.plot([c.lr], [c.validation[c.lr][1]], marker="*", color=colour, markersize=12, linestyle="none")
                tests = [r.result.eval_loss for r in study.tuning
                         if r.result.strategy == c.arm and r.result.tune_lr == c.lr and r.result.eval_loss is not None]
                if tests:
                    left.plot([c.lr], [sum(tests) / len(tests)], marker="o", markerfacecolor="none", color=colour,
                              markersize=7, linestyle="none")
            for lr in rates:
                curve = {}
                for r in study.tuning:
                    if r.result.strategy == c.arm and r.result.tune_lr == lr:
                        for step, loss in r.result.validation_losses.items():
                            curve.setdefault(int(step), []).append(loss)
                steps = sorted(curve)
                right.plot(steps, [sum(curve[s]) / len(curve[s]) for s in steps], color=colour, marker=".",
                           linewidth=2.0 if lr == c.lr else 0.8, alpha=1.0 if lr == c.lr else 0.5)
        left.set_xscale("log")
        left.set_xlabel("learning rate (log scale)")
        left.set_ylabel("validation loss (nats/token)")
        left.set_title("loss against learning rate")
        left.legend(frameon=False)
        right.set_xlabel("optimizer step (rung end)")
        right.set_ylabel("validation loss (nats/token)")
        right.set_title("rungs (thick: chosen rate)")
        name = "tuning" + (f"-{study.label}" if study.label else "")
        png, svg = figures._save(fig, out_dir, name)
    return Figure(name, "Left: mean validation loss over seeds against the learning rate, each rate at the last rung "
                  "it reached; the star marks the chosen rate, the hollow circle the test loss there. Right: the "
                  "validation loss at each rung's last step, per rate (thick: the chosen one).", png, svg)


def tuning_section(ctx: ReportContext) -> Part:
    """The learning-rate tuning of every study that tuned (nothing otherwise)."""
    part = Part([])
    for study in ctx.studies:
        settings = tune_settings(study)
        if settings is None:
            continue
        part += _study_part(ctx, study, settings)
    if part.blocks:
        part.blocks.insert(0, Heading(2, "Learning-rate tuning", "tuning"))
    return part


def _study_part(ctx: ReportContext, study: Study, settings: TuneSettings) -> Part:
    cfg = study.config
    data, train = cfg.get("data") or {}, cfg.get("train") or {}
    rates = settings.rates()
    max_steps = int(train.get("max_steps", 0))
    steps = rung_steps(max_steps, len(rates), settings.eta, settings.schedule, settings.min_steps)
    choices = study_choices(study, settings, steps)
    rows = [r.result for r in study.tuning]
    tuned_cost = arm_steps(rows)
    arm_runs = [r.result for r in study.untuned_runs]
    untuned_cost = sum(r.train_steps or 0 for r in arm_runs)
    seeds = len(cfg.get("seeds") or [0])
    grid_cost = len(choices) * len(rates) * seeds * max_steps
    where = f" ({study.label})" if len(ctx.studies) > 1 else ""
    schedule = (f"successive halving (keep the best ceil(n/{settings.eta}) by mean validation loss over seeds; "
                f"rungs end at steps {', '.join(map(str, steps))})" if settings.schedule == "halving"
                else "a full grid (every rate trained to the last step)")
    split_note = ", the untuned runs' eval split" if untuned_cost else ""
    part = Part([Para(
        f"**Setup{where}.** Every arm trained at each of {len(rates)} learning rates "
        f"({', '.join(f'{lr:g}' for lr in rates)}) by {schedule}. Each arm's rate is the one with the lowest mean "
        f"validation loss at the last step, on a validation split of {data.get('validation_size')} examples "
        f"held out of the training rows; the arm is then reported by its loss on the test split "
        f"({data.get('eval_size')} examples{split_note}), which no choice read. All seeds of an arm "
        f"train at the same rate. Cost: {tuned_cost:,} tuning arm-steps, {tuned_cost / grid_cost:.2f}x the "
        f"{grid_cost:,} of the full grid"
        + (f"; the untuned runs trained {untuned_cost:,} (the whole tuned study: "
           f"{(tuned_cost + untuned_cost) / untuned_cost:.1f}x the untuned one)" if untuned_cost else "") + ".")])
    untuned_means = _means(study.untuned_runs)
    table_rows, records = [], []
    for c in choices:
        test = [r.eval_loss for r in rows if r.strategy == c.arm and r.tune_lr == c.lr and r.eval_loss is not None]
        val = c.validation.get(c.lr, (None, None))[1] if c.lr is not None else None
        test_mean = sum(test) / len(test) if test else None
        table_rows.append([c.arm, ", ".join(f"{lr:g}" for lr in c.rates), f"{c.lr:g}" if c.lr is not None else "failed",
                           {"low": "lowest: widen the grid down", "high": "highest: widen the grid up"}.get(c.edge, ""),
                           fmt.num(val, 4), fmt.num(test_mean, 4), fmt.num(untuned_means.get(c.arm), 4)])
        records.append({"study": study.label, "arm": c.arm, "chosen_lr": c.lr, "edge": c.edge,
                        "validation_loss": val, "test_loss": test_mean, "untuned_test_loss": untuned_means.get(c.arm),
                        **{f"validation_loss_lr_{lr:g}": c.validation.get(lr, (None, None))[1] for lr in c.rates},
                        **{f"last_step_lr_{lr:g}": c.validation.get(lr, (None, None))[0] for lr in c.rates}})
    name = "tuning" + (f"-{study.label}" if len(ctx.studies) > 1 else "")
    base_lr = train.get("lr", 2e-4)
    headers = ["arm", "rates", "chosen", "edge of grid", "validation loss", "test loss", "untuned test loss"]
    untuned_text = f", and the untuned test loss (every arm at train.lr = {base_lr:g})"
    if not untuned_means:  # tune.untuned false: no arm trained at train.lr
        headers, table_rows, untuned_text = headers[:-1], [r[:-1] for r in table_rows], ""
    part.show(Table(name, f"Chosen learning rate per arm: the mean validation loss at it (last step), the mean test "
                    f"loss at it{untuned_text}. A rate at an end of the grid may not be the optimum.", headers,
                    table_rows, records, align="llllrrr"[:len(headers)]))
    edges = [c for c in choices if c.edge]
    if edges:
        part.blocks.append(Para("**Widen the grid:** " + "; ".join(
            f"`{c.arm}` chose the {c.edge}est rate ({c.lr:g})" for c in edges) + "."))
    figure = _figure(study, choices, ctx.fig_dir)
    if figure is not None:
        part.blocks.append(figure)
    part += _comparisons(ctx, study, choices)
    return part


def _means(runs: list[RunData]) -> dict[str, float]:
    losses: dict[str, list[float]] = {}
    for r in runs:
        if r.result.kind == "lora" and r.usable:
            losses.setdefault(r.result.strategy, []).append(r.result.eval_loss)
    return {k: sum(v) / len(v) for k, v in losses.items()}


def _group(study: Study, resamples: int) -> Group | None:
    arms: list[ArmResults] = build_arms([study])
    groups = build_groups([study], arms, resamples=resamples)
    return groups[0] if groups else None


def _tuned_order(tuned: Group) -> str:
    order = sorted(tuned.lora_arms, key=lambda arm: arm.loss.mean if arm.loss else math.inf)
    return "At tuned rates, by mean test loss: " + " < ".join(f"`{arm.key}` {fmt.num(arm.loss.mean, 4)}"
                                                              for arm in order if arm.loss) + "."


def _comparisons(ctx: ReportContext, study: Study, choices: list[Choice]) -> Part:
    """The pairwise comparisons at tuned rates and the robustness of the untuned verdicts."""
    part = Part([])
    tuned, untuned = _group(tuned_study(study, choices), ctx.resamples), _group(study.at_train_lr(), ctx.resamples)
    if tuned is None or len(tuned.lora_arms) < 2:
        part.blocks.append(Para("No paired comparison at tuned rates (fewer than two arms finished tuning)."))
        return part
    if untuned is None or not untuned.lora_arms:
        part.blocks.append(Bullets([
            _tuned_order(tuned),
            "No arm trained at train.lr (`tune.untuned: false`), so there is no robustness table of the untuned "
            "verdicts; every other section of this report reads each arm at its tuned rate (a resume with "
            "`tune.untuned=true` adds the untuned runs)."]))
        return part
    suffix = f"-{study.label}" if len(ctx.studies) > 1 else ""
    pairs, tau = robustness(untuned, tuned)
    rows, records = [], []
    for a, b, before, after in pairs:
        vb, va = verdict(before), verdict(after)
        rows.append([a, b, fmt.diff(before.diff) if before else "-", vb, fmt.diff(after.diff) if after else "-", va,
                     _flip(vb, va)])
        records.append({"a": a, "b": b, "untuned_diff": before.diff if before else None, "untuned_verdict": vb,
                        "untuned_p_holm": before.p_adjusted if before else None,
                        "tuned_diff": after.diff if after else None, "tuned_verdict": va,
                        "tuned_p_holm": after.p_adjusted if after else None, "flip": _flip(vb, va).strip("*") or None})
    flips = sum(1 for r in rows if r[-1])
    part.show(Table("robustness" + suffix, "Every verdict of the untuned comparison (each arm at train.lr) beside "
                    "the same pair at tuned rates: Δ = eval (test) loss of a minus b, paired bootstrap, Holm-adjusted "
                    "over each comparison's own family; flip: reversed (the other arm wins), lost (no longer "
                    "significant) or gained. Kendall's tau between the two rankings by mean test loss: "
                    f"{fmt.num(tau, 2) if tau is not None else 'n/a'}; {flips} of {len(rows)} verdicts change.",
                    ["a", "b", "Δ untuned", "untuned", "Δ tuned", "tuned", "flip"], rows, records, align="llrlrll"))
    part.blocks.append(Bullets([
        _tuned_order(tuned),
        f"Kendall's tau between the untuned and the tuned ranking: {fmt.num(tau, 2) if tau is not None else 'n/a'}; "
        f"{flips} of {len(rows)} pairwise verdicts change at tuned rates."]))
    return part
