"""Seq2seq (T5/BART) and classification (BERT/RoBERTa) data and losses on tiny random models."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from loraplace.errors import LoraplaceError
from loraplace.tasks import (
    ClassificationCollator, Seq2SeqCollator, classification_nll, label_names, prepare_classification_data,
    prepare_seq2seq_data, seq2seq_nll, seq2seq_pair, text_columns,
)

from conftest import make_tokenizer


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
