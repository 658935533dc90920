"""Arms of a study are comparable: the data order does not depend on the strategy, the training
loss is the token mean over the labelled tokens of each optimizer step whatever the Trainer
counts, the selective-logits loss is checked against the model's own logits, and the untimed
warm-up changes nothing the training depends on.

Tiny random-init Llama models from a config: no downloads, a few seconds each.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_evaluation_nll import PAD, examples, tiny_llama

from loraplace.config import TrainSettings
from loraplace.data import IGNORE_INDEX, PadCollator
from loraplace.errors import LoraplaceError
from loraplace.run.evaluation import token_nll
from loraplace.run.training import train_adapters

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
CPU = torch.device("cpu")


def dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def peft_model(targets=ALL, dropout=0.0, base=None):
    base = base if base is not None else tiny_llama()
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                           task_type="CAUSAL_LM"))


# ------------------------------------------------------------------------------------ 1. data order
def batch_order(targets, dropout, tmp_path):
    """The examples (as input-id tuples) of every batch the training collated, in order."""
    model = peft_model(targets, dropout)
    collate = PadCollator(PAD)
    seen = []

    def recording(features):
        seen.append([tuple(f["input_ids"]) for f in features])
        return collate(features)

    settings = TrainSettings(max_steps=9, batch_size=4, logging_steps=1, eval_every=0, lr=1e-3)
    out = train_adapters(model, dataset(examples(12, seed=7)), recording, settings, seed=3, precision="fp32",
                         device=CPU, output_dir=tmp_path / "-".join(targets))
    assert out.steps == 9
    return seen


def test_data_order_same_for_every_strategy_across_epochs(tmp_path):
    # full and attention with LoRA dropout: their dropout masks draw different amounts of randomness
    first = batch_order(ALL, 0.1, tmp_path)
    second = batch_order(ATTENTION, 0.1, tmp_path)
    assert first == second
    training = first[-9:]  # three epochs of three batches (before them: the warm-up and check batches)
    epochs = [sorted(e for batch in training[i:i + 3] for e in batch) for i in (0, 3, 6)]
    assert epochs[0] == epochs[1] == epochs[2]  # every epoch sees every example once
    assert [training[i:i + 3] for i in (0, 3, 6)] != [training[0:3]] * 3  # and reshuffles


# ------------------------------------------------------------------------------- 2. loss normalisation
def recording_nll(batches):
    def nll(model, batch):
        if model.training and torch.is_grad_enabled():
            batches.append({k: v.detach().clone() for k, v in batch.items()})
        return token_nll(model, batch)
    return nll


def reference_token_mean(batches):
    """Sum over examples of (plain transformers loss of the example alone x its shifted labelled
    tokens) / total shifted labelled tokens, with the untrained base model (LoRA B starts at 0)."""
    model = tiny_llama()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
                n = int(mask.sum())
                ids, labels = ids[:n].unsqueeze(0), labels[:n].unsqueeze(0)
                tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
                if tokens:
                    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
                    total += loss.item() * tokens
                    count += tokens
    return total / count


def all_token_labels(rows):
    return [{**row, "labels": list(row["input_ids"])} for row in rows]


def unshifted_count(self, batch_samples, device):  # what other transformers versions count
    return sum((b["labels"] != IGNORE_INDEX).sum() for b in batch_samples).to(device)


# The Trainer's own count (num_items_in_batch) as this transformers version makes it, as other
# versions made it (unshifted labels: one more per row when label 0 is set), and absent; with
# response-only labels label 0 is never set, so "unshifted" equals "as-is" there.
@pytest.mark.parametrize("loss_on, trainer_count", [("all", "as-is"), ("all", "unshifted"), ("all", "none"),
                                                    ("response", "as-is"), ("response", "none")])
def test_step_loss_is_token_mean_over_the_accumulated_step(loss_on, trainer_count, tmp_path, monkeypatch):
    from transformers import Trainer

    if trainer_count == "unshifted":
        monkeypatch.setattr(Trainer, "_get_num_items_in_batch", unshifted_count)
    elif trainer_count == "none":
        monkeypatch.setattr(Trainer, "_get_num_items_in_batch", lambda self, batch_samples, device: None)
    rows = examples(16, seed=11)
    if loss_on == "all":
        rows = all_token_labels(rows)
    model = peft_model(ALL, dropout=0.0)
    batches = []
    settings = TrainSettings(max_steps=1, batch_size=4, grad_accum=2, logging_steps=1, eval_every=0, lr=1e-3)
    out = train_adapters(model, dataset(rows), PadCollator(PAD), settings, seed=0, precision="fp32", device=CPU,
                         output_dir=tmp_path / "t", nll_fn=recording_nll(batches))
    batches = batches[-2:]  # the two micro-batches of step 1
    assert len(batches) == 2 and sum(len(b["input_ids"]) for b in batches) == 8
    logged = [h["loss"] for h in out.log_history if "loss" in h][0]
    assert logged == pytest.approx(reference_token_mean(batches), rel=1e-5)
    assert out.label_tokens == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)


def test_target_count_follows_each_tasks_loss():
    from types import SimpleNamespace

    from loraplace.run.training import target_counter

    labels = torch.tensor([[5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, 8]])
    causal = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=False))
    seq2seq = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=True))
    assert int(target_counter(token_nll, causal)({"labels": labels})) == 3  # positions t >= 1
    assert int(target_counter(lambda m, b: None, seq2seq)({"labels": labels})) == 4  # every label
    assert int(target_counter(lambda m, b: None, causal)({"labels": torch.tensor([0, 2, 1])})) == 3  # classes

    def own(model, batch):
        return None
    own.count_targets = lambda batch: torch.tensor(42)
    assert int(target_counter(own, causal)({"labels": labels})) == 42


# ---------------------------------------------------------------------------- 3. selective logits guard
def scaled_logits_llama():
    """A tiny Llama whose forward doubles its logits, under no config key loraplace knows."""
    from transformers import LlamaForCausalLM

    class DoubledLogitsLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    config = tiny_llama().config
    torch.manual_seed(0)
    model = DoubledLogitsLlama(config).eval()
    model.config.use_cache = False
    return model


def test_selective_check_passes_on_a_plain_model():
    from loraplace.run.evaluation import check_selective_loss

    model = peft_model(ALL, dropout=0.1).train()
    selective, full = check_selective_loss(model, PadCollator(PAD)(examples(3)))
    assert selective == pytest.approx(full, rel=1e-5)
    assert model.training  # mode restored


def test_selective_check_fails_on_unknown_logit_post_processing():
    from loraplace.run.evaluation import SelectiveLossMismatch, check_selective_loss

    batch = PadCollator(PAD)(examples(3))
    with pytest.raises(SelectiveLossMismatch) as err:
        check_selective_loss(scaled_logits_llama(), batch)
    assert isinstance(err.value, LoraplaceError)
    message = str(err.value)
    assert "'llama'" in message and "post-processes its logits" in message
    assert len([w for w in message.split() if w.replace(".", "").isdigit()]) >= 2  # both values


def test_train_adapters_checks_selective_loss_before_training(tmp_path):
    from loraplace.run.evaluation import SelectiveLossMismatch

    model = peft_model(ALL, base=scaled_logits_llama())
    steps = []
    settings = TrainSettings(max_steps=2, batch_size=4, logging_steps=1, eval_every=0)
    with pytest.raises(SelectiveLossMismatch):
        train_adapters(model, dataset(examples(8)), PadCollator(PAD), settings, seed=0, precision="fp32",
                       device=CPU, output_dir=tmp_path / "t", on_step=lambda *a: steps.append(a))
    assert steps == []


# ------------------------------------------------------------------------------------------- 4. warm-up
def train_tiny(tmp_path, name, **kwargs):
    model = peft_model(ALL, dropout=0.1)
    settings = TrainSettings(max_steps=4, batch_size=4, logging_steps=1, eval_every=0, lr=1e-2)
    out = train_adapters(model, dataset(examples(12, seed=5)), PadCollator(PAD), settings, seed=0,
                         precision=kwargs.pop("precision", "fp32"), device=CPU, output_dir=tmp_path / name, **kwargs)
    return model, out


def test_warmup_changes_no_training_number(tmp_path):
    warm_model, warm = train_tiny(tmp_path, "warm", warmup=True)
    cold_model, cold = train_tiny(tmp_path, "cold", warmup=False)
    assert warm.warmup_seconds > 0 and cold.warmup_seconds == 0
    history = lambda out: [(h["loss"], h["grad_norm"]) for h in out.log_history if "loss" in h]
    assert history(warm) == history(cold) and len(history(warm)) == 4
    cold_params = dict(cold_model.named_parameters())
    for name, p in warm_model.named_parameters():
        assert torch.equal(p, cold_params[name]), name  # bit-identical adapters (and base)
        assert p.grad is None or not p.grad.any()


def test_warmup_is_untimed_and_runs_as_training(tmp_path, monkeypatch):
    import time

    import loraplace.run.training as training

    offset = [0.0]
    monkeypatch.setattr(training, "_clock", lambda: time.perf_counter() + offset[0])
    calls = []

    def nll(model, batch):
        if not calls:  # the first training-mode call is the warm-up: it "takes" 1000 s
            offset[0] += 1000.0
        base = model.get_base_model()
        calls.append((model.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),
                      base.config._attn_implementation, base.model.layers[0].mlp.up_proj.base_layer.weight.dtype))
        return token_nll(model, batch)

    _, out = train_tiny(tmp_path, "timed", nll_fn=nll, precision="bf16")
    assert out.warmup_seconds >= 1000.0
    assert out.seconds < 1000.0  # the warm-up is not in the training time
    assert len(calls) == 1 + 4
    assert calls[0] == calls[1] == (True, True, True, "eager", torch.bfloat16)  # as training
