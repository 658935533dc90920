"""Checks that run before a study trains anything, so that bad input fails in seconds with one
clear line instead of after the first hour of training."""

from __future__ import annotations

from loraplace.config import StudyConfig


def check_study(config: StudyConfig, allow_fetch: bool = True) -> None:
    """Raise :class:`~loraplace.errors.LoraplaceError` if the model, the dataset, a strategy or the
    device is unusable. Loads the model's config (no weights) and the dataset's rows."""
    from loraplace.data import check_columns, load_rows
    from loraplace.models import load_config, meta_model, pick_device, resolve_model_path
    from loraplace.placement import parse_strategies, resolve_placement

    pick_device(config.device)
    model_config, _ = load_config(resolve_model_path(config.model, allow_fetch))
    skeleton = meta_model(model_config)
    for strategy in parse_strategies(config.strategies):
        resolve_placement(skeleton, strategy, config.lora.r, config.lora.alpha)
    rows = load_rows(config.dataset, allow_fetch=allow_fetch)
    check_columns(rows.column_names, config.dataset)
