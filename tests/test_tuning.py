"""Learning-rate tuning (loraplace.tuning, the driver's halving, the report's choices): the rung
schedule and its cost, choices that read validation losses only, the edge-of-grid flag, Kendall's
tau against scipy, bad tuning input in one line, and a tuned study that is killed and resumed
losing no rung (and equal to one run straight through)."""

from __future__ import annotations

import json
import math

import pytest

from loraplace.config import load_study
from loraplace.errors import LoraplaceError
from loraplace.records import RunResult
from loraplace.report.stats import kendall
from loraplace.tuning import alive_rates, choose, rung_sizes, rung_steps, survivors_count


def row(arm, lr, seed, losses, eval_loss=None, steps=None):
    return RunResult(run_id=f"tune-{arm}-lr{lr:g}-s{seed}", kind="tune", strategy=arm, seed=seed, status="ok",
                     model="m", dataset="d", tune_lr=lr, validation_losses={str(k): v for k, v in losses.items()},
                     eval_loss=eval_loss, train_steps=steps or max(losses, default=0))


def test_rung_schedule_and_its_cost_by_hand():
    # 4 rates, eta 3: 4 -> 2 -> 1, rungs T/9, T/3, T
    assert rung_steps(90, 4, 3) == [10, 30, 90]
    assert [survivors_count(n, 3) for n in (4, 3, 2, 1)] == [2, 1, 1, 1]
    # cost: 4 x 10 + 2 x 20 + 1 x 60 = 140 arm-steps against the grid's 360 (0.39x)
    steps = rung_steps(90, 4, 3)
    alive = [4, 2, 1]
    cost = sum(n * (s - (steps[k - 1] if k else 0)) for k, (n, s) in enumerate(zip(alive, steps)))
    assert cost == 140 and cost / (4 * 90) < 0.4
    assert rung_steps(40, 5, 2) == [5, 10, 20, 40]  # 5 -> 3 -> 2 -> 1
    assert rung_steps(4, 9, 3) == [1, 4]  # rungs that would round to the same step merge
    assert rung_steps(40, 4, 3, "grid") == [40]
    # a minimum first rung (Hyperband's minimum resource): 32/9 -> 4 is raised to 8; with 12 the second
    # rung (32/3 -> 11) merges into the first, and two rates train to the end
    assert rung_steps(32, 4, 3, min_steps=8) == [8, 11, 32]
    assert rung_steps(32, 4, 3, min_steps=12) == [12, 32] and rung_sizes(32, 4, 3, min_steps=12) == [4, 2]


def test_halving_keeps_the_best_by_mean_validation_loss_over_seeds():
    rates = [1e-4, 1e-3, 1e-2]
    rows = [row("full", 1e-4, 0, {3: 2.0}), row("full", 1e-4, 1, {3: 2.0}),
            row("full", 1e-3, 0, {3: 1.0}), row("full", 1e-3, 1, {3: 3.5}),  # mean 2.25: worse than 1e-4
            row("full", 1e-2, 0, {3: 1.5}), row("full", 1e-2, 1, {3: 1.6})]
    assert alive_rates(rows, "full", rates, [3, 9], 0, 3) == rates
    assert alive_rates(rows, "full", rates, [3, 9], 1, 3) == [1e-2]
    # a failed seed (no loss at the rung) puts its rate last
    failed = rows[:4] + [row("full", 1e-2, 0, {3: 0.5}), row("full", 1e-2, 1, {})]
    assert alive_rates(failed, "full", rates, [3, 9], 1, 3) == [1e-4]


def test_choice_reads_validation_never_test_losses():
    rates = [1e-4, 1e-3]
    rows = [row("a", 1e-4, 0, {10: 1.2}, eval_loss=0.5), row("a", 1e-3, 0, {10: 1.1}, eval_loss=9.0)]
    assert choose(rows, "a", rates, [10], 3).lr == 1e-3
    # any test losses at all, even reversed or missing: the same choice
    for evals in ((9.0, 0.5), (None, None), (0.1, 0.1)):
        changed = [r.model_copy(update={"eval_loss": e}) for r, e in zip(rows, evals)]
        assert choose(changed, "a", rates, [10], 3).lr == 1e-3


def test_edge_of_grid_flag():
    rates = [1e-4, 1e-3, 1e-2]
    losses = {1e-4: 2.0, 1e-3: 1.0, 1e-2: 3.0}
    middle = choose([row("a", lr, 0, {5: v}) for lr, v in losses.items()], "a", rates, [5], 3)
    assert middle.lr == 1e-3 and middle.edge is None
    high = choose([row("a", lr, 0, {5: -v}) for lr, v in losses.items()], "a", rates, [5], 3)
    assert high.lr == 1e-2 and high.edge == "high"
    low = choose([row("a", lr, 0, {5: lr}) for lr in rates], "a", rates, [5], 3)
    assert low.lr == 1e-4 and low.edge == "low"


@pytest.mark.parametrize("x,y,tau", [
    ([1, 2, 3, 4], [1, 3, 2, 4], (5 - 1) / 6),  # 6 pairs, one discordant
    ([0.3, 0.1, 0.2], [0.2, 0.1, 0.3], (2 - 1) / 3),
    ([1, 2, 2], [1, 2, 3], 2 / math.sqrt(2 * 3)),  # tau-b: one tie in x, (C - D) / sqrt((n0 - ties_x) n0)
    ([1, 2, 3], [5, 5, 5], None), ([1], [2], None)])
def test_kendall_tau_by_hand(x, y, tau):
    got = kendall(x, y)
    assert got == tau if tau is None else math.isclose(got, tau, abs_tol=1e-12)


@pytest.mark.parametrize("value,message", [
    ("[]", "tune.lr: is empty"),
    ("[-1e-4, 2e-4]", "must be positive"),
    ("{min: 1e-3, max: 1e-4, n: 4}", "must be below max"),
    ("[1e-4]", "tuning needs at least 2"),
    ("[1e-4, 1e-4]", "repeats a rate"),
    ("{min: 1e-4, max: 1e-3}", "n: Field required"),
])
def test_bad_tuning_input_gets_one_line(value, message):
    import yaml

    with pytest.raises(LoraplaceError, match=message) as e:
        load_study(None, {"tune.lr": yaml.safe_load(value), "data.validation_size": 10})
    assert "\n" not in str(e.value)
    with pytest.raises(LoraplaceError, match="data.validation_size is 0"):
        load_study(None, {"tune.lr": [1e-4, 1e-3]})


def test_log_grid_spans_its_ends():
    config = load_study(None, {"tune.lr": {"min": 1e-4, "max": 1.6e-3, "n": 5}, "data.validation_size": 10})
    assert config.tune.rates() == [1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]


# ------------------------------------------------------------------------------ a study, killed and resumed
TUNED = {"strategies": ["attention"], "include_base": False, "train.max_steps": 6, "train.batch_size": 4,
         "train.eval_every": 0, "train.logging_steps": 1, "train.precision": "fp32", "train.max_length": 64,
         "data.eval_size": 8, "data.validation_size": 8, "tune.lr": [1e-4, 1e-3, 1e-2], "device": "cpu"}


def _study(model, data, out, resume=False):
    from loraplace.study.driver import run_study

    return run_study(load_study(None, {"model": str(model), "dataset": str(data), "output": str(out), **TUNED}),
                     resume=resume)


def _rows(out):
    return {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}


def test_killed_tuned_study_resumes_without_losing_a_rung(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    from loraplace.study import executor
    from loraplace.study.progress import StudyInterrupted

    straight = _study(tiny_llama_dir, alpaca_file, tmp_path / "straight")
    real, calls = executor.execute_run, []

    def counting(spec, ctx, on_step=None):
        if spec.kind == "tune" and len(calls) == 2:  # the third tuning run of the first rung: Ctrl-C
            raise KeyboardInterrupt
        calls.append((spec.run_id, spec.tune.rung if spec.tune else None))
        return real(spec, ctx, on_step=on_step)

    monkeypatch.setattr(executor, "execute_run", counting)
    with pytest.raises(StudyInterrupted):
        _study(tiny_llama_dir, alpaca_file, tmp_path / "killed")
    assert [c for c in calls if c[1] is not None] == [("tune-attention-lr0.0001-s0", 0)]
    calls.append("resume")
    _study(tiny_llama_dir, alpaca_file, tmp_path / "killed", resume=True)
    after = calls[calls.index("resume") + 1:]
    # the finished rung-0 run is not redone; the two left and the survivor's second rung run once each
    assert sorted(after) == sorted([("tune-attention-lr0.001-s0", 0), ("tune-attention-lr0.01-s0", 0),
                                    (next(c[0] for c in after if c[1] == 1), 1)])
    a, b = _rows(straight), _rows(tmp_path / "killed")
    assert sorted(a) == sorted(b)
    for run_id, r in a.items():
        assert b[run_id]["validation_losses"] == r["validation_losses"], run_id
        assert b[run_id]["eval_loss"] == r["eval_loss"], run_id
    tuned = [r for r in a.values() if r["kind"] == "tune"]
    finals = [r for r in tuned if r["eval_loss"] is not None]
    # one rate reached the last step (6) after rung 0 at step 2; only it has a test loss
    assert len(finals) == 1 and finals[0]["train_steps"] == 6 and sorted(finals[0]["validation_losses"]) == ["2", "6"]
    assert all(r["eval_loss"] is None and list(r["validation_losses"]) == ["2"] for r in tuned if r not in finals)
    best = min(tuned, key=lambda r: r["validation_losses"]["2"])
    assert finals[0]["run_id"] == best["run_id"]
    assert not any((tmp_path / "killed" / "runs" / r / "trainer").exists() for r in b if r.startswith("tune-"))
    report = (tmp_path / "killed" / "report" / "report.md").read_text()
    assert "## Learning-rate tuning" in report
    # the recommendation judges the arm at its tuned rate (the final's test loss), not at train.lr
    recs = json.loads((tmp_path / "killed" / "report" / "recommendations.json").read_text())
    best = next(r for group in recs.values() for r in group if r["kind"] == "best")["numbers"]
    untuned = [r for r in a.values() if r["kind"] == "lora"]
    assert best["strategy"] == "attention" and best["eval_loss"] == finals[0]["eval_loss"]
    assert len(untuned) == 1 and untuned[0]["eval_loss"] != finals[0]["eval_loss"]


def test_tuned_study_without_untuned_runs_reads_tuned_rates_throughout(tiny_llama_dir, alpaca_file, tmp_path):
    """``tune.untuned: false`` trains only the tuning runs; the report's tables and recommendations
    then read each arm at its chosen rate; a resume with ``tune.untuned=true`` adds the untuned runs."""
    import csv

    from loraplace.study.driver import run_study

    out = tmp_path / "s"
    values = {"model": str(tiny_llama_dir), "dataset": str(alpaca_file), "output": str(out), **TUNED,
              "strategies": ["attention", "ffn"], "tune.untuned": False}
    run_study(load_study(None, values))
    rows = _rows(out)
    assert {r["kind"] for r in rows.values()} == {"tune"}  # no arm at train.lr
    finals = {r["strategy"]: r for r in rows.values() if r["eval_loss"] is not None}
    assert sorted(finals) == ["attention", "ffn"] and all(r["train_steps"] == 6 for r in finals.values())
    summary = {r["strategy"]: r for r in csv.DictReader((out / "report" / "tables" / "summary.csv").open())}
    for arm, final in finals.items():  # each arm's row is its final tuning run (one seed)
        assert float(summary[arm]["eval_loss_mean"]) == pytest.approx(final["eval_loss"], abs=1e-9)
    recs = json.loads((out / "report" / "recommendations.json").read_text())
    best = next(r for group in recs.values() for r in group if r["kind"] == "best")["numbers"]
    assert best["eval_loss"] == min(r["eval_loss"] for r in finals.values())
    report = (out / "report" / "report.md").read_text()
    assert "no arm trained at train.lr" in report and not (out / "report" / "tables" / "robustness.md").exists()
    # a resume may add the untuned runs; the tuning is not redone and the robustness table appears
    from loraplace.study.progress import StudyProgress

    class Planned(StudyProgress):
        def planned(self, study, study_dir, total, finished, kept):
            seen.append((total, finished, kept))

    seen = []
    run_study(load_study(None, {**values, "tune.untuned": True}), resume=True, progress=Planned())
    # 2 untuned runs to do + 2 arms x (3 rates in rung 0 + 1 in rung 1) = 8 tuning runs, all finished;
    # the stored tuning runs are this study's, not "other stored runs"
    assert seen[0] == (10, 8, 0)
    again = _rows(out)
    assert sorted(r["run_id"] for r in again.values() if r["kind"] == "lora") == ["attention-s0", "ffn-s0"]
    assert all(again[k]["validation_losses"] == r["validation_losses"] for k, r in rows.items())
    assert (out / "report" / "tables" / "robustness.md").exists()
    summary = {r["strategy"]: r for r in csv.DictReader((out / "report" / "tables" / "summary.csv").open())}
    assert float(summary["ffn"]["eval_loss_mean"]) == pytest.approx(again["ffn-s0"]["eval_loss"], abs=1e-9)


def test_rung_sizes():
    from loraplace.tuning import rung_sizes

    assert rung_sizes(90, 4, 3) == [4, 2, 1]
    assert rung_sizes(40, 5, 2) == [5, 3, 2, 1]
    assert rung_sizes(40, 4, 3, "grid") == [4]


def test_ray_pool_is_sized_for_the_tuning_runs(tiny_llama_dir, alpaca_file, tmp_path, monkeypatch):
    """A tuned study on Ray asks for room for every run it may have in flight: its tuning runs
    (arms x seeds x rates) as well as the runs at train.lr it plans (none with tune.untuned false)."""
    from loraplace.study import ray_executor
    from loraplace.study.driver import run_study

    class Started(Exception):
        pass

    class Recording:
        def __init__(self, settings, on_note=None):
            pass

        def start(self, device, precision, runs):
            seen.append(runs)
            raise Started

        def close(self):
            pass

    seen = []
    monkeypatch.setattr(ray_executor, "RayExecutor", Recording)
    values = {"model": str(tiny_llama_dir), "dataset": str(alpaca_file), **TUNED, "executor.kind": "ray",
              "strategies": ["attention", "ffn"], "seeds": [0, 1]}
    for untuned in (False, True):
        with pytest.raises(Started):
            run_study(load_study(None, {**values, "output": str(tmp_path / f"s{untuned}"), "tune.untuned": untuned}))
    assert seen == [2 * 2 * 3, 2 * 2 * 3 + 2 * 2]
