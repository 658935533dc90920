"""The report's tables, built as :class:`~loraplace.report.doc.Table` (display strings for
Markdown/HTML/LaTeX, raw values for CSV)."""

from __future__ import annotations

from loraplace.report import fmt
from loraplace.report.analysis import Arm, Group
from loraplace.report.doc import Table
from loraplace.report.load import Study
from loraplace.report.perplexity import aggregations
from loraplace.report.stats import ALPHA, fmt_p


def _full_params(arm: Arm, arms: list[Arm]) -> int | None:
    full = next((a for a in arms if a.study is arm.study and a.strategy == "full" and a.n), None)
    return full.trainable_params if full else None


def _iv_fields(prefix: str, iv) -> dict:
    if iv is None:
        return {f"{prefix}_mean": None, f"{prefix}_sd": None, f"{prefix}_ci_low": None, f"{prefix}_ci_high": None}
    return {f"{prefix}_mean": iv.mean, f"{prefix}_sd": iv.sd, f"{prefix}_ci_low": iv.low, f"{prefix}_ci_high": iv.high}


def summary_table(arms: list[Arm]) -> Table:
    headers = ["strategy", "seeds", "trainable params", "% of full", "eval loss", "sd", "95% CI",
               "perplexity", "ppl 95% CI", "train time (s)", "tokens/s", "peak MiB"]
    rows, records = [], []
    for a in arms:
        if a.n == 0:
            rows.append([a.key, f"0 ok / {len(a.failed)} failed"] + ["-"] * (len(headers) - 2))
            records.append({"study": a.study.label, "strategy": a.strategy, "kind": a.kind, "n_ok": 0,
                            "n_failed": len(a.failed)})
            continue
        full = _full_params(a, arms)
        pct = 100.0 * a.trainable_params / full if full and a.kind == "lora" else None
        seeds = f"{a.n}" + (f" (+{len(a.failed)} failed)" if a.failed else "")
        tt = a.train_time
        rows.append([
            a.key, seeds, fmt.params(a.trainable_params), fmt.num(pct, 1), fmt.num(a.loss.mean),
            fmt.num(a.loss.sd), fmt.ci_only(a.loss), fmt.num(a.perplexity and a.perplexity.mean, 3),
            fmt.ci_only(a.perplexity, 3),
            "-" if tt is None else (f"{tt.mean:.1f} ± {tt.sd:.1f}" if tt.sd is not None else f"{tt.mean:.1f}"),
            "-" if a.throughput is None else f"{a.throughput.mean:.0f}",
            "-" if a.peak_memory is None else f"{a.peak_memory.mean:.0f}",
        ])
        records.append({"study": a.study.label, "strategy": a.strategy, "kind": a.kind, "n_ok": a.n,
                        "n_failed": len(a.failed), "seeds": " ".join(map(str, a.seeds)),
                        "trainable_params": a.trainable_params, "params_vs_full_pct": pct,
                        **_iv_fields("eval_loss", a.loss), **_iv_fields("perplexity", a.perplexity),
                        **_iv_fields("accuracy", a.accuracy),
                        **_iv_fields("train_time_s", a.train_time), **_iv_fields("tokens_per_s", a.throughput),
                        **_iv_fields("peak_memory_mib", a.peak_memory)})
    if any(a.n and a.accuracy is not None for a in arms):  # classification studies: accuracy beside the loss
        headers = headers + ["accuracy", "acc 95% CI"]
        for row, a in zip(rows, arms):
            row += ["-", "-"] if not a.n or a.accuracy is None else [fmt.num(a.accuracy.mean, 3), fmt.ci_only(a.accuracy, 3)]
    return Table("summary", "Eval loss (nats/token) and perplexity per strategy: mean, sample sd and 95% "
                 "t-distribution CI over seeds (undefined with one seed). Perplexity = exp(token-weighted mean NLL) "
                 "of each run, averaged over seeds.", headers, rows, records,
                 align="lrrrrrlrlrrr" + "rl" * (len(headers) > 12))


def comparison_table(g: Group, several_groups: bool) -> Table | None:
    ref = g.reference
    comps = g.vs_reference
    if ref is None or not comps:
        return None
    headers = ["strategy", f"Δ eval loss vs {ref.key}", "95% CI", "p", "Holm p", "verdict", "seeds", "examples"]
    rows, records = [], []
    for c in comps:
        sig = c.significant()
        verdict = ("n.s. (cannot separate)" if not sig else "better" if c.diff < 0 else "worse")
        p_holm = fmt_p(c.p_adjusted)
        if fmt_p(c.p_value, c.resamples).startswith("<"):  # the raw p is only a bound: so is Holm's
            p_holm = "<" + p_holm if c.p_adjusted < 1 else p_holm
        rows.append([c.a, fmt.diff(c.diff), f"[{fmt.diff(c.low)}, {fmt.diff(c.high)}]", fmt_p(c.p_value, c.resamples),
                     p_holm, verdict, ",".join(map(str, c.seeds)), str(c.examples)])
        records.append({"group": g.name, "strategy": c.a, "reference": c.b, "diff": c.diff, "ci_low": c.low,
                        "ci_high": c.high, "p_value": c.p_value, "p_holm": c.p_adjusted, "significant": sig,
                        "seeds": " ".join(map(str, c.seeds)), "examples": c.examples, "resamples": c.resamples})
    name = "comparison" + (f"-{g.name}" if several_groups else "")
    return Table(name, f"Paired comparison against **{ref.key}** on the shared eval set: Δ = eval loss minus "
                 f"{ref.key}'s (negative: better), paired bootstrap over eval examples"
                 f"{' and seeds' if max(len(c.seeds) for c in comps) > 1 else ''} "
                 f"({comps[0].resamples:,} resamples), percentile 95% CI, two-sided p; Holm-adjusted over the "
                 f"{len(comps)} comparisons. n.s.: Holm p ≥ {ALPHA:g}.", headers, rows, records,
                 align="lrlrrlll")


def perplexity_table(study: Study, arms: list[Arm]) -> tuple[Table, list] | None:
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
    headers = ["run", "seed", "status", "trainable", "eval loss", "perplexity", "eval tokens", "train s", "tokens/s",
               "peak MiB"]
    several = len(studies) > 1
    rows, records = [], []
    for s in studies:
        for run in s.runs:
            r = run.result
            rid = f"{s.label}/{r.run_id}" if several else r.run_id
            status = "ok" if r.status == "ok" else f"failed: {r.error}"
            rows.append([rid, str(r.seed), status, fmt.params(r.trainable_params), fmt.num(r.eval_loss),
                         fmt.num(r.perplexity, 3), fmt.params(r.eval_tokens), fmt.num(r.train_time_s, 1),
                         fmt.num(r.train_tokens_per_s, 0), fmt.num(r.peak_memory_mib, 0)])
            records.append({"study": s.label, **{k: v for k, v in r.model_dump().items()
                                                 if k not in ("modules", "roles", "warnings", "versions")}})
    return Table("runs", "Every run (failed runs are excluded from the statistics).", headers, rows, records,
                 align="lrlrrrrrrr")


def setup_table(studies: list[Study]) -> Table:
    def first_ok(s: Study):
        return next((r.result for r in s.runs if r.ok and r.result.kind == "lora"),
                    next((r.result for r in s.runs if r.ok), s.runs[0].result))

    def get(d: dict, path: str):
        for part in path.split("."):
            d = (d or {}).get(part) if isinstance(d, dict) else None
        return d

    keys = [("model", "model"), ("dataset", "dataset"), ("strategies", "strategies"), ("seeds", "seeds"),
            ("LoRA r", "lora.r"), ("LoRA alpha", "lora.alpha"), ("LoRA dropout", "lora.dropout"),
            ("learning rate", "train.lr"), ("batch size", "train.batch_size"), ("grad accumulation", "train.grad_accum"),
            ("optimizer steps", "train.max_steps"), ("warm-up steps", "train.warmup_steps"),
            ("weight decay", "train.weight_decay"), ("scheduler", "train.scheduler"), ("max length", "train.max_length"),
            ("loss on", "train.loss_on"), ("precision setting", "train.precision"),
            ("eval examples", "data.eval_size"), ("split seed", "data.split_seed"),
            ("max train examples", "data.max_train_examples"), ("device setting", "device")]
    rows = []
    for label, path in keys:
        vals = []
        for s in studies:
            v = get(s.config, path)
            vals.append(", ".join(map(str, v)) if isinstance(v, list) else "-" if v is None else str(v))
        rows.append([label] + vals)
    extra = [("base parameters", lambda r: fmt.params(r.base_params)), ("eval tokens", lambda r: fmt.params(r.eval_tokens)),
             ("device", lambda r: r.device or "-"), ("precision used", lambda r: r.precision or "-"),
             ("memory measure", lambda r: r.memory_kind or "-")]
    for label, f in extra:
        rows.append([label] + [f(first_ok(s)) for s in studies])
    libs = list(dict.fromkeys(k for s in studies for k in first_ok(s).versions))
    for lib in libs:
        rows.append([f"{lib} version"] + [first_ok(s).versions.get(lib, "-") for s in studies])
    headers = ["setting"] + [s.label or s.name for s in studies]
    records = [dict(zip(headers, row)) for row in rows]
    return Table("setup", "Setup: model, data, hyperparameters, hardware and library versions.", headers, rows,
                 records, align="l" * len(headers))
