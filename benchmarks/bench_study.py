"""Side-by-side benchmark: a plain Trainer + PEFT script versus ``loraplace run``.

One command runs, on the same model, tokenized examples, eval set, optimizer steps, batch size
and max length, each in its own subprocess (so peak RSS is per variant):

  (a) plain:      the script a user would write: float32, every example padded to max_length,
                  the model reloaded for each strategy, the model's own loss (full logits);
  (b) plain+bf16: the same script with ``TrainingArguments(bf16=True)``;
  (c) loraplace:  a loraplace study (:func:`loraplace.study.driver.run_study`, what ``loraplace run``
                  runs) for the same strategies, with ``train.loss_on=all`` so that its
                  loss covers the same tokens as the plain script's (every non-padding token);
  (c0, d-g):      loraplace levers against (c): the training loss's vocabulary projection in one
                  block (as before it was chunked), shared LoRA dropout masks, gradient
                  checkpointing, shared masks with checkpointing, torch.compile of the decoder
                  layers (``--variants c,c0,d,e,f,g``).

and prints study wall time, training real tokens/s, eval time, peak RSS, eval loss, the ratios
c/a and c/b, the machine's measured peak matmul rate (float32 and bfloat16) and each variant's
training model-FLOPs utilisation. Usage::

    python benchmarks/bench_study.py                 # 10 optimizer steps per strategy
    python benchmarks/bench_study.py --steps 40      # longer runs
    python benchmarks/bench_study.py --variants c    # one variant only

All variants evaluate the same held-out examples with the same definition of eval loss:
summed NLL over every non-padding token / number of those tokens (token-weighted).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = ("full", "attention", "ffn")
VARIANTS = {"a": "plain fp32, pad to max_length", "b": "plain + Trainer bf16=True", "c": "loraplace run",
            "c0": "c, loss logits unchunked (before)", "d": "c + shared dropout masks",
            "e": "c + gradient checkpointing", "f": "c + shared masks + checkpointing",
            "g": "c + torch.compile (dynamic)"}
# loraplace variants: the settings each adds to (c); c0 also puts the training loss's vocabulary
# projection back into one block (loraplace.run.evaluation.TRAIN_CHUNK_ELEMENTS), as before it was chunked.
LORAPLACE_SETTINGS = {"c": {}, "c0": {}, "d": {"lora.dropout_masks": "shared"},
                      "e": {"train.gradient_checkpointing": True},
                      "f": {"lora.dropout_masks": "shared", "train.gradient_checkpointing": True},
                      "g": {"train.compile": True}}


# ------------------------------------------------------------------------------------ helpers
def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 3.0) -> float:
    """Best observed GFLOP/s of an n x n x n matmul in the given dtype (this process's threads)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def model_shapes(model_dir: str) -> dict:
    """Matmul parameter counts from the model's shapes (meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)
    return {"body_matmul_params": body, "vocab_projection_params": head.weight.numel()}


def lora_params(model_dir: str, strategy: str, r: int) -> tuple[list[str], int]:
    from loraplace.placement.resolve import resolve_placement
    from loraplace.placement.strategies import parse_strategy
    from loraplace.run.models import load_config, meta_model

    config, _ = load_config(model_dir)
    p = resolve_placement(meta_model(config), parse_strategy(strategy), r, 2.0 * r)
    return p.module_names, p.lora_params


FLOPS_FORMULA = (
    "FLOPs per real token = 2*(P_body + P_lora) [forward] + 2*P_body + 4*P_lora [backward: activation "
    "gradients + adapter weight gradients] + 4*P_vocab*h [vocabulary projection, forward + input "
    "gradient, where it runs]; P_body = matmul parameters of the decoder layers, P_lora = adapter "
    "parameters of the strategy, P_vocab = hidden*vocab, h = positions projected to the vocabulary per "
    "real token (plain script: all padded positions / real tokens; loraplace: labelled positions / real "
    "tokens). Attention score/value products (~4*T*d per layer per token) are not counted. "
    "MFU = FLOPs per real token * training real tokens/s / measured matmul peak of the training dtype."
)


def flops_per_real_token(shapes: dict, p_lora: int, head_per_real: float) -> float:
    body, vocab = shapes["body_matmul_params"], shapes["vocab_projection_params"]
    return 2 * (body + p_lora) + 2 * body + 4 * p_lora + 4 * vocab * head_per_real


# ---------------------------------------------------------------------------- variant (a)/(b)
def run_plain(args, bf16: bool) -> dict:
    """The plain script: one model load per strategy, pad to max_length, HF loss, float32 or bf16."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    from loraplace.data import IGNORE_INDEX, prepare_data
    from loraplace.run.models import load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    data = prepare_data(args.dataset, tokenizer, eval_size=args.eval_size, max_length=args.max_length,
                        loss_on="all", split_seed=1234)
    counted = {"real": 0, "positions": 0}

    def collate(features, count=True):  # pad every example to max_length; labels -100 on padding
        n = len(features)
        ids = torch.full((n, args.max_length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, args.max_length), dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.as_tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        if count:
            counted["real"] += int(mask.sum())
            counted["positions"] += mask.numel()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    runs = []
    for strategy in args.strategies:
        modules, _ = lora_params(args.model, strategy, args.r)
        counted.update(real=0, positions=0)
        set_seed(0)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # reloaded per strategy
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.1,
                                                 target_modules=modules, task_type="CAUSAL_LM"))
        with tempfile.TemporaryDirectory() as out:
            targs = TrainingArguments(
                output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                learning_rate=2e-4, lr_scheduler_type="linear", logging_steps=5, save_strategy="no",
                report_to="none", seed=0, bf16=bf16, use_cpu=True, remove_unused_columns=False,
                disable_tqdm=True,
            )
            trainer = Trainer(model=model, args=targs, train_dataset=data.train.remove_columns("length"),
                              data_collator=collate)
            t = time.perf_counter()
            trainer.train()
            train_s = time.perf_counter() - t
        # Evaluation: no_grad, batch 8 padded to max_length, token-weighted NLL from the model's loss.
        model.eval()
        t = time.perf_counter()
        nll, tokens = 0.0, 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for first in range(0, len(data.eval), args.batch_size):
                batch = collate([data.eval[i] for i in range(first, min(first + args.batch_size, len(data.eval)))],
                                count=False)
                out = model(**batch)
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                nll += float(out.loss) * n
                tokens += n
        eval_s = time.perf_counter() - t
        runs.append({"strategy": strategy, "train_s": train_s, "real_tokens": counted["real"],
                     "head_positions": counted["positions"], "eval_s": eval_s, "eval_loss": nll / tokens,
                     "eval_tokens": tokens})
        del trainer, model
    return {"wall_s": time.perf_counter() - start, "runs": runs, "peak_rss_mib": _peak_rss_mib()}


# -------------------------------------------------------------------------------- variant (c)
def run_loraplace(args, variant: str = "c") -> dict:
    """A loraplace study in this process, run by the study driver as ``loraplace run`` runs it
    (report included), without the progress display, with the settings of ``variant``."""
    from loraplace.config import load_study
    from loraplace.study.driver import run_study

    if variant == "c0":
        import loraplace.run.evaluation

        loraplace.run.evaluation.TRAIN_CHUNK_ELEMENTS = 1 << 62

    out = Path(tempfile.mkdtemp(prefix="bench-loraplace-"))
    config = load_study(None, {
        "model": args.model, "dataset": args.dataset, "strategies": ",".join(args.strategies), "output": str(out),
        "include_base": False, "train.max_steps": args.steps, "train.batch_size": args.batch_size,
        "train.max_length": args.max_length, "train.loss_on": "all", "train.eval_every": 0,
        "data.eval_size": args.eval_size, "lora.r": args.r, "lora.alpha": 2 * args.r,
        **LORAPLACE_SETTINGS[variant],
    })
    start = time.perf_counter()
    run_study(config)
    wall = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    rows = results["runs"] if isinstance(results, dict) else results
    runs = []
    for r in rows:
        labels = r["train_label_tokens"]
        runs.append({"strategy": r["strategy"], "train_s": r["train_time_s"], "real_tokens": r["train_real_tokens"],
                     "head_positions": labels, "eval_s": r["eval_time_s"], "eval_loss": r["eval_loss"],
                     "eval_tokens": r["eval_tokens"], "device": r.get("device"), "precision": r.get("precision")})
    return {"wall_s": wall, "runs": runs, "peak_rss_mib": _peak_rss_mib(), "output": str(out)}


# ------------------------------------------------------------------------------------- driver
def child(args) -> None:
    if args.child in LORAPLACE_SETTINGS:
        result = run_loraplace(args, args.child)
    else:
        result = run_plain(args, bf16=args.child == "b")
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def summarize(name: str, res: dict, shapes: dict, loras: dict, peaks: dict) -> dict:
    runs = res["runs"]
    train_s = sum(r["train_s"] for r in runs)
    real = sum(r["real_tokens"] for r in runs)
    flops = sum(r["real_tokens"] * flops_per_real_token(shapes, loras[r["strategy"]],
                                                         r["head_positions"] / max(r["real_tokens"], 1))
                for r in runs)
    peak = peaks["float32"] if name == "a" else peaks["bfloat16"]
    return {
        "variant": name, "what": VARIANTS[name], "wall_s": res["wall_s"], "train_s": train_s,
        "train_tok_s": real / train_s, "eval_s": sum(r["eval_s"] for r in runs), "peak_rss_mib": res["peak_rss_mib"],
        "eval_loss": {r["strategy"]: r["eval_loss"] for r in runs}, "train_gflop_s": flops / train_s / 1e9,
        "mfu_pct": 100 * flops / train_s / 1e9 / peak, "mfu_of": "fp32 peak" if name == "a" else "bf16 peak",
        "mfu_vs_bf16_pct": 100 * flops / train_s / 1e9 / peaks["bfloat16"],
    }


def main() -> None:
    from loraplace import assets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per strategy (default 10)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-size", type=int, default=100, help="held-out examples (same for all variants)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--variants", default="a,b,c", help="which of " + ",".join(VARIANTS) + " to run")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--dataset", default=None, help="data file (default: the embedded Alpaca demo)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or str(assets.model_dir())
    args.dataset = args.dataset or str(assets.ensure_dataset(allow_fetch=False))
    args.strategies = [s for s in args.strategies.split(",") if s]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        import warnings

        import transformers

        warnings.filterwarnings("ignore")
        transformers.logging.set_verbosity_error()
        child(args)
        return

    import torch

    load = os.getloadavg()
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    shapes = model_shapes(args.model)
    loras = {s: lora_params(args.model, s, args.r)[1] for s in args.strategies}
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average at start {load[0]:.1f}")
    print(f"measured matmul peak (2048^3): float32 {peaks['float32']:.0f} GFLOP/s, "
          f"bfloat16 {peaks['bfloat16']:.0f} GFLOP/s")
    print(f"setup: {len(args.strategies)} strategies x {args.steps} steps, batch {args.batch_size}, max_length "
          f"{args.max_length}, {args.eval_size} eval examples, loss over all non-padding tokens", flush=True)

    results = {}
    for name in [v for v in args.variants.split(",") if v]:
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--max-length", str(args.max_length), "--eval-size", str(args.eval_size),
               "--r", str(args.r), "--strategies", ",".join(args.strategies), "--model", args.model,
               "--dataset", args.dataset]
        print(f"running ({name}) {VARIANTS[name]} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"variant {name} failed (exit {proc.returncode})")
        results[name] = summarize(name, json.loads(line[len("BENCH_RESULT "):]), shapes, loras, peaks)
        results[name]["runs"] = json.loads(line[len("BENCH_RESULT "):])["runs"]

    header = f"{'variant':<40}{'wall s':>9}{'train tok/s':>13}{'eval s':>9}{'peak RSS MiB':>14}{'MFU':>16}  eval loss ({'/'.join(args.strategies)})"
    print("\n" + header)
    print("-" * len(header))
    for name, r in results.items():
        losses = " / ".join(f"{r['eval_loss'][s]:.4f}" for s in args.strategies)
        mfu = f"{r['mfu_pct']:.1f}% {'fp32' if name == 'a' else 'bf16'}"
        print(f"{'(' + name + ')':<5}{r['what']:<35}{r['wall_s']:>9.1f}{r['train_tok_s']:>13.0f}{r['eval_s']:>9.1f}"
              f"{r['peak_rss_mib']:>14.0f}{mfu:>16}  {losses}")
    for name in [v for v in results if v in LORAPLACE_SETTINGS and v != "c"]:
        if "c" in results:
            c, o = results["c"], results[name]
            print(f"{name}/c: training tokens/s {o['train_tok_s'] / c['train_tok_s']:.2f}x, study wall "
                  f"{o['wall_s'] / c['wall_s']:.2f}x, peak RSS {o['peak_rss_mib'] / c['peak_rss_mib']:.2f}x "
                  f"({o['peak_rss_mib']:.0f} vs {c['peak_rss_mib']:.0f} MiB)")
    for base in ("a", "b"):
        if "c" in results and base in results:
            c, o = results["c"], results[base]
            dl = max(abs(c["eval_loss"][s] - o["eval_loss"][s]) for s in args.strategies)
            print(f"c/{base}: study {o['wall_s'] / c['wall_s']:.2f}x faster, training tokens/s "
                  f"{c['train_tok_s'] / o['train_tok_s']:.2f}x, eval {o['eval_s'] / c['eval_s']:.2f}x faster, "
                  f"peak RSS {c['peak_rss_mib'] / o['peak_rss_mib']:.2f}x, max |eval loss difference| {dl:.4f} nats")
    for name, r in results.items():
        extra = f" ({r['mfu_vs_bf16_pct']:.1f}% of the bf16 peak)" if name == "a" else ""
        print(f"({name}) training {r['train_gflop_s']:.0f} GFLOP/s = {r['mfu_pct']:.1f}% of the {r['mfu_of']}{extra}")
    print(FLOPS_FORMULA)
    print(f"P_body = {shapes['body_matmul_params']:,}, P_vocab = {shapes['vocab_projection_params']:,}, P_lora = "
          + ", ".join(f"{s} {n:,}" for s, n in loras.items()))
    print(f"load average at end {os.getloadavg()[0]:.1f} (other processes share this machine's CPUs)")
    if args.json:
        args.json.write_text(json.dumps({"peaks": peaks, "shapes": shapes, "lora_params": loras,
                                         "results": results, "load_start": load[0]}, indent=2))


if __name__ == "__main__":
    main()
