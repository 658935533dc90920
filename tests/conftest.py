"""Shared fixtures: tiny random-init models with a tiny tokenizer, saved as local folders (no
downloads), and small Alpaca/chat data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained in memory (vocab 512) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [f"Add {a} and {b}. The answer is {a + b}. Write a response that completes the request."
              for a in range(30) for b in range(10)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def alpaca_rows(n: int = 48, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"instruction": f"Add {a} and {b}.", "input": "" if i % 3 else "Show the result.",
                     "output": f"The answer is {a + b}."})
    return rows


def save_tiny_llama(path: Path, hidden: int = 32, intermediate: int = 64, seed: int | None = None) -> Path:
    """A random-init 2-layer Llama with the tiny tokenizer, saved as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """The suite's tiny Llama, seeded: every session tests the same weights (a test that passes on some
    random models only would otherwise fail now and then)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 (Conv1D layers) whose tokenizer has no chat template (Alpaca prompt path)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = make_tokenizer(chat_template=None)
    torch.manual_seed(0)  # seeded, like tiny_llama_dir
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(alpaca_rows()))
    return path


@pytest.fixture(scope="session", autouse=True)
def _runs_in_this_process_by_default():
    """The suite's studies run in-process (``executor.isolate`` defaults to false here): a fresh
    process per run costs seconds of imports, ~100 runs over the suite. tests/test_isolated_runs.py
    sets ``executor.isolate`` (or ``LocalExecutor(isolate=True)``) explicitly."""
    from loraplace.config import ExecutorSettings, StudyConfig

    field = ExecutorSettings.model_fields["isolate"]
    default, field.default = field.default, False
    ExecutorSettings.model_rebuild(force=True)
    StudyConfig.model_rebuild(force=True)
    yield
    field.default = default
    ExecutorSettings.model_rebuild(force=True)
    StudyConfig.model_rebuild(force=True)


def score_then_plan(model_dir: Path, data: Path, score: str, out: Path, batch_size: int, monkeypatch):
    """``loraplace importance --score SCORE`` on two batches, then ``loraplace plan`` of ``attention``
    and ``auto[score=SCORE,step=1]~attention`` from the written scores (r=4, alpha=8): the written
    ``<score>.json`` and the plan's rows by strategy."""
    from typer.testing import CliRunner

    from loraplace.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    scored = CliRunner().invoke(app, ["importance", "-m", str(model_dir), "-d", str(data), "--score", score,
                                      "--batches", "2", "--batch-size", str(batch_size), "--max-length", "128",
                                      "--max-rank", "16", "--r", "4", "--eval-size", "8", "-o", str(out)])
    assert scored.exit_code == 0, scored.output
    planned = CliRunner().invoke(app, ["plan", "-m", str(model_dir), "-s", f"attention,auto[score={score},step=1]~attention",
                                       "--r", "4", "--alpha", "8", "--scores", str(out), "--json"])
    assert planned.exit_code == 0, planned.output
    written = json.loads((out / f"{score}.json").read_text())
    return written, {r["strategy"]: r for r in json.loads(planned.output)["strategies"]}
