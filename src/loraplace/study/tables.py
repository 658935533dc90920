"""``results.md``: the study's results table as a person reads it, rewritten with the other
results files after every run (numbers formatted by :mod:`loraplace.report.fmt`)."""

from __future__ import annotations

from loraplace.config import StudyConfig
from loraplace.placement.arms import REFERENCE_STRATEGY
from loraplace.records import RunResult
from loraplace.report.fmt import num


def results_markdown(config: StudyConfig, results: list[RunResult]) -> str:
    """The Markdown of ``results.md``: a header with the study's setup, then one row per run."""
    head = (
        f"# {config.name}: LoRA placement study\n\n"
        f"Model `{config.model}`, data `{config.dataset}`, r={config.lora.r}, alpha={config.lora.alpha:g} "
        f"(update scale: {config.lora.scale}), "
        f"dropout={config.lora.dropout:g}, lr={config.train.lr:g}, {config.train.max_steps} steps x "
        f"batch {config.train.batch_size * config.train.grad_accum}, max length {config.train.max_length}, "
        f"loss on {config.train.loss_on} tokens.\n\n"
        "Eval loss: token-weighted mean NLL (nats/token) on the held-out split; perplexity = exp(eval loss). "
        f"Trainable %: trainable / (base + adapter) parameters. vs {REFERENCE_STRATEGY}: trainable parameters as "
        f"% of the {REFERENCE_STRATEGY}-LoRA run's. Δ loss: eval loss minus the {REFERENCE_STRATEGY}-LoRA run's "
        "(same seed).\n\n"
    )
    cols = ["run", "status", "trainable", "trainable %", f"vs {REFERENCE_STRATEGY} %", "eval loss", "Δ loss", "Δ %",
            "perplexity", "train s", "tok/s", "eval s", "peak MiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        status = r.status if r.status == "ok" else f"failed: {r.error}"
        lines.append("| " + " | ".join([
            r.run_id, status, num(r.trainable_params), num(r.trainable_pct, 2), num(r.params_vs_full_pct, 1),
            num(r.eval_loss), num(r.delta_eval_loss, 4), num(r.delta_eval_loss_pct, 2), num(r.perplexity, 3),
            num(r.train_time_s, 1), num(r.train_tokens_per_s, 1), num(r.eval_time_s, 1), num(r.peak_memory_mib, 0),
        ]) + " |")
    return head + "\n".join(lines) + "\n"
