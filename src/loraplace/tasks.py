"""Data and per-example loss of the two non-causal tasks: seq2seq (encoder-decoder models such as
T5 and BART) and sequence classification (encoder-only models such as BERT and RoBERTa).

Causal LMs use :mod:`loraplace.data` and :func:`loraplace.evaluation.token_nll`. Every task gives
the same per-example quantities, so training, evaluation and reports need no task branches:

* ``nll_sum (B,)``: summed negative log-likelihood of the example's targets (target tokens for
  seq2seq, the one class label for classification);
* ``n_tokens (B,)``: how many targets that is (target tokens; 1 for classification);
* ``correct (B,)``: classification only, 1 where the arg-max class is the label.

Seq2seq rows are the same Alpaca/chat rows as for causal LMs: the source is the conversation up
to the last assistant turn, the target that turn. Classification rows have a ``label`` column
(integers or strings) and a text column ``text`` or ``sentence``, or a pair such as
``sentence1``/``sentence2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplace.data import IGNORE_INDEX, PreparedData, load_rows, to_messages
from loraplace.errors import LoraplaceError

TEXT_COLUMNS = ("text", "sentence")
PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"),
                ("question1", "question2"))
LABEL_COLUMN = "label"


# ------------------------------------------------------------------------------------- seq2seq
def seq2seq_pair(messages: list[dict[str, str]]) -> tuple[str, str]:
    """``(source, target)`` of a chat: the turns before the last assistant turn, and that turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise LoraplaceError("a chat row has no assistant turn: nothing to use as the seq2seq target")
    before = messages[:last]
    source = before[0]["content"] if len(before) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in before)
    return source, messages[last]["content"]


def _split(rows, eval_size: int, split_seed: int, max_train_examples: int | None, dataset: str):
    if len(rows) <= eval_size:
        raise LoraplaceError(
            f"dataset {dataset!r} has {len(rows)} rows; data.eval_size={eval_size} leaves nothing to train on"
        )
    split = rows.train_test_split(test_size=eval_size, seed=split_seed, shuffle=True)
    train = split["train"]
    if max_train_examples is not None and len(train) > max_train_examples:
        train = train.select(range(max_train_examples))
    return train, split["test"]


def prepare_seq2seq_data(dataset: str, tokenizer, *, eval_size: int, max_length: int, split_seed: int,
                         max_train_examples: int | None = None, allow_fetch: bool = True) -> PreparedData:
    """Tokenized source/target pairs: ``input_ids`` (source), ``labels`` (target ids, the
    tokenizer's end-of-sequence token included), ``length``; both truncated to ``max_length``."""
    import datasets

    from loraplace.data import check_columns

    rows = load_rows(dataset, allow_fetch=allow_fetch)
    check_columns(rows.column_names, dataset)
    train_rows, eval_rows = _split(rows, eval_size, split_seed, max_train_examples, dataset)

    def encode(split):
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
        for row in split:
            source, target = seq2seq_pair(to_messages(row))
            enc = tokenizer(source, text_target=target, truncation=True, max_length=max_length)
            out["input_ids"].append(enc["input_ids"])
            out["labels"].append(enc["labels"])
            out["length"].append(len(enc["input_ids"]) + len(enc["labels"]))
        return datasets.Dataset.from_dict(out)

    return PreparedData(train=encode(train_rows), eval=encode(eval_rows), dropped=0, source_rows=len(rows))


@dataclass
class Seq2SeqCollator:
    """Pads sources with the pad id (mask 0) and targets with -100, each to its longest in the batch.

    Returns ``input_ids``, ``attention_mask``: ``(B, S)``; ``labels``: ``(B, T)``; all int64.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(features)
        src = max(len(f["input_ids"]) for f in features)
        tgt = max(len(f["labels"]) for f in features)
        batch = {
            "input_ids": torch.full((n, src), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((n, src), dtype=torch.long),
            "labels": torch.full((n, tgt), IGNORE_INDEX, dtype=torch.long),
        }
        for i, f in enumerate(features):
            batch["input_ids"][i, : len(f["input_ids"])] = torch.as_tensor(f["input_ids"])
            batch["attention_mask"][i, : len(f["input_ids"])] = 1
            batch["labels"][i, : len(f["labels"])] = torch.as_tensor(f["labels"])
        return batch


def seq2seq_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL ``(B,)`` and target-token count ``(B,)`` of a seq2seq batch (teacher forcing: the
    model shifts ``labels`` right into its decoder inputs, so position t predicts label t)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    labels = batch["labels"]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    mask = labels != IGNORE_INDEX
    return (nll * mask).sum(dim=1), mask.sum(dim=1)


# ------------------------------------------------------------------------------ classification
def text_columns(column_names: list[str], dataset: str) -> tuple[str, ...]:
    """The text column (or pair of columns) of a classification dataset.

    Raises:
        LoraplaceError: no ``label`` column or no known text column; names the expected ones.
    """
    pairs = [p for p in PAIR_COLUMNS if all(c in column_names for c in p)]
    singles = [c for c in TEXT_COLUMNS if c in column_names]
    if LABEL_COLUMN in column_names and (pairs or singles):
        return pairs[0] if pairs else (singles[0],)
    expected = ", ".join(TEXT_COLUMNS) + " or a pair " + ", ".join("/".join(p) for p in PAIR_COLUMNS)
    raise LoraplaceError(
        f"dataset {dataset!r} has columns {sorted(column_names)}; a classification study needs a "
        f"'{LABEL_COLUMN}' column and a text column ({expected})"
    )


def label_names(rows) -> list[str]:
    """Class names in label-id order: a ClassLabel's names, sorted distinct strings, or ``0..max``."""
    feature = rows.features[LABEL_COLUMN]
    if hasattr(feature, "names"):
        return list(feature.names)
    values = list(rows[LABEL_COLUMN])
    if all(isinstance(v, str) for v in values):
        return sorted(set(values))
    if not all(isinstance(v, int) and v >= 0 for v in values):
        raise LoraplaceError(f"column '{LABEL_COLUMN}' must hold class names or integers >= 0")
    return [str(i) for i in range(max(values) + 1)]


@dataclass
class ClassificationData(PreparedData):
    labels: list[str] | None = None  # class names, index = label id


def prepare_classification_data(dataset: str, tokenizer, *, eval_size: int, max_length: int, split_seed: int,
                                max_train_examples: int | None = None,
                                allow_fetch: bool = True) -> ClassificationData:
    """Tokenized text (or text pairs) with integer class ``labels``; the class names are kept."""
    import datasets

    rows = load_rows(dataset, allow_fetch=allow_fetch)
    columns = text_columns(rows.column_names, dataset)
    names = label_names(rows)
    index = {name: i for i, name in enumerate(names)}
    train_rows, eval_rows = _split(rows, eval_size, split_seed, max_train_examples, dataset)

    def encode(split):
        texts = [list(split[c]) for c in columns]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        labels = [index[v] if isinstance(v, str) else int(v) for v in list(split[LABEL_COLUMN])]
        return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "labels": labels,
                                           "length": [len(x) for x in enc["input_ids"]]})

    return ClassificationData(train=encode(train_rows), eval=encode(eval_rows), dropped=0,
                              source_rows=len(rows), labels=names)


@dataclass
class ClassificationCollator:
    """Pads text to its longest in the batch. Returns ``input_ids``, ``attention_mask``: ``(B, T)``
    and ``labels``: ``(B,)`` class ids; all int64."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n, longest = len(features), max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.full((n, longest), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((n, longest), dtype=torch.long),
            "labels": torch.tensor([int(f["labels"]) for f in features], dtype=torch.long),
        }
        for i, f in enumerate(features):
            batch["input_ids"][i, : len(f["input_ids"])] = torch.as_tensor(f["input_ids"])
            batch["attention_mask"][i, : len(f["input_ids"])] = 1
        return batch


def classification_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy ``(B,)`` of each example's label, a count of 1 each ``(B,)``, and whether the
    arg-max class is right ``(B,)``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # (B, C)
    nll = F.cross_entropy(logits, batch["labels"], reduction="none")
    return nll, torch.ones_like(batch["labels"]), (logits.argmax(dim=-1) == batch["labels"]).long()


# ---------------------------------------------------------------------------------- dispatch
PEFT_TASK_TYPE = {"causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "classification": "SEQ_CLS"}


def collator_for(task: str, pad_token_id: int):
    """The batch collator of a task (all pad to the longest example of the batch)."""
    from loraplace.data import PadCollator

    return {"causal-lm": PadCollator, "seq2seq": Seq2SeqCollator,
            "classification": ClassificationCollator}[task](pad_token_id)


def nll_for(task: str):
    """The per-example loss function of a task; None for causal LMs, whose
    :func:`loraplace.evaluation.token_nll` is the default everywhere."""
    return {"causal-lm": None, "seq2seq": seq2seq_nll, "classification": classification_nll}[task]


def check_task_columns(task: str, column_names: list[str], dataset: str) -> None:
    """Raise :class:`LoraplaceError` when a dataset lacks the columns its task needs."""
    from loraplace.data import check_columns

    if task == "classification":
        text_columns(column_names, dataset)
    else:
        check_columns(column_names, dataset)
