"""Placement: roles per architecture, strategies, resolution to exact module names, counts,
and budget matching."""

from loraplace.placement.budget import (
    arm_label, budget_target, match_placement, parse_budget, resolve_arm, resolve_matched, split_arm,
)
from loraplace.placement.params import linear_modules, lora_param_count, total_params, trainable_params
from loraplace.placement.resolve import AdaptedModule, Placement, resolve_placement
from loraplace.placement.roles import FAMILIES, ArchitectureRoles, roles_for
from loraplace.placement.strategies import (
    BUILTIN_STRATEGIES, LayerSelection, Strategy, Term, parse_strategies, parse_strategy, split_strategy_list,
)

__all__ = [
    "AdaptedModule", "ArchitectureRoles", "BUILTIN_STRATEGIES", "FAMILIES", "LayerSelection", "Placement",
    "Strategy", "Term", "arm_label", "budget_target", "resolve_arm", "split_arm", "linear_modules", "lora_param_count", "match_placement", "parse_budget",
    "parse_strategies", "parse_strategy", "resolve_matched", "resolve_placement", "roles_for",
    "split_strategy_list", "total_params", "trainable_params",
]
