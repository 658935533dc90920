"""The memory plan (:mod:`loraplace.run.memory_plan`) against measured peaks of real runs.

    python benchmarks/memory_plan_check.py                        # small, medium, large; fp32; checkpointing off and on
    python benchmarks/memory_plan_check.py --sizes small --precisions fp32,bf16
    python benchmarks/memory_plan_check.py --json out.json

Each size is a random-weight Llama-style model saved once as a local folder (with the embedded
SmolLM2 tokenizer, vocabulary 49,152) under ``--cache``:

======  ======  ======  ======  =====  ========  ======  ========  ============
size    hidden  interm  layers  heads  kv heads  tied    params    batch x len
======  ======  ======  ======  =====  ========  ======  ========  ============
small   512     1376    4       8      8         yes     37.8 M    8 x 256
medium  1024    2816    20      16     16        yes     307 M     4 x 256
large   2048    5632    20      32     8         no      1.10 B    2 x 256
======  ======  ======  ======  =====  ========  ======  ========  ============

Every configuration runs in a fresh subprocess (its own resident memory) through loraplace's own
path, :func:`loraplace.study.runs.execute_run`: strategy ``full`` (r=16, alpha=32, dropout 0.1),
``--steps`` optimizer steps after the selective-logits check and the warm-up, then the final
evaluation of ``--eval-size`` examples, on CPU. The data are long Alpaca rows (every example is
truncated to the length) with ``train.loss_on=all``, so every position carries a label: the
plan's default (``labelled_fraction=1``) is then exact, not an upper bound.

Measured: the run's ``peak_memory_mib``, ``memory_start_mib`` and ``peak_memory_increase_mib``
(:class:`loraplace.run.measure.PeakMemory`: resident memory, sampled every 20 ms, from before the
adapters are wrapped to the end of the evaluation). Estimated: the run's own
``memory_estimate_mib`` (the plan it recorded before training). The error is
(estimate - peak) / peak, and, harsher, the same difference as a share of the increase (what the
run added above its start). Also printed: the resident memory of a fresh process that imported what
a run imports, against :data:`loraplace.run.memory_plan.RUNTIME_OVERHEAD_CPU_MIB`.

On CPU a float32 model's safetensors weights are memory-mapped and become resident only when the
first forward reads them, so the first run of a process starts with little of them resident and its
increase includes them; in bf16 runs the rounding at load has already touched them.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, tie_word_embeddings=True, batch=8, length=256),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
                   num_key_value_heads=16, tie_word_embeddings=True, batch=4, length=256),
    "large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=32,
                  num_key_value_heads=8, tie_word_embeddings=False, batch=2, length=256),
}

WORDS = ("model memory layer token gradient weight adapter rank batch length sequence attention value key query "
         "matrix vector float precision device cache budget placement study result table figure run step loss "
         "learning rate optimizer state peak resident process heap block page thread core machine data text").split()


def model_dir(name: str, cache: Path) -> Path:
    """The size's random-weight model folder, made once (float32 safetensors + the embedded tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loraplace import assets

    path = cache / f"llama-{name}"
    if (path / ".complete").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir())
    shape = {k: v for k, v in SIZES[name].items() if k not in ("batch", "length")}
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / ".complete").write_text("")
    del model
    return path


def data_file(cache: Path, rows: int = 48, varied: bool = False) -> Path:
    """Alpaca rows of ~600 words each, longer than any length this benchmark trains at; ``varied``:
    160 rows of 20 to 400 words, so that batches differ in length as in real data."""
    path = cache / ("varied_alpaca.json" if varied else "long_alpaca.json")
    if not path.exists():
        rng = random.Random(0)
        text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
        if varied:
            sizes = [rng.randint(20, 400) for _ in range(160)]
            path.write_text(json.dumps([{"instruction": text(10), "input": "", "output": text(n)} for n in sizes]))
        else:
            path.write_text(json.dumps([{"instruction": text(40), "input": text(200), "output": text(360)}
                                        for _ in range(rows)]))
    return path


def one(args) -> None:
    """One configuration, in this (fresh) process: execute_run, then its result as one JSON line."""
    from loraplace.config import DataSettings, TrainSettings
    from loraplace.records import RunSpec
    from loraplace.run.context import RunContext
    from loraplace.study.runs import execute_run

    size = SIZES[args.one]
    run_dir = Path(tempfile.mkdtemp(prefix="loraplace-memplan-"))
    spec = RunSpec(run_id=f"{args.one}-{args.precision}-ckpt{args.ckpt}", strategy="full",
                   model=str(model_dir(args.one, args.cache)), dataset=str(data_file(args.cache, varied=args.varied)),
                   train=TrainSettings(max_steps=args.steps, batch_size=size["batch"], max_length=size["length"],
                                       eval_every=args.eval_every, logging_steps=1, loss_on="all",
                                       precision=args.precision, gradient_checkpointing=bool(args.ckpt)),
                   data=DataSettings(eval_size=args.eval_size), device="cpu", run_dir=str(run_dir))
    start = time.perf_counter()
    result = execute_run(spec, RunContext(allow_fetch=False))
    plan = result.memory_plan
    keep = ("status", "error", "base_params", "trainable_params", "peak_memory_mib", "memory_start_mib",
            "peak_memory_increase_mib", "memory_estimate_mib", "train_time_s", "eval_time_s", "speed_choices")
    print(json.dumps({"size": args.one, "precision": args.precision, "ckpt": bool(args.ckpt),
                      "wall_s": round(time.perf_counter() - start, 1), **{k: getattr(result, k) for k in keep},
                      "memory_plan": plan}), flush=True)


def runtime_overhead() -> float:
    """Resident MiB of a fresh process that imported what a run imports (after gc and malloc_trim)."""
    code = ("import loraplace.study.runs, loraplace.run.training, loraplace.run.evaluation, peft, datasets, psutil\n"
            "import transformers.models.llama.modeling_llama\n"
            "from transformers import Trainer\n"
            "from loraplace.run.measure import release_memory\n"
            "release_memory(); print(psutil.Process().memory_info().rss / 2**20)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--checkpointing", default="0,1", help="comma list of 0/1")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--eval-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=0, help="periodic evaluations during training (0: none)")
    parser.add_argument("--varied", action="store_true", help="examples of 20-400 words (batches of varying "
                        "length, as in real data) instead of all at the maximum length")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "loraplace-memory-plan")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.one:
        return one(args)

    from loraplace.run.memory_plan import CPU_HEAP_RETENTION, CPU_HEAP_RETENTION_CHECKPOINTED, RUNTIME_OVERHEAD_CPU_MIB

    overhead = runtime_overhead()
    print(f"runtime overhead: measured {overhead:.0f} MiB, the plan uses {RUNTIME_OVERHEAD_CPU_MIB:.0f}; "
          f"CPU heap retention {CPU_HEAP_RETENTION:g} ({CPU_HEAP_RETENTION_CHECKPOINTED:g} with checkpointing)",
          flush=True)
    constants = {"runtime_overhead_measured_mib": overhead, "runtime_overhead_plan_mib": RUNTIME_OVERHEAD_CPU_MIB,
                 "cpu_heap_retention": CPU_HEAP_RETENTION,
                 "cpu_heap_retention_checkpointed": CPU_HEAP_RETENTION_CHECKPOINTED}
    rows = []
    for name in args.sizes.split(","):
        model_dir(name, args.cache)  # made here, once, not inside a measured process
        data_file(args.cache, varied=args.varied)
        for precision in args.precisions.split(","):
            for ckpt in (int(x) for x in args.checkpointing.split(",")):
                cmd = [sys.executable, __file__, "--one", name, "--precision", precision, "--ckpt", str(ckpt),
                       "--steps", str(args.steps), "--eval-size", str(args.eval_size), "--cache", str(args.cache),
                       "--eval-every", str(args.eval_every)] + (["--varied"] if args.varied else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
                if out.returncode != 0 or not lines:
                    print(f"{name} {precision} ckpt={ckpt}: failed\n{out.stderr[-3000:]}", flush=True)
                    continue
                row = json.loads(lines[-1])
                difference = row["memory_estimate_mib"] - row["peak_memory_mib"]
                row["error_pct"] = round(100.0 * difference / row["peak_memory_mib"], 1)
                row["error_of_increase_pct"] = round(100.0 * difference / row["peak_memory_increase_mib"], 1)
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("size", "precision", "ckpt", "status", "wall_s",
                                                      "memory_estimate_mib", "peak_memory_mib", "error_pct",
                                                      "memory_start_mib", "peak_memory_increase_mib")}), flush=True)
                if args.json:  # after every row: a long benchmark keeps what it measured
                    args.json.write_text(json.dumps({**constants, "rows": rows}, indent=2))
    header = (f"{'size':7} {'params':>8} {'prec':5} {'ckpt':4} {'B x T':8} {'estimate':>9} {'measured':>9} "
              f"{'error':>7} {'start':>7} {'increase':>9} {'of incr.':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        size = SIZES[r["size"]]
        print(f"{r['size']:7} {r['base_params'] / 1e6:7.1f}M {r['precision']:5} {'on' if r['ckpt'] else 'off':4} "
              f"{size['batch']} x {size['length']:<4} {r['memory_estimate_mib']:9,.0f} {r['peak_memory_mib']:9,.0f} "
              f"{r['error_pct']:+6.1f}% {r['memory_start_mib']:7,.0f} {r['peak_memory_increase_mib']:9,.0f} "
              f"{r['error_of_increase_pct']:+7.1f}%")
    print("MiB, resident; estimate = the run's memory_estimate_mib, measured = its peak_memory_mib, error = "
          "(estimate - measured) / measured; start, increase = memory_start_mib, peak_memory_increase_mib; "
          "of incr. = (estimate - measured) / increase")


if __name__ == "__main__":
    main()
