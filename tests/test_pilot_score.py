"""The ``pilot`` importance score: its curve by hand, its energies against a pilot trained and
measured here with PEFT and torch directly (the update's delta weight times the captured inputs,
not the adapter's forward), the base model bit-identical afterwards, a slot whose input is zero
ranked below its twin, its cost counted by hooks against the bound from its settings, padding
ignored in encoder models, and ``auto[score=pilot]`` through the command line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import score_then_plan
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from loraplace.data import IGNORE_INDEX
from loraplace.importance import PILOT_LR, PILOT_RANK, PILOT_STEPS, load_for_scoring, pilot_curve, score_slots
from loraplace.importance.pilot import PILOT_ALPHA, PILOT_SEED
from loraplace.placement.allocate import SlotCurve, allocate
from loraplace.run.evaluation import token_nll


def _setup(model_dir, alpaca_file, batches: int, size: int = 2):
    setup = load_for_scoring(str(model_dir), str(alpaca_file), batches=batches, batch_size=size, max_length=128,
                             eval_size=8, device="cpu")
    return setup.model, setup.batches


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()),
            torch.get_rng_state())


def _assert_unchanged(model, before):
    state, flags, modules, hooks, rng = before
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(state[k], after[k]) for k in state)  # bit-identical
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert [(n, type(m).__name__, m.training) for n, m in model.named_modules()] == modules  # no LoRA layer left
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules()) == hooks
    assert all(p.grad is None for p in model.parameters())
    assert not hasattr(model, "peft_config")
    assert torch.equal(torch.get_rng_state(), rng)  # the pilot's init drew from a forked generator


def _check_curve(curve, max_rank):
    c = np.asarray(curve)
    assert len(c) == max_rank and np.all(c >= 0)
    assert np.all(np.diff(c) >= 0) and np.all(np.diff(c, 2) <= 1e-12 * max(1.0, c[-1]))  # nondecreasing, concave


# ----------------------------------------------------------------------------------- the curve
def test_pilot_curve_is_the_energy_at_the_pilot_rank_times_a_harmonic_shape():
    harmonic = [1.0, 1.5, 11 / 6, 25 / 12, 137 / 60, 49 / 20]  # by hand
    curve = pilot_curve(3.0, 6, pilot_rank=4)
    np.testing.assert_allclose(curve, [3.0 * h / (25 / 12) for h in harmonic], rtol=1e-12)
    assert curve[3] == pytest.approx(3.0)  # the measured energy, at the rank it was measured at
    _check_curve(curve, 6)
    np.testing.assert_allclose(pilot_curve(3.0, 2, pilot_rank=4), curve[:2], rtol=1e-12)  # max_rank < pilot rank
    assert pilot_curve(0.0, 5) == [0.0] * 5
    # with H_k, the marginal gain per parameter of rank k + 1 is E / (H_R (k + 1) (in + out)), so the greedy
    # gives ranks about in proportion to E / (in + out): 0.2, 0.09 and 0.12 here (no ties), steps a1 c1 a2 b1
    # a3 c2 a4 b2 spend 100 exactly
    slots = [SlotCurve("a", 10, tuple(pilot_curve(2.0, 12))), SlotCurve("b", 20, tuple(pilot_curve(1.8, 12))),
             SlotCurve("c", 10, tuple(pilot_curve(1.2, 12)))]
    assert allocate(slots, 4 * 10 + 2 * 20 + 2 * 10, step=1, max_r=12) == {"a": 4, "b": 2, "c": 2}


# ---------------------------------------------------------------------- against a pilot made here
def _reference_energies(model, names, batches) -> dict[str, float]:
    """The documented pilot, written out: PEFT LoRA (rank, alpha, seed of the settings, no dropout) on
    ``names``; AdamW on the first ceil(b/2) batches in turn for the pilot's steps; then on the last
    floor(b/2) batches, per slot ``||x DeltaW^T||^2`` over attention-mask tokens, DeltaW = PEFT's
    delta weight (scale included), x the wrapped module's input."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # leave the session's random state to the other tests
        torch.manual_seed(PILOT_SEED)
        peft_model = get_peft_model(model, LoraConfig(r=PILOT_RANK, lora_alpha=PILOT_ALPHA, lora_dropout=0.0,
                                                      target_modules=list(names)))
    train, held = batches[:math.ceil(len(batches) / 2)], batches[math.ceil(len(batches) / 2):]
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert params and all(p.requires_grad for p in params)
    optimizer = torch.optim.AdamW(params, lr=PILOT_LR, weight_decay=0.0)
    for step in range(PILOT_STEPS):
        nll, count = token_nll(model, train[step % len(train)])
        (nll.sum() / count.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    layers = {n: model.get_submodule(n) for n in names}
    inputs: dict[str, list] = {n: [] for n in names}
    hooks = [layer.register_forward_pre_hook(lambda m, args, n=n: inputs[n].append(args[0].detach()))
             for n, layer in layers.items()]
    masks = []
    with torch.no_grad():
        for batch in held:
            token_nll(model, batch)
            masks.append(batch["attention_mask"].bool())
    for h in hooks:
        h.remove()
    energies = {}
    with torch.no_grad():
        for n, layer in layers.items():
            assert isinstance(layer, LoraLayer)
            delta = layer.get_delta_weight("default").double()
            if layer.fan_in_fan_out:  # GPT-2's Conv1D keeps its weight in x out
                delta = delta.T
            total, tokens = 0.0, 0
            for x, mask in zip(inputs[n], masks, strict=True):
                y = x.double()[mask] @ delta.T
                total += float((y ** 2).sum())
                tokens += int(mask.sum())
            energies[n] = total / tokens
    peft_model.unload()
    return energies


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pilot_energies_equal_an_independent_pilot_and_the_base_model_is_unchanged(family, tiny_llama_dir,
                                                                                   tiny_gpt2_dir, alpaca_file):
    model, batches = _setup(tiny_llama_dir if family == "llama" else tiny_gpt2_dir, alpaca_file, batches=3)
    model.train()  # scoring runs in eval mode and must restore this
    model.get_input_embeddings().weight.requires_grad_(False)  # mixed flags
    before = _snapshot(model)
    result = score_slots(model, batches, "pilot", 8)
    _assert_unchanged(model, before)

    assert result.score == "pilot" and result.batches == 3 and result.batch_size == 2
    # target tokens: 8 steps over the first 2 batches in turn, then the held-out third
    targets = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    assert result.tokens == sum(targets[s % 2] for s in range(PILOT_STEPS)) + targets[2]
    assert result.seconds > 0 and result.peak_memory_mib > 0
    assert len(result.slots) == (14 if family == "llama" else 8)
    reference = _reference_energies(model, [s.name for s in result.slots], batches)
    for slot in result.slots:
        _check_curve(slot.curve, 8)
        assert reference[slot.name] > 0, slot.name
        assert slot.gain(PILOT_RANK) == pytest.approx(reference[slot.name], rel=1e-4), slot.name
        np.testing.assert_allclose(slot.curve, pilot_curve(reference[slot.name], 8), rtol=1e-4, err_msg=slot.name)
    again = score_slots(model, batches, "pilot", 8)  # seeded: the same curves
    assert [s.curve for s in again.slots] == [s.curve for s in result.slots]


def test_a_slot_whose_input_is_zero_ranks_below_its_twin(tiny_llama_dir, alpaca_file):
    """Layer 0's post-attention norm is zeroed: its MLP reads zeros whatever the adapters do (gate and
    up see a zero input, down sees silu(0) * 0), so their updates output exactly zero; layer 1's MLP
    slots, the same shapes, see real inputs."""
    model, batches = _setup(tiny_llama_dir, alpaca_file, batches=2)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.zero_()
    gains = {s.name: s.gain(PILOT_RANK) for s in score_slots(model, batches, "pilot", 4).slots}
    for role in ("gate_proj", "up_proj", "down_proj"):
        dead, live = gains[f"model.layers.0.mlp.{role}"], gains[f"model.layers.1.mlp.{role}"]
        assert dead == 0.0 and live > 0, role
    assert all(g > 0 for n, g in gains.items() if "layers.0.mlp" not in n)


# ---------------------------------------------------------------------------------------- cost
@pytest.mark.parametrize("n_batches", [1, 5])
def test_cost_is_the_bound_of_its_settings(n_batches, tiny_llama_dir, alpaca_file):
    """Forward and backward passes counted by hooks on the final norm (run once per forward; its output
    gets a gradient once per backward): PILOT_STEPS forward and backward passes plus floor(b/2)
    held-out forwards (one when a single batch is both). The gradient score, counted alike: b and b."""
    model, batches = _setup(tiny_llama_dir, alpaca_file, batches=n_batches)
    counts = {"forward": 0, "backward": 0}

    def count(module, args, output) -> None:
        counts["forward"] += 1
        if output.requires_grad:
            output.register_hook(lambda grad: counts.__setitem__("backward", counts["backward"] + 1))

    handle = model.model.norm.register_forward_hook(count)
    try:
        result = score_slots(model, batches, "pilot", 4)
        held = max(1, n_batches // 2)
        assert counts == {"forward": PILOT_STEPS + held, "backward": PILOT_STEPS}
        assert (result.forward_passes, result.backward_passes) == (PILOT_STEPS + held, PILOT_STEPS)
        assert any("same single batch" in w for w in result.warnings) == (n_batches == 1)
        counts.update(forward=0, backward=0)
        gradient = score_slots(model, batches, "gradient", 4)
        assert counts == {"forward": n_batches, "backward": n_batches}
        assert (gradient.forward_passes, gradient.backward_passes) == (n_batches, n_batches)
    finally:
        handle.remove()


# --------------------------------------------------------------------------------- encoder models
def _encoder(family: str):
    from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

    from loraplace.run.tasks import get_task

    torch.manual_seed(0)
    if family == "t5":
        return T5ForConditionalGeneration(T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0)), \
            get_task("seq2seq")
    return BertForSequenceClassification(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3,
                                                    pad_token_id=0)), get_task("classification")


def _encoder_batches(family: str, pad_source: int = 0, pad_target: int = 0):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.cat([torch.randint(3, 200, (3, 7), generator=g), torch.zeros(3, pad_source, dtype=torch.long)], 1)
        mask = (torch.arange(ids.shape[1]) < 7).long().expand(3, -1).clone()
        labels = (torch.cat([torch.randint(3, 200, (3, 5), generator=g), torch.full((3, pad_target), IGNORE_INDEX)], 1)
                  if family == "t5" else torch.randint(0, 3, (3,), generator=g))
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_encoder_models_ignore_padding_and_come_back_unchanged(family):
    """Padding appended to the source (and the decoder's targets) changes no real token's loss or
    activations, so it changes neither the pilot's training nor what it measures."""
    model, task = _encoder(family)
    before = _snapshot(model)
    plain = score_slots(model, _encoder_batches(family), "pilot", 4, nll_fn=task.nll)
    _assert_unchanged(model, before)
    padded = score_slots(model, _encoder_batches(family, pad_source=3, pad_target=2), "pilot", 4, nll_fn=task.nll)
    assert not [w for w in plain.warnings + padded.warnings if "matches no token mask" in w]
    for a, b in zip(plain.slots, padded.slots, strict=True):
        assert a.gain(PILOT_RANK) > 0, a.name
        np.testing.assert_allclose(b.curve, a.curve, rtol=2e-3, atol=1e-12, err_msg=a.name)


# ------------------------------------------------------------------------------------ end to end
def test_auto_pilot_allocates_end_to_end_through_the_command_line(tiny_llama_dir, alpaca_file, tmp_path,
                                                                  monkeypatch):
    """``loraplace importance --score pilot`` then ``loraplace plan`` with ``auto[score=pilot]~attention``:
    the plan trains the attention budget with the ranks the greedy gives on the written curves."""
    from loraplace.placement.resolve import resolve_placement
    from loraplace.placement.strategies import parse_strategy

    written, rows = score_then_plan(tiny_llama_dir, alpaca_file, "pilot", tmp_path / "importance", 2, monkeypatch)
    assert written["score"] == "pilot" and (written["forward_passes"], written["backward_passes"]) == (
        PILOT_STEPS + 1, PILOT_STEPS)
    auto = "auto[score=pilot,step=1]~attention"
    assert rows[auto]["budget"]["score"] == "pilot"
    model, _ = _setup(tiny_llama_dir, alpaca_file, batches=1)
    target = resolve_placement(model, parse_strategy("attention"), 4, 8.0).lora_params
    assert abs(rows[auto]["trainable_params"] - target) <= 0.01 * target
    modules = {n: m for n, m in model.named_modules()
               if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}
    curves = {s["name"]: s["curve"] for s in written["slots"]}
    assert set(curves) == set(modules)
    for curve in curves.values():
        _check_curve(curve, 16)
    expected = allocate([SlotCurve(n, m.in_features + m.out_features, tuple(curves[n]),
                                   max_rank=min(m.in_features, m.out_features)) for n, m in modules.items()],
                        target, step=1, max_r=16)
    assert {m["name"]: m["r"] for m in rows[auto]["modules"]} == expected
