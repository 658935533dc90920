"""Recommendations computed from the data of one comparable group of arms. Each states the
numbers and uncertainty it rests on and says when the data cannot separate two options.

Significance in recommendations is the pairwise paired bootstrap at 5% (unadjusted; the
comparison table against the reference also shows Holm-adjusted p-values)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraplace.report import fmt
from loraplace.report.analysis import Arm, Group
from loraplace.report.stats import ALPHA, fmt_p, welch_p


@dataclass
class Recommendation:
    kind: str  # best | budget | knee | dominated | dominated_time | base
    title: str
    text: str  # Markdown inline: **bold** and `code` only
    numbers: dict[str, Any] = field(default_factory=dict)


def _loss(a: Arm) -> str:
    return fmt.interval(a.loss, sd=False)


def _arm(a: Arm) -> str:
    return f"**{a.key}** ({fmt.params(a.trainable_params)} trainable parameters)" if a.kind == "lora" else f"**{a.key}**"


def _separable(g: Group, a: Arm, b: Arm):
    """(comparison a-b, True/False/None: significant / not / untested)."""
    c = g.compare(a, b)
    return c, (None if c is None else c.p_value < ALPHA)


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
        cheapest = min([best] + [o for o, _ in ties], key=lambda a: a.trainable_params)
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
    ties = [(a, c) for a in others if (c := g.compare(a, pick)) is not None and c.p_value >= ALPHA]
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
    title = f"Dominated strategies (trainable parameters vs eval loss)" if cost == "params" else \
        "Dominated strategies (training time vs eval loss)"
    if not doms:
        return Recommendation(f"dominated{'' if cost == 'params' else '_time'}", title,
                              f"No strategy is dominated on ({what}, eval loss): each is on the front.", {"dominated": {}})
    parts = []
    for key, by in doms.items():
        a, b = g.arm(key), g.arm(by[0].key)
        c, sig = _separable(g, a, b)
        if cost == "params":
            cost_text = f"{fmt.params(b.trainable_params)} vs {fmt.params(a.trainable_params)} parameters"
        else:
            cost_text = (f"training time {fmt.interval(b.train_time, 1, sd=False)} s vs "
                         f"{fmt.interval(a.train_time, 1, sd=False)} s")
            p_time = welch_p([r.result.train_time_s for r in b.runs], [r.result.train_time_s for r in a.runs])
            if p_time is None:
                cost_text += " (one seed: the time difference is untested)"
            elif p_time >= ALPHA:
                cost_text += f" (the time difference is within run-to-run variation: Welch p = {p_time:.2f})"
            else:
                cost_text += f" (Welch p = {fmt_p(p_time)})"
        verdict = ("the loss gap is significant" if sig else
                   f"the data cannot separate their losses, but **{b.key}** is no worse and costs no more"
                   if sig is False else "the loss gap is untested (no paired per-example data)")
        also = f" (also dominated by {', '.join('**' + q.key + '**' for q in by[1:])})" if len(by) > 1 else ""
        parts.append(f"**{key}** is dominated by **{b.key}**{also}: {cost_text}, and {fmt.comparison(c)} "
                     f"for **{key}**; {verdict}.")
    if cost == "time":
        parts.append("Times are wall-clock on this machine and vary between runs; see their CIs.")
    return Recommendation(f"dominated{'' if cost == 'params' else '_time'}", title, " ".join(parts),
                          {"dominated": {k: [p.key for p in v] for k, v in doms.items()}})


def versus_base(g: Group) -> Recommendation | None:
    base = g.base_arm
    if base is None or not g.lora_arms:
        return None
    rows, worse = [], []
    for a in g.lora_arms:
        c, sig = _separable(g, a, base)
        rows.append(f"**{a.key}** {fmt.comparison(c)}")
        if sig is not True or (c is not None and c.diff >= 0):
            worse.append(a.key)
    text = (f"Against the base model without adapters (eval loss {fmt.num(base.loss.mean)}): " + "; ".join(rows) + ". ")
    text += ("Every strategy improves significantly on the base model." if not worse else
             "Not significantly better than the base model: " + ", ".join(f"**{k}**" for k in worse)
             + " (the training budget may be too small to tell strategies apart).")
    return Recommendation("base", "Adapters against the base model", text, {"not_better": worse})


def recommendations(g: Group, budget: int | None = None) -> list[Recommendation]:
    recs = [best_overall(g), best_under_budget(g, budget), knee_of_front(g), dominated(g, "params"),
            dominated(g, "time"), versus_base(g)]
    return [r for r in recs if r is not None]
