"""Tuning by successive halving against the full grid, side by side (issue 19's performance target).

Runs the default study's three arms (full, attention, ffn) twice on the embedded model, each arm
tuned over the same learning rates: once with ``tune.schedule=halving`` (eta 3) and once with
``tune.schedule=grid`` (every rate to the last step). Prints the arm-steps each schedule trained,
their ratio, each arm's chosen rate under both and each rate's validation loss at the last step
(grid), and the tuned studies' cost as a multiple of the untuned runs'. Both run in one process
(``executor.isolate=false``): the comparison is of arm-steps, and a process per rung would add the
same start-up to every job of both.

    python benchmarks/tuning_halving.py [--out DIR] [--steps 40] [--max-length 256] [--eval 100]
        [--validation 50] [--lr 1e-4,3e-4,1e-3,3e-3]

At the default sizes both studies take about 1.3 hours on a 2-core CPU; ``--steps 12
--max-length 128 --eval 40 --validation 40`` about 20 minutes (numbers in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from loraplace.config import load_study
from loraplace.records import RunResult
from loraplace.study.driver import run_study
from loraplace.tuning import arm_steps, choose, rung_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-tuning")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--validation", type=int, default=50)
    parser.add_argument("--lr", default="1e-4,3e-4,1e-3,3e-3")
    args = parser.parse_args()
    rates = [float(x) for x in args.lr.split(",")]
    out = Path(args.out)
    results = {}
    for schedule in ("halving", "grid"):
        folder = out / schedule
        shutil.rmtree(folder, ignore_errors=True)
        config = load_study(None, {
            "strategies": ["full", "attention", "ffn"], "include_base": False, "output": str(folder),
            "train.max_steps": args.steps, "train.max_length": args.max_length, "train.eval_every": 0,
            "data.eval_size": args.eval, "data.validation_size": args.validation,
            "tune.lr": rates, "tune.schedule": schedule, "executor.isolate": False})
        start = time.perf_counter()
        run_study(config)
        wall = time.perf_counter() - start
        rows = [RunResult.model_validate(r) for r in json.loads((folder / "results.json").read_text())["runs"]]
        steps = rung_steps(args.steps, len(rates), config.tune.eta, schedule, config.tune.min_steps)
        choices = {arm: choose(rows, arm, rates, steps, config.tune.eta) for arm in ("full", "attention", "ffn")}
        tuned_time = sum(r.train_time_s or 0 for r in rows if r.kind == "tune")
        untuned_time = sum(r.train_time_s or 0 for r in rows if r.kind == "lora")
        results[schedule] = {"wall_s": wall, "arm_steps": arm_steps(rows), "choices": choices,
                             "tuned_train_s": tuned_time, "untuned_train_s": untuned_time,
                             "untuned_steps": sum(r.train_steps or 0 for r in rows if r.kind == "lora")}
    h, g = results["halving"], results["grid"]
    print(f"rates {rates}; {args.steps} steps, max_length {args.max_length}, validation {args.validation}, "
          f"test {args.eval}")
    print(f"arm-steps: halving {h['arm_steps']}, grid {g['arm_steps']}: ratio {h['arm_steps'] / g['arm_steps']:.2f}")
    print(f"training seconds of the tuning runs: halving {h['tuned_train_s']:.0f}, grid {g['tuned_train_s']:.0f}: "
          f"ratio {h['tuned_train_s'] / g['tuned_train_s']:.2f}")
    print(f"study wall time: halving {h['wall_s']:.0f} s, grid {g['wall_s']:.0f} s")
    for schedule, r in results.items():
        cost = (r["arm_steps"] + r["untuned_steps"]) / r["untuned_steps"]
        print(f"{schedule}: the tuned study trains {cost:.1f}x the arm-steps of the untuned one")
    same = 0
    for arm in ("full", "attention", "ffn"):
        ch, cg = h["choices"][arm], g["choices"][arm]
        same += ch.lr == cg.lr
        grid_losses = ", ".join(f"{lr:g}: {cg.validation[lr][1]:.4f}" for lr in sorted(cg.validation))
        print(f"{arm:10s} halving chose {ch.lr:g}, grid chose {cg.lr:g}  (grid validation losses {grid_losses})")
    print(f"same choice for {same} of 3 arms")


if __name__ == "__main__":
    main()
