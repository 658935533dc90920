"""Runs a study's jobs in parallel on a Ray cluster (``loraplace run --executor ray``).

Each worker is a Ray actor (:class:`RunWorker`) that holds a :class:`RunContext`, so the base
model is loaded once per worker and reused run after run, and the tokenized data is prepared once
by the driver and shared through Ray's object store (each worker fetches it once); its resources
(``num_gpus``, ``num_cpus``) are declared so Ray's scheduler spreads the workers over every node
of the cluster. A worker runs :func:`execute_run` into a worker-local temp folder and returns the
:class:`RunResult` with the bytes of the run's files; the driver writes them into
``STUDY_DIR/runs/<run_id>/`` (the driver is the only writer of the study folder, no shared
filesystem is assumed), so a Ray study has the layout and the report of a local one.

With ``executor.isolate`` (the default), a worker is replaced by a new one (a new process) after
each run and after the allocations, so that no run inherits the memory of an earlier one.

Faults: a worker process that dies mid-run (``RayActorError``) is replaced by a new worker and
the run is submitted again, up to ``max_retries`` times; then the run is recorded as failed with
the reason and the study goes on. Ctrl-C kills the workers (and shuts Ray down if this command
started it). Progress (run started, optimizer steps) comes back through a ``ray.util.queue.Queue``
that the driver drains between ``ray.wait`` timeouts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from loraplace.config import ExecutorSettings, StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.files import atomic_write_bytes
from loraplace.records import RunResult, RunSpec
from loraplace.run.context import RunContext
from loraplace.run.measure import library_versions, resolved_environment
from loraplace.study.allocations import Allocated, compute_allocations
from loraplace.study.runs import execute_run, failed_result
from loraplace.study.store import ENVIRONMENT_KEYS

StepHook = Callable[[RunSpec, int, int, "float | None"], None]

# Versions that must be the same on every worker as on the driver (they change what a run computes).
CHECKED_LIBRARIES = ("loraplace", "torch", "transformers", "peft")


def _import_ray():
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # no uv/network lookups for the workers
    try:
        import ray  # deferred: Ray is optional (the ray extra)
    except ImportError:
        raise LoraplaceError("--executor ray needs Ray: pip install 'loraplace[ray]' (or pip install 'ray>=2.40')") from None
    return ray


def _check_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, where a Ray address does not answer: a Ray Client address
    (``ray://HOST:PORT``, port 10001 by default; Ray Client itself retries for about 30 s) or a head
    node's ``HOST:PORT`` (``ray.init`` retries for minutes). ``auto`` and ``local`` are Ray's to resolve."""
    client = address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").rpartition(":") if ":" in address.removeprefix("ray://") \
        else (address.removeprefix("ray://"), "", "")
    try:
        number = int(port or (10001 if client else 6379))
    except ValueError:
        raise LoraplaceError(f"--executor ray: {address!r} is not a Ray address (auto, HOST:PORT or "
                             "ray://HOST:PORT)") from None
    try:
        with socket.create_connection((host, number), timeout=timeout_s):
            pass
    except OSError as e:
        raise LoraplaceError(
            f"--executor ray: nothing answers at {address} ({e.strerror or type(e).__name__}); start the head node "
            f"with `ray start --head` and open its {'Ray Client ' if client else ''}port ({number}) to this machine, "
            "or use --ray-address auto on a node of the cluster") from None


class RunWorkerImpl:
    """What a Ray worker does (wrapped by :func:`worker_class` into an actor class)."""

    def __init__(self, progress_queue=None, allow_fetch: bool = True, threads: int | None = None):

        if threads:  # a CPU worker uses the CPUs it declared, not every core of its node
            torch.set_num_threads(threads)
        self.ctx = RunContext(allow_fetch=allow_fetch)
        self.queue = progress_queue

    def info(self, device: str, precision: str) -> dict[str, Any]:
        """This worker's host, pid, and environment (:func:`~loraplace.run.measure.resolved_environment`)."""
        return {"host": socket.gethostname(), "pid": os.getpid(), **resolved_environment(device, precision)}

    def pid(self) -> int:
        return os.getpid()

    def allocate(self, config: StudyConfig, template: RunSpec, labels: list[str],
                 known: dict[str, dict[str, Any]]) -> Allocated:
        """The study's per-study allocations, computed on this worker (its device and precision, the
        ones the runs use) on the base model it then keeps for its runs."""
        return compute_allocations(config, template, labels, self.ctx, known)

    def prepared(self) -> int:
        """How many times this worker tokenized data itself (0 when the driver's data reached it)."""
        return self.ctx.prepared

    def _push(self, item: tuple) -> None:
        if self.queue is not None:
            try:
                self.queue.put_nowait(item)
            except Exception:  # noqa: BLE001 - progress is best effort, the run goes on
                pass

    def run(self, spec: RunSpec, data_key: tuple | None = None,
            data_ref: list | None = None) -> tuple[RunResult, dict[str, bytes], str]:
        """Run ``spec`` in a temp folder of this worker; returns the result, the run's files
        (path relative to the run folder -> bytes) and the temp folder's path.

        ``data_ref`` (``[ObjectRef]``, in a list so that Ray does not fetch it for every call) is
        the tokenized data the driver put in the object store for ``data_key``: fetched on this
        worker's first run of that key, then kept, so no worker tokenizes.
        """

        if data_key is not None and data_ref and not self.ctx.has_data(data_key):
            import ray  # deferred: Ray is optional (the ray extra)

            self.ctx.add_data(data_key, ray.get(data_ref[0]))
        tmp = tempfile.mkdtemp(prefix=f"loraplace-{spec.run_id}-")
        try:
            local = spec.model_copy(update={"run_dir": tmp})
            self._push(("start", spec.run_id, os.getpid(), None, None))
            hook = lambda step, total, loss: self._push(("step", spec.run_id, step, total, loss))  # noqa: E731
            result = execute_run(local, self.ctx, on_step=hook)
            files = {}
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    files[path.relative_to(tmp).as_posix()] = path.read_bytes()
            return result, files, tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


_WORKER_CLASS = None


def worker_class():
    """The ``@ray.remote`` actor class of :class:`RunWorkerImpl` (made on first use: Ray is optional)."""
    global _WORKER_CLASS
    if _WORKER_CLASS is None:
        _WORKER_CLASS = _import_ray().remote(RunWorkerImpl)
    return _WORKER_CLASS


def _get(ray, refs):
    """``ray.get`` that raises a worker's :class:`LoraplaceError` (bad input) as itself, not wrapped."""
    from ray.exceptions import RayTaskError  # deferred: Ray is optional (the ray extra)

    try:
        return ray.get(refs)
    except RayTaskError as e:
        if isinstance(e.cause, LoraplaceError):
            raise LoraplaceError(str(e.cause)) from None
        raise


def write_run_files(run_dir: Path, files: dict[str, bytes], worker_dir: str) -> None:
    """Write a worker's run files into ``run_dir`` with the atomic writer, byte for byte; only in
    loraplace's JSON files is the worker's temp folder (config.json's ``run_dir``) renamed ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    old, new = json.dumps(worker_dir)[1:-1], json.dumps(str(run_dir))[1:-1]
    for rel, data in files.items():
        target = run_dir / rel
        if not target.resolve().is_relative_to(run_dir.resolve()):
            continue  # never write outside the run folder
        target.parent.mkdir(parents=True, exist_ok=True)
        if worker_dir and rel.endswith(".json"):  # loraplace writes its JSON files as UTF-8
            data = data.decode("utf-8").replace(old, new).encode("utf-8")
        atomic_write_bytes(target, data)  # every other file (event logs, safetensors) byte for byte


def version_mismatch(driver: dict[str, str], worker: dict[str, Any]) -> str | None:
    """One line naming the first library whose version differs between the driver and a worker."""
    versions = worker.get("versions") or {}
    for lib in CHECKED_LIBRARIES:
        if versions.get(lib) != driver.get(lib):
            return (f"worker on host {worker.get('host')} (pid {worker.get('pid')}) has {lib} {versions.get(lib)}, "
                    f"the driver has {lib} {driver.get(lib)}; install the same version on every node")
    return None


class RayExecutor:
    """Runs jobs on Ray workers in parallel, yielding each result (with its files written into
    the study folder) as soon as it finishes.

    Use: ``ex = RayExecutor(settings, ...); env = ex.start(device, precision)`` (starts the
    workers and checks their versions), then ``for result in ex.submit(specs)``, and finally
    ``ex.close()`` (kills the workers; shuts Ray down if it started it).
    """

    def __init__(self, settings: ExecutorSettings, on_step: StepHook | None = None,
                 on_start: Callable[[RunSpec], None] | None = None, on_note: Callable[[str], None] | None = None,
                 allow_fetch: bool = True, poll_s: float = 0.2):
        self.settings = settings
        self.on_step, self.on_start, self.on_note = on_step, on_start, on_note
        self.allow_fetch = allow_fetch
        self.poll_s = poll_s
        self.ray = _import_ray()
        self.started_ray = False
        self.workers: list[Any] = []
        self.queue = None
        self.infos: list[dict[str, Any]] = []
        self.retries: dict[str, int] = {}  # run id -> times it was resubmitted after its worker died
        self.running: dict[str, int] = {}  # run id -> pid of the worker process that runs (or ran) it

        # The driver's context: tokenizes each distinct dataset once, for the object store. It never
        # loads a model: per-study allocations are computed on a worker (allocate).
        self.ctx = RunContext(allow_fetch=allow_fetch)
        self._data_refs: dict[tuple, Any] = {}

    # ---------------------------------------------------------------------------------- setup
    def _connect(self) -> None:
        ray = self.ray
        address = self.settings.address
        if address not in (None, "auto", "local"):  # checked even if this process has a Ray already
            _check_address(address)
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False, "log_to_driver": False}
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:
            raise LoraplaceError(f"--executor ray: cannot join the Ray cluster at {address}: {e}") from None
        except ValueError as e:  # e.g. "Ray Client requires pip package ray[client]"
            raise LoraplaceError(f"--executor ray: cannot use the Ray address {address}: {e}; "
                                 "pip install 'loraplace[ray]' brings Ray Client") from None
        # This executor's connection, closed by close(): ``local`` (and no address, without a cluster)
        # starts a Ray instance that ray.shutdown() stops; to a cluster it only disconnects.
        self.started_ray = True

    def _worker_count(self, runs: int, gpus: float, wait_s: float = 30.0) -> int:
        # Resources of actors that just ended (an earlier study in this process, a finished job on
        # the cluster) come back asynchronously: wait up to ``wait_s`` for room for one worker.
        deadline = time.monotonic() + wait_s
        while True:
            resources = self.ray.available_resources()
            cpus = resources.get("CPU", 0.0)
            fit = int(cpus // self.settings.cpus_per_run)
            if gpus > 0:
                fit = min(fit, int(resources.get("GPU", 0.0) // gpus))
            if fit >= 1 or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if fit < 1:
            need = f"{self.settings.cpus_per_run:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
            raise LoraplaceError(f"--executor ray: the Ray cluster has no room for one worker ({need} per run; "
                                 f"free: {cpus:g} CPU, {resources.get('GPU', 0.0):g} GPU)")
        n = min(fit, max(1, runs))
        return min(n, self.settings.workers) if self.settings.workers else n

    def _new_worker(self):
        gpus = self._gpus
        # A dead worker is replaced by a new one (see _worker_died), not restarted in place.
        options: dict[str, Any] = {"num_cpus": self.settings.cpus_per_run, "num_gpus": gpus,
                                   "max_restarts": 0, "max_task_retries": 0}
        threads = None if gpus else max(1, int(self.settings.cpus_per_run))  # CPU training: the declared CPUs
        return worker_class().options(**options).remote(self.queue, self.allow_fetch, threads)

    def start(self, device: str, precision: str, runs: int) -> dict[str, Any]:
        """Join (or start) Ray, start the workers, and check each reports the driver's library
        versions. Returns the workers' environment (device type, precision, versions).

        Raises:
            LoraplaceError: Ray missing or unreachable, no room for a worker, a version mismatch,
                or workers that resolve device/precision differently.
        """
        from ray.util.queue import Queue  # deferred: Ray is optional (the ray extra)

        self._connect()
        total_gpus = self.ray.cluster_resources().get("GPU", 0.0)
        gpus = self.settings.gpus_per_run
        if gpus is None:
            gpus = 1.0 if total_gpus > 0 and device != "cpu" else 0.0
        self._gpus = gpus
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.workers = [self._new_worker() for _ in range(self._worker_count(runs, gpus))]
        self.infos = _get(self.ray, [w.info.remote(device, precision) for w in self.workers])
        driver = library_versions()
        for info in self.infos:
            problem = version_mismatch(driver, info)
            if problem:
                raise LoraplaceError(f"--executor ray: {problem}")
        kinds = {(i["device"], i["precision"]) for i in self.infos}
        if len(kinds) > 1:
            raise LoraplaceError(f"--executor ray: the workers resolve device/precision differently "
                                 f"({', '.join(f'{d}/{p}' for d, p in sorted(kinds))}); set --device and train.precision")
        first = self.infos[0]
        return {k: first[k] for k in ENVIRONMENT_KEYS if k in first}

    # ------------------------------------------------------------------------------------ runs
    def _drain(self, specs: dict[str, RunSpec]) -> None:
        if self.queue is None:
            return
        try:
            n = self.queue.qsize()
            items = self.queue.get_nowait_batch(n) if n else []
        except Exception:  # noqa: BLE001 - progress is best effort
            return
        for kind, run_id, step, total, loss in items:
            spec = specs.get(run_id)
            if spec is None:
                continue
            if kind == "start":
                self.running[run_id] = step  # the worker's pid
                if self.on_start:
                    self.on_start(spec)
            elif kind == "step" and self.on_step:
                self.on_step(spec, step, total, loss)

    def allocate(self, config: StudyConfig, template: RunSpec, labels: list[str], known: dict[str, dict[str, Any]],
                 note: Callable[[str], None] = lambda text: None) -> Allocated:
        """The per-study allocations of ``labels``, computed on the first worker, with the device and
        precision the runs will use (the driver may be a CPU-only head node); what they wrote comes
        back to the driver, the only writer of the study folder.

        Raises:
            LoraplaceError: from the allocation (a budget that cannot be met), or a dead worker.
        """
        note(f"allocating {', '.join(labels)} on a Ray worker ({self.infos[0].get('device')}, "
             f"{self.infos[0].get('precision')})")
        allocated = _get(self.ray, self.workers[0].allocate.remote(config, template, labels, known))
        if self.settings.isolate:  # the runs must not start on the worker that scored the model
            self._replace(self.workers[0])
        return allocated

    def submit(self, specs: Iterable[RunSpec]) -> Iterator[RunResult]:
        """Run the jobs on the workers; yield each result once its files are in its ``run_dir``."""
        ray = self.ray
        from ray.exceptions import RayActorError  # deferred: Ray is optional (the ray extra)

        # Base rows (an evaluation, no training) last: the long runs start first, and the short
        # ones fill the workers that free up (the order of the results does not change any number).
        todo = deque(sorted(specs, key=lambda s: s.kind == "base"))
        by_id = {s.run_id: s for s in todo}
        idle = list(self.workers)
        pending: dict[Any, tuple[Any, RunSpec]] = {}
        while todo or pending:
            while todo and idle:
                spec, worker = todo.popleft(), idle.pop()
                key, ref = self._shared_data(spec)
                pending[worker.run.remote(spec, key, [ref])] = (worker, spec)
            done, _ = ray.wait(list(pending), num_returns=1, timeout=self.poll_s)
            self._drain(by_id)
            for ref in done:
                worker, spec = pending.pop(ref)
                try:
                    result, files, worker_dir = _get(ray, ref)
                except RayActorError as e:
                    yield from self._worker_died(worker, spec, e, todo, idle)
                    continue
                # isolate: a fresh worker process for the next run (no memory of this one's)
                idle.append(self._replace(worker) if self.settings.isolate else worker)
                self._drain(by_id)  # the run's last steps before its end
                write_run_files(Path(spec.run_dir), files, worker_dir)
                yield result

    def _shared_data(self, spec: RunSpec) -> tuple[tuple, Any]:
        """The object-store reference of ``spec``'s tokenized data, prepared here on first use."""
        task = self.ctx.task(spec)
        key = self.ctx.data_key(spec, task)
        if key not in self._data_refs:
            self._data_refs[key] = self.ray.put(self.ctx.data(spec, task))
        return key, self._data_refs[key]

    def _worker_died(self, worker, spec: RunSpec, error: Exception, todo: deque, idle: list) -> Iterator[RunResult]:
        """Replace the dead worker; resubmit ``spec`` (first in line) or, after ``max_retries``, fail it."""
        idle.append(self._replace(worker))
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        tries = self.retries.get(spec.run_id, 0)
        if tries < self.settings.max_retries:
            self.retries[spec.run_id] = tries + 1
            if self.on_note:
                self.on_note(f"run {spec.run_id}: its worker died ({type(error).__name__}); retrying on a new worker "
                             f"(retry {tries + 1} of {self.settings.max_retries})")
            todo.appendleft(spec)
            return
        message = f"worker died {tries + 1} times ({type(error).__name__}: {reason})"
        write_run_files(Path(spec.run_dir), {"error.txt": (str(error) + "\n").encode()}, "")
        yield failed_result(spec, message)

    def _replace(self, worker):
        """Kill ``worker`` and start a new one in its place; returns the new one."""
        with _suppress():
            self.ray.kill(worker, no_restart=True)
        replacement = self._new_worker()
        self.workers = [replacement if w is worker else w for w in self.workers]
        return replacement

    def worker_pids(self) -> list[int]:
        return self.ray.get([w.pid.remote() for w in self.workers])

    def close(self) -> None:
        """Kill the workers (a run in progress is abandoned) and shut Ray down if this executor
        initialised it (a Ray the process had before is left as it was)."""
        ray = self.ray
        if not ray.is_initialized():
            return
        for w in self.workers:
            with _suppress():
                ray.kill(w, no_restart=True)
        self.workers = []
        self._data_refs = {}
        if self.queue is not None:
            with _suppress():
                self.queue.shutdown()
            self.queue = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return exc[0] is not None and issubclass(exc[0], Exception)
