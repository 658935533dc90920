"""Measuring the machine: peak memory during a run, and the library versions behind a result."""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import platform
import threading
from typing import Any

import psutil
import torch

from loraplace.run.device import pick_device, resolve_precision


def release_memory(device: torch.device | None = None) -> None:
    """Give back what earlier work left behind before a measurement starts: collect cyclic
    garbage, return freed heap pages to the OS (glibc's ``malloc_trim(0)``; a no-op elsewhere)
    and, on CUDA, drop PyTorch's cached blocks."""
    gc.collect()
    _malloc_trim()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


def _malloc_trim() -> None:
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        if platform.system() == "Linux":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _TRIM = libc.malloc_trim
                _TRIM.argtypes, _TRIM.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):  # not glibc (musl) or no libc.so.6
                _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


class PeakMemory:
    """Memory of one run, in MiB: what was in use when the block started (``start_mib``), the
    peak inside it (``peak_mib``) and the difference (``increase_mib``: what the run itself added
    on top of the loaded model and data).

    On entry, memory that earlier runs left behind is released (:func:`release_memory`), so that
    neither number carries it. ``kind`` says which measure:

    * ``cuda_allocated`` (CUDA): ``torch.cuda.memory_allocated`` at the start and
      ``torch.cuda.max_memory_allocated`` (peak stats reset on entry): tensors only, not the
      caching allocator's reserve or the CUDA context.
    * ``rss`` (elsewhere): the process's resident set size, sampled every ``interval_s`` seconds
      by a background thread (``ru_maxrss`` cannot be reset, so it would report the study's peak,
      not the run's). A peak shorter than the interval can be missed.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.02, release: bool = True):
        self.device = device
        self.interval_s = interval_s
        self.release = release
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        self.start_mib = 0.0
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def increase_mib(self) -> float:
        """``peak_mib - start_mib``."""
        return self.peak_mib - self.start_mib

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.peak_mib = max(self.peak_mib, process.memory_info().rss / 2**20)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakMemory":
        if self.release:
            release_memory(self.device)
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = self.peak_mib = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.start_mib = self.peak_mib = psutil.Process().memory_info().rss / 2**20
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_mib = max(self.peak_mib, torch.cuda.max_memory_allocated(self.device) / 2**20)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_mib = max(self.peak_mib, psutil.Process().memory_info().rss / 2**20)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "accelerate", "datasets", "loraplace"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:  # only where installed: it matters to quantized base models alone (not pinned on resume)
        out["bitsandbytes"] = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def resolved_environment(device: str, precision: str) -> dict[str, Any]:
    """What this process runs with: the device type and precision that ``device`` and
    ``precision`` resolve to, torch's intra-op thread count on a CPU (the split of a CPU kernel's
    reductions depends on it, so losses can differ in the 4th decimal between thread counts), and
    the library versions."""
    resolved = pick_device(device)
    env: dict[str, Any] = {"device": resolved.type, "precision": resolve_precision(precision, resolved)}
    if resolved.type == "cpu":
        env["threads"] = torch.get_num_threads()
    return {**env, "versions": library_versions()}
