"""The command line: help, the paper draft's Table 4.1, and one-line errors for bad input."""

import json

import pytest
from typer.testing import CliRunner

from loraplace.cli import app
from loraplace.placement.strategies import layer_ranges

runner = CliRunner()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # No hub in tests: fail fast instead of retrying the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def invoke(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("command", [[], ["run"], ["plan"], ["assets"], ["assets", "fetch"]])
def test_help_on_every_command(command):
    code, output = invoke(*command, "--help")
    assert code == 0 and "Usage" in output


def test_plan_reproduces_the_paper_drafts_table_4_1():
    code, output = invoke("plan", "--model", "microsoft/DialoGPT-medium", "--strategies",
                          "paper-full,paper-attention,paper-ffn,full,attention,ffn", "--json")
    assert code == 0, output
    plan = json.loads(output)
    assert plan["config_source"] == "built-in table" and plan["base_params"] == 354_823_168
    rows = {r["strategy"]: r for r in plan["strategies"]}
    # The draft's Table 4.1: 6,291,456 (1.74%), 4,325,376 (1.20%), 1,966,080 (0.55%).
    for name, count, pct in [("paper-full", 6_291_456, 1.74), ("paper-attention", 4_325_376, 1.20),
                             ("paper-ffn", 1_966_080, 0.55)]:
        assert rows[name]["trainable_params"] == count
        assert round(rows[name]["trainable_pct_of_total"], 2) == pct
    # Role-correct arms: attention = c_attn + attn.c_proj, ffn = c_fc + mlp.c_proj.
    assert rows["full"]["trainable_params"] == 6_291_456
    assert rows["attention"]["trainable_params"] == 2_359_296
    assert rows["ffn"]["trainable_params"] == 3_932_160
    assert rows["attention"]["params_vs_full_pct"] == pytest.approx(37.5)
    names = {m["name"] for m in rows["paper-attention"]["modules"]}
    assert "transformer.h.0.mlp.c_proj" in names and "transformer.h.0.mlp.c_fc" not in names
    assert any("mlp.c_proj" in w for w in rows["paper-attention"]["warnings"])
    assert {m["role"] for m in rows["attention"]["modules"]} == {"attn.qkv", "attn.o"}


def test_plan_table_output_names_both_reductions():
    code, output = invoke("plan", "--model", "microsoft/DialoGPT-medium", "--strategies", "paper-attention,attention")
    assert code == 0, output
    assert "4,325,376" in output and "2,359,296" in output
    assert "% of total" in output and "vs full-LoRA" in output
    assert "warning (paper-attention)" in output and "mlp.c_proj" in output


def test_labels_and_errors_keep_their_brackets_on_the_console(tiny_llama_dir):
    """A strategy's [...] is not rich markup: the plan's table names the arm as written, and an error
    that quotes a strategy shows its options."""
    code, output = invoke("plan", "--model", str(tiny_llama_dir), "--strategies", "full[init=pissa],ffn[r=2]")
    assert code == 0, output
    assert "full[init=pissa]" in output and "ffn[r=2]" in output
    code, output = invoke("plan", "--model", str(tiny_llama_dir), "--strategies", "ffn[init=pissa]+attention[init=olora]")
    _one_line_error(code, output, "ffn[init=pissa]+attention[init=olora]")


def test_plan_on_a_local_folder(tiny_llama_dir):
    code, output = invoke("plan", "--model", str(tiny_llama_dir), "--json")
    assert code == 0, output
    plan = json.loads(output)
    assert plan["config_source"] == "local"
    assert [r["trainable_params"] for r in plan["strategies"]] == [16384, 7168, 9216]


def test_layer_ranges():
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert layer_ranges([3]) == "3" and layer_ranges([]) == "-"


def _one_line_error(code, output, *fragments):
    assert code == 2, output
    assert "Traceback" not in output
    assert output.strip().startswith("error:")
    for fragment in fragments:
        assert fragment in output, output


def test_unknown_model_is_one_line():
    code, output = invoke("plan", "--model", "no-such-org/no-such-model")
    _one_line_error(code, output, "unknown model 'no-such-org/no-such-model'")


def test_run_unknown_model(alpaca_file, tmp_path):
    code, output = invoke("run", "--model", "no-such-org/no-such-model", "--dataset", str(alpaca_file),
                          "-o", str(tmp_path / "s"))
    _one_line_error(code, output, "unknown model 'no-such-org/no-such-model'", "not a local folder")


def test_run_unknown_dataset(tiny_llama_dir, tmp_path):
    code, output = invoke("run", "--model", str(tiny_llama_dir), "--dataset", "no-such-org/no-such-data",
                          "-o", str(tmp_path / "s"))
    _one_line_error(code, output, "could not load dataset 'no-such-org/no-such-data'")


def test_run_dataset_without_needed_columns(tiny_llama_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"question": "q", "answer": "a"}] * 20))
    code, output = invoke("run", "--model", str(tiny_llama_dir), "--dataset", str(data), "-o", str(tmp_path / "s"))
    _one_line_error(code, output, "expected Alpaca columns 'instruction', 'output'", "'messages'")


def test_strategy_that_matches_nothing_lists_linear_modules(tiny_gpt2_dir, alpaca_file, tmp_path):
    # GPT-2 has a fused c_attn, so "query and value" (qv) matches no module.
    code, output = invoke("run", "--model", str(tiny_gpt2_dir), "--dataset", str(alpaca_file),
                          "-o", str(tmp_path / "s"), "strategies=qv", "data.eval_size=8")
    _one_line_error(code, output, "strategy 'qv' matches no module", "transformer.h.0.attn.c_attn")


def test_bad_yaml_key(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("lora:\n  rank: 8\n")
    code, output = invoke("run", str(study))
    _one_line_error(code, output, "unknown key 'lora.rank'")


def test_bad_override_and_unknown_strategy():
    code, output = invoke("run", "lora.rank=8")
    _one_line_error(code, output, "unknown key 'lora.rank'")
    code, output = invoke("run", "--strategies", "full,mlp")
    _one_line_error(code, output, "'mlp'", "full, attention")


def test_unknown_device():
    code, output = invoke("run", "--device", "tpu", "--model", "x", "--help")
    assert code == 0  # --help wins
    from loraplace.errors import LoraplaceError
    from loraplace.run.device import pick_device

    with pytest.raises(LoraplaceError, match="unknown device 'tpu'"):
        pick_device("tpu")


def test_resume_needs_output():
    code, output = invoke("run", "--resume")
    _one_line_error(code, output, "--resume needs --output")


def test_bad_budget_reference_fails_before_training(tiny_gpt2_dir, alpaca_file, tmp_path):
    # qv has no module in GPT-2, so an arm matched to its budget cannot exist: caught by the preflight.
    code, output = invoke("run", "--model", str(tiny_gpt2_dir), "--dataset", str(alpaca_file),
                          "-o", str(tmp_path / "s"), "--match-budget", "qv", "data.eval_size=8")
    _one_line_error(code, output, "'qv'")
    assert not (tmp_path / "s" / "results.json").exists()


def test_device_errors_say_what_to_do():
    from loraplace.errors import LoraplaceError
    from loraplace.run.device import pick_device

    with pytest.raises(LoraplaceError, match="CUDA_VISIBLE_DEVICES=1 and --device cuda"):
        pick_device("cuda:1")
    assert pick_device("cpu").type == "cpu"


def test_console_shows_arm_labels_with_brackets_as_written(tmp_path, monkeypatch):
    """Arm labels such as ``full[init=eva]~attention`` hold square brackets, which rich reads as
    markup: the tuned-rate line and the plan line must show them as written."""
    from loraplace import cli
    from loraplace.config import StudyConfig
    from loraplace.tuning import Choice

    monkeypatch.setattr(cli, "print_results", lambda study_dir: None)
    progress = cli._LineProgress(1)
    progress.tuned([Choice("full[init=eva]~attention", [1e-4, 1e-3], 1e-4, {1e-4: (6, 1.5), 1e-3: (6, 1.6)})])
    with cli.console.capture() as captured:
        progress.planned(StudyConfig(name="s[1]", model="m", dataset="d"), tmp_path, 3, 1, 0)
        progress.results_saved(tmp_path)
    out = captured.get()
    assert "full[init=eva]~attention 0.0001 (lowest of the grid" in out and "study s[1]: 3 runs" in out
