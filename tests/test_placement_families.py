"""Role tables on every supported family: tiny random-init models built from transformers config
classes on the meta device (no downloads, no weights), exact module names and exact counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from loraplace.errors import LoraplaceError
from loraplace.placement.resolve import resolve_placement
from loraplace.placement.roles import BLOCK_NAME, FAMILIES, known_model_types, roles_for
from loraplace.placement.strategies import parse_strategy


def build(family: str, device: str = "meta") -> nn.Module:
    """A 2-block model of ``family`` with hidden size 32 (intermediate 64 unless fixed by the family),
    on the meta device or (``device="cpu"``) with random weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    config, kind = config_of(family)
    auto = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
            "classify": AutoModelForSequenceClassification}[kind]
    with torch.device(device):
        return auto.from_config(config)


def config_of(family: str):
    """``(config, kind)`` of a tiny ``family`` model; kind is causal, seq2seq or classify."""
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    causal = {
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64),
        "gptj": lambda: tf.GPTJConfig(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, rotary_dim=8),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**small),
        "opt": lambda: tf.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                                    vocab_size=100, word_embed_proj_dim=32),
        "bloom": lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=2, vocab_size=100),
        "falcon": lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=100),
        "llama": lambda: tf.LlamaConfig(**small, num_key_value_heads=1),
        "mistral": lambda: tf.MistralConfig(**small, num_key_value_heads=1),
        "qwen2": lambda: tf.Qwen2Config(**small, num_key_value_heads=1),
        "gemma": lambda: tf.GemmaConfig(**small, num_key_value_heads=1, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**small, num_key_value_heads=1, head_dim=16),
        "qwen3": lambda: tf.Qwen3Config(**small, num_key_value_heads=1, head_dim=16),
        "olmo": lambda: tf.OlmoConfig(**small, num_key_value_heads=1, pad_token_id=1, eos_token_id=2),
        "olmo2": lambda: tf.Olmo2Config(**small, num_key_value_heads=1, pad_token_id=1, eos_token_id=2),
        "phi3": lambda: tf.Phi3Config(**small, pad_token_id=0),
        "mixtral": lambda: tf.MixtralConfig(**small, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    }
    if family in causal:
        return causal[family](), "causal"
    if family == "bert":
        return tf.BertConfig(**small), "classify"
    if family == "roberta":
        return tf.RobertaConfig(**small), "classify"
    t5 = dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=100)
    if family == "t5":
        return tf.T5Config(**t5), "seq2seq"
    if family == "t5-gated":
        return tf.T5Config(**t5, feed_forward_proj="gated-gelu"), "seq2seq"
    if family == "bart":
        return tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100), "seq2seq"
    raise AssertionError(family)


# family -> (stack prefixes, {role: (path in block, in, out)}) for decoder-only / encoder-only models.
LLAMA_LIKE = {
    "attn.q": ("self_attn.q_proj", 32, 32), "attn.k": ("self_attn.k_proj", 32, 16),
    "attn.v": ("self_attn.v_proj", 32, 16), "attn.o": ("self_attn.o_proj", 32, 32),
    "mlp.gate": ("mlp.gate_proj", 32, 64), "mlp.up": ("mlp.up_proj", 32, 64), "mlp.down": ("mlp.down_proj", 64, 32),
}
SINGLE_STACK = {
    "gpt2": ("transformer.h", {
        "attn.qkv": ("attn.c_attn", 32, 96), "attn.o": ("attn.c_proj", 32, 32),
        "mlp.up": ("mlp.c_fc", 32, 128), "mlp.down": ("mlp.c_proj", 128, 32)}),
    "gptj": ("transformer.h", {
        "attn.q": ("attn.q_proj", 32, 32), "attn.k": ("attn.k_proj", 32, 32), "attn.v": ("attn.v_proj", 32, 32),
        "attn.o": ("attn.out_proj", 32, 32), "mlp.up": ("mlp.fc_in", 32, 128), "mlp.down": ("mlp.fc_out", 128, 32)}),
    "gpt_neox": ("gpt_neox.layers", {
        "attn.qkv": ("attention.query_key_value", 32, 96), "attn.o": ("attention.dense", 32, 32),
        "mlp.up": ("mlp.dense_h_to_4h", 32, 64), "mlp.down": ("mlp.dense_4h_to_h", 64, 32)}),
    "opt": ("model.decoder.layers", {
        "attn.q": ("self_attn.q_proj", 32, 32), "attn.k": ("self_attn.k_proj", 32, 32),
        "attn.v": ("self_attn.v_proj", 32, 32), "attn.o": ("self_attn.out_proj", 32, 32),
        "mlp.up": ("fc1", 32, 64), "mlp.down": ("fc2", 64, 32)}),
    "bloom": ("transformer.h", {
        "attn.qkv": ("self_attention.query_key_value", 32, 96), "attn.o": ("self_attention.dense", 32, 32),
        "mlp.up": ("mlp.dense_h_to_4h", 32, 128), "mlp.down": ("mlp.dense_4h_to_h", 128, 32)}),
    # Falcon's default multi-query attention: q for 2 heads + one shared k and v = 4 * 16 = 64.
    "falcon": ("transformer.h", {
        "attn.qkv": ("self_attention.query_key_value", 32, 64), "attn.o": ("self_attention.dense", 32, 32),
        "mlp.up": ("mlp.dense_h_to_4h", 32, 128), "mlp.down": ("mlp.dense_4h_to_h", 128, 32)}),
    "llama": ("model.layers", LLAMA_LIKE),
    "mistral": ("model.layers", LLAMA_LIKE),
    "qwen2": ("model.layers", LLAMA_LIKE),
    "gemma": ("model.layers", LLAMA_LIKE),
    "gemma2": ("model.layers", LLAMA_LIKE),
    "qwen3": ("model.layers", LLAMA_LIKE),
    "olmo": ("model.layers", LLAMA_LIKE),
    "olmo2": ("model.layers", LLAMA_LIKE),
    "phi3": ("model.layers", {
        "attn.qkv": ("self_attn.qkv_proj", 32, 96), "attn.o": ("self_attn.o_proj", 32, 32),
        "mlp.gate_up": ("mlp.gate_up_proj", 32, 128), "mlp.down": ("mlp.down_proj", 64, 32)}),
    "bert": ("bert.encoder.layer", {
        "attn.q": ("attention.self.query", 32, 32), "attn.k": ("attention.self.key", 32, 32),
        "attn.v": ("attention.self.value", 32, 32), "attn.o": ("attention.output.dense", 32, 32),
        "mlp.up": ("intermediate.dense", 32, 64), "mlp.down": ("output.dense", 64, 32)}),
    "roberta": ("roberta.encoder.layer", {
        "attn.q": ("attention.self.query", 32, 32), "attn.k": ("attention.self.key", 32, 32),
        "attn.v": ("attention.self.value", 32, 32), "attn.o": ("attention.output.dense", 32, 32),
        "mlp.up": ("intermediate.dense", 32, 64), "mlp.down": ("output.dense", 64, 32)}),
}


def _names(stack: str, roles: dict, pick) -> set[str]:
    return {f"{stack}.{i}.{path}" for i in range(2) for role, (path, _, _) in roles.items() if pick(role)}


@pytest.mark.parametrize("family", sorted(SINGLE_STACK))
def test_full_attention_ffn_on_every_single_stack_family(family):
    model = build(family)
    stack, roles = SINGLE_STACK[family]
    r = 4
    for strategy, pick in (("full", lambda role: True), ("attention", lambda role: role.startswith("attn.")),
                           ("ffn", lambda role: role.startswith("mlp."))):
        p = resolve_placement(model, parse_strategy(strategy), r, 8)
        assert set(p.module_names) == _names(stack, roles, pick), (family, strategy)
        assert p.lora_params == 2 * r * sum(i + o for role, (_, i, o) in roles.items() if pick(role))
        assert {m.name: m.role for m in p.modules} == {
            f"{stack}.{i}.{path}": role for i in range(2) for role, (path, _, _) in roles.items() if pick(role)}
        assert p.stacks == {stack: 2}
    # The head (classifier, lm_head) and the pooler are never part of a group.
    full = resolve_placement(model, parse_strategy("full"), r, 8)
    assert not any(n.startswith(("lm_head", "classifier", "bert.pooler")) for n in full.module_names)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "gptj", "opt", "bert", "roberta"])
def test_qv_as_in_the_lora_paper(family):
    stack, roles = SINGLE_STACK[family]
    p = resolve_placement(build(family), parse_strategy("qv"), 2, 4)
    assert set(p.module_names) == _names(stack, roles, lambda role: role in ("attn.q", "attn.v"))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "bloom", "falcon", "phi3"])
def test_fused_qkv_families_have_no_separate_q_and_v(family):
    with pytest.raises(LoraplaceError, match=r"strategy 'qv' matches no module .*pick roles it has: attn.qkv"):
        resolve_placement(build(family), parse_strategy("qv"), 2, 4)


def test_phi3_fused_gate_up_counts_twice_the_intermediate():
    p = resolve_placement(build("phi3"), parse_strategy("mlp.gate_up"), 2, 4)
    assert [(m.name, m.in_features, m.out_features) for m in p.modules] == [
        ("model.layers.0.mlp.gate_up_proj", 32, 128), ("model.layers.1.mlp.gate_up_proj", 32, 128)]
    assert p.lora_params == 2 * 2 * (32 + 128)


def test_mixtral_experts_are_ffn_parameters():
    model = build("mixtral")
    ffn = resolve_placement(model, parse_strategy("ffn"), 2, 4)
    assert [(m.name, m.role, m.num_experts, m.in_features, m.out_features, m.is_parameter) for m in ffn.modules] == [
        ("model.layers.0.mlp.experts.gate_up_proj", "mlp.gate_up", 4, 32, 128, True),
        ("model.layers.0.mlp.experts.down_proj", "mlp.down", 4, 64, 32, True),
        ("model.layers.1.mlp.experts.gate_up_proj", "mlp.gate_up", 4, 32, 128, True),
        ("model.layers.1.mlp.experts.down_proj", "mlp.down", 4, 64, 32, True),
    ]
    # PEFT gives each expert its own rank-r pair: experts * r * (in + out).
    assert ffn.lora_params == 2 * 4 * 2 * ((32 + 128) + (64 + 32))
    assert ffn.module_names == [] and len(ffn.parameter_names) == 4
    assert {m.role for m in resolve_placement(model, parse_strategy("full"), 2, 4).modules} == {
        "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate_up", "mlp.down"}


def _routers(model) -> list[str]:
    """The MoE routers, found by what they compute: the block module holding a (num_local_experts,
    hidden_size) weight (one logit per expert), whatever it is called or whatever its class."""
    config = model.config
    return [name for name, module in model.named_modules() if BLOCK_NAME.match(name) and any(
        tuple(p.shape) == (config.num_local_experts, config.hidden_size) for p in module.parameters(recurse=False))]


def test_the_mixtral_router_exists_and_no_strategy_adapts_it():
    model = build("mixtral")
    routers = _routers(model)
    # transformers 5 names it mlp.gate (MixtralTopKRouter); 4.x had block_sparse_moe.gate (nn.Linear).
    assert routers == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    table = roles_for(model.config.model_type)
    assert {BLOCK_NAME.match(n)["rel"] for n in routers} <= set(table.never)
    for spec in ("full", "ffn", "mlp.*", "attention+ffn", "full+embed+lm_head"):
        names = [m.name for m in resolve_placement(model, parse_strategy(spec), 2, 4).modules]
        assert not [n for n in names for router in routers if n == router or n.startswith(router + ".")], spec


def test_the_mixtral_router_stays_frozen_and_unwrapped_under_peft():
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from loraplace.adapters import lora_config_for
    from loraplace.config import LoraSettings

    torch.manual_seed(0)
    model = build("mixtral", device="cpu")
    routers = _routers(model)
    router_class = type(model.get_submodule(routers[0]))
    placement = resolve_placement(model, parse_strategy("full"), 2, 4)
    peft_model = get_peft_model(model, lora_config_for(placement, LoraSettings(r=2, alpha=4, dropout=0.0), "CAUSAL_LM"))
    base = peft_model.get_base_model()
    for name in routers:
        router = base.get_submodule(name)
        assert type(router) is router_class and not isinstance(router, LoraLayer), name
        assert not any(isinstance(m, LoraLayer) for m in router.modules()), name
        assert not any(p.requires_grad for p in router.parameters()), name


def _with_linear_routers(model):
    """The tiny Mixtral with each router replaced by an ``nn.Linear(hidden, experts)``, as some MoE
    models (and transformers 4.x Mixtral) keep it."""
    config = model.config
    for name in _routers(model):
        parent, _, leaf = name.rpartition(".")
        with torch.device("meta"):
            model.get_submodule(parent).add_module(
                leaf, nn.Linear(config.hidden_size, config.num_local_experts, bias=False))
    return model


def test_a_router_that_is_a_linear_module_is_never_adapted(monkeypatch):
    import loraplace.placement.resolve as resolve

    model = _with_linear_routers(build("mixtral"))
    routers = _routers(model)
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in routers) and len(routers) == 2
    # The real table: no strategy picks the linear router.
    for spec in ("full", "ffn", "mlp.*"):
        assert not set(routers) & set(resolve_placement(model, parse_strategy(spec), 2, 4).module_names), spec
    # A table whose role paths claim the router as mlp.gate: `never` still wins ...
    table = roles_for("mixtral")
    router_paths = tuple(sorted({BLOCK_NAME.match(n)["rel"] for n in routers}))
    claims = dataclasses.replace(table, roles={**table.roles, "mlp.gate": router_paths})
    monkeypatch.setattr(resolve, "roles_for", lambda model_type: claims)
    adapted = resolve_placement(model, parse_strategy("ffn"), 2, 4)
    assert not set(routers) & set(adapted.module_names)
    assert "mlp.gate" not in {m.role for m in adapted.modules}
    # ... while without `never` the same table would adapt it: the check above can fail.
    monkeypatch.setattr(resolve, "roles_for", lambda model_type: dataclasses.replace(claims, never=()))
    unguarded = resolve_placement(model, parse_strategy("ffn"), 2, 4)
    assert {m.name for m in unguarded.modules if m.role == "mlp.gate"} == set(routers)


T5_SELF = {"attn.q": "SelfAttention.q", "attn.k": "SelfAttention.k", "attn.v": "SelfAttention.v",
           "attn.o": "SelfAttention.o"}
T5_CROSS = {"xattn.q": "EncDecAttention.q", "xattn.k": "EncDecAttention.k", "xattn.v": "EncDecAttention.v",
            "xattn.o": "EncDecAttention.o"}


def test_t5_keeps_self_attention_cross_attention_and_ffn_apart():
    model = build("t5")
    roles = lambda s: {m.name: m.role for m in resolve_placement(model, parse_strategy(s), 2, 4).modules}
    self_attn = {f"{side}.block.{i}.layer.0.{path}": role for side in ("encoder", "decoder") for i in range(2)
                 for role, path in T5_SELF.items()}
    cross = {f"decoder.block.{i}.layer.1.{path}": role for i in range(2) for role, path in T5_CROSS.items()}
    ffn = {f"encoder.block.{i}.layer.1.DenseReluDense.{w}": role for i in range(2)
           for w, role in (("wi", "mlp.up"), ("wo", "mlp.down"))}
    ffn |= {f"decoder.block.{i}.layer.2.DenseReluDense.{w}": role for i in range(2)
            for w, role in (("wi", "mlp.up"), ("wo", "mlp.down"))}
    assert roles("self-attention") == self_attn
    assert roles("cross-attention") == cross
    assert roles("ffn") == ffn
    assert roles("attention") == self_attn | cross
    assert roles("full") == self_attn | cross | ffn
    p = resolve_placement(model, parse_strategy("full"), 2, 4)
    assert p.stacks == {"encoder.block": 2, "decoder.block": 2}
    assert p.lora_params == 2 * (16 * (32 + 32) + 8 * (32 + 32) + 8 * (32 + 64))
    assert "lm_head" not in p.module_names


def test_t5_gated_ffn_has_gate_up_down():
    p = resolve_placement(build("t5-gated"), parse_strategy("ffn@0"), 2, 4)
    assert {m.name: m.role for m in p.modules} == {
        "encoder.block.0.layer.1.DenseReluDense.wi_0": "mlp.gate", "encoder.block.0.layer.1.DenseReluDense.wi_1": "mlp.up",
        "encoder.block.0.layer.1.DenseReluDense.wo": "mlp.down", "decoder.block.0.layer.2.DenseReluDense.wi_0": "mlp.gate",
        "decoder.block.0.layer.2.DenseReluDense.wi_1": "mlp.up", "decoder.block.0.layer.2.DenseReluDense.wo": "mlp.down"}


def test_bart_roles_per_stack():
    model = build("bart")
    p = resolve_placement(model, parse_strategy("full"), 2, 4)
    by_role: dict[str, set[str]] = {}
    for m in p.modules:
        by_role.setdefault(m.role, set()).add(m.name)
    assert by_role["xattn.q"] == {f"model.decoder.layers.{i}.encoder_attn.q_proj" for i in range(2)}
    assert by_role["attn.o"] == {f"model.{s}.layers.{i}.self_attn.out_proj" for s in ("encoder", "decoder")
                                 for i in range(2)}
    assert by_role["mlp.up"] == {f"model.{s}.layers.{i}.fc1" for s in ("encoder", "decoder") for i in range(2)}
    assert by_role["mlp.down"] == {f"model.{s}.layers.{i}.fc2" for s in ("encoder", "decoder") for i in range(2)}
    assert len(p.modules) == 4 * 6 + 2 * 4
    assert p.stacks == {"model.encoder.layers": 2, "model.decoder.layers": 2}


def test_embed_and_lm_head_are_opt_in():
    model = build("llama")
    full = resolve_placement(model, parse_strategy("full"), 2, 4)
    assert "model.embed_tokens" not in full.module_names and "lm_head" not in full.module_names
    p = resolve_placement(model, parse_strategy("embed+lm_head"), 2, 4)
    assert [(m.name, m.role, m.layer, m.in_features, m.out_features) for m in p.modules] == [
        ("model.embed_tokens", "embed", None, 100, 32), ("lm_head", "lm_head", None, 32, 100)]
    assert p.lora_params == 2 * (100 + 32) * 2


def _parametrized(test, argname: str = "family") -> list:
    """The values a test is parametrized with (read from its pytest mark, so this follows the decorator)."""
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == argname:
            return list(mark.args[1])
    raise AssertionError(f"{test.__name__} is not parametrized over {argname!r}")


def test_every_table_family_and_model_type_is_tested():
    types = known_model_types()
    assert len(types) == len(set(types)), "a model_type appears in two role tables"
    # Exact names and counts: the parametrized test, plus families with a test of their own.
    own_test = {"mixtral": test_mixtral_experts_are_ffn_parameters,
                "t5": test_t5_keeps_self_attention_cross_attention_and_ffn_apart, "bart": test_bart_roles_per_stack}
    exact = _parametrized(test_full_attention_ffn_on_every_single_stack_family) + sorted(own_test)
    peft = _parametrized(test_peft_wraps_exactly_the_full_plan_on_real_weights)
    every_family = {table.family for table in FAMILIES}
    for names in (exact, peft):
        model_types = {config_of(name)[0].model_type for name in names}
        assert {roles_for(t).family for t in model_types} == every_family
        assert model_types == set(types), sorted(set(types) - model_types)
    # Each builds a model whose placement resolves with its written table (not inferred).
    for name in sorted(set(exact) | set(peft)):
        model = build(name)
        placement = resolve_placement(model, parse_strategy("full"), 2, 4)
        assert placement.family == roles_for(model.config.model_type).family, name
        assert placement.modules and not placement.warnings, name


# attention at r=2 and ffn at r=3 (a term's rank wins over the default 3), counted by hand:
# LoRA adds r * (in + out) per module and, for MoE experts, per expert.
def _expected_trainable(family: str) -> int:
    if family in SINGLE_STACK:
        _, roles = SINGLE_STACK[family]
        per_block = sum((2 if role.startswith("attn.") else 3) * (i + o) for role, (_, i, o) in roles.items())
        return 2 * per_block
    if family == "mixtral":  # q, k, v, o 32 -> 32 (2 KV heads of 16); 4 experts of gate_up 32 -> 128, down 64 -> 32
        return 2 * (2 * 4 * (32 + 32) + 3 * 4 * ((32 + 128) + (64 + 32)))
    if family in ("t5", "bart"):  # 16 self- and 8 cross-attention 32 -> 32 modules; 8 FFN modules 32 <-> 64
        return 2 * 16 * (32 + 32) + 2 * 8 * (32 + 32) + 3 * 8 * (32 + 64)
    raise AssertionError(family)


@pytest.mark.parametrize("family", sorted(SINGLE_STACK) + ["mixtral", "t5", "bart"])
def test_peft_wraps_exactly_the_full_plan_on_real_weights(family):
    from peft import get_peft_model

    from loraplace.adapters import check_wrapped, lora_config_for, wrapped_adapters
    from loraplace.config import LoraSettings
    from loraplace.placement.params import trainable_params

    torch.manual_seed(0)
    model = build(family, device="cpu")
    placement = resolve_placement(model, parse_strategy("attention[r=2]+ffn"), 3, 6)
    task = "SEQ_2_SEQ_LM" if family in ("t5", "bart") else None if family in ("bert", "roberta") else "CAUSAL_LM"
    peft_model = get_peft_model(model, lora_config_for(placement, LoraSettings(r=3, alpha=6, dropout=0.0), task))
    check_wrapped(peft_model, placement, trainable_params(peft_model))
    assert wrapped_adapters(peft_model) == {m.name: (m.r, m.alpha) for m in placement.modules}
    # Counted from the LoRA tensors PEFT created, against the hand count.
    lora_tensors = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert all(p.requires_grad for p in lora_tensors.values())
    assert sum(p.numel() for p in lora_tensors.values()) == trainable_params(peft_model) == _expected_trainable(family)
