"""A local GGUF file as ``--model``: dequantized once into the cache (keyed by its sha256), then
used like a folder by plan, the config, the tokenizer and a run."""

import json
import os

import pytest
from gguf_tiny import write_tiny_gguf
from typer.testing import CliRunner

from loraplace import assets
from loraplace.cli import app
from loraplace.run.models import load_config, load_model, load_tokenizer, resolve_model_path


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "files" / "tiny-llama.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path)
    return path


def test_gguf_is_converted_once_into_a_folder_keyed_by_its_content(gguf_file, tmp_path):
    folder = resolve_model_path(str(gguf_file))
    digest = assets.sha256_of(gguf_file)
    assert folder == str(tmp_path / "cache" / "models" / f"gguf-{digest[:16]}")
    assert (tmp_path / "cache" / "models" / f"gguf-{digest[:16]}" / ".complete").read_text().strip() == digest
    stamp = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(gguf_file.read_bytes())
    assert resolve_model_path(str(copy)) == folder  # same content: same folder, not converted again
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == stamp

    config, source = load_config(str(gguf_file))
    assert source == "gguf" and config.model_type == "llama" and not hasattr(config, "quantization_config")
    model = load_model(str(gguf_file))
    assert getattr(model, "hf_quantizer", None) is None  # a plain model: Trainer and save_pretrained accept it
    tok = load_tokenizer(str(gguf_file))
    assert tok("the cat")["input_ids"] and tok.pad_token is not None


def test_plan_and_a_two_step_run_on_a_gguf_file(gguf_file, alpaca_file, tmp_path):
    runner = CliRunner()
    plan = runner.invoke(app, ["plan", "--model", str(gguf_file), "--json"])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["config_source"] == "gguf"
    out = tmp_path / "study"
    run = runner.invoke(app, ["run", "--model", str(gguf_file), "--dataset", str(alpaca_file), "-o", str(out),
                              "--strategies", "attention", "train.max_steps=2", "train.batch_size=4",
                              "train.eval_every=0", "train.max_length=256", "data.eval_size=8", "include_base=false",
                              "train.gradient_checkpointing=true"])
    assert run.exit_code == 0, run.output
    results = [json.loads(p.read_text()) for p in out.glob("runs/*/result.json")]
    assert len(results) == 1 and results[0]["status"] == "ok", results[0]["error"]
    assert results[0]["status"] == "ok" and results[0]["train_steps"] == 2
    assert results[0]["model"] == str(gguf_file)
    assert results[0]["speed_choices"]["gradient_checkpointing"].startswith("on")


@pytest.mark.parametrize("keep", [0.003, 0.5, 0.999])
def test_a_truncated_gguf_gets_one_line(gguf_file, alpaca_file, tmp_path, keep):
    """A GGUF file cut short (a broken download) is refused by plan and run with one line that
    names the file and says it is incomplete, not with the parser's traceback."""
    data = gguf_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:max(8, int(len(data) * keep))])
    runner = CliRunner()
    for args in (["plan", "--model", str(cut)],
                 ["run", "--model", str(cut), "--dataset", str(alpaca_file), "-o", str(tmp_path / "s")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        assert "Traceback" not in message and "struct.error" not in message
        assert f"GGUF file '{cut}'" in message and "incomplete or corrupt" in message and "download it again" in message
