"""From stored runs to the numbers of the report: arms (one strategy of one study, over its
seeds) with t intervals, groups of arms whose eval sets are identical (so they can be paired),
paired comparisons, and Pareto fronts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from loraplace.report.load import RunData, Study
from loraplace.report.pareto import Knee, Point, dominators, knee, pareto_front
from loraplace.report.stats import DEFAULT_RESAMPLES, Interval, PairedComparison, holm, paired_bootstrap, t_interval


@dataclass
class Arm:
    """One strategy of one study over its seeds (``ok`` runs only; failed ones listed apart)."""

    key: str  # display name: the strategy, or "study/strategy" when several studies are merged
    study: Study
    strategy: str
    kind: str  # "lora" or "base"
    runs: list[RunData]
    failed: list[RunData] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [r.result.seed for r in self.runs]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def trainable_params(self) -> int:
        return int(self.runs[0].result.trainable_params or 0)

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
    arms: list[Arm]
    resamples: int = DEFAULT_RESAMPLES
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def lora_arms(self) -> list[Arm]:
        return [a for a in self.arms if a.kind == "lora" and a.n > 0]

    @property
    def base_arm(self) -> Arm | None:
        return next((a for a in self.arms if a.kind == "base" and a.n > 0), None)

    @property
    def reference(self) -> Arm | None:
        """The baseline of the comparisons: the full-LoRA arm, else the first LoRA arm."""
        lora = self.lora_arms
        return next((a for a in lora if a.strategy == "full"), lora[0] if lora else None)

    def compare(self, a: Arm, b: Arm) -> PairedComparison | None:
        """Paired bootstrap of ``loss(a) - loss(b)`` over the seeds both have (None when they
        share no seed with per-example data)."""
        key = (a.key, b.key)
        if key not in self._cache:
            if a.kind == "base":
                seeds = b.seeds
            elif b.kind == "base":
                seeds = a.seeds
            else:
                seeds = [s for s in a.seeds if s in b.seeds]
            xa, xb = (a.examples(seeds), b.examples(seeds)) if seeds else (None, None)
            if xa is None or xb is None or xa[0].shape != xb[0].shape or xa[0].shape[1] < 2:
                self._cache[key] = None
            else:
                self._cache[key] = paired_bootstrap(xa[0], xa[1], xb[0], xb[1], resamples=self.resamples,
                                                    labels=(a.key, b.key), seed_ids=seeds)
        return self._cache[key]

    @cached_property
    def vs_reference(self) -> list[PairedComparison]:
        """Every other arm (base included) against the reference, Holm-adjusted as one family."""
        ref = self.reference
        if ref is None:
            return []
        out = [c for a in self.arms if a is not ref and a.n > 0 and (c := self.compare(a, ref)) is not None]
        return [replace(c, p_adjusted=p) for c, p in zip(out, holm([c.p_value for c in out]))]

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

    def arm(self, key: str) -> Arm:
        return next(a for a in self.arms if a.key == key)


def build_arms(studies: list[Study]) -> list[Arm]:
    arms: list[Arm] = []
    several = len(studies) > 1
    for study in studies:
        order: dict[str, list[RunData]] = {}
        for run in study.runs:
            order.setdefault(run.result.strategy, []).append(run)
        for strategy, runs in order.items():
            kind = runs[0].result.kind
            arms.append(Arm(
                key=f"{study.label}/{strategy}" if several else strategy, study=study, strategy=strategy,
                kind=kind, runs=sorted([r for r in runs if r.ok], key=lambda r: r.result.seed),
                failed=[r for r in runs if not r.ok],
            ))
    return arms


def build_groups(studies: list[Study], arms: list[Arm], resamples: int = DEFAULT_RESAMPLES) -> list[Group]:
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
