"""Slot groups: one arm per role and per third of the layers, at one budget, as the truth a score
should predict (``groups`` in a strategy list; ``part:I/N`` layer selections)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import GPT2Config, LlamaConfig

from loraplace.config import load_study
from loraplace.errors import LoraplaceError
from loraplace.placement.arms import slot_group, study_arms
from loraplace.placement.groups import expand_groups
from loraplace.placement.resolve import resolve_placement
from loraplace.placement.strategies import parse_strategy
from loraplace.plan import build_plan
from loraplace.report.auto import SLOT_GROUPS, trusted_score, validity_summary
from loraplace.run.models import meta_model
from loraplace.study.checks import expand_study_groups


def llama(layers: int = 6):
    return meta_model(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize("layers, part, expected", [
    (6, "part:1/3", [0, 1]), (6, "part:2/3", [2, 3]), (6, "part:3/3", [4, 5]),
    (30, "part:2/3", list(range(10, 20))), (7, "part:1/3", [0, 1]), (7, "part:3/3", [4, 5, 6]),
    (4, "part:2/4,part:4/4", [1, 3])])
def test_part_selects_the_ith_of_n_consecutive_parts(layers, part, expected):
    placement = resolve_placement(llama(layers), parse_strategy(f"attn.q@{part}"), 4, 8.0)
    assert [m.layer for m in placement.modules] == expected


def test_part_rejects_bad_input_with_one_line():
    for spec, problem in (("full@part:0/3", "part outside 1..N"), ("full@part:4/3", "part outside 1..N"),
                          ("full@part:2", "unknown layer selection")):
        with pytest.raises(LoraplaceError, match=problem):
            parse_strategy(spec)
    with pytest.raises(LoraplaceError, match="part 1 of 3 of 2 layers is empty"):
        resolve_placement(llama(2), parse_strategy("full@part:1/3"), 4, 8.0)


def test_groups_expand_to_each_role_in_model_order_and_each_third():
    roles = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]
    thirds = [f"full@part:{i}/3~attention" for i in (1, 2, 3)]
    assert expand_groups(["attention", "groups~attention"], llama()) == (
        ["attention"] + [f"{r}~attention" for r in roles] + thirds)
    # an arm listed already is not repeated; plain groups carries no reference
    assert expand_groups(["attn.q~attention", "groups~attention"], llama())[:2] == ["attn.q~attention",
                                                                                  "attn.k~attention"]
    assert expand_groups(["groups"], llama())[0] == "attn.q"
    gpt2 = meta_model(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2))
    # GPT-2 has a fused qkv; two blocks have no first third
    assert expand_groups(["groups~attention"], gpt2) == [
        "attn.qkv~attention", "attn.o~attention", "mlp.up~attention", "mlp.down~attention",
        "full@part:2/3~attention", "full@part:3/3~attention"]


def test_every_group_arm_is_recognised_and_nothing_else():
    arms = expand_groups(["groups"], llama())
    assert [slot_group(a) for a in arms] == ["role"] * 7 + ["layers"] * 3
    for other in ("full", "attention", "ffn", "qv", "attn.q@0-3", "attn.*", "full@part:1/2", "eva",
                  "auto[score=adam]", "attn.q[r=4]"):
        assert slot_group(other) is None, other


def test_a_study_file_takes_groups_and_the_study_stores_the_concrete_arms(tiny_llama_dir):
    config = load_study(None, {"model": str(tiny_llama_dir), "strategies": ["attention", "groups~attention"]})
    with pytest.raises(LoraplaceError, match="depend on the model"):
        study_arms(config.strategies, None)
    expanded = expand_study_groups(config)
    # 7 roles; the tiny model has 2 blocks, so only its second and third thirds hold a layer
    assert expanded.strategies[:2] == ["attention", "attn.q~attention"] and len(expanded.strategies) == 1 + 7 + 2
    assert [a.label for a in study_arms(expanded.strategies, None)] == expanded.strategies
    with pytest.raises(LoraplaceError, match="neither a parameter count .* nor a valid reference strategy"):
        load_study(None, {"strategies": ["groups~nonsense"]})


def test_plan_shows_the_group_arms_at_one_budget():
    result = build_plan("HuggingFaceTB/SmolLM2-135M-Instruct", ["groups~attention"], 16, 32.0)
    rows = {row["strategy"]: row for row in result["strategies"]}
    assert len(rows) == 10 and "mlp.down~attention" in rows and "full@part:2/3~attention" in rows
    attention = 30 * 16 * (576 + 576 + 576 + 192 + 576 + 192 + 576 + 576)  # q, k, v, o: in + out, by hand
    for row in rows.values():
        assert abs(row["trainable_params"] - attention) <= 0.005 * attention


def _rec(arm: str, measured: float, **predicted: float) -> dict:
    return {"arm": arm, "role_group": None, "slot_group": slot_group(arm.partition("~")[0]),
            "measured_gain": measured, **{f"predicted_{k}": v for k, v in predicted.items()}}


def test_validity_names_the_score_that_ranks_the_slot_groups_as_training_did():
    recs = [_rec("attn.q~attention", 0.10, adam=4.0, gradient=1.0),
            _rec("mlp.down~attention", 0.30, adam=9.0, gradient=0.5),
            _rec("full@part:1/3~attention", 0.20, adam=6.0, gradient=0.8),
            _rec("full@part:3/3~attention", 0.05, adam=1.0, gradient=3.0),
            _rec("full~attention", 0.40, adam=10.0, gradient=2.0)]  # not a group arm
    view = SimpleNamespace(scores={"adam": SimpleNamespace(score="adam"),
                                   "gradient": SimpleNamespace(score="gradient")})
    summary = validity_summary(view, recs)
    groups = {r["score"]: r for r in summary if r["scope"] == SLOT_GROUPS}
    assert groups["adam"]["n"] == 4 and groups["adam"]["rho"] == pytest.approx(1.0)
    # by hand: measured ranks (q, down, part1, part3) 2, 4, 3, 1; gradient ranks 3, 1, 2, 4: sum d^2 = 20,
    # rho = 1 - 6 * 20 / (4 * 15) = -1
    assert groups["gradient"]["rho"] == pytest.approx(-1.0)
    assert "the adam score agrees best" in trusted_score(summary)
    assert trusted_score([r for r in summary if r["scope"] != SLOT_GROUPS]) is None
