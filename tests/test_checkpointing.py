"""Gradient checkpointing (``train.gradient_checkpointing``): same loss and gradients, less
activation memory, and switched off again on the shared base model after the run."""

import datasets
import torch
from peft import LoraConfig, get_peft_model
from test_evaluation_nll import PAD, ListDataset, examples
from test_training_perf import TARGETS, loss_and_grads, peft_tiny

from loraplace.config import TrainSettings
from loraplace.data import PadCollator
from loraplace.run.measure import PeakMemory
from loraplace.run.training import checkpointing, train_adapters


def state_of(base):
    return ([getattr(m, "gradient_checkpointing", None) for m in base.modules()],
            bool(getattr(base, "_require_grads_hooks", None)),
            len(base.get_input_embeddings()._forward_hooks))


def test_same_loss_and_grads_with_checkpointing_and_switched_off_after():
    base, model = peft_tiny()
    model.train()
    batch = PadCollator(PAD)(examples())
    before = state_of(base)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    calls = []
    layer = base.model.layers[0]
    hook = layer.self_attn.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    with checkpointing(model, True) as on:
        assert on and base.is_activation_checkpointing
        loss, grads = loss_and_grads(model, batch)
    hook.remove()
    assert len(calls) == 2  # the layer ran twice: forward, and its recomputation in backward
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7)
    assert state_of(base) == before and not base.is_activation_checkpointing


def test_train_adapters_with_checkpointing_same_losses_and_recorded(tmp_path):
    ds = datasets.Dataset.from_list(list(ListDataset(examples(16, seed=5))))
    settings = TrainSettings(max_steps=3, batch_size=4, logging_steps=1, eval_every=0)
    runs = {}
    for on in (False, True):
        base, model = peft_tiny()
        before = state_of(base)
        out = train_adapters(model, ds, PadCollator(PAD), settings.model_copy(update={"gradient_checkpointing": on}),
                             seed=0, precision="fp32", device=torch.device("cpu"), output_dir=tmp_path / str(on))
        assert state_of(base) == before and not base.is_activation_checkpointing
        runs[on] = out
    assert runs[True].choices["gradient_checkpointing"].startswith("on")
    assert runs[False].choices["gradient_checkpointing"] == "off"
    losses = {on: [e["loss"] for e in out.log_history if "loss" in e] for on, out in runs.items()}
    assert len(losses[True]) == 3
    assert losses[True] == [pytest_approx(x) for x in losses[False]]


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-5, abs=1e-6)


def long_sequence_model():
    """Tiny weights, long sequences: activations (eager attention probabilities) dominate memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=PAD, attn_implementation="eager")
    base = LlamaForCausalLM(config)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))
    model.train()
    return model


def test_checkpointing_lowers_peak_memory_where_activations_dominate():
    model = long_sequence_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (4, 768), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss_and_grads(model, batch)  # allocator warm-up
    increase = {}
    for on in (False, True) * 3:  # the least of three each: RSS sampling is noisy
        with checkpointing(model, on), PeakMemory(torch.device("cpu"), interval_s=0.002) as mem:
            loss_and_grads(model, batch)
        increase[on] = min(increase.get(on, float("inf")), mem.increase_mib)
    # eager attention alone keeps 6 layers x 4 x 8 heads x 768^2 floats (~450 MiB) of probabilities
    assert increase[False] > 200
    assert increase[True] < 0.5 * increase[False], increase


def test_compiled_layers_train_like_eager_and_are_eager_after(tmp_path):
    """train.compile: the decoder layers run compiled during training (losses equal to eager ones
    without dropout, float32) and eagerly again afterwards (the next arm on the shared base)."""
    from loraplace.run.training import decoder_layers

    ds = datasets.Dataset.from_list(list(ListDataset(examples(16, seed=5))))
    losses, choices = [], []
    for compile_ in (False, True):
        base, model = peft_tiny()
        settings = TrainSettings(max_steps=3, batch_size=4, logging_steps=1, eval_every=0, compile=compile_)
        out = train_adapters(model, ds, PadCollator(PAD), settings, seed=0, precision="fp32",
                             device=torch.device("cpu"), output_dir=tmp_path / str(compile_))
        losses.append([h["loss"] for h in out.log_history if "loss" in h])
        choices.append(out.choices)
        layers = decoder_layers(base)
    assert "compile" not in choices[0] and choices[1]["compile"].startswith("2 decoder layers")
    assert len(layers) == 2 and all(layer._compiled_call_impl is None for layer in layers)
    assert len(losses[1]) == 3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-4)
