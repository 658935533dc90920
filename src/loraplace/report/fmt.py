"""Number formatting: the one formatter of numbers in tables (the report's, ``results.md``,
the command line's), recommendations and figures. Light (no numpy/scipy at import), since the
study store formats ``results.md`` after every run."""

from __future__ import annotations

import math

from loraplace.report.stats import Interval, PairedComparison, fmt_p


def num(v: float | int | None, digits: int = 4, signed: bool = False) -> str:
    """``"-"`` for None, ``1,234`` for an int, ``0.1235`` (``digits`` decimals; ``+0.1235`` with
    ``signed``) for a float; nan and inf as such."""
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    if math.isnan(v) or math.isinf(v):
        return str(v)
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def diff(v: float | None) -> str:
    """A signed difference with three significant digits (differences are often tiny)."""
    if v is None:
        return "-"
    return f"{v:+.3g}"


def params(n: int | float | None) -> str:
    return "-" if n is None else f"{int(n):,}"


def compact(n: float) -> str:
    """1234567 -> 1.23M (axis labels and prose)."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def interval(iv: Interval | None, digits: int = 4, sd: bool = True) -> str:
    """``10.7615 ± 0.0007 (95% CI [10.7598, 10.7632], n=3)``; a single seed says that its CI is
    undefined rather than showing one."""
    if iv is None:
        return "-"
    if not iv.defined:
        return f"{iv.mean:.{digits}f} (n={iv.n}: no CI)"
    spread = f" ± {iv.sd:.{digits}f}" if sd else ""
    return f"{iv.mean:.{digits}f}{spread} ({iv.confidence:.0%} CI [{iv.low:.{digits}f}, {iv.high:.{digits}f}], n={iv.n})"


def ci_only(iv: Interval | None, digits: int = 4) -> str:
    if iv is None:
        return "-"
    if not iv.defined:
        return "undefined (n=1)" if iv.n == 1 else "-"
    return f"[{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def p_holm(c: PairedComparison) -> str:
    """The Holm-adjusted p of a comparison for display: a bound when the raw p is one."""

    if c.p_adjusted is None:
        return "-"
    text = fmt_p(c.p_adjusted)
    if fmt_p(c.p_value, c.resamples).startswith("<") and c.p_adjusted < 1:  # the raw p is only a bound
        text = "<" + text
    return text


def comparison(c: PairedComparison | None) -> str:
    """``Δ +0.0021 nats/token (95% CI [+0.0012, +0.003], p = 0.001, Holm p = 0.003)``: the raw p
    and, when the comparison belongs to an adjusted family, the Holm-adjusted p verdicts read."""
    if c is None:
        return "no paired per-example data"

    def eq(text: str) -> str:
        return text if text.startswith("<") else f"= {text}"

    holm = f", Holm p {eq(p_holm(c))}" if c.p_adjusted is not None else ""
    return (f"Δ {diff(c.diff)} nats/token ({c.confidence:.0%} CI [{diff(c.low)}, {diff(c.high)}], "
            f"p {eq(fmt_p(c.p_value, c.resamples))}{holm})")
