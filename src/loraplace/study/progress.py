"""How a study reports what it does (:class:`StudyProgress`, whose methods do nothing unless
overridden: the command line shows bars on a terminal and plain lines elsewhere) and how it stops
on Ctrl-C (:class:`StudyInterrupted`). Torch-free, so that the command line can subclass it without
loading torch."""

from __future__ import annotations

from pathlib import Path

from loraplace.config import StudyConfig
from loraplace.records import RunResult, RunSpec
from loraplace.tuning import Choice


def describe_choices(choices: list[Choice]) -> str:
    """``tuned learning rates: full 0.001, attention 0.01 (highest of the grid: widen it)``."""
    parts = []
    for c in choices:
        if c.lr is None:
            parts.append(f"{c.arm} none (every rate failed)")
        else:
            parts.append(f"{c.arm} {c.lr:g}" + (f" ({c.edge}est of the grid: widen it)" if c.edge else ""))
    return "tuned learning rates (chosen on the validation split): " + ", ".join(parts)


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

    def tuned(self, choices: list[Choice]) -> None:
        """The learning rate each arm's tuning chose (:class:`~loraplace.tuning.Choice`: the rate, or None
        where every rate failed, and whether it lies at an end of the grid)."""

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
