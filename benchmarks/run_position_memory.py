"""Does a run's memory depend on its place in the study? (issue 18 item 7)

Runs one study on a random-init Gemma-3-style model with a 262k vocabulary (hidden 640, 6 layers,
bf16 on CPU), arms ``full, eva~attention, adalora~attention, auto~attention, attention, full@all``
(``full@all`` is ``full`` under another label: the same placement, last instead of first), twice:
each run in its own process (``executor.isolate=true``, the default), then all in this process
(``executor.isolate=false``, which after every run also prints the process RSS, the bytes of every
live CPU tensor reachable from Python and glibc's heap in use and free, ``mallinfo2``). For each,
it prints every run's start, peak and increase as the study recorded them, beside the memory
plan's estimate, and ``full`` first against ``full@all`` last.

    python benchmarks/run_position_memory.py [--out DIR] [--steps 4]

Measured on this 2-core CPU (2026-12-04, benchmarks/README.md): in one process glibc's heap in
use grows over the first four runs (memory that is neither a tensor nor a Python object, with arms
that bring new matmul shapes) and ``full`` peaked at 2,113 MiB first and 2,446 MiB last (1.16x);
isolated, every run starts at 729 MiB and ``full`` peaked at 2,104 and 2,232 MiB (1.06x, within
the 2,072-2,274 MiB of the same run repeated in fresh processes). Estimate: 1,905 MiB.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import psutil
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from loraplace.config import load_study
from loraplace.run.measure import release_memory
from loraplace.study.driver import run_study
from loraplace.study.progress import StudyProgress

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import alpaca_rows, make_tokenizer  # noqa: E402  (the test suite's tiny tokenizer and rows)


class _MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap() -> tuple[float, float]:
    """glibc's heap in use and free, MiB (0, 0 where mallinfo2 is missing)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo
        info = libc.mallinfo2()
        return info.uordblks / 2**20, info.fordblks / 2**20
    except (OSError, AttributeError):
        return 0.0, 0.0


def _live_tensor_mib() -> float:
    seen, total = set(), 0
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total / 2**20


class _Watch(StudyProgress):
    def run_ended(self, result, k, seconds):
        release_memory()
        used, free = _heap()
        print(f"{result.strategy:22s} rss {psutil.Process().memory_info().rss / 2**20:6.0f}  tensors "
              f"{_live_tensor_mib():5.0f}  heap used {used:5.0f} free {free:5.0f}  | run start "
              f"{result.memory_start_mib:5.0f} peak {result.peak_memory_mib:5.0f} increase "
              f"{result.peak_memory_increase_mib:5.0f} estimate {result.memory_estimate_mib} (MiB)", flush=True)


def _study(root: Path, model_dir: Path, data: Path, steps: int, isolate: bool) -> tuple[list[dict], float]:
    """Run the study with ``executor.isolate``; its rows in execution order and its wall time."""
    out = root / ("study-isolated" if isolate else "study-in-process")
    shutil.rmtree(out, ignore_errors=True)
    config = load_study(None, {
        "model": str(model_dir), "dataset": str(data), "output": str(out), "include_base": False,
        "strategies": ["full", "eva~attention", "adalora~attention", "auto~attention", "attention", "full@all"],
        "train.max_steps": steps, "train.batch_size": 4, "train.max_length": 128, "train.eval_every": 2,
        "train.precision": "bf16", "data.eval_size": 16, "device": "cpu", "importance.batches": 4,
        "importance.batch_size": 4, "lora.dropout": 0.1, "executor.isolate": isolate})
    start = time.monotonic()
    # in this process, the probes after each run say what it keeps; an isolated run's process is gone by then
    run_study(config, progress=StudyProgress() if isolate else _Watch())
    seconds = time.monotonic() - start
    rows = json.loads((out / "results.json").read_text())["runs"]
    return sorted(rows, key=lambda r: r["position"]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/loraplace-run-position")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    root = Path(args.out)
    model_dir, data = root / "gemma262k", root / "data.json"
    if not model_dir.exists():
        tokenizer = make_tokenizer()
        torch.manual_seed(0)
        config = Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                  max_position_embeddings=512, sliding_window=512, pad_token_id=tokenizer.pad_token_id)
        Gemma3ForCausalLM(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    data.write_text(json.dumps(alpaca_rows(64)))
    for isolate in (True, False):
        mode = "isolated (executor.isolate=true)" if isolate else "in one process (executor.isolate=false)"
        print(f"\n== {mode}", flush=True)
        rows, seconds = _study(root, model_dir, data, args.steps, isolate)
        print(f"{'position':>8s} {'run':22s} {'start':>7s} {'peak':>7s} {'increase':>8s} {'estimate':>8s}  (MiB)")
        for r in rows:
            print(f"{r['position']:8d} {r['strategy']:22s} {r['memory_start_mib']:7.0f} {r['peak_memory_mib']:7.0f} "
                  f"{r['peak_memory_increase_mib']:8.0f} {r['memory_estimate_mib'] or 0:8.0f}")
        first, last = rows[0], rows[-1]
        print(f"full first: peak {first['peak_memory_mib']:.0f} MiB; full@all last: peak {last['peak_memory_mib']:.0f} "
              f"MiB ({last['peak_memory_mib'] / first['peak_memory_mib']:.3f}x); estimate "
              f"{last['memory_estimate_mib']:.0f}; study wall time {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
