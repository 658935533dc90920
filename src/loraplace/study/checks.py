"""Checks that run before a study trains anything, so that bad input fails in seconds with one
clear line instead of after the first hour of training."""

from __future__ import annotations

from loraplace.config import StudyConfig


def check_study(config: StudyConfig, allow_fetch: bool = True) -> None:
    """Raise :class:`~loraplace.errors.LoraplaceError` if the model, the dataset, a strategy or the
    device is unusable. Loads the model's config (no weights) and the dataset's rows."""
    from loraplace.data import load_rows
    from loraplace.models import load_config, meta_model, pick_device, resolve_model_path, task_of
    from loraplace.tasks import check_task_columns
    from loraplace.placement.arms import resolve_arm, study_arms
    from loraplace.placement.auto import check_auto
    from loraplace.placement.strategies import parse_strategy

    pick_device(config.device)
    model_config, _ = load_config(resolve_model_path(config.model, allow_fetch))
    skeleton = meta_model(model_config)
    # Every arm the study will run, budget-matched ones included, resolved as execute_run does.
    for arm in study_arms(config.strategies, config.match_budget):
        strategy = parse_strategy(arm.strategy)
        if strategy.is_auto:  # allocated from scores later: check its budget now
            check_auto(skeleton, arm, config.lora.r, config.lora.alpha, config.importance.max_rank)
        elif strategy.method == "adalora":
            from loraplace.baselines import adalora_schedule

            adalora_schedule(config.train.max_steps)  # a run too short for AdaLoRA's phases fails here
        elif strategy.method != "eva":  # EVA's ranks come from data, before anything trains
            resolve_arm(skeleton, arm, config.lora.r, config.lora.alpha)
    rows = load_rows(config.dataset, allow_fetch=allow_fetch)
    task = config.task if config.task != "auto" else task_of(model_config)
    check_task_columns(task, rows.column_names, config.dataset)
