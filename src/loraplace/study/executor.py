"""Executors run a list of :class:`RunSpec` jobs and hand back each :class:`RunResult` as it
finishes. The local one runs them one after another, each in a fresh process by default
(``executor.isolate``), or all in this process sharing the loaded base model and data through a
:class:`RunContext`; a distributed executor implements the same ``submit`` and needs no change to
the runs (:mod:`loraplace.study.ray_executor`)."""

from __future__ import annotations

import multiprocessing
import signal
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import datasets
import torch
import transformers

from loraplace.config import StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.files import atomic_write_text
from loraplace.records import RunResult, RunSpec
from loraplace.run.context import RunContext
from loraplace.run.measure import release_memory
from loraplace.study.allocations import Allocated, compute_allocations
from loraplace.study.runs import execute_run, failed_result

StepHook = Callable[[RunSpec, int, int, "float | None"], None]
RunJob = Callable[..., RunResult]  # (spec, ctx, on_step=...) -> result: execute_run's signature

EXIT_WAIT_S = 60.0  # how long a run's process may take to exit once it sent its result


class Executor(Protocol):
    def allocate(self, config: StudyConfig, template: RunSpec, labels: list[str], known: dict[str, dict[str, Any]],
                 note: Callable[[str], None]) -> Allocated:
        """Compute the per-study allocations where the runs will train (same device and precision)."""
        ...

    def submit(self, specs: Iterable[RunSpec]) -> Iterator[RunResult]:
        """Run the jobs and yield each result as soon as it exists (order may differ)."""
        ...


class LocalExecutor:
    """Runs jobs one after another on this machine.

    With ``isolate``, each run is a fresh process (``spawn``: no state of this one is inherited)
    that loads the base model and data itself, runs :attr:`run_job` and sends back its optimizer
    steps (to ``on_step``) and its :class:`RunResult`: its memory and speed do not depend on the
    runs before it. A run whose process dies (killed by the OS when out of memory, a crash in
    native code) is recorded as failed, with the reason in ``error.txt``, and the next run starts.
    A :class:`LoraplaceError` in the run's process is raised here with its message; Ctrl-C (a
    ``KeyboardInterrupt`` here) stops the run's process and propagates.

    Without ``isolate``, the runs share this process and its :class:`RunContext` (the base model
    is loaded once): faster to start, but memory that one run leaves to the allocators (glibc,
    oneDNN) is there for the next (benchmarks/README.md, ``run_position_memory.py``). ``isolate``
    is off unless given; :func:`~loraplace.study.driver.run_study` passes ``executor.isolate``
    (default true).
    """

    run_job: RunJob | None = None
    """What each run calls; None: :func:`execute_run`. A subclass may set another (``staticmethod``);
    in a run's own process it is found by its module and name, so it must be a module-level function."""

    def __init__(self, on_step: StepHook | None = None, on_start: Callable[[RunSpec], None] | None = None,
                 allow_fetch: bool = True, isolate: bool = False):
        self.on_step = on_step
        self.on_start = on_start
        self.allow_fetch = allow_fetch
        self.isolate = isolate
        self.ctx = RunContext(allow_fetch=allow_fetch)

    def allocate(self, config: StudyConfig, template: RunSpec, labels: list[str], known: dict[str, dict[str, Any]],
                 note: Callable[[str], None] = lambda text: None) -> Allocated:
        """The per-study allocations of ``labels`` (:func:`~loraplace.study.allocations.compute_allocations`),
        computed in this process on the base model the runs will share (with ``isolate``, the runs
        load their own: this copy is dropped when they start)."""
        return compute_allocations(config, template, labels, self.ctx, known, note)

    def submit(self, specs: Iterable[RunSpec]) -> Iterator[RunResult]:
        if self.isolate:
            self.ctx.drop_models()  # loaded for the allocations only: the runs load their own
            release_memory()
        for spec in specs:
            if self.on_start:
                self.on_start(spec)
            if self.isolate:
                yield self._run_isolated(spec)
                continue
            hook = (lambda step, total, loss, _s=spec: self.on_step(_s, step, total, loss)) if self.on_step else None
            yield self._job()(spec, self.ctx, on_step=hook)

    def _job(self) -> RunJob:
        return type(self).run_job or execute_run

    def _run_isolated(self, spec: RunSpec) -> RunResult:
        """Run ``spec`` in a new process; its result, or a failed result where the process died."""
        mp = multiprocessing.get_context("spawn")
        reader, writer = mp.Pipe(duplex=False)
        process = mp.Process(target=_run_in_child, args=(self._job(), spec, self.allow_fetch,
                                                         _parent_settings(), writer),
                             name=f"loraplace-run-{spec.run_id}")
        process.start()
        writer.close()  # the child holds the only writer: its exit ends the parent's reads
        try:
            result = self._receive(spec, reader)
        except BaseException:  # Ctrl-C, or the run's process raised: stop it now
            _stop(process, wait_s=0)
            raise
        finally:
            reader.close()
        exitcode = _stop(process, wait_s=EXIT_WAIT_S)
        return result if result is not None else _died(spec, exitcode)

    def _receive(self, spec: RunSpec, reader) -> RunResult | None:
        """The messages of a run's process until its result (None: it died before sending one)."""
        while True:
            try:
                message = reader.recv()
            except EOFError:
                return None
            kind = message[0]
            if kind == "step":
                if self.on_step:
                    self.on_step(spec, *message[1:])
            elif kind == "result":
                return message[1]
            elif kind == "input":
                raise LoraplaceError(message[1])
            else:  # an error outside the run's own failure handling (execute_run's)
                raise RuntimeError(f"run {spec.run_id}: {message[1]} (in the run's process)\n{message[2]}")


def _parent_settings() -> dict[str, Any]:
    """What a run's process takes over from this one: torch's thread count, the warning filters,
    and the verbosity and progress bars of transformers and datasets (the command line quiets them)."""
    return {"threads": torch.get_num_threads(), "warnings": list(warnings.filters),
            "transformers": transformers.logging.get_verbosity(),
            "transformers_bars": transformers.utils.logging.is_progress_bar_enabled(),
            "datasets": datasets.logging.get_verbosity(),
            "datasets_bars": not datasets.utils.are_progress_bars_disabled()}


def _apply_settings(settings: dict[str, Any]) -> None:
    torch.set_num_threads(settings["threads"])
    warnings.filters[:] = settings["warnings"]
    transformers.logging.set_verbosity(settings["transformers"])
    if not settings["transformers_bars"]:
        transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity(settings["datasets"])
    if not settings["datasets_bars"]:
        datasets.disable_progress_bars()


def _run_in_child(run_job: RunJob, spec: RunSpec, allow_fetch: bool, settings: dict[str, Any], conn) -> None:
    """The body of a run's process: run ``spec`` and send ``("step", step, total, loss)`` messages,
    then ``("result", RunResult)``, ``("input", message)`` for a :class:`LoraplaceError`, or
    ``("error", what, traceback)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops this process
    try:
        _apply_settings(settings)
        ctx = RunContext(allow_fetch=allow_fetch)
        result = run_job(spec, ctx, on_step=lambda step, total, loss: conn.send(("step", step, total, loss)))
        conn.send(("result", result))
    except LoraplaceError as e:
        conn.send(("input", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        conn.close()


def _died(spec: RunSpec, exitcode: int | None) -> RunResult:
    """The failed result of a run whose process ended without sending one; the reason also goes to ``error.txt``."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = ": out of memory?" if -exitcode == signal.SIGKILL else ""
        reason = f"the run's process was killed by signal {-exitcode} ({name}{hint})"
    else:
        reason = f"the run's process exited with code {exitcode} before sending its result"
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "error.txt", reason + "\n")
    return failed_result(spec, reason)


def _stop(process, wait_s: float) -> int | None:
    """Wait up to ``wait_s`` for a run's process to exit, then end it (SIGTERM, then SIGKILL);
    returns its exit code (negative: the signal that ended it)."""
    process.join(wait_s)
    if process.is_alive():
        process.terminate()
        process.join(10)
    if process.is_alive():
        process.kill()
        process.join()
    exitcode = process.exitcode
    process.close()
    return exitcode
