"""The study folder: the study's config, one folder per run, and the results table, rewritten
after every run (atomically, with fsync) so that a crash or Ctrl-C loses nothing that finished.
What the study runs (arms, run ids, specs) is planned in :mod:`loraplace.study.specs`; the store
keeps the folder: its lock, its environment, its results files, and the rules of a resume.

Layout::

    STUDY_DIR/
      study.yaml            the study's config: the union of every command that ran in this folder
      environment.json      what ``auto`` resolved to (device type, precision), CPU threads, library versions
      results.json          {"study": {...}, "environment": {...}, "runs": [RunResult, ...]}
      results.csv           one row per run
      results.md            the table a person reads
      .lock                 while a ``loraplace run`` works in the folder: its pid and host
      runs/<run_id>/        config.json, modules.json, train_log.json, eval_examples.json, result.json

Rules (see :meth:`StudyStore.init`):

* A finished run is never removed from the results by any command. ``--resume`` with fewer or
  other seeds/strategies trains only what the current command asks for and is not finished yet,
  and keeps every stored row; study.yaml then describes the union of the old and new seeds,
  strategies, budget-matched arms and base row.
* A resume must resolve to the same device type, precision and library versions as the study did
  (``environment.json``), unless ``--allow-mixed`` is given; then the study is marked mixed.
* A stored row is taken as finished only when its kind, strategy and seed are the spec's.
* One process at a time: ``.lock`` is created atomically and removed on exit; a lock left by a
  dead process on this host is taken over, one from another host must be removed by hand.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from pydantic import ValidationError

from loraplace.config import StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.files import atomic_write_text, fsync_dir
from loraplace.placement.arms import REFERENCE_STRATEGY
from loraplace.records import RunResult, RunSpec
from loraplace.study.specs import arm_labels, legacy_run_id_for, run_identity
from loraplace.study.tables import results_markdown

CSV_COLUMNS = [
    "run_id", "strategy", "seed", "status", "r", "alpha", "match_budget", "budget_target", "budget_deviation_pct",
    "trainable_params", "total_params", "trainable_pct",
    "params_vs_full_pct", "eval_loss", "perplexity", "delta_eval_loss", "delta_eval_loss_pct", "worse_than_base",
    "eval_tokens", "train_time_s", "train_steps", "train_real_tokens", "train_tokens_per_s", "eval_time_s",
    "peak_memory_mib", "memory_kind", "position", "device", "precision", "quantization", "error",
    "kind", "tune_lr", "tune_rung", "validation_loss",
]

# Library versions whose change may change a run's numbers: a resume must match them.
PINNED_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "loraplace")


# ------------------------------------------------------------------------------------------ lock
class StudyLock:
    """``STUDY_DIR/.lock``: one ``loraplace run`` per study folder.

    The lock file is created with ``O_CREAT | O_EXCL`` (atomic) and holds the owner's pid, host
    and process start time. A lock whose owner is gone (same host, pid not alive or reused by
    another process) is taken over with a note; a lock held by a live process, or by any process
    on another host (whose liveness cannot be checked from here), is refused with a message that
    says what to do.
    """

    def __init__(self, study_dir: Path):
        self.dir = Path(study_dir)
        self.path = self.dir / ".lock"
        self.note: str | None = None  # set when a stale lock was taken over
        self._held = False

    def _owner(self) -> dict[str, Any]:

        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "created": psutil.Process(pid).create_time(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable (e.g. written half by a crash)

    @staticmethod
    def _alive(info: dict[str, Any]) -> bool:

        pid = info.get("pid")
        if not isinstance(pid, int) or not psutil.pid_exists(pid):
            return False
        created = info.get("created")
        if isinstance(created, (int, float)):
            try:  # a pid reused by another process after the owner died is not the owner
                return abs(psutil.Process(pid).create_time() - created) < 1.0
            except psutil.Error:
                return False
        return True

    def acquire(self) -> "StudyLock":
        """Take the lock (creating the study folder).

        Raises:
            LoraplaceError: the folder cannot be created, or another process holds the lock.
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise LoraplaceError(_not_a_folder(self.dir)) from None
        except OSError as e:
            raise LoraplaceError(f"cannot create the study folder {self.dir}: {e.strerror or e}") from None
        me = self._owner()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(self.dir)
            self._held = True
            return self
        raise LoraplaceError(f"could not take the lock {self.path}; another process keeps taking it")

    def _take_over_if_stale(self) -> None:
        info = self._read()
        if info is None:
            return  # released meanwhile: retry
        host, pid = info.get("host"), info.get("pid")
        since = f" since {info['since']}" if info.get("since") else ""
        if host not in (None, socket.gethostname()):
            raise LoraplaceError(
                f"the study folder {self.dir} is in use by pid {pid} on host {host}{since}; wait for it to finish, "
                f"or, if that process is really gone, delete {self.path} and rerun"
            )
        if info and self._alive(info):
            raise LoraplaceError(
                f"the study folder {self.dir} is in use by another loraplace run (pid {pid} on this host{since}); "
                "wait for it to finish or choose another --output"
            )
        # Stale: move it aside atomically (only one of several racing processes succeeds), check that
        # what was moved is the stale lock read above, and retry the exclusive create.
        aside = self.path.with_name(f".lock.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if info and moved != info:  # another process took over in between: give its lock back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            with contextlib.suppress(OSError):
                os.unlink(aside)
            return
        with contextlib.suppress(OSError):
            os.unlink(aside)
        what = f"pid {pid} is no longer running" if pid is not None else "the lock file was unreadable"
        self.note = f"took over a stale lock in {self.dir} ({what})"

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        info = self._read()
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> "StudyLock":
        return self.acquire() if not self._held else self

    def __exit__(self, *exc) -> None:
        self.release()


def _not_a_folder(path: Path) -> str:
    what = "a file" if Path(path).is_file() else "not a folder (or lies under a file)"
    return (f"--output {path} is {what}, not a study folder; pass a new folder path, or an existing study "
            "folder with --resume")


# ------------------------------------------------------------------------------- resume
def merge_configs(stored: StudyConfig, current: StudyConfig) -> StudyConfig:
    """The config that describes a study folder after ``current`` resumed it: ``stored`` with the
    seeds and strategies of both (stored ones first, in their order; new ones appended in the
    order given), the base row and the untuned runs of a tuned study if either has them, and the
    budget reference of either.

    Raises:
        LoraplaceError: the two use different budget references (one study has one).
    """
    if None not in (stored.match_budget, current.match_budget) and stored.match_budget != current.match_budget:
        raise LoraplaceError(
            f"--resume: this study's budget-matched arms are matched to {stored.match_budget}; a resume may add "
            f"--match-budget where there was none, or leave it out, but not change it to {current.match_budget}; "
            "use a new --output for the other reference"
        )
    return stored.model_copy(update=dict(
        seeds=stored.seeds + [s for s in current.seeds if s not in stored.seeds],
        strategies=stored.strategies + [s for s in current.strategies if s not in stored.strategies],
        include_base=stored.include_base or current.include_base,
        tune=stored.tune.model_copy(update={"untuned": stored.tune.untuned or current.tune.untuned}),
        match_budget=stored.match_budget if stored.match_budget is not None else current.match_budget,
        output=current.output if current.output is not None else stored.output,
    ))


# Settings a resume may change: they add runs (merged into the union) or do not change what a run
# means (the name, the folder, gradient checkpointing: same loss, less memory). device and precision
# are compared by what they resolve to.
_GROWABLE = {"name": True, "output": True, "seeds": True, "strategies": True, "match_budget": True,
             "include_base": True, "device": True, "train": {"precision", "gradient_checkpointing"},
             "tune": {"untuned"}, "decided": True}


# ----------------------------------------------------------------------------------- environment
# What a study's environment.json pins (threads only on a CPU: loraplace.run.measure.resolved_environment).
ENVIRONMENT_KEYS = ("device", "precision", "threads", "versions")


def environment_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``["precision bf16 -> fp32", "torch 2.13.0 -> 2.14.0"]``: what differs between two environments."""
    diffs = []
    for key in ("device", "precision", "threads"):  # a study stored before threads were recorded pins none
        if stored.get(key) not in (None, current.get(key)):
            diffs.append(f"{key} {stored.get(key)} -> {current.get(key)}")
    old, new = stored.get("versions") or {}, current.get("versions") or {}
    for lib in PINNED_LIBRARIES:
        if lib in old and old.get(lib) != new.get(lib):
            diffs.append(f"{lib} {old.get(lib)} -> {new.get(lib)}")
    return diffs


def _describe_env(env: dict[str, Any]) -> str:
    versions = env.get("versions") or {}
    libs = ", ".join(f"{lib} {versions[lib]}" for lib in ("torch", "transformers", "peft") if lib in versions)
    threads = f" ({env['threads']} threads)" if env.get("threads") else ""
    return f"precision {env.get('precision')} on {env.get('device')}{threads}" + (f" ({libs})" if libs else "")


def _environment_of_rows(rows: list[RunResult]) -> dict[str, Any] | None:
    """The environment of a study written before environment.json existed, from its first ok row."""
    for r in rows:
        if r.status == "ok" and r.device and r.precision:
            return {"device": r.device.split()[0], "precision": r.precision, "versions": dict(r.versions)}
    return None


def _env_key(env: dict[str, Any]) -> tuple:
    versions = env.get("versions") or {}
    return (env.get("device"), env.get("precision"), env.get("threads"),
            tuple(versions.get(lib) for lib in PINNED_LIBRARIES))


class StudyStore:
    """Reads and writes one study folder.

    Use: ``with store.lock(): union = store.init(config, resume, environment)``, then
    ``store.finished_for(specs)`` and ``store.record(result)`` after every run.
    """

    def __init__(self, study_dir: Path):
        self.dir = Path(study_dir)
        self.config: StudyConfig | None = None  # the union config, set by init
        self.rows: list[RunResult] = []  # every stored row, in results.json order
        self.environment: dict[str, Any] | None = None
        self.mixed_note: str | None = None  # set by init when --allow-mixed mixed environments

    @property
    def results_path(self) -> Path:
        return self.dir / "results.json"

    @property
    def environment_path(self) -> Path:
        return self.dir / "environment.json"

    def lock(self) -> StudyLock:
        return StudyLock(self.dir)

    def check_folder(self) -> None:
        """Raise :class:`LoraplaceError` when the study path exists and is not a folder (a file
        given as ``--output``): checked before anything else, so that it fails in a moment."""
        if self.dir.exists() and not self.dir.is_dir():
            raise LoraplaceError(_not_a_folder(self.dir))

    def _read_results(self) -> dict[str, Any] | None:
        if not self.results_path.exists():
            return None
        try:
            data = json.loads(self.results_path.read_text())
        except (OSError, ValueError) as e:
            raise LoraplaceError(f"{self.results_path} is unreadable ({e}); restore it or use a new --output") from None
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise LoraplaceError(f"{self.results_path} has no 'runs' list; it was not written by loraplace")
        return data

    def _stored_config(self, data: dict[str, Any] | None) -> StudyConfig | None:
        """The stored study config: study.yaml, else the copy inside results.json."""
        path = self.dir / "study.yaml"
        raw, source = None, None
        if path.exists():
            try:
                raw, source = yaml.safe_load(path.read_text()), path
            except yaml.YAMLError:
                raw = None
        if raw is None and data is not None and isinstance(data.get("study"), dict):
            raw, source = data["study"], self.results_path
        if raw is None:
            if data is not None and data["runs"]:
                raise LoraplaceError(
                    f"--resume: {self.dir} holds results but neither a readable study.yaml nor the study's config in "
                    "results.json, so a resume cannot check that it continues the same study; use a new --output"
                )
            return None
        try:
            return StudyConfig.model_validate(raw)
        except (ValidationError, LoraplaceError) as e:
            raise LoraplaceError(f"--resume: the stored config {source} is not valid ({e}); use a new --output") from None

    def init(self, config: StudyConfig, resume: bool, environment: dict[str, Any] | None = None,
             allow_mixed: bool = False) -> StudyConfig:
        """Open the folder for ``config`` (a new study, or with ``resume`` the continuation of the
        stored one) and return the study's config from now on: with ``resume``, the union of the
        stored config and ``config`` (:func:`merge_configs`). Writes study.yaml and
        environment.json; loads every stored row into :attr:`rows`.

        Raises:
            LoraplaceError: a study is here and ``resume`` is not set; the config differs in a
                setting that changes what a run means; ``environment`` differs from the study's
                and ``allow_mixed`` is not set.
        """
        self.check_folder()
        data = self._read_results()
        if data is not None and not resume:
            raise LoraplaceError(
                f"{self.dir} already holds a study; pass --resume to continue it or choose another --output"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        union = config
        self.rows = []
        stored_env = None
        if resume:
            stored = self._stored_config(data)
            if stored is not None:
                if stored.model_dump(exclude=_GROWABLE) != config.model_dump(exclude=_GROWABLE):
                    old, new = stored.model_dump(exclude=_GROWABLE), config.model_dump(exclude=_GROWABLE)
                    keys = _differing_keys(old, new)
                    raise LoraplaceError(
                        f"--resume: the study in {self.dir} was run with a different config ({', '.join(keys)}; only "
                        "seeds, strategies, match_budget and include_base may change on resume); rerun with the same "
                        "study file and overrides, or use a new --output"
                    )
                union = merge_configs(stored, config)
            if data is not None:
                self.rows = [RunResult.model_validate(r) for r in data["runs"]]
            stored_env = self._stored_environment(data)
        self.config = union
        self.environment = self._settle_environment(stored_env, environment, allow_mixed)
        atomic_write_text(self.dir / "study.yaml", yaml.safe_dump(union.model_dump(), sort_keys=False))
        if self.environment is not None:
            atomic_write_text(self.environment_path, json.dumps(self.environment, indent=2))
        return union

    def record_decided(self, decided: dict[str, Any]) -> StudyConfig:
        """Keep the settings decided once for the study (:attr:`StudyConfig.decided`) in study.yaml;
        returns the study's config with them."""
        assert self.config is not None, "init() first"
        self.config = self.config.model_copy(update={"decided": decided})
        atomic_write_text(self.dir / "study.yaml", yaml.safe_dump(self.config.model_dump(), sort_keys=False))
        return self.config

    def _stored_environment(self, data: dict[str, Any] | None) -> dict[str, Any] | None:
        if self.environment_path.exists():
            try:
                env = json.loads(self.environment_path.read_text())
                if isinstance(env, dict):
                    return env
            except (OSError, ValueError):
                pass
        if data is not None and isinstance(data.get("environment"), dict):
            return data["environment"]
        return _environment_of_rows(self.rows)

    def _settle_environment(self, stored: dict[str, Any] | None, current: dict[str, Any] | None,
                            allow_mixed: bool) -> dict[str, Any] | None:
        if current is None:
            return stored
        current = {k: current[k] for k in ENVIRONMENT_KEYS if k in current}
        if stored is None:
            return {**current, "mixed": False, "seen": [current]}
        seen = list(stored.get("seen") or [{k: stored[k] for k in ENVIRONMENT_KEYS if k in stored}])
        diffs = environment_differences(stored, current)
        if not diffs:
            return stored
        if not allow_mixed:
            cfg = self.config
            asked = f"device {cfg.device}, precision {cfg.train.precision}" if cfg else "this config"
            threads = (f"; OMP_NUM_THREADS={stored['threads']} runs torch at the study's thread count"
                       if stored.get("threads") not in (None, current.get("threads")) else "")
            raise LoraplaceError(
                f"--resume: this study ran with {_describe_env(stored)}; this machine would run it with "
                f"{_describe_env(current)} ({asked} resolved here; {'; '.join(diffs)}). Resume where they resolve the same (or set --device / "
                f"train.precision to match{threads}), or pass --allow-mixed to mix them in one study (the report flags the mix)"
            )
        self.mixed_note = (f"--allow-mixed: this study now mixes environments ({'; '.join(diffs)}); it is marked "
                           f"mixed in {self.environment_path.name}, and the report flags it")
        if not any(_env_key(e) == _env_key(current) for e in seen):
            seen.append(current)
        return {**stored, "mixed": True, "seen": seen}

    def finished_for(self, specs: list[RunSpec]) -> dict[str, RunResult]:
        """The stored ok rows of ``specs``, by spec run id. A stored row is matched by the spec's id
        (or the id an older loraplace gave the same arm) and must be that spec's run.

        Raises:
            LoraplaceError: a stored row under a spec's id is the result of another run.
        """
        by_id = {r.run_id: r for r in self.rows}
        out: dict[str, RunResult] = {}
        for spec in specs:
            row = by_id.get(spec.run_id)
            if row is not None and run_identity(row) != run_identity(spec):
                raise LoraplaceError(
                    f"--resume: the stored run {spec.run_id!r} in {self.results_path} is {_what(row)}, but this study's "
                    f"run {spec.run_id!r} is {_what(spec)}; it is not taken as finished. Move runs/{spec.run_id} and "
                    "its row aside, or use a new --output"
                )
            if row is None and spec.kind == "lora":
                legacy = by_id.get(legacy_run_id_for(spec.strategy, spec.seed))
                row = legacy if legacy is not None and run_identity(legacy) == run_identity(spec) else None
            if row is not None and row.status == "ok":
                out[spec.run_id] = row
        return out

    def record(self, result: RunResult) -> None:
        """Add (or replace: a rerun of a failed run) one result and rewrite the results files.
        A stored ok row is never replaced or dropped, except by the same tuning run after a later
        rung (more steps trained)."""
        for i, row in enumerate(self.rows):
            if row.run_id == result.run_id or (row.kind == result.kind and row.strategy == result.strategy
                                               and row.seed == result.seed and row.status != "ok"
                                               and row.tune_lr == result.tune_lr):
                advanced = (row.kind == result.kind == "tune" and row.run_id == result.run_id
                            and (result.tune_rung or 0) > (row.tune_rung or 0))
                if row.status == "ok" and not advanced:
                    raise LoraplaceError(f"internal error: run {result.run_id} finished twice")
                self.rows[i] = result
                break
        else:
            self.rows.append(result)
        self.rows = ordered_rows(self.config, self.rows)
        self.save(self.config, self.rows)

    def load(self) -> list[RunResult]:
        data = self._read_results()
        return [RunResult.model_validate(r) for r in data["runs"]] if data is not None else []

    def save(self, config: StudyConfig, results: list[RunResult]) -> None:
        """Fill in the cross-run fields and rewrite results.json/.csv/.md atomically."""
        results = with_baseline_fields(results)
        payload: dict[str, Any] = {"study": config.model_dump()}
        if self.environment is not None:
            payload["environment"] = self.environment
        payload["runs"] = [r.model_dump() for r in results]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow(r.model_dump())
        # results.json last: it is what resume and the report read.
        atomic_write_text(self.dir / "results.csv", buf.getvalue())
        atomic_write_text(self.dir / "results.md", results_markdown(config, results))
        atomic_write_text(self.results_path, json.dumps(payload, indent=2))


def _what(x: RunResult | RunSpec) -> str:
    return "the base model row" if x.kind == "base" else f"strategy {x.strategy!r} seed {x.seed}"


def _differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for k in dict.fromkeys([*old, *new]):
            keys += _differing_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return keys
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]


def ordered_rows(config: StudyConfig | None, rows: list[RunResult]) -> list[RunResult]:
    """Rows in a stable reading order: the base row, then seed by seed (in ``config.seeds``
    order) each arm in :func:`~loraplace.study.specs.arm_labels` order, whatever order they ran in;
    rows the config does not describe keep their relative order at the end. A study's config only grows by appending
    seeds and strategies, so earlier rows never change their relative order."""
    if config is None:
        return list(rows)
    arms = arm_labels(config)

    def key(item: tuple[int, RunResult]) -> tuple:
        i, r = item
        if r.kind == "base":
            return (0, 0, 0, 0, i)
        if r.seed in config.seeds and r.strategy in arms:
            # tuning runs after the arms' own rows, by arm, seed and rate
            if r.kind == "tune":
                return (2, arms.index(r.strategy), config.seeds.index(r.seed), r.tune_lr or 0.0, i)
            return (1, config.seeds.index(r.seed), arms.index(r.strategy), 0, i)
        return (3, 0, 0, 0, i)

    return [r for _, r in sorted(enumerate(rows), key=key)]


def with_baseline_fields(results: list[RunResult]) -> list[RunResult]:
    """Set ``params_vs_full_pct`` and ``delta_eval_loss(_pct)`` against the run of the reference
    strategy (:data:`~loraplace.placement.arms.REFERENCE_STRATEGY`, the full-LoRA baseline) of the
    same seed, and ``worse_than_base`` of every ok LoRA run against the ok base-model row (None
    without one)."""
    full = {r.seed: r for r in results if r.strategy == REFERENCE_STRATEGY and r.kind == "lora" and r.status == "ok"}
    base = next((r for r in results if r.kind == "base" and r.status == "ok" and r.eval_loss is not None), None)
    out = []
    for r in results:
        ref = full.get(r.seed)
        update: dict[str, Any] = {}
        if ref is not None and r.kind == "lora" and r.trainable_params is not None:
            update["full_lora_params"] = ref.trainable_params
            update["params_vs_full_pct"] = 100.0 * r.trainable_params / ref.trainable_params
        if ref is not None and r.kind == "lora" and r.eval_loss is not None and ref.eval_loss is not None:
            update["delta_eval_loss"] = r.eval_loss - ref.eval_loss
            update["delta_eval_loss_pct"] = 100.0 * (r.eval_loss - ref.eval_loss) / ref.eval_loss
        if r.kind == "lora":
            ok = r.status == "ok" and r.eval_loss is not None and base is not None
            update["worse_than_base"] = bool(r.eval_loss > base.eval_loss) if ok else None
        out.append(r.model_copy(update=update))
    return out
