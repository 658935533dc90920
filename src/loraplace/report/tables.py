"""The report's tables, built as :class:`~loraplace.report.doc.Table` (display strings for
Markdown/HTML/LaTeX, raw values for CSV)."""

from __future__ import annotations

from loraplace.placement.arms import REFERENCE_STRATEGY
from loraplace.report import fmt
from loraplace.report.analysis import ArmResults, Group, memory_measure, run_label, worse_than_base
from loraplace.report.doc import Table
from loraplace.report.load import Study
from loraplace.report.perplexity import aggregations
from loraplace.report.stats import ALPHA, PairedComparison, fmt_p

PROCESS_PEAK = "†"  # marks a process-wide peak (studies stored before the run-start memory was recorded)


def _full_params(arm: ArmResults, arms: list[ArmResults]) -> int | None:
    full = next((a for a in arms if a.study is arm.study and a.strategy == REFERENCE_STRATEGY and a.n), None)
    return full.trainable_params if full else None


def _iv_fields(prefix: str, iv) -> dict:
    if iv is None:
        return {f"{prefix}_mean": None, f"{prefix}_sd": None, f"{prefix}_ci_low": None, f"{prefix}_ci_high": None}
    return {f"{prefix}_mean": iv.mean, f"{prefix}_sd": iv.sd, f"{prefix}_ci_low": iv.low, f"{prefix}_ci_high": iv.high}


def _memory_short(kinds: set[str]) -> str:
    if len(kinds) != 1:
        return "mixed" if kinds else "?"
    kind = next(iter(kinds))
    return {"rss": "RSS", "cuda_allocated": "CUDA alloc.", "cuda_max_allocated": "CUDA alloc."}.get(kind, kind)


def memory_note(arms: list[ArmResults]) -> str:
    """What the memory columns measure (the summary table's notes and the methods)."""
    kinds = {k for a in arms for k in a.memory_kinds}
    lora = [a for a in arms if a.n]
    measure = " and ".join(memory_measure(k) for k in sorted(kinds)) or "not recorded"
    parts = [f"Memory ({measure}, MiB, mean over seeds): **added** = the run's peak minus the memory in use when "
             "it started (the loaded base model and data), i.e. the increase over the loaded model, what the run "
             "itself needed; **peak** = the run's own peak, which includes the loaded model."]
    if len(kinds) > 1:
        parts.append("The arms were measured differently (process RSS on CPU vs CUDA max allocated): their memory "
                     "figures are not comparable.")
    if any(a.memory_added is None and a.peak_memory is not None for a in lora):
        parts.append(f"{PROCESS_PEAK} No start recorded (a study stored before it was): the peak shown is the "
                     "process peak, which includes the loaded model and memory held from earlier runs of the same "
                     "process, not the run's own increase.")
    return " ".join(parts)


def _seeds_cell(a: ArmResults) -> str:
    extra = [f"+{len(a.failed)} failed"] if a.failed else []
    extra += [f"+{len(a.diverged)} **diverged**"] if a.diverged else []
    return f"{a.n}" + (f" ({', '.join(extra)})" if extra else "")


def _key_cell(a: ArmResults) -> str:
    worse = a.worse_than_base
    return a.key + (f" (**worse than base**: {len(worse)}/{a.n})" if worse else "")


def summary_table(arms: list[ArmResults], order_note: str = "") -> Table:
    kinds = {k for a in arms for k in a.memory_kinds}
    short = _memory_short(kinds)
    headers = ["strategy", "seeds", "trainable params", f"% of {REFERENCE_STRATEGY}", "eval loss", "sd", "95% CI",
               "perplexity", "ppl 95% CI", "train time (s)", "tokens/s", f"added MiB ({short})", f"peak MiB ({short})"]
    rows, records = [], []
    for a in arms:
        if a.n == 0:
            status = f"0 ok / {len(a.failed)} failed" + (f" / {len(a.diverged)} **diverged**" if a.diverged else "")
            rows.append([a.key, status] + ["-"] * (len(headers) - 2))
            records.append({"study": a.study.label, "strategy": a.strategy, "kind": a.kind, "n_ok": 0,
                            "n_failed": len(a.failed), "n_diverged": len(a.diverged)})
            continue
        full = _full_params(a, arms)
        pct = 100.0 * a.trainable_params / full if full and a.kind == "lora" else None
        tt = a.train_time
        peak = "-" if a.peak_memory is None else f"{a.peak_memory.mean:,.0f}"
        if a.peak_memory is not None and a.memory_added is None:
            peak += " " + PROCESS_PEAK
        rows.append([
            _key_cell(a), _seeds_cell(a), fmt.params(a.trainable_params), fmt.num(pct, 1), fmt.num(a.loss.mean),
            fmt.num(a.loss.sd), fmt.ci_only(a.loss), fmt.num(a.perplexity and a.perplexity.mean, 3),
            fmt.ci_only(a.perplexity, 3),
            "-" if tt is None else (f"{tt.mean:.1f} ± {tt.sd:.1f}" if tt.sd is not None else f"{tt.mean:.1f}"),
            "-" if a.throughput is None else f"{a.throughput.mean:.0f}",
            "-" if a.memory_added is None else f"{a.memory_added.mean:,.0f}", peak,
        ])
        records.append({"study": a.study.label, "strategy": a.strategy, "kind": a.kind, "n_ok": a.n,
                        "n_failed": len(a.failed), "n_diverged": len(a.diverged),
                        "n_worse_than_base": len(a.worse_than_base), "seeds": " ".join(map(str, a.seeds)),
                        "trainable_params": a.trainable_params, "params_vs_full_pct": pct,
                        **_iv_fields("eval_loss", a.loss), **_iv_fields("perplexity", a.perplexity),
                        **_iv_fields("accuracy", a.accuracy),
                        **_iv_fields("train_time_s", a.train_time), **_iv_fields("tokens_per_s", a.throughput),
                        **_iv_fields("memory_added_mib", a.memory_added),
                        **_iv_fields("memory_start_mib", a.memory_start),
                        **_iv_fields("peak_memory_mib", a.peak_memory),
                        "memory_kind": " ".join(a.memory_kinds),
                        "peak_is_process_peak": a.peak_memory is not None and a.memory_added is None})
    if any(a.n and a.accuracy is not None for a in arms):  # classification studies: accuracy beside the loss
        headers = headers + ["accuracy", "acc 95% CI"]
        for row, a in zip(rows, arms):
            row += ["-", "-"] if not a.n or a.accuracy is None else [fmt.num(a.accuracy.mean, 3), fmt.ci_only(a.accuracy, 3)]
    notes = [memory_note(arms)]
    if any(a.diverged for a in arms):
        notes.append("**diverged** runs are listed but kept out of every statistic, front and recommendation.")
    if any(a.worse_than_base for a in arms):
        notes.append("**worse than base**: runs whose eval loss ends above the base model's; they stay in the "
                     "statistics.")
    if order_note:
        notes.append(order_note)
    return Table("summary", "Eval loss (nats/token) and perplexity per strategy: mean, sample sd and 95% "
                 "t-distribution CI over seeds (undefined with one seed). Perplexity = exp(token-weighted mean NLL) "
                 "of each run, averaged over seeds.", headers, rows, records,
                 align="lrrrrrlrlrrrr" + "rl" * (len(headers) > 13), notes=" ".join(notes))


def _verdict(c: PairedComparison) -> str:
    return "n.s. (cannot separate)" if not c.significant() else "better" if c.diff < 0 else "worse"


def _comparison_record(g: Group, c: PairedComparison) -> dict:
    return {"group": g.name, "strategy": c.a, "reference": c.b, "diff": c.diff, "ci_low": c.low,
            "ci_high": c.high, "p_value": c.p_value, "p_holm": c.p_adjusted, "family_size": c.family_size,
            "significant": c.significant(), "seeds": " ".join(map(str, c.seeds)), "examples": c.examples,
            "resamples": c.resamples}


def comparison_table(g: Group, several_groups: bool) -> Table | None:
    ref = g.reference
    comps = g.vs_reference
    if ref is None or not comps:
        return None
    headers = ["strategy", f"Δ eval loss vs {ref.key}", "95% CI", "p", "Holm p", "verdict", "seeds", "examples"]
    rows, records = [], []
    for c in comps:
        rows.append([c.a, fmt.diff(c.diff), f"[{fmt.diff(c.low)}, {fmt.diff(c.high)}]", fmt_p(c.p_value, c.resamples),
                     fmt.p_holm(c), _verdict(c), ",".join(map(str, c.seeds)), str(c.examples)])
        records.append(_comparison_record(g, c))
    name = "comparison" + (f"-{g.name}" if several_groups else "")
    return Table(name, f"Paired comparison against **{ref.key}** on the shared eval set: Δ = eval loss minus "
                 f"{ref.key}'s (negative: better), paired bootstrap over eval examples"
                 f"{' and seeds' if max(len(c.seeds) for c in comps) > 1 else ''} "
                 f"({comps[0].resamples:,} resamples), percentile 95% CI, two-sided p; Holm p: adjusted over all "
                 f"{comps[0].family_size} pairwise comparisons of the group's arms (the pairwise table). "
                 f"n.s.: Holm p ≥ {ALPHA:g}.", headers, rows, records,
                 align="lrlrrlll")


def pairwise_table(g: Group, several_groups: bool) -> Table | None:
    """Every pair of the group's arms: the family the Holm adjustment (and every verdict) uses."""
    comps = list(g.family.values())
    if len(comps) < 2:
        return None
    headers = ["a", "b", "Δ eval loss (a − b)", "95% CI", "p", "Holm p", "verdict"]
    rows = [[c.a, c.b, fmt.diff(c.diff), f"[{fmt.diff(c.low)}, {fmt.diff(c.high)}]", fmt_p(c.p_value, c.resamples),
             fmt.p_holm(c), _verdict(c).replace("better", "a better").replace("worse", "a worse")] for c in comps]
    records = [_comparison_record(g, c) for c in comps]
    name = "pairwise" + (f"-{g.name}" if several_groups else "")
    return Table(name, f"Every pair of arms{f' of {g.name}' if several_groups else ''}: paired bootstrap of the "
                 f"eval-loss difference, raw p and Holm p adjusted over these {len(comps)} comparisons (the family "
                 "every verdict of the report reads).", headers, rows, records, align="llrlrrl")


def perplexity_table(study: Study, arms: list[ArmResults]) -> tuple[Table, list] | None:
    """Aggregations on the first seed's run of each arm of ``study``."""
    runs = []
    for a in arms:
        if a.study is study and a.n and a.runs[0].eval_examples is not None:
            runs.append((a, a.runs[0]))
    if not runs:
        return None
    per_run = [(a, r, aggregations(r.eval_examples)) for a, r in runs]
    first = per_run[0][2]
    headers = ["aggregation", "formula"] + [r.result.run_id for _, r, _ in per_run]
    rows, records = [], []
    for i, agg in enumerate(first):
        row = [agg.name, agg.formula]
        for _, r, aggs in per_run:
            x, correct = aggs[i], aggs[0].value
            if x.value is None:
                row.append("not recorded")
            elif x.correct:
                row.append(f"{x.value:.4g}")
            else:
                rel = x.relative_to(correct)
                row.append(f"{x.value:.4g} ({rel:+.2%})" if rel is not None else f"{x.value:.4g}")
            records.append({"study": study.label, "run_id": r.result.run_id, "aggregation": x.key,
                            "value": x.value, "relative_to_correct": x.relative_to(correct)})
        rows.append(row)
    return Table(f"perplexity-{study.label}" if study.label else "perplexity",
                 "Perplexity of the same runs under different aggregations of the same per-example NLLs "
                 "(relative difference to the correct value in brackets).", headers, rows, records,
                 align="ll" + "r" * len(per_run)), per_run


def runs_table(studies: list[Study]) -> Table:
    short = _memory_short({run.result.memory_kind for s in studies for run in s.runs if run.result.memory_kind})
    headers = ["run", "seed", "order", "status", "trainable", "eval loss", "perplexity", "eval tokens", "train s",
               "tokens/s", f"added MiB ({short})", "peak MiB", "start MiB"]
    several = len(studies) > 1
    rows, records = [], []
    for s in studies:
        for run in s.runs:
            r = run.result
            worse = worse_than_base(run, s)
            if run.diverged:
                status = f"**diverged** (excluded): {r.diverged_reason or r.error or 'no reason recorded'}"
            elif r.status != "ok":
                status = f"failed: {r.error}"
            else:
                status = "ok" + (", **worse than base**" if worse else "")
            peak = fmt.num(r.peak_memory_mib, 0)
            if r.peak_memory_mib is not None and r.peak_memory_increase_mib is None:
                peak += " " + PROCESS_PEAK
            rows.append([run_label(run, s, several), str(r.seed), "-" if r.position is None else str(r.position),
                         status, fmt.params(r.trainable_params), fmt.num(r.eval_loss),
                         fmt.num(r.perplexity, 3), fmt.params(r.eval_tokens), fmt.num(r.train_time_s, 1),
                         fmt.num(r.train_tokens_per_s, 0), fmt.num(r.peak_memory_increase_mib, 0), peak,
                         fmt.num(r.memory_start_mib, 0)])
            records.append({"study": s.label, **{k: v for k, v in r.model_dump().items()
                                                 if k not in ("modules", "roles", "warnings", "versions")},
                            "worse_than_base": worse})
    return Table("runs", "Every run. Failed and **diverged** runs are excluded from the statistics; runs that end "
                 "**worse than base** (eval loss above the base model's) stay in them. order: the run's place in the "
                 "study's execution order (0 = first; - = not recorded). Memory: added = peak minus start (the memory "
                 f"in use when the run started: loaded model and data); {PROCESS_PEAK}: process peak, start not "
                 "recorded.", headers, rows, records, align="lrrlrrrrrrrrr")


def setup_table(studies: list[Study]) -> Table:
    def first_ok(s: Study):
        return next((r.result for r in s.runs if r.ok and r.result.kind == "lora"),
                    next((r.result for r in s.runs if r.ok), s.runs[0].result))

    def get(d: dict, path: str):
        for part in path.split("."):
            d = (d or {}).get(part) if isinstance(d, dict) else None
        return d

    keys = [("model", "model"), ("dataset", "dataset"), ("strategies", "strategies"), ("seeds", "seeds"),
            ("LoRA r", "lora.r"), ("LoRA alpha", "lora.alpha"), ("LoRA update-scale rule", "lora.scale"),
            ("LoRA dropout", "lora.dropout"),
            ("learning rate", "train.lr"), ("batch size", "train.batch_size"), ("grad accumulation", "train.grad_accum"),
            ("optimizer steps", "train.max_steps"), ("warm-up steps", "train.warmup_steps"),
            ("weight decay", "train.weight_decay"), ("scheduler", "train.scheduler"), ("max length", "train.max_length"),
            ("loss on", "train.loss_on"), ("precision setting", "train.precision"),
            ("eval examples", "data.eval_size"), ("split seed", "data.split_seed"),
            ("max train examples", "data.max_train_examples"), ("device setting", "device"),
            ("gradient checkpointing setting", "train.gradient_checkpointing"),
            ("gradient checkpointing, decided once for every arm", "decided.gradient_checkpointing_reason")]
    rows = []
    for label, path in keys:
        vals = []
        for s in studies:
            v = get(s.config, path)
            vals.append(", ".join(map(str, v)) if isinstance(v, list) else "-" if v is None else str(v))
        rows.append([label] + vals)
    extra = [("base parameters", lambda r: fmt.params(r.base_params)), ("eval tokens", lambda r: fmt.params(r.eval_tokens)),
             ("device", lambda r: r.device or "-"), ("precision used", lambda r: r.precision or "-"),
             ("memory measure", lambda r: r.memory_kind or "-"),
             ("gradient checkpointing used", lambda r: str((r.speed_choices or {}).get("gradient_checkpointing", "-")).split(" ")[0])]
    def every(s: Study, f) -> str:  # every distinct value among the study's ok runs (mixed: all of them)
        values = list(dict.fromkeys(f(r.result) for r in s.runs if r.ok)) or [f(first_ok(s))]
        return " / ".join(values) + (" (**mixed**)" if len(values) > 1 else "")

    for label, f in extra:
        rows.append([label] + [every(s, f) for s in studies])
    libs = list(dict.fromkeys(k for s in studies for r in s.runs for k in r.result.versions))
    for lib in libs:
        rows.append([f"{lib} version"] + [every(s, lambda r, lib=lib: r.versions.get(lib, "-")) for s in studies])
    headers = ["setting"] + [s.label or s.name for s in studies]
    records = [dict(zip(headers, row)) for row in rows]
    return Table("setup", "Setup: model, data, hyperparameters, hardware and library versions.", headers, rows,
                 records, align="l" * len(headers))
