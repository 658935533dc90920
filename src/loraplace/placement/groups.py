"""Slot groups: the arms that measure, on one model, which modules training at a budget really
rewards, so that an importance score can be checked against the truth.

``groups`` (or ``groups~REFERENCE``) in a study's strategy list stands for one arm per group of
slots, each trained alone at the same budget:

* every role the model's ``full`` strategy adapts (``attn.q``, ``attn.k``, ..., ``mlp.down``; a
  fused ``attn.qkv`` where the model has one), in model order;
* every third of the layers (``full@part:1/3``, ``full@part:2/3``, ``full@part:3/3``; fewer where
  the model has fewer than three blocks).

With a reference (``groups~attention``) each arm is matched to that budget; without one, to the
study's ``match_budget`` like any other entry. The report's score-validity section then correlates
each score's predicted gain for these arms with their measured gain (the group arms' own scope).
Which roles exist depends on the model, so the entry is expanded once the model's shapes are known
(:func:`expand_groups`), before the study is stored: the stored study lists the concrete arms.
"""

from __future__ import annotations

from torch import nn

from loraplace.errors import LoraplaceError
from loraplace.placement.arms import ARM_SEPARATOR, GROUP_PARTS, REFERENCE_STRATEGY, check_groups, is_groups
from loraplace.placement.resolve import resolve_placement
from loraplace.placement.strategies import parse_strategy


def group_strategies(model: nn.Module) -> list[str]:
    """The group arms' strategies on ``model`` (meta weights suffice): each role of ``full``, then
    each third of the layers (the parts that hold at least one layer)."""
    full = resolve_placement(model, parse_strategy(REFERENCE_STRATEGY), 1, 1.0)
    roles = [role for role in full.roles() if role != "?"]
    if not roles:
        raise LoraplaceError("groups: the model has no module with a role to group by")
    layers = min(full.stacks.values()) if full.stacks else 0
    parts = [f"{REFERENCE_STRATEGY}@part:{i}/{GROUP_PARTS}" for i in range(1, GROUP_PARTS + 1)
             if (i - 1) * layers // GROUP_PARTS < i * layers // GROUP_PARTS]
    return roles + parts


def expand_groups(strategies: list[str], model: nn.Module) -> list[str]:
    """``strategies`` with every ``groups`` entry replaced by its arms on ``model`` (each carrying the
    entry's reference), repeats of an arm already listed left out."""
    out: list[str] = []
    for spec in strategies:
        if not is_groups(spec):
            expanded = ["".join(spec.split())]
        else:
            check_groups(spec)
            _, sep, reference = "".join(spec.split()).partition(ARM_SEPARATOR)
            expanded = [s + (ARM_SEPARATOR + reference if sep else "") for s in group_strategies(model)]
        out.extend(s for s in expanded if s not in out)
    return out


__all__ = ["expand_groups", "group_strategies"]
