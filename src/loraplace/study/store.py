"""The study folder: the study's config, one folder per run, and the results table, rewritten
after every run (atomically) so that a crash or Ctrl-C loses nothing that finished.

Layout::

    STUDY_DIR/
      study.yaml            resolved study config
      results.json          {"study": {...}, "runs": [RunResult, ...]}
      results.csv           one row per run
      results.md            the table a person reads
      runs/<run_id>/        config.json, modules.json, train_log.json, eval_examples.json, result.json
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import yaml

from loraplace.config import StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.study.runs import RunResult, RunSpec

CSV_COLUMNS = [
    "run_id", "strategy", "seed", "status", "r", "alpha", "match_budget", "budget_target", "budget_deviation_pct",
    "trainable_params", "total_params", "trainable_pct",
    "params_vs_full_pct", "eval_loss", "perplexity", "delta_eval_loss", "delta_eval_loss_pct", "eval_tokens",
    "train_time_s", "train_steps", "train_real_tokens", "train_tokens_per_s", "eval_time_s", "peak_memory_mib",
    "memory_kind", "device", "precision", "error",
]


def default_output_dir(config: StudyConfig) -> Path:
    return Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def study_arms(config: StudyConfig) -> list[str]:
    """The study's arm labels in order: every strategy, each followed by its budget-matched arm
    (``attention~full``) when ``match_budget`` is set. The reference strategy itself has no
    matched arm: it would repeat the unmatched one."""
    from loraplace.placement import arm_label, parse_strategy

    arms = []
    for strategy in config.strategies:
        arms.append(strategy)
        reference = config.match_budget
        if reference is not None and parse_strategy(strategy).name != reference:
            arms.append(arm_label(parse_strategy(strategy).name, reference))
    return arms


def run_id_for(arm: str, seed: int) -> str:
    """A run id that is also a safe folder name: characters of the strategy language that
    paths or shells treat specially (``/ | * [ ]``, spaces) become ``_``."""
    return re.sub(r"[^A-Za-z0-9._@+=~,:%-]", "_", arm) + f"-s{seed}"


def run_specs(config: StudyConfig, study_dir: Path) -> list[RunSpec]:
    """The study's jobs: the base model row (once), then every arm x seed.

    Raises:
        LoraplaceError: two strategies whose run ids (safe folder names) coincide.
    """
    common = dict(model=config.model, dataset=config.dataset, lora=config.lora, train=config.train,
                  data=config.data, device=config.device, task=config.task)
    specs = []
    if config.include_base:
        specs.append(RunSpec(run_id="base", kind="base", strategy="base", seed=config.seeds[0],
                             run_dir=str(study_dir / "runs" / "base"), **common))
    arms = study_arms(config)
    for seed in config.seeds:
        for arm in arms:
            run_id = run_id_for(arm, seed)
            specs.append(RunSpec(run_id=run_id, strategy=arm, seed=seed,
                                 run_dir=str(study_dir / "runs" / run_id), **common))
    ids = [s.run_id for s in specs]
    clash = sorted({i for i in ids if ids.count(i) > 1})
    if clash:
        raise LoraplaceError(
            f"strategies {', '.join(a for a in arms if run_id_for(a, 0)[:-3] in {c.rsplit('-s', 1)[0] for c in clash})} "
            f"share the run id {clash[0]!r}; write them differently (e.g. list layers instead of a fraction)"
        )
    return specs


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class StudyStore:
    """Reads and writes one study folder."""

    def __init__(self, study_dir: Path):
        self.dir = Path(study_dir)

    @property
    def results_path(self) -> Path:
        return self.dir / "results.json"

    def init(self, config: StudyConfig, resume: bool) -> dict[str, RunResult]:
        """Create the folder (or reopen it with ``resume``); returns finished runs by id."""
        existing = self.results_path.exists()
        if existing and not resume:
            raise LoraplaceError(
                f"{self.dir} already holds a study; pass --resume to continue it or choose another --output"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume and existing:
            stored = yaml.safe_load((self.dir / "study.yaml").read_text()) if (self.dir / "study.yaml").exists() else None
            # A resumed study may grow (more seeds, strategies or a budget-matched set of arms);
            # everything that changes what a finished run means must stay the same.
            growable = {"output", "seeds", "strategies", "match_budget", "include_base"}
            if stored is not None and StudyConfig.model_validate(stored).model_dump(exclude=growable) != config.model_dump(exclude=growable):
                raise LoraplaceError(
                    f"--resume: the study in {self.dir} was run with a different config (only seeds, strategies, "
                    "match_budget and include_base may change on resume); rerun with the same study file and "
                    "overrides, or use a new --output"
                )
        (self.dir / "study.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
        return {r.run_id: r for r in self.load() if r.status == "ok"} if resume else {}

    def load(self) -> list[RunResult]:
        if not self.results_path.exists():
            return []
        data = json.loads(self.results_path.read_text())
        return [RunResult.model_validate(r) for r in data["runs"]]

    def save(self, config: StudyConfig, results: list[RunResult]) -> None:
        """Fill in the cross-run fields and rewrite results.json/.csv/.md atomically."""
        results = with_baseline_fields(results)
        payload = {"study": config.model_dump(), "runs": [r.model_dump() for r in results]}
        self._atomic_write(self.results_path, json.dumps(payload, indent=2))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow(r.model_dump())
        self._atomic_write(self.dir / "results.csv", buf.getvalue())
        self._atomic_write(self.dir / "results.md", markdown_table(config, results))

    @staticmethod
    def _atomic_write(path: Path, text: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def with_baseline_fields(results: list[RunResult]) -> list[RunResult]:
    """Set ``params_vs_full_pct`` and ``delta_eval_loss(_pct)`` against the ``full`` run of the same
    seed (the study's full-LoRA baseline)."""
    full = {r.seed: r for r in results if r.strategy == "full" and r.status == "ok"}
    out = []
    for r in results:
        ref = full.get(r.seed)
        update: dict[str, Any] = {}
        if ref is not None and r.kind == "lora" and r.trainable_params is not None:
            update["full_lora_params"] = ref.trainable_params
            update["params_vs_full_pct"] = 100.0 * r.trainable_params / ref.trainable_params
        if ref is not None and r.eval_loss is not None and ref.eval_loss is not None:
            update["delta_eval_loss"] = r.eval_loss - ref.eval_loss
            update["delta_eval_loss_pct"] = 100.0 * (r.eval_loss - ref.eval_loss) / ref.eval_loss
        out.append(r.model_copy(update=update))
    return out


def markdown_table(config: StudyConfig, results: list[RunResult]) -> str:
    head = (
        f"# {config.name}: LoRA placement study\n\n"
        f"Model `{config.model}`, data `{config.dataset}`, r={config.lora.r}, alpha={config.lora.alpha:g}, "
        f"dropout={config.lora.dropout:g}, lr={config.train.lr:g}, {config.train.max_steps} steps x "
        f"batch {config.train.batch_size * config.train.grad_accum}, max length {config.train.max_length}, "
        f"loss on {config.train.loss_on} tokens.\n\n"
        "Eval loss: token-weighted mean NLL (nats/token) on the held-out split; perplexity = exp(eval loss). "
        "Trainable %: trainable / (base + adapter) parameters. vs full: trainable parameters as % of the "
        "full-LoRA run's. Δ loss: eval loss minus the full-LoRA run's (same seed).\n\n"
    )
    cols = ["run", "status", "trainable", "trainable %", "vs full %", "eval loss", "Δ loss", "Δ %", "perplexity",
            "train s", "tok/s", "eval s", "peak MiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        status = r.status if r.status == "ok" else f"failed: {r.error}"
        lines.append("| " + " | ".join([
            r.run_id, status, _fmt(r.trainable_params), _fmt(r.trainable_pct, 2), _fmt(r.params_vs_full_pct, 1),
            _fmt(r.eval_loss), _fmt(r.delta_eval_loss, 4), _fmt(r.delta_eval_loss_pct, 2), _fmt(r.perplexity, 3),
            _fmt(r.train_time_s, 1), _fmt(r.train_tokens_per_s, 1), _fmt(r.eval_time_s, 1), _fmt(r.peak_memory_mib, 0),
        ]) + " |")
    return head + "\n".join(lines) + "\n"
