"""Automatic placement: the rank allocation under a budget, the ``auto`` strategy, and its
resolution to an explicit placement that PEFT applies exactly."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from loraplace.errors import LoraplaceError
from loraplace.placement.allocate import SlotCurve, allocate, predicted_gain, random_curves
from loraplace.placement.arms import Arm, parse_arm, study_arms
from loraplace.placement.strategies import AutoOptions, parse_strategy


def _concave_slots(seed: int, n: int = 6, length: int = 8) -> list[SlotCurve]:
    """Slots with random sizes and random concave curves (cumulative sums of decreasing gains)."""
    rng = np.random.default_rng(seed)
    slots = []
    for i in range(n):
        steps = np.sort(rng.uniform(0.0, 1.0, size=length))[::-1] * rng.uniform(0.5, 5.0)
        slots.append(SlotCurve(f"m{i}", int(rng.integers(3, 20)), tuple(np.cumsum(steps)), max_rank=length))
    return slots


def _best_by_brute_force(slots: list[SlotCurve], budget: int, step: int) -> float:
    """The highest total gain of any rank assignment (multiples of ``step``) costing at most ``budget``."""
    choices = [range(0, len(s.curve) + 1, step) for s in slots]
    best = 0.0
    for ranks in itertools.product(*choices):
        if sum(r * s.size for r, s in zip(ranks, slots)) <= budget:
            best = max(best, sum(s.gain(r) for r, s in zip(ranks, slots)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_greedy_is_optimal_at_the_budget_it_spends(seed):
    # For concave curves the greedy prefix is the optimum of the fractional relaxation at the cost it
    # spends, hence optimal among integer assignments of that cost: checked against brute force.
    slots = _concave_slots(seed, n=4, length=4)
    for budget in (10, 25, 40):
        ranks = allocate(slots, budget, step=1, max_r=4, tolerance=1.0)
        spent = sum(r * s.size for s in slots for n, r in ranks.items() if n == s.name)
        gain = predicted_gain(slots, ranks)
        assert gain >= _best_by_brute_force(slots, spent, 1) - 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_allocation_meets_the_budget_and_is_monotone_and_deterministic(seed):
    slots = _concave_slots(seed, n=40, length=16)
    previous: dict[str, int] = {}
    for budget in range(4000, 6000, 150):  # one step costs at most 38: under 1% of the budget
        ranks = allocate(slots, budget, step=2, max_r=16)
        spent = sum(r * next(s.size for s in slots if s.name == n) for n, r in ranks.items())
        assert abs(spent - budget) <= 0.01 * budget
        assert all(r % 2 == 0 and 0 < r <= 16 for r in ranks.values())
        assert all(ranks.get(n, 0) >= r for n, r in previous.items())  # a larger budget takes away no rank
        assert ranks == allocate(list(slots), budget, step=2, max_r=16)
        previous = ranks


def test_known_answer_one_important_slot_gets_the_rank():
    flat = tuple(float(k) for k in range(1, 9))  # exact steps of 1: ties are exact
    slots = [SlotCurve(f"m{i}", 10, flat) for i in range(5)]
    slots[3] = SlotCurve("m3", 10, tuple(1000.0 * k for k in range(1, 9)))
    assert allocate(slots, 80, step=1, max_r=8) == {"m3": 8}
    # worst: everything but m3, filled from the first slot in model order (ties) to its max rank
    assert allocate(slots, 80, step=1, max_r=8, mode="worst") == {"m0": 8}
    # gain per parameter, not per rank: a cheaper slot with the same curve wins
    cheap = [SlotCurve("big", 20, flat), SlotCurve("small", 5, flat)]
    assert allocate(cheap, 40, step=1, max_r=8) == {"small": 8}


def test_a_small_budget_is_filled_by_the_steps_that_still_fit():
    slots = [SlotCurve("big", 50, tuple(3.0 * k for k in range(1, 5))), SlotCurve("small", 4, (1.0, 1.5, 1.8, 2.0))]
    # greedy order: big (0.06/param) x4 = 200, then small; at 214 the prefix stops at 200 (>1% off)
    # and the fill adds small's steps that fit: 204, 208, 212
    assert allocate(slots, 214, step=1, max_r=4) == {"big": 4, "small": 3}


def test_allocation_errors_say_what_to_change():
    slots = [SlotCurve("a", 100, (1.0, 2.0)), SlotCurve("b", 100, (1.0, 2.0))]
    with pytest.raises(LoraplaceError, match="raise max_r"):
        allocate(slots, 10_000, step=1, max_r=2)
    with pytest.raises(LoraplaceError, match="step=1"):
        allocate(slots, 250, step=2, max_r=2)
    with pytest.raises(LoraplaceError, match="mode"):
        allocate(slots, 100, mode="random")


def test_random_curves_are_seeded_draws():
    slots = _concave_slots(0, n=30)
    a, b, c = (allocate(random_curves(slots, d), 800, step=2, max_r=8) for d in (1, 1, 2))
    assert a == b and a != c


def test_auto_strategy_language():
    s = parse_strategy("auto[score=activation,mode=worst,step=4,max_r=32]")
    assert s.is_auto and s.auto == AutoOptions(score="activation", mode="worst", step=4, max_r=32)
    assert parse_strategy("auto").auto == AutoOptions()
    assert parse_arm("auto[score=random,draw=3]~attention") == Arm("auto[score=random,draw=3]", "attention")
    for bad, fragment in [("auto@0-3", "only [OPTIONS]"), ("ffn+auto", "cannot be combined"),
                          ("auto[draw=2]", "score=random only"), ("auto[score=x]", "invalid value"),
                          ("auto[score=weight,score=gradient]", "twice")]:
        with pytest.raises(LoraplaceError, match=re.escape(fragment)):
            parse_strategy(bad)
    # an entry may name its own reference; repeats of a matched arm collapse
    arms = study_arms(["attention", "ffn~attention", "ffn", "auto~attention"], "attention")
    assert [a.label for a in arms] == ["attention", "ffn~attention", "ffn", "auto~attention"]


@pytest.fixture(scope="module")
def skeleton():
    from transformers import LlamaConfig

    from loraplace.run.models import meta_model

    return meta_model(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2))


def test_auto_placement_meets_the_reference_budget_with_constant_update_scale(skeleton):
    from loraplace.methods.auto import auto_placement
    from loraplace.placement.resolve import explicit_placement, resolve_placement, slot_placement

    attention = resolve_placement(skeleton, parse_strategy("attention"), 8, 16.0).lora_params
    modules = slot_placement(skeleton).modules

    class Scores:  # only the mlp.down of layer 2 matters
        max_rank = 32
        slots = [type("S", (), {"name": m.name, "curve": [(100.0 if m.name.endswith("2.mlp.down_proj") else 0.1) * k
                                                           for k in range(1, 33)]}) for m in modules]

    placement = auto_placement(skeleton, Arm("auto[step=1]", "attention"), 8, 16.0, Scores())
    assert abs(placement.lora_params - attention) <= 0.01 * attention
    by_name = {m.name: m for m in placement.modules}
    down = by_name["model.layers.2.mlp.down_proj"]
    assert down.r == 32  # the one slot that matters gets the most rank the study allows (4 x 8)
    # One update scale for every module: alpha over the rank a uniform arm of attention's budget on the
    # chosen slots has (the default rule alpha_over_r), computed here from the shapes.
    uniform = max(1, round(attention / sum(m.in_features + m.out_features for m in placement.modules)))
    assert all(m.alpha / m.r == pytest.approx(16.0 / uniform) for m in placement.modules)
    assert placement.budget["target"] == attention and placement.budget["reference"] == "attention"
    with pytest.raises(LoraplaceError, match="does not have"):
        explicit_placement(skeleton, "auto", {"model.layers.9.mlp.up_proj": 4}, 16.0)


def test_peft_trains_exactly_the_explicit_placement(tiny_llama_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from loraplace.adapters import check_wrapped, lora_config_for, wrapped_adapters
    from loraplace.config import LoraSettings
    from loraplace.placement.params import trainable_params
    from loraplace.placement.resolve import explicit_placement
    from loraplace.placement.scale import apply_scale

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ranks = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 6,
             "model.layers.1.self_attn.v_proj": 4}
    placement = apply_scale(explicit_placement(model, "auto", ranks, 8.0), "fixed", 4)
    peft_model = get_peft_model(model, lora_config_for(placement, LoraSettings(r=4, alpha=8.0, dropout=0.0)))
    check_wrapped(peft_model, placement, trainable_params(peft_model))
    expected = {name: (r, 8.0 * r / 4) for name, r in ranks.items()}  # alpha / r stays 2 on every module
    assert {n: (r, float(a)) for n, (r, a) in wrapped_adapters(peft_model).items()} == expected
    assert trainable_params(peft_model) == sum(r * (32 + (64 if "down" in n else 32 if "q_proj" in n else 16))
                                               for n, r in ranks.items())
