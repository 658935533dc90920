"""Read study folders back: results.json plus each run's files (eval examples, training log,
placement). The report is built from these stored files alone; nothing is re-run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loraplace.errors import LoraplaceError
from loraplace.study.records import RunResult


@dataclass
class RunData:
    """One stored run: its result row plus what its folder holds (None/empty when absent)."""

    result: RunResult
    eval_examples: dict[str, list] | None = None
    train_log: list[dict[str, Any]] = field(default_factory=list)
    modules: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.result.status == "ok" and self.result.eval_loss is not None

    @property
    def diverged(self) -> bool:
        """Training diverged without a NaN (e.g. eval loss near ln(vocab)): listed and flagged,
        but kept out of the statistics like a failed run."""
        return bool(self.result.diverged)

    @property
    def usable(self) -> bool:
        """Counted in the statistics: finished with an eval loss and did not diverge."""
        return self.ok and not self.diverged


@dataclass
class Study:
    """One study folder."""

    dir: Path
    config: dict[str, Any]
    runs: list[RunData]
    label: str = ""

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.dir.name)


def _read_json(path: Path) -> Any | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoraplaceError(f"{path} is not valid JSON ({e}); rerun the run or delete the file") from None


def load_study(study_dir: Path) -> Study:
    """Load one study folder.

    Raises:
        LoraplaceError: the folder does not exist, or holds no (valid) results.json.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise LoraplaceError(f"study folder {str(study_dir)!r} does not exist; pass the folder `loraplace run` wrote "
                             "(the one holding results.json)")
    data = _read_json(study_dir / "results.json")
    if data is None:
        raise LoraplaceError(
            f"{study_dir} holds no results.json: it is not a study folder, or no run of it has finished yet. "
            "Pass the folder given to `loraplace run --output`, or finish the study with `loraplace run ... --resume`"
        )
    if not isinstance(data, dict) or "runs" not in data:
        raise LoraplaceError(f"{study_dir / 'results.json'} has no 'runs' list; it was not written by loraplace")
    runs = []
    for raw in data["runs"]:
        try:
            result = RunResult.model_validate(raw)
        except ValidationError as e:
            raise LoraplaceError(f"{study_dir / 'results.json'}: a run row is invalid ({e.errors()[0]['msg']})") from None
        run_dir = study_dir / "runs" / result.run_id
        examples = _read_json(run_dir / "eval_examples.json")
        runs.append(RunData(
            result=result,
            eval_examples=examples if isinstance(examples, dict) and examples.get("nll_sum") else None,
            train_log=_read_json(run_dir / "train_log.json") or [],
            modules=_read_json(run_dir / "modules.json"),
        ))
    if not runs:
        raise LoraplaceError(f"{study_dir / 'results.json'} lists no runs; run the study first")
    return Study(dir=study_dir, config=data.get("study") or {}, runs=runs)


def load_studies(study_dirs: list[Path]) -> list[Study]:
    """Load several folders and give each a distinct, short label (its study name, then the
    folder name, then a number when those collide)."""
    if not study_dirs:
        raise LoraplaceError("no study folder given; usage: loraplace report STUDY_DIR [STUDY_DIR ...]")
    studies = [load_study(Path(d)) for d in study_dirs]
    resolved = [s.dir.resolve() for s in studies]
    if len(set(resolved)) != len(resolved):
        raise LoraplaceError("the same study folder was given twice; pass each folder once")
    labels = [s.name for s in studies]
    if len(set(labels)) != len(labels):
        labels = [s.dir.name for s in studies]
    if len(set(labels)) != len(labels):
        labels = [f"{s.name}#{i + 1}" for i, s in enumerate(studies)]
    for s, label in zip(studies, labels):
        s.label = label
    return studies
