"""Role inference for architectures without a written table, and its refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from loraplace.errors import LoraplaceError
from loraplace.placement.resolve import resolve_placement
from loraplace.placement.strategies import parse_strategy


def test_gpt_neo_roles_are_inferred_and_said():
    from transformers import AutoModelForCausalLM, GPTNeoConfig

    config = GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=2, vocab_size=100, max_position_embeddings=64,
                          attention_types=[[["global", "local"], 1]])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    p = resolve_placement(model, parse_strategy("full"), 2, 4)
    assert {m.name: m.role for m in p.modules} == {
        f"transformer.h.{i}.{path}": role for i in range(2) for path, role in (
            ("attn.attention.q_proj", "attn.q"), ("attn.attention.k_proj", "attn.k"),
            ("attn.attention.v_proj", "attn.v"), ("attn.attention.out_proj", "attn.o"),
            ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down"))}
    assert p.family == "gpt_neo (inferred)"
    assert len(p.warnings) == 1 and "roles were inferred from the module tree" in p.warnings[0]
    assert "mlp.down: mlp.c_proj" in p.warnings[0]


def test_codegen_fused_qkv_is_inferred():
    from transformers import AutoModelForCausalLM, CodeGenConfig

    config = CodeGenConfig(n_embd=32, n_layer=2, n_head=2, vocab_size=100, rotary_dim=8, n_positions=64)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    p = resolve_placement(model, parse_strategy("attention"), 2, 4)
    assert {m.name: m.role for m in p.modules} == {
        f"transformer.h.{i}.attn.{leaf}": role for i in range(2)
        for leaf, role in (("qkv_proj", "attn.qkv"), ("out_proj", "attn.o"))}


class Block(nn.Module):
    def __init__(self, layout: dict[str, tuple[int, int]]):
        super().__init__()
        for path, (i, o) in layout.items():
            parent = self
            *containers, leaf = path.split(".")
            for c in containers:
                if not hasattr(parent, c):
                    parent.add_module(c, nn.Module())
                parent = getattr(parent, c)
            parent.add_module(leaf, nn.Linear(i, o))


class Mystery(nn.Module):
    """A made-up architecture: a numbered stack of blocks with the given linear layout."""

    def __init__(self, layout: dict[str, tuple[int, int]], hidden: int = 8, blocks: int = 2):
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery", hidden_size=hidden)
        self.layers = nn.ModuleList(Block(layout) for _ in range(blocks))
        self.head = nn.Linear(hidden, 4)


def test_a_clean_unknown_architecture_is_inferred():
    model = Mystery({"attn.q": (8, 8), "attn.k": (8, 8), "attn.v": (8, 8), "attn.o": (8, 8),
                     "ffn.w1": (8, 16), "ffn.w3": (8, 16), "ffn.w2": (16, 8)})
    p = resolve_placement(model, parse_strategy("ffn"), 2, 4)
    assert {m.name: m.role for m in p.modules} == {
        f"layers.{i}.ffn.{w}": role for i in range(2) for w, role in (("w1", "mlp.gate"), ("w3", "mlp.up"),
                                                                     ("w2", "mlp.down"))}
    assert p.lora_params == 2 * 2 * 3 * 24


@pytest.mark.parametrize("layout, problem", [
    ({"lin_a": (8, 16), "lin_b": (16, 8)}, "no clear role for 'lin_a' (shape 8->16)"),
    ({"attn.q_proj": (8, 8), "attn.query": (8, 8)}, "'attn.q_proj' and 'attn.query' would both be attn.q"),
    ({"mlp.down_proj": (16, 4)}, "no clear role for 'mlp.down_proj' (shape 16->4)"),
    ({"attn.mlp.q": (8, 8)}, "no clear role for 'attn.mlp.q'"),
    ({"attn.mixer": (8, 8)}, "no clear role for 'attn.mixer'"),
])
def test_ambiguous_architectures_stop_and_list_the_linear_modules(layout, problem):
    model = Mystery(layout)
    with pytest.raises(LoraplaceError) as info:
        resolve_placement(model, parse_strategy("full"), 2, 4)
    message = str(info.value)
    assert message.startswith("model_type 'mystery' has no role table and its roles cannot be inferred safely")
    assert problem in message
    assert "Its linear modules are: " in message and "layers.0." in message and "head" in message
    assert "Add a table in loraplace/placement/roles.py" in message


def test_no_block_stack_at_all():
    model = nn.Module()
    model.config = SimpleNamespace(model_type="flat", hidden_size=8)
    model.proj = nn.Linear(8, 8)
    with pytest.raises(LoraplaceError, match=r"no numbered block stack .* Its linear modules are: proj"):
        resolve_placement(model, parse_strategy("full"), 2, 4)


def test_literal_strategies_skip_inference():
    model = Mystery({"lin_a": (8, 16), "lin_b": (16, 8)})
    from loraplace.placement.strategies import Strategy

    p = resolve_placement(model, Strategy("lit", peft_targets=("lin_a",)), 2, 4)
    assert p.module_names == ["layers.0.lin_a", "layers.1.lin_a"] and {m.role for m in p.modules} == {"?"}


def test_model_without_model_type():
    model = nn.Linear(2, 2)
    with pytest.raises(LoraplaceError, match="no config.model_type"):
        resolve_placement(model, parse_strategy("full"), 2, 4)
