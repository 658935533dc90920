"""Seq2seq (T5/BART) and classification (BERT/RoBERTa) data and losses on tiny random models."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer

from loraplace.errors import LoraplaceError
from loraplace.run.tasks import (
    TASKS,
    ClassificationCollator,
    Seq2SeqCollator,
    classification_nll,
    get_task,
    label_names,
    prepare_classification_data,
    prepare_seq2seq_data,
    seq2seq_nll,
    seq2seq_pair,
    task_of,
    text_columns,
)


def tiny_t5(vocab: int):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0, pad_token_id=0))


def tiny_bert(vocab: int, num_labels: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    num_labels=num_labels, pad_token_id=0))


# ------------------------------------------------------------------------------------ the registry
def test_unknown_task_names_the_available_ones():
    with pytest.raises(LoraplaceError, match="unknown task 'regression'; available tasks: causal-lm, seq2seq, "
                                             "classification"):
        get_task("regression")


def test_every_task_record_is_complete_and_the_config_lists_exactly_them():
    import dataclasses
    from typing import get_args

    from loraplace.config import TaskChoice
    from loraplace.run.evaluation import token_nll

    for name, task in TASKS.items():
        assert task.name == name and get_task(name) is task
        assert all(getattr(task, f.name) not in (None, "") for f in dataclasses.fields(task)), name
        assert task.auto_class.__name__ == task.auto_class_name
        assert callable(task.prepare) and callable(task.nll) and callable(task.check_columns)
        assert task.collator(7).pad_token_id == 7
    assert set(get_args(TaskChoice)) == {"auto", *TASKS}
    causal = get_task("causal-lm")
    assert causal.nll is token_nll and causal.all_token_sums and causal.selective_logits
    assert [t.name for t in TASKS.values() if t.has_perplexity] == ["causal-lm", "seq2seq"]
    assert {t.name: t.peft_task_type for t in TASKS.values()} == {
        "causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "classification": "SEQ_CLS"}


def test_task_of_follows_the_architecture():
    from transformers import BertConfig, LlamaConfig, T5Config

    assert task_of(T5Config()) == "seq2seq"
    assert task_of(BertConfig()) == "classification"
    assert task_of(LlamaConfig()) == "causal-lm"


def test_seq2seq_pair_takes_the_last_assistant_turn():
    assert seq2seq_pair([{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "3"}]) == (
        "Add 1 and 2.", "3")
    source, target = seq2seq_pair([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])
    assert (source, target) == ("user: a\nassistant: b\nuser: c", "d")
    with pytest.raises(LoraplaceError, match="no assistant turn"):
        seq2seq_pair([{"role": "user", "content": "a"}])


def test_seq2seq_nll_matches_the_models_own_loss(alpaca_file):
    tok = make_tokenizer()
    data = prepare_seq2seq_data(str(alpaca_file), tok, eval_size=8, max_length=32, split_seed=0)
    assert len(data.train) == 40 and len(data.eval) == 8
    batch = Seq2SeqCollator(tok.pad_token_id)([data.eval[i] for i in range(4)])
    model = tiny_t5(len(tok)).eval()
    with torch.no_grad():
        nll, n = seq2seq_nll(model, batch)
        mean = model(**batch).loss  # transformers' token-mean cross-entropy over the batch
    assert n.tolist() == [len(data.eval[i]["labels"]) for i in range(4)]
    assert float(nll.sum() / n.sum()) == pytest.approx(float(mean), rel=1e-5)


def test_classification_columns_and_labels(tmp_path):
    import datasets

    assert text_columns(["sentence1", "sentence2", "label"], "x") == ("sentence1", "sentence2")
    assert text_columns(["text", "label"], "x") == ("text",)
    with pytest.raises(LoraplaceError, match=r"needs a 'label' column and a text column \(text, sentence"):
        text_columns(["instruction", "output"], "x")
    rows = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]})
    assert label_names(rows) == ["neg", "pos"]
    rows = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 2]})
    assert label_names(rows) == ["0", "1", "2"]


def test_classification_nll_is_cross_entropy_with_accuracy(tmp_path):
    path = tmp_path / "sst.jsonl"
    path.write_text("\n".join(json.dumps({"sentence": f"Add {i} and {i}.", "label": ["neg", "pos"][i % 2]})
                              for i in range(30)))
    tok = make_tokenizer()
    data = prepare_classification_data(str(path), tok, eval_size=6, max_length=32, split_seed=0)
    assert data.labels == ["neg", "pos"] and set(data.train["labels"]) <= {0, 1}
    batch = ClassificationCollator(tok.pad_token_id)([data.eval[i] for i in range(6)])
    assert batch["labels"].shape == (6,)
    model = tiny_bert(len(tok), 2).eval()
    with torch.no_grad():
        nll, n, correct = classification_nll(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert n.tolist() == [1] * 6
    assert float(nll.mean()) == pytest.approx(float(F.cross_entropy(logits, batch["labels"])), rel=1e-5)
    assert correct.tolist() == (logits.argmax(-1) == batch["labels"]).long().tolist()
    assert 0 < float(nll.mean()) < 2 * math.log(2)


def _save(model, path):
    tok = make_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _run(*args):
    from typer.testing import CliRunner

    from loraplace.cli import app

    # float32: the base row's numbers are compared with plain transformers' (no autocast)
    result = CliRunner().invoke(app, ["run", *args, "train.max_steps=2", "train.batch_size=4", "data.eval_size=8",
                                      "train.eval_every=1", "include_base=true", "train.precision=fp32"])
    assert result.exit_code == 0, result.output
    return result


def _examples(out, run_id):
    return json.loads((out / "runs" / run_id / "eval_examples.json").read_text())


def test_t5_seq2seq_study_end_to_end(tmp_path):
    from conftest import alpaca_rows
    from transformers import AutoModelForSeq2SeqLM

    # targets of different lengths, so that a per-example mean differs from the token-weighted one
    rows = alpaca_rows()
    for i, row in enumerate(rows):
        row["output"] += " Write a response that completes the request." * (i % 3)
    alpaca_file = tmp_path / "alpaca.json"
    alpaca_file.write_text(json.dumps(rows))
    model_dir = _save(tiny_t5(len(make_tokenizer())), tmp_path / "t5")
    out = tmp_path / "s"
    _run("--model", str(model_dir), "--dataset", str(alpaca_file), "-o", str(out),
         "strategies=self-attention,cross-attention,ffn")
    runs = {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert all(r["status"] == "ok" and r["task"] == "seq2seq" for r in runs.values()), runs
    cross = set(runs["cross-attention-s0"]["modules"])
    assert cross == {f"decoder.block.{i}.layer.1.EncDecAttention.{p}" for i in range(2) for p in "qkvo"}
    assert all(".EncDecAttention." not in m for m in runs["self-attention-s0"]["modules"])
    # The base row against transformers' own loss: the saved model, one eval example at a time,
    # model(input_ids, labels=...).loss (token mean) weighted by the example's target tokens.
    data = prepare_seq2seq_data(str(alpaca_file), make_tokenizer(), eval_size=8, max_length=256, split_seed=1234)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    nll, counts = [], []
    with torch.no_grad():
        for row in data.eval:
            labels = torch.tensor([row["labels"]])
            nll.append(float(model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss) * labels.numel())
            counts.append(labels.numel())
    assert len(set(counts)) > 1
    base = runs["base"]
    assert _examples(out, "base")["n_tokens"] == counts and base["eval_tokens"] == sum(counts)
    assert _examples(out, "base")["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert base["eval_loss"] == pytest.approx(sum(nll) / sum(counts), rel=1e-5)
    assert base["perplexity"] == pytest.approx(math.exp(sum(nll) / sum(counts)), rel=1e-5)
    for r in runs.values():
        # every arm: the loss and perplexity are those of its per-example sums, on the same tokens
        examples = _examples(out, r["run_id"])
        assert examples["n_tokens"] == counts
        assert r["eval_loss"] == pytest.approx(sum(examples["nll_sum"]) / sum(counts), rel=1e-9)
        assert r["perplexity"] == pytest.approx(math.exp(sum(examples["nll_sum"]) / sum(counts)), rel=1e-9)
        assert r["eval_accuracy"] is None
    assert runs["ffn-s0"]["eval_loss"] != base["eval_loss"]  # the arms trained
    assert runs["ffn-s0"]["head_params"] == 0
    assert (out / "report" / "report.md").is_file()


def test_bert_classification_study_end_to_end(tmp_path):
    path = tmp_path / "sst.jsonl"
    path.write_text("\n".join(json.dumps({"sentence": f"Add {i} and {i}.", "label": ["neg", "pos"][i % 2]})
                              for i in range(40)))
    tok = make_tokenizer()
    model_dir = _save(tiny_bert(len(tok), 2), tmp_path / "bert")
    out = tmp_path / "s"
    _run("--model", str(model_dir), "--dataset", str(path), "-o", str(out), "strategies=attention,ffn")
    runs = {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert all(r["status"] == "ok" and r["task"] == "classification" for r in runs.values()), runs
    # hidden 32, 2 classes: the new head (dense 32x32+32, out_proj... for BERT: classifier 32*2+2) trains in full
    attn = runs["attention-s0"]
    assert attn["head_params"] == 32 * 2 + 2
    assert attn["trainable_params"] == attn["head_params"] + 2 * 4 * 16 * (32 + 32)
    # The base row against the saved model run by plain transformers on the eval split (rebuilt
    # here with datasets: split seed 1234, labels in sorted-name order), one example at a time.
    import datasets
    from transformers import AutoModelForSequenceClassification

    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    eval_rows = rows.train_test_split(test_size=8, seed=1234, shuffle=True)["test"]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    nll, correct = [], []
    with torch.no_grad():
        for row in eval_rows:
            logits = model(input_ids=torch.tensor([tok(row["sentence"])["input_ids"]])).logits[0]
            label = ["neg", "pos"].index(row["label"])
            nll.append(float(F.cross_entropy(logits, torch.tensor(label))))
            correct.append(int(logits.argmax()) == label)
    base = runs["base"]
    assert _examples(out, "base")["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert base["eval_loss"] == pytest.approx(sum(nll) / 8, rel=1e-5)
    assert base["eval_accuracy"] == sum(correct) / 8
    for r in runs.values():
        examples = _examples(out, r["run_id"])
        assert examples["n_tokens"] == [1] * 8 and len(examples["correct"]) == 8
        assert r["eval_accuracy"] == sum(examples["correct"]) / 8 and r["perplexity"] is None
        assert r["eval_loss"] == pytest.approx(sum(examples["nll_sum"]) / 8, rel=1e-9)
    assert runs["attention-s0"]["eval_loss"] != base["eval_loss"]  # the arms trained
    assert (out / "report" / "report.md").is_file()


def test_classification_study_needs_label_and_text_columns(tmp_path, alpaca_file):
    from typer.testing import CliRunner

    from loraplace.cli import app

    model_dir = _save(tiny_bert(len(make_tokenizer()), 2), tmp_path / "bert")
    result = CliRunner().invoke(app, ["run", "--model", str(model_dir), "--dataset", str(alpaca_file),
                                      "-o", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "needs a 'label' column and a text column" in result.output
