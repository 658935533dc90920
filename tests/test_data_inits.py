"""Data-driven initialisations on any arm (``init=eva``, ``init=default_scaled``): computed once per
study, the same for every seed, and what their definitions say, checked against SVDs and energies
computed here from the modules' captured inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from test_baselines import captured_inputs, one_batch
from test_evaluation_nll import tiny_llama
from test_study_auto import FAST, _study

from loraplace.adapters import check_init, lora_config_for
from loraplace.config import LoraSettings, load_study
from loraplace.errors import LoraplaceError
from loraplace.methods import INITIALISERS
from loraplace.methods import eva as eva_module
from loraplace.methods import method_of
from loraplace.methods.eva import default_scaled_state, eva_init_state
from loraplace.placement.arms import Arm
from loraplace.placement.params import trainable_params
from loraplace.placement.resolve import resolve_placement
from loraplace.placement.strategies import parse_strategy
from loraplace.study.allocations import allocation_path, state_path
from loraplace.study.driver import run_study

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)


def placement(model, spec: str):
    return resolve_placement(model, parse_strategy(spec), LORA.r, LORA.alpha)


def test_eva_init_keeps_the_placed_ranks_and_takes_the_top_input_directions():
    model = tiny_llama()
    batch = one_batch()
    placed = placement(model, "attention[r=2]+mlp.down[r=6]")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = eva_init_state(model, placed, batch)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())  # the base is untouched
    assert {n: a.shape[0] for n, a in state.items()} == {m.name: m.r for m in placed.modules}  # no redistribution
    inputs = captured_inputs(model, list(state), batch)
    for name, a in state.items():
        x = inputs[name].double()
        _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)  # PCA's directions, computed here
        cos = (a.double() @ vh[: a.shape[0]].T).diagonal().abs()
        assert cos.min() > 0.9999, (name, cos)  # the exact components (PEFT's incremental PCA stops at 0.99)
    # applied to the wrapped model: A is the state, B is zero, the count is the plan's
    peft_model = get_peft_model(model, lora_config_for(placed, LORA))
    INITIALISERS.get_entry("eva").apply(peft_model, state)
    layers = {n: m for n, m in peft_model.get_base_model().named_modules() if n in state}
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A["default"].weight, state[name])
        assert not layer.lora_B["default"].weight.any()
    assert trainable_params(peft_model) == placed.lora_params


def test_default_scaled_matches_evas_input_energy_in_expectation():
    model = tiny_llama()
    batch = one_batch()
    placed = placement(model, "attention")
    factors = default_scaled_state(model, placed, batch)
    eva = eva_init_state(model, placed, batch)
    inputs = captured_inputs(model, list(eva), batch)
    for m in placed.modules:
        x = inputs[m.name].double()
        target = float(((x @ eva[m.name].double().T) ** 2).sum(1).mean())  # EVA's mean ||A x||^2
        # the factor by its definition, from energies computed here
        expected = math.sqrt(target / (m.r * float((x * x).sum(1).mean()) / (3 * m.in_features)))
        assert float(factors[m.name]) == pytest.approx(expected, rel=1e-4)
        # ... and what it does to PEFT's own default A, over many draws
        energies = []
        for seed in range(200):
            torch.manual_seed(seed)
            a = torch.empty(m.r, m.in_features)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default lora_A init
            energies.append(float(((x @ (float(factors[m.name]) * a.double()).T) ** 2).sum(1).mean()))
        assert sum(energies) / len(energies) == pytest.approx(target, rel=0.1)


def test_eva_and_its_scale_control_on_one_placement_share_one_eva_pass(monkeypatch):
    """A study's allocations hand every initialiser one ``shared`` dict: ``init=eva`` and
    ``init=default_scaled`` on one placement compute EVA's components once, with the states each gives alone."""
    model = tiny_llama()
    batch = one_batch()
    placed = placement(model, "attention")
    alone_eva, alone_factors = eva_init_state(model, placed, batch), default_scaled_state(model, placed, batch)
    calls = []
    real = eva_module.principal_components
    monkeypatch.setattr(eva_module, "principal_components", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared: dict = {}
    factors = INITIALISERS.get_entry("default_scaled").compute(model, placed, batch, "CAUSAL_LM", shared=shared)
    state = INITIALISERS.get_entry("eva").compute(model, placed, batch, "CAUSAL_LM", shared=shared)
    assert len(calls) == 1
    assert all(torch.equal(state[n], alone_eva[n]) for n in alone_eva)
    assert all(torch.equal(factors[n], alone_factors[n]) for n in alone_factors)
    # another placement (other ranks) is another pass
    INITIALISERS.get_entry("eva").compute(model, placement(model, "attention[r=2]"), batch, "CAUSAL_LM", shared=shared)
    assert len(calls) == 2


def test_data_inits_are_refused_where_they_cannot_apply():
    model = tiny_llama()
    with pytest.raises(LoraplaceError, match="quantized base"):
        check_init(model, placement(model, "attention"), "eva", quantization="nf4")
    with pytest.raises(LoraplaceError, match="init=default_scaled"):
        check_init(model, placement(model, "attention"), "default_scaled", quantization="nf4")
    with pytest.raises(LoraplaceError, match="initialises its adapters itself"):
        parse_strategy("eva[init=eva]")


def test_a_study_computes_the_init_once_for_every_seed_and_resume(tiny_llama_dir, tmp_path):
    from conftest import alpaca_rows

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_rows()))
    arms = ["auto[score=random,draw=1,step=1,max_r=6,init=eva]~attention", "attention[init=default_scaled]",
            "ffn[init=lora_ga]"]
    assert all(method_of(a).per_study(Arm.parse(a)) for a in arms)
    assert not method_of("attention").per_study(Arm.parse("attention"))
    # enough labelled scoring tokens for EVA's components (and LoRA-GA's gradient) on a tiny model
    fast = {"train.save_adapters": False, "include_base": False, "importance.batches": 4, "importance.batch_size": 8}
    out = _study(tiny_llama_dir, data, tmp_path / "s", arms, seeds=[0], **fast)
    rows = {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert {r["init"] for r in rows.values() if r["kind"] == "lora"} == {"eva", "default_scaled", "lora_ga"}
    assert all(r["status"] == "ok" for r in rows.values()), [r["error"] for r in rows.values()]
    assert len(list((out / "allocations").glob("*.init.safetensors"))) == 3
    assert all(state_path(out, arm).is_file() for arm in arms)
    # the automatic arm's EVA state has the allocated ranks
    allocation = json.loads(allocation_path(out, arms[0]).read_text())
    state = load_file(state_path(out, arms[0]))
    assert {n: int(a.shape[0]) for n, a in state.items()} == allocation["ranks"]
    # a resume recomputes nothing: the stored state is what the runs read
    before = {p: p.stat().st_mtime_ns for p in (out / "allocations").iterdir()}
    config = load_study(None, {**FAST, **fast, "model": str(tiny_llama_dir), "dataset": str(data),
                               "output": str(out), "strategies": arms, "seeds": [0, 1]})
    run_study(config, resume=True)
    assert {p: p.stat().st_mtime_ns for p in (out / "allocations").iterdir()} == before
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert sorted((r["strategy"], r["seed"]) for r in rows if r["status"] == "ok") == sorted(
        (a, seed) for a in arms for seed in (0, 1))
