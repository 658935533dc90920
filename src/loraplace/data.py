"""Instruction data: loading (hub or local), prompt formatting, tokenization with label masking,
the fixed train/eval split of every task (:func:`split_rows`), and the causal-LM data and
dynamic-padding collator (the ``causal-lm`` task of :mod:`loraplace.run.tasks`).

Rows come in Alpaca form (``instruction``, optional ``input``, ``output``) or chat form
(``messages``: a list of ``{"role", "content"}``). Alpaca rows become a two-message chat. The
text is rendered with the tokenizer's chat template when it has one, else with the Alpaca
prompt template. Labels are the token ids on assistant text and -100 elsewhere (``loss_on:
response``) or everywhere (``loss_on: all``); padding is always -100.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import torch

from loraplace import assets
from loraplace.errors import LoraplaceError

IGNORE_INDEX = -100
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
ALPACA_COLUMNS = ("instruction", "output")  # "input" is optional
CHAT_COLUMN = "messages"

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def load_rows(dataset: str, allow_fetch: bool = True):
    """A ``datasets.Dataset`` of raw rows from an embedded alias, local file/folder, or hub id.

    A local file that holds no rows, or that cannot be read, fails with a message that names the
    file and, for JSON files, the line (and column) of the first problem.
    """
    if dataset in (assets.EMBEDDED_DATASET, f"embedded:{assets.EMBEDDED_DATASET}"):
        dataset = str(assets.ensure_dataset(allow_fetch=allow_fetch))
    path = Path(dataset)
    if path.is_file():
        return _load_local_file(dataset, path)
    try:
        if path.is_dir():
            return datasets.load_dataset(str(path), split="train")
        if path.suffix.lower() in LOCAL_BUILDERS or dataset.startswith((".", "/", "~")):
            raise LoraplaceError(f"dataset file {dataset!r} not found")
        return datasets.load_dataset(dataset, split="train")
    except LoraplaceError:
        raise
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoraplaceError(
            f"could not load dataset {dataset!r}: {first}. Give a hub id (e.g. tatsu-lab/alpaca) or a "
            "local .json/.jsonl/.csv/.parquet file"
        ) from None


def _load_local_file(dataset: str, path: Path):

    suffix = path.suffix.lower()
    builder = LOCAL_BUILDERS.get(suffix)
    if builder is None:
        raise LoraplaceError(
            f"dataset file {dataset!r} has an unsupported extension; use one of " + ", ".join(LOCAL_BUILDERS)
        )
    no_rows = f"dataset file {dataset!r} holds no rows"
    if path.stat().st_size == 0:
        raise LoraplaceError(f"{no_rows} (it is empty)")
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - datasets wraps the reader's error in DatasetGenerationError
        if builder == "json":
            problem = _json_problem(path)
        elif builder == "csv" and not path.read_bytes().strip():
            problem = "holds no rows (it has only blank lines)"
        else:
            problem = None
        if problem is None:
            # datasets' "no data" errors: StopIteration, or ValueError 'Instruction "train" corresponds to no data'
            if isinstance(e, StopIteration) or "corresponds to no data" in str(e):
                raise LoraplaceError(no_rows) from None
            problem = _root_cause(e)
        raise LoraplaceError(f"dataset file {dataset!r} {problem}") from None
    if len(rows) == 0:
        raise LoraplaceError(no_rows)
    return rows


def _root_cause(e: BaseException) -> str:
    """The innermost error's first line: datasets' own message ("An error occurred while
    generating the dataset") says nothing about what was wrong."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            break
        e = nxt
    first = (str(e).strip().splitlines() or [""])[0]
    return f"could not be read: {type(e).__name__}" + (f": {first}" if first else "")


def _json_problem(path: Path) -> str | None:
    """What is wrong with a .json/.jsonl file, as "line N: ...", "holds no rows", or None.

    A file is read as one JSON document (an array of row objects, or an object) and, when that
    fails and it does not start with '[', as JSON lines (one object per non-blank line), which is
    how ``datasets`` reads both extensions.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return f"line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset {e.start})"
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        return "holds no rows (it has only blank lines)"

    def duplicate_keys(pairs):
        keys = [k for k, _ in pairs]
        for k in keys:
            if keys.count(k) > 1:
                raise _DuplicateKey(k)
        return dict(pairs)

    def row_problem(row, where: str) -> str | None:
        if not isinstance(row, dict):
            return f"{where}: a row must be a JSON object ({{...}}), got {_json_type(row)}"
        return None

    def parse(source: str, line: int | None):
        """``(value, None)``, or ``(None, problem)``; ``line``: the line ``source`` is (JSON lines)."""
        try:
            return json.loads(source, object_pairs_hook=duplicate_keys), None
        except _DuplicateKey as e:
            where = f"line {line}: key" if line else "has a row where key"
            return None, f"{where} {e.args[0]!r} appears twice"
        except json.JSONDecodeError as e:
            return None, f"line {line or e.lineno}: not valid JSON ({e.msg}: column {e.colno})"

    if text.lstrip().startswith("["):
        rows, problem = parse(text, None)
        if problem:
            return problem
        if not rows:
            return "holds no rows (an empty JSON array)"
        for i, row in enumerate(rows):
            problem = row_problem(row, f"array item {i}")
            if problem:
                return problem
        return None
    document, problem = parse(text, None)  # one JSON document (a single object, possibly over several lines)
    if problem is None:
        return row_problem(document, "line 1")
    rows_seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row, problem = parse(line, number)
        problem = problem or row_problem(row, f"line {number}")
        if problem:
            return problem
        rows_seen += 1
    return None if rows_seen else "holds no rows"


class _DuplicateKey(Exception):
    pass


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """One row as a chat: Alpaca rows become [user, assistant]."""
    if CHAT_COLUMN in row and row[CHAT_COLUMN] is not None:
        return [{"role": m["role"], "content": m["content"]} for m in row[CHAT_COLUMN]]
    user = row["instruction"].strip()
    extra = (row.get("input") or "").strip()
    if extra:
        user = f"{user}\n\n{extra}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"].strip()}]


def check_columns(column_names: list[str], dataset: str) -> None:
    if CHAT_COLUMN in column_names or all(c in column_names for c in ALPACA_COLUMNS):
        return
    raise LoraplaceError(
        f"dataset {dataset!r} has columns {sorted(column_names)}; expected Alpaca columns "
        "'instruction', 'output' (and optionally 'input') or a chat column 'messages'"
    )


def render(messages: list[dict[str, str]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The training text of a chat and the character spans of its assistant turns.

    With a chat template, each assistant span is the text that rendering up to and including
    that turn adds to the rendering of the turns before it with a generation prompt.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise LoraplaceError(
                    "the tokenizer's chat template does not render turns as prefixes of each other, so "
                    "response tokens cannot be located; set train.loss_on=all"
                )
            spans.append((len(prefix), len(upto)))
        return text, spans
    # No chat template: the Alpaca prompt; multi-turn chats are flattened turn by turn.
    text, spans = tokenizer.bos_token or "", []
    user_parts: list[str] = []
    for message in messages:
        if message["role"] != "assistant":
            user_parts.append(message["content"])
            continue
        text += ALPACA_PROMPT.format(ctx="", instruction="\n\n".join(user_parts), input_block="")
        start = len(text)
        text += message["content"] + (tokenizer.eos_token or "")
        spans.append((start, len(text)))
        text += "\n\n"
        user_parts = []
    return text, spans


def tokenize_example(messages, tokenizer, max_length: int, loss_on: str) -> dict[str, list[int]] | None:
    """``input_ids`` and ``labels`` (lists of length <= max_length) for one chat, or None when
    truncation leaves no labelled token."""
    text, spans = render(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    if loss_on == "all":
        labels = list(ids)
    else:
        labels = [
            tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
            for tok, (start, _end) in zip(ids, enc["offset_mapping"])
        ]
    # Position 0 is never a prediction target in a causal LM: require a label after it.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


@dataclass
class PreparedData:
    """Tokenized train, validation and eval splits, identical for every run of a study (any task).
    ``eval`` is what results report (the test split of a study with a validation split);
    ``validation`` (None without ``data.validation_size``) is what choices are made on."""

    train: Any  # datasets.Dataset with input_ids, labels, length
    eval: Any
    dropped: int  # examples with no labelled token left after truncation
    source_rows: int
    labels: list[str] | None = None  # classification: class names, index = label id; None otherwise
    validation: Any = None


def split_rows(rows, *, eval_size: int, split_seed: int, max_train_examples: int | None, dataset: str,
               validation_size: int = 0):
    """The fixed split every task's data preparation uses: ``(train_rows, validation_rows, eval_rows)``.

    ``eval_size`` rows are held out by a seeded shuffle (``split_seed``), before tokenization, so
    the eval split depends only on the dataset and the seed, and is the same rows with or without
    a validation split. ``validation_size`` rows (None when 0) are then held out of the rest by a
    second seeded shuffle, and the train rows are cut to the first ``max_train_examples`` when
    given. The three are disjoint by construction (each split of a ``train_test_split``).

    Raises:
        LoraplaceError: ``eval_size`` and ``validation_size`` leave no row to train on.
    """
    if len(rows) <= eval_size + validation_size:
        held = f"data.eval_size={eval_size}" + (f" with data.validation_size={validation_size}" if validation_size else "")
        raise LoraplaceError(f"dataset {dataset!r} has {len(rows)} rows; {held} leaves nothing to train on")
    split = rows.train_test_split(test_size=eval_size, seed=split_seed, shuffle=True)
    train, validation = split["train"], None
    if validation_size:
        inner = train.train_test_split(test_size=validation_size, seed=split_seed + 1, shuffle=True)
        train, validation = inner["train"], inner["test"]
    if max_train_examples is not None and len(train) > max_train_examples:
        train = train.select(range(max_train_examples))
    return train, validation, split["test"]


EXAMPLE_COLUMNS = ("input_ids", "labels", "length")  # what every task's tokenized example holds


def encode_rows(rows, encode: Callable[[dict[str, Any]], dict[str, Any] | None]) -> tuple[Any, int]:
    """``(datasets.Dataset, dropped)``: ``encode(row)`` of every row (a dict with the
    :data:`EXAMPLE_COLUMNS`), leaving out and counting the rows it returns None for."""
    out: dict[str, list] = {column: [] for column in EXAMPLE_COLUMNS}
    dropped = 0
    for row in rows:
        example = encode(row)
        if example is None:
            dropped += 1
            continue
        for column in EXAMPLE_COLUMNS:
            out[column].append(example[column])
    return datasets.Dataset.from_dict(out), dropped


def prepare_data(dataset: str, tokenizer, *, eval_size: int, max_length: int, split_seed: int,
                 loss_on: str = "response", max_train_examples: int | None = None,
                 allow_fetch: bool = True, validation_size: int = 0) -> PreparedData:
    """Causal-LM data: load, split (:func:`split_rows`) and tokenize a dataset; each example's
    ``labels`` are its tokens where ``loss_on`` says (:func:`tokenize_example`)."""
    rows = load_rows(dataset, allow_fetch=allow_fetch)
    check_columns(rows.column_names, dataset)
    train_rows, validation_rows, eval_rows = split_rows(
        rows, eval_size=eval_size, split_seed=split_seed, max_train_examples=max_train_examples, dataset=dataset,
        validation_size=validation_size)

    def encode(row):
        ex = tokenize_example(to_messages(row), tokenizer, max_length, loss_on)
        return None if ex is None else {**ex, "length": len(ex["input_ids"])}

    (train, dropped_train), (eval_, dropped_eval) = encode_rows(train_rows, encode), encode_rows(eval_rows, encode)
    validation, dropped_validation = encode_rows(validation_rows, encode) if validation_rows is not None else (None, 0)
    return PreparedData(train=train, eval=eval_, dropped=dropped_train + dropped_eval + dropped_validation,
                        source_rows=len(rows), validation=validation)


@dataclass
class PadCollator:
    """Pads a batch to its longest example (not to max_length): labels with -100, attention mask 0.

    Returns ``input_ids``, ``attention_mask``, ``labels``: each ``(batch, longest)`` int64.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = {
            "input_ids": torch.full((len(features), longest), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), longest), dtype=torch.long),
            "labels": torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long),
        }
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(f["input_ids"])
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.as_tensor(f["labels"])
        return batch
