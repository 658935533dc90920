"""Placement: roles per architecture, strategies, resolution to exact module names, counts."""

from loraplace.placement.params import linear_modules, lora_param_count, total_params, trainable_params
from loraplace.placement.resolve import AdaptedModule, Placement, resolve_placement
from loraplace.placement.roles import FAMILIES, ArchitectureRoles, roles_for
from loraplace.placement.strategies import BUILTIN_STRATEGIES, Strategy, parse_strategies, parse_strategy

__all__ = [
    "AdaptedModule", "ArchitectureRoles", "BUILTIN_STRATEGIES", "FAMILIES", "Placement", "Strategy",
    "linear_modules", "lora_param_count", "parse_strategies", "parse_strategy", "resolve_placement",
    "roles_for", "total_params", "trainable_params",
]
