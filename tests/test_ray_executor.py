"""The Ray executor on a local Ray instance (2 CPUs, two single-CPU workers) with a tiny
random-init model: the same results and files as the local executor, a worker killed mid-run,
an interrupted driver resumed, and the version check."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from loraplace.records import RUN_FILES

ray = pytest.importorskip("ray")

FAST = {"train.max_steps": 2, "train.batch_size": 4, "data.eval_size": 8, "train.eval_every": 1,
        "train.logging_steps": 1, "train.precision": "fp32", "device": "cpu"}
RAY = {"executor.kind": "ray", "executor.cpus_per_run": 1}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module (starting one costs seconds)."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from conftest import alpaca_rows

    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(alpaca_rows()))
    return path


def study(model, data, out, progress=None, resume=False, **values):
    from loraplace.config import load_study
    from loraplace.study.driver import run_study

    config = load_study(None, {"model": str(model), "dataset": str(data), "output": str(out), **FAST, **values})
    return run_study(config, resume=resume, progress=progress)


def local_then_ray(model, data, tmp_path, **values):
    """The same study locally at one torch thread (as a single-CPU worker: bit-equal float reductions),
    then on Ray: both folders."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = study(model, data, tmp_path / "local", **values)
    finally:
        torch.set_num_threads(threads)
    return local, study(model, data, tmp_path / "ray", **RAY, **values)


def rows(out):
    return {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}


def files(out):
    return sorted(p.relative_to(out).as_posix() for p in (out / "runs").rglob("*") if p.is_file())


class Recorder:
    """A StudyProgress that records what the driver reports."""

    def __init__(self):
        from loraplace.study.driver import StudyProgress

        self.events: list[tuple] = []
        for name in ("note", "run_started", "run_step", "run_ended"):
            setattr(self, name, self._make(name))
        self._base = StudyProgress()

    def _make(self, name):
        return lambda *args: self.events.append((name, *args))

    def __getattr__(self, name):
        return getattr(self._base, name)


@pytest.fixture(scope="module")
def local_and_ray(ray_cluster, tiny_llama_dir, data_file, tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("studies")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a single-CPU worker: the same float reductions, so bit-equal results
    keep = {"train.save_adapters": True}  # a binary run file (safetensors) to come back through Ray
    try:
        local = study(tiny_llama_dir, data_file, root / "local", **keep)
    finally:
        torch.set_num_threads(threads)
    progress = Recorder()
    remote = study(tiny_llama_dir, data_file, root / "ray", progress=progress, **RAY, **keep)
    return local, remote, progress


def test_ray_study_matches_the_local_one(local_and_ray):
    local, remote, _ = local_and_ray
    a, b = rows(local), rows(remote)
    assert sorted(a) == sorted(b) == ["attention-s0", "base", "ffn-s0", "full-s0"]
    for run_id in a:
        assert b[run_id]["status"] == "ok"
        assert b[run_id]["eval_loss"] == a[run_id]["eval_loss"], run_id
        assert b[run_id]["trainable_params"] == a[run_id]["trainable_params"]
        assert b[run_id]["position"] == a[run_id]["position"]
        ea = json.loads((local / "runs" / run_id / "eval_examples.json").read_text())
        eb = json.loads((remote / "runs" / run_id / "eval_examples.json").read_text())
        assert eb["nll_sum"] == ea["nll_sum"] and eb["n_tokens"] == ea["n_tokens"]
    # the same files in the same layout; run folders name the study's path, not the worker's temp folder
    assert files(local) == files(remote)
    # binary files come back byte for byte: the trained adapters (bit-equal training at equal threads)
    for run_id in ("full-s0", "attention-s0", "ffn-s0"):
        weights = [(out / "runs" / run_id / "adapter" / "adapter_model.safetensors").read_bytes() for out in (local, remote)]
        assert weights[0] == weights[1] and len(weights[0]) > 1000
    for run_id in b:
        config = json.loads((remote / "runs" / run_id / "config.json").read_text())
        assert config["run_dir"] == str(remote / "runs" / run_id)
    assert (remote / "report" / "report.html").is_file()
    assert not (remote / ".lock").exists()
    assert "executor" not in (remote / "study.yaml").read_text()  # how it ran is not what the study is


def test_ray_progress_reaches_the_driver(local_and_ray):
    _, _, progress = local_and_ray
    names = [e[0] for e in progress.events]
    order = [e[1].run_id for e in progress.events if e[0] == "run_started"]
    started = set(order)
    assert started == {"base", "full-s0", "attention-s0", "ffn-s0"}
    assert order[-1] == "base"  # trained runs are submitted first, the base row's evaluation last
    steps = [(e[1].run_id, e[2], e[3]) for e in progress.events if e[0] == "run_step"]
    assert ("full-s0", 2, 2) in steps and ("ffn-s0", 2, 2) in steps
    assert names.count("run_ended") == 4
    for run_id in started:  # each run's start comes before its steps and its end
        mine = [e[0] for e in progress.events if len(e) > 1 and getattr(e[1], "run_id", None) == run_id]
        assert mine[0] == "run_started" and mine[-1] == "run_ended"


def recording_executors(monkeypatch) -> list:
    """Make every RayExecutor the driver creates append itself to the returned list (to reach its
    workers' pids and retry counts)."""
    import loraplace.study.ray_executor as rx

    executors = []

    class Recording(rx.RayExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            executors.append(self)

    monkeypatch.setattr(rx, "RayExecutor", Recording)
    return executors


def test_tokenized_data_is_prepared_once_by_the_driver(ray_cluster, tiny_llama_dir, data_file, tmp_path, monkeypatch):
    """The workers get the driver's tokenized data from the object store: none tokenizes, and
    the driver tokenizes the study's data once for the three runs (base, two seeds)."""
    import loraplace.study.ray_executor as rx

    seen = {}

    class Counting(rx.RayExecutor):
        def close(self):
            if self.workers:
                seen["workers"] = self.ray.get([w.prepared.remote() for w in self.workers])
                seen["driver"] = self.ctx.prepared
            super().close()

    monkeypatch.setattr(rx, "RayExecutor", Counting)
    out = study(tiny_llama_dir, data_file, tmp_path / "s", **RAY, **{"train.max_length": 48, "strategies": ["full"],
                                                                       "seeds": [0, 1]})
    assert all(r["status"] == "ok" for r in rows(out).values())
    assert seen == {"workers": [0, 0], "driver": 1}


@pytest.mark.parametrize("arm, batches", [("auto[step=1]~attention", (2, 4)), ("eva~attention", (5, 8)),
                                          ("full[init=default_scaled]~attention", (5, 8))])
def test_automatic_and_eva_arms_train_the_studys_allocation_on_ray(ray_cluster, tiny_llama_dir, data_file, tmp_path,
                                                                   arm, batches, monkeypatch):
    """The study's allocations (auto scores, EVA's initial A matrices) are made once, on a worker
    (where the runs train: its device and precision), written by the driver and carried in each
    run's spec: on Ray the workers train the same ranks and reach the same numbers as the local
    executor, and the driver never loads the model. (EVA needs at least as many labelled
    scoring tokens as components; a data-driven init= is computed and carried the same way.)"""
    import loraplace.study.ray_executor as rx

    driver_models = []

    class Watching(rx.RayExecutor):
        def close(self):
            driver_models.append(len(self.ctx._models))
            super().close()

    monkeypatch.setattr(rx, "RayExecutor", Watching)

    values = {"strategies": [arm], "seeds": [0, 1], "include_base": False, "lora.r": 4, "lora.alpha": 8.0,
              "importance.batches": batches[0], "importance.batch_size": batches[1], "importance.max_rank": 16}
    local, remote = local_then_ray(tiny_llama_dir, data_file, tmp_path, **values)
    a, b = rows(local), rows(remote)
    assert sorted(a) == sorted(b) and len(a) == 2
    for run_id in a:
        assert a[run_id]["status"] == b[run_id]["status"] == "ok", (a[run_id]["error"], b[run_id]["error"])
        modules = [json.loads((out / "runs" / run_id / "modules.json").read_text())["modules"] for out in (local, remote)]
        ranks = [{m["name"]: (m["r"], m["alpha"]) for m in ms} for ms in modules]
        # the allocation's ranks, not the study's uniform lora.r=4 (what a worker without it would train)
        assert ranks[0] == ranks[1] and any(r != 4 for r, _ in ranks[0].values())
        assert b[run_id]["eval_loss"] == a[run_id]["eval_loss"], run_id
    assert driver_models == [0]  # the allocation ran on a worker: no model copy on the driver
    assert sorted(p.name for p in (remote / "allocations").iterdir()) == sorted(p.name for p in (local / "allocations").iterdir())


def test_killed_worker_is_replaced_and_its_run_retried(ray_cluster, tiny_llama_dir, data_file, tmp_path, monkeypatch):
    executors = recording_executors(monkeypatch)
    killed = []

    class Killer(Recorder):
        def __init__(self):
            super().__init__()
            self.run_started = self._kill_at_start

        def _kill_at_start(self, spec, k):
            self.events.append(("run_started", spec, k))
            if spec.run_id == "full-s0" and not killed:  # kill the worker that just started full-s0
                pid = executors[0].running[spec.run_id]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    progress = Killer()
    out = study(tiny_llama_dir, data_file, tmp_path / "s", progress=progress,
                **{**RAY, "train.max_steps": 20, "train.eval_every": 0})
    assert killed
    runs = rows(out)
    assert sorted(runs) == ["attention-s0", "base", "ffn-s0", "full-s0"]
    assert all(r["status"] == "ok" for r in runs.values()), {k: r["error"] for k, r in runs.items()}
    assert executors[0].retries == {"full-s0": 1}
    notes = [e[1] for e in progress.events if e[0] == "note"]
    assert any("full-s0" in n and "retrying" in n for n in notes), notes
    assert files(out) == sorted(f"runs/{r}/{name}" for r in runs for name in RUN_FILES
                                if not (r == "base" and name in ("train_log.json", "adapter_norms.json")))


def test_isolated_ray_runs_each_get_a_new_worker_process(ray_cluster, tiny_llama_dir, data_file, tmp_path,
                                                         monkeypatch):
    """``executor.isolate``: a worker is replaced after each run, so no two runs share a process."""
    executors = recording_executors(monkeypatch)
    out = study(tiny_llama_dir, data_file, tmp_path / "s", strategies=["attention", "ffn"],
                **{**RAY, "executor.isolate": True, "train.eval_every": 0})
    runs = rows(out)
    assert all(r["status"] == "ok" for r in runs.values()), {k: r["error"] for k, r in runs.items()}
    pids = executors[0].running
    assert sorted(pids) == sorted(runs) == ["attention-s0", "base", "ffn-s0"]
    assert len(set(pids.values())) == 3


def test_run_failed_after_max_retries(ray_cluster, tiny_llama_dir, data_file, tmp_path, monkeypatch):
    """A run whose worker dies every time is recorded as failed with the reason; the rest goes on."""
    executors = recording_executors(monkeypatch)

    class Killer(Recorder):
        def __init__(self):
            super().__init__()
            self.run_started = self._kill

        def _kill(self, spec, k):
            if spec.run_id == "attention-s0":
                os.kill(executors[0].running[spec.run_id], signal.SIGKILL)

    out = study(tiny_llama_dir, data_file, tmp_path / "s", progress=Killer(), strategies="full,attention",
                include_base=False, **{**RAY, "executor.max_retries": 1, "train.max_steps": 20, "train.eval_every": 0})
    runs = rows(out)
    assert runs["full-s0"]["status"] == "ok"
    assert runs["attention-s0"]["status"] == "failed"
    assert "worker died 2 times" in runs["attention-s0"]["error"]
    assert (out / "runs" / "attention-s0" / "error.txt").is_file()


def test_interrupted_ray_driver_resumes_without_losing_a_run(ray_cluster, tiny_llama_dir, data_file, tmp_path):
    from loraplace.study.driver import StudyInterrupted

    class StopAfterFirst(Recorder):
        def __init__(self):
            super().__init__()
            self.run_ended = self._stop

        def _stop(self, result, k, seconds):
            self.events.append(("run_ended", result))
            raise KeyboardInterrupt

    out = tmp_path / "s"
    with pytest.raises(StudyInterrupted) as info:
        study(tiny_llama_dir, data_file, out, progress=StopAfterFirst(), **RAY)
    assert info.value.finished == 1
    first = rows(out)
    assert len(first) == 1 and not (out / ".lock").exists()
    (run_id, row), = first.items()
    assert ray.is_initialized()  # the test's Ray was not shut down by the executor
    # resume with the local executor: switching executors is no config change; the workers trained at
    # one thread (their one CPU), so the local resume runs at one thread too (another count is refused)
    progress = Recorder()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        study(tiny_llama_dir, data_file, out, progress=progress, resume=True)
    finally:
        torch.set_num_threads(threads)
    after = rows(out)
    assert sorted(after) == ["attention-s0", "base", "ffn-s0", "full-s0"]
    assert after[run_id]["finished_at"] == row["finished_at"]  # kept, not run again
    assert run_id not in {e[1].run_id for e in progress.events if e[0] == "run_started"}


def test_version_mismatch_is_refused(ray_cluster, tiny_llama_dir, data_file, tmp_path, monkeypatch):
    import loraplace.study.ray_executor as rx
    from loraplace.errors import LoraplaceError

    real = rx.library_versions  # the driver's versions; the workers report the real ones
    monkeypatch.setattr(rx, "library_versions", lambda: {**real(), "loraplace": "9.9.9"})
    out = tmp_path / "s"
    with pytest.raises(LoraplaceError) as info:
        study(tiny_llama_dir, data_file, out, **RAY)
    message = str(info.value)
    assert "loraplace 9.9.9" in message and f"loraplace {real()['loraplace']}" in message
    assert "\n" not in message
    assert not (out / "results.json").exists() and not (out / ".lock").exists()


@pytest.mark.parametrize("address", [None, "local", "auto"])
def test_close_shuts_down_the_ray_this_executor_initialised(address, monkeypatch):
    """``--ray-address local`` starts a Ray instance of its own: close() must stop it (it was left
    running in the process). A Ray the process had before the executor is left as it was."""
    from loraplace.config import ExecutorSettings
    from loraplace.study import ray_executor

    calls = []
    state = {"up": False}

    class FakeRay:
        def is_initialized(self):
            return state["up"]

        def init(self, address=None, **kwargs):
            calls.append(("init", address))
            state["up"] = True

        def shutdown(self):
            calls.append(("shutdown",))
            state["up"] = False

    monkeypatch.setattr(ray_executor, "_import_ray", FakeRay)
    ex = ray_executor.RayExecutor(ExecutorSettings(kind="ray", address=address))
    ex._connect()
    ex.close()
    assert calls == [("init", address), ("shutdown",)] and not state["up"]
    calls.clear()
    state["up"] = True  # the process had a Ray already: joined, not shut down
    ex = ray_executor.RayExecutor(ExecutorSettings(kind="ray", address=address))
    ex._connect()
    ex.close()
    assert calls == [] and state["up"]


def test_version_mismatch_names_the_library():
    from loraplace.study.ray_executor import version_mismatch

    driver = {"loraplace": "0.1.0", "torch": "2.13.0", "transformers": "5.0", "peft": "0.17"}
    assert version_mismatch(driver, {"versions": dict(driver)}) is None
    line = version_mismatch(driver, {"host": "n1", "pid": 7, "versions": {**driver, "torch": "2.12.0"}})
    assert "torch 2.12.0" in line and "torch 2.13.0" in line and "n1" in line


def test_cli_executor_options_set_the_executor_settings():
    from loraplace.config import load_study

    config = load_study(None, {"executor.kind": "ray", "executor.address": "auto", "executor.gpus_per_run": 0.5})
    assert config.executor.kind == "ray" and config.executor.address == "auto"
    assert "executor" not in config.model_dump()


def test_cli_runs_a_study_on_ray(ray_cluster, tiny_llama_dir, data_file, tmp_path):
    from typer.testing import CliRunner

    from loraplace.cli import app

    out = tmp_path / "s"
    args = ["run", "--model", str(tiny_llama_dir), "--dataset", str(data_file), "-o", str(out), "--strategies", "qv",
            "--executor", "ray", "include_base=false", "executor.cpus_per_run=1",
            *(f"{k}={v}" for k, v in FAST.items())]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert rows(out)["qv-s0"]["status"] == "ok"
    assert ray.is_initialized()  # a Ray this command did not start is left running

    bad = CliRunner().invoke(app, ["run", "--executor", "spark", "-o", str(tmp_path / "t")])
    assert bad.exit_code == 2 and "executor.kind" in bad.output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("address", ["ray://127.0.0.1:1", "ray://127.0.0.1", "127.0.0.1:1"])
def test_an_unreachable_ray_client_address_gets_one_line(tiny_llama_dir, data_file, tmp_path, address):
    """A ray:// or HOST:PORT address where nothing answers is refused in seconds, naming it (Ray
    Client alone retries for about 30 s, ray.init for minutes). Needs no running Ray; Ray Client
    comes with the ray extra."""
    import time

    from typer.testing import CliRunner

    from loraplace.cli import app

    pytest.importorskip("grpc")  # ray[client]: the extra installs it
    if address == "ray://127.0.0.1":  # the default client port: only meaningful where nothing listens on it
        import socket

        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", 10001)) == 0:
                pytest.skip("something listens on port 10001 here")
    start = time.monotonic()
    result = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), "--dataset", str(data_file),
                                      "-o", str(tmp_path / "s"), "--executor", "ray", "--ray-address", address])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"nothing answers at {address}" in message and "Traceback" not in message
    assert time.monotonic() - start < 30


def test_halving_on_ray_equals_halving_locally(ray_cluster, tiny_llama_dir, data_file, tmp_path):
    """A tuned study (3 rates, halving to one) on Ray chooses and measures what it does locally at
    equal threads: the continued rung starts on a worker from the checkpoint the driver carries."""
    tuned = {"strategies": "attention", "include_base": False, "train.max_steps": 4, "train.eval_every": 0,
             "data.validation_size": 8, "tune.lr": [1e-4, 1e-3, 1e-2]}
    local, remote = local_then_ray(tiny_llama_dir, data_file, tmp_path, **tuned)
    a, b = rows(local), rows(remote)
    assert sorted(a) == sorted(b) and len([r for r in a if r.startswith("tune-")]) == 3
    for run_id, r in a.items():
        assert b[run_id]["status"] == "ok"
        assert b[run_id]["validation_losses"] == r["validation_losses"], run_id
        assert b[run_id]["eval_loss"] == r["eval_loss"], run_id
    finals = [r for r in b.values() if r["kind"] == "tune" and r["eval_loss"] is not None]
    assert len(finals) == 1 and sorted(finals[0]["validation_losses"], key=int) == ["1", "4"]
