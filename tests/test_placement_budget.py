"""Budget matching: exact arithmetic on the real DialoGPT-medium and SmolLM2-135M configs (meta
device, built-in config table) and on tiny models; every error."""

from __future__ import annotations

import pytest
import torch

from loraplace.errors import LoraplaceError
from loraplace.methods.base import resolve_arm
from loraplace.placement.arms import Arm, parse_budget_reference, parse_param_count, study_arms
from loraplace.placement.budget import budget_target, match_placement, resolve_matched
from loraplace.placement.resolve import resolve_placement
from loraplace.placement.strategies import parse_strategy


@pytest.fixture(scope="module")
def dialogpt_medium():
    from transformers import GPT2Config

    from loraplace.run.models import KNOWN_CONFIGS, meta_model

    values = {k: v for k, v in KNOWN_CONFIGS["microsoft/DialoGPT-medium"].items() if k != "model_type"}
    return meta_model(GPT2Config(**values))


@pytest.fixture(scope="module")
def smollm2():
    from transformers import LlamaConfig

    from loraplace.run.models import KNOWN_CONFIGS, meta_model

    values = {k: v for k, v in KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"].items() if k != "model_type"}
    return meta_model(LlamaConfig(**values))


def _per_rank(config: dict) -> dict[str, int]:
    """LoRA parameters per unit of rank, per module role, summed over the layers: r * (in + out)
    by hand from the config values (not from the model's modules)."""
    if "n_embd" in config:  # GPT-2: c_attn h -> 3h, attn.c_proj h -> h, c_fc h -> 4h, mlp.c_proj 4h -> h
        h, n = config["n_embd"], config["n_layer"]
        return {"attn.qkv": n * (h + 3 * h), "attn.o": n * 2 * h, "mlp.up": n * 5 * h, "mlp.down": n * 5 * h}
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    return {"attn.q": n * 2 * h, "attn.k": n * (h + kv), "attn.v": n * (h + kv), "attn.o": n * 2 * h,
            "mlp.gate": n * (h + i), "mlp.up": n * (h + i), "mlp.down": n * (h + i)}


def _config(name: str) -> dict:
    from loraplace.run.models import KNOWN_CONFIGS

    return KNOWN_CONFIGS[name]


def test_dialogpt_medium_matched_to_full(dialogpt_medium):
    model = dialogpt_medium
    per_rank = _per_rank(_config("microsoft/DialoGPT-medium"))
    attention, ffn = per_rank["attn.qkv"] + per_rank["attn.o"], per_rank["mlp.up"] + per_rank["mlp.down"]
    full = 16 * (attention + ffn)
    assert full == 6_291_456 and budget_target(model, "full", 16, 32) == full
    arms = {s: resolve_matched(model, parse_strategy(s), 16, 32, "full") for s in ("full", "attention", "ffn")}
    counts = {s: p.lora_params for s, p in arms.items()}
    # attention: 42 everywhere plus 43 on the 24 larger c_attn modules (4 * 1024 per rank) is exact.
    # ffn: rank 25 leaves 147,456; one more rank on 29 of the 48 modules (5 * 1024 each) is 1,024 over.
    assert full - 42 * attention == 24 * 4 * 1024 and 29 * 5 * 1024 - (full - 25 * ffn) == 1024
    assert counts == {"full": full, "attention": full, "ffn": 25 * ffn + 29 * 5 * 1024}
    assert max(counts.values()) / min(counts.values()) - 1 <= 0.01
    assert arms["attention"].ranks() == {"attn.qkv": [43], "attn.o": [42]}
    # ffn: 48 modules of 5,120 per rank: 25 everywhere, 26 on the first 29 in model order.
    assert arms["ffn"].ranks() == {"mlp.up": [25, 26], "mlp.down": [25, 26]}
    assert sum(m.r == 26 for m in arms["ffn"].modules) == 29
    assert [m.r for m in arms["ffn"].modules[:30]] == [26] * 29 + [25]
    budget = arms["ffn"].budget
    assert budget == {"reference": "full", "target": 6_291_456, "achieved": 6_292_480,
                      "deviation_pct": pytest.approx(100 * 1024 / 6_291_456), "ranks": arms["ffn"].ranks(),
                      "method": "uniform+1", "scale_rank": 26}  # 6,291,456 / 245,760 = 25.6 rounds to 26
    assert arms["full"].budget["method"] == "uniform" and arms["full"].ranks()["attn.qkv"] == [16]


def test_smollm2_matched_to_full(smollm2):
    arms = {s: resolve_matched(smollm2, parse_strategy(s), 16, 32, "full") for s in ("full", "attention", "ffn")}
    counts = {s: p.lora_params for s, p in arms.items()}
    per_rank = _per_rank(_config("HuggingFaceTB/SmolLM2-135M-Instruct"))
    attention = sum(v for k, v in per_rank.items() if k.startswith("attn."))
    ffn = sum(v for k, v in per_rank.items() if k.startswith("mlp."))
    full = 16 * (attention + ffn)
    # attention: rank 42 leaves 46,080 = 40 q/o modules (1152 per rank) at 43. ffn: rank 25 leaves
    # 132,480; one more rank on 63 of the 90 modules (576 + 1536 = 2112 each) overshoots by 576.
    assert full == 4_884_480 and full - 42 * attention == 40 * 1152 and 63 * 2112 - (full - 25 * ffn) == 576
    assert counts == {"full": full, "attention": full, "ffn": 25 * ffn + 63 * 2112}
    assert max(counts.values()) / min(counts.values()) - 1 <= 0.01
    assert arms["attention"].ranks() == {"attn.q": [42, 43], "attn.k": [42], "attn.v": [42], "attn.o": [42, 43]}
    assert arms["ffn"].ranks() == {"mlp.gate": [25, 26], "mlp.up": [25, 26], "mlp.down": [25, 26]}


def test_literal_strategies_match_too(dialogpt_medium):
    p = resolve_matched(dialogpt_medium, parse_strategy("paper-attention"), 16, 32, "full")
    assert p.lora_params == 6_291_456 and len(p.modules) == 72


def test_parameter_count_budget(smollm2):
    p = resolve_matched(smollm2, parse_strategy("qv"), 16, 32, parse_budget_reference("1M"))
    # q: 576 + 576, v: 576 + 192 per rank and layer: 30 * 1920 = 57,600 per rank.
    assert p.budget["target"] == 1_000_000 and p.budget["reference"] == 1_000_000
    assert abs(p.lora_params - 1_000_000) <= 1152
    assert p.budget["method"] == "uniform+1"


def test_uniform_rank_within_half_a_percent_is_kept():
    from loraplace.placement.resolve import AdaptedModule, Placement

    modules = [AdaptedModule(f"m{i}", "attn.q", i, 100, 100, 4, 8) for i in range(10)]
    p = match_placement(Placement("x", "f", modules, 10), target=8 * 200 * 10 + 5, reference=16005)
    assert {m.r for m in p.modules} == {8} and p.budget["method"] == "uniform"
    assert p.budget["achieved"] == 16_000
    p = match_placement(Placement("x", "f", modules, 10), target=8 * 2000 + 3 * 200, reference="ref")
    assert [m.r for m in p.modules] == [9, 9, 9] + [8] * 7 and p.budget["method"] == "uniform+1"
    assert p.lora_params == 16_600


def test_rank_one_floor_warns_and_never_drops_modules():
    from loraplace.placement.resolve import AdaptedModule, Placement

    modules = [AdaptedModule(f"m{i}", "mlp.up", i, 10, 10, 4, 8) for i in range(3)]
    p = match_placement(Placement("x", "f", modules, 3), target=10, reference=10)
    assert [m.r for m in p.modules] == [1, 1, 1] and p.budget["method"] == "rank-1 floor"
    assert any("below what rank 1 on every module" in w for w in p.warnings)


def test_ranks_fixed_by_the_strategy_are_kept(smollm2):
    p = resolve_matched(smollm2, parse_strategy("ffn[r=8]+attention"), 16, 32, "full")
    ranks = p.ranks()
    assert ranks["mlp.gate"] == ranks["mlp.up"] == ranks["mlp.down"] == [8]
    assert abs(p.lora_params - 4_884_480) / 4_884_480 <= 0.005
    with pytest.raises(LoraplaceError, match=r"sets r= on every term, so --match-budget has no rank to choose"):
        resolve_matched(smollm2, parse_strategy("ffn[r=8]+attention[r=4]"), 16, 32, "full")


def test_too_wide_ranks_are_warned(smollm2):
    p = resolve_matched(smollm2, parse_strategy("attn.k@0"), 16, 32, "full")
    assert any("exceed min(in, out)" in w for w in p.warnings)


def test_mixtral_experts_count_in_the_budget():
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=64, vocab_size=100, num_local_experts=4)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    full = resolve_placement(model, parse_strategy("full"), 2, 4).lora_params
    assert full == 2 * 2 * (4 * 64 + 4 * ((32 + 128) + (64 + 32)))
    p = resolve_matched(model, parse_strategy("attention"), 2, 4, "full")
    assert p.lora_params == full  # 2 layers * 4 modules * 64 = 512 per rank: rank 10 is exact
    assert p.ranks() == {"attn.q": [10], "attn.k": [10], "attn.v": [10], "attn.o": [10]}


@pytest.mark.parametrize("value, expected", [
    ("full", "full"), ("attention@last:2", "attention@last:2"), ("6291456", 6_291_456), ("6_291_456", 6_291_456),
    ("6.3M", 6_300_000), ("500k", 500_000), ("1g", 1_000_000_000), (42, 42),
])
def test_parse_budget(value, expected):
    assert parse_budget_reference(value) == expected


@pytest.mark.parametrize("value, expected", [
    ("6291456", 6_291_456), ("6_291_456", 6_291_456), ("12,000", 12_000), ("1e6", 1_000_000), ("500k", 500_000),
    ("2M", 2_000_000), ("6.3M", 6_300_000), ("1g", 10**9), ("2B", 2 * 10**9), (42, 42),
])
def test_one_parser_of_parameter_counts(value, expected):
    # --match-budget and the report's --budget read counts with the same rules
    assert parse_param_count(value) == expected
    assert parse_budget_reference(value) == expected
    with pytest.raises(LoraplaceError, match="--budget 'lots' is not a parameter count"):
        parse_param_count("lots", what="--budget")


@pytest.mark.parametrize("value, fragment", [
    ("0", "a parameter budget must be at least 1"),
    (0, "a parameter budget must be at least 1"),
    ("fulll", "match_budget 'fulll' is neither a parameter count (like 6291456 or 6.3M) nor a valid reference "
              "strategy: invalid strategy 'fulll'"),
    ("6.3X", "neither a parameter count"),
    (True, "neither a parameter count nor a strategy"),
])
def test_parse_budget_errors(value, fragment):
    with pytest.raises(LoraplaceError) as info:
        parse_budget_reference(value)
    assert fragment in str(info.value)


def test_arm_labels(smollm2):
    assert Arm("attention", "full").label == "attention~full" and Arm("ffn").label == "ffn"
    assert Arm.parse("attention@last:2~6.3M") == Arm("attention@last:2", 6_300_000)
    assert Arm.parse("qv") == Arm("qv")
    assert [a.label for a in study_arms(["full", "attention@last:2"], "full")] == [
        "full", "attention@last:2", "attention@last:2~full"]
    assert study_arms(["qv"], None) == [Arm("qv")]
    per_rank = _per_rank(_config("HuggingFaceTB/SmolLM2-135M-Instruct"))
    attention = sum(v for k, v in per_rank.items() if k.startswith("attn."))
    assert resolve_arm(smollm2, Arm("attention", "full"), 16, 32).lora_params == 16 * sum(per_rank.values())
    assert resolve_arm(smollm2, Arm("attention"), 16, 32).lora_params == 16 * attention == 1_843_200
