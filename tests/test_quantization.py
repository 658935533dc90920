"""Quantized base models (QLoRA: nf4; LLM.int8(): int8) with bitsandbytes: exact parameter
counts, the quantized weights left alone, a shared base model that every run sees the same, a
tiny study end to end, and a one-line refusal where bitsandbytes cannot run.

Tests that load a quantized model skip when bitsandbytes is not installed (it is the optional
``quant`` extra); they run on the CPU backend of bitsandbytes >= 0.50.2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from loraplace.errors import LoraplaceError

CPU = torch.device("cpu")
FAST = dict(max_steps=2, batch_size=4, eval_every=1, logging_steps=1, precision="fp32")
BOUND = {"nf4": 0.05, "int8": 0.005}  # nats: largest loss difference from the unquantized model allowed


def _needs_bitsandbytes():
    from loraplace.run.quantization import check_quantization

    pytest.importorskip("bitsandbytes")
    try:
        check_quantization("nf4", CPU)
    except LoraplaceError as e:
        pytest.skip(str(e))


def _load(path, quantization: str):
    from loraplace.run.models import load_model

    return load_model(str(path), quantization=quantization, device=CPU)


# ----------------------------------------------------------------------------- parameter counts
def test_param_count_reads_the_real_shape_of_a_packed_weight():
    from loraplace.placement.params import param_count

    packed = torch.zeros(16, 1, dtype=torch.uint8)  # 32 four-bit values of a (4, 8) weight, two per byte
    packed.quant_state = SimpleNamespace(shape=torch.Size([4, 8]))
    assert packed.numel() == 16 and param_count(packed) == 32
    assert param_count(torch.zeros(4, 8)) == 32
    assert param_count(torch.zeros(4, 8, dtype=torch.int8)) == 32  # 8-bit: one value per byte


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_model_has_the_parameters_of_the_unquantized_one(tiny_llama_dir, quantization):
    _needs_bitsandbytes()
    import bitsandbytes as bnb

    from loraplace.placement.params import param_count, total_params, trainable_params
    from loraplace.run.models import load_config, meta_model

    plain = _load(tiny_llama_dir, "none")
    model = _load(tiny_llama_dir, quantization)
    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert len(layers) == 2 * 7  # every projection of both blocks; the tied output head stays float32
    for m in layers:
        assert param_count(m.weight) == m.in_features * m.out_features
    if quantization == "nf4":  # the bug this guards against: numel of a 4-bit weight is half its count
        assert all(m.weight.numel() * 2 == m.in_features * m.out_features for m in layers)
    expected = total_params(meta_model(load_config(str(tiny_llama_dir))[0]))
    assert total_params(model) == total_params(plain) == expected
    assert trainable_params(model) == 0  # prepared: everything frozen


# ------------------------------------------------------------------ quantized weights left alone
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_rounding_and_frozen_dtype_leave_quantized_weights_alone(tiny_llama_dir, quantization):
    _needs_bitsandbytes()
    from loraplace.run.models import plain_linears, round_linear_weights
    from loraplace.run.quantization import quantized_layers
    from loraplace.run.training import frozen_weights_as

    model = _load(tiny_llama_dir, quantization)
    layers = quantized_layers(model)
    before = [(m.weight.data.clone(), m.weight.dtype) for m in layers]
    assert not set(map(id, plain_linears(model))) & set(map(id, layers))
    round_linear_weights(model, torch.bfloat16)
    with frozen_weights_as(model, torch.bfloat16):
        assert all(m.weight.dtype == dtype for m, (_, dtype) in zip(layers, before))
    for m, (data, dtype) in zip(layers, before):
        assert m.weight.dtype == dtype and torch.equal(m.weight.data, data)


def _lora_grads(model, batch):
    """LoRA on q/v/up of a shared base model: (loss, gradient norms of the adapters), then unloaded."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "up_proj"]))
    peft_model.train()
    loss = peft_model(**batch).loss
    loss.backward()
    grads = [None if p.grad is None else float(p.grad.norm()) for p in peft_model.parameters() if p.requires_grad]
    peft_model.unload()
    return float(loss.detach()), grads


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose projections are wide enough (in_features a multiple of bitsandbytes'
    4-bit block of 64) for bitsandbytes' CPU inference layout to apply."""
    from conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), hidden=64, intermediate=128, seed=0)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("model", ["tiny_llama_dir", "llama64_dir"])
def test_evaluation_does_not_change_how_the_shared_model_trains(model, quantization, request):
    """An evaluation (eval mode, no gradients) before training gives the same loss and gradients as
    training a fresh model. Guards against bitsandbytes' CPU inference layout for 4-bit weights
    (on CPUs with AVX512-BF16), after which LoRA got no gradients at all (hidden 64), or which
    failed on projections narrower than its block of 64 (hidden 32)."""
    _needs_bitsandbytes()
    tiny_llama_dir = request.getfixturevalue(model)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    evaluated = _load(tiny_llama_dir, quantization)
    evaluated.eval()
    with torch.no_grad():
        first = float(evaluated(**batch).loss)
    trained = _lora_grads(evaluated, batch)
    evaluated.eval()
    with torch.no_grad():
        assert float(evaluated(**batch).loss) == first  # unloading left the base model as it was
    fresh = _lora_grads(_load(tiny_llama_dir, quantization), batch)
    assert all(g is not None and g > 0 for g in trained[1])
    assert trained == fresh


# ---------------------------------------------------------------------------------- end to end
def _study(model_dir, data, out: Path, quantization: str) -> dict[str, dict]:
    from loraplace.config import load_study
    from loraplace.study.driver import run_study

    config = load_study(None, {"model": str(model_dir), "dataset": str(data), "output": str(out),
                               "strategies": "attention,ffn", "quantization": quantization,
                               "data.eval_size": 8, **{f"train.{k}": v for k, v in FAST.items()}})
    run_study(config)
    return {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}


def _first_loss(out: Path, run_id: str) -> float:
    log = json.loads((out / "runs" / run_id / "train_log.json").read_text())
    return next(e["loss"] for e in log if "loss" in e and e.get("step") == 1)


@pytest.fixture(scope="module")
def plain_study(tiny_llama_dir, tmp_path_factory):
    from conftest import alpaca_rows

    _needs_bitsandbytes()  # the reference study is only worth running for the quantized ones
    root = tmp_path_factory.mktemp("quant-study")
    data = root / "alpaca.json"
    data.write_text(json.dumps(alpaca_rows()))
    return data, root, _study(tiny_llama_dir, data, root / "none", "none")


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_tiny_quantized_study_end_to_end(tiny_llama_dir, plain_study, quantization):
    _needs_bitsandbytes()
    data, root, plain = plain_study
    out = root / quantization
    runs = _study(tiny_llama_dir, data, out, quantization)
    assert list(runs) == ["base", "attention-s0", "ffn-s0"]
    assert {r["quantization"] for r in plain.values()} == {"none"}
    for run_id, r in runs.items():
        assert r["status"] == "ok", r["error"]
        assert r["quantization"] == quantization
        # exact counts: the quantized base has the unquantized model's parameters, the adapters the plan's
        assert r["base_params"] == plain[run_id]["base_params"]
        assert r["total_params"] == plain[run_id]["total_params"]
        assert r["trainable_params"] == plain[run_id]["trainable_params"]
        assert math.isfinite(r["eval_loss"])
        assert r["versions"]["bitsandbytes"]
    assert f"quantization: {quantization}" in (out / "study.yaml").read_text()
    assert "quantization" in (out / "results.csv").read_text().splitlines()[0]
    for run_id in ("attention-s0", "ffn-s0"):
        # The loss at step 1 is the model before any update: it differs from the unquantized
        # model's by the quantization error alone (measured: 7e-3 nats for nf4, 5e-5 for int8 on
        # this random-init model, whose near-uniform predictions damp weight errors).
        quantized, reference = _first_loss(out, run_id), _first_loss(root / "none", run_id)
        assert math.isfinite(quantized) and abs(quantized - reference) < BOUND[quantization], (quantized, reference)
        assert abs(runs[run_id]["eval_loss"] - plain[run_id]["eval_loss"]) < BOUND[quantization]
        # the adapters trained (after the base row's evaluation and a mid-run one on the same model)
        norms = json.loads((out / "runs" / run_id / "adapter_norms.json").read_text())["modules"]
        assert norms and all(m["norm"] > 0 for m in norms)
    assert abs(runs["base"]["eval_loss"] - plain["base"]["eval_loss"]) < BOUND[quantization]
    # The last arm ran on the base model the base row and the first arm used: alone, on a freshly
    # loaded one, it gives the same numbers.
    from loraplace.records import RunSpec
    from loraplace.run.context import RunContext
    from loraplace.study.runs import execute_run

    spec = RunSpec.model_validate_json((out / "runs" / "ffn-s0" / "config.json").read_text())
    assert spec.quantization == quantization
    alone = execute_run(spec.model_copy(update={"run_dir": str(root / f"{quantization}-alone")}), RunContext())
    assert (alone.eval_loss, alone.final_train_loss) == (runs["ffn-s0"]["eval_loss"], runs["ffn-s0"]["final_train_loss"])


# ---------------------------------------------------------------------------------- refusals
def _config(tiny_llama_dir, alpaca_file, **values):
    from loraplace.config import load_study

    return load_study(None, {"model": str(tiny_llama_dir), "dataset": str(alpaca_file), "device": "cpu", **values})


def _one_line(error: LoraplaceError) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_study_without_bitsandbytes_is_refused_before_training(tiny_llama_dir, alpaca_file, monkeypatch):
    from loraplace.study.checks import check_study

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    check_study(_config(tiny_llama_dir, alpaca_file))  # quantization=none needs nothing
    with pytest.raises(LoraplaceError) as info:
        check_study(_config(tiny_llama_dir, alpaca_file, quantization="nf4"))
    text = _one_line(info.value)
    assert "quantization=nf4 needs bitsandbytes>=" in text and "pip install 'loraplace[quant]'" in text


def test_cli_refuses_a_quantized_study_without_bitsandbytes(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    from loraplace.cli import app

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    out = tmp_path / "s"
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), "--dataset", str(alpaca_file),
                                      "-o", str(out), "--device", "cpu", "--quantization", "int8"])
    assert result.exit_code == 2, result.output
    assert "quantization=int8 needs bitsandbytes" in result.output
    assert not (out / "runs").exists()  # nothing trained


def test_device_without_a_bitsandbytes_backend_is_refused(monkeypatch):
    from loraplace.run.quantization import check_quantization

    fake = SimpleNamespace(supported_torch_devices={"cuda"}, __version__="0.50.2")
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.50.2")
    with pytest.raises(LoraplaceError, match="backend for cpu.*use --device cuda"):
        check_quantization("nf4", CPU)
    check_quantization("nf4", torch.device("cuda"))  # checked only, nothing allocated
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.44.1")
    with pytest.raises(LoraplaceError, match="found 0.44.1"):
        check_quantization("int8", torch.device("cuda"))


def test_automatic_placement_on_a_quantized_model_is_refused(tiny_llama_dir, alpaca_file):
    _needs_bitsandbytes()
    from loraplace.study.checks import check_study

    with pytest.raises(LoraplaceError, match="automatic placement"):
        check_study(_config(tiny_llama_dir, alpaca_file, quantization="nf4", strategies="attention,auto[score=weight]~attention"))
