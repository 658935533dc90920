"""What ``executor.isolate`` costs per run: the same short run in a fresh process (imports, model
load, tokenization) against in this process with the base model and data already loaded.

    python benchmarks/isolate_overhead.py [--model tiny|smollm2-135m-instruct|PATH] [--repeat 2]

Prints, for each way, the best of ``--repeat`` wall times and of the time outside the run's timed
training and evaluation (wall - ``train_time_s`` - ``eval_time_s``: setup, warm-up step, files),
and the difference of the latter, the per-run overhead; on a loaded machine the timed part varies
far more than the setup, so the second is the number to read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from loraplace.config import DataSettings, LoraSettings, TrainSettings
from loraplace.records import RunSpec
from loraplace.study.executor import LocalExecutor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import alpaca_rows, save_tiny_llama  # noqa: E402  (the test suite's tiny model and rows)


def _spec(model: str, dataset: str, run_dir: Path) -> RunSpec:
    return RunSpec(run_id="attention", kind="lora", strategy="attention", model=model, dataset=dataset,
                   lora=LoraSettings(), data=DataSettings(eval_size=16), device="cpu", run_dir=str(run_dir),
                   train=TrainSettings(max_steps=2, eval_every=0, batch_size=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dataset", default=None, help="default: alpaca-demo, or 48 tiny rows for --model tiny")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="loraplace-isolate-"))
    model, dataset = args.model, args.dataset or "alpaca-demo"
    if model == "tiny":
        model = str(save_tiny_llama(root / "tiny-llama"))
        if args.dataset is None:
            dataset = str(root / "alpaca.json")
            Path(dataset).write_text(json.dumps(alpaca_rows()))
    here = LocalExecutor()
    list(here.submit([_spec(model, dataset, root / "warm-up")]))  # loads the model and the data once
    times: dict[str, list[float]] = {"in this process": [], "isolated": []}
    outside: dict[str, list[float]] = {"in this process": [], "isolated": []}
    for i in range(args.repeat):
        for name, executor in (("in this process", here), ("isolated", LocalExecutor(isolate=True))):
            start = time.monotonic()
            [result] = executor.submit([_spec(model, dataset, root / f"{name}-{i}")])
            times[name].append(time.monotonic() - start)
            assert result.status == "ok", result.error
            outside[name].append(times[name][-1] - result.train_time_s - result.eval_time_s)
    best = {name: min(t) for name, t in times.items()}
    setup = {name: min(t) for name, t in outside.items()}
    print(f"{args.model}: wall in this process {best['in this process']:.1f} s, isolated {best['isolated']:.1f} s; "
          f"outside training and evaluation {setup['in this process']:.1f} s and {setup['isolated']:.1f} s: "
          f"overhead {setup['isolated'] - setup['in this process']:.1f} s per run (best of {args.repeat}; all: "
          f"{json.dumps({k: [round(x, 1) for x in v] for k, v in times.items()})}, outside: "
          f"{json.dumps({k: [round(x, 1) for x in v] for k, v in outside.items()})})")


if __name__ == "__main__":
    main()
