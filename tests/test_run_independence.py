"""Runs of one study share a loaded base model; each must behave as if it ran alone: the same
results as in a fresh process, the base weights bit-identical afterwards, its own memory, and a
divergence flag where training blew up without a NaN."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer

from loraplace.config import DataSettings, LoraSettings, TrainSettings
from loraplace.records import RunSpec
from loraplace.run.context import RunContext
from loraplace.study.executor import LocalExecutor
from loraplace.study.runs import divergence, execute_run

CPU = torch.device("cpu")


def _spec(model_dir, dataset, strategy: str, out: Path, kind: str = "lora", name: str | None = None,
          lora: dict | None = None, **train) -> RunSpec:
    settings = dict(max_steps=3, batch_size=4, eval_every=0, precision="fp32", logging_steps=1, max_length=64)
    settings.update(train)
    run_id = name or strategy
    return RunSpec(run_id=run_id, kind=kind, strategy=strategy, model=str(model_dir), dataset=str(dataset),
                   lora=LoraSettings(**(lora or {})), train=TrainSettings(**settings),
                   data=DataSettings(eval_size=8), device="cpu", run_dir=str(out / run_id))


def _nlls(run_dir: str) -> list[float]:
    return json.loads((Path(run_dir) / "eval_examples.json").read_text())["nll_sum"]


def _same(a, b, dir_a: str, dir_b: str) -> None:
    """Same results, exactly (float32, same process or not)."""
    assert a.status == b.status == "ok", (a.error, b.error)
    assert a.eval_loss == b.eval_loss
    assert a.final_train_loss == b.final_train_loss
    assert a.eval_accuracy == b.eval_accuracy
    assert _nlls(dir_a) == _nlls(dir_b)


@pytest.fixture(scope="module")
def tiny_bert_study(tmp_path_factory):
    """A saved tiny BERT classifier (2 classes) and a 40-row sentence/label file."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bert-study")
    data = root / "sst.jsonl"
    data.write_text("\n".join(json.dumps({"sentence": f"Add {i} and {i % 7}.", "label": ["neg", "pos"][i % 2]})
                              for i in range(40)))
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4, num_labels=2,
                                                     pad_token_id=0))
    model.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return root / "bert", data


def _study_inputs(request, which: str):
    if which == "bert":
        return request.getfixturevalue("tiny_bert_study")
    return request.getfixturevalue("tiny_llama_dir"), request.getfixturevalue("alpaca_file")


# ------------------------------------------------------------------------------ 1. independence
@pytest.mark.parametrize("which", ["bert", "llama"])
def test_second_arm_gives_the_same_results_as_alone(which, request, tmp_path):
    """A then B in one executor == B alone with a fresh context (model reloaded from disk).

    Fails for the classifier when unloading writes the trained head copy back into the base."""
    model_dir, data = _study_inputs(request, which)
    # lr high enough that a leaked head (or any leaked weight) changes B's numbers
    a = _spec(model_dir, data, "attention", tmp_path / "together", lr=5e-2)
    b = _spec(model_dir, data, "ffn", tmp_path / "together", lr=5e-2)
    _, b_after_a = list(LocalExecutor().submit([a, b]))
    alone = _spec(model_dir, data, "ffn", tmp_path / "alone", lr=5e-2)
    b_alone = execute_run(alone, RunContext())
    _same(b_after_a, b_alone, b.run_dir, alone.run_dir)


_ALONE = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from loraplace.study.runs import RunContext, RunSpec, execute_run
spec = RunSpec.model_validate_json(open(sys.argv[1]).read())
print(execute_run(spec, RunContext()).model_dump_json())
"""


def test_second_arm_equals_the_arm_in_a_fresh_process(tiny_bert_study, tmp_path):
    """B after A in this process == B alone in a new Python process (nothing else loaded)."""
    model_dir, data = tiny_bert_study
    a = _spec(model_dir, data, "ffn", tmp_path / "together", lr=5e-2)
    b = _spec(model_dir, data, "attention", tmp_path / "together", lr=5e-2)
    _, b_after_a = list(LocalExecutor().submit([a, b]))
    alone = _spec(model_dir, data, "attention", tmp_path / "alone", lr=5e-2)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(alone.model_dump_json())
    done = subprocess.run([sys.executable, "-c", _ALONE, str(spec_file), str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from loraplace.records import RunResult

    b_alone = RunResult.model_validate_json(done.stdout.strip().splitlines()[-1])
    _same(b_after_a, b_alone, b.run_dir, alone.run_dir)


# --------------------------------------------------------------------- 2. base weights unchanged
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


@pytest.mark.parametrize("which,precision", [("bert", "fp32"), ("bert", "bf16"), ("llama", "fp32"), ("llama", "bf16")])
def test_base_weights_are_bit_identical_after_an_arm(which, precision, request, tmp_path):
    model_dir, data = _study_inputs(request, which)
    ctx = RunContext()
    task = ctx.task(_spec(model_dir, data, "full", tmp_path))
    num_labels = 2 if task.name == "classification" else None
    round_to = {"bf16": torch.bfloat16}.get(precision)
    base = ctx.base_model(str(model_dir), CPU, task, num_labels, round_to=round_to)
    before = {k: (v.dtype, _bits(v)) for k, v in base.state_dict().items()}
    base_row = execute_run(_spec(model_dir, data, "base", tmp_path, kind="base", precision=precision), ctx)
    result = execute_run(_spec(model_dir, data, "full", tmp_path, precision=precision, lr=5e-2), ctx)
    assert result.status == "ok", result.error
    assert ctx.base_model(str(model_dir), CPU, task, num_labels, round_to=round_to) is base  # reused, not reloaded
    after = base.state_dict()
    assert list(after) == list(before)
    changed = [k for k, v in after.items() if v.dtype != before[k][0] or not torch.equal(_bits(v), before[k][1])]
    assert changed == []
    # the base row after an arm sees the same model as before it
    again = execute_run(_spec(model_dir, data, "base", tmp_path, kind="base", name="base2", precision=precision), ctx)
    assert again.eval_loss == base_row.eval_loss


def test_rounding_at_load_keeps_the_tied_embedding_and_changes_no_bf16_result(tiny_llama_dir):
    from loraplace.run.models import load_model, round_linear_weights

    model = load_model(str(tiny_llama_dir))
    emb = model.get_input_embeddings().weight.detach().clone()
    q = model.model.layers[0].self_attn.q_proj.weight
    raw = q.detach().clone()
    assert round_linear_weights(model, torch.bfloat16) == 2 * 7  # 7 projections per block; lm_head is tied
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert not torch.equal(q, raw) and torch.equal(q, raw.to(torch.bfloat16).float())
    assert q.dtype == torch.float32 and model.lm_head.weight is model.get_input_embeddings().weight
    rounded = q.detach().clone()
    round_linear_weights(model, torch.bfloat16)  # idempotent
    assert torch.equal(q, rounded)


# ------------------------------------------------------------------------------------ 3. memory
def test_peak_memory_increase_reflects_a_known_allocation():
    import time

    from loraplace.run.measure import PeakMemory

    with PeakMemory(CPU, interval_s=0.01) as memory:
        block = torch.ones(200 * 2**20 // 4)  # 200 MiB, touched
        time.sleep(0.5)
        del block
    assert memory.kind == "rss"
    assert memory.peak_mib - memory.start_mib == memory.increase_mib
    assert memory.increase_mib == pytest.approx(200, rel=0.15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_increase_reflects_a_known_allocation():
    from loraplace.run.measure import PeakMemory

    cuda = torch.device("cuda")
    kept = torch.ones(50 * 2**20 // 4, device=cuda)  # allocated before: part of the start, not the increase
    with PeakMemory(cuda) as memory:
        block = torch.ones(200 * 2**20 // 4, device=cuda)
        del block
    assert memory.kind == "cuda_allocated"
    assert memory.start_mib >= 50
    assert memory.increase_mib == pytest.approx(200, rel=0.05)
    del kept


def test_run_memory_excludes_what_earlier_runs_left(tiny_llama_dir, alpaca_file, tmp_path):
    ctx = RunContext()
    spec = _spec(tiny_llama_dir, alpaca_file, "full", tmp_path, name="warm")
    execute_run(spec, ctx)  # one-off allocations (imports, thread pools) happen here
    alone = execute_run(_spec(tiny_llama_dir, alpaca_file, "full", tmp_path, name="alone"), ctx)
    assert alone.memory_kind == "rss" and alone.peak_memory_increase_mib is not None
    # An earlier "run" leaves 300 MiB behind in a reference cycle (freed only by the collector).
    enabled = gc.isenabled()
    gc.disable()
    try:
        leak: list = [torch.ones(300 * 2**20 // 4)]
        leak.append(leak)
        del leak
        after = execute_run(_spec(tiny_llama_dir, alpaca_file, "full", tmp_path, name="after"), ctx)
    finally:
        if enabled:
            gc.enable()
    assert after.memory_start_mib < alone.memory_start_mib + 100  # released at the run's start
    assert after.peak_memory_mib < alone.peak_memory_mib + 100
    assert after.peak_memory_increase_mib == pytest.approx(after.peak_memory_mib - after.memory_start_mib)
    assert abs(after.peak_memory_increase_mib - alone.peak_memory_increase_mib) < 30


# ---------------------------------------------------------------------------------- 4. divergence
@pytest.fixture(scope="module")
def trained_tiny_llama(tmp_path_factory):
    """The tiny llama trained in full for a few dozen steps on Alpaca-style rows: clearly better
    than uniform (loss < 1 nat vs ln(V) = 5.8), as a pretrained model is."""
    from conftest import alpaca_rows
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("trained-llama")
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tok.pad_token_id))
    texts = [tok.apply_chat_template([{"role": "user", "content": r["instruction"]},
                                      {"role": "assistant", "content": r["output"]}], tokenize=False)
             for r in alpaca_rows(64, seed=1)]
    batch = tok(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_huge_learning_rate_is_flagged_and_a_normal_run_is_not(trained_tiny_llama, tiny_llama_dir, alpaca_file,
                                                                  tmp_path):
    ln_v = math.log(len(make_tokenizer()))
    ctx = RunContext()
    normal = execute_run(_spec(trained_tiny_llama, alpaca_file, "full", tmp_path, name="normal", max_steps=4), ctx)
    assert normal.status == "ok" and not normal.diverged and normal.diverged_reason is None
    assert normal.eval_loss < 0.5 * ln_v
    huge = execute_run(_spec(trained_tiny_llama, alpaca_file, "full", tmp_path, name="huge", max_steps=4, lr=1e6,
                             lora={"dropout": 0.0}), ctx)
    assert huge.status == "ok", huge.error  # finished without a NaN: flagged, not failed
    assert huge.eval_loss == pytest.approx(ln_v, abs=0.05)  # a uniform prediction, as seen on SmolLM2
    assert huge.diverged and "uniform" in huge.diverged_reason
    # a random-init model starts at about ln(V): ending near uniform is no divergence
    fresh = execute_run(_spec(tiny_llama_dir, alpaca_file, "full", tmp_path, name="fresh", max_steps=4), RunContext())
    assert fresh.eval_loss == pytest.approx(ln_v, abs=0.5)
    assert fresh.status == "ok" and not fresh.diverged


def test_divergence_rules():
    ln_v = math.log(49152)  # 10.80
    log = lambda *losses: [{"loss": x, "step": i + 1} for i, x in enumerate(losses)]  # noqa: E731
    # (a) a pretrained model (first loss 1.7) ending at the uniform loss
    assert "uniform" in divergence(log(1.7, 1.6), 10.80, ln_v)
    # a random-init model starting at about ln(V) and staying there is not flagged
    assert divergence(log(10.9, 10.8), 10.79, ln_v) is None
    # (b) the training loss explodes (more than twice the first and >= 1 nat above it)
    assert "exploded" in divergence(log(1.7, 1.5, 4.0), 1.6, ln_v)
    assert divergence(log(1.7, 3.0), 1.6, ln_v) is None  # < 2x
    assert divergence(log(0.3, 0.9), 0.5, math.log(2)) is None  # 3x but < 1 nat
    assert "eval loss" in divergence(log(6.2, 6.0), 40.0, math.log(512))
    # normal training
    assert divergence(log(1.7, 1.5, 1.4), 1.45, ln_v) is None
    assert divergence([], 3.0, ln_v) is None


def test_position_is_copied_into_the_result(tiny_llama_dir, alpaca_file, tmp_path):
    spec = _spec(tiny_llama_dir, alpaca_file, "base", tmp_path, kind="base").model_copy(update={"position": 3})
    assert execute_run(spec, RunContext()).position == 3
