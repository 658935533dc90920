import json

import pytest
import torch
from conftest import alpaca_rows, make_tokenizer

from loraplace.data import (
    IGNORE_INDEX,
    PadCollator,
    check_columns,
    load_rows,
    prepare_data,
    render,
    split_rows,
    to_messages,
    tokenize_example,
)
from loraplace.errors import LoraplaceError


def test_alpaca_row_becomes_a_two_turn_chat():
    assert to_messages({"instruction": "Add 1 and 2.", "input": "Be brief.", "output": " 3 "}) == [
        {"role": "user", "content": "Add 1 and 2.\n\nBe brief."},
        {"role": "assistant", "content": "3"},
    ]
    assert to_messages({"instruction": "Hi", "input": "", "output": "Hello"})[0]["content"] == "Hi"


def test_response_only_labels_cover_exactly_the_assistant_turn():
    tok = make_tokenizer()
    messages = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "The answer is 5."}]
    ex = tokenize_example(messages, tok, max_length=128, loss_on="response")
    labelled = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    # The labelled tokens decode to the response plus the end-of-turn marker: the model learns to stop.
    assert tok.decode(labelled) == "The answer is 5.<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ex["input_ids"], ex["labels"]))
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex["input_ids"]).startswith(prompt)


def test_all_tokens_loss_labels_everything():
    tok = make_tokenizer()
    messages = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    ex = tokenize_example(messages, tok, max_length=128, loss_on="all")
    assert ex["labels"] == ex["input_ids"]


def test_multi_turn_chat_labels_every_assistant_turn():
    tok = make_tokenizer()
    messages = [{"role": "user", "content": "Add 1 and 1."}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}]
    ex = tokenize_example(messages, tok, max_length=256, loss_on="response")
    labelled = tok.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX])
    assert labelled == "2<|im_end|>\n4<|im_end|>\n"


def test_alpaca_template_without_chat_template():
    tok = make_tokenizer(chat_template=None)
    text, spans = render([{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "3"}], tok)
    assert "### Instruction:\nAdd 1 and 2.\n\n### Response:\n" in text
    assert [text[s:e] for s, e in spans] == ["3" + tok.eos_token]


def test_truncation_that_leaves_no_label_drops_the_example():
    tok = make_tokenizer()
    messages = [{"role": "user", "content": "Add 1 and 2. " * 40}, {"role": "assistant", "content": "3"}]
    assert tokenize_example(messages, tok, max_length=16, loss_on="response") is None


def test_split_is_fixed_and_disjoint(alpaca_file):
    tok = make_tokenizer()
    a = prepare_data(str(alpaca_file), tok, eval_size=8, max_length=64, loss_on="response", split_seed=1)
    b = prepare_data(str(alpaca_file), tok, eval_size=8, max_length=64, loss_on="response", split_seed=1)
    assert len(a.eval) == 8 and len(a.train) == 40
    assert a.eval["input_ids"] == b.eval["input_ids"] and a.train["input_ids"] == b.train["input_ids"]
    assert not {tuple(x) for x in a.eval["input_ids"]} & {tuple(x) for x in a.train["input_ids"]}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_formats_load(tmp_path, suffix):
    import pandas as pd

    path = tmp_path / f"rows{suffix}"
    frame = pd.DataFrame(alpaca_rows(12))
    {".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".csv": lambda: frame.to_csv(path, index=False),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    rows = load_rows(str(path))
    assert len(rows) == 12 and set(rows.column_names) >= {"instruction", "output"}


def test_chat_form_dataset(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Add {i} and 1."},
                                                       {"role": "assistant", "content": str(i + 1)}]})
                              for i in range(20)))
    data = prepare_data(str(path), make_tokenizer(), eval_size=4, max_length=64, loss_on="response", split_seed=0)
    assert len(data.train) == 16


def test_missing_columns_name_the_expected_ones(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"prompt": "x", "completion": "y"}] * 5))
    with pytest.raises(LoraplaceError, match=r"columns \['completion', 'prompt'\]; expected Alpaca columns "
                                             r"'instruction', 'output'.*'messages'"):
        prepare_data(str(path), make_tokenizer(), eval_size=1, max_length=64, loss_on="response", split_seed=0)
    with pytest.raises(LoraplaceError, match="columns"):
        check_columns(["text"], "x")


def test_missing_file_and_unknown_dataset(tmp_path):
    with pytest.raises(LoraplaceError, match="not found"):
        load_rows(str(tmp_path / "nope.json"))
    with pytest.raises(LoraplaceError, match="unsupported extension"):
        (tmp_path / "rows.txt").write_text("x")
        load_rows(str(tmp_path / "rows.txt"))


def test_eval_size_must_leave_training_rows(alpaca_file):
    with pytest.raises(LoraplaceError, match="leaves nothing to train on"):
        prepare_data(str(alpaca_file), make_tokenizer(), eval_size=48, max_length=64, loss_on="response", split_seed=0)


def test_collator_pads_to_longest_with_ignored_labels():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


@pytest.mark.parametrize("name,content,detail", [
    ("empty.jsonl", "", "it is empty"),
    ("empty.json", "", "it is empty"),
    ("array.json", "[]\n", "an empty JSON array"),
    ("blank.jsonl", "\n  \n\n", "only blank lines"),
    ("blank.json", "\n\n", "only blank lines"),
    ("empty.csv", "", "it is empty"),
    ("header.csv", "instruction,output\n", None),
])
def test_a_file_without_rows_is_named(tmp_path, name, content, detail):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LoraplaceError) as info:
        load_rows(str(path))
    message = str(info.value)
    assert f"dataset file {str(path)!r} holds no rows" in message
    if detail:
        assert detail in message


def _alpaca_lines(n):
    return [json.dumps(row) for row in alpaca_rows(n)]


def test_a_malformed_jsonl_line_is_named_with_its_number_and_column(tmp_path):
    lines = _alpaca_lines(9)
    lines[6] = '{"instruction": "x" "output": "y"}'  # line 7: a missing comma after column 19
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected = f"dataset file {str(path)!r} line 7: not valid JSON (Expecting ',' delimiter: column 21)"
    with pytest.raises(LoraplaceError) as info:
        load_rows(str(path))
    assert str(info.value) == expected
    # The column is the position of the first character after the string "x" (1-based).
    assert lines[6][21 - 1] == '"' and lines[6][: 21 - 1].endswith('"x" ')


def test_blank_lines_do_not_shift_the_reported_line(tmp_path):
    lines = _alpaca_lines(3) + ["", "", '{"instruction": "x", "output": }']
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(LoraplaceError, match=r"line 6: not valid JSON \(Expecting value: column 32\)"):
        load_rows(str(path))


def test_a_jsonl_row_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(_alpaca_lines(4) + ['["instruction", "output"]'] + _alpaca_lines(2)))
    with pytest.raises(LoraplaceError, match=r"'.*data\.jsonl' line 5: a row must be a JSON object .*got an array"):
        load_rows(str(path))


def test_a_jsonl_row_with_a_repeated_key_is_named(tmp_path):
    # pyarrow (and so datasets) cannot load a row whose key appears twice.
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(_alpaca_lines(2) + ['{"instruction": "a", "output": "b", "output": "c"}']))
    with pytest.raises(LoraplaceError, match=r"line 3: key 'output' appears twice"):
        load_rows(str(path))


def test_a_json_array_syntax_error_is_named_with_line_and_column(tmp_path):
    path = tmp_path / "data.json"
    text = json.dumps(alpaca_rows(3), indent=1)
    lines = text.splitlines()
    bad = next(i for i, line in enumerate(lines) if '"output"' in line)
    lines[bad] = lines[bad].replace('"output":', '"output"')  # drop the colon
    path.write_text("\n".join(lines))
    column = lines[bad].index('"output"') + len('"output"') + 2  # 1-based column after the key and a space
    with pytest.raises(LoraplaceError) as info:
        load_rows(str(path))
    assert str(info.value) == (f"dataset file {str(path)!r} line {bad + 1}: not valid JSON "
                               f"(Expecting ':' delimiter: column {column})")


def test_a_json_array_item_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(alpaca_rows(2) + ["just text"]))
    with pytest.raises(LoraplaceError, match=r"array item 2: a row must be a JSON object .*got a string"):
        load_rows(str(path))


def test_a_utf16_file_is_named_as_not_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes("\n".join(_alpaca_lines(2)).encode("utf-16"))  # starts with the BOM ff fe
    with pytest.raises(LoraplaceError, match=r"'.*data\.jsonl' line 1: not UTF-8 text \(byte 0xff at byte offset 0\)"):
        load_rows(str(path))


def test_an_unreadable_csv_names_the_file_and_the_reader_error(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('instruction,output\n"unterminated,x\n')
    with pytest.raises(LoraplaceError, match=r"dataset file '.*data\.csv' could not be read: \w+: .*EOF inside string"):
        load_rows(str(path))


@pytest.mark.parametrize("layout", ["jsonl", "json-array", "json-lines-in-.json"])
def test_valid_json_files_still_load_every_row(tmp_path, layout):
    rows = alpaca_rows(7)
    suffix = ".jsonl" if layout == "jsonl" else ".json"
    path = tmp_path / f"data{suffix}"
    path.write_text(json.dumps(rows, indent=2) if layout == "json-array" else
                    "\n".join(json.dumps(r) for r in rows) + "\n\n")
    loaded = load_rows(str(path))
    assert [dict(r) for r in loaded.select_columns(list(rows[0]))] == rows


def test_three_way_split_is_disjoint_and_keeps_the_eval_rows():
    import datasets

    rows = datasets.Dataset.from_list([{"i": i} for i in range(60)])
    train2, none, eval2 = split_rows(rows, eval_size=10, split_seed=3, max_train_examples=None, dataset="d")
    train, validation, test = split_rows(rows, eval_size=10, split_seed=3, max_train_examples=None, dataset="d",
                                         validation_size=15)
    assert none is None and len(train2) == 50
    ids = [set(x["i"] for x in split) for split in (train, validation, test)]
    assert [len(s) for s in ids] == [35, 15, 10]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(range(60))
    assert ids[2] == set(x["i"] for x in eval2)  # the test split is the two-way study's eval split
    with pytest.raises(LoraplaceError, match="validation_size=55 leaves nothing to train on"):
        split_rows(rows, eval_size=10, split_seed=3, max_train_examples=None, dataset="d", validation_size=55)
