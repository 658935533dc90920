"""Measuring the machine: peak memory during a run, and the library versions behind a result."""

from __future__ import annotations

import importlib.metadata
import platform
import threading

import psutil
import torch


class PeakMemory:
    """Peak memory while the block runs, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset on entry). Elsewhere: the process's resident
    set size, sampled every ``interval_s`` seconds by a background thread (``ru_maxrss`` cannot be
    reset, so it would report the study's peak, not the run's).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.05):
        self.device = device
        self.interval_s = interval_s
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss"
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.peak_mib = max(self.peak_mib, process.memory_info().rss / 2**20)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakMemory":
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_max_allocated":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
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
    return out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type
