"""From stored runs to the numbers of the report: arms (:class:`ArmResults`: one strategy of one
study, over its seeds) with t intervals, groups of arms whose eval sets are identical (so they
can be paired), paired comparisons, and Pareto fronts.

The report's one significance rule lives here (:attr:`Group.family`): within a group, every
pair of arms is compared by the paired bootstrap, the p-values of all those pairs are
Holm-adjusted as one family, and every verdict (recommendations, tables, dominance, versus
base) reads the adjusted p (:meth:`~loraplace.report.stats.PairedComparison.significant`).
Training-time differences follow the same rule over their own family (Welch tests over seeds
of every pair of LoRA arms, Holm-adjusted)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from loraplace.placement.arms import REFERENCE_STRATEGY
from loraplace.report.load import RunData, Study
from loraplace.report.pareto import Knee, Point, dominators, knee, pareto_front
from loraplace.report.stats import (
    DEFAULT_RESAMPLES,
    Interval,
    PairedComparison,
    holm,
    paired_bootstrap,
    t_interval,
    welch_p,
)

ENV_LIBRARIES = ("torch", "transformers", "peft", "loraplace")
MEMORY_KINDS = {"rss": "process RSS (CPU)", "cuda_allocated": "CUDA allocated",
                "cuda_max_allocated": "CUDA max allocated"}


@dataclass
class ArmResults:
    """The stored results of one strategy of one study over its seeds (``ok``, non-diverged runs
    only; failed and diverged ones listed apart and kept out of every statistic). Not
    :class:`loraplace.placement.arms.Arm`, which names an arm to train (strategy and budget)."""

    key: str  # display name: the strategy, or "study/strategy" when several studies are merged
    study: Study
    strategy: str
    kind: str  # "lora" or "base"
    runs: list[RunData]
    failed: list[RunData] = field(default_factory=list)
    diverged: list[RunData] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [r.result.seed for r in self.runs]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def trainable_params(self) -> int:
        return int(self.runs[0].result.trainable_params or 0)

    @property
    def budget_params(self) -> int:
        """The parameters the arm's placement ends with: ``trainable_params``, except for AdaLoRA,
        which trains more at first and prunes to ``final_params`` (mean over seeds)."""
        finals = [r.result.final_params for r in self.runs if r.result.final_params is not None]
        return round(sum(finals) / len(finals)) if finals else self.trainable_params

    @cached_property
    def loss(self) -> Interval:
        return t_interval([r.result.eval_loss for r in self.runs])

    @cached_property
    def perplexity(self) -> Interval | None:
        """None for classification runs, which record accuracy instead."""
        return self._opt("perplexity")

    @cached_property
    def accuracy(self) -> Interval | None:
        return self._opt("eval_accuracy")

    def _opt(self, attr: str) -> Interval | None:
        vals = [getattr(r.result, attr) for r in self.runs if getattr(r.result, attr) is not None]
        return t_interval(vals) if vals else None

    @cached_property
    def train_time(self) -> Interval | None:
        return self._opt("train_time_s")

    @cached_property
    def throughput(self) -> Interval | None:
        return self._opt("train_tokens_per_s")

    @cached_property
    def peak_memory(self) -> Interval | None:
        return self._opt("peak_memory_mib")

    @cached_property
    def memory_added(self) -> Interval | None:
        """Peak minus the memory in use at run start (loaded model and data): the run's own
        memory. None for runs stored before the start was recorded."""
        return self._opt("peak_memory_increase_mib")

    @cached_property
    def memory_start(self) -> Interval | None:
        return self._opt("memory_start_mib")

    @property
    def memory_kinds(self) -> list[str]:
        return sorted({r.result.memory_kind for r in self.runs if r.result.memory_kind})

    @property
    def worse_than_base(self) -> list[RunData]:
        """Runs that end worse than the base model (kept in the statistics, flagged)."""
        return [r for r in self.runs if worse_than_base(r, self.study)]

    def examples(self, seeds: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-example (nll, tokens) matrices ``(len(seeds), examples)``; the base model does not
        depend on the seed, so its one run stands for every seed."""
        rows = {r.result.seed: r for r in self.runs if r.eval_examples is not None}
        if self.kind == "base" and rows:
            only = next(iter(rows.values()))
            rows = {s: only for s in seeds}
        if not all(s in rows for s in seeds):
            return None
        nll = np.array([rows[s].eval_examples["nll_sum"] for s in seeds], dtype=float)
        tok = np.array([rows[s].eval_examples["n_tokens"] for s in seeds], dtype=float)
        return nll, tok


def memory_measure(kind: str | None) -> str:
    return MEMORY_KINDS.get(kind or "", kind or "not recorded")


def worse_than_base(run: RunData, study: Study) -> bool:
    """The run's stored flag; for studies stored before the flag existed, its eval loss against
    the study's base-model run (False without one)."""
    if run.result.kind != "lora" or not run.ok:
        return False
    if run.result.worse_than_base is not None:
        return bool(run.result.worse_than_base)
    base = next((r for r in study.runs if r.result.kind == "base" and r.usable), None)
    return base is not None and run.result.eval_loss > base.result.eval_loss


def run_label(run: RunData, study: Study, several: bool) -> str:
    return f"{study.label}/{run.result.run_id}" if several else run.result.run_id


@dataclass(frozen=True)
class Order:
    """The relative execution order of two arms' runs (``RunResult.position``).

    status: ``varies`` (each arm ran first for some seed), ``fixed`` (``first`` ran before the
    other every time: one seed, or every seed in the same order) or ``unknown`` (positions not
    recorded: a study stored before they were).
    """

    status: str
    first: str | None = None
    pairs: int = 0


@dataclass(frozen=True)
class EnvDifference:
    """One environment property (device, precision, a library's version) on which the ok runs of
    a group differ: value -> the runs that have it."""

    what: str
    values: dict[str, list[str]]
    affects: str  # "times" or "times and losses"


def _eval_signature(study: Study) -> tuple | None:
    """What must match for two studies' per-example NLLs to be paired: the eval data and its
    tokenization (the token counts of every eval example)."""
    cfg = study.config
    tokens = next((tuple(r.eval_examples["n_tokens"]) for r in study.runs if r.ok and r.eval_examples), None)
    if tokens is None:
        return None
    data = cfg.get("data") or {}
    train = cfg.get("train") or {}
    return (cfg.get("dataset"), data.get("eval_size"), data.get("split_seed"), train.get("max_length"),
            train.get("loss_on"), tokens)


@dataclass
class Group:
    """Arms whose eval losses are directly comparable (identical eval examples and tokens).
    Comparisons, fronts and recommendations are made within a group."""

    name: str
    arms: list[ArmResults]
    resamples: int = DEFAULT_RESAMPLES

    @property
    def lora_arms(self) -> list[ArmResults]:
        return [a for a in self.arms if a.kind == "lora" and a.n > 0]

    @property
    def base_arm(self) -> ArmResults | None:
        return next((a for a in self.arms if a.kind == "base" and a.n > 0), None)

    @property
    def reference(self) -> ArmResults | None:
        """The baseline of the comparisons: the full-LoRA arm (:data:`REFERENCE_STRATEGY`), else the
        first LoRA arm."""
        lora = self.lora_arms
        return next((a for a in lora if a.strategy == REFERENCE_STRATEGY), lora[0] if lora else None)

    def _bootstrap(self, a: ArmResults, b: ArmResults) -> PairedComparison | None:
        """Paired bootstrap of ``loss(a) - loss(b)`` over the seeds both have (None when they
        share no seed with per-example data)."""
        if a.kind == "base":
            seeds = b.seeds
        elif b.kind == "base":
            seeds = a.seeds
        else:
            seeds = [s for s in a.seeds if s in b.seeds]
        xa, xb = (a.examples(seeds), b.examples(seeds)) if seeds else (None, None)
        if xa is None or xb is None or xa[0].shape != xb[0].shape or xa[0].shape[1] < 2:
            return None
        return paired_bootstrap(xa[0], xa[1], xb[0], xb[1], resamples=self.resamples, labels=(a.key, b.key),
                                seed_ids=seeds)

    @cached_property
    def family(self) -> dict[tuple[str, str], PairedComparison]:
        """Every pair of the group's arms (base included; failed and diverged runs excluded) that
        can be paired, Holm-adjusted as one family: the only p-values verdicts read."""
        arms = [a for a in self.arms if a.n > 0]
        raw = {}
        for i, a in enumerate(arms):
            for b in arms[i + 1:]:
                c = self._bootstrap(a, b)
                if c is not None:
                    raw[(a.key, b.key)] = c
        adjusted = holm([c.p_value for c in raw.values()]) if raw else []
        return {k: replace(c, p_adjusted=p, family_size=len(raw)) for (k, c), p in zip(raw.items(), adjusted)}

    def compare(self, a: ArmResults, b: ArmResults) -> PairedComparison | None:
        """``loss(a) - loss(b)`` from :attr:`family` (raw and Holm-adjusted p); None when the two
        share no seed with per-example data."""
        if (a.key, b.key) in self.family:
            return self.family[(a.key, b.key)]
        c = self.family.get((b.key, a.key))
        return None if c is None else c.flipped()

    @cached_property
    def vs_reference(self) -> list[PairedComparison]:
        """Every other arm (base included) against the reference, p adjusted over :attr:`family`."""
        ref = self.reference
        if ref is None:
            return []
        return [c for a in self.arms if a is not ref and a.n > 0 and (c := self.compare(a, ref)) is not None]

    @cached_property
    def time_family(self) -> dict[tuple[str, str], tuple[float, float]]:
        """Welch p of mean training time over seeds for every pair of LoRA arms with two or more
        timed runs each: ``(raw p, Holm-adjusted p)``."""
        arms = [a for a in self.lora_arms if a.train_time is not None]
        raw = {}
        for i, a in enumerate(arms):
            for b in arms[i + 1:]:
                p = welch_p([r.result.train_time_s for r in a.runs], [r.result.train_time_s for r in b.runs])
                if p is not None:
                    raw[(a.key, b.key)] = p
        adjusted = holm(list(raw.values())) if raw else []
        return {k: (p, q) for (k, p), q in zip(raw.items(), adjusted)}

    def time_test(self, a: ArmResults, b: ArmResults) -> tuple[float, float] | None:
        return self.time_family.get((a.key, b.key)) or self.time_family.get((b.key, a.key))

    def order(self, a: ArmResults, b: ArmResults) -> Order:
        """Did ``a`` and ``b`` always run in the same relative order? Runs of the same seed are
        paired (every run against every run when the arms share no seed)."""
        pos_a = {r.result.seed: r.result.position for r in a.runs}
        pos_b = {r.result.seed: r.result.position for r in b.runs}
        common = [s for s in pos_a if s in pos_b]
        pairs = ([(pos_a[s], pos_b[s]) for s in common] if common
                 else [(x, y) for x in pos_a.values() for y in pos_b.values()])
        if not pairs or any(x is None or y is None for x, y in pairs):
            return Order("unknown", pairs=len(pairs))
        firsts = {x < y for x, y in pairs if x != y}
        if len(firsts) != 1:  # each ran first for some seed (or, across studies, at the same place)
            return Order("varies", pairs=len(pairs))
        return Order("fixed", first=a.key if firsts.pop() else b.key, pairs=len(pairs))

    def order_summary(self) -> str:
        """``unknown``, ``fixed`` (every pair of LoRA arms ran in one relative order), ``varies``
        (no pair did), ``mixed``, or ``none`` (fewer than two timed LoRA arms)."""
        arms = [a for a in self.lora_arms if a.train_time is not None]
        states = {self.order(a, b).status for i, a in enumerate(arms) for b in arms[i + 1:]}
        if not states:
            return "none"  # fewer than two timed arms: no time comparison
        if "unknown" in states:
            return "unknown"
        return states.pop() if len(states) == 1 else "mixed"

    def environment(self) -> list[EnvDifference]:
        """Device, precision and library versions on which the group's ok runs differ."""
        several = len({id(a.study) for a in self.arms}) > 1
        runs = [(run_label(r, a.study, several), r.result) for a in self.arms for r in a.runs + a.diverged if r.ok]
        # The device string names a CPU's thread count: kernels split their reductions by it, so it moves losses too.
        props = [("device", lambda r: r.device, "times and losses"),
                 ("precision", lambda r: r.precision, "times and losses")]
        props += [(f"{lib} version", (lambda r, lib=lib: r.versions.get(lib)), "times") for lib in ENV_LIBRARIES]
        out = []
        for what, get, affects in props:
            values: dict[str, list[str]] = {}
            for label, r in runs:
                v = get(r)
                if v:
                    values.setdefault(str(v), []).append(label)
            if len(values) > 1:
                out.append(EnvDifference(what, values, affects))
        return out

    def points(self, cost: str) -> list[Point]:
        pts = []
        for a in self.lora_arms:
            if cost == "params":
                pts.append(Point(a.key, float(a.trainable_params), a.loss.mean))
            elif a.train_time is not None:
                pts.append(Point(a.key, a.train_time.mean, a.loss.mean))
        return pts

    def front(self, cost: str) -> list[Point]:
        return pareto_front(self.points(cost))

    def dominated(self, cost: str) -> dict[str, list[Point]]:
        return dominators(self.points(cost))

    def knee(self, cost: str = "params") -> Knee | None:
        return knee(self.front(cost), log_cost=cost == "params")

    def arm(self, key: str) -> ArmResults:
        return next(a for a in self.arms if a.key == key)


def build_arms(studies: list[Study]) -> list[ArmResults]:
    arms: list[ArmResults] = []
    several = len(studies) > 1
    for study in studies:
        order: dict[str, list[RunData]] = {}
        for run in study.runs:
            order.setdefault(run.result.strategy, []).append(run)
        for strategy, runs in order.items():
            kind = runs[0].result.kind
            arms.append(ArmResults(
                key=f"{study.label}/{strategy}" if several else strategy, study=study, strategy=strategy,
                kind=kind, runs=sorted([r for r in runs if r.usable], key=lambda r: r.result.seed),
                failed=[r for r in runs if not r.ok and not r.diverged],
                diverged=[r for r in runs if r.diverged],
            ))
    return arms


def build_groups(studies: list[Study], arms: list[ArmResults], resamples: int = DEFAULT_RESAMPLES) -> list[Group]:
    """Studies with the same eval signature share a group; others get their own."""
    by_sig: dict[object, list[Study]] = {}
    for s in studies:
        sig = _eval_signature(s)
        by_sig.setdefault(sig if sig is not None else ("alone", str(s.dir)), []).append(s)
    groups = []
    for members in by_sig.values():
        name = " + ".join(s.label for s in members)
        groups.append(Group(name=name, arms=[a for a in arms if any(a.study is m for m in members)], resamples=resamples))
    return groups


_ORDER_NOTES = {
    "fixed": "every seed ran the arms in the same relative order (or there is one seed), so a time difference "
             "between arms may be an order effect (warm-up, caches, memory left by earlier runs): times are untested "
             "for order",
    "mixed": "some pairs of arms ran in the same relative order for every seed; their time differences may be "
             "order effects (untested for order; see the time-dominance recommendation)",
    "varies": "the arm order varied across seeds, so mean times over seeds are not tied to one order",
    "unknown": "not recorded (a study stored before run positions were), so whether time differences are order "
               "effects is unknown",
}


def order_note(groups: list[Group]) -> str:
    """One sentence on the execution order behind the time comparisons (tables and figures)."""
    parts = []
    for g in groups:
        state = g.order_summary()
        if state == "none":
            continue
        note = _ORDER_NOTES[state]
        parts.append(f"{g.name}: {note}" if len(groups) > 1 else note)
    return ("Run order: " + "; ".join(parts) + ".") if parts else ""
