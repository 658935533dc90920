"""The report's statistics against scipy and closed forms on known data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from loraplace.metrics import perplexity
from loraplace.report.pareto import Point, dominators, knee, pareto_front
from loraplace.report.perplexity import aggregations, diagnose, explain
from loraplace.report.stats import fmt_p, holm, paired_bootstrap, t_interval, welch_p


# ------------------------------------------------------------------------------------ t interval
def test_t_interval_known_values():
    iv = t_interval([1.0, 2.0, 3.0])
    assert iv.n == 3 and iv.mean == 2.0 and iv.sd == pytest.approx(1.0)
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2}
    assert (iv.low, iv.high) == pytest.approx((2.0 - half, 2.0 + half))


@pytest.mark.parametrize("values", [[10.76, 10.759, 10.761, 10.7605], [0.5, 1.5], list(np.linspace(1, 2, 17))])
def test_t_interval_matches_scipy(values):
    iv = t_interval(values)
    low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert (iv.low, iv.high) == pytest.approx((low, high), rel=1e-12)
    assert iv.sd == pytest.approx(np.std(values, ddof=1))


def test_t_interval_one_value_is_undefined_not_zero():
    iv = t_interval([3.2])
    assert iv.mean == 3.2 and iv.sd is None and iv.low is None and iv.high is None
    assert not iv.defined and iv.half_width is None


# ------------------------------------------------------------------------------ paired bootstrap
def _paired_data(n=400, effect=0.05, seed=3, noise=0.2):
    rng = np.random.default_rng(seed)
    tok = rng.integers(5, 60, size=n).astype(float)
    difficulty = rng.normal(2.0, 0.5, size=n)
    a = (difficulty + effect + rng.normal(0, noise, n)) * tok
    b = (difficulty + rng.normal(0, noise, n)) * tok
    return a, tok, b, tok


def test_point_estimate_is_difference_of_token_weighted_losses():
    a, ta, b, tb = _paired_data()
    c = paired_bootstrap(a, ta, b, tb, resamples=200)
    assert c.diff == pytest.approx(a.sum() / ta.sum() - b.sum() / tb.sum(), rel=1e-12)
    assert c.seeds == (0,) and c.examples == 400


def test_bootstrap_ci_matches_scipy_paired_percentile_bootstrap():
    a, ta, b, tb = _paired_data(n=300)

    def stat(na, nta, nb, ntb, axis=-1):
        return na.sum(axis) / nta.sum(axis) - nb.sum(axis) / ntb.sum(axis)

    ref = sps.bootstrap((a, ta, b, tb), stat, paired=True, vectorized=True, n_resamples=20_000,
                        method="percentile", confidence_level=0.95, random_state=np.random.default_rng(7))
    ours = paired_bootstrap(a, ta, b, tb, resamples=20_000, seed=11)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    # Monte Carlo error of a percentile at 20k draws is well under 5% of the width
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.05 * width)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.05 * width)


def test_bootstrap_ci_matches_closed_form_for_a_mean():
    # equal token counts: the statistic is the mean of per-example differences, whose bootstrap
    # sd is sd/sqrt(n) * sqrt((n-1)/n); for n=2000 the percentile CI is close to the normal one.
    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 1.0, size=2000)
    ones = np.ones_like(d)
    c = paired_bootstrap(d, ones, np.zeros_like(d), ones, resamples=20_000, seed=1)
    se = d.std(ddof=0) / math.sqrt(d.size)
    assert c.low == pytest.approx(d.mean() - 1.959964 * se, abs=0.08 * se)
    assert c.high == pytest.approx(d.mean() + 1.959964 * se, abs=0.08 * se)


@pytest.mark.parametrize("effect", [0.0, 0.02, 0.04])
def test_bootstrap_p_value_agrees_with_paired_t_test(effect):
    # Equal token counts, normal differences, n=400: the bootstrap p approximates ttest_rel's.
    rng = np.random.default_rng(5)
    base = rng.normal(2.0, 0.5, 400)
    a = base + effect + rng.normal(0, 0.25, 400)
    b = base + rng.normal(0, 0.25, 400)
    ones = np.ones(400)
    c = paired_bootstrap(a, ones, b, ones, resamples=20_000, seed=2)
    p_t = sps.ttest_rel(a, b).pvalue
    assert c.p_value == pytest.approx(p_t, abs=0.02 + 0.15 * p_t)


def test_identical_arms_give_zero_difference_and_p_one():
    a, ta, _, _ = _paired_data()
    c = paired_bootstrap(a, ta, a, ta, resamples=500)
    assert c.diff == 0.0 and c.low == 0.0 and c.high == 0.0 and c.p_value == 1.0
    assert not c.significant()


def test_large_effect_is_significant_and_p_is_bounded_by_resamples():
    a, ta, b, tb = _paired_data(effect=0.5)
    c = paired_bootstrap(a, ta, b, tb, resamples=1000)
    assert c.low > 0 and c.significant()
    assert c.p_value == pytest.approx(1 / 1001)
    assert fmt_p(c.p_value, c.resamples) == "<1e-3"


def test_pairing_matters_versus_unpaired_noise():
    # Shared example difficulty is removed by pairing: the paired CI is much narrower than the
    # spread of either arm's loss alone.
    a, ta, b, tb = _paired_data(effect=0.02, noise=0.05)
    c = paired_bootstrap(a, ta, b, tb, resamples=2000)
    solo = paired_bootstrap(a, ta, np.zeros_like(b), tb, resamples=2000)  # L_a - 0: a's own spread
    assert (c.high - c.low) < 0.5 * (solo.high - solo.low)


def test_several_seeds_average_per_seed_differences_and_widen_with_seed_spread():
    rng = np.random.default_rng(4)
    n, seeds = 200, 3
    tok = np.tile(rng.integers(5, 30, size=n).astype(float), (seeds, 1))
    diff = rng.normal(2.0, 0.5, n)
    b = (diff + rng.normal(0, 0.1, (seeds, n))) * tok
    offsets = np.array([[0.0], [0.05], [0.10]])  # seeds disagree on the effect
    a = (diff + 0.05 + offsets + rng.normal(0, 0.1, (seeds, n))) * tok
    c = paired_bootstrap(a, tok, b, tok, resamples=4000, seed_ids=[0, 1, 2])
    per_seed = a.sum(1) / tok.sum(1) - b.sum(1) / tok.sum(1)
    assert c.diff == pytest.approx(per_seed.mean())
    assert c.per_seed == pytest.approx(tuple(per_seed))
    assert c.seeds == (0, 1, 2)
    only_examples = paired_bootstrap(a, tok, b, tok, resamples=4000, resample_seeds=False)
    assert (c.high - c.low) > 2 * (only_examples.high - only_examples.low)
    assert c.low <= c.diff <= c.high


def test_bootstrap_is_reproducible_and_checks_shapes():
    a, ta, b, tb = _paired_data(n=50)
    assert paired_bootstrap(a, ta, b, tb, resamples=300) == paired_bootstrap(a, ta, b, tb, resamples=300)
    with pytest.raises(ValueError):
        paired_bootstrap(a, ta, b[:10], tb[:10])


# ------------------------------------------------------------------------------- Holm and Welch
def test_holm_known_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([0.001]) == pytest.approx([0.001])


def test_welch_matches_scipy_and_needs_two_values():
    x, y = [5.1, 5.3, 4.9, 5.0], [6.0, 6.4, 5.8]
    assert welch_p(x, y) == pytest.approx(sps.ttest_ind(x, y, equal_var=False).pvalue)
    assert welch_p([1.0], y) is None


# ---------------------------------------------------------------------------------------- Pareto
def test_pareto_front_dominators_and_knee():
    pts = [Point("a", 10, 3.0), Point("b", 20, 2.0), Point("c", 40, 1.9), Point("d", 30, 2.5),
           Point("e", 80, 1.85)]
    assert [p.key for p in pareto_front(pts)] == ["a", "b", "c", "e"]
    doms = dominators(pts)
    assert list(doms) == ["d"] and [p.key for p in doms["d"]] == ["b"]
    doms = dominators(pts + [Point("f", 5, 2.4)])
    assert [p.key for p in doms["d"]] == ["b", "f"]  # lowest loss first
    k = knee(pareto_front(pts))
    assert k is not None and k.point.key == "b"


def test_knee_needs_three_points_and_a_convex_bend():
    assert knee([Point("a", 1, 2.0), Point("b", 10, 1.0)]) is None
    # concave front (gains grow with cost): no point below the chord
    assert knee([Point("a", 1, 3.0), Point("b", 10, 2.9), Point("c", 100, 1.0)]) is None


def test_equal_points_do_not_dominate_each_other():
    pts = [Point("a", 10, 2.0), Point("b", 10, 2.0)]
    assert dominators(pts) == {} and len(pareto_front(pts)) == 2


# ------------------------------------------------------------------------------ perplexity check
def test_perplexity_aggregations_by_hand():
    ex = {"nll_sum": [2.0, 9.0, 1.0], "n_tokens": [1, 3, 2], "batch": [0, 0, 1]}
    values = {a.key: a.value for a in aggregations(ex)}
    assert values["token_weighted"] == pytest.approx(perplexity(12.0, 6)) == pytest.approx(math.exp(2.0))
    # batch 0: 11/4, batch 1: 1/2
    assert values["mean_batch_exp"] == pytest.approx((math.exp(11 / 4) + math.exp(0.5)) / 2)
    assert values["exp_mean_batch"] == pytest.approx(math.exp((11 / 4 + 0.5) / 2))
    assert values["mean_example_ppl"] == pytest.approx((math.exp(2) + math.exp(3) + math.exp(0.5)) / 3)
    assert values["exp_mean_example"] == pytest.approx(math.exp((2 + 3 + 0.5) / 3))
    assert values["with_prompt"] is None and values["with_padding"] is None


def test_perplexity_optional_fields():
    ex = {"nll_sum": [2.0, 4.0], "n_tokens": [1, 2], "batch": [0, 0], "nll_sum_all_tokens": [5.0, 7.0],
          "n_tokens_all": [3, 3], "n_pad": [2, 1], "nll_sum_pad": [0.2, 0.1]}
    values = {a.key: a.value for a in aggregations(ex)}
    assert values["with_prompt"] == pytest.approx(math.exp(12 / 6))
    assert values["with_padding"] == pytest.approx(math.exp(6.3 / 6))
    assert values["pad_denominator"] == pytest.approx(math.exp(6 / 6))


def test_diagnosis_names_the_aggregation_that_inflates_perplexity():
    # one short, hard example: per-example perplexities blow up the mean
    ex = {"nll_sum": [8.0, 40.0, 38.0], "n_tokens": [1, 20, 20], "batch": [0, 0, 0]}
    d = diagnose(aggregations(ex))
    assert d.higher[0][0].key == "mean_example_ppl"
    assert {a.key for a, _ in d.higher} == {"mean_example_ppl", "exp_mean_example"}
    assert {a.key for a in d.agree} == {"mean_batch_exp", "exp_mean_batch"}  # one batch: invisible
    text = explain(d)
    assert "mean of per-example perplexities" in text and "not recorded" in text


def test_flipped_comparison_is_the_bootstrap_of_the_swapped_pair():
    a, ta, b, tb = _paired_data(n=120, effect=0.03)
    ab = paired_bootstrap(a, ta, b, tb, resamples=2000, seed=4, labels=("a", "b"))
    ba = paired_bootstrap(b, tb, a, ta, resamples=2000, seed=4, labels=("b", "a"))  # same draws, swapped
    f = ab.flipped()
    assert (f.a, f.b) == ("b", "a")
    assert f.diff == pytest.approx(ba.diff) and f.p_value == pytest.approx(ba.p_value)
    assert (f.low, f.high) == pytest.approx((ba.low, ba.high))
    assert f.per_seed == pytest.approx(ba.per_seed)
