"""The update-scale rule (``lora.scale``): every arm of a budget at the scale its uniform counterpart has.

References are computed independently of :mod:`loraplace.placement.scale`: PEFT's own scaling of a
uniform arm (``alpha / r``, ``use_rslora``'s ``alpha / sqrt(r)``), and ranks counted from shapes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from loraplace.adapters import lora_config_for
from loraplace.config import LoraSettings, load_study
from loraplace.errors import LoraplaceError
from loraplace.methods.auto import auto_placement
from loraplace.methods.base import resolve_arm
from loraplace.placement.arms import Arm
from loraplace.placement.scale import SCALE_RULES

ALPHA, R = 16.0, 8


def scalings(peft_model) -> dict[str, float]:
    """Module -> the scaling PEFT applies to its adapter's update."""
    return {name: float(m.scaling["default"]) for name, m in peft_model.get_base_model().named_modules()
            if isinstance(m, LoraLayer)}


def assert_all(values, expected: float) -> None:
    values = list(values)
    assert values and all(v == pytest.approx(expected) for v in values), (sorted(set(values)), expected)


def peft_scales(model, placement, rule: str) -> dict[str, float]:
    """Module -> the scaling PEFT applies, after wrapping ``placement`` through loraplace's config."""
    return scalings(get_peft_model(copy.deepcopy(model), lora_config_for(
        placement, LoraSettings(r=R, alpha=ALPHA, scale=rule, dropout=0.0))))


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize("rule", ["alpha_over_r", "rslora"])
def test_a_uniform_arm_scales_as_peft_does(model, rule):
    """A hand-picked arm at one rank: PEFT's own scaling (use_rslora for rslora) on the same modules."""
    placement = resolve_arm(model, Arm("attention"), R, ALPHA, scale=rule)
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=placement.module_names, use_rslora=rule == "rslora"))
    expected = scalings(reference)
    assert peft_scales(model, placement, rule) == pytest.approx(expected)
    assert_all(expected.values(), ALPHA / R if rule == "alpha_over_r" else ALPHA / math.sqrt(R))


def test_fixed_gives_every_rank_the_study_scale(model):
    placement = resolve_arm(model, Arm("ffn[r=2]+attention[r=12]"), R, ALPHA, scale="fixed")
    assert {m.r for m in placement.modules} == {2, 12}
    assert_all(peft_scales(model, placement, "fixed").values(), ALPHA / R)


@pytest.mark.parametrize("rule", list(SCALE_RULES))
def test_automatic_arm_trains_at_the_scale_of_the_uniform_arm_of_its_budget(model, rule):
    """An automatic arm (uneven ranks) and the uniform arm on the same slots at the same budget
    (mode=uniform): every module of the automatic arm gets the uniform arm's PEFT scale."""
    uneven = resolve_arm(model, Arm("auto[score=random,draw=3,step=1]", "attention"), R, ALPHA, scale=rule,
                         ranks=_allocated(model, "auto[score=random,draw=3,step=1]"),
                         budget={"target": _attention_params(model)})
    uniform_ranks = _allocated(model, "auto[score=random,draw=3,step=1,mode=uniform]")
    assert set(uniform_ranks) == {m.name for m in uneven.modules}
    assert len({m.r for m in uneven.modules}) > 1
    # the uniform arm's rank, from the shapes: budget / (in + out) summed over the slots, rounded
    k = round(_attention_params(model) / sum(m.in_features + m.out_features for m in uneven.modules))
    assert min(uniform_ranks.values()) <= k <= max(uniform_ranks.values())
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=k, lora_alpha=ALPHA if rule != "fixed" else ALPHA * k / R, target_modules=sorted(uniform_ranks),
        use_rslora=rule == "rslora"))
    expected = set(scalings(reference).values())
    assert len(expected) == 1
    assert_all(peft_scales(model, uneven, rule).values(), expected.pop())


def test_matched_arm_with_uneven_ranks_has_one_scale(model):
    """A matched arm whose budget needs rank + 1 on some modules: all at alpha / the uniform rank."""
    matched = resolve_arm(model, Arm("ffn", "attention"), R, ALPHA)
    ranks = sorted({m.r for m in matched.modules})
    attention = _attention_params(model)
    ffn_size = sum(m.in_features + m.out_features for m in matched.modules)
    uniform = max(1, round(attention / ffn_size))
    assert len(ranks) > 1, ranks  # the case: rank + 1 on some modules
    assert_all(peft_scales(model, matched, "alpha_over_r").values(), ALPHA / uniform)


def test_an_unknown_rule_is_one_line(tmp_path):
    with pytest.raises(LoraplaceError, match="lora.scale"):
        load_study(None, {"lora.scale": "sqrt"})
    assert load_study(None, {"lora.scale": "rslora"}).lora.scale == "rslora"


def _attention_params(model) -> int:
    return resolve_arm(model, Arm("attention"), R, ALPHA).lora_params


def _allocated(model, strategy: str) -> dict[str, int]:
    return {m.name: m.r for m in auto_placement(model, Arm(strategy, "attention"), R, ALPHA, None).modules}
