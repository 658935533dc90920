"""The plan of a study: which runs it makes, in which order, under which ids, in which folder.

Pure functions of the study config (no torch, nothing written): the arms come from
:func:`loraplace.placement.arms.study_arms`, each arm runs once per seed as a
:class:`~loraplace.records.RunSpec`.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from loraplace.config import StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.placement.arms import study_arms
from loraplace.records import RunSpec, TunePoint


def default_output_dir(config: StudyConfig) -> Path:
    """``runs/NAME-YYYYmmdd-HHMMSS``: a new folder for a study run without ``--output``."""
    return Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def arm_labels(config: StudyConfig) -> list[str]:
    """The labels of the study's arms in order (``full``, ``attention``, ``attention~full``, ...)."""
    return [arm.label for arm in study_arms(config.strategies, config.match_budget)]


# Characters kept as they are in a run id: safe in folder names on Linux, macOS and Windows and
# in shells. Everything else (``/ | * ? [ ] :``, spaces, ...) is replaced.
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=~,-]")
# The ids of loraplace <= 0.x (``:`` and ``%`` kept, no hash); only read, to resume old folders.
_LEGACY_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=~,:%-]")


def run_id_for(arm: str, seed: int) -> str:
    """A run id that is also a safe folder name, different for different arm labels.

    A label made only of safe characters is its own id (``full-s0``, ``attention~full-s0``).
    Otherwise every unsafe character becomes ``_`` and 8 hex digits of the SHA-256 of the exact
    label are appended, so ``attn.*`` and ``attn.?`` get different ids
    (``attn._.4f0c...-s0``) although they sanitise to the same text.
    """
    safe = _UNSAFE.sub("_", arm)
    if safe != arm:
        safe += "." + hashlib.sha256(arm.encode("utf-8")).hexdigest()[:8]
    return f"{safe}-s{seed}"


def legacy_run_id_for(arm: str, seed: int) -> str:
    """The id an older loraplace gave this arm label (not injective); used to resume old study folders."""
    return _LEGACY_UNSAFE.sub("_", arm) + f"-s{seed}"


def run_specs(config: StudyConfig, study_dir: Path) -> list[RunSpec]:
    """The study's jobs in execution order: the base model row (once, first), then every arm of
    every seed. The arm order rotates with the seed's index in ``config.seeds`` (seed 0: full,
    attention, ffn; seed 1: attention, ffn, full; ...), so that a time measurement's place in the
    study (warm caches, a loaded machine) does not favour one arm in every seed. ``position`` is
    each spec's index in this order. Deterministic.

    Raises:
        LoraplaceError: two arms whose run ids coincide (only on a hash collision).
    """
    train = config.train
    if "gradient_checkpointing" in config.decided:  # decided once for every arm (study.checks)
        train = train.model_copy(update={"gradient_checkpointing": bool(config.decided["gradient_checkpointing"])})
    common = dict(model=config.model, dataset=config.dataset, lora=config.lora, train=train,
                  data=config.data, importance=config.importance, device=config.device, task=config.task,
                  quantization=config.quantization)
    specs = []
    if config.include_base:
        specs.append(RunSpec(run_id="base", kind="base", strategy="base", seed=config.seeds[0],
                             run_dir=str(study_dir / "runs" / "base"), **common))
    arms = arm_labels(config)
    for index, seed in enumerate(config.seeds):
        k = index % len(arms)
        for arm in arms[k:] + arms[:k]:
            run_id = run_id_for(arm, seed)
            specs.append(RunSpec(run_id=run_id, strategy=arm, seed=seed,
                                 run_dir=str(study_dir / "runs" / run_id), **common))
    seen: dict[str, str] = {}
    for s in specs:
        if s.run_id in seen and seen[s.run_id] != s.strategy:
            raise LoraplaceError(f"strategies {seen[s.run_id]} and {s.strategy} share the run id {s.run_id!r}; "
                                 "write one of them differently")
        seen[s.run_id] = s.strategy
    return [s.model_copy(update={"position": i}) for i, s in enumerate(specs)]


def planned_specs(config: StudyConfig, study_dir: Path) -> list[RunSpec]:
    """The runs of :func:`run_specs` that ``config`` trains: all of them, but without the arms' runs
    at ``train.lr`` where the study tunes with ``tune.untuned`` false (the base row stays)."""
    specs = run_specs(config, study_dir)
    if config.tune.rates() and not config.tune.untuned:
        return [s for s in specs if s.kind != "lora"]
    return specs


def tune_run_id(arm: str, seed: int, lr: float) -> str:
    """The id of the tuning run of ``arm`` at ``lr`` (``tune-full-lr0.0004-s0``)."""
    base = run_id_for(arm, seed)
    return f"tune-{base[: -len(f'-s{seed}')]}-lr{lr:g}-s{seed}"


def tuning_specs(config: StudyConfig, study_dir: Path) -> list[RunSpec]:
    """The learning-rate tuning runs of a study with ``tune.lr``: every arm at every candidate rate
    and seed, as ``kind='tune'`` specs without a rung yet (the driver sets :class:`TunePoint`
    rung by rung: :mod:`loraplace.study.tuning`). Same settings as the arm's own runs but the
    learning rate. Positions follow the study's own runs. [] without tuning."""
    rates = config.tune.rates()
    if not rates:
        return []
    plain = [s for s in run_specs(config, study_dir) if s.kind == "lora"]
    first = len(plain) + int(config.include_base)
    specs = []
    for arm in arm_labels(config):
        for seed in config.seeds:
            template = next(s for s in plain if s.strategy == arm and s.seed == seed)
            for lr in rates:
                run_id = tune_run_id(arm, seed, lr)
                specs.append(template.model_copy(update={
                    "run_id": run_id, "kind": "tune", "run_dir": str(study_dir / "runs" / run_id),
                    "train": template.train.model_copy(update={"lr": lr}),
                    "tune": TunePoint(lr=lr, stop_at=config.train.max_steps), "position": first + len(specs)}))
    return specs


def run_identity(run) -> tuple:
    """What makes a run (a :class:`RunSpec` or a stored :class:`~loraplace.records.RunResult`)
    the same run: kind, exact arm label and seed (the base row does not depend on the seed), and a
    tuning run's learning rate."""
    if run.kind == "base":
        return ("base",)
    if run.kind == "tune":
        lr = run.tune.lr if isinstance(run, RunSpec) else run.tune_lr
        return (run.kind, run.strategy, run.seed, lr)
    return (run.kind, run.strategy, run.seed)
