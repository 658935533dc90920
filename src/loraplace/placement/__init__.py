"""Placement: roles per architecture (:mod:`~loraplace.placement.roles`), strategies
(:mod:`~loraplace.placement.strategies`), study arms, budget references and the reference arm
(:mod:`~loraplace.placement.arms`), parameter counts and budget matching
(:mod:`~loraplace.placement.params`, :mod:`~loraplace.placement.budget`), resolution to exact module
names (:mod:`~loraplace.placement.resolve`), the rank allocator (:mod:`~loraplace.placement.allocate`)
and the layer x role matrix (:mod:`~loraplace.placement.matrix`).

Parsing (strategies, arms, budget references) does not import torch, so that ``loraplace report``
and the config stay light: this package exports only those names. Resolution and counting, which
need torch and PEFT, are imported from their modules (``loraplace.placement.resolve``,
``loraplace.placement.params``, ``loraplace.placement.budget``).
"""

from loraplace.placement.arms import (
    REFERENCE_STRATEGY,
    Arm,
    parse_arm,
    parse_budget_reference,
    parse_param_count,
    study_arms,
)
from loraplace.placement.roles import FAMILIES, ArchitectureRoles, roles_for
from loraplace.placement.strategies import (
    BUILTIN_STRATEGIES,
    LayerSelection,
    Strategy,
    Term,
    layer_ranges,
    parse_strategies,
    parse_strategy,
    split_strategy_list,
)

__all__ = [
    "ArchitectureRoles", "Arm", "BUILTIN_STRATEGIES", "FAMILIES", "LayerSelection", "REFERENCE_STRATEGY", "Strategy",
    "Term", "layer_ranges", "parse_arm", "parse_budget_reference", "parse_param_count", "parse_strategies",
    "parse_strategy", "roles_for", "split_strategy_list", "study_arms",
]
