"""Checks that run before a study trains anything, so that bad input fails in seconds with one
clear line instead of after the first hour of training."""

from __future__ import annotations

from typing import Any

from loraplace.config import StudyConfig
from loraplace.data import load_rows
from loraplace.errors import LoraplaceError
from loraplace.methods import method_of
from loraplace.placement.arms import is_groups, study_arms
from loraplace.placement.groups import expand_groups
from loraplace.run.device import pick_device
from loraplace.run.memory_plan import choose_checkpointing, device_free_mib, estimate_memory
from loraplace.run.models import load_config, meta_model, resolve_model_path
from loraplace.run.quantization import check_quantization
from loraplace.run.tasks import check_task_columns, task_of


def expand_study_groups(config: StudyConfig, allow_fetch: bool = True) -> StudyConfig:
    """``config`` with each ``groups`` entry of its strategy list replaced by the group arms of its
    model (:func:`loraplace.placement.groups.expand_groups`; the model's config is read, no weights)."""
    if not any(is_groups(s) for s in config.strategies):
        return config
    model_config, _ = load_config(resolve_model_path(config.model, allow_fetch))
    return config.model_copy(update={"strategies": expand_groups(config.strategies, meta_model(model_config))})


def check_study(config: StudyConfig, allow_fetch: bool = True) -> dict[str, Any]:
    """Raise :class:`~loraplace.errors.LoraplaceError` if the model, the dataset, a strategy, the
    device or the quantization (bitsandbytes missing or without a backend for the device) is
    unusable. Loads the model's config (no weights) and the dataset's rows."""
    check_quantization(config.quantization, pick_device(config.device))
    model_config, _ = load_config(resolve_model_path(config.model, allow_fetch))
    skeleton = meta_model(model_config)
    # Every arm the study will run, budget-matched ones included, resolved as execute_run does.
    for arm in study_arms(config.strategies, config.match_budget):
        method = method_of(arm)
        method.check(skeleton, arm, config)
        if config.tune.lr is not None and config.tune.schedule == "halving" and not method.resumable:
            raise LoraplaceError(f"arm {arm.label!r}: the {method.title} method cannot be tuned by halving (a run "
                                 "continued from a checkpoint would not train as one run straight through); "
                                 "use tune.schedule=grid or leave the arm out")
    rows = load_rows(config.dataset, allow_fetch=allow_fetch)
    task = config.task if config.task != "auto" else task_of(model_config)
    check_task_columns(task, rows.column_names, config.dataset)
    return check_memory(config, model_config, skeleton, task)


def check_memory(config: StudyConfig, model_config, skeleton, task: str) -> dict[str, Any]:
    """Refuse a study with an arm that will not fit in the device's free memory, even with gradient
    checkpointing (or without it, where ``train.gradient_checkpointing=false``).

    Each arm is estimated (:func:`loraplace.run.memory_plan.estimate_memory`) at the study's batch size
    and ``max_length`` (an upper bound: batches are padded to their longest example) on the model's
    meta skeleton; arms allocated later (``auto[...]``, EVA, AdaLoRA) are estimated with the modules
    of ``full`` at the study's rank, which adapts every slot they choose from. Nothing is checked
    where the free memory is unknown (:func:`~loraplace.run.memory_plan.device_free_mib`) or on a Ray
    cluster, whose workers are other machines.

    Also decides gradient checkpointing once for every arm of the study (so that arms differ in
    placement only, not in what checkpointing costs in time or saves in memory): the setting where it
    is true or false; under ``auto``, on for every arm as soon as one arm would not fit without it.

    Returns:
        ``{"gradient_checkpointing": bool, "gradient_checkpointing_reason": str}`` (the study's
        :attr:`~loraplace.config.StudyConfig.decided`).

    Raises:
        LoraplaceError: one line naming the arm, its estimate by component, the free memory and
            the settings to change.
    """
    setting = config.train.gradient_checkpointing
    if setting is not True and setting is not False and config.executor.kind == "ray":
        return {"gradient_checkpointing": False, "gradient_checkpointing_reason": (
            "off for every arm (auto on a Ray cluster: the workers' free memory is not known to the driver; "
            "set train.gradient_checkpointing=true to turn it on)")}
    forced = {"gradient_checkpointing": bool(setting), "gradient_checkpointing_reason":
              f"{'on' if setting else 'off'} for every arm (train.gradient_checkpointing={str(setting).lower()})"}
    if config.executor.kind == "ray":
        return forced
    device = pick_device(config.device)
    free = device_free_mib(device)
    if free is None:
        return forced if setting != "auto" else {
            "gradient_checkpointing": False,
            "gradient_checkpointing_reason": "off for every arm (auto: the device's free memory is unknown)"}
    train = config.train
    choices = []
    for arm in study_arms(config.strategies, config.match_budget):
        placement = method_of(arm).stand_in(skeleton, arm, config)
        kwargs = dict(batch_size=train.batch_size, max_length=train.max_length, precision=train.precision,
                      device=device, task=task, lora_dropout=config.lora.dropout, dropout_masks=config.lora.dropout_masks,
                      eval_batch_size=train.eval_batch_size, quantization=config.quantization, skeleton=skeleton)
        without = estimate_memory(model_config, placement, gradient_checkpointing=False, **kwargs)
        checkpointed = estimate_memory(model_config, placement, gradient_checkpointing=True, **kwargs)
        choices.append((arm, choose_checkpointing(setting, without, checkpointed, free)))
        estimate = checkpointed if setting is not False else without
        if estimate.fits(free):
            continue
        mode = "with gradient checkpointing" if estimate.gradient_checkpointing else "without gradient checkpointing"
        options = [f"lower train.batch_size ({train.batch_size}) or train.max_length ({train.max_length})"]
        if setting is False and checkpointed.fits(free):
            options.append("set train.gradient_checkpointing=auto")
        if estimate.precision == "fp32" and device.type != "cpu":
            options.append("use train.precision=bf16")
        options.append("adapt fewer modules, or free memory on the device")
        raise LoraplaceError(
            f"arm {arm.label!r} needs about {estimate.needed_mib:,.0f} MiB {mode} "
            f"({estimate.breakdown(runtime=False)}; batch {train.batch_size} x {train.max_length} tokens, "
            f"{estimate.precision}) but the device ({device.type}) has {free:,.0f} MiB free; " + ", or ".join(options)
        )
    if setting != "auto":
        return forced
    needing = [(arm, c) for arm, c in choices if c.enabled]
    if needing:
        arm, c = needing[0]
        return {"gradient_checkpointing": True, "gradient_checkpointing_reason": (
            f"on for every arm (auto: {len(needing)} of {len(choices)} arms would not fit without it, e.g. "
            f"{arm.label!r} {c.reason.removeprefix('on (auto: ').rstrip(')')}); one setting for all keeps time and "
            "memory comparable")}
    return {"gradient_checkpointing": False, "gradient_checkpointing_reason": (
        f"off for every arm (auto: every arm fits without it in {free:,.0f} MiB free)")}
