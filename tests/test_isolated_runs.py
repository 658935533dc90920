"""``executor.isolate``: each run of the local executor in a fresh process. The same results as in
this process; a run whose process is killed is recorded as failed and the study goes on; bad
input still reaches the caller as one LoraplaceError; Ctrl-C stops the run's process."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
from test_run_independence import _nlls, _spec

from loraplace.config import load_study
from loraplace.errors import LoraplaceError
from loraplace.records import RunSpec
from loraplace.run.context import RunContext
from loraplace.study.driver import run_study
from loraplace.study.executor import LocalExecutor
from loraplace.study.progress import StudyProgress
from loraplace.study.runs import execute_run


def _killed_when_named_crash(spec: RunSpec, ctx: RunContext, on_step=None):
    """A run job that dies like a process the OS kills when out of memory (SIGKILL) for the run ``crash``."""
    if spec.run_id == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    return execute_run(spec, ctx, on_step=on_step)


class _CrashingExecutor(LocalExecutor):
    run_job = staticmethod(_killed_when_named_crash)


def test_isolated_run_equals_the_run_in_this_process(tiny_llama_dir, alpaca_file, tmp_path):
    spec = _spec(tiny_llama_dir, alpaca_file, "attention", tmp_path / "here")
    alone = _spec(tiny_llama_dir, alpaca_file, "attention", tmp_path / "isolated")
    steps = []
    here = execute_run(spec, RunContext())
    [isolated] = LocalExecutor(isolate=True, on_step=lambda s, step, total, loss: steps.append((s.run_id, step, total))
                               ).submit([alone])
    assert here.status == isolated.status == "ok", isolated.error
    assert isolated.trainable_params == here.trainable_params
    assert isolated.eval_loss == here.eval_loss
    assert isolated.final_train_loss == here.final_train_loss
    assert _nlls(alone.run_dir) == _nlls(spec.run_dir)
    assert (Path(alone.run_dir) / "result.json").is_file()
    assert steps[-1] == ("attention", 3, 3)  # progress comes back to this process
    assert multiprocessing.active_children() == []


def test_killed_run_is_failed_and_the_next_runs(tiny_llama_dir, alpaca_file, tmp_path):
    crash = _spec(tiny_llama_dir, alpaca_file, "attention", tmp_path, name="crash")
    after = _spec(tiny_llama_dir, alpaca_file, "ffn", tmp_path, name="after")
    failed, ok = _CrashingExecutor(isolate=True).submit([crash, after])
    assert failed.status == "failed" and failed.run_id == "crash"
    assert failed.error == "the run's process was killed by signal 9 (SIGKILL: out of memory?)"
    assert (Path(crash.run_dir) / "error.txt").read_text().strip() == failed.error
    assert ok.status == "ok", ok.error
    assert ok.eval_loss is not None


def test_input_error_in_the_run_process_is_a_loraplace_error(tmp_path, alpaca_file):
    spec = _spec(tmp_path / "no-such-model", alpaca_file, "attention", tmp_path)
    with pytest.raises(LoraplaceError) as here:
        execute_run(spec, RunContext(allow_fetch=False))
    with pytest.raises(LoraplaceError) as isolated:
        list(LocalExecutor(isolate=True, allow_fetch=False).submit([spec]))
    assert str(isolated.value) == str(here.value)
    assert multiprocessing.active_children() == []


def test_ctrl_c_stops_the_run_process(tiny_llama_dir, alpaca_file, tmp_path):
    def interrupt(spec, step, total, loss):
        raise KeyboardInterrupt

    spec = _spec(tiny_llama_dir, alpaca_file, "attention", tmp_path, max_steps=50)
    with pytest.raises(KeyboardInterrupt):
        list(LocalExecutor(isolate=True, on_step=interrupt).submit([spec]))
    assert multiprocessing.active_children() == []


def test_isolated_study_stores_its_runs_and_reports_their_steps(tiny_llama_dir, alpaca_file, tmp_path):
    """``run_study`` with ``executor.isolate`` (the default; the suite's conftest turns it off): the
    runs' rows are stored and their progress reaches the driver's StudyProgress."""
    events = []

    class Progress(StudyProgress):
        def run_started(self, spec, k):
            events.append(("started", spec.run_id))

        def run_step(self, spec, step, total, loss):
            events.append(("step", spec.run_id, step, total))

    config = load_study(None, {
        "model": str(tiny_llama_dir), "dataset": str(alpaca_file), "output": str(tmp_path / "study"),
        "strategies": ["attention"], "include_base": True, "device": "cpu", "train.max_steps": 2,
        "train.batch_size": 4, "train.max_length": 64, "train.eval_every": 0, "train.precision": "fp32",
        "data.eval_size": 8, "executor.isolate": True})
    rows = json.loads((run_study(config, progress=Progress()) / "results.json").read_text())["runs"]
    assert sorted(r["run_id"] for r in rows) == ["attention-s0", "base"]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert ("started", "attention-s0") in events and ("step", "attention-s0", 2, 2) in events
    assert multiprocessing.active_children() == []
