"""End-to-end studies on tiny random-init models: files, metrics, resume, failures."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from loraplace.cli import app
from loraplace.records import RUN_FILES

runner = CliRunner()
FAST = ["train.max_steps=2", "train.batch_size=4", "data.eval_size=8", "train.eval_every=1", "train.logging_steps=1",
        "train.precision=fp32"]


def run_cli(*args):
    result = runner.invoke(app, ["run", *args])
    return result, result.output


def run_driver(*overrides: str, progress=None, **values):
    """A study run by the driver itself (no command line): its folder."""
    from loraplace.config import load_study, parse_override
    from loraplace.study.driver import run_study

    return run_study(load_study(None, {**dict(parse_override(o) for o in overrides), **values}), progress=progress)


@pytest.fixture(scope="module")
def tiny_study_run(tiny_llama_dir, tmp_path_factory):
    """The tiny study, run once through the CLI (not a terminal): its folder, data, output, wall time."""
    import time

    from conftest import alpaca_rows

    data = tmp_path_factory.mktemp("data") / "alpaca.json"
    data.write_text(json.dumps(alpaca_rows()))
    out = tmp_path_factory.mktemp("study") / "s"
    start = time.perf_counter()
    result, output = run_cli("--model", str(tiny_llama_dir), "--dataset", str(data), "-o", str(out), *FAST)
    wall = time.perf_counter() - start
    assert result.exit_code == 0, output
    return {"out": out, "data": data, "output": output, "wall_s": wall}


@pytest.fixture(scope="module")
def tiny_study(tiny_study_run):
    return tiny_study_run["out"], tiny_study_run["data"]


def test_study_writes_every_file(tiny_study):
    out, _ = tiny_study
    for name in ("study.yaml", "environment.json", "results.json", "results.csv", "results.md"):
        assert (out / name).is_file(), name
    assert not (out / ".lock").exists()  # released when the run ended
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    for run_id in ("base", "full-s0", "attention-s0", "ffn-s0"):
        for name in RUN_FILES:
            if run_id == "base" and name in ("train_log.json", "adapter_norms.json"):
                continue  # the base row only evaluates
            assert (out / "runs" / run_id / name).is_file(), (run_id, name)


def _independent_eval(model_dir, data_file):
    """Per-example (NLL sum, labelled-token count) of the saved tiny model on the study's eval split,
    computed with plain transformers: ``model(input_ids, labels=labels).loss`` (mean over the shifted
    labelled tokens) times the number of those tokens, one example at a time, float32, no padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplace.data import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_data(str(data_file), tokenizer, eval_size=8, max_length=256, loss_on="response",
                        split_seed=1234)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    sums, counts = [], []
    with torch.no_grad():
        for ex in data.eval:
            ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
            n = int((labels[0, 1:] != -100).sum())
            sums.append(float(model(input_ids=ids, labels=labels).loss) * n)
            counts.append(n)
    lengths = [len(x) for x in data.train["input_ids"]]
    return sums, counts, lengths


def test_every_metric_is_recorded_and_consistent(tiny_study_run, tiny_llama_dir):
    out, data, wall = tiny_study_run["out"], tiny_study_run["data"], tiny_study_run["wall_s"]
    runs = {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert list(runs) == ["base", "full-s0", "attention-s0", "ffn-s0"]
    sums, counts, train_lengths = _independent_eval(tiny_llama_dir, data)
    for r in runs.values():
        assert r["status"] == "ok", r
        examples = json.loads((out / "runs" / r["run_id"] / "eval_examples.json").read_text())
        # every run is scored on the same labelled tokens, counted here from the tokenized split
        assert examples["n_tokens"] == counts and r["eval_tokens"] == sum(counts)
        assert r["peak_memory_mib"] > 0 and r["memory_kind"] == "rss" and r["device"].startswith("cpu")
        assert r["versions"]["torch"] == torch.__version__ and 0 < r["eval_time_s"] < wall
    # The base row's loss and perplexity against plain transformers on the saved model.
    base = runs["base"]
    base_examples = json.loads((out / "runs" / "base" / "eval_examples.json").read_text())
    assert base_examples["nll_sum"] == pytest.approx(sums, rel=1e-4)
    assert base["eval_loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-4)
    assert base["perplexity"] == pytest.approx(math.exp(sum(sums) / sum(counts)), rel=1e-4)
    full, attn, ffn = runs["full-s0"], runs["attention-s0"], runs["ffn-s0"]
    # hidden 32, intermediate 64, 4 heads of 8, 2 KV heads (k/v out 16), 2 layers, r=16:
    # attention: q 16*(32+32) + k 16*(32+16) + v 16*(32+16) + o 16*(32+32) = 3,584 per layer
    # ffn: gate 16*(32+64) + up 16*(32+64) + down 16*(64+32) = 4,608 per layer
    assert attn["trainable_params"] == 2 * 3584
    assert ffn["trainable_params"] == 2 * 4608
    assert full["trainable_params"] == 2 * (3584 + 4608)
    # Base parameters by hand: tied embedding V*32; per layer q 32*32, k 32*16, v 32*16, o 32*32,
    # gate/up 32*64 each, down 64*32, two RMSNorms of 32; a final norm of 32; no biases.
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    base_params = vocab * 32 + 2 * (1024 + 512 + 512 + 1024 + 3 * 2048 + 64) + 32
    assert base["base_params"] == base["total_params"] == base_params and base["trainable_params"] == 0
    for r, trainable in ((full, 16384), (attn, 7168), (ffn, 9216)):
        assert r["total_params"] == base_params + trainable
        assert r["trainable_pct"] == pytest.approx(100 * trainable / (base_params + trainable))
    assert attn["params_vs_full_pct"] == pytest.approx(100 * 7168 / 16384)
    assert attn["delta_eval_loss"] == pytest.approx(attn["eval_loss"] - full["eval_loss"])
    assert attn["delta_eval_loss_pct"] == pytest.approx(100 * (attn["eval_loss"] - full["eval_loss"]) / full["eval_loss"])
    for r in (full, attn, ffn):
        assert r["worse_than_base"] == (r["eval_loss"] > base["eval_loss"])
    assert base["worse_than_base"] is None
    assert full["train_steps"] == 2
    # 2 steps of batch 4 see 8 training examples: their real (unpadded) tokens lie between 8x the
    # shortest and 8x the longest example (padding to the longest in a batch, or to max_length,
    # would exceed the upper bound on these short examples).
    assert 8 * min(train_lengths) <= full["train_real_tokens"] <= 8 * max(train_lengths) < 8 * 256
    # the timed training is part of the CLI's wall time, so tokens/s is at least tokens / wall time
    assert 0 < full["train_time_s"] < wall and full["train_tokens_per_s"] >= full["train_real_tokens"] / wall
    assert full["speed_choices"]["attention"] == "eager" and full["speed_choices"]["lora_dropout"] == "mask"
    assert runs["base"]["train_time_s"] is None


def test_plain_progress_lines_when_not_a_terminal(tiny_study_run):
    # CliRunner's output is not a terminal: one line per run start and end, and step lines.
    output = tiny_study_run["output"]
    assert "[1/4] start base: base model (no adapters): eval" in output
    assert "[2/4] start full-s0: train 2 steps + eval" in output
    assert "  full-s0 step 1/2" in output and "  full-s0 step 2/2 loss " in output, output
    for k, run_id in enumerate(["full-s0", "attention-s0", "ffn-s0"], start=2):
        assert f"[{k}/4] done {run_id}: eval loss " in output
    assert "[1/4] done base: eval loss " in output


def test_positions_follow_the_execution_order(tiny_study):
    out, _ = tiny_study
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["position"] for r in runs] == [0, 1, 2, 3]


def test_study_is_named_after_its_model_and_data(tiny_study, tiny_llama_dir):
    import yaml

    out, _ = tiny_study
    name = yaml.safe_load((out / "study.yaml").read_text())["name"]
    assert name == f"{tiny_llama_dir.name}-alpaca" and name.startswith("tiny-llama")


def test_module_lists_match_their_labels(tiny_study):
    out, _ = tiny_study
    runs = {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    attn = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    ffn = {f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
    assert set(runs["attention-s0"]["modules"]) == attn
    assert set(runs["ffn-s0"]["modules"]) == ffn
    assert set(runs["full-s0"]["modules"]) == attn | ffn
    modules = json.loads((out / "runs" / "attention-s0" / "modules.json").read_text())
    assert {m["role"] for m in modules["modules"]} == {"attn.q", "attn.k", "attn.v", "attn.o"}


def test_train_log_has_loss_and_eval_curves(tiny_study):
    out, _ = tiny_study
    log = json.loads((out / "runs" / "full-s0" / "train_log.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, 2]
    assert [e["step"] for e in log if "eval_loss" in e] == [1]  # the last step is the final eval


def test_results_table_lists_every_run(tiny_study):
    out, _ = tiny_study
    table = (out / "results.md").read_text()
    for run_id in ("base", "full-s0", "attention-s0", "ffn-s0"):
        assert f"| {run_id} | ok |" in table
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.startswith("run_id,strategy,seed,status")


def test_runs_are_deterministic_under_a_fixed_seed(tiny_study, tmp_path):
    from loraplace.config import load_study
    from loraplace.study.executor import LocalExecutor
    from loraplace.study.specs import run_specs

    out, data = tiny_study
    first = json.loads((out / "results.json").read_text())["runs"]
    config = load_study(out / "study.yaml", {"strategies": ["attention"], "include_base": False, "output": str(tmp_path)})
    (again,) = list(LocalExecutor().submit(run_specs(config, tmp_path)))
    ref = next(r for r in first if r["run_id"] == "attention-s0")
    assert again.eval_loss == pytest.approx(ref["eval_loss"], abs=1e-6)
    assert again.final_train_loss == pytest.approx(ref["final_train_loss"], abs=1e-6)


def test_resume_skips_finished_runs(tiny_study, tmp_path):
    import shutil

    out, data = tiny_study
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    # Simulate a study interrupted after two runs: drop the last two from results.json.
    payload = json.loads((copy / "results.json").read_text())
    kept = payload["runs"][:2]
    payload["runs"] = kept
    (copy / "results.json").write_text(json.dumps(payload))
    model = payload["study"]["model"]
    result, output = run_cli("--model", model, "--dataset", str(data), "-o", str(copy), "--resume", *FAST)
    assert result.exit_code == 0, output
    assert "4 runs (2 already finished)" in output
    runs = json.loads((copy / "results.json").read_text())["runs"]
    assert [r["run_id"] for r in runs] == ["base", "full-s0", "attention-s0", "ffn-s0"]
    assert runs[:2] == [{**k, **{f: runs[i][f] for f in ("params_vs_full_pct", "delta_eval_loss",
                                                          "delta_eval_loss_pct", "full_lora_params")}}
                        for i, k in enumerate(kept)]


def test_existing_study_needs_resume_and_the_same_config(tiny_study):
    out, data = tiny_study
    model = json.loads((out / "results.json").read_text())["study"]["model"]
    result, output = run_cli("--model", model, "--dataset", str(data), "-o", str(out), *FAST)
    assert result.exit_code == 2 and "already holds a study; pass --resume" in output
    result, output = run_cli("--model", model, "--dataset", str(data), "-o", str(out), "--resume", *FAST, "lora.r=4")
    assert result.exit_code == 2 and "different config" in output


def test_nonfinite_loss_fails_the_run_and_the_study_goes_on(tiny_llama_dir, alpaca_file, tmp_path):
    out = tmp_path / "s"
    # lr=1e30 makes the adapters (and the loss) overflow within a few steps.
    assert run_driver("train.max_steps=6", "data.eval_size=8", "train.lr=1e30", "strategies=full,ffn",
                      "train.precision=fp32", "train.eval_every=0", model=str(tiny_llama_dir),
                      dataset=str(alpaca_file), output=str(out)) == out
    runs = {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert runs["base"]["status"] == "ok"
    for run_id in ("full-s0", "ffn-s0"):
        assert runs[run_id]["status"] == "failed"
        assert "non-finite training loss" in runs[run_id]["error"]
    assert "failed: non-finite training loss" in (out / "results.md").read_text()


def test_gpt2_conv1d_study_runs(tiny_gpt2_dir, alpaca_file, tmp_path):
    from loraplace.study.driver import StudyProgress

    class Recorder(StudyProgress):  # what the driver reports, in order
        def __init__(self):
            self.events = []

        def planned(self, study, study_dir, total, finished, kept):
            self.events.append(("planned", total, finished, kept))

        def run_started(self, spec, k):
            self.events.append(("start", spec.run_id, k))

        def run_ended(self, result, k, seconds):
            self.events.append(("end", result.run_id, k, result.status))

        def report_written(self, html_path):
            self.events.append(("report", html_path.name))

    out, recorder = tmp_path / "s", Recorder()
    run_driver("strategies=attention,paper-attention", "include_base=false", *FAST, model=str(tiny_gpt2_dir),
               dataset=str(alpaca_file), output=str(out), progress=recorder)
    assert recorder.events == [("planned", 2, 0, 0), ("start", "attention-s0", 1), ("end", "attention-s0", 1, "ok"),
                               ("start", "paper-attention-s0", 2), ("end", "paper-attention-s0", 2, "ok"),
                               ("report", "report.html")]
    runs = {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs["attention-s0"]["modules"]) == {f"transformer.h.{i}.attn.{m}" for i in range(2)
                                                    for m in ("c_attn", "c_proj")}
    # the paper's literal list also adapts the FFN down-projection, and says so
    assert set(runs["paper-attention-s0"]["modules"]) == set(runs["attention-s0"]["modules"]) | {
        f"transformer.h.{i}.mlp.c_proj" for i in range(2)}
    assert any("mlp.c_proj" in w for w in runs["paper-attention-s0"]["warnings"])


def test_ctrl_c_keeps_finished_runs(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    import loraplace.study.executor as executor

    real = executor.execute_run
    calls = []

    def interrupt_second(spec, ctx, on_step=None):
        calls.append(spec.run_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec, ctx, on_step=on_step)

    monkeypatch.setattr(executor, "execute_run", interrupt_second)
    out = tmp_path / "s"
    result, output = run_cli("--model", str(tiny_llama_dir), "--dataset", str(alpaca_file), "-o", str(out), *FAST)
    assert result.exit_code == 130
    assert "--resume" in output
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["run_id"] for r in runs] == ["base"]


def test_resume_can_add_seeds(tiny_study, tmp_path):
    import shutil

    out, data = tiny_study
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    model = json.loads((copy / "results.json").read_text())["study"]["model"]
    result, output = run_cli("--model", model, "--dataset", str(data), "-o", str(copy), "--resume", *FAST,
                             "--seeds", "0,1", "strategies=full,attention,ffn")
    assert result.exit_code == 0, output
    assert "7 runs (4 already finished)" in output
    runs = [r["run_id"] for r in json.loads((copy / "results.json").read_text())["runs"]]
    assert runs == ["base", "full-s0", "attention-s0", "ffn-s0", "full-s1", "attention-s1", "ffn-s1"]
