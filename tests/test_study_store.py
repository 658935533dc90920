"""The study folder: resume keeps every finished run, pins what ``auto`` resolved to, run ids are
injective and checked against their specs, files are written atomically under a lock, arm order
rotates per seed, and the command line's new-user paper cuts."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loraplace.cli import app
from loraplace.config import load_study, study_name_for
from loraplace.errors import LoraplaceError
from loraplace.files import atomic_write_text
from loraplace.records import RunResult
from loraplace.study.specs import default_output_dir, legacy_run_id_for, run_id_for, run_specs
from loraplace.study.store import StudyLock, StudyStore, merge_configs, with_baseline_fields

runner = CliRunner()
FAST = ["train.max_steps=2", "train.batch_size=4", "data.eval_size=8", "train.eval_every=0", "train.logging_steps=1",
        "train.precision=fp32"]


def run_cli(*args):
    result = runner.invoke(app, ["run", *args])
    return result.exit_code, result.output


def _rows(study_dir):
    return json.loads((study_dir / "results.json").read_text())["runs"]


def _one_line_error(code, output, *fragments):
    assert code == 2, output
    assert "Traceback" not in output and output.strip().startswith("error:"), output
    flat = " ".join(output.split())
    for fragment in fragments:
        assert fragment in flat, output


# --------------------------------------------------------------------------------- run ids
def test_run_ids_are_injective_safe_and_plain_ids_unchanged():
    assert run_id_for("full", 0) == "full-s0" and run_id_for("attention~full", 0) == "attention~full-s0"
    assert run_id_for("attn-o", 3) == "attn-o-s3" and run_id_for("mlp.gate_up", 1) == "mlp.gate_up-s1"
    labels = ["attn.*", "attn.?", "attn._", "attn.q|attn.v", "attn.q/attn.v", "attention@last:1/2",
              "attention@last:1_2", "ffn[r=8]+attention[r=16]", "ffn(r=8)+attention(r=16)", "qv@0-11"]
    ids = [run_id_for(label, 0) for label in labels]
    assert len(set(ids)) == len(ids), ids  # attn.* and attn.? shared 'attn._-s0' before
    for run_id in ids:
        # no character Linux, macOS or Windows forbid in a folder name, none a shell expands
        assert not set(run_id) & set('<>:"/\\|?*[] '), run_id
    assert run_id_for("attn.*", 0).startswith("attn._.") and run_id_for("attn.*", 0) == run_id_for("attn.*", 0)
    assert legacy_run_id_for("attn.*", 0) == legacy_run_id_for("attn.?", 0) == "attn._-s0"
    # Two strategies whose ids used to clash now make a study with distinct run folders.
    config = load_study(None, {"strategies": "attn.*,attn.?", "include_base": False})
    specs = run_specs(config, Path("/tmp/x"))
    assert len({s.run_id for s in specs}) == len({s.run_dir for s in specs}) == 2


def test_arm_order_rotates_per_seed_and_positions_follow_it(tmp_path):
    config = load_study(None, {"strategies": "full,attention,ffn", "seeds": "0,1,2"})
    specs = run_specs(config, tmp_path)
    assert specs[0].run_id == "base"
    order = [s.run_id for s in specs[1:]]
    assert order == ["full-s0", "attention-s0", "ffn-s0",
                     "attention-s1", "ffn-s1", "full-s1",
                     "ffn-s2", "full-s2", "attention-s2"]
    firsts = {specs[1 + 3 * i].strategy for i in range(3)}
    assert firsts == {"full", "attention", "ffn"}  # each arm runs first for one seed
    assert [s.position for s in specs] == list(range(len(specs)))
    assert [s.model_dump() for s in run_specs(config, tmp_path)] == [s.model_dump() for s in specs]  # deterministic


# ------------------------------------------------------------------------- cross-run fields
def _row(run_id, kind="lora", strategy=None, seed=0, status="ok", loss=1.0, **kw):
    return RunResult(run_id=run_id, kind=kind, strategy=strategy or run_id.rsplit("-s", 1)[0], seed=seed,
                     status=status, model="m", dataset="d", eval_loss=loss if status == "ok" else None,
                     trainable_params=10 if kind == "lora" else 0, **kw)


def test_worse_than_base():
    rows = [_row("base", kind="base", strategy="base", loss=2.0), _row("full-s0", loss=1.5),
            _row("ffn-s0", loss=2.5), _row("qv-s0", loss=2.0), _row("attention-s0", status="failed")]
    out = {r.run_id: r.worse_than_base for r in with_baseline_fields(rows)}
    assert out == {"base": None, "full-s0": False, "ffn-s0": True, "qv-s0": False, "attention-s0": None}
    no_base = with_baseline_fields(rows[1:])
    assert all(r.worse_than_base is None for r in no_base)
    failed_base = with_baseline_fields([_row("base", kind="base", strategy="base", status="failed")] + rows[1:])
    assert all(r.worse_than_base is None for r in failed_base)


# ---------------------------------------------------------------------------- atomic files
def test_atomic_write_crash_keeps_the_old_file_and_no_temp_files(tmp_path, monkeypatch):
    config = load_study(None, {"strategies": "full", "output": str(tmp_path)})
    store = StudyStore(tmp_path)
    store.init(config, resume=False)
    store.record(_row("full-s0", loss=1.25))
    before = (tmp_path / "results.json").read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.record(_row("attention-s0", strategy="attention", loss=1.5))
    monkeypatch.undo()
    assert (tmp_path / "results.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json", "results.md", "study.yaml"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # a write that fails before the rename cleans up too
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "results.json", "{}")
    monkeypatch.undo()
    assert (tmp_path / "results.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else None)
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write_text(tmp_path / "a.json", "x")
    assert (tmp_path / "a.json").read_text() == "x"
    if os.path.exists("/proc/self/fd"):
        assert synced == [False, True]  # the file, then its folder
    else:
        assert len(synced) >= 1


# ------------------------------------------------------------------------------------ lock
LOCK_SNIPPET = textwrap.dedent("""
    import sys, time
    from loraplace.study.store import StudyLock
    with StudyLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_process_is_refused(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", LOCK_SNIPPET, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LoraplaceError, match=rf"in use by another loraplace run \(pid {proc.pid} on this host"):
            StudyLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    # the holder was killed (no cleanup): its lock is stale now and is taken over with a note
    lock = StudyLock(tmp_path).acquire()
    assert lock.note and f"pid {proc.pid} is no longer running" in lock.note
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_stale_and_foreign_locks(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with StudyLock(tmp_path) as lock:
        assert "no longer running" in lock.note
        assert (tmp_path / ".lock").exists()
    assert not (tmp_path / ".lock").exists()
    # a live pid on this host (our parent) without a start time: refused
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(LoraplaceError, match="in use by another loraplace run"):
        StudyLock(tmp_path).acquire()
    # another host: cannot be checked from here, refused with how to remove it
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(LoraplaceError, match=r"pid 1 on host elsewhere.example.*delete .*\.lock"):
        StudyLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "elsewhere.example"  # left alone


def test_cli_refuses_a_locked_study_folder(tiny_llama_dir, alpaca_file, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        code, output = run_cli("--model", str(tiny_llama_dir), "--dataset", str(alpaca_file), "-o", str(out), *FAST)
        _one_line_error(code, output, f"in use by another loraplace run (pid {sleeper.pid}")
        assert not (out / "results.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------- new users
def test_output_that_is_a_file_is_one_line(tiny_llama_dir, alpaca_file, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("not a study")
    code, output = run_cli("--model", str(tiny_llama_dir), "--dataset", str(alpaca_file), "-o", str(target), *FAST)
    _one_line_error(code, output, f"--output {target} is a file, not a study folder", "pass a new folder path")
    assert target.read_text() == "not a study"


def test_study_name_follows_model_and_dataset_overrides(tmp_path):
    assert study_name_for("Qwen/Qwen2.5-0.5B", "tatsu-lab/alpaca") == "Qwen2.5-0.5B-alpaca"
    assert study_name_for("./models/tiny-llama/", "data/my chats.jsonl") == "tiny-llama-my-chats"
    assert load_study(None, {}).name == "quick"
    config = load_study(None, {"model": str(tmp_path / "tiny-llama"), "dataset": "./alpaca.json"})
    assert config.name == "tiny-llama-alpaca"
    assert str(default_output_dir(config)).startswith(os.path.join("runs", "tiny-llama-alpaca-"))
    assert load_study(None, {"dataset": "tatsu-lab/alpaca"}).name == "smollm2-135m-instruct-alpaca"
    assert load_study(None, {"model": "gpt2", "name": "mine"}).name == "mine"  # an explicit name is kept
    study = tmp_path / "s.yaml"
    study.write_text("name: paper\nmodel: gpt2\n")
    assert load_study(study).name == "paper"
    assert load_study(study, {"name": "x", "model": "gpt2"}).name == "x"


# ------------------------------------------------------------------------ store-level resume
def test_stored_row_of_another_run_is_refused_and_legacy_ids_resume(tmp_path):
    config = load_study(None, {"strategies": "attn.*,attn.?", "include_base": False, "output": str(tmp_path)})
    store = StudyStore(tmp_path)
    store.init(config, resume=False)
    # a folder written by an older loraplace: attn.* ran under the shared id attn._-s0
    store.record(_row("attn._-s0", strategy="attn.*"))
    store.init(config, resume=True)
    specs = run_specs(config, tmp_path)
    finished = store.finished_for(specs)
    assert list(finished) == [run_id_for("attn.*", 0)]  # attn.? is not taken for finished
    assert finished[run_id_for("attn.*", 0)].run_id == "attn._-s0"  # its folder keeps its old name
    # a row stored under a spec's id that is another run's result: refused, never taken as finished
    store.record(_row(run_id_for("attn.?", 0), strategy="attn.*", seed=0))
    store.init(config, resume=True)
    with pytest.raises(LoraplaceError, match=r"stored run 'attn\._\.[0-9a-f]{8}-s0' .* is strategy 'attn\.\*' seed 0, "
                                             r"but this study's run .* is strategy 'attn\.\?' seed 0"):
        store.finished_for(specs)


def test_merge_configs_and_budget_reference():
    a = load_study(None, {"seeds": "0,1", "strategies": "full,attention"})
    b = load_study(None, {"seeds": "2,0", "strategies": "qv", "include_base": False, "match_budget": "full"})
    u = merge_configs(a, b)
    assert u.seeds == [0, 1, 2] and u.strategies == ["full", "attention", "qv"]
    assert u.include_base and u.match_budget == "full"
    assert merge_configs(u, a).match_budget == "full"  # leaving it out keeps the matched arms
    with pytest.raises(LoraplaceError, match="not change it to attention"):
        merge_configs(u, load_study(None, {"match_budget": "attention"}))


# ----------------------------------------------------------------------- resume end to end
@pytest.fixture(scope="module")
def two_seed_study(tiny_llama_dir, tmp_path_factory):
    from conftest import alpaca_rows

    data = tmp_path_factory.mktemp("data") / "alpaca.json"
    data.write_text(json.dumps(alpaca_rows()))
    out = tmp_path_factory.mktemp("study") / "s"
    code, output = run_cli("--model", str(tiny_llama_dir), "--dataset", str(data), "-o", str(out), *FAST,
                           "--seeds", "0,1", "strategies=full,attention")
    assert code == 0, output
    assert [r["run_id"] for r in _rows(out)] == ["base", "full-s0", "attention-s0", "full-s1", "attention-s1"]
    return out, data, str(tiny_llama_dir)


@pytest.fixture
def study_copy(two_seed_study, tmp_path):
    out, data, model = two_seed_study
    copy = tmp_path / "s"
    shutil.copytree(out, copy)
    return copy, data, model


def _no_training(monkeypatch):
    import loraplace.study.executor as executor

    def refuse(spec, ctx, on_step=None):
        raise AssertionError(f"{spec.run_id} was trained again")

    monkeypatch.setattr(executor, "execute_run", refuse)


def test_narrower_resume_trains_nothing_and_keeps_every_run(study_copy, monkeypatch):
    import yaml

    from loraplace.report.load import load_study as load_for_report

    copy, data, model = study_copy
    before = _rows(copy)
    _no_training(monkeypatch)
    code, output = run_cli("--model", model, "--dataset", str(data), "-o", str(copy), "--resume", *FAST,
                           "--seeds", "0", "strategies=full,attention")
    assert code == 0, output
    assert "3 runs (3 already finished)" in output and "2 other stored runs are kept" in output
    after = _rows(copy)
    assert [r["run_id"] for r in after] == [r["run_id"] for r in before]
    assert [r["eval_loss"] for r in after] == [r["eval_loss"] for r in before]
    stored = yaml.safe_load((copy / "study.yaml").read_text())
    assert stored["seeds"] == [0, 1] and stored["strategies"] == ["full", "attention"]  # the union
    assert json.loads((copy / "results.json").read_text())["study"]["seeds"] == [0, 1]
    assert {r.result.run_id for r in load_for_report(copy).runs} == {r["run_id"] for r in before}
    assert (copy / "report" / "report.md").is_file()


def test_resume_with_other_strategies_keeps_the_old_rows(study_copy, monkeypatch):
    import yaml

    import loraplace.study.executor as executor

    copy, data, model = study_copy
    trained = []
    real = executor.execute_run

    def spy(spec, ctx, on_step=None):
        trained.append(spec.run_id)
        return real(spec, ctx, on_step=on_step)

    monkeypatch.setattr(executor, "execute_run", spy)
    code, output = run_cli("--model", model, "--dataset", str(data), "-o", str(copy), "--resume", *FAST,
                           "--seeds", "1", "strategies=ffn", "include_base=false")
    assert code == 0, output
    assert trained == ["ffn-s1"]
    ids = [r["run_id"] for r in _rows(copy)]
    assert ids == ["base", "full-s0", "attention-s0", "full-s1", "attention-s1", "ffn-s1"]
    stored = yaml.safe_load((copy / "study.yaml").read_text())
    assert stored["strategies"] == ["full", "attention", "ffn"] and stored["seeds"] == [0, 1]
    assert stored["include_base"] is True
    # the new run's position is its place in the whole study's order (seed 1 rotated: ffn first)
    new = next(r for r in _rows(copy) if r["run_id"] == "ffn-s1")
    plan = run_specs(load_study(copy / "study.yaml"), copy)
    assert new["position"] == next(s.position for s in plan if s.run_id == "ffn-s1")


def test_resume_refuses_a_stored_row_of_another_run(study_copy, monkeypatch):
    copy, data, model = study_copy
    payload = json.loads((copy / "results.json").read_text())
    row = next(r for r in payload["runs"] if r["run_id"] == "full-s1")
    row["strategy"] = "attention"  # e.g. written by a run whose id collided
    (copy / "results.json").write_text(json.dumps(payload))
    _no_training(monkeypatch)
    code, output = run_cli("--model", model, "--dataset", str(data), "-o", str(copy), "--resume", *FAST,
                           "--seeds", "0,1", "strategies=full,attention")
    _one_line_error(code, output, "the stored run 'full-s1'", "is strategy 'attention' seed 1",
                    "this study's run 'full-s1' is strategy 'full' seed 1")


def test_missing_study_yaml_still_checks_the_config(study_copy, monkeypatch):
    copy, data, model = study_copy
    (copy / "study.yaml").unlink()
    _no_training(monkeypatch)
    code, output = run_cli("--model", model, "--dataset", str(data), "-o", str(copy), "--resume", *FAST,
                           "--seeds", "0,1", "strategies=full,attention", "lora.r=4")
    _one_line_error(code, output, "different config", "lora.r 16 -> 4")
    assert len(_rows(copy)) == 5


def test_resume_pins_what_auto_resolved_to(study_copy, monkeypatch):
    copy, data, model = study_copy
    env = json.loads((copy / "environment.json").read_text())
    assert env["device"] == "cpu" and env["precision"] == "fp32" and env["mixed"] is False
    assert {"torch", "transformers", "peft", "loraplace"} <= set(env["versions"])
    # the study ran elsewhere with bf16; this machine resolves fp32
    env["precision"] = "bf16"
    env["seen"] = [{**env["seen"][0], "precision": "bf16"}]
    (copy / "environment.json").write_text(json.dumps(env))
    args = ["--model", model, "--dataset", str(data), "-o", str(copy), "--resume", *FAST,
            "--seeds", "0,1,2", "strategies=full,attention"]
    import loraplace.study.executor as executor

    real = executor.execute_run
    _no_training(monkeypatch)
    code, output = run_cli(*args)
    _one_line_error(code, output, "this study ran with precision bf16 on cpu", "precision bf16 -> fp32",
                    "--allow-mixed")
    assert len(_rows(copy)) == 5
    monkeypatch.setattr(executor, "execute_run", real)
    code, output = run_cli(*args, "--allow-mixed")
    assert code == 0, output
    assert "mixes environments (precision bf16 -> fp32)" in " ".join(output.split())
    env = json.loads((copy / "environment.json").read_text())
    assert env["mixed"] is True and env["precision"] == "bf16"
    assert [e["precision"] for e in env["seen"]] == ["bf16", "fp32"]
    assert json.loads((copy / "results.json").read_text())["environment"]["mixed"] is True
    assert [r["run_id"] for r in _rows(copy)][-2:] == ["full-s2", "attention-s2"]


def test_resume_pins_the_cpu_thread_count(study_copy, monkeypatch):
    """A CPU kernel's reductions split by torch's thread count (SmolLM2's loss moved in the 4th
    decimal between 1 and 2 threads): a resume with another count is a mixed environment."""
    copy, data, model = study_copy
    env = json.loads((copy / "environment.json").read_text())
    here = torch.get_num_threads()
    assert env["threads"] == here
    args = ["--model", model, "--dataset", str(data), "-o", str(copy), "--resume", *FAST,
            "--seeds", "0,1", "strategies=full,attention"]
    _no_training(monkeypatch)
    env["threads"] = here + 3
    env["seen"] = [{**env["seen"][0], "threads": here + 3}]
    (copy / "environment.json").write_text(json.dumps(env))
    code, output = run_cli(*args)
    _one_line_error(code, output, f"threads {here + 3} -> {here}", f"OMP_NUM_THREADS={here + 3}", "--allow-mixed")
    # a study stored before the thread count was recorded pins none
    for e in (env, *env["seen"]):
        e.pop("threads")
    (copy / "environment.json").write_text(json.dumps(env))
    code, output = run_cli(*args)
    assert code == 0, output


def test_old_study_without_environment_json_is_checked_from_its_rows(study_copy, monkeypatch):
    copy, data, model = study_copy
    (copy / "environment.json").unlink()
    payload = json.loads((copy / "results.json").read_text())
    payload.pop("environment", None)
    for row in payload["runs"]:
        row["versions"]["transformers"] = "0.0.1"
    (copy / "results.json").write_text(json.dumps(payload))
    _no_training(monkeypatch)
    code, output = run_cli("--model", model, "--dataset", str(data), "-o", str(copy), "--resume", *FAST,
                           "--seeds", "0,1,2", "strategies=full,attention")
    _one_line_error(code, output, "transformers 0.0.1 ->")


def test_explicit_device_matching_auto_resumes(study_copy, monkeypatch):
    copy, data, model = study_copy
    _no_training(monkeypatch)
    # the study ran with device auto (cpu here) and fp32: --device cpu resolves the same
    code, output = run_cli("--model", model, "--dataset", str(data), "-o", str(copy), "--resume", *FAST,
                           "--seeds", "0,1", "strategies=full,attention", "--device", "cpu")
    assert code == 0, output
    assert "5 runs (5 already finished)" in output
