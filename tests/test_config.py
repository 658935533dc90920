from pathlib import Path

import pytest
import yaml

from loraplace.config import StudyConfig, load_study, parse_override
from loraplace.errors import LoraplaceError

ROOT = Path(__file__).resolve().parents[1]


def test_quick_yaml_is_the_default_study():
    # `loraplace run` with no file uses StudyConfig() defaults; studies/quick.yaml documents them.
    assert load_study(ROOT / "studies" / "quick.yaml") == StudyConfig()


def test_default_study_uses_the_paper_hyperparameters():
    c = StudyConfig()
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.train.lr) == (16, 32.0, 0.1, 2e-4)
    assert c.strategies == ["full", "attention", "ffn"] and c.include_base


def test_paper_yaml_reproduces_the_draft():
    c = load_study(ROOT / "studies" / "paper.yaml")
    assert c.model == "microsoft/DialoGPT-medium" and c.dataset == "tatsu-lab/alpaca"
    assert c.strategies == ["paper-full", "paper-attention", "paper-ffn"]
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.train.lr) == (16, 32.0, 0.1, 2e-4)


def test_overrides_are_dotted_and_typed():
    c = load_study(None, dict([parse_override("train.lr=1e-4"), parse_override("lora.r=8"),
                               parse_override("strategies=full,ffn")]))
    assert c.train.lr == 1e-4 and c.lora.r == 8 and c.strategies == ["full", "ffn"]


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rate": 1e-4}}))
    with pytest.raises(LoraplaceError, match=r"unknown key 'train.learning_rate'"):
        load_study(path)


def test_bad_value_is_named(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("lora:\n  r: 0\n")
    with pytest.raises(LoraplaceError, match=r"lora.r"):
        load_study(path)


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(LoraplaceError, match=r"'attn-only'.*full, attention"):
        load_study(None, {"strategies": "full,attn-only"})


def test_overrides_need_key_value_and_split_strategy_lists_as_the_option_does():
    with pytest.raises(LoraplaceError, match="KEY=VALUE"):
        parse_override("train.lr")
    # a strategy's own [...] is not YAML: the list is split at its top-level commas, as --strategies is
    assert parse_override("strategies=[auto[score=adam]~attention, full[init=pissa]~attention,qv@0,3]") == (
        "strategies", ["auto[score=adam]~attention", "full[init=pissa]~attention", "qv@0,3"])
    assert parse_override("strategies=['full', \"ffn\"]") == ("strategies", ["full", "ffn"])
    with pytest.raises(LoraplaceError, match="not valid YAML"):
        parse_override("train.lr=[1e-4")


def test_missing_and_invalid_study_files(tmp_path):
    with pytest.raises(LoraplaceError, match="not found"):
        load_study(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(LoraplaceError, match="not valid YAML"):
        load_study(bad)


def test_shared_dropout_masks_and_compile_are_refused_together():
    assert load_study(None, {"lora.dropout_masks": "shared"}).lora.dropout_masks == "shared"
    assert load_study(None, {"train.compile": True}).train.compile is True
    with pytest.raises(LoraplaceError, match="dropout_masks=shared cannot be compiled"):
        load_study(None, {"lora.dropout_masks": "shared", "train.compile": True})
    with pytest.raises(LoraplaceError, match="dropout_masks"):
        load_study(None, {"lora.dropout_masks": "same"})
