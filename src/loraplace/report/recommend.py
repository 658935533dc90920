"""Recommendations computed from the data of one comparable group of arms. Each states the
numbers and uncertainty it rests on and says when the data cannot separate two options.

Significance follows the report's one rule (:func:`significance_rule`): within a group, every
pair of arms is one Holm-adjusted family and a difference is real when its adjusted p < 0.05;
the comparison tables show the same raw and adjusted p-values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraplace.report import fmt
from loraplace.report.analysis import ArmResults, Group
from loraplace.report.stats import ALPHA, fmt_p

SAME_SIZE = 0.01
"""Arms whose trainable parameters differ by less than this fraction count as the same size: two arms
matched to one budget differ by up to 1% (``loraplace.placement.budget``), so a smaller count within it
is not a cheaper option."""


def _cheaper(a: ArmResults, b: ArmResults) -> bool:
    """``a`` trains fewer parameters than ``b`` by more than :data:`SAME_SIZE`."""
    return a.trainable_params < (1 - SAME_SIZE) * b.trainable_params


@dataclass
class Recommendation:
    kind: str  # best | budget | knee | dominated | dominated_time | base
    title: str
    text: str  # Markdown inline: **bold** and `code` only
    numbers: dict[str, Any] = field(default_factory=dict)


def _loss(a: ArmResults) -> str:
    return fmt.interval(a.loss, sd=False)


def _arm(a: ArmResults) -> str:
    return f"**{a.key}** ({fmt.params(a.trainable_params)} trainable parameters)" if a.kind == "lora" else f"**{a.key}**"


def significance_rule(resamples: int | None = None) -> str:
    """The rule every verdict of the report follows, stated once (methods and recommendations)."""
    boot = f"paired bootstrap ({resamples:,} resamples)" if resamples else "paired bootstrap"
    return (f"A difference in eval loss counts as real when its Holm-adjusted p < {ALPHA:g}: within each group of "
            f"comparable arms, every pair of arms (the base model included) is compared by the {boot}, and the "
            "p-values of all those pairs are Holm-adjusted as one family; recommendations, table verdicts, dominance "
            "and the comparison with the base model all read that adjusted p (the tables show raw and adjusted p; the "
            "95% CIs are per comparison, unadjusted). Training-time differences follow the same rule over their own "
            "family: a Welch test over seeds for every pair of LoRA arms, Holm-adjusted. Otherwise the data cannot "
            "separate the two options, and more seeds or a larger eval set would be needed to tell them apart.")


def _separable(g: Group, a: ArmResults, b: ArmResults):
    """(comparison a-b, True/False/None: significant / not / untested), by the Holm-adjusted p
    of the group's family (:attr:`Group.family`)."""
    c = g.compare(a, b)
    return c, (None if c is None else c.significant())


def best_overall(g: Group) -> Recommendation | None:
    arms = g.lora_arms
    if not arms:
        return None
    best = min(arms, key=lambda a: a.loss.mean)
    quality = (f"perplexity {fmt.interval(best.perplexity, 2, sd=False)}" if best.perplexity is not None
               else f"accuracy {fmt.interval(best.accuracy, 3, sd=False)}")
    text = [f"{_arm(best)} has the lowest mean eval loss: {_loss(best)} nats/token, {quality}."]
    if best.n < 2:
        text.append("With one seed there is no seed-level confidence interval; the paired tests below "
                    "measure the uncertainty from the eval examples only.")
    ties, beaten, untested = [], [], []
    for other in arms:
        if other is best:
            continue
        c, sig = _separable(g, other, best)
        line = f"**{other.key}** {fmt.comparison(c)}"
        (untested if sig is None else beaten if sig else ties).append((other, line))
    if beaten:
        text.append("Significantly worse than it: " + "; ".join(line for _, line in beaten) + ".")
    if ties:
        text.append(f"The data cannot separate **{best.key}** from: " + "; ".join(line for _, line in ties) + ".")
        cheaper = [o for o, _ in ties if _cheaper(o, best)]
        cheapest = min(cheaper, key=lambda a: a.trainable_params) if cheaper else best
        if cheapest is not best:
            text.append(f"Among these statistically indistinguishable options **{cheapest.key}** is the cheapest "
                        f"({fmt.params(cheapest.trainable_params)} vs {fmt.params(best.trainable_params)} parameters, "
                        f"{100 * cheapest.trainable_params / best.trainable_params:.0f}%): prefer it when parameters "
                        "or adapter size matter.")
    if untested:
        text.append("Not tested (no paired per-example data): " + ", ".join(f"**{o.key}**" for o, _ in untested) + ".")
    return Recommendation("best", "Best strategy overall", " ".join(text), {
        "strategy": best.key, "eval_loss": best.loss.mean, "ci": [best.loss.low, best.loss.high], "n": best.n,
        "trainable_params": best.trainable_params, "indistinguishable": [o.key for o, _ in ties],
    })


def best_under_budget(g: Group, budget: int | None) -> Recommendation | None:
    arms = g.lora_arms
    if not arms:
        return None
    if budget is None:
        return Recommendation("budget", "Best under a parameter budget",
                              "No parameter budget was given; pass `--budget N` (trainable parameters) to "
                              "`loraplace report` for the best strategy within N.", {})
    fits = [a for a in arms if a.trainable_params <= budget]
    if not fits:
        cheapest = min(arms, key=lambda a: a.trainable_params)
        return Recommendation("budget", f"Best within {fmt.params(budget)} trainable parameters",
                              f"No strategy fits within {fmt.params(budget)} trainable parameters; the cheapest, "
                              f"{_arm(cheapest)}, needs {fmt.params(cheapest.trainable_params)}. Lower the rank "
                              "(`lora.r`) or adapt fewer roles or layers.",
                              {"budget": budget, "strategy": None})
    pick = min(fits, key=lambda a: a.loss.mean)
    best = min(arms, key=lambda a: a.loss.mean)
    text = [f"Within {fmt.params(budget)} trainable parameters the best is {_arm(pick)}: eval loss {_loss(pick)}."]
    if pick is best:
        text.append("It is also the best overall, so the budget costs nothing.")
    else:
        c, sig = _separable(g, pick, best)
        verdict = ("the data cannot separate the two, so within this data the budget costs no measurable loss"
                   if sig is False else "a significant loss from staying within budget" if sig else
                   "untested (no paired per-example data)")
        text.append(f"Against the best overall, {_arm(best)}, it is {fmt.comparison(c)}: {verdict}.")
    others = [a for a in fits if a is not pick]
    ties = [(a, c) for a in others if (c := g.compare(a, pick)) is not None and not c.significant()]
    if ties:
        text.append(f"Also within budget and not separable from **{pick.key}**: "
                    + "; ".join(f"**{a.key}** {fmt.comparison(c)}" for a, c in ties) + ".")
    return Recommendation("budget", f"Best within {fmt.params(budget)} trainable parameters", " ".join(text),
                          {"budget": budget, "strategy": pick.key, "eval_loss": pick.loss.mean,
                           "trainable_params": pick.trainable_params})


def knee_of_front(g: Group) -> Recommendation | None:
    front = g.front("params")
    if not front:
        return None
    names = ", ".join(f"**{p.key}** ({fmt.params(p.cost)}, {p.loss:.4f})" for p in front)
    k = g.knee("params")
    if k is None:
        reason = (f"the front has {len(front)} point{'s' if len(front) != 1 else ''}: a knee needs at least three"
                  if len(front) < 3 else "no front point lies below the line joining its ends")
        return Recommendation("knee", "Knee of the parameter–loss front",
                              f"No knee: {reason}. Front (parameters, mean eval loss): {names}.",
                              {"front": [p.key for p in front], "knee": None})
    cheap, dear = g.arm(front[0].key), g.arm(front[-1].key)
    knee_arm = g.arm(k.point.key)
    c_in, sig_in = _separable(g, knee_arm, cheap)
    c_out, sig_out = _separable(g, dear, knee_arm)
    text = (f"The knee of the front is {_arm(knee_arm)} with eval loss {_loss(knee_arm)} "
            f"(normalised distance {k.distance:.2f} below the chord of the front). "
            f"Going there from the cheapest front point **{cheap.key}** changes the loss by {fmt.comparison(c_in)}"
            f"{' (not separable)' if sig_in is False else ''}; going on to the best front point **{dear.key}** "
            f"({dear.trainable_params / max(knee_arm.trainable_params, 1):.1f}× the parameters) changes it by "
            f"{fmt.comparison(c_out)}{' (not separable)' if sig_out is False else ''}. Front: {names}.")
    return Recommendation("knee", "Knee of the parameter–loss front", text,
                          {"front": [p.key for p in front], "knee": knee_arm.key, "distance": k.distance})


def dominated(g: Group, cost: str) -> Recommendation | None:
    doms = g.dominated(cost)
    pts = g.points(cost)
    if not pts:
        return None
    what = "parameters" if cost == "params" else "training time"
    title = "Dominated strategies (trainable parameters vs eval loss)" if cost == "params" else \
        "Dominated strategies (training time vs eval loss)"
    if not doms:
        return Recommendation(f"dominated{'' if cost == 'params' else '_time'}", title,
                              f"No strategy is dominated on ({what}, eval loss): each is on the front.", {"dominated": {}})
    parts, no_verdict, order_of = [], [], {}
    for key, by in doms.items():
        a, b = g.arm(key), g.arm(by[0].key)
        c, sig = _separable(g, a, b)
        also = f" (also dominated by {', '.join('**' + q.key + '**' for q in by[1:])})" if len(by) > 1 else ""
        if cost == "params":
            cost_text = f"{fmt.params(b.trainable_params)} vs {fmt.params(a.trainable_params)} parameters"
        else:
            cost_text = (f"training time {fmt.interval(b.train_time, 1, sd=False)} s vs "
                         f"{fmt.interval(a.train_time, 1, sd=False)} s")
            order = g.order(a, b)
            order_of[key] = order.status
            if order.status == "fixed":
                first, second = (b, a) if order.first == b.key else (a, b)
                when = "in its only seed" if order.pairs == 1 else f"in every one of {order.pairs} seeds"
                no_verdict.append(key)
                parts.append(
                    f"**{key}** has a higher mean training time and a higher mean eval loss than **{b.key}**{also} "
                    f"({cost_text}; {fmt.comparison(c)} for **{key}**), but **{first.key}** ran before "
                    f"**{second.key}** {when}, so the time difference may be an order effect (warm-up, caches, "
                    "memory left by earlier runs): untested for order, no time-dominance verdict. Runs with several "
                    "seeds in rotated arm order test it.")
                continue
            tt = g.time_test(a, b)
            if tt is None:
                cost_text += " (one seed: the time difference is untested)"
            elif tt[1] >= ALPHA:
                cost_text += (f" (the time difference is within run-to-run variation: Welch p = {fmt_p(tt[0])}, "
                              f"Holm p = {fmt_p(tt[1])})")
            else:
                cost_text += f" (Welch p = {fmt_p(tt[0])}, Holm p = {fmt_p(tt[1])})"
            if order.status == "unknown":
                cost_text += ("; the run order was not recorded, so whether the time difference is an order effect "
                              "is unknown")
            else:
                cost_text += "; the arm order varied across seeds"
        same_size = cost == "params" and not _cheaper(b, a)
        verdict = ("the loss gap is significant" if sig else
                   f"the data cannot separate their losses and the two are the same size (within "
                   f"{100 * SAME_SIZE:g}%): a tie more than a dominance" if sig is False and same_size else
                   f"the data cannot separate their losses, but **{b.key}** is no worse and costs no more"
                   if sig is False else "the loss gap is untested (no paired per-example data)")
        parts.append(f"**{key}** is dominated by **{b.key}**{also}: {cost_text}, and {fmt.comparison(c)} "
                     f"for **{key}**; {verdict}.")
    if cost == "time":
        parts.append("Times are wall-clock on this machine and vary between runs; see their CIs.")
    numbers = {"dominated": {k: [p.key for p in v] for k, v in doms.items() if k not in no_verdict}}
    if cost == "time":
        numbers.update(untested_for_order=no_verdict, order=order_of)
    return Recommendation(f"dominated{'' if cost == 'params' else '_time'}", title, " ".join(parts), numbers)


def versus_base(g: Group) -> Recommendation | None:
    base = g.base_arm
    if base is None or not g.lora_arms:
        return None
    rows, worse, sig_worse = [], [], []
    for a in g.lora_arms:
        c, sig = _separable(g, a, base)
        rows.append(f"**{a.key}** {fmt.comparison(c)}")
        if sig is not True or (c is not None and c.diff >= 0):
            worse.append(a.key)
        if sig and c.diff > 0:
            sig_worse.append(a.key)
    text = (f"Against the base model without adapters (eval loss {fmt.num(base.loss.mean)}): " + "; ".join(rows) + ". ")
    text += ("Every strategy improves significantly on the base model." if not worse else
             "Not significantly better than the base model: " + ", ".join(f"**{k}**" for k in worse)
             + " (the training budget may be too small to tell strategies apart).")
    if sig_worse:
        text += " Significantly worse than the base model: " + ", ".join(f"**{k}**" for k in sig_worse) + "."
    flagged = [r.result.run_id for a in g.lora_arms for r in a.worse_than_base]
    if flagged:
        text += (" Runs that end worse than the base model (kept in the statistics, flagged in the tables): "
                 + ", ".join(f"`{k}`" for k in flagged) + ".")
    return Recommendation("base", "Adapters against the base model", text,
                          {"not_better": worse, "significantly_worse": sig_worse, "runs_worse_than_base": flagged})


def recommendations(g: Group, budget: int | None = None) -> list[Recommendation]:
    recs = [best_overall(g), best_under_budget(g, budget), knee_of_front(g), dominated(g, "params"),
            dominated(g, "time"), versus_base(g)]
    return [r for r in recs if r is not None]
