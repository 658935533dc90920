"""The adapter-method protocol: what a study asks of a method, and the default (plain LoRA).

A study arm is a placement trained by one *method* (``loraplace.methods.METHODS``, looked up by the
name the strategy grammar gives it: ``lora``, ``auto``, ``eva``, ``adalora``). The study, the checks,
the run recipe and the ``plan`` command ask the arm's method instead of testing its name:

* :meth:`Method.check`, :meth:`Method.stand_in`: before anything trains (bad input fails in seconds;
  the memory check estimates the placement the method will at most adapt);
* :attr:`Method.allocated_per_study`, :meth:`Method.scores`, :meth:`Method.allocate`: methods whose
  ranks come from data choose them once per study, and every seed and resume trains that choice;
* :meth:`Method.placement`: the arm's exact placement (from its stored allocation where it has one);
* :meth:`Method.adapters`, :meth:`Method.initialise`, :meth:`Method.check_wrapped`: the PEFT config,
  the initial adapter weights, the loud check that PEFT did what was planned;
* :meth:`Method.after_training`, :meth:`Method.update_norms`: what it records after training.

The defaults are plain LoRA at the arm's placement (:mod:`loraplace.methods.lora`); a method
overrides only what it does differently, so a new method is one new file that ends in
:func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as load_tensors
from torch import nn

from loraplace.adapters import adapter_update_norms, check_init, check_wrapped, lora_config_for
from loraplace.config import StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.placement.arms import REFERENCE_STRATEGY, Arm
from loraplace.placement.budget import resolve_matched
from loraplace.placement.resolve import Placement, resolve_placement
from loraplace.placement.scale import DEFAULT_SCALE, apply_scale
from loraplace.placement.strategies import DATA_INITS, METHOD_TITLES, Strategy, parse_strategy
from loraplace.records import RunSpec
from loraplace.registry import Registry


class Method:
    """Plain LoRA at the arm's placement; subclasses override what their method does differently."""

    name = "lora"
    allocated_per_study = False
    """True when the method chooses its ranks from data once per study (stored in ``allocations/``)."""
    state_suffix: str | None = None
    """File suffix of the initial adapter state a per-study method stores beside its allocation
    (``allocations/<arm>.<suffix>.safetensors``), None for a method without one."""
    resumable = True
    """True when a run stopped at a step and continued from the Trainer's checkpoint trains as one run
    straight through (learning-rate tuning by halving needs it): all the method's training state is
    in the adapter weights, the optimizer, the scheduler and the random states."""

    @property
    def title(self) -> str:
        """How reports and messages call the method (the grammar's :data:`METHOD_TITLES`)."""
        return METHOD_TITLES[self.name]

    # ------------------------------------------------------------------ before anything trains
    def check(self, skeleton: nn.Module, arm: Arm, config: StudyConfig) -> None:
        """Fail with one line if ``arm`` cannot run in ``config`` on ``skeleton`` (meta weights), its
        initialisation (``init=``) included."""
        placement = self.placement(skeleton, arm, config.lora.r, config.lora.alpha, scale=config.lora.scale)
        check_init(skeleton, placement, parse_strategy(arm.strategy).init, config.quantization)

    def stand_in(self, skeleton: nn.Module, arm: Arm, config: StudyConfig) -> Placement:
        """The placement the memory check estimates for ``arm``: its own, or, for a method that
        places from data, every module it may choose from at the study's rank."""
        return self.placement(skeleton, arm, config.lora.r, config.lora.alpha, scale=config.lora.scale)

    # --------------------------------------------------------------------- once per study
    def per_study(self, arm: Arm) -> bool:
        """True when ``arm`` needs something computed once per study before its runs: the method's
        allocation (:attr:`allocated_per_study`), or a data-driven initialisation (``init=eva``)."""
        return self.allocated_per_study or parse_strategy(arm.strategy).init in DATA_INITS

    def state_suffix_for(self, arm: Arm) -> str | None:
        """The file suffix of the initial adapter state ``arm`` stores once per study (the method's
        :attr:`state_suffix`, ``init`` for a data-driven initialisation), None without one."""
        if self.state_suffix:
            return self.state_suffix
        return "init" if parse_strategy(arm.strategy).init in DATA_INITS else None

    def scores(self, arm: Arm) -> set[str]:
        """The importance scores (:mod:`loraplace.importance`) the arm's allocation reads."""
        return set()

    def allocate(self, setup: Any, arm: Arm, config: StudyConfig, batches: Any,
                 scores: dict[str, Any]) -> tuple[Placement, dict | None]:
        """The arm's allocation on the loaded base model ``setup.base`` (a per-study method only):
        ``(placement with its budget record, initial adapter state or None)``. ``batches()`` gives the
        study's scoring batches; ``scores`` the importance results by score name. The default: the arm's
        own placement (a hand-picked arm with a data-driven init, whose state the study computes next)."""
        if not self.per_study(arm):
            raise LoraplaceError(f"arm {arm.label!r}: the {self.title} method allocates nothing per study")
        return self.placement(setup.base, arm, config.lora.r, config.lora.alpha, scale=config.lora.scale), None

    def plan_placement(self, skeleton: nn.Module, arm: Arm, r: int, alpha: float,
                       scores: dict[str, Any], scale: str = DEFAULT_SCALE) -> Placement:
        """The arm's placement for ``loraplace plan`` (shapes only: ``skeleton`` has meta weights),
        with the importance results by score name that :meth:`scores` asked for, its alphas at the
        update-scale rule ``scale``."""
        return self.placement(skeleton, arm, r, alpha, scale=scale)

    # ---------------------------------------------------------------------------- each run
    def placement(self, model: nn.Module, arm: Arm, r: int, alpha: float, ranks: dict[str, int] | None = None,
                  budget: dict | None = None, scale: str = DEFAULT_SCALE) -> Placement:
        """The arm's exact placement on ``model``: the strategy at rank ``r``, or, for a matched arm,
        with ranks matched to its reference's budget (:mod:`loraplace.placement.budget`); its alphas
        give every module the update scale of the rule ``scale`` (:mod:`loraplace.placement.scale`)."""
        strategy = parse_strategy(arm.strategy)
        if arm.reference is None:
            return apply_scale(resolve_placement(model, strategy, r, alpha), scale, r)
        return apply_scale(resolve_matched(model, strategy, r, alpha, arm.reference), scale, r)

    def adapters(self, model: nn.Module, spec: RunSpec, task_type: str) -> tuple[Placement, Any, list]:
        """``(placement, PEFT config, Trainer callbacks)`` of the run ``spec`` on ``model``; the config
        carries the arm's initialisation (``init=``), checked against the placement first."""
        arm = Arm.parse(spec.strategy)
        placement = self.placement(model, arm, spec.lora.r, spec.lora.alpha, ranks=spec.ranks, budget=spec.budget,
                                   scale=spec.lora.scale)
        init = parse_strategy(arm.strategy).init
        check_init(model, placement, init, spec.quantization)
        return placement, lora_config_for(placement, spec.lora, task_type=task_type, init=init), []

    def initialise(self, peft_model: Any, spec: RunSpec) -> None:
        """Set the wrapped adapters' initial weights: PEFT's own initialisation (nothing to do), or the
        arm's data-driven one from the state the study computed once (:data:`INITIALISERS`)."""
        init = parse_strategy(Arm.parse(spec.strategy).strategy).init
        if init in DATA_INITS:
            if not spec.init_state:
                raise LoraplaceError(f"arm {spec.strategy!r}: the study's {init} initialisation is missing from the run")
            INITIALISERS.get_entry(init).apply(peft_model, load_tensors(spec.init_state))

    def check_wrapped(self, peft_model: Any, placement: Placement, trainable: int) -> None:
        """Fail loudly unless PEFT wrapped exactly ``placement`` with ``trainable`` parameters."""
        check_wrapped(peft_model, placement, trainable)

    def after_training(self, peft_model: Any, placement: Placement, callbacks: list, run_dir: Path) -> None:
        """Record what training decided (a method that changes its ranks while training)."""

    def update_norms(self, peft_model: Any, placement: Placement, initial: dict | None = None) -> list[dict[str, Any]]:
        """Per adapted module, the norm of the update it learned (``adapter_norms.json``); ``initial``:
        the adapters' starting ``(A, B)`` where they did not start at ``B A = 0``
        (:func:`~loraplace.adapters.initial_adapters`)."""
        return adapter_update_norms(peft_model, placement, initial=initial)


def full_stand_in(skeleton: nn.Module, config: StudyConfig) -> Placement:
    """Every module of ``full`` at the study's rank: what a method that places rank from data (on
    the modules of ``full``) may at most adapt, for the memory check."""
    return apply_scale(resolve_placement(skeleton, parse_strategy(REFERENCE_STRATEGY), config.lora.r, config.lora.alpha),
                       config.lora.scale, config.lora.r)


@dataclass(frozen=True)
class Initialiser:
    """A data-driven initialisation (:data:`~loraplace.placement.strategies.DATA_INITS`): ``compute(base
    model, placement, scoring batches, task type, shared=dict)`` gives its state (module name ->
    tensor) once per study (``shared``: one dict for every arm of the study's allocations, where a
    pass two initialisers read is kept); ``apply(peft model, state)`` sets the wrapped adapters from
    it in every run."""

    name: str
    compute: Callable[..., dict[str, torch.Tensor]]
    apply: Callable[[Any, dict[str, torch.Tensor]], None]


INITIALISERS: Registry[Initialiser] = Registry("data-driven initialisation")
"""Every data-driven initialisation by name; filled where each is defined (:mod:`loraplace.methods.eva`)."""


METHODS: Registry[Method] = Registry("adapter method")
"""Every adapter method by name; filled by :func:`register` as each method's module is imported."""


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` under its name (once)."""
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name fails with one line listing the known ones."""
    return METHODS.get_entry(name)


def method_of(arm: Arm | Strategy | str) -> Method:
    """The method of an arm, a parsed strategy, or a stored arm label."""
    if isinstance(arm, str):
        arm = Arm.parse(arm)
    strategy = arm if isinstance(arm, Strategy) else parse_strategy(arm.strategy)
    return get_method(strategy.method_name)


def resolve_arm(model: nn.Module, arm: Arm | str, r: int, alpha: float, ranks: dict[str, int] | None = None,
                budget: dict | None = None, scale: str = DEFAULT_SCALE) -> Placement:
    """The placement of a study arm on ``model``, as its method places it (:meth:`Method.placement`),
    at the update-scale rule ``scale``. A ``str`` is a stored label (a
    :class:`~loraplace.records.RunSpec`'s ``strategy``).

    Raises:
        LoraplaceError: an arm placed from data whose stored allocation is missing, or any resolution
            error.
    """
    arm = Arm.parse(arm) if isinstance(arm, str) else arm
    return method_of(arm).placement(model, arm, r, alpha, ranks=ranks, budget=budget, scale=scale)


def stored_ranks(arm: Arm, ranks: dict[str, int] | None) -> dict[str, int]:
    """The stored ranks (module -> rank) of an arm allocated once per study, or one line saying they
    are missing."""
    if not ranks:
        raise LoraplaceError(f"arm {arm.label!r} is placed from data once per study; its stored allocation "
                             "(ranks per module) is missing")
    return ranks


__all__ = ["INITIALISERS", "Initialiser", "METHODS", "Method", "get_method", "method_of", "register", "resolve_arm",
           "full_stand_in", "stored_ranks"]
