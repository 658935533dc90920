"""What a study can train, as one registry of task records: :data:`TASKS` maps a task name to
its :class:`Task` (the transformers auto class, the PEFT task type, the data preparation, the
collator, the per-example loss and what the task reports), and :func:`task_of` says which task a
model's architecture implies. Adding a task is adding a record here.

* ``causal-lm`` (decoder-only models): data and collator in :mod:`loraplace.data`, loss
  :func:`loraplace.run.evaluation.token_nll` (selective logits, all-token sums for the report);
* ``seq2seq`` (encoder-decoder models such as T5 and BART): defined below;
* ``classification`` (encoder-only models such as BERT and RoBERTa): defined below.

Every task's loss gives the same per-example quantities, so training, evaluation and reports
need no task branches:

* ``nll_sum (B,)``: summed negative log-likelihood of the example's targets (labelled tokens,
  target tokens for seq2seq, the one class label for classification);
* ``n_tokens (B,)``: how many targets that is (1 for classification);
* ``correct (B,)``: classification only, 1 where the arg-max class is the label.

Seq2seq rows are the same Alpaca/chat rows as for causal LMs: the source is the conversation up
to the last assistant turn, the target that turn. Classification rows have a ``label`` column
(integers or strings) and a text column ``text`` or ``sentence``, or a pair such as
``sentence1``/``sentence2``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import datasets
import torch
import torch.nn.functional as F
from torch import nn

from loraplace.data import (
    IGNORE_INDEX,
    PadCollator,
    PreparedData,
    check_columns,
    encode_rows,
    load_rows,
    prepare_data,
    split_rows,
    to_messages,
)
from loraplace.errors import LoraplaceError
from loraplace.run.evaluation import token_nll

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


def prepare_seq2seq_data(dataset: str, tokenizer, *, eval_size: int, max_length: int, split_seed: int,
                         loss_on: str = "response", max_train_examples: int | None = None,
                         allow_fetch: bool = True, validation_size: int = 0) -> PreparedData:
    """Tokenized source/target pairs: ``input_ids`` (source), ``labels`` (target ids, the
    tokenizer's end-of-sequence token included), ``length``; both truncated to ``max_length``.
    ``loss_on`` is accepted for the common signature only: the loss is on the target by design."""
    rows = load_rows(dataset, allow_fetch=allow_fetch)
    check_columns(rows.column_names, dataset)
    train_rows, validation_rows, eval_rows = split_rows(
        rows, eval_size=eval_size, split_seed=split_seed, max_train_examples=max_train_examples, dataset=dataset,
        validation_size=validation_size)

    def encode(row):
        source, target = seq2seq_pair(to_messages(row))
        enc = tokenizer(source, text_target=target, truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "labels": enc["labels"],
                "length": len(enc["input_ids"]) + len(enc["labels"])}

    return PreparedData(train=encode_rows(train_rows, encode)[0], eval=encode_rows(eval_rows, encode)[0],
                        dropped=0, source_rows=len(rows),
                        validation=encode_rows(validation_rows, encode)[0] if validation_rows is not None else None)


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


def prepare_classification_data(dataset: str, tokenizer, *, eval_size: int, max_length: int, split_seed: int,
                                loss_on: str = "response", max_train_examples: int | None = None,
                                allow_fetch: bool = True, validation_size: int = 0) -> PreparedData:
    """Tokenized text (or text pairs) with integer class ``labels``; the class names are kept in
    :attr:`PreparedData.labels`. ``loss_on`` is accepted for the common signature only."""
    rows = load_rows(dataset, allow_fetch=allow_fetch)
    columns = text_columns(rows.column_names, dataset)
    names = label_names(rows)
    index = {name: i for i, name in enumerate(names)}
    train_rows, validation_rows, eval_rows = split_rows(
        rows, eval_size=eval_size, split_seed=split_seed, max_train_examples=max_train_examples, dataset=dataset,
        validation_size=validation_size)

    def encode(split):  # the whole split at once: batched tokenization is much faster
        texts = [list(split[c]) for c in columns]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        labels = [index[v] if isinstance(v, str) else int(v) for v in list(split[LABEL_COLUMN])]
        return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "labels": labels,
                                           "length": [len(x) for x in enc["input_ids"]]})

    return PreparedData(train=encode(train_rows), eval=encode(eval_rows), dropped=0, source_rows=len(rows),
                        labels=names, validation=encode(validation_rows) if validation_rows is not None else None)


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


# ---------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Task:
    """Everything that differs between the tasks a study can train.

    ``prepare(dataset, tokenizer, *, eval_size, max_length, split_seed, loss_on, max_train_examples,
    allow_fetch, validation_size) -> PreparedData``; ``collator(pad_token_id)`` batches its examples; ``nll(model,
    batch) -> (nll_sum (B,), n_tokens (B,)[, correct (B,)])`` is its per-example loss, used by both
    training and evaluation; ``check_columns(column_names, dataset)`` raises
    :class:`LoraplaceError` when a dataset lacks what ``prepare`` needs.
    """

    name: str
    description: str
    auto_class_name: str  # the transformers auto class that loads it (resolved lazily: see auto_class)
    peft_task_type: str  # PEFT's TaskType: which head PEFT leaves trainable (modules_to_save) and how it wraps
    check_columns: Callable[[list[str], str], Any]
    prepare: Callable[..., PreparedData]
    collator: Callable[[int], Callable]
    nll: Callable
    has_perplexity: bool  # exp(loss) is a perplexity (of tokens); False: a class label's cross-entropy
    all_token_sums: bool  # evaluation can also sum NLL over prompt and padding tokens (the report's check)
    selective_logits: bool  # nll projects to the vocabulary only at labelled positions: checked before use

    @property
    def auto_class(self) -> type:
        """The transformers auto class (``AutoModelForCausalLM``, ...); importing transformers is slow."""
        return getattr(importlib.import_module("transformers"), self.auto_class_name)


TASKS: dict[str, Task] = {task.name: task for task in (
    Task(name="causal-lm", description="next-token prediction, loss on the response tokens (decoder-only models)",
         auto_class_name="AutoModelForCausalLM", peft_task_type="CAUSAL_LM", check_columns=check_columns,
         prepare=prepare_data, collator=PadCollator, nll=token_nll,
         has_perplexity=True, all_token_sums=True, selective_logits=True),
    Task(name="seq2seq", description="source -> target generation (encoder-decoder models: T5, BART)",
         auto_class_name="AutoModelForSeq2SeqLM", peft_task_type="SEQ_2_SEQ_LM", check_columns=check_columns,
         prepare=prepare_seq2seq_data, collator=Seq2SeqCollator, nll=seq2seq_nll,
         has_perplexity=True, all_token_sums=False, selective_logits=False),
    Task(name="classification",
         description="sequence classification with a new head trained in full (encoder-only models: BERT, RoBERTa)",
         auto_class_name="AutoModelForSequenceClassification", peft_task_type="SEQ_CLS",
         check_columns=text_columns, prepare=prepare_classification_data, collator=ClassificationCollator,
         nll=classification_nll, has_perplexity=False, all_token_sums=False, selective_logits=False),
)}


def get_task(name: str) -> Task:
    """The task record called ``name``.

    Raises:
        LoraplaceError: no such task; lists the available names.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise LoraplaceError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}") from None


# Encoder-only architectures: planned (and trained) with a sequence-classification head.
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "deberta", "deberta-v2")


def task_of(config: Any) -> str:
    """The name of the task a model's architecture implies: ``seq2seq`` for encoder-decoder
    configs, ``classification`` for encoder-only ones, ``causal-lm`` otherwise."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if getattr(config, "model_type", None) in ENCODER_MODEL_TYPES:
        return "classification"
    return "causal-lm"


def check_task_columns(task: str, column_names: list[str], dataset: str) -> None:
    """Raise :class:`LoraplaceError` when a dataset lacks the columns task ``task`` (a name) needs."""
    get_task(task).check_columns(column_names, dataset)
