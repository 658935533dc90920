"""Statistics behind the report: seed-level t confidence intervals, and paired bootstrap
comparisons of two arms on the shared eval set (over eval examples, and over seeds when there
are several), Welch and Holm p-values, and Spearman rank correlations.

Conventions:

* Eval loss of one run is the token-weighted mean NLL ``L = sum_i nll_i / sum_i n_i`` (see
  :mod:`loraplace.run.evaluation`). A difference between arms is ``L_a - L_b`` (negative: ``a`` is
  better).
* With one seed a seed-level confidence interval is undefined: :func:`t_interval` returns
  ``None`` bounds for ``n < 2`` instead of inventing one.
* The paired bootstrap resamples eval examples with replacement (the same examples for both
  arms and all seeds: the pairing), and, when several seeds are paired, seeds with replacement
  too (a two-level bootstrap). Its CI is the percentile interval; its p-value is two-sided,
  from the bootstrap distribution shifted to the null (``|d* - d| >= |d|``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE
DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and a two-sided t confidence interval of ``n`` values.

    ``sd``, ``low`` and ``high`` are None when ``n < 2`` (undefined, not zero).
    """

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2

    @property
    def defined(self) -> bool:
        return self.low is not None


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and t-distribution CI (``mean +- t_{1-a/2, n-1} * sd / sqrt(n)``) of the values."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    n = int(x.size)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if n < 2:
        return Interval(n=n, mean=mean, sd=None, low=None, high=None, confidence=confidence)
    sd = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, df=n - 1)) * sd / math.sqrt(n)
    return Interval(n=n, mean=mean, sd=sd, low=mean - half, high=mean + half, confidence=confidence)


@dataclass(frozen=True)
class PairedComparison:
    """``a`` minus ``b`` in eval loss (nats/token), paired on the shared eval set.

    Attributes:
        diff: point estimate, the mean over paired seeds of ``L_a,s - L_b,s``.
        low, high: percentile bootstrap CI of ``diff``.
        p_value: two-sided bootstrap p-value of ``diff == 0``.
        seeds: the paired seeds; examples: eval examples per run; resamples: bootstrap draws.
        per_seed: ``L_a,s - L_b,s`` for each paired seed.
    """

    a: str
    b: str
    diff: float
    low: float
    high: float
    p_value: float
    seeds: tuple[int, ...]
    examples: int
    resamples: int
    per_seed: tuple[float, ...] = field(default=())
    confidence: float = CONFIDENCE
    p_adjusted: float | None = None  # Holm-adjusted over the family it was tested in
    family_size: int | None = None  # how many comparisons that family holds

    def significant(self, alpha: float = ALPHA) -> bool:
        """The report's one rule: the Holm-adjusted p (when adjusted) below ``alpha``."""
        p = self.p_adjusted if self.p_adjusted is not None else self.p_value
        return p < alpha

    def flipped(self) -> "PairedComparison":
        """The same comparison read the other way round (``b - a``): the bootstrap distribution
        of ``b - a`` is that of ``a - b`` negated, so p-values are unchanged."""
        return PairedComparison(
            a=self.b, b=self.a, diff=-self.diff, low=-self.high, high=-self.low, p_value=self.p_value,
            seeds=self.seeds, examples=self.examples, resamples=self.resamples,
            per_seed=tuple(-v for v in self.per_seed), confidence=self.confidence, p_adjusted=self.p_adjusted,
            family_size=self.family_size)


def _as_matrix(values) -> np.ndarray:
    m = np.asarray(values, dtype=float)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2:
        raise ValueError("per-example values must be (examples,) or (seeds, examples)")
    return m


_DRAWS: dict[tuple[int, int, int], tuple[np.ndarray, dict]] = {}


def _example_draws(seed: int, n_ex: int, resamples: int) -> tuple[np.ndarray, np.random.Generator]:
    """``counts[b, i]``: how often example i is drawn in resample b (sums are then matrix
    products), and the generator as it stands after drawing them. A report compares every pair
    of arms on the same eval set with the same seed, so the (costly) draws are kept for the
    last few shapes; the result is identical to drawing them anew."""
    key = (seed, n_ex, resamples)
    if key not in _DRAWS:
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(n_ex, np.full(n_ex, 1.0 / n_ex), size=resamples).astype(float)  # (B, N)
        counts.setflags(write=False)
        while len(_DRAWS) >= 2:
            _DRAWS.pop(next(iter(_DRAWS)))
        _DRAWS[key] = (counts, rng.bit_generator.state)
    counts, state = _DRAWS[key]
    rng = np.random.default_rng(seed)
    rng.bit_generator.state = state
    return counts, rng


def paired_bootstrap(nll_a, tok_a, nll_b, tok_b, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE, resample_seeds: bool = True,
                     labels: tuple[str, str] = ("a", "b"), seed_ids: Sequence[int] | None = None
                     ) -> PairedComparison:
    """Paired bootstrap of the eval-loss difference ``L_a - L_b``.

    Args:
        nll_a, tok_a, nll_b, tok_b: per-example summed NLL and labelled-token counts, shape
            ``(examples,)`` for one seed or ``(seeds, examples)`` with row ``s`` of ``a`` paired
            with row ``s`` of ``b`` (same seed: same data order and adapter init).
        resamples: bootstrap draws.
        seed: RNG seed (the report is reproducible).
        resample_seeds: with several seeds, also resample seeds (two-level bootstrap).

    Each draw picks examples with replacement (the same indices for both arms and all seeds),
    recomputes the token-weighted losses ``L = sum nll / sum n`` per seed, and averages the
    per-seed differences over (resampled) seeds.
    """
    na, ta, nb, tb = (_as_matrix(v) for v in (nll_a, tok_a, nll_b, tok_b))
    if not (na.shape == ta.shape == nb.shape == tb.shape):
        raise ValueError(f"paired arrays differ in shape: {na.shape}, {ta.shape}, {nb.shape}, {tb.shape}")
    n_seeds, n_ex = na.shape
    if n_ex < 2:
        raise ValueError("a paired bootstrap needs at least two eval examples")
    per_seed = na.sum(1) / ta.sum(1) - nb.sum(1) / tb.sum(1)  # (S,)
    diff = float(per_seed.mean())

    counts, rng = _example_draws(seed, n_ex, resamples)
    loss_a = (counts @ na.T) / (counts @ ta.T)  # (B, S)
    loss_b = (counts @ nb.T) / (counts @ tb.T)
    d = loss_a - loss_b  # (B, S)
    if n_seeds > 1 and resample_seeds:
        seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=resamples)  # (B, S)
        boot = (d * seed_counts).sum(1) / n_seeds
    else:
        boot = d.mean(1)
    tail = (1.0 - confidence) / 2
    low, high = (float(v) for v in np.quantile(boot, [tail, 1.0 - tail]))
    p = float((1 + np.count_nonzero(np.abs(boot - diff) >= abs(diff))) / (resamples + 1))
    return PairedComparison(
        a=labels[0], b=labels[1], diff=diff, low=low, high=high, p_value=min(1.0, p),
        seeds=tuple(seed_ids) if seed_ids is not None else tuple(range(n_seeds)), examples=n_ex,
        resamples=resamples, per_seed=tuple(float(v) for v in per_seed), confidence=confidence,
    )


def welch_p(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Two-sided Welch t-test p-value of two independent samples (None below two values each)."""
    x = [v for v in a if v is not None]
    y = [v for v in b if v is not None]
    if len(x) < 2 or len(y) < 2:
        return None
    p = float(sps.ttest_ind(x, y, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """Spearman rank correlation ``(rho, two-sided p)``; None for fewer than three pairs or a
    constant side (undefined)."""
    if len(x) < 3:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.spearmanr(x, y)
    rho, p = float(res.statistic), float(res.pvalue)
    return (rho, p) if math.isfinite(rho) else (None, None)


def kendall(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b between two scorings of the same items (scipy's); None for fewer than two
    items or a constant side (undefined)."""
    if len(x) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tau = float(sps.kendalltau(x, y).statistic)
    return tau if math.isfinite(tau) else None


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def fmt_p(p: float | None, resamples: int | None = None) -> str:
    """``p`` for a table; bootstrap p-values below ``1/(B+1)`` cannot be resolved."""
    if p is None:
        return "-"
    if resamples is not None and p <= 1.0 / (resamples + 1) + 1e-15:
        return f"<{1.0 / resamples:.0e}".replace("e-0", "e-")
    if p < 0.001:
        return f"{p:.1e}"
    return f"{p:.3f}"
