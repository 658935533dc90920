"""Initialisation as an axis of the strategy language (``init=``): the grammar, PEFT's own
initialisers reaching the adapters through loraplace's path, the checks that refuse what PEFT would
not apply as named, and the shared base model given back bit for bit after an init (PiSSA, OLoRA)
that rewrites its weights."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, set_seed

from loraplace.adapters import adapter_update_norms, check_init, initial_adapters, save_base_weights, unload_adapters
from loraplace.config import DataSettings, LoraSettings, TrainSettings
from loraplace.errors import LoraplaceError
from loraplace.methods import method_of
from loraplace.placement.arms import parse_arm
from loraplace.placement.params import trainable_params
from loraplace.placement.resolve import resolve_placement
from loraplace.placement.strategies import INIT_TITLES, parse_strategy
from loraplace.records import RunSpec
from loraplace.run.context import RunContext
from loraplace.study.runs import execute_run

INITS = ["gaussian", "pissa", "olora", "orthogonal"]
CPU = torch.device("cpu")


def _one_line(spec: str) -> str:
    with pytest.raises(LoraplaceError) as info:
        parse_strategy(spec)
    text = str(info.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------------------------- 1. grammar
def test_init_round_trips_and_is_the_whole_arms():
    for spec, init in [("full[init=pissa]", "pissa"), ("ffn@last:1[r=8,init=olora]", "olora"),
                       ("ffn[init=orthogonal]+attention[r=2]", "orthogonal"),
                       ("ffn+attention[alpha=4,init=gaussian]", "gaussian"),
                       ("ffn[init=pissa]+attention[init=pissa]", "pissa"),
                       ("full[init=default]", None), ("full", None), ("eva", None),
                       ("auto[score=weight,init=pissa]", "pissa"), ("auto", None)]:
        strategy = parse_strategy(spec)
        assert strategy.init == init, spec
        assert strategy.name == spec and parse_strategy(strategy.name) == strategy  # the label parses back
    term = parse_strategy("ffn@last:1[r=8,init=olora]").terms[0]
    assert (term.r, term.init, term.layers.text) == (8, "olora", "last:1")
    assert parse_strategy("auto[init=olora,mode=worst]").auto.init == "olora"
    assert "PiSSA" in parse_strategy("ffn[init=pissa]+attention").description
    # a hand-picked placement with another init is still hand-picked, trained by the LoRA method
    assert parse_strategy("full[init=pissa]").hand_picked and method_of("full[init=pissa]").name == "lora"
    assert method_of("auto[init=pissa]").name == "auto"
    arm = parse_arm("full[init=pissa] ~ attention")
    assert (arm.strategy, arm.reference, arm.label) == ("full[init=pissa]", "attention", "full[init=pissa]~attention")


def test_bad_inits_fail_with_one_line():
    for spec in ("full[init=loftq]", "full[init=]", "auto[init=mica]"):
        text = _one_line(spec)
        assert "unknown initialisation" in text and "init=" + "|".join(INIT_TITLES) in text, text
    text = _one_line("ffn[init=pissa]+attention[init=olora]")
    assert "different initialisations (pissa, olora)" in text
    assert "different" in _one_line("ffn[init=default]+attention[init=pissa]")
    assert "EVA initialises its adapters itself" in _one_line("eva[init=pissa]")
    assert "AdaLoRA initialises its adapters itself" in _one_line("adalora[init=gaussian]")
    assert "cannot be combined" in _one_line("eva@last:2")  # unchanged for other options


# ------------------------------------------------------------------- 2. PEFT's initialisers apply
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                                        tie_word_embeddings=True))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32))


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _spec(strategy: str, **fields) -> RunSpec:
    return RunSpec(run_id="x", strategy=strategy, model="m", dataset="d", run_dir="unused",
                   lora=LoraSettings(r=4, alpha=8, dropout=0.0), **fields)


def _wrap(model, strategy: str, seed: int = 0, **fields):
    """The model wrapped as a run wraps it: the arm's method's config, its saved base weights."""
    placement, config, _ = method_of(strategy).adapters(model, _spec(strategy, **fields), "CAUSAL_LM")
    saved = save_base_weights(model, placement, config.init_lora_weights)
    set_seed(seed)
    return get_peft_model(model, config), placement, saved


def _reference(model, init, seed: int = 0, targets=LLAMA_TARGETS, rank_pattern=None):
    """PEFT's own initialiser called directly (targets and ranks written out by hand)."""
    set_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                            rank_pattern=rank_pattern or {}, init_lora_weights=init,
                                            task_type="CAUSAL_LM"))


def _state(peft_model, what: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if what in n}


@pytest.mark.parametrize("init", INITS)
def test_each_init_is_what_peft_makes(init):
    model = tiny_llama()
    reference_model, default_model = copy.deepcopy(model), copy.deepcopy(model)
    # mixed ranks: ffn at r=2 (a rank_pattern), attention at the study's r=4
    peft_model, placement, _ = _wrap(model, f"ffn[r=2]+attention[init={init}]")
    reference = _reference(reference_model, init, rank_pattern={"gate_proj": 2, "up_proj": 2, "down_proj": 2})
    default = _reference(default_model, True, rank_pattern={"gate_proj": 2, "up_proj": 2, "down_proj": 2})
    ours, theirs, plain = (_state(m, "lora_") for m in (peft_model, reference, default))
    assert len(ours) == 2 * 2 * len(LLAMA_TARGETS) and list(ours) == list(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert any(not torch.equal(ours[n], plain[n]) for n in ours)  # not the default init
    if init in ("pissa", "olora"):  # B starts non-zero and the base weights hold the residual
        assert all(ours[n].abs().sum() > 0 for n in ours if "lora_B" in n)
        base_ours, base_theirs = _state(peft_model, "base_layer.weight"), _state(reference, "base_layer.weight")
        assert all(torch.equal(base_ours[n], base_theirs[n]) for n in base_ours)
    # the parameter count is the plan's and the default init's
    assert trainable_params(peft_model) == placement.lora_params == trainable_params(default)
    method_of("ffn").check_wrapped(peft_model, placement, trainable_params(peft_model))
    assert peft_model.peft_config["default"].init_lora_weights == init


def test_pissa_on_gpt2_conv1d_and_auto_arms_go_the_same_way():
    model = tiny_gpt2()
    reference_model = copy.deepcopy(model)
    peft_model, _, _ = _wrap(model, "attention[init=pissa]")
    reference = _reference(reference_model, "pissa", targets=["c_attn", "attn.c_proj"])
    ours, theirs = _state(peft_model, "lora_"), _state(reference, "lora_")
    assert list(ours) == list(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)

    # an automatic arm's stored ranks, initialised through the same path (Method.adapters)
    model = tiny_llama()
    reference_model = copy.deepcopy(model)
    names = [m.name for m in resolve_placement(model, parse_strategy("full"), 4, 8).modules]
    ranks = {name: 2 if "mlp" in name else 4 for name in names}
    peft_model, placement, _ = _wrap(model, "auto[init=orthogonal]~attention", ranks=ranks)
    assert {m.name: m.r for m in placement.modules} == ranks
    reference = _reference(reference_model, "orthogonal", rank_pattern={"gate_proj": 2, "up_proj": 2, "down_proj": 2})
    ours, theirs = _state(peft_model, "lora_"), _state(reference, "lora_")
    assert list(ours) == list(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unloading_puts_rewritten_base_weights_back_bit_for_bit(init):
    model = tiny_llama()
    before = {k: _bits(v) for k, v in model.state_dict().items()}
    peft_model, placement, saved = _wrap(model, f"full[init={init}]")
    assert len(saved) == len(placement.module_names)  # the adapted modules' weights only
    wrapped = {k.replace("base_layer.", ""): v for k, v in peft_model.get_base_model().state_dict().items()}
    rewritten = [k for k in before if not torch.equal(_bits(wrapped[k]), before[k])]
    assert sorted(rewritten) == sorted(f"{name}.weight" for name in placement.module_names)  # the init rewrote them
    restored = unload_adapters(peft_model, saved)
    after = restored.state_dict()
    assert list(after) == list(before)
    assert [k for k, v in after.items() if not torch.equal(_bits(v), before[k])] == []
    # inits that keep the base weights save nothing
    assert _wrap(tiny_llama(), "full[init=orthogonal]")[2] == [] and _wrap(tiny_llama(), "full")[2] == []


# --------------------------------------------------------------------------------- 3. refused
def _meta(builder):
    with torch.device("meta"):
        return builder()


def _check_message(model, strategy: str, quantization: str = "none", r: int = 4) -> str:
    placement = resolve_placement(model, parse_strategy(strategy), r, 8)
    with pytest.raises(LoraplaceError) as info:
        check_init(model, placement, parse_strategy(strategy).init, quantization)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_what_peft_would_not_apply_as_named_is_refused_before_training(tiny_llama_dir, alpaca_file):
    llama, gpt2 = _meta(tiny_llama), _meta(tiny_gpt2)
    for init in ("pissa", "olora", "orthogonal"):
        text = _check_message(llama, f"attention[init={init}]", quantization="nf4")
        assert f"init={init}" in text and "quantization=nf4" in text and "use quantization=none" in text
    check_init(llama, resolve_placement(llama, parse_strategy("full"), 4, 8), "gaussian", "nf4")  # no error
    assert "even ranks" in _check_message(llama, "attention[init=orthogonal]", r=3)
    assert "embedding" in _check_message(llama, "embed+attention[init=gaussian]")
    assert "Conv1D" in _check_message(gpt2, "attention[init=olora]")
    assert "tied to model.embed_tokens.weight" in _check_message(llama, "lm_head[init=pissa]")
    check_init(llama, resolve_placement(llama, parse_strategy("lm_head"), 4, 8), "orthogonal")  # keeps W: fine

    # the study's check (Method.check, before anything trains) refuses a quantized base with one line
    from loraplace.config import load_study
    from loraplace.methods.base import Method

    config = load_study(None, {"model": str(tiny_llama_dir), "dataset": str(alpaca_file), "device": "cpu",
                               "quantization": "nf4", "strategies": "full[init=pissa]~attention"})
    for label in ("full[init=pissa]~attention", "auto[init=olora]~attention"):
        arm = parse_arm(label)
        method = method_of(arm)
        with pytest.raises(LoraplaceError, match=r"quantiz"):
            method.check(llama, arm, config)
    Method().check(llama, parse_arm("full[init=pissa]"), config.model_copy(update={"quantization": "none"}))


# ---------------------------------------------------------------- 4. a run after a PiSSA run
def _run_spec(model_dir, dataset, strategy: str, out, name: str) -> RunSpec:
    return RunSpec(run_id=name, strategy=strategy, model=str(model_dir), dataset=str(dataset),
                   lora=LoraSettings(r=4, alpha=8), data=DataSettings(eval_size=8), device="cpu",
                   train=TrainSettings(max_steps=2, batch_size=4, eval_every=0, precision="fp32", logging_steps=1,
                                       max_length=64, lr=5e-2),
                   run_dir=str(out / name))


def test_an_arm_after_a_pissa_arm_gives_what_it_gives_alone(tiny_llama_dir, alpaca_file, tmp_path):
    """PiSSA then plain full on one shared base model (in-process, as the test suite's studies run):
    the base weights come back bit for bit, and full gives exactly what it gives alone. (OLoRA's
    restoration is the same code: test_unloading_puts_rewritten_base_weights_back_bit_for_bit.)"""
    init = "pissa"
    ctx = RunContext()
    task = ctx.task(_run_spec(tiny_llama_dir, alpaca_file, "full", tmp_path, "probe"))
    base = ctx.base_model(str(tiny_llama_dir), CPU, task, None)
    before = {k: (v.dtype, _bits(v)) for k, v in base.state_dict().items()}
    first = execute_run(_run_spec(tiny_llama_dir, alpaca_file, f"full[init={init}]", tmp_path, "first"), ctx)
    assert first.status == "ok", first.error
    assert first.init == init
    assert ctx.base_model(str(tiny_llama_dir), CPU, task, None) is base  # the shared model, not reloaded
    after = base.state_dict()
    assert list(after) == list(before)
    assert [k for k, v in after.items() if v.dtype != before[k][0] or not torch.equal(_bits(v), before[k][1])] == []
    second = execute_run(_run_spec(tiny_llama_dir, alpaca_file, "full", tmp_path / "together", "full"), ctx)
    alone = execute_run(_run_spec(tiny_llama_dir, alpaca_file, "full", tmp_path / "alone", "full"), RunContext())
    assert second.status == alone.status == "ok"
    assert second.init is None and alone.init is None
    assert (second.eval_loss, second.final_train_loss) == (alone.eval_loss, alone.final_train_loss)
    assert first.trainable_params == alone.trainable_params  # the init changes no count
    assert first.eval_loss != alone.eval_loss  # the init did something


def test_update_norms_of_an_arm_that_starts_nonzero_measure_what_training_changed(tiny_llama_dir):
    """PiSSA starts B A at the weight's top singular part; the post-hoc norm must be that of the change
    (||s (B A - B0 A0)||, by hand below), not of B A. A default arm starts at B = 0 and keeps ||s B A||."""
    for init, starts_nonzero in (("pissa", True), (None, False)):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        placement = resolve_placement(model, parse_strategy("attention"), 4, 8.0)
        config = LoraConfig(r=4, lora_alpha=8.0, target_modules=placement.module_names,
                            init_lora_weights=init or True)
        peft_model = get_peft_model(model, config)
        initial = initial_adapters(peft_model)
        assert bool(initial) == starts_nonzero
        layers = {n: m for n, m in peft_model.get_base_model().named_modules() if n in placement.module_names}
        torch.manual_seed(0)
        change = {}
        with torch.no_grad():
            for name, layer in layers.items():
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                a0, b0 = a.clone(), b.clone()
                b.add_(torch.randn_like(b))
                a.add_(torch.randn_like(a))
                change[name] = float(layer.scaling["default"] * (b @ a - b0 @ a0).norm())
        norms = {m["name"]: m["norm"] for m in adapter_update_norms(peft_model, placement, initial=initial)}
        assert norms == pytest.approx(change, rel=1e-5)
