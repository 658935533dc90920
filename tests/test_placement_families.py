"""Role tables on every supported family: tiny random-init models built from transformers config
classes on the meta device (no downloads, no weights), exact module names and exact counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplace.errors import LoraplaceError
from loraplace.placement import parse_strategy, resolve_placement
from loraplace.placement.roles import FAMILIES, known_model_types, roles_for


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


def test_mixtral_experts_are_ffn_and_the_router_is_never_adapted():
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
    full = resolve_placement(model, parse_strategy("full"), 2, 4)
    everything = {m.name for m in full.modules}
    assert not any(".mlp.gate" in n and "experts" not in n for n in everything)
    assert {m.role for m in full.modules} == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate_up", "mlp.down"}
    assert "mlp.gate" in roles_for("mixtral").never


def test_router_listed_as_linear_is_still_never_adapted():
    # Some MoE models keep the router as an nn.Linear called mlp.gate; the table's `never` wins
    # even if a role path says otherwise.
    table = roles_for("mixtral")
    assert table.role_of("mlp.gate") is None


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


def test_every_table_family_is_tested_and_model_types_are_unique():
    types = known_model_types()
    assert len(types) == len(set(types))
    assert {f.family for f in FAMILIES} == {"gpt2", "gptj", "gpt_neox", "bloom", "falcon", "opt", "llama", "phi3",
                                            "mixtral", "bert", "t5", "bart"}


@pytest.mark.parametrize("family", sorted(SINGLE_STACK) + ["mixtral", "t5", "bart"])
def test_peft_wraps_exactly_the_full_plan_on_real_weights(family):
    from peft import get_peft_model

    from loraplace.config import LoraSettings
    from loraplace.placement import trainable_params
    from loraplace.study.runs import check_wrapped, lora_config_for, wrapped_adapters

    torch.manual_seed(0)
    model = build(family, device="cpu")
    placement = resolve_placement(model, parse_strategy("attention[r=2]+ffn"), 3, 6)
    task = "SEQ_2_SEQ_LM" if family in ("t5", "bart") else None if family in ("bert", "roberta") else "CAUSAL_LM"
    peft_model = get_peft_model(model, lora_config_for(placement, LoraSettings(r=3, alpha=6, dropout=0.0), task))
    check_wrapped(peft_model, placement, trainable_params(peft_model))
    assert wrapped_adapters(peft_model) == {m.name: (m.r, m.alpha) for m in placement.modules}
