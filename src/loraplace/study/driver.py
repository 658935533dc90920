"""Run a whole study: check it, take the folder's lock, plan the runs this command adds, train
and evaluate them one by one (saving the results after each), then write the report.

The driver prints nothing: what it does is reported through a :class:`StudyProgress`, whose
methods do nothing unless overridden (the command line shows bars on a terminal and plain lines
elsewhere; benchmarks and tests pass nothing, or their own).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

from loraplace.config import StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.study.records import RunResult, RunSpec


class StudyProgress:
    """What :func:`run_study` reports while it works; every method does nothing by default."""

    def note(self, text: str) -> None:
        """Something worth knowing that changes nothing (a stale lock taken over)."""

    def warning(self, text: str) -> None:
        """Something that changes how the study reads (mixed environments under --allow-mixed)."""

    def planned(self, study: StudyConfig, study_dir: Path, total: int, finished: int, kept: int) -> None:
        """The plan: ``total`` runs of this command (``finished`` of them already stored), and
        ``kept`` stored runs of the study that this command does not ask for."""

    def runs_starting(self, total: int, done: int) -> None:
        """Called once before the first run trains (``done`` of ``total`` finished already)."""

    def run_started(self, spec: RunSpec, k: int) -> None:
        """Run ``spec`` starts; it is the ``k``-th run of the plan (1-based)."""

    def run_step(self, spec: RunSpec, step: int, total: int, loss: float | None) -> None:
        """Optimizer step ``step`` of ``total`` of ``spec`` is done (``loss``: the last logged training loss)."""

    def run_ended(self, result: RunResult, k: int, seconds: float) -> None:
        """A run ended (ok or failed) after ``seconds`` and its result is saved."""

    def runs_stopped(self) -> None:
        """Called once when the runs stop: all done, or an error or interrupt ended them."""

    def results_saved(self, study_dir: Path) -> None:
        """Every run of the plan ended; the results files in ``study_dir`` are final."""

    def report_written(self, html_path: Path) -> None:
        """The report is written (``report.md`` lies next to ``html_path``)."""

    def report_failed(self, study_dir: Path, error: Exception) -> None:
        """Writing the report failed; the results are saved all the same."""


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the study; every finished run is saved in :attr:`study_dir`."""

    def __init__(self, study_dir: Path, finished: int):
        super().__init__(f"interrupted: {finished} finished runs are saved in {study_dir}; continue with "
                         f"`loraplace run ... --output {study_dir} --resume`")
        self.study_dir, self.finished = study_dir, finished


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
    from loraplace.study.checks import check_study
    from loraplace.study.executor import LocalExecutor
    from loraplace.study.plan import default_output_dir, run_identity, run_specs
    from loraplace.study.store import StudyStore, resolve_environment

    if resume and not config.output:
        raise LoraplaceError("--resume needs --output STUDY_DIR (the folder of the study to continue)")
    progress = progress or StudyProgress()
    study_dir = Path(config.output) if config.output else default_output_dir(config)
    store = StudyStore(study_dir)
    store.check_folder()
    ray = config.executor.kind == "ray"
    with contextlib.ExitStack() as stack:
        # Under Ray the device is checked (and resolved) on the workers, which may have GPUs the driver lacks.
        check_study(config.model_copy(update={"device": "auto"}) if ray else config)
        environment = None if ray else resolve_environment(config)
        lock = stack.enter_context(store.lock())
        if lock.note:
            progress.note(lock.note)
        if ray:
            from loraplace.study.ray_executor import RayExecutor

            executor = RayExecutor(config.executor, on_note=progress.note)
            stack.callback(executor.close)  # also on Ctrl-C and errors: stops the remote runs
            environment = executor.start(config.device, config.train.precision, len(run_specs(config, study_dir)))
        else:
            executor = LocalExecutor()
        if threading.current_thread() is threading.main_thread():
            # `kill PID` (SIGTERM) ends the study like Ctrl-C: finished runs saved, lock released.
            def _terminate(signum, frame):
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGTERM, _terminate)
            stack.callback(signal.signal, signal.SIGTERM, previous)
        study = store.init(config, resume, environment=environment, allow_mixed=allow_mixed)
        # The plan: this command's runs, in the order (and with the positions) of the whole study.
        wanted = {run_identity(s) for s in run_specs(config, study_dir)}
        specs = [s for s in run_specs(study, study_dir) if run_identity(s) in wanted]
        finished = store.finished_for(specs)
        if store.mixed_note:
            progress.warning(store.mixed_note)
        todo = [s for s in specs if s.run_id not in finished]
        planned = {run_identity(s) for s in specs}
        kept = sum(run_identity(r) not in planned for r in store.rows) if resume else 0
        progress.planned(study, study_dir, len(specs), len(finished), kept)
        # Automatic arms: scored and allocated once per study (stored, so a resume trains the same ranks).
        from loraplace.study.allocations import resolve_allocations

        todo = resolve_allocations(study, study_dir, todo, executor.ctx, note=progress.note)

        place = {s.run_id: len(finished) + i + 1 for i, s in enumerate(todo)}
        positions = {s.run_id: s.position for s in specs}
        started: dict[str, float] = {}

        def on_start(spec: RunSpec) -> None:
            started[spec.run_id] = time.monotonic()
            progress.run_started(spec, place[spec.run_id])

        executor.on_step, executor.on_start = progress.run_step, on_start
        try:
            progress.runs_starting(len(specs), len(finished))
            try:
                for result in executor.submit(todo):
                    if result.position is None:
                        result = result.model_copy(update={"position": positions.get(result.run_id)})
                    store.record(result)
                    progress.run_ended(result, place.get(result.run_id, 0),
                                       time.monotonic() - started.get(result.run_id, time.monotonic()))
            finally:
                progress.runs_stopped()
        except KeyboardInterrupt:
            if ray:
                executor.close()
                progress.note("stopped the Ray workers; runs in progress there are abandoned")
            raise StudyInterrupted(study_dir, sum(r.status == "ok" for r in store.rows)) from None
    progress.results_saved(study_dir)
    try:  # the results are saved already: a failing report must not lose them
        from loraplace.report.write import write_report

        progress.report_written(write_report([study_dir]))
    except Exception as e:  # noqa: BLE001
        progress.report_failed(study_dir, e)
    return study_dir
