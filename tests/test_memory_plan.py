"""The memory plan (loraplace.run.memory_plan): components against hand-computed values and against what
autograd actually saves, monotonicity, the study's refusal, ``gradient_checkpointing=auto`` in a real
tiny run, and the plan command's memory columns. The accuracy claim against measured peaks of
larger models is benchmarks/memory_plan_check.py's."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from loraplace.errors import LoraplaceError
from loraplace.placement.resolve import resolve_placement
from loraplace.placement.strategies import parse_strategy
from loraplace.run.memory_plan import (
    AUTO_HEADROOM,
    FREE_MEMORY_ENV,
    MIB,
    RUNTIME_OVERHEAD_CPU_MIB,
    choose_checkpointing,
    device_free_mib,
    estimate_memory,
)
from loraplace.run.models import meta_model

# hidden 32, 4 heads of 8, 2 key-value heads (k and v project to 16), intermediate 64, 2 layers, tied head
TINY = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)
TINY_PARAMS = 512 * 32 + 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32  # 34,976
TINY_LINEAR = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64)  # the projections (the head is tied)
TINY_LORA_R4 = 2 * 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 64) + (32 + 64) + (64 + 32))  # 4,096


def tiny(**changes):
    config = LlamaConfig(**{**TINY, **changes})
    skeleton = meta_model(config)
    return config, skeleton, resolve_placement(skeleton, parse_strategy("full"), 4, 8)


def estimate(config, placement, **kwargs):
    args = dict(batch_size=2, max_length=16, precision="fp32", gradient_checkpointing=False, device="cpu")
    return estimate_memory(config, placement, **{**args, **kwargs})


def test_weights_adapters_and_optimizer_match_the_parameter_counts():
    config, skeleton, placement = tiny()
    assert sum(p.numel() for p in skeleton.parameters()) == TINY_PARAMS and placement.lora_params == TINY_LORA_R4
    fp32 = estimate(config, placement)
    assert fp32.base_weights * MIB == 4 * TINY_PARAMS == fp32.base_weights_loaded * MIB
    assert fp32.adapter_weights * MIB == 4 * TINY_LORA_R4 == fp32.adapter_grads * MIB
    assert fp32.optimizer_states * MIB == 8 * TINY_LORA_R4  # AdamW: two float32 states
    assert fp32.runtime_overhead == RUNTIME_OVERHEAD_CPU_MIB
    # bf16 autocast: the frozen projections are held in bfloat16 instead of float32 (not beside it)
    bf16 = estimate(config, placement, precision="bf16")
    assert bf16.base_weights * MIB == 4 * (TINY_PARAMS - TINY_LINEAR) + 2 * TINY_LINEAR
    assert bf16.base_weights_loaded == fp32.base_weights_loaded


def test_attention_probabilities_of_eager_attention():
    config, _, placement = tiny()
    B, heads, T, layers = 2, 4, 16, 2
    fp32 = estimate(config, placement)
    assert fp32.attention == "eager"  # what training uses on CPU
    assert fp32.attention_probs * MIB == layers * 4 * B * heads * T * T  # the float32 softmax output
    # bf16: the float32 softmax output and its bfloat16 copy for the second matmul
    assert estimate(config, placement, precision="bf16").attention_probs * MIB == layers * 6 * B * heads * T * T
    # checkpointing: one layer's, during its recomputation
    assert estimate(config, placement, gradient_checkpointing=True).attention_probs * MIB == 4 * B * heads * T * T


def test_logits_of_the_selective_loss():
    config, _, placement = tiny()
    n = 2 * 15  # batch x (length - 1) labelled positions
    assert estimate(config, placement).logits * MIB == 12 * n * 512
    assert estimate(config, placement, labelled_fraction=0.5).logits * MIB == 12 * (n // 2) * 512


def test_monotone_in_batch_and_length_and_checkpointing_saves():
    config, _, placement = tiny()
    totals = [estimate(config, placement, batch_size=b).total for b in (1, 2, 4, 8)]
    assert totals == sorted(totals) and len(set(totals)) == 4
    totals = [estimate(config, placement, max_length=t).total for t in (16, 32, 64, 128)]
    assert totals == sorted(totals) and len(set(totals)) == 4
    for precision in ("fp32", "bf16"):
        off = estimate(config, placement, max_length=128, precision=precision)
        on = estimate(config, placement, max_length=128, precision=precision, gradient_checkpointing=True)
        assert on.activations < off.activations and on.attention_probs < off.attention_probs
        assert on.training < off.training


def test_only_layers_from_the_first_adapted_one_save_activations():
    config, skeleton, full = tiny(num_hidden_layers=4)
    last = resolve_placement(skeleton, parse_strategy("full@last:1"), 4, 8)
    assert estimate(config, last).attention_probs * 4 == estimate(config, full).attention_probs


@pytest.mark.parametrize("masks", ["independent", "shared"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activations_are_what_autograd_saves(precision, masks):
    """The saved-tensor part of the estimate against the bytes autograd saves in a real forward of
    loraplace's training path (frozen weights in the autocast dtype, eager attention, mask dropout,
    independent or shared between the adapters of one input)."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from loraplace.adapters import lora_config_for
    from loraplace.config import LoraSettings
    from loraplace.run.device import autocast_dtype
    from loraplace.run.evaluation import token_nll
    from loraplace.run.training import attention_as, frozen_weights_as, use_mask_dropout

    B, T = 2, 48
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.config.use_cache = False
    placement = resolve_placement(base, parse_strategy("full"), 8, 16)
    model = get_peft_model(base, lora_config_for(placement, LoraSettings(r=8, alpha=16, dropout=0.1)))
    use_mask_dropout(model, shared=masks == "shared")
    model.train()
    ids = torch.randint(0, 256, (B, T))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    dtype = autocast_dtype(precision)
    saved: dict[tuple, int] = {}
    with frozen_weights_as(model, dtype), attention_as(model, "eager"):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            token_nll(model, batch)
    est = estimate_memory(config, placement, batch_size=B, max_length=T, precision=precision,
                          gradient_checkpointing=False, device="cpu", lora_dropout=0.1, dropout_masks=masks)
    # the loss keeps its log-softmax (a third of the logits component, which is the loss's peak)
    expected = (est.activations + est.attention_probs + est.logits / 3) * MIB
    measured = sum(saved.values())
    # layer 0 saves a little less: its input (the embedding) needs no gradient
    assert measured <= expected <= 1.10 * measured, (measured, expected)


def test_device_free_memory(monkeypatch):
    monkeypatch.delenv(FREE_MEMORY_ENV, raising=False)
    assert device_free_mib("cpu") > 0
    monkeypatch.setenv(FREE_MEMORY_ENV, "1234.5")
    assert device_free_mib("cpu") == 1234.5
    monkeypatch.setenv(FREE_MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match=FREE_MEMORY_ENV):
        device_free_mib("cpu")


def test_choose_checkpointing():
    config, _, placement = tiny()
    off = estimate(config, placement, max_length=128)
    on = estimate(config, placement, max_length=128, gradient_checkpointing=True)
    assert choose_checkpointing(True, off, on, 1.0).enabled
    assert not choose_checkpointing(False, off, on, 1.0).enabled
    assert not choose_checkpointing("auto", off, on, None).enabled  # free memory unknown
    assert not choose_checkpointing("auto", off, on, 10 * off.needed_mib).enabled
    between = (on.needed_mib + off.needed_mib * (1 + AUTO_HEADROOM)) / 2
    chosen = choose_checkpointing("auto", off, on, between)
    assert chosen.enabled and chosen.reason.startswith("on (auto:") and chosen.estimate is on
    assert not choose_checkpointing("auto", off, on, between, supported=False).enabled


def _study(tiny_llama_dir, alpaca_file, **train):
    from loraplace.config import load_study

    overrides = {"model": str(tiny_llama_dir), "dataset": str(alpaca_file), "strategies": "full,attention",
                 "train.precision": "fp32", "device": "cpu"}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return load_study(None, overrides)


def test_study_refuses_an_arm_that_does_not_fit(tiny_llama_dir, alpaca_file, monkeypatch):
    from loraplace.study.checks import check_study

    config = _study(tiny_llama_dir, alpaca_file)
    monkeypatch.delenv(FREE_MEMORY_ENV, raising=False)
    check_study(config, allow_fetch=False)  # fits in this machine's memory
    monkeypatch.setenv(FREE_MEMORY_ENV, "1")
    with pytest.raises(LoraplaceError) as info:
        check_study(config, allow_fetch=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("arm 'full' needs about ") and "with gradient checkpointing" in message
    assert "1 MiB free" in message and "train.batch_size (8)" in message and "train.max_length (256)" in message
    assert "activations" in message and "logits" in message  # the components, in MiB


def test_refusal_suggests_checkpointing_when_it_was_switched_off(tiny_llama_dir, alpaca_file, monkeypatch):
    from loraplace.run.models import load_config
    from loraplace.study.checks import check_study

    config = _study(tiny_llama_dir, alpaca_file, gradient_checkpointing=False)
    model_config, _ = load_config(str(tiny_llama_dir))
    skeleton = meta_model(model_config)
    placement = resolve_placement(skeleton, parse_strategy("full"), 16, 32)
    need = {ckpt: estimate_memory(model_config, placement, batch_size=8, max_length=256, precision="fp32",
                                  gradient_checkpointing=ckpt, device="cpu").needed_mib for ckpt in (False, True)}
    monkeypatch.setenv(FREE_MEMORY_ENV, str((need[False] + need[True]) / 2))
    with pytest.raises(LoraplaceError, match="without gradient checkpointing.*set train.gradient_checkpointing=auto"):
        check_study(config, allow_fetch=False)
    check_study(config.model_copy(update={"train": config.train.model_copy(
        update={"gradient_checkpointing": "auto"})}), allow_fetch=False)  # auto: it fits with checkpointing


def test_auto_checkpointing_in_a_real_run(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    """auto: off with plenty of free memory; on when the free memory lies between the run's needs
    with and without checkpointing; recorded in the result, with the estimate."""
    from loraplace.config import DataSettings, TrainSettings
    from loraplace.records import RunSpec
    from loraplace.run.context import RunContext
    from loraplace.study.runs import execute_run

    ctx = RunContext(allow_fetch=False)

    def run(name: str):
        spec = RunSpec(run_id=name, strategy="full", model=str(tiny_llama_dir), dataset=str(alpaca_file),
                       train=TrainSettings(max_steps=2, batch_size=4, eval_every=0, logging_steps=1, precision="fp32"),
                       data=DataSettings(eval_size=8), device="cpu", run_dir=str(tmp_path / name))
        assert spec.train.gradient_checkpointing == "auto"  # the default
        result = execute_run(spec, ctx)
        assert result.status == "ok", result.error
        assert json.loads((tmp_path / name / "result.json").read_text())["memory_plan"] == result.memory_plan
        return result

    monkeypatch.delenv(FREE_MEMORY_ENV, raising=False)
    plenty = run("plenty")
    plan = plenty.memory_plan
    assert plan["gradient_checkpointing"].startswith("off (auto:")
    assert plenty.speed_choices["gradient_checkpointing"] == "off"
    assert plenty.memory_estimate_mib == plan["estimate_mib"] == plan["total_without_checkpointing_mib"]
    assert plan["components_mib"]["total"] == plan["estimate_mib"] and plan["length"] <= 256
    # RSS of a tiny run is mostly the test process itself: a loose bound only
    assert 0.5 < plenty.memory_estimate_mib / plenty.peak_memory_mib < 2.0

    need_off, need_on = plan["needed_without_checkpointing_mib"], plan["needed_with_checkpointing_mib"]
    free = (need_on + need_off * (1 + AUTO_HEADROOM)) / 2
    assert need_on < free < need_off * (1 + AUTO_HEADROOM)
    monkeypatch.setenv(FREE_MEMORY_ENV, str(free))
    tight = run("tight")
    assert tight.memory_plan["gradient_checkpointing"].startswith("on (auto:")
    assert tight.speed_choices["gradient_checkpointing"].startswith("on")
    assert tight.memory_plan["free_mib"] == round(free, 1)
    assert tight.memory_estimate_mib == tight.memory_plan["total_with_checkpointing_mib"]
    assert tight.final_train_loss == pytest.approx(plenty.final_train_loss, rel=1e-5)  # same training


def test_plan_command_shows_memory(tiny_llama_dir, monkeypatch):
    from typer.testing import CliRunner

    from loraplace.cli import app

    monkeypatch.setenv(FREE_MEMORY_ENV, "4096")
    runner = CliRunner()
    args = ["plan", "--model", str(tiny_llama_dir), "--batch-size", "4", "--max-length", "64", "--precision", "fp32",
            "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["memory"] == {"device": "cpu", "free_mib": 4096.0, "batch_size": 4, "max_length": 64,
                              "precision": "fp32"}
    for row in plan["strategies"]:
        memory = row["memory"]
        assert memory["with_checkpointing_mib"] < memory["total_mib"] == memory["components_mib"]["total"]
    result = runner.invoke(app, args, env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    assert "memory MiB" in result.output and "with ckpt" in result.output and "4,096 MiB free" in result.output
    result = runner.invoke(app, [*args[:-4], "--precision", "fp8"])
    assert result.exit_code != 0 and "--precision" in result.output


def test_checkpointing_is_decided_once_for_every_arm(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    """auto: when one arm (full) would not fit without checkpointing but another (attention) would,
    every arm of the study trains with it, the decision is kept in study.yaml, and a resume keeps it."""
    import yaml

    from loraplace.run.models import load_config
    from loraplace.study.driver import run_study

    config = _study(tiny_llama_dir, alpaca_file, max_steps=2, batch_size=4, max_length=64, eval_every=0,
                    logging_steps=1)
    config = config.model_copy(update={"include_base": False, "output": str(tmp_path / "s"),
                                       "data": config.data.model_copy(update={"eval_size": 8})})
    model_config, _ = load_config(str(tiny_llama_dir))
    skeleton = meta_model(model_config)

    def need(strategy: str, ckpt: bool) -> float:  # the study-level estimate: batch x max_length, full's modules
        placement = resolve_placement(skeleton, parse_strategy(strategy), 16, 32)
        return estimate_memory(model_config, placement, batch_size=4, max_length=64, precision="fp32",
                               gradient_checkpointing=ckpt, device="cpu", eval_batch_size=config.train.eval_batch_size,
                               lora_dropout=config.lora.dropout).needed_mib

    full_off, full_on, attn_off = need("full", False), need("full", True), need("attention", False)
    low, high = max(attn_off * (1 + AUTO_HEADROOM), full_on), full_off * (1 + AUTO_HEADROOM)
    assert low < high
    free = (low + high) / 2
    monkeypatch.setenv(FREE_MEMORY_ENV, str(free))
    study_dir = run_study(config)
    results = json.loads((study_dir / "results.json").read_text())["runs"]
    assert {r["strategy"] for r in results} == {"full", "attention"}
    for r in results:  # attention alone would have run without it
        assert r["status"] == "ok", r["error"]
        assert r["speed_choices"]["gradient_checkpointing"].startswith("on"), r["strategy"]
    decided = yaml.safe_load((study_dir / "study.yaml").read_text())["decided"]
    assert decided["gradient_checkpointing"] is True and "'full'" in decided["gradient_checkpointing_reason"]
    # resumed with plenty of memory: the runs it adds keep the study's decision
    monkeypatch.delenv(FREE_MEMORY_ENV)
    run_study(config.model_copy(update={"seeds": [0, 1], "strategies": ["attention"]}), resume=True)
    added = [r for r in json.loads((study_dir / "results.json").read_text())["runs"] if r["seed"] == 1]
    assert added and added[0]["speed_choices"]["gradient_checkpointing"].startswith("on")


def test_the_report_shows_the_study_level_checkpointing_decision(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    from loraplace.study.driver import run_study

    config = _study(tiny_llama_dir, alpaca_file, max_steps=1, batch_size=4, max_length=64, eval_every=0)
    config = config.model_copy(update={"include_base": False, "output": str(tmp_path / "s"), "strategies": ["qv"],
                                       "data": config.data.model_copy(update={"eval_size": 8})})
    monkeypatch.delenv(FREE_MEMORY_ENV, raising=False)
    monkeypatch.setenv(FREE_MEMORY_ENV, "100000")
    study_dir = run_study(config)
    setup = (study_dir / "report" / "tables" / "setup.md").read_text()
    assert "| gradient checkpointing, decided once for every arm | off for every arm (auto: every arm fits" in setup
    assert "| gradient checkpointing used | off |" in setup
