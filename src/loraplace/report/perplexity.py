"""Perplexity methodology check: the correct aggregation next to the common wrong ones, on the
same per-example data, so that a "perplexity higher than exp(loss)" observation can be traced to
the aggregation that produces it.

Correct: ``exp(sum_i nll_i / sum_i n_i)`` over the labelled (response) tokens, computed with
:func:`loraplace.metrics.perplexity`, the function the evaluation uses (plain arithmetic: the
report imports no torch). The wrong ones:

* mean over batches of ``exp(batch loss)``: exponentiating before averaging (Jensen: never lower);
* ``exp(mean over batches of batch losses)``: the mean of per-batch means weights small or
  short batches up;
* mean over examples of per-example perplexities (Jensen again, usually the largest);
* ``exp(mean over examples of per-example losses)``: example-weighted instead of token-weighted;
* including prompt tokens, including padding, or counting pads in the denominator: these need
  per-example fields that evaluation must record (see :data:`OPTIONAL_FIELDS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loraplace.metrics import perplexity

# Optional per-example keys of eval_examples.json used by the prompt/padding variants.
OPTIONAL_FIELDS = {
    "nll_sum_all_tokens": "summed NLL over every non-pad predicted token of the example (prompt + response)",
    "n_tokens_all": "number of those tokens",
    "n_pad": "pad positions of the example's row in its padded eval batch (positions a loss without "
             "a pad mask would also average over)",
    "nll_sum_pad": "summed NLL the model assigns at those pad positions (predicting the pad token)",
}
RELATIVE_TOLERANCE = 1e-3  # differences below 0.1% are treated as agreeing


@dataclass(frozen=True)
class Aggregation:
    key: str
    name: str
    formula: str
    value: float | None  # None: not computable from the stored data
    correct: bool = False
    note: str = ""

    def relative_to(self, correct: float) -> float | None:
        if self.value is None or not math.isfinite(self.value) or not math.isfinite(correct) or correct == 0:
            return None
        return self.value / correct - 1.0


def aggregations(examples: dict) -> list[Aggregation]:
    """Every aggregation computable from one run's ``eval_examples.json`` content.

    Args:
        examples: ``nll_sum``, ``n_tokens`` and ``batch`` lists (one entry per eval example),
            optionally the :data:`OPTIONAL_FIELDS`.
    """
    nll = np.asarray(examples["nll_sum"], dtype=float)
    tok = np.asarray(examples["n_tokens"], dtype=float)
    batch = np.asarray(examples.get("batch") or [0] * len(nll))
    keep = tok > 0  # examples whose response was truncated away carry no tokens
    correct = perplexity(float(nll.sum()), int(tok.sum()))
    out = [Aggregation("token_weighted", "exp(token-weighted mean NLL)  [correct]", "exp(Σᵢ nllᵢ / Σᵢ nᵢ)",
                       correct, correct=True, note="what loraplace reports")]
    batch_losses = np.array([nll[batch == b].sum() / tok[batch == b].sum()
                             for b in np.unique(batch) if tok[batch == b].sum() > 0])
    out.append(Aggregation("mean_batch_exp", "mean of per-batch exp(loss)", "mean_b exp(L_b)",
                           float(np.mean([perplexity(x) for x in batch_losses])),
                           note="exponentiates before averaging; ≥ exp(mean_b L_b) by Jensen's inequality"))
    out.append(Aggregation("exp_mean_batch", "exp(mean of per-batch losses)", "exp(mean_b L_b)",
                           perplexity(float(batch_losses.mean())),
                           note="mean of per-batch means: weights batches equally, not tokens"))
    ex_losses = nll[keep] / tok[keep]
    out.append(Aggregation("mean_example_ppl", "mean of per-example perplexities", "mean_i exp(nllᵢ / nᵢ)",
                           float(np.mean([perplexity(x) for x in ex_losses])),
                           note="exponentiates before averaging; short, hard examples dominate"))
    out.append(Aggregation("exp_mean_example", "exp(mean of per-example losses)", "exp(mean_i nllᵢ / nᵢ)",
                           perplexity(float(ex_losses.mean())), note="weights examples equally, not tokens"))

    if "nll_sum_all_tokens" in examples and "n_tokens_all" in examples:
        all_nll = float(np.sum(examples["nll_sum_all_tokens"]))
        all_tok = int(np.sum(examples["n_tokens_all"]))
        out.append(Aggregation("with_prompt", "loss including prompt tokens", "exp(Σ nll_all / Σ n_all)",
                               perplexity(all_nll, all_tok), note="scores the prompt too"))
    else:
        out.append(Aggregation("with_prompt", "loss including prompt tokens", "exp(Σ nll_all / Σ n_all)", None,
                               note="not recorded: eval_examples.json lacks nll_sum_all_tokens / n_tokens_all"))
    if "n_pad" in examples:
        n_pad = int(np.sum(examples["n_pad"]))
        if "nll_sum_pad" in examples:
            value = perplexity(float(nll.sum() + np.sum(examples["nll_sum_pad"])), int(tok.sum()) + n_pad)
            out.append(Aggregation("with_padding", "loss including padding tokens", "exp((Σ nll + Σ nll_pad) / (Σ n + Σ n_pad))",
                                   value, note="no pad mask: pad predictions enter the mean"))
        else:
            out.append(Aggregation("with_padding", "loss including padding tokens", "exp((Σ nll + Σ nll_pad) / (Σ n + Σ n_pad))",
                                   None, note="not recorded: eval_examples.json lacks nll_sum_pad"))
        out.append(Aggregation("pad_denominator", "pads counted in the token count", "exp(Σ nll / (Σ n + Σ n_pad))",
                               perplexity(float(nll.sum()), int(tok.sum()) + n_pad),
                               note="masked loss divided by all positions: too low"))
    else:
        out.append(Aggregation("with_padding", "loss including padding tokens", "exp((Σ nll + Σ nll_pad) / (Σ n + Σ n_pad))",
                               None, note="not recorded: eval_examples.json lacks n_pad / nll_sum_pad"))
    return out


@dataclass(frozen=True)
class Diagnosis:
    correct: float
    higher: list[tuple[Aggregation, float]]  # (aggregation, relative difference) above exp(loss)
    lower: list[tuple[Aggregation, float]]
    agree: list[Aggregation]
    missing: list[Aggregation]
    largest: tuple[Aggregation, float] | None
    values: dict[str, float | None]


def diagnose(aggs: list[Aggregation], tolerance: float = RELATIVE_TOLERANCE) -> Diagnosis:
    correct = next(a for a in aggs if a.correct).value
    higher, lower, agree, missing = [], [], [], []
    for a in aggs:
        if a.correct:
            continue
        rel = a.relative_to(correct)
        if a.value is None:
            missing.append(a)
        elif rel is None:
            higher.append((a, math.inf)) if a.value > correct else lower.append((a, -math.inf))
        elif rel > tolerance:
            higher.append((a, rel))
        elif rel < -tolerance:
            lower.append((a, rel))
        else:
            agree.append(a)
    higher.sort(key=lambda t: -t[1])
    everything = higher + lower
    largest = max(everything, key=lambda t: abs(t[1])) if everything else None
    return Diagnosis(correct, higher, lower, agree, missing, largest, {a.key: a.value for a in aggs})


def explain(d: Diagnosis) -> str:
    """One paragraph (Markdown inline) naming which aggregation produces which mismatch."""
    parts = [f"The correct perplexity is exp(token-weighted mean NLL) = {d.correct:.4g}."]
    if d.higher:
        names = "; ".join(f"**{a.name}** ({rel:+.2%})" for a, rel in d.higher)
        parts.append(f"Aggregations that give a perplexity higher than exp(loss) on this run: {names}. "
                     f"A \"perplexity higher than exp(loss)\" observation is explained by "
                     f"**{d.higher[0][0].name}** (the largest excess here)"
                     + (", or by the others listed" if len(d.higher) > 1 else "") + ".")
    else:
        parts.append(f"No aggregation computable here exceeds exp(loss) by more than {RELATIVE_TOLERANCE:.1%}.")
    pairs = [("mean_batch_exp", "exp_mean_batch", "per-batch"), ("mean_example_ppl", "exp_mean_example", "per-example")]
    jensen = []
    for ppl_key, loss_key, what in pairs:
        ppl, loss = d.values.get(ppl_key), d.values.get(loss_key)
        if ppl is not None and loss is not None and math.isfinite(ppl) and math.isfinite(loss) and loss > 0:
            jensen.append(f"with {what} averaging, perplexity = mean of exp is {ppl / loss - 1:+.2%} above "
                          f"exp(mean {what} loss)")
    if jensen:
        parts.append("If the loss shown beside the perplexity was averaged the same way (as a trainer's per-batch "
                     "eval loss is), the gap between them is Jensen's inequality: " + "; ".join(jensen) + ".")
    if d.lower:
        parts.append("Lower than the correct value: " + "; ".join(f"**{a.name}** ({rel:+.2%})" for a, rel in d.lower) + ".")
    if d.agree:
        parts.append("Within 0.1% of the correct value here (the mistake is invisible on this run): "
                     + ", ".join(a.name for a in d.agree) + ".")
    if d.missing:
        parts.append("Not computable from the stored data: " + "; ".join(f"{a.name} ({a.note})" for a in d.missing) + ".")
    return " ".join(parts)
