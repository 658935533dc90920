"""The report's automatic-placement sections: where adapters matter, before training
(:func:`before_training_section`: parts 1-2) and after it (:func:`after_training_section`: 3-5).

They read what ``loraplace importance`` and the automatic arms leave in a study folder (all
optional; :mod:`~loraplace.report.load` reads them) and show, per study that has any:

1. the importance scores before training (``importance/<score>.json``: per slot a curve over
   rank, ``curve[k-1]`` = predicted gain of a rank-k adapter) as layer x role heatmaps of the gain
   per trainable parameter at the study's rank, with what the scoring cost against training;
2. the allocations the automatic (EVA, random, ...) arms trained (``allocations/*.json``) as
   layer x role rank tables, merged over layers like ``loraplace plan``, with their budget;
3. each automatic arm against every other arm of the same budget (trainable parameters within
   :data:`SAME_BUDGET`), read from the group's Holm-adjusted paired comparisons
   (:attr:`~loraplace.report.analysis.Group.family`), the report's one significance rule;
4. post-hoc importance: the Frobenius norms of the trained updates (``adapter_norms.json``) and
   their Spearman correlation with each score on the arm that trained every slot;
5. score validity: whether each score ranks the arms as training did (Spearman correlation of
   predicted and measured gain over arms).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from loraplace.errors import LoraplaceError
from loraplace.placement.arms import Arm, slot_group
from loraplace.placement.matrix import rank_rows
from loraplace.placement.roles import ALL_ROLES, group_of
from loraplace.placement.strategies import AUTO, METHOD_TITLES, Strategy, parse_strategy
from loraplace.report import figures, fmt
from loraplace.report.analysis import ArmResults, Group
from loraplace.report.context import Part, ReportContext
from loraplace.report.doc import Block, Bullets, Heading, Para, Table
from loraplace.report.load import Study
from loraplace.report.stats import ALPHA, PairedComparison, fmt_p, spearman

TITLE = "Where adapters matter: automatic placement"
SAME_BUDGET = 0.02  # arms whose trainable parameters lie within 2% of an automatic arm's share its budget
AUTO_METHOD = (
    "Automatic placement: an importance score gives each slot a curve of predicted gain over rank (curve[k] for a "
    "rank-k adapter). An arm's predicted gain is the sum over its modules of the curve at the module's rank (capped "
    "at the curve's last rank); its measured gain is the base model's eval loss minus the arm's, mean over seeds. "
    f"Same budget: trainable parameters within {SAME_BUDGET:.0%}. Auto against the rest reads the pairwise paired "
    "comparisons and their Holm p (the report's one rule). Post-hoc importance is the Frobenius norm of each trained "
    "update ΔW = (alpha / r) · B A, mean over seeds. Agreement between rankings: Spearman's rho with its two-sided p "
    "(scipy), undefined below three pairs.")


# ----------------------------------------------------------------------------------- small pieces
def slug(label: str) -> str:
    """An arm label as a file-name part: ``auto[mode=worst]~attention`` -> ``auto_mode_worst_attention``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_")


def _role_key(role: str) -> tuple[int, str]:
    """Roles in display order (attention, cross-attention, FFN, outside the blocks), others last."""
    return (ALL_ROLES.index(role) if role in ALL_ROLES else len(ALL_ROLES), role)


def _strategy(label: str) -> Strategy | None:
    """The parsed strategy of an arm label (the strategy grammar is torch-free), or None for a label
    this version cannot parse (a study written by another version)."""
    try:
        return parse_strategy(Arm.parse(label).strategy)
    except LoraplaceError:
        return None


def method_name(label: str) -> str:
    """The adapter method of an arm label (``lora``, ``auto``, ``eva``, ``adalora``; the grammar's
    :attr:`~loraplace.placement.strategies.Strategy.method_name`)."""
    strategy = _strategy(label)
    return strategy.method_name if strategy is not None else "lora"


def label_mode(label: str) -> str:
    """The allocation mode an automatic arm's label names: ``auto[mode=worst]~...`` -> ``worst``,
    ``auto[score=random,...]`` -> ``random``, plain ``auto~...`` -> ``best``."""
    strategy = _strategy(label)
    options = strategy.auto if strategy is not None else None
    if options is None:
        return "best"
    return "random" if options.score == "random" and options.mode == "best" else options.mode


def is_hand_picked(label: str) -> bool:
    """A strategy chosen by hand (roles, layers, ranks), not by an algorithm (any other method)."""
    return method_name(label) == "lora"


def _pct(share: float) -> str:
    """A share as a percentage with two significant digits below 10% (``0.031`` -> ``3.1%``)."""
    pct = 100.0 * share
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


def _rho_text(rho: float | None, p: float | None, n: int) -> str:
    return f"n = {n}" if rho is None else f"rho = {rho:+.2f}, p = {fmt_p(p)}, n = {n}"


# --------------------------------------------------------------------------------------- scores
@dataclass(frozen=True)
class Importance:
    """One importance file: per slot (exact module name) a curve of predicted gain over rank."""

    score: str
    data: dict[str, Any]

    @cached_property
    def slots(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.data["slots"]}

    @property
    def max_rank(self) -> int:
        return int(self.data["max_rank"])

    def gain(self, name: str, r: int) -> float | None:
        """Predicted gain of a rank-``r`` adapter on slot ``name`` (the curve at ``min(r,
        max_rank)``); None for a module that was not scored."""
        slot = self.slots.get(name)
        if slot is None or r < 1:
            return None
        return float(slot["curve"][min(r, self.max_rank, len(slot["curve"])) - 1])

    def gain_per_param(self, name: str, r: int) -> float | None:
        """``curve[k-1] / (k * (in + out))`` with ``k = min(r, max_rank)``: predicted gain per
        trainable parameter of a rank-k adapter on slot ``name``."""
        gain = self.gain(name, r)
        if gain is None:
            return None
        slot, k = self.slots[name], min(r, self.max_rank)
        return gain / (k * (int(slot["in_features"]) + int(slot["out_features"])))

    def predicted(self, modules: list[dict[str, Any]]) -> tuple[float, int]:
        """Predicted gain of an allocation: the sum over its scored modules of the curve at the
        module's rank, and how many of the modules were scored."""
        gains = [self.gain(m["name"], int(m["r"])) for m in modules]
        return float(sum(g for g in gains if g is not None)), sum(g is not None for g in gains)


# ------------------------------------------------------------------------------ allocation views
def rank_matrix(modules: list[dict[str, Any]], stacks: dict[Any, int] | None = None
                ) -> tuple[list[str], list[dict[str, Any]]]:
    """The layer x role view of an allocation, merged like ``loraplace plan`` (and
    ``Placement.matrix``, which needs torch to import): consecutive layers with identical ranks
    share a row.

    Args:
        modules: ``{"role", "stack", "layer", "r"}`` per adapted module.
        stacks: stack -> number of layers (``Placement.to_dict()["stacks"]``); default: each
            stack's highest adapted layer + 1.

    Returns:
        ``(roles, rows)``: rows ``{"stack", "layers": "0-11", "cells": {role: rank, "8/16" when a
        role's modules in one layer differ, or None}}``; modules outside the blocks form a last
        row with layers ``"-"``.
    """

    roles = sorted({m["role"] for m in modules}, key=_role_key)
    counts = _stack_layers({(m.get("stack"), m.get("layer")) for m in modules}, stacks or {})
    return roles, rank_rows(((m.get("stack"), m.get("layer"), m["role"], m["r"]) for m in modules), counts, roles)


def _stack_layers(cells: set[tuple], stored: dict[Any, int]) -> dict[Any, int]:
    """Layers per stack: the stored count (JSON keys are strings, so a None stack reads "null"),
    at least each stack's highest adapted layer + 1."""
    counts: dict[Any, int] = {}
    for stack, layer in cells:
        if layer is not None:
            counts[stack] = max(counts.get(stack, 0), int(layer) + 1)
    for stack, n in stored.items():
        key = None if stack in (None, "null") else stack
        counts[key] = max(counts.get(key, 0), int(n))
    return counts


def _module_params(m: dict[str, Any]) -> int:
    """A module's adapter parameters: stored, else ``r * (in + out)``."""
    # not placement.params.lora_param_count: that module imports torch, which `loraplace report` must not
    return int(m["params"]) if m.get("params") is not None else int(m["r"]) * (int(m["in_features"])
                                                                               + int(m["out_features"]))


# ---------------------------------------------------------------------------- one study's view
@dataclass
class StudyView:
    """What the section needs of one study: its arms in their comparison group, its scores,
    the study's rank and where to write."""

    study: Study
    group: Group
    fig_dir: Path
    prefix: str  # table and figure name prefix ("" for one study)
    level: int  # heading level of the subsections

    @cached_property
    def arms(self) -> list[ArmResults]:
        """The study's successful LoRA arms."""
        return [a for a in self.group.lora_arms if a.study is self.study]

    @cached_property
    def scores(self) -> dict[str, Importance]:
        return {k: Importance(k, v) for k, v in self.study.importance.items()}

    @cached_property
    def rank(self) -> int:
        """The study's LoRA rank r (study config ``lora.r``; else the runs' most common r)."""
        r = (self.study.config.get("lora") or {}).get("r")
        if r:
            return int(r)
        ranks = [run.result.r for run in self.study.runs if run.result.r]
        return max(set(ranks), key=ranks.count) if ranks else 1

    @cached_property
    def train_time(self) -> tuple[float, int] | None:
        """Mean training time (s) of the study's successful LoRA runs, and how many."""
        times = [r.result.train_time_s for r in self.study.runs
                 if r.usable and r.result.kind == "lora" and r.result.train_time_s is not None]
        return (float(np.mean(times)), len(times)) if times else None

    @cached_property
    def base_loss(self) -> float | None:
        return next((r.result.eval_loss for r in self.study.runs if r.result.kind == "base" and r.usable), None)

    def mode(self, arm: ArmResults) -> str:
        alloc = self.study.allocations.get(arm.strategy)
        return str(alloc.get("mode") or "best") if alloc else label_mode(arm.strategy)

    def modules(self, arm: ArmResults) -> list[dict[str, Any]] | None:
        """The modules ``arm`` trained, with ranks: its allocation file, else its runs'
        modules.json, else the names and per-role ranks of its results rows; None when unknown."""
        alloc = self.study.allocations.get(arm.strategy)
        if alloc and alloc["placement"].get("modules"):
            return alloc["placement"]["modules"]
        stored = next((r.modules["modules"] for r in arm.runs if r.modules and r.modules.get("modules")), None)
        if stored and all(m.get("r") for m in stored):
            return stored
        return self._modules_from_row(arm)

    def _modules_from_row(self, arm: ArmResults) -> list[dict[str, Any]] | None:
        res = arm.runs[0].result
        slots = {k: v for s in self.scores.values() for k, v in s.slots.items()}
        out = []
        for name in res.modules:
            role = slots.get(name, {}).get("role")
            ranks = set(res.ranks.get(role, [])) if role else set()
            r = ranks.pop() if len(ranks) == 1 else res.r
            if not r:
                return None
            out.append({"name": name, "role": role, "r": int(r)})
        return out or None

    def norms(self, arm: ArmResults) -> dict[str, dict[str, Any]]:
        """Module name -> ``{role, stack, layer, norm}`` with the norm averaged over the arm's
        seeds that stored adapter_norms.json, and ``seeds``: how many did."""
        per: dict[str, list[float]] = defaultdict(list)
        meta: dict[str, dict[str, Any]] = {}
        for run in arm.runs:
            for m in (run.adapter_norms or {}).get("modules", []):
                per[m["name"]].append(float(m["norm"]))
                meta[m["name"]] = m
        return {k: {**meta[k], "norm": float(np.mean(v)), "seeds": len(v)} for k, v in per.items()}

    def name(self, stem: str) -> str:
        return f"{self.prefix}{stem}"


# ----------------------------------------------------------------------- 1. importance heatmaps
def cost_line(score: Importance, train_time: tuple[float, int] | None) -> tuple[str, float | None]:
    """``gradient scoring: 41.0 s, 9,800 tokens = 12% of one arm's training time (...)`` and that
    share (None without timed training runs)."""
    seconds, tokens = float(score.data.get("seconds") or 0.0), int(score.data.get("tokens") or 0)
    data = f"{tokens:,} tokens" if tokens else "no data (weights only)"
    text = f"**{score.score} scoring**: {seconds:,.1f} s, {data}"
    if train_time is None or train_time[0] <= 0:
        return text + " (no timed training run to compare with).", None
    share = seconds / train_time[0]
    return (text + f" = {_pct(share)} of one arm's training time ({train_time[0]:,.1f} s, the mean over the "
            f"study's {train_time[1]} successful LoRA runs)."), share


def _importance_cells(score: Importance, r: int) -> list[tuple[str, Any, Any, float]]:
    """Gain per parameter at rank r of every slot, scaled to the largest (1 = the best slot)."""
    vals = {n: score.gain_per_param(n, r) for n in score.slots}
    top = max((v for v in vals.values() if v is not None), default=0.0)
    scale = top if top > 0 else 1.0
    return [(s["role"], s.get("stack"), s.get("layer"), vals[n] / scale) for n, s in score.slots.items()]


def importance_part(v: StudyView) -> Part:
    """Heatmap and scoring cost per importance file, and the cost of the passes a method makes over
    the data before training (EVA's principal components of the module inputs), from its allocation record."""
    passes = {label: alloc["budget"] for label, alloc in sorted(v.study.allocations.items())
              if isinstance(alloc.get("budget"), dict) and alloc["budget"].get("seconds") is not None}
    if not v.scores and not passes:
        return Part()
    clamped = [s.score for s in v.scores.values() if s.max_rank < v.rank]
    blocks: list[Block] = [Heading(v.level, "Importance before training"), Para(
        f"Each score predicts, per slot (a linear module an adapter can go on), the gain of a rank-k adapter "
        f"(a curve over k). The heatmaps show the gain per trainable parameter at the study's rank r = {v.rank}, "
        f"curve[r] / (r · (in + out)), scaled to each figure's largest cell (1 = the most important slot per "
        "parameter); grey cells were not scored."
        + (f" The {', '.join(clamped)} curve(s) stop below r, so their last point stands in for r."
           if clamped else ""))]
    rows, records = [], []
    for s in v.scores.values():
        line, share = cost_line(s, v.train_time)
        notes = " ".join(f"Note: {w.rstrip('.')}." for w in s.data.get("warnings") or [])
        method = (f"{s.data.get('method') or 'not recorded'} "
                  f"({s.data.get('approximation') or 'approximation not recorded'})")
        blocks.append(Para(f"{line} Method: {method}." + (f" {notes}" if notes else "")))
        blocks += figures.layer_role_heatmap(
            _importance_cells(s, v.rank), v.fig_dir, v.name(f"importance_{slug(s.score)}"),
            f"{s.score} importance: gain per parameter at r = {v.rank}", "relative gain per parameter (max = 1)",
            f"{s.score} score before training: predicted gain per trainable parameter of a rank-{v.rank} adapter "
            "on each slot, relative to the best slot.")
        rows.append([s.score, f"{s.data.get('seconds') or 0:,.1f}", fmt.params(s.data.get("tokens") or 0),
                     "-" if share is None else _pct(share), str(len(s.slots)), str(s.max_rank),
                     str(s.data.get("approximation") or "-")])
        records.append({"score": s.score, "seconds": s.data.get("seconds"), "tokens": s.data.get("tokens"),
                        "share_of_arm_training_time": share, "mean_train_time_s": v.train_time and v.train_time[0],
                        "slots": len(s.slots), "max_rank": s.max_rank, "batches": s.data.get("batches"),
                        "peak_memory_mib": s.data.get("peak_memory_mib"), "memory_kind": s.data.get("memory_kind"),
                        "approximation": s.data.get("approximation")})
    for label, budget in passes.items():
        seconds = float(budget["seconds"])
        share = seconds / v.train_time[0] if v.train_time and v.train_time[0] > 0 else None
        method = str(budget.get("method") or "allocation")
        blocks.append(Para(f"**`{label}`'s own pass before training** ({method}): {seconds:,.1f} s, "
                           f"{budget.get('forward_passes', '-')} forward passes"
                           + ("" if share is None else f" = {_pct(share)} of one arm's training time") + "."))
        rows.append([f"{method}: {label}", f"{seconds:,.1f}", "-", "-" if share is None else _pct(share),
                     str(len((v.study.allocations[label].get("placement") or {}).get("modules") or [])), "-",
                     f"{budget.get('forward_passes', '-')} forward passes"])
        records.append({"score": f"{method}: {label}", "seconds": seconds, "tokens": None,
                        "share_of_arm_training_time": share, "mean_train_time_s": v.train_time and v.train_time[0],
                        "forward_passes": budget.get("forward_passes")})
    table = Table(v.name("importance-cost"), "What each importance score, and each method's own pass over the data "
                  "(EVA's principal components), cost before training, against the mean training time of one LoRA "
                  "run of the study.",
                  ["score", "seconds", "tokens", "share of one arm's training", "slots", "max rank", "approximation"],
                  rows, records, align="lrrrrrl")
    return Part(blocks + [table], [table])


# --------------------------------------------------------------------------- 2. the allocations
def _budget_text(alloc: dict[str, Any]) -> str:
    b = alloc.get("budget") or {}
    if not b:
        return "Budget: not recorded."
    ref = b.get("reference")
    ref_text = f" (the parameters of `{ref}`)" if isinstance(ref, str) else ""
    dev = b.get("deviation_pct")
    return (f"Budget: target {fmt.params(b.get('target'))} trainable parameters{ref_text}, achieved "
            f"{fmt.params(b.get('achieved'))} ({'-' if dev is None else f'{dev:+.2f}%'} deviation).")


def rank_table(v: StudyView, alloc: dict[str, Any]) -> Table:
    """The allocation's layer x role ranks, consecutive identical layers merged ("-": no adapter)."""
    mods = alloc["placement"]["modules"]
    roles, rows = rank_matrix(mods, alloc["placement"].get("stacks"))
    stacked = len({r["stack"] for r in rows if r["layers"] != "-"}) > 1
    headers = (["stack"] if stacked else []) + ["layers"] + roles
    shown = [([str(r["stack"] or "-")] if stacked else []) + [r["layers"]]
             + ["-" if r["cells"][role] is None else str(r["cells"][role]) for role in roles] for r in rows]
    records = [{"stack": r["stack"], "layers": r["layers"], **r["cells"]} for r in rows]
    return Table(v.name(f"allocation-{slug(alloc['arm'])}"), f"Ranks `{alloc['arm']}` trains, per layer and role "
                 "(consecutive layers with the same ranks share a row; -: no adapter; 8/16: the role's modules in "
                 "those layers got different ranks).", headers, shown, records,
                 align="l" * (len(headers) - len(roles)) + "r" * len(roles))


def role_totals_table(v: StudyView, alloc: dict[str, Any]) -> Table:
    """Per role: adapted modules, total and mean rank, adapter parameters and their share."""
    mods = alloc["placement"]["modules"]
    total = sum(_module_params(m) for m in mods) or 1
    rows, records = [], []
    for role in sorted({m["role"] for m in mods}, key=_role_key) + ["total"]:
        ms = mods if role == "total" else [m for m in mods if m["role"] == role]
        ranks, params = [int(m["r"]) for m in ms], sum(_module_params(m) for m in ms)
        rows.append([role, str(len(ms)), f"{sum(ranks):,}", f"{np.mean(ranks):.1f}", fmt.params(params),
                     f"{100 * params / total:.1f}"])
        records.append({"role": role, "modules": len(ms), "rank_sum": sum(ranks), "rank_mean": float(np.mean(ranks)),
                        "params": params, "params_pct": 100 * params / total})
    return Table(v.name(f"allocation-roles-{slug(alloc['arm'])}"), f"`{alloc['arm']}` per role: total rank and "
                 "adapter parameters.", ["role", "modules", "rank sum", "mean rank", "parameters", "% of parameters"],
                 rows, records)


def allocation_part(v: StudyView) -> Part:
    """Rank table, budget and per-role totals of every allocation file."""
    if not v.study.allocations:
        return Part()
    blocks: list[Block] = [Heading(v.level, "The chosen allocations")]
    tables: list[Table] = []
    for label, alloc in sorted(v.study.allocations.items()):
        ranks = [int(m["r"]) for m in alloc["placement"]["modules"]] or [0]
        draw = f", draw {alloc['draw']}" if alloc.get("draw") is not None else ""
        gain = alloc.get("predicted_gain")
        blocks.append(Para(
            f"**`{label}`** (score {alloc.get('score') or '-'}, mode {alloc.get('mode') or '-'}{draw}): "
            f"{len(alloc['placement']['modules'])} modules at ranks {min(ranks)}–{max(ranks)} (step "
            f"{alloc.get('step', '-')}, at most {alloc.get('max_r', '-')}). {_budget_text(alloc)}"
            + ("" if gain is None else f" Predicted gain under its own score: {gain:.4g}.")))
        tables += [rank_table(v, alloc), role_totals_table(v, alloc)]
        blocks += tables[-2:]
    return Part(blocks, tables)


# --------------------------------------------------------------- 3. auto vs the rest, same budget
def same_budget(arm: ArmResults, others: list[ArmResults]) -> list[ArmResults]:
    """The other arms whose trainable parameters lie within :data:`SAME_BUDGET` of ``arm``'s."""
    ref = arm.budget_params
    return [o for o in others if o is not arm and ref and abs(o.budget_params - ref) <= SAME_BUDGET * ref]


def _auto_verdict(c: PairedComparison) -> str:
    if not c.significant():
        return "no significant difference"
    return "auto better" if c.diff < 0 else "auto worse"


def versus_table(v: StudyView, auto: ArmResults, peers: list[ArmResults]) -> Table:
    """``auto`` minus each peer in eval loss: the group's paired comparison and Holm p."""
    rows, records = [], []
    for o in peers:
        c = v.group.compare(auto, o)
        pct = 100 * (o.budget_params - auto.budget_params) / auto.budget_params
        if c is None:
            rows.append([o.key, fmt.params(o.budget_params), f"{pct:+.1f}", "-", "-", "-", "no paired data"])
            records.append({"auto": auto.key, "other": o.key, "other_params": o.budget_params})
            continue
        rows.append([o.key, fmt.params(o.budget_params), f"{pct:+.1f}", fmt.diff(c.diff),
                     f"[{fmt.diff(c.low)}, {fmt.diff(c.high)}]", fmt.p_holm(c), _auto_verdict(c)])
        records.append({"auto": auto.key, "other": o.key, "other_params": o.budget_params, "params_diff_pct": pct,
                        "diff": c.diff, "ci_low": c.low, "ci_high": c.high, "p_value": c.p_value,
                        "p_holm": c.p_adjusted, "significant": c.significant(), "verdict": _auto_verdict(c)})
    return Table(v.name(f"auto-vs-{slug(auto.strategy)}"), f"`{auto.key}` ({fmt.params(auto.budget_params)} "
                 f"trainable parameters) against every arm within {SAME_BUDGET:.0%} of its parameters: Δ = eval loss "
                 f"of `{auto.key}` minus the other's (negative: auto better), the paired comparison of the pairwise "
                 f"table with its percentile 95% CI and Holm p (verdict: Holm p < {ALPHA:g}).",
                 ["other arm", "trainable params", "params vs auto (%)", "Δ eval loss (auto − other)", "95% CI",
                  "Holm p", "verdict"], rows, records, align="lrrrlrl")


def _beats(v: StudyView, auto: ArmResults, other: ArmResults | None, what: str, note: str = "") -> str:
    """One clause: does ``auto`` beat ``other`` (``what`` names it)? With the group's paired
    comparison (:func:`~loraplace.report.fmt.comparison`) and "not significantly" when its Holm p
    does not reach the report's threshold."""
    if other is None:
        return f"there is no {what} to compare with"
    c = v.group.compare(auto, other)
    if c is None:
        return f"against {what}, `{other.key}`, there is no paired per-example data"
    if c.significant():
        head = "it beats" if c.diff < 0 else "it is worse than"
    else:
        head = "it is not significantly " + ("better than" if c.diff < 0 else "worse than")
    ci = ", the CI includes 0" if c.low <= 0 <= c.high else ""
    return f"{head} {what}, `{other.key}`: {fmt.comparison(c)}{ci}{note}"


def _best(arms: list[ArmResults]) -> ArmResults | None:
    return min(arms, key=lambda a: a.loss.mean, default=None)


def _method_arm(v: StudyView, auto: ArmResults, peers: list[ArmResults], method: str) -> tuple[ArmResults | None, str]:
    """The best arm of ``method`` at auto's budget, else at any budget with a note saying so."""
    same = [a for a in peers if method_name(a.strategy) == method]
    if same:
        return _best(same), ""
    other = _best([a for a in v.arms if method_name(a.strategy) == method])
    if other is None:
        return None, ""
    return other, (f" (not the same budget: {fmt.params(other.budget_params)} vs "
                   f"{fmt.params(auto.budget_params)} parameters)")


def verdict_sentence(v: StudyView, auto: ArmResults, peers: list[ArmResults]) -> str:
    """Does ``auto`` beat the best hand-picked arm at its budget, and the best arm of every other
    method in the study (EVA, AdaLoRA, ...)?"""
    hand = _best([a for a in peers if is_hand_picked(a.strategy)])
    parts = [_beats(v, auto, hand, "the best hand-picked arm at this budget")]
    others = sorted({method_name(a.strategy) for a in v.arms} - {"lora", AUTO}, key=list(METHOD_TITLES).index)
    for method in others:
        what = METHOD_TITLES[method]
        arm, note = _method_arm(v, auto, peers, method)
        if arm is not None:
            parts.append(_beats(v, auto, arm, what, note))
    return f"**`{auto.key}`**: " + "; ".join(parts) + "."


def versus_part(v: StudyView) -> Part:
    """Per automatic arm (mode best): the same-budget comparison table and its verdict."""
    autos = [a for a in v.arms if method_name(a.strategy) == AUTO and v.mode(a) == "best"]
    if not autos:
        return Part()
    blocks: list[Block] = [Heading(v.level, "Automatic placement against the rest at the same budget"), Para(
        "Each automatic arm against every other LoRA arm whose trainable parameters lie within "
        f"{SAME_BUDGET:.0%} of its own, read from the pairwise comparisons above (paired bootstrap, Holm-adjusted "
        "over every pair of the group's arms). Hand-picked: arms whose label does not start with auto, eva or "
        "adalora.")]
    tables = []
    for auto in autos:
        peers = same_budget(auto, v.arms)
        if not peers:
            blocks.append(Para(f"**`{auto.key}`**: no other arm within {SAME_BUDGET:.0%} of its "
                               f"{fmt.params(auto.budget_params)} trainable parameters."))
            continue
        tables.append(versus_table(v, auto, peers))
        blocks += [tables[-1], Para(verdict_sentence(v, auto, peers))]
    return Part(blocks, tables)


# -------------------------------------------------------------------------- 4. post-hoc importance
def _full_arms(v: StudyView, normed: dict[str, dict]) -> list[ArmResults]:
    """Arms with norms that trained every slot: ``full`` or ``full~...`` by label, else any whose
    norms cover every scored slot."""
    slots = {n for s in v.scores.values() for n in s.slots}
    return [a for a in v.arms if a.key in normed and (
        a.strategy == "full" or a.strategy.startswith("full~") or (slots and slots <= set(normed[a.key])))]


def norms_tables(v: StudyView, normed: dict[str, dict]) -> tuple[Table, Table]:
    """Mean norm per arm and role (shown) and per module (tables/ only: one row per module)."""
    roles = sorted({m["role"] for n in normed.values() for m in n.values()}, key=_role_key)
    rows, records, per_module = [], [], []
    for key, norms in normed.items():
        by_role = {r: [m["norm"] for m in norms.values() if m["role"] == r] for r in roles}
        seeds = max(m["seeds"] for m in norms.values())
        rows.append([key, str(seeds), str(len(norms))] + [fmt.num(float(np.mean(x)), 3) if x else "-"
                                                           for x in by_role.values()])
        records.append({"arm": key, "seeds": seeds, "modules": len(norms),
                        **{r: float(np.mean(x)) if x else None for r, x in by_role.items()}})
        per_module += [{"arm": key, "name": n, "role": m["role"], "stack": m.get("stack"), "layer": m.get("layer"),
                        "r": m.get("r"), "norm_mean": m["norm"], "seeds": m["seeds"]} for n, m in norms.items()]
    shown = Table(v.name("adapter-norms"), "Post-hoc importance: Frobenius norm of each trained update "
                  "ΔW = (alpha / r) · B A, mean over the modules of a role and over seeds (per module: "
                  f"tables/{v.name('adapter-norms-modules')}.csv).", ["arm", "seeds", "modules"] + roles, rows, records)
    full = Table(v.name("adapter-norms-modules"), "Frobenius norm of each trained update, mean over seeds.",
                 ["arm", "name", "role", "stack", "layer", "r", "norm", "seeds"],
                 [[str(m[k]) for k in ("arm", "name", "role", "stack", "layer", "r")] + [f"{m['norm_mean']:.4g}",
                                                                                         str(m["seeds"])]
                  for m in per_module], per_module, align="llllrrrr")
    return shown, full


def posthoc_spearman(v: StudyView, arm: ArmResults, norms: dict[str, dict]) -> list[dict[str, Any]]:
    """Per score: Spearman correlation over ``arm``'s modules of the score's gain per parameter
    at the study rank and the trained norm."""
    out = []
    for s in v.scores.values():
        names = [n for n in norms if s.gain_per_param(n, v.rank) is not None]
        rho, p = spearman([s.gain_per_param(n, v.rank) for n in names], [norms[n]["norm"] for n in names])
        out.append({"score": s.score, "arm": arm.key, "modules": len(names), "rho": rho, "p": p})
    return out


def posthoc_part(v: StudyView) -> Part:
    """Trained norms per arm, their agreement with each score, and a heatmap of the full arm's."""
    normed = {a.key: n for a in v.arms if (n := v.norms(a))}
    if not normed:
        return Part()
    shown, per_module = norms_tables(v, normed)
    blocks: list[Block] = [Heading(v.level, "Post-hoc importance: what training changed"), shown]
    tables = [shown, per_module]
    full = _full_arms(v, normed)
    records = [rec for a in full for rec in posthoc_spearman(v, a, normed[a.key])]
    if records:
        rows = [[r["score"], r["arm"], str(r["modules"]), fmt.num(r["rho"], 3), fmt_p(r["p"])] for r in records]
        tables.append(Table(v.name("posthoc-spearman"), f"Does a score predict which modules training changed most? "
                            "Spearman rank correlation, over the modules of an arm that trained every slot, between "
                            f"the score's gain per parameter at r = {v.rank} and the trained update's norm (mean over "
                            "seeds).", ["score", "arm", "n modules", "Spearman rho", "p"], rows, records,
                            align="llrrr"))
        blocks.append(tables[-1])
    if full:
        arm = next((a for a in full if a.strategy == "full"), full[0])
        cells = [(m["role"], m.get("stack"), m.get("layer"), m["norm"]) for m in normed[arm.key].values()]
        blocks += figures.layer_role_heatmap(
            cells, v.fig_dir, v.name(f"adapter_norms_{slug(arm.strategy)}"),
            f"Trained update norms of {arm.key}", "‖ΔW‖ (Frobenius), mean over seeds",
            f"Post-hoc importance: Frobenius norm of each trained update of `{arm.key}`, per layer and role, mean "
            "over seeds.")
    return Part(blocks, tables)


# ------------------------------------------------------------------------------ 5. score validity
def validity_records(v: StudyView) -> list[dict[str, Any]]:
    """Per successful LoRA arm with known modules: measured gain (base minus eval loss, mean over
    seeds; minus the eval loss without a base run) and predicted gain under each score."""
    out = []
    for a in v.arms:
        mods = v.modules(a)
        if not mods:
            continue
        groups = {group_of(m["role"]) if m.get("role") else None for m in mods}
        strategy = _strategy(a.key)
        rec = {"arm": a.key, "budget_params": a.budget_params, "modules": len(mods),
               "role_group": groups.pop() if len(groups) == 1 else None,
               "slot_group": slot_group(strategy.name) if strategy is not None else None,
               "measured_gain": (v.base_loss - a.loss.mean) if v.base_loss is not None else -a.loss.mean}
        for s in v.scores.values():
            rec[f"predicted_{s.score}"], rec[f"scored_{s.score}"] = s.predicted(mods)
        out.append(rec)
    return out


SLOT_GROUPS = "slot groups (each role, each third of the layers)"
"""The validity scope of the ``groups`` arms (:mod:`loraplace.placement.groups`): every slot group
trained alone at one budget, the measured truth a score should rank as training did."""


def trusted_score(summary: list[dict[str, Any]]) -> str | None:
    """One sentence naming the score that ranks the slot groups best (the highest Spearman rho over
    the ``groups`` arms), or None without that scope."""
    rows = [r for r in summary if r["scope"] == SLOT_GROUPS and r["rho"] is not None]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["rho"])
    verdict = ("ranks them as training did" if best["rho"] > 0 and best["p"] < ALPHA
               else "agrees only weakly, not significantly" if best["rho"] > 0 else "does not rank them as training did")
    return (f"Which score to trust on this model: over the {best['n']} slot-group arms (each trained alone at "
            f"the same budget), the {best['score']} score agrees best with the measured gains and {verdict} "
            f"({_rho_text(best['rho'], best['p'], best['n'])}).")


def _concordant(recs: list[dict[str, Any]], key: str) -> tuple[int, int]:
    """Pairs of arms from different role groups that the score orders as training did, of all such pairs."""
    pairs = [(x, y) for i, x in enumerate(recs) for y in recs[i + 1:] if x["role_group"] != y["role_group"]]
    agree = sum((x[key] - y[key]) * (x["measured_gain"] - y["measured_gain"]) > 0 for x, y in pairs)
    return agree, len(pairs)


def validity_summary(v: StudyView, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per score: Spearman over all arms and, when single-group arms span two role groups or
    more, over those arms with the cross-group pairs ordered as training did."""
    single = [r for r in recs if r["role_group"]]
    split = len({r["role_group"] for r in single}) > 1
    grouped = [r for r in recs if r["slot_group"]]
    scopes = (("all arms", recs),) + ((("single-group arms", single),) if split else ()) + (
        ((SLOT_GROUPS, grouped),) if len(grouped) >= 3 else ())
    out = []
    for s in v.scores.values():
        key = f"predicted_{s.score}"
        for scope, rs in scopes:
            rho, p = spearman([r[key] for r in rs], [r["measured_gain"] for r in rs])
            rec = {"score": s.score, "scope": scope, "n": len(rs), "rho": rho, "p": p}
            if scope == "single-group arms":
                rec["cross_group_agree"], rec["cross_group_pairs"] = _concordant(rs, key)
            out.append(rec)
    return out


def reading(rec: dict[str, Any]) -> str:
    """One sentence on one score's rank agreement with training."""
    what = f"the {rec['score']} score"
    scope = "" if rec["scope"] == "all arms" else f" among the {rec['scope']}"
    nums = _rho_text(rec["rho"], rec["p"], rec["n"])
    if rec["rho"] is None:
        text = f"{what} cannot be checked{scope} ({nums}: fewer than three arms, or constant values)"
    elif rec["rho"] > 0 and rec["p"] < ALPHA:
        text = f"{what} ranks the arms{scope} as training did ({nums})"
    elif rec["rho"] > 0:
        text = f"{what} agrees with training{scope} only weakly, not significantly ({nums})"
    else:
        text = f"{what} does not rank the arms{scope} as training did ({nums})"
    if "cross_group_pairs" in rec:
        text += (f"; it orders {rec['cross_group_agree']} of {rec['cross_group_pairs']} pairs of arms from different "
                 "role groups as training did")
    return text[0].upper() + text[1:] + "."


def validity_part(v: StudyView) -> Part:
    """Predicted against measured gain per arm, and the rank agreement per score."""
    recs = validity_records(v) if v.scores else []
    if not recs:
        return Part()
    scores = list(v.scores)
    gain = "base eval loss minus the arm's" if v.base_loss is not None else "minus the arm's eval loss (no base run)"
    rows = [[r["arm"], fmt.params(r["budget_params"]), r["role_group"] or "mixed", fmt.num(r["measured_gain"])]
            + [f"{r[f'predicted_{s}']:.4g}" for s in scores] for r in recs]
    per_arm = Table(v.name("score-validity"), "Predicted gain of each arm's placement under each score (sum over its "
                    "modules of the curve at the module's rank) against the measured gain (" + gain + ", mean over "
                    "seeds).", ["arm", "trainable params", "role group", "measured gain"]
                    + [f"predicted ({s})" for s in scores], rows, recs, align="lrlr" + "r" * len(scores))
    summary = validity_summary(v, recs)
    srows = [[r["score"], r["scope"], str(r["n"]), fmt.num(r["rho"], 3), fmt_p(r["p"]),
              f"{r['cross_group_agree']}/{r['cross_group_pairs']}" if "cross_group_pairs" in r else "-"]
             for r in summary]
    table = Table(v.name("score-validity-summary"), "Does each score rank the arms as training did? Spearman rank "
                  "correlation of predicted and measured gain over arms; single-group arms: arms whose modules all "
                  "belong to one role group (attention, ffn, ...), with the pairs of arms from different groups "
                  "ordered as training did; slot groups: the `groups` arms, each role and each third of the layers "
                  "trained alone at one budget (the truth a score should predict).", ["score", "arms", "n", "Spearman rho", "p", "cross-group pairs agreeing"],
                  srows, summary, align="llrrrr")
    note = "" if v.base_loss is not None else (" The study has no base-model run, so the measured gain is minus "
                                               "the eval loss (the ranking is the same).")
    trust = trusted_score(summary)
    blocks: list[Block] = [Heading(v.level, "Do the scores predict what training gave?"), per_arm, table,
                           Bullets([reading(r) for r in summary] + ([trust] if trust else []))]
    if note:
        blocks.insert(1, Para(note.strip()))
    return Part(blocks, [per_arm, table])


# ---------------------------------------------------------------------------------- the sections
BEFORE_TRAINING = (importance_part, allocation_part)
AFTER_TRAINING = (versus_part, posthoc_part, validity_part)


def study_views(ctx: ReportContext) -> list[StudyView]:
    """One view per study that holds importance or allocation files, in its comparison group."""
    several = len(ctx.studies) > 1
    return [StudyView(s, next(g for g in ctx.groups if any(a.study is s for a in g.arms)), ctx.fig_dir,
                      prefix=f"{slug(s.label)}-" if several else "", level=4 if several else 3)
            for s in ctx.auto_studies]


def _study_part(v: StudyView, parts: tuple, heading: bool) -> Part:
    out = Part()
    for part in parts:
        out += part(v)
    if heading and out.blocks:
        out.blocks.insert(0, Heading(3, f"Study: {v.study.label}"))
    return out


def before_training_section(ctx: ReportContext) -> Part:
    """The automatic-placement section's title and, per study with importance or allocation
    files (none: no section), the importance scores and the chosen allocations."""
    views = study_views(ctx)
    if not views:
        return Part()
    out = Part([Heading(2, TITLE, "auto"), Para(
        "Which modules matter, predicted before training by importance scores and measured after it, and whether "
        "placing adapters by those predictions beats placing them by hand at the same parameter budget.")])
    for v in views:
        out += _study_part(v, BEFORE_TRAINING, heading=len(ctx.studies) > 1)
    return out


def after_training_section(ctx: ReportContext) -> Part:
    """Per study with importance or allocation files: each automatic arm against the arms of its
    budget, the post-hoc norms, and whether the scores predicted what training gave. With several
    such studies each is headed again; with one, its heading of the part before training stands."""
    views = study_views(ctx.verdicts)
    out = Part()
    if ctx.tuned is not None and views:
        out.blocks.append(Para("**At tuned learning rates** (as the recommendations): from here on, every arm at the "
                               "rate its tuning chose, its test loss, and the paired comparisons at those rates."))
    for v in views:
        out += _study_part(v, AFTER_TRAINING, heading=len(views) > 1)
    return out
