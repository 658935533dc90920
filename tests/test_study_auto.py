"""Automatic arms inside studies: allocated once per study and stored, the same placement for every
seed and on resume, independent of what ran before; EVA and AdaLoRA arms at the budget; the plan."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from loraplace.cli import app

FAST = dict(seeds=[0, 1], **{"train.max_steps": 4, "train.batch_size": 4, "data.eval_size": 8, "train.eval_every": 0,
                             "train.precision": "fp32", "lora.r": 4, "lora.alpha": 8.0, "importance.batches": 2,
                             "importance.batch_size": 4, "importance.max_rank": 16})
AUTO = "auto[step=1]~attention"
RANDOM = "auto[score=random,draw=1,step=1]~attention"


def _study(model, data, out, strategies, **values):
    from loraplace.config import load_study
    from loraplace.study.driver import run_study

    config = load_study(None, {**FAST, "model": str(model), "dataset": str(data), "output": str(out),
                               "strategies": strategies, **values})
    return run_study(config)


def _ranks(run_dir):
    modules = json.loads((run_dir / "modules.json").read_text())["modules"]
    return {m["name"]: (m["r"], m["alpha"]) for m in modules}


def _mlp_sizes(run_dir) -> dict[str, int]:
    """in + out of each feed-forward module, from the tiny model's config (hidden 32, intermediate 64)."""
    modules = json.loads((run_dir / "modules.json").read_text())["modules"]
    return {m["name"]: 32 + 64 for m in modules if m["name"].split(".")[-1] in ("gate_proj", "up_proj", "down_proj")}


def _rows(out):
    return {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import alpaca_rows

    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(alpaca_rows()))
    return path


@pytest.fixture(scope="module")
def auto_study(tiny_llama_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "s"
    _study(tiny_llama_dir, data, out, ["attention", AUTO, RANDOM])
    return out


def test_every_seed_trains_the_stored_allocation(auto_study):
    from loraplace.study.allocations import allocation_path
    from loraplace.study.specs import run_id_for

    rows = _rows(auto_study)
    attention = rows["attention-s0"]["trainable_params"]
    for label in (AUTO, RANDOM):
        stored = json.loads(allocation_path(auto_study, label).read_text())
        assert stored["arm"] == label
        # one update scale: alpha over the rank of a uniform arm of attention's budget on the chosen slots
        shapes = {m["name"]: m["in_features"] + m["out_features"]
                  for m in json.loads((auto_study / "runs" / "attention-s0" / "modules.json").read_text())["modules"]}
        shapes.update(_mlp_sizes(auto_study / "runs" / run_id_for(label, 0)))
        uniform = round(attention / sum(shapes[name] for name in stored["ranks"]))
        expected = {name: (r, pytest.approx(8.0 * r / uniform)) for name, r in stored["ranks"].items()}
        for seed in (0, 1):
            run_id = run_id_for(label, seed)
            assert _ranks(auto_study / "runs" / run_id) == expected
            assert abs(rows[run_id]["trainable_params"] - attention) <= 0.01 * attention
            assert rows[run_id]["match_budget"] == "attention"
        assert len({r for r, _ in expected.values()}) > 1  # not a uniform placement
    assert (auto_study / "importance" / "gradient.json").is_file()
    # post-hoc importance: one norm per adapted module, of the rank it trained
    norms = json.loads((auto_study / "runs" / run_id_for(AUTO, 0) / "adapter_norms.json").read_text())["modules"]
    assert {m["name"]: m["r"] for m in norms} == _stored_ranks(auto_study, AUTO)
    assert all(m["norm"] > 0 for m in norms)


def _stored_ranks(out, label):
    from loraplace.study.allocations import allocation_path

    return json.loads(allocation_path(out, label).read_text())["ranks"]


def test_resume_reuses_the_allocation_and_scores(auto_study, tiny_llama_dir, data):
    from loraplace.config import load_study
    from loraplace.study.allocations import allocation_path, importance_path
    from loraplace.study.driver import run_study
    from loraplace.study.specs import run_id_for

    before = {p: p.read_bytes() for p in (allocation_path(auto_study, AUTO), importance_path(auto_study, "gradient"))}
    # a resume that would score differently (other batches) must still train the stored placement
    config = load_study(None, {**FAST, "model": str(tiny_llama_dir), "dataset": str(data), "output": str(auto_study),
                               "strategies": [AUTO], "seeds": [0, 1, 2]})
    run_study(config, resume=True)
    assert all(p.read_bytes() == content for p, content in before.items())
    assert {n: r for n, (r, _) in _ranks(auto_study / "runs" / run_id_for(AUTO, 2)).items()} == \
        _stored_ranks(auto_study, AUTO)


def test_an_auto_arm_after_others_gives_what_it_gives_alone(auto_study, tiny_llama_dir, data, tmp_path):
    from loraplace.study.specs import run_id_for

    alone = tmp_path / "alone"
    _study(tiny_llama_dir, data, alone, [AUTO], seeds=[0], include_base=False)
    run_id = run_id_for(AUTO, 0)
    assert _ranks(alone / "runs" / run_id) == _ranks(auto_study / "runs" / run_id)
    assert _rows(alone)[run_id]["eval_loss"] == _rows(auto_study)[run_id]["eval_loss"]


def test_eva_and_adalora_arms_train_at_the_budget(tiny_llama_dir, data, tmp_path):
    from loraplace.study.allocations import allocation_path

    out = tmp_path / "s"
    # EVA's components need more selected tokens than components: all 40 training rows
    _study(tiny_llama_dir, data, out, ["attention", "eva~attention", "adalora~attention"], seeds=[0],
           **{"importance.batches": 5, "importance.batch_size": 8})
    rows = _rows(out)
    assert all(r["status"] == "ok" for r in rows.values()), [r["error"] for r in rows.values()]
    stored = json.loads(allocation_path(out, "eva~attention").read_text())
    # the initial A matrices are stored once, beside the allocation, with the allocation's ranks
    from safetensors.torch import load_file

    from loraplace.study.allocations import state_path

    state = load_file(state_path(out, "eva~attention"))
    assert {n: int(w.shape[0]) for n, w in state.items()} == stored["ranks"]
    from torch import nn
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    linear = {n: m.in_features + m.out_features for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n != "lm_head"}
    # EVA spends attention's parameters, not a rank: within one component (in + out) of the count
    # the attention arm trained, measured on its own run
    budget = rows["attention-s0"]["trainable_params"]
    assert rows["eva~attention-s0"]["trainable_params"] == sum(r * linear[n] for n, r in stored["ranks"].items())
    assert abs(rows["eva~attention-s0"]["trainable_params"] - budget) <= max(linear.values()) // 2
    assert len(set(stored["ranks"].values())) > 1  # EVA moved rank between modules
    # every module at the scale (alpha_over_r) of a uniform arm of the budget on EVA's kept modules
    uniform = round(budget / sum(linear[n] for n in stored["ranks"]))
    assert _ranks(out / "runs" / "eva~attention-s0") == {n: (r, 8.0 * r / uniform) for n, r in stored["ranks"].items()}
    adalora = json.loads((out / "runs" / "adalora~attention-s0" / "adalora.json").read_text())
    row = rows["adalora~attention-s0"]
    assert adalora["allocator_calls"] == 4  # once per optimizer step
    assert row["final_params"] == adalora["final_params"] < row["trainable_params"]
    # the final count, computed independently: each module's kept rank times (in + out + 1), with
    # the widths read off the model itself, and AdaLoRA's total rank budget met exactly
    widths = {n: m.in_features + m.out_features for n, m in model.named_modules() if n in adalora["final_ranks"]}
    assert len(widths) == len(adalora["final_ranks"]) == 14  # every linear module of full: 2 layers x 7
    assert row["final_params"] == sum(r * (widths[n] + 1) for n, r in adalora["final_ranks"].items())
    assert sum(adalora["final_ranks"].values()) == adalora["budget"]["rank_budget"]
    # EVA's pass over the data is in the report's cost of what ran before training, as the scores are
    import csv

    cost = {r["score"]: r for r in csv.DictReader((out / "report" / "tables" / "importance-cost.csv").open())}
    eva = cost["eva: eva~attention"]
    assert float(eva["seconds"]) == pytest.approx(stored["budget"]["seconds"]) and float(eva["seconds"]) > 0
    assert int(eva["forward_passes"]) == stored["budget"]["forward_passes"] > 0
    assert row["budget_target"] == rows["attention-s0"]["trainable_params"]
    # the final ranks, counted independently from the modules' norms file: pruned modules have rank < init_r
    norms = json.loads((out / "runs" / "adalora~attention-s0" / "adapter_norms.json").read_text())["modules"]
    assert {m["name"]: m["r"] for m in norms} == adalora["final_ranks"]


def test_plan_shows_an_auto_allocation_from_stored_scores(auto_study, tiny_llama_dir):
    result = CliRunner().invoke(app, ["plan", "-m", str(tiny_llama_dir), "-s", f"attention,{AUTO}", "--r", "4",
                                      "--alpha", "8", "--scores", str(auto_study / "importance"), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["strategy"]: r for r in json.loads(result.output)["strategies"]}
    # the same scores and budget give the placement the study trained
    assert {m["name"]: m["r"] for m in rows[AUTO]["modules"]} == _stored_ranks(auto_study, AUTO)
    missing = CliRunner().invoke(app, ["plan", "-m", str(tiny_llama_dir), "-s", AUTO, "--scores",
                                       str(auto_study / "nothing")])
    assert missing.exit_code == 2 and "no importance file" in missing.output
