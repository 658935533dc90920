"""The update-scale rule: how large each adapted module's update ``scale * B A x`` is, as a function
of its rank, one rule for every arm of a study (``lora.scale``).

PEFT scales a LoRA update by ``alpha / r`` (``use_rslora``: ``alpha / sqrt(r)``). A study that
compares arms of one parameter budget at different ranks therefore also compares them at different
update scales, and the update scale acts like a learning rate: with alpha fixed, an arm matched to
attention's budget at r=6 trains at 32/6 = 5.3 while attention at r=16 trains at 2. The rule says,
once per study, what every arm's scale is:

* ``alpha_over_r`` (PEFT's default): ``alpha / r``;
* ``rslora``: ``alpha / sqrt(r)`` (rank-stabilised LoRA, PEFT's ``use_rslora``);
* ``fixed``: ``alpha / R`` with ``R`` the study's ``lora.r``, whatever rank a module has: every arm
  at the same scale.

Which ``r`` goes in: a module whose rank is written (a term's ``r=``, or the study's ``lora.r``) uses
its own rank. A module whose rank was *chosen for a budget* (budget matching, automatic placement,
EVA) uses its arm's **scale rank**: the rank a uniform arm of the same budget on the same modules
would have (:func:`loraplace.placement.params.uniform_rank`, the rank budget matching gives). So every module of an arm of a
budget gets one scale, whatever rank the allocation gave it, and an automatic arm trains at the scale
that a uniform arm of its budget on its slots would have; a budget-matched arm's uniform ``+1``
modules share their arm's scale.

The scale reaches PEFT as each module's alpha (``alpha_pattern``, with ``use_rslora`` off):
``alpha_m = scale_m * r_m``, so PEFT's ``alpha_m / r_m`` is the rule's scale exactly. Pure arithmetic
on placements: nothing here touches weights or imports torch.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from loraplace.errors import LoraplaceError

if TYPE_CHECKING:  # annotations only: the rules stay importable without torch (the report states them)
    from loraplace.placement.resolve import Placement

ScaleRule = Literal["alpha_over_r", "rslora", "fixed"]
SCALE_RULES: dict[str, str] = {
    "alpha_over_r": "alpha / r (PEFT's default)",
    "rslora": "alpha / sqrt(r) (rank-stabilised LoRA, PEFT's use_rslora)",
    "fixed": "alpha / r at the study's rank r, whatever rank a module has",
}
"""The rules by name, with how the report states them."""
DEFAULT_SCALE: ScaleRule = "alpha_over_r"


def update_scale(rule: str, alpha: float, rank: float, study_r: int) -> float:
    """The update scale of a module with scaling numerator ``alpha`` whose scale rank is ``rank``
    (:data:`SCALE_RULES`; ``study_r``: the study's ``lora.r``, used by ``fixed``).

    Raises:
        LoraplaceError: an unknown rule.
    """
    if rule == "alpha_over_r":
        return alpha / rank
    if rule == "rslora":
        return alpha / math.sqrt(rank)
    if rule == "fixed":
        return alpha / study_r
    raise LoraplaceError(f"unknown update-scale rule {rule!r}; known: {', '.join(SCALE_RULES)}")


def apply_scale(placement: Placement, rule: str, study_r: int) -> Placement:
    """A copy of ``placement`` whose module alphas give each module the update scale of ``rule``.

    Each module's ``alpha`` on entry is its scaling numerator (the term's ``alpha=``, or the study's
    ``lora.alpha``); its scale rank is ``scale_r`` where an allocation set one, else its own rank. On
    return ``alpha`` is what PEFT needs (``scale * r``) and ``placement.scale`` records the rule, the
    arm's scale rank(s) and the distinct scales.

    Raises:
        LoraplaceError: a placement that was scaled already (its alphas are no longer numerators), or
            an unknown rule.
    """
    if placement.scale is not None:
        raise LoraplaceError(f"placement {placement.strategy!r} was scaled already ({placement.scale['rule']})")
    modules = []
    for m in placement.modules:
        rank = m.scale_r if m.scale_r is not None else m.r
        modules.append(replace(m, alpha=update_scale(rule, m.alpha, rank, study_r) * m.r))
    scaled = replace(placement, modules=modules, warnings=list(placement.warnings))
    scaled.scale = {
        "rule": rule,
        "scale_ranks": sorted({m.scale_r for m in placement.modules if m.scale_r is not None}),
        "scales": sorted({round(m.alpha / m.r, 6) for m in modules}),
    }
    return scaled


def scale_description(rule: str) -> str:
    """How the report states a rule: ``"alpha / sqrt(r) (rank-stabilised LoRA, ...)"``."""
    return SCALE_RULES.get(rule, rule)


__all__ = ["DEFAULT_SCALE", "SCALE_RULES", "ScaleRule", "apply_scale", "scale_description", "update_scale"]
