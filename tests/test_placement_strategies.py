"""The strategy language: every selector, every layer selection, per-term rank/alpha, and every
error message, on a 12-layer tiny Llama (meta device) and a 2+2-block T5."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from loraplace.errors import LoraplaceError
from loraplace.placement.resolve import resolve_placement
from loraplace.placement.strategies import BUILTIN_STRATEGIES, parse_strategies, parse_strategy, split_strategy_list


@pytest.fixture(scope="module")
def llama12():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=12, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def layers_of(model, spec: str, role: str | None = None) -> list[int]:
    p = resolve_placement(model, parse_strategy(spec), 4, 8)
    return sorted({m.layer for m in p.modules if role is None or m.role == role})


@pytest.mark.parametrize("spec, expected", [
    ("attention", list(range(12))),
    ("attention@all", list(range(12))),
    ("attention@first:3", [0, 1, 2]),
    ("attention@last:12", list(range(12))),
    ("attention@last:2", [10, 11]),
    ("attention@3-5", [3, 4, 5]),
    ("attention@7", [7]),
    ("attention@every:4", [0, 4, 8]),
    ("attention@every:4:1", [1, 5, 9]),
    ("attention@0,3,5", [0, 3, 5]),
    ("attention@0-1,10-11", [0, 1, 10, 11]),
    ("attention@last:1/2", list(range(6, 12))),
    ("attention@first:1/3", [0, 1, 2, 3]),
    ("attention@last:0.25", [9, 10, 11]),
    ("attention@first:50%", list(range(6))),
    ("attention@last:1/8", [10, 11]),  # 1.5 layers rounds half up to 2
    ("attention@first:2,last:2", [0, 1, 10, 11]),
])
def test_every_layer_selection(llama12, spec, expected):
    assert layers_of(llama12, spec) == expected


def test_selected_modules_are_exact(llama12):
    p = resolve_placement(llama12, parse_strategy("qv@0-1"), 4, 8)
    assert p.module_names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                              "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert p.lora_params == 4 * 2 * ((16 + 16) + (16 + 8))


@pytest.mark.parametrize("spec, roles", [
    ("full", {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}),
    ("attention", {"attn.q", "attn.k", "attn.v", "attn.o"}),
    ("self-attention", {"attn.q", "attn.k", "attn.v", "attn.o"}),
    ("ffn", {"mlp.gate", "mlp.up", "mlp.down"}),
    ("qv", {"attn.q", "attn.v"}),
    ("attn-o", {"attn.o"}),
    ("mlp-down", {"mlp.down"}),
    ("attn.k", {"attn.k"}),
    ("attn.*", {"attn.q", "attn.k", "attn.v", "attn.o"}),
    ("mlp.*", {"mlp.gate", "mlp.up", "mlp.down"}),
    ("attn.q|mlp.up", {"attn.q", "mlp.up"}),
    ("qv+mlp-down", {"attn.q", "attn.v", "mlp.down"}),
    ("embed", {"embed"}),
    ("lm_head", {"lm_head"}),
    ("full+embed+lm_head", {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "embed",
                            "lm_head"}),
])
def test_every_selector(llama12, spec, roles):
    assert {m.role for m in resolve_placement(llama12, parse_strategy(spec), 4, 8).modules} == roles


def test_per_term_rank_and_alpha(llama12):
    p = resolve_placement(llama12, parse_strategy("ffn[r=8]+attention[r=16,alpha=4]"), 2, 3)
    assert {(m.role, m.r, m.alpha) for m in p.modules} == {
        ("mlp.gate", 8, 3), ("mlp.up", 8, 3), ("mlp.down", 8, 3),
        ("attn.q", 16, 4), ("attn.k", 16, 4), ("attn.v", 16, 4), ("attn.o", 16, 4)}
    per_layer = 8 * 3 * (16 + 32) + 16 * ((16 + 16) * 2 + (16 + 8) * 2)
    assert p.lora_params == 12 * per_layer
    assert p.ranks() == {"attn.q": [16], "attn.k": [16], "attn.v": [16], "attn.o": [16],
                         "mlp.gate": [8], "mlp.up": [8], "mlp.down": [8]}


def test_later_term_overrides_rank_and_options_may_come_before_layers(llama12):
    p = resolve_placement(llama12, parse_strategy("attention+qv[r=32]@last:2"), 4, 8)
    ranks = {(m.layer, m.role): m.r for m in p.modules}
    assert ranks[(11, "attn.q")] == 32 and ranks[(11, "attn.k")] == 4 and ranks[(0, "attn.q")] == 4
    assert len(p.modules) == 48


def test_composed_strategy_fields():
    s = parse_strategy(" ffn[r=8] + attention@last:12 [r=16] ")
    assert s.name == "ffn[r=8]+attention@last:12[r=16]"
    assert [(t.roles, t.r, t.layers.text if t.layers else None) for t in s.terms] == [
        (("mlp.*",), 8, None), (("attn.*", "xattn.*"), 16, "last:12")]
    assert s.roles == ("mlp.*", "attn.*", "xattn.*") and not s.is_literal and s.has_fixed_ranks
    assert s.terms[1].layers.items == (("last", 12),)
    assert parse_strategy("full@last:1/2").terms[0].layers.items == (("last", Fraction(1, 2)),)
    assert "in layers last:12" in s.description and "r=16" in s.description


def test_builtins_keep_their_roles():
    assert BUILTIN_STRATEGIES["qv"].roles == ("attn.q", "attn.v")
    assert BUILTIN_STRATEGIES["paper-full"].peft_targets == ("c_attn", "c_proj", "c_fc")
    assert parse_strategy("full") is BUILTIN_STRATEGIES["full"]


def test_the_same_list_on_the_command_line_and_in_yaml(llama12):
    text = "full, attention@last:12, qv@0,3,5, ffn[r=8,alpha=16]+attention[r=16]"
    # Split by hand: commas inside a layer list (0,3,5) or an option block ([r=8,alpha=16]) stay.
    by_hand = ["full", "attention@last:12", "qv@0,3,5", "ffn[r=8,alpha=16]+attention[r=16]"]
    assert split_strategy_list(text) == by_hand
    from_text, from_list = parse_strategies(text), parse_strategies(by_hand)  # command line vs YAML list
    assert [s.name for s in from_text] == [s.name for s in from_list] == by_hand
    # ... and they place the same modules: qv@0,3,5 is q and v in layers 0, 3 and 5.
    for a, b in zip(from_text, from_list):
        assert resolve_placement(llama12, a, 4, 8).to_dict() == resolve_placement(llama12, b, 4, 8).to_dict()
    qv = resolve_placement(llama12, from_text[2], 4, 8)
    assert qv.module_names == [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 3, 5) for m in ("q", "v")]
    mixed = resolve_placement(llama12, from_text[3], 4, 8)
    assert {(m.role, m.r, m.alpha) for m in mixed.modules if m.layer == 0} == {
        ("mlp.gate", 8, 16), ("mlp.up", 8, 16), ("mlp.down", 8, 16),
        ("attn.q", 16, 8), ("attn.k", 16, 8), ("attn.v", 16, 8), ("attn.o", 16, 8)}


def test_yaml_and_overrides_accept_the_language(tmp_path):
    from loraplace.config import load_study

    path = tmp_path / "s.yaml"
    path.write_text("strategies:\n  - attention@last:12\n  - 'ffn[r=8]+attention[r=16]'\n  - qv@0-11\n")
    assert load_study(path).strategies == ["attention@last:12", "ffn[r=8]+attention[r=16]", "qv@0-11"]
    assert load_study(None, {"strategies": "qv@0,3,5,full"}).strategies == ["qv@0,3,5", "full"]


@pytest.mark.parametrize("spec, fragments", [
    ("mlp", ["invalid strategy 'mlp'", "unknown role or strategy name at 'mlp' (character 1)",
             "expected one of full, attention"]),
    ("attention@lst:12", ["unknown layer selection at 'lst:12' (character 11)", "first:K, last:K"]),
    ("attention@", ["empty layer selection"]),
    ("attention@last:x", ["not a layer count or fraction at 'x' (character 16)"]),
    ("attention@last:0", ["not a layer count or fraction at '0'"]),
    ("attention@last:3/2", ["fraction outside (0, 1] at '3/2'"]),
    ("attention@first:0%", ["fraction outside (0, 1] at '0%'"]),
    ("attention@5-2", ["range ends before it starts at '5-2'", "e.g. 2-5"]),
    ("attention@every:0", ["every:0 selects nothing"]),
    ("ffn[r=0]", ["rank must be a whole number >= 1 at 'r=0' (character 5)"]),
    ("ffn[r=2.5]", ["rank must be a whole number >= 1 at 'r=2.5'"]),
    ("ffn[alpha=-1]", ["alpha must be a positive number at 'alpha=-1'"]),
    ("ffn[alpha=x]", ["alpha must be a positive number at 'alpha=x'"]),
    ("ffn[rank=8]", ["unknown option at 'rank=8'", "r=INT, alpha=NUMBER and/or init=INIT"]),
    ("ffn[init=lora]", ["unknown initialisation at 'init=lora'", "init=default|gaussian|pissa|olora|orthogonal"]),
    ("ffn[r=8", ["unbalanced brackets"]),
    ("ffn+", ["missing role or strategy name"]),
    ("@0-3", ["missing role or strategy name"]),
    ("ffn@0@1", ["unexpected text at '@1'"]),
    ("ffn[r=8][r=4]", ["unexpected text at '[r=4]'"]),
    ("attn.x", ["unknown role or strategy name at 'attn.x'"]),
    ("qv|attnq", ["unknown role or strategy name at 'attnq' (character 4)"]),
    ("paper-full@0", ["strategy paper-full cannot be combined", "paper-full on its own"]),
    ("full+paper-ffn", ["strategy paper-ffn cannot be combined", "at 'paper-ffn' (character 6)"]),
])
def test_every_parse_error_points_at_the_offending_part(spec, fragments):
    with pytest.raises(LoraplaceError) as info:
        parse_strategy(spec)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_empty_and_duplicate_lists():
    with pytest.raises(LoraplaceError, match="empty strategy"):
        parse_strategy("  ")
    with pytest.raises(LoraplaceError, match="no strategies given"):
        parse_strategies(" , ")
    with pytest.raises(LoraplaceError, match="listed more than once: attention@0"):
        parse_strategies(["attention@0", "attention @ 0"])


@pytest.mark.parametrize("spec, fragments", [
    ("attention@last:13", ["layer selection 'last:13'", "asks for 13 layers but the model has 12 (0-11)"]),
    ("attention@first:13", ["first:13 asks for 13 layers"]),
    ("attention@0-12", ["0-12 names layer 12 but the model has 12 layers (0-11)"]),
    ("attention@12", ["12 names layer 12"]),
    ("attention@every:2:12", ["offset 12 is beyond the model's 12 layers"]),
    ("attention@last:1/100", ["last:1/100 of 12 layers selects no layer"]),
    ("xattn.q", ["strategy 'xattn.q' matches no module of this llama model", "(roles xattn.q)",
                 "pick roles it has: attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.up, mlp.down, embed, lm_head",
                 "its linear modules are: model.layers.0.self_attn.q_proj"]),
    ("ffn+cross-attention@0", ["in its term 'cross-attention@0'", "(roles xattn.* in layers 0)"]),
    ("embed@0", ["(roles embed in layers 0)"]),
    ("mlp.gate_up", ["matches no module", "(roles mlp.gate_up)"]),
])
def test_every_resolution_error(llama12, spec, fragments):
    with pytest.raises(LoraplaceError) as info:
        resolve_placement(llama12, parse_strategy(spec), 4, 8)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_layer_selection_counts_per_stack_in_encoder_decoder_models():
    from transformers import AutoModelForSeq2SeqLM, T5Config

    config = T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=3, num_decoder_layers=2, num_heads=2, vocab_size=50)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
    p = resolve_placement(model, parse_strategy("attn.q@last:1"), 4, 8)
    assert p.module_names == ["encoder.block.2.layer.0.SelfAttention.q", "decoder.block.1.layer.0.SelfAttention.q"]
    p = resolve_placement(model, parse_strategy("xattn.v@0"), 4, 8)
    assert p.module_names == ["decoder.block.0.layer.1.EncDecAttention.v"]
    with pytest.raises(LoraplaceError, match=r"stack decoder.block: 2 names layer 2 but the model has 2 layers"):
        resolve_placement(model, parse_strategy("attention@2"), 4, 8)
