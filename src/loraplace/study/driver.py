"""Run a whole study: check it, take the folder's lock, plan the runs this command adds, train
and evaluate them one by one (saving the results after each), then write the report.

The driver prints nothing: what it does is reported through a :class:`StudyProgress`, whose
methods do nothing unless overridden (the command line shows bars on a terminal and plain lines
elsewhere; benchmarks and tests pass nothing, or their own).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from loraplace.config import StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.records import RunSpec
from loraplace.report.write import write_report
from loraplace.run.measure import resolved_environment
from loraplace.study import ray_executor
from loraplace.study.allocations import resolve_allocations
from loraplace.study.checks import check_study, expand_study_groups
from loraplace.study.executor import LocalExecutor
from loraplace.study.progress import StudyInterrupted, StudyProgress
from loraplace.study.specs import arm_labels, default_output_dir, planned_specs, run_identity, run_specs, tuning_specs
from loraplace.study.store import StudyStore
from loraplace.tuning import alive_rates, choose, rung_sizes, rung_steps


def run_study(config: StudyConfig, resume: bool = False, allow_mixed: bool = False,
              progress: StudyProgress | None = None) -> Path:
    """Run a validated study and write its report; returns the study folder.

    Holds the folder's lock while it runs (:class:`~loraplace.study.store.StudyLock`). With
    ``resume``, continues the study in ``config.output``: only runs this config asks for and that
    are not finished train, and every stored row is kept (:class:`~loraplace.study.store.StudyStore`).
    A failing report is reported (:meth:`StudyProgress.report_failed`), not raised: the results
    are saved by then.

    ``config.executor`` chooses how the runs execute: one after another in this process
    (:class:`~loraplace.study.executor.LocalExecutor`), or in parallel on Ray workers
    (:class:`~loraplace.study.ray_executor.RayExecutor`; the environment is then what the workers
    resolve, and their files come back to this process, the only writer of the study folder).

    Raises:
        LoraplaceError: bad input (model, data, strategies, device), a folder in use, a resume
            without ``config.output`` or that does not continue the stored study; raised before
            anything trains.
        StudyInterrupted: Ctrl-C or SIGTERM (on the main thread); finished runs are saved.
    """
    if resume and not config.output:
        raise LoraplaceError("--resume needs --output STUDY_DIR (the folder of the study to continue)")
    progress = progress or StudyProgress()
    config = expand_study_groups(config)  # `groups` entries become the model's group arms, stored as such
    study_dir = Path(config.output) if config.output else default_output_dir(config)
    store = StudyStore(study_dir)
    store.check_folder()
    ray = config.executor.kind == "ray"
    with contextlib.ExitStack() as stack:
        # Under Ray the device is checked (and resolved) on the workers, which may have GPUs the driver lacks.
        decided = check_study(config.model_copy(update={"device": "auto"}) if ray else config)
        environment = None if ray else resolved_environment(config.device, config.train.precision)
        lock = stack.enter_context(store.lock())
        if lock.note:
            progress.note(lock.note)
        if ray:

            executor = ray_executor.RayExecutor(config.executor, on_note=progress.note)
            stack.callback(executor.close)  # also on Ctrl-C and errors: stops the remote runs
            # the most runs that could be in flight at once: those this command plans and every tuning run
            in_flight = len(planned_specs(config, study_dir)) + len(tuning_specs(config, study_dir))
            environment = executor.start(config.device, config.train.precision, in_flight)
        else:
            executor = LocalExecutor(isolate=config.executor.isolate)
        if threading.current_thread() is threading.main_thread():
            # `kill PID` (SIGTERM) ends the study like Ctrl-C: finished runs saved, lock released.
            def _terminate(signum, frame):
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGTERM, _terminate)
            stack.callback(signal.signal, signal.SIGTERM, previous)
        study = store.init(config, resume, environment=environment, allow_mixed=allow_mixed)
        # Settings that change an arm's cost or numbers are decided once, for every arm alike; a resumed
        # study keeps its decision (its earlier runs ran with it) unless the setting is now forced.
        if study.decided and study.train.gradient_checkpointing == "auto":
            decided = study.decided
        study = store.record_decided(decided)
        # The plan: this command's runs, in the order (and with the positions) of the whole study.
        wanted = {run_identity(s) for s in planned_specs(config, study_dir)}
        wanted_tuning = {run_identity(s) for s in tuning_specs(config, study_dir)}
        specs = [s for s in run_specs(study, study_dir) if run_identity(s) in wanted]
        finished = store.finished_for(specs)
        if store.mixed_note:
            progress.warning(store.mixed_note)
        todo = [s for s in specs if s.run_id not in finished]
        planned = {run_identity(s) for s in specs}
        ours = planned | wanted_tuning
        kept = sum(run_identity(r) not in ours for r in store.rows) if resume else 0
        tuning_runs = tuning_done = 0
        if wanted_tuning:  # each rung of a rate is one run; a rung stored by an earlier command is finished
            halving = (study.train.max_steps, len(study.tune.rates()), study.tune.eta, study.tune.schedule,
                       study.tune.min_steps)
            tuning_runs = len(arm_labels(study)) * len(study.seeds) * sum(rung_sizes(*halving))
            rungs = [str(step) for step in rung_steps(*halving)]
            tuning_done = sum(step in r.validation_losses for r in store.rows if run_identity(r) in wanted_tuning
                              for step in rungs)
        progress.planned(study, study_dir, len(specs) + tuning_runs, len(finished) + tuning_done, kept)
        # Automatic arms: scored and allocated once per study (stored, so a resume trains the same ranks).

        todo = resolve_allocations(study, study_dir, todo, executor.allocate, note=progress.note)

        place = {s.run_id: len(finished) + i + 1 for i, s in enumerate(todo)}
        positions = {s.run_id: s.position for s in specs}
        started: dict[str, float] = {}

        def on_start(spec: RunSpec) -> None:
            started[spec.run_id] = time.monotonic()
            progress.run_started(spec, place[spec.run_id])

        executor.on_step, executor.on_start = progress.run_step, on_start

        def run_all(jobs: list[RunSpec]) -> None:
            for result in executor.submit(jobs):
                if result.position is None:
                    result = result.model_copy(update={"position": positions.get(result.run_id)})
                store.record(result)
                progress.run_ended(result, place.get(result.run_id, 0),
                                   time.monotonic() - started.get(result.run_id, time.monotonic()))

        try:
            progress.runs_starting(len(specs) + tuning_runs, len(finished) + tuning_done)
            try:
                run_all(todo)
                tuning = [s for s in tuning_specs(study, study_dir) if run_identity(s) in wanted_tuning]
                if tuning:
                    run_tuning(study, study_dir, store, tuning, run_all, executor.allocate, progress, place,
                               positions, first_place=len(finished) + tuning_done + len(todo) + 1)
            finally:
                progress.runs_stopped()
        except KeyboardInterrupt:
            if ray:
                executor.close()
                progress.note("stopped the Ray workers; runs in progress there are abandoned")
            raise StudyInterrupted(study_dir, sum(r.status == "ok" for r in store.rows)) from None
    progress.results_saved(study_dir)
    try:  # the results are saved already: a failing report must not lose them

        progress.report_written(write_report([study_dir]))
    except Exception as e:  # noqa: BLE001
        progress.report_failed(study_dir, e)
    return study_dir


def run_tuning(study: StudyConfig, study_dir: Path, store: StudyStore, specs: list[RunSpec],
               run_all: Callable[[list[RunSpec]], None], allocate: Callable, progress: StudyProgress,
               place: dict[str, int], positions: dict[str, int], first_place: int) -> None:
    """Tune every arm's learning rate by synchronous successive halving (:mod:`loraplace.tuning`),
    rung by rung: the rates alive in a rung (from the stored validation losses of the rung
    before) train from their previous rung's checkpoint to its last step; each rung's results are
    stored before the next starts, so a resumed study loses no finished rung and redoes none.
    A rate's checkpoints are deleted once it is out or has trained to the end."""
    rates, eta = study.tune.rates(), study.tune.eta
    steps = rung_steps(study.train.max_steps, len(rates), eta, study.tune.schedule, study.tune.min_steps)
    arms = list(dict.fromkeys(s.strategy for s in specs))
    for rung, stop_at in enumerate(steps):
        jobs = []
        for arm in arms:
            alive = set(alive_rates(store.rows, arm, rates, steps, rung, eta))
            for spec in specs:
                if spec.strategy == arm and rung and spec.tune.lr not in alive and _ok(store, spec, steps[rung - 1]):
                    _drop_checkpoints([spec])  # out of the halving: its state is not needed again
                if spec.strategy != arm or spec.tune.lr not in alive:
                    continue
                row = next((r for r in store.rows if r.run_id == spec.run_id), None)
                done = row.validation_losses if row is not None else {}
                if str(stop_at) in done:
                    continue  # this rung is stored (a resumed study)
                resume = steps[rung - 1] if rung else None
                jobs.append(_rung_spec(spec, rung, stop_at, resume, row))
        if not jobs:
            continue
        progress.note(f"tuning the learning rate: rung {rung + 1} of {len(steps)}, {len(jobs)} runs to step "
                      f"{stop_at} ({', '.join(f'{lr:g}' for lr in rates)}; keeps the best 1/{eta})")
        for i, job in enumerate(jobs):
            place[job.run_id] = first_place + i
            positions[job.run_id] = job.position
        jobs = resolve_allocations(study, study_dir, jobs, allocate, note=progress.note)
        run_all(jobs)
        first_place += len(jobs)
        for job in jobs:  # a rung stored: the checkpoint it continued from is not needed again
            if job.tune.resume_step is not None and _ok(store, job, stop_at):
                shutil.rmtree(Path(job.run_dir) / "trainer" / f"checkpoint-{job.tune.resume_step}", ignore_errors=True)
    choices = []
    for arm in arms:
        choices.append(choose(store.rows, arm, rates, steps, eta))
        mine = [s for s in specs if s.strategy == arm]
        ids = {s.run_id for s in mine}
        if all(r.status == "ok" for r in store.rows if r.run_id in ids):  # a failed rate may be retried on resume
            _drop_checkpoints(mine)
    progress.tuned(choices)


def _rung_spec(spec: RunSpec, rung: int, stop_at: int, resume: int | None, row) -> RunSpec:
    """``spec`` set to train rung ``rung`` (to step ``stop_at``), continuing from the checkpoint at
    step ``resume`` with the totals of its stored row."""
    before: dict[str, Any] = {}
    files = None
    if resume is not None and row is not None:
        before = {"train_time_s": row.train_time_s, "train_real_tokens": row.train_real_tokens,
                  "train_label_tokens": row.train_label_tokens, "validation_losses": dict(row.validation_losses)}
        folder = Path(spec.run_dir) / "trainer" / f"checkpoint-{resume}"
        if folder.is_dir():
            files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    tune = spec.tune.model_copy(update={"rung": rung, "stop_at": stop_at, "resume_step": resume, "before": before})
    return spec.model_copy(update={"tune": tune, "resume_files": files})


def _ok(store: StudyStore, spec: RunSpec, step: int) -> bool:
    """Whether the stored row of ``spec`` finished the rung that ends at ``step``."""
    row = next((r for r in store.rows if r.run_id == spec.run_id), None)
    return row is not None and str(step) in row.validation_losses


def _drop_checkpoints(specs: list[RunSpec]) -> None:
    """Delete the tuning checkpoints of ``specs`` (an arm whose choice is made)."""
    for spec in specs:
        shutil.rmtree(Path(spec.run_dir) / "trainer", ignore_errors=True)
