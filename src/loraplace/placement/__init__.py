"""Placement: roles per architecture (:mod:`~loraplace.placement.roles`), strategies
(:mod:`~loraplace.placement.strategies`), study arms and the reference arm
(:mod:`~loraplace.placement.arms`), parameter counts and budget matching
(:mod:`~loraplace.placement.params`, :mod:`~loraplace.placement.budget`), and resolution to
exact module names (:mod:`~loraplace.placement.resolve`).

Parsing (strategies, arms, budgets) does not import torch, so that ``loraplace report`` and the
config stay light; the names that need torch and PEFT (resolution, counting) load on first use.
"""

from importlib import import_module

from loraplace.placement.arms import REFERENCE_STRATEGY, Arm, resolve_arm, study_arms
from loraplace.placement.budget import (
    budget_target, match_placement, parse_budget_reference, parse_param_count, resolve_matched,
)
from loraplace.placement.roles import FAMILIES, ArchitectureRoles, roles_for
from loraplace.placement.strategies import (
    BUILTIN_STRATEGIES, LayerSelection, Strategy, Term, layer_ranges, parse_strategies, parse_strategy,
    split_strategy_list,
)

_NEEDS_TORCH = {
    "linear_modules": "params", "lora_param_count": "params", "total_params": "params", "trainable_params": "params",
    "AdaptedModule": "resolve", "Placement": "resolve", "resolve_placement": "resolve",
}


def __getattr__(name: str):
    if name in _NEEDS_TORCH:
        return getattr(import_module(f"loraplace.placement.{_NEEDS_TORCH[name]}"), name)
    raise AttributeError(f"module 'loraplace.placement' has no attribute {name!r}")


__all__ = [
    "AdaptedModule", "ArchitectureRoles", "Arm", "BUILTIN_STRATEGIES", "FAMILIES", "LayerSelection", "Placement",
    "REFERENCE_STRATEGY", "Strategy", "Term", "budget_target", "layer_ranges", "linear_modules",
    "lora_param_count", "match_placement", "parse_budget_reference", "parse_param_count", "parse_strategies",
    "parse_strategy", "resolve_arm", "resolve_matched", "resolve_placement", "roles_for", "split_strategy_list",
    "study_arms", "total_params", "trainable_params",
]
