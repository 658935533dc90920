"""After PEFT wraps a real (tiny, random-init) model, the wrapped modules, their ranks and alphas,
and the trainable count equal the plan; mismatches fail loudly."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from loraplace.adapters import check_wrapped, lora_config_for, wrapped_adapters
from loraplace.config import LoraSettings
from loraplace.errors import LoraplaceError
from loraplace.methods.base import resolve_arm
from loraplace.placement.arms import Arm
from loraplace.placement.params import trainable_params
from loraplace.placement.resolve import AdaptedModule, Placement, resolve_placement
from loraplace.placement.strategies import parse_strategy

NO_DROPOUT = LoraSettings(r=4, alpha=8, dropout=0.0)


def wrap(model, placement, lora=NO_DROPOUT, task_type="CAUSAL_LM"):
    peft_model = get_peft_model(model, lora_config_for(placement, lora, task_type=task_type))
    check_wrapped(peft_model, placement, trainable_params(peft_model))
    return peft_model


def tiny_llama(tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                                        tie_word_embeddings=tie))


def test_per_term_ranks_and_alphas_reach_peft():
    model = tiny_llama()
    placement = resolve_placement(model, parse_strategy("ffn[r=8]+attention[r=2,alpha=3]"), 4, 8)
    peft_model = wrap(model, placement)
    wrapped = wrapped_adapters(peft_model)
    assert wrapped == {m.name: (m.r, m.alpha) for m in placement.modules}
    assert wrapped["model.layers.1.mlp.down_proj"] == (8, 8) and wrapped["model.layers.0.self_attn.q_proj"] == (2, 3)
    assert trainable_params(peft_model) == placement.lora_params == 2 * (8 * 3 * 48 + 2 * (32 * 2 + 24 * 2))


def lora_ranks(peft_model) -> dict[str, int]:
    """Rank of every LoRA pair as PEFT built it: the rows of its A matrix."""
    return {name: module.lora_A["default"].weight.shape[0] for name, module in peft_model.get_base_model().named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def lora_tensor_count(peft_model) -> int:
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n and p.requires_grad)


def test_budget_matched_mixed_ranks_reach_peft():
    model = tiny_llama()
    placement = resolve_arm(model, Arm("ffn", "full"), 4, 8)
    peft_model = wrap(model, placement)
    # Hidden 16, intermediate 32, one KV head of 8: full at r=4 is 2 layers * 4 * (q 32 + k 24 + v 24 + o 32 +
    # gate 48 + up 48 + down 48) = 2,048. The ffn's six modules have 48 per rank: rank 7 gives 2,016, and
    # one module at rank 8 gives 2,064, the closest reachable count (16 over instead of 32 under).
    assert 2 * 4 * (32 + 24 + 24 + 32 + 3 * 48) == 2048
    assert lora_tensor_count(peft_model) == trainable_params(peft_model) == 5 * 7 * 48 + 8 * 48 == 2064
    assert sorted(lora_ranks(peft_model).values()) == [7, 7, 7, 7, 7, 8]
    assert placement.budget["method"] == "uniform+1" and placement.budget["target"] == 2048


def test_gpt2_conv1d_with_mixed_ranks():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=32))
    placement = resolve_placement(model, parse_strategy("attention[r=2]+ffn@1[r=6]"), 4, 8)
    peft_model = wrap(model, placement)
    assert wrapped_adapters(peft_model)["transformer.h.1.mlp.c_proj"] == (6, 8)
    assert "transformer.h.0.mlp.c_proj" not in wrapped_adapters(peft_model)
    # attn.c_proj (16 -> 16) is adapted in both layers at r=2 although mlp.c_proj shares its last name.
    assert lora_ranks(peft_model) == {
        "transformer.h.0.attn.c_attn": 2, "transformer.h.0.attn.c_proj": 2, "transformer.h.1.attn.c_attn": 2,
        "transformer.h.1.attn.c_proj": 2, "transformer.h.1.mlp.c_fc": 6, "transformer.h.1.mlp.c_proj": 6}
    # c_attn 16 -> 48, attn.c_proj 16 -> 16 at r=2 in 2 layers; c_fc 16 -> 64 and mlp.c_proj 64 -> 16 at r=6 in 1.
    assert lora_tensor_count(peft_model) == 2 * 2 * ((16 + 48) + (16 + 16)) + 6 * ((16 + 64) + (64 + 16))


def test_rank_pattern_keys_match_one_exact_name_only():
    # "proj" is a suffix of "block.proj": PEFT's pattern rule ((.*\.)?KEY$) would give both the
    # rank of "proj" if the key were the bare name.
    model = nn.Module()
    model.proj = nn.Linear(4, 4)
    model.block = nn.Module()
    model.block.proj = nn.Linear(4, 4)
    model.block.other = nn.Linear(4, 4)
    mods = [AdaptedModule("proj", "?", None, 4, 4, 2, 8), AdaptedModule("block.proj", "?", None, 4, 4, 4, 8),
            AdaptedModule("block.other", "?", None, 4, 4, 4, 8)]
    placement = Placement("custom", "custom", mods, 0)
    # A plain nn.Module has no task: task_type=None is what PEFT takes for it.
    config = lora_config_for(placement, NO_DROPOUT, task_type=None)
    assert config.rank_pattern == {"^proj": 2} and config.r == 4
    # PEFT's own matching rule (the one it applies to rank_pattern keys) on both names.
    from peft.utils.other import get_pattern_key

    assert get_pattern_key(config.rank_pattern.keys(), "proj") == "^proj"
    assert get_pattern_key(config.rank_pattern.keys(), "block.proj") == "block.proj"  # no key: default rank
    peft_model = get_peft_model(model, config)
    check_wrapped(peft_model, placement, trainable_params(peft_model))
    # The ranks PEFT built, read from the A matrices, and the count by hand: r * (4 + 4) each.
    assert lora_ranks(peft_model) == {"proj": 2, "block.proj": 4, "block.other": 4}
    assert lora_tensor_count(peft_model) == 2 * 8 + 4 * 8 + 4 * 8


def test_wrapped_set_and_rank_mismatches_fail_loudly():
    model = tiny_llama()
    placement = resolve_placement(model, parse_strategy("qv"), 4, 8)
    other = resolve_placement(model, parse_strategy("attention"), 4, 8)
    higher = resolve_placement(model, parse_strategy("qv[r=5]"), 4, 8)
    peft_model = get_peft_model(model, lora_config_for(placement, NO_DROPOUT))
    with pytest.raises(LoraplaceError, match=r"PEFT wrapped a different module set than planned for 'attention': "
                                             r"unexpected \[\], missing \['model.layers.0.self_attn.k_proj', "
                                             r"'model.layers.0.self_attn.o_proj'"):
        check_wrapped(peft_model, other, trainable_params(peft_model))
    with pytest.raises(LoraplaceError, match=r"other ranks/alphas than planned for 'qv\[r=5\]': "
                                             r"model.layers.0.self_attn.q_proj: r=4 alpha=8, planned r=5 alpha=8"):
        check_wrapped(peft_model, higher, trainable_params(peft_model))
    with pytest.raises(LoraplaceError, match=r"trainable parameters 1 differ from the plan's"):
        check_wrapped(peft_model, placement, 1)


def test_mixtral_experts_wrap_train_and_refuse_dropout():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                                             num_local_experts=3, num_experts_per_tok=2))
    placement = resolve_placement(model, parse_strategy("mlp.down[r=2]+mlp.gate_up+attn-o"), 4, 8)
    with pytest.raises(LoraplaceError, match=r"adapts mixture-of-experts parameters.*set lora.dropout=0 \(got 0.1\)"):
        lora_config_for(placement, LoraSettings(r=4, alpha=8, dropout=0.1))
    peft_model = wrap(model, placement)
    wrapped = wrapped_adapters(peft_model)
    assert wrapped["model.layers.0.mlp.experts.down_proj"] == (2, 8)
    assert wrapped["model.layers.1.mlp.experts.gate_up_proj"] == (4, 8)
    assert trainable_params(peft_model) == placement.lora_params == 2 * (
        3 * 2 * (24 + 16) + 3 * 4 * (16 + 48) + 4 * (16 + 16))
    # The router (model.layers.N.mlp.gate, one logit per expert) stays as it was: frozen, not LoRA.
    from peft.tuners.lora import LoraLayer

    for layer in peft_model.get_base_model().model.layers:
        assert type(layer.mlp.gate).__name__ == "MixtralTopKRouter" and layer.mlp.gate.weight.shape == (3, 16)
        assert not isinstance(layer.mlp.gate, LoraLayer) and not layer.mlp.gate.weight.requires_grad
    out = peft_model(input_ids=torch.randint(0, 40, (2, 6)), labels=torch.randint(0, 40, (2, 6)))
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_embed_and_lm_head_wrap():
    model = tiny_llama(tie=False)
    placement = resolve_placement(model, parse_strategy("embed+lm_head[r=2]"), 4, 8)
    peft_model = wrap(model, placement)
    assert wrapped_adapters(peft_model) == {"model.embed_tokens": (4, 8), "lm_head": (2, 8)}
    assert trainable_params(peft_model) == 4 * (40 + 16) + 2 * (16 + 40)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_wraps_self_cross_and_ffn(family):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    if family == "t5":
        model = T5ForConditionalGeneration(T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                                    vocab_size=40))
    else:
        model = BartForConditionalGeneration(BartConfig(d_model=16, encoder_layers=2, decoder_layers=2,
                                                        encoder_attention_heads=2, decoder_attention_heads=2,
                                                        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=40))
    placement = resolve_placement(model, parse_strategy("self-attention[r=2]+cross-attention[r=3]+ffn"), 4, 8)
    peft_model = wrap(model, placement, task_type="SEQ_2_SEQ_LM")
    # Both: 16 self-attention modules 16 -> 16 (encoder and decoder, 2 blocks, q k v o) at r=2, 8
    # cross-attention modules 16 -> 16 at r=3, 8 FFN modules 16 <-> 32 at r=4.
    expected = 16 * 2 * (16 + 16) + 8 * 3 * (16 + 16) + 8 * 4 * (16 + 32)
    assert lora_tensor_count(peft_model) == trainable_params(peft_model) == expected
    assert sorted(set(lora_ranks(peft_model).values())) == [2, 3, 4] and len(lora_ranks(peft_model)) == 32


def test_bert_classifier_head_trains_in_full_beside_the_adapters():
    """With the task type the study uses for classifiers (SEQ_CLS), PEFT trains the new head in full
    (modules_to_save) and puts no LoRA layer on it; the adapters alone match the plan."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import BertConfig, BertForSequenceClassification

    from loraplace.run.tasks import get_task

    config = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        vocab_size=40, num_labels=3)
    model = BertForSequenceClassification(config)
    placement = resolve_placement(model, parse_strategy("full"), 4, 8)
    task_type = get_task("classification").peft_task_type
    assert task_type == "SEQ_CLS"
    peft_model = get_peft_model(model, lora_config_for(placement, NO_DROPOUT, task_type=task_type))
    head_module = peft_model.get_base_model().classifier
    assert isinstance(head_module, ModulesToSaveWrapper)
    assert not any(isinstance(m, LoraLayer) for m in head_module.modules())
    assert not any(n.startswith(("classifier", "bert.pooler")) for n in wrapped_adapters(peft_model))
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    head = {n: c for n, c in trainable.items() if "lora_" not in n}
    assert head == {"base_model.model.classifier.modules_to_save.default.weight": config.hidden_size * config.num_labels,
                    "base_model.model.classifier.modules_to_save.default.bias": config.num_labels}
    # The adapters: 2 layers * r=4 * (q, k, v, o 16 + 16 each; intermediate 16 + 32; output 32 + 16).
    lora = 2 * 4 * (4 * (16 + 16) + 2 * (16 + 32))
    assert sum(trainable.values()) - sum(head.values()) == lora
    assert trainable_params(peft_model) == lora + 16 * 3 + 3
    check_wrapped(peft_model, placement, trainable_params(peft_model) - sum(head.values()))
    # The head that trains is a copy; the original stays frozen beside it.
    assert not any(p.requires_grad for p in head_module.original_module.parameters())


def test_fused_experts_train_at_their_planned_ranks_in_a_study(tmp_path, alpaca_file):
    """A Mixtral whose experts are fused 3-D parameters (transformers 5), in a real study with the
    experts at another rank than the rest: PEFT's warning that the experts' rank_pattern keys
    "did not match any targeted module and were ignored" is wrong (it checks the keys against
    target_modules only); every expert parameter trains at its planned rank, and the run's
    trainable count is the plan's, computed here by hand from the config."""
    import json

    from conftest import make_tokenizer
    from transformers import MixtralConfig, MixtralForCausalLM

    from loraplace.config import load_study
    from loraplace.study.driver import run_study

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    hidden, inter, experts, layers = 16, 24, 3, 2
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer),
                           num_local_experts=experts, num_experts_per_tok=2, pad_token_id=tokenizer.pad_token_id,
                           max_position_embeddings=256)
    model_dir = tmp_path / "mixtral"
    MixtralForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    study = load_study(None, {"model": str(model_dir), "dataset": str(alpaca_file), "output": str(tmp_path / "s"),
                              "strategies": ["mlp.down[r=2]+mlp.gate_up+attention"], "include_base": False,
                              "lora.r": 4, "lora.alpha": 8.0, "lora.dropout": 0.0, "train.max_steps": 2,
                              "train.batch_size": 4, "data.eval_size": 8, "train.eval_every": 0,
                              "train.precision": "fp32", "device": "cpu"})
    out = run_study(study)
    row = json.loads((out / "results.json").read_text())["runs"][0]
    assert row["status"] == "ok", row["error"]
    kv = hidden // 2  # one key/value head of head_dim 8
    by_hand = layers * (experts * 2 * (inter + hidden)  # down_proj: (E, hidden, inter) at r=2
                        + experts * 4 * (hidden + 2 * inter)  # gate_up_proj: (E, 2 * inter, hidden) at r=4
                        + 4 * ((hidden + hidden) * 2 + (hidden + kv) * 2))  # q, o and k, v at r=4
    assert row["trainable_params"] == by_hand
    modules = json.loads((out / "runs" / row["run_id"] / "modules.json").read_text())["modules"]
    ranks = {m["name"]: m["r"] for m in modules}
    assert ranks["model.layers.0.mlp.experts.down_proj"] == 2 and ranks["model.layers.1.mlp.experts.gate_up_proj"] == 4
