"""Read study folders back: results.json plus each run's files (eval examples, training log,
placement, adapter norms) and the study's optional importance and allocation files. The report
is built from these stored files alone; nothing is re-run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loraplace.errors import LoraplaceError
from loraplace.records import RunResult


@dataclass
class RunData:
    """One stored run: its result row plus what its folder holds (None/empty when absent)."""

    result: RunResult
    eval_examples: dict[str, list] | None = None
    train_log: list[dict[str, Any]] = field(default_factory=list)
    modules: dict[str, Any] | None = None
    adapter_norms: dict[str, Any] | None = None  # adapter_norms.json: {"modules": [{name, role, ..., norm}]}

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
    importance: dict[str, dict[str, Any]] = field(default_factory=dict)  # score -> importance/<score>.json
    tuning: list[RunData] = field(default_factory=list)  # learning-rate tuning runs (kind 'tune'), not in runs
    allocations: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm label -> allocations/*.json

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.dir.name)

    @property
    def untuned_runs(self) -> list[RunData]:
        """The arms' runs at ``train.lr`` (a tuned study with ``tune.untuned`` false has none)."""
        return [r for r in self.runs if r.result.kind == "lora" and r.result.tune_lr is None]

    def at_train_lr(self) -> Study:
        """This study without the arm rows taken from its tuning runs (the base row and the untuned runs)."""
        return replace(self, runs=[r for r in self.runs if r.result.kind != "lora" or r.result.tune_lr is None])

    @property
    def arms_tuned(self) -> bool:
        """Whether its arm rows are each arm's tuning runs at the chosen rate (the report's view of a
        tuned study that trained no arm at ``train.lr``)."""
        return bool(self.tuning) and any(r.result.kind == "lora" for r in self.runs) and not self.untuned_runs


def _read_json(path: Path) -> Any | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoraplaceError(f"{path} is not valid JSON ({e}); rerun the run or delete the file") from None


IMPORTANCE_FORMAT = "loraplace-importance/1"
ALLOCATION_FORMAT = "loraplace-allocation/1"


def _read_format(path: Path, expected: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A loraplace JSON file of format ``expected`` holding ``keys``.

    Raises:
        LoraplaceError: the file is not valid JSON, names another format or lacks a key.
    """
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("format") != expected:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise LoraplaceError(f"{path} has format {found!r}, expected {expected!r}; write it again with this "
                             "version of loraplace or move it out of the study folder")
    missing = [k for k in keys if k not in data]
    if missing:
        raise LoraplaceError(f"{path} lacks {', '.join(missing)}; write it again with this version of loraplace "
                             "or move it out of the study folder")
    return data


def _load_importance(study_dir: Path) -> dict[str, dict[str, Any]]:
    """``importance/<score>.json`` of a study folder, by score (empty without the folder)."""
    out = {}
    for path in sorted((study_dir / "importance").glob("*.json")):
        data = _read_format(path, IMPORTANCE_FORMAT, ("max_rank", "slots"))
        out[str(data.get("score") or path.stem)] = data
    return out


def _load_allocations(study_dir: Path) -> dict[str, dict[str, Any]]:
    """``allocations/*.json`` of a study folder, by the arm label it was trained as (the
    ``strategy`` of its results rows); empty without the folder."""
    out = {}
    for path in sorted((study_dir / "allocations").glob("*.json")):
        data = _read_format(path, ALLOCATION_FORMAT, ("arm", "placement"))
        out[str(data["arm"])] = data
    return out


def _load_norms(path: Path) -> dict[str, Any] | None:
    """A run's ``adapter_norms.json`` (None when absent).

    Raises:
        LoraplaceError: the file holds no ``modules`` list.
    """
    data = _read_json(path)
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("modules"), list)):
        raise LoraplaceError(f"{path} holds no 'modules' list of {{name, role, stack, layer, r, norm}}; "
                             "rerun the run or delete the file")
    return data


def load_study(study_dir: Path) -> Study:
    """Load one study folder.

    Raises:
        LoraplaceError: the folder does not exist, or holds no (valid) results.json; an
            importance, allocation or adapter-norms file is not in the format expected.
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
            adapter_norms=_load_norms(run_dir / "adapter_norms.json"),
        ))
    tuning = [r for r in runs if r.result.kind == "tune"]
    runs = [r for r in runs if r.result.kind != "tune"]
    if not runs and not tuning:
        raise LoraplaceError(f"{study_dir / 'results.json'} lists no runs; run the study first")
    return Study(dir=study_dir, config=data.get("study") or {}, runs=runs, tuning=tuning,
                 importance=_load_importance(study_dir), allocations=_load_allocations(study_dir))


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
