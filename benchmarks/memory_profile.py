"""Where a loraplace run's memory goes, on the embedded SmolLM2-135M (batch 8, max length 256).

    python benchmarks/memory_profile.py                    # phases of one arm, checkpointing off and on
    python benchmarks/memory_profile.py --step             # one training step: default vs SDPA + profiler top ops
    python benchmarks/memory_profile.py --step --configs 0,1,2,3,4   # every lever

Phases (``--steps`` optimizer steps of one arm, run by loraplace's own RunRecipe, the study's code
path): RSS before anything, after loading the base model, and the peak RSS increase
(:class:`loraplace.run.measure.PeakMemory`) of wrapping, training (warm-up included) and the final
evaluation (all-token sums), each with ``train.gradient_checkpointing`` off and on.

``--step``: one forward + backward + AdamW step on the longest 8 training examples (the first
batch of the length-grouped sampler), peak RSS increase per configuration (default levers;
SDPA instead of eager attention; gradient checkpointing; LoRA dropout 0), then
``torch.profiler(profile_memory=True)`` of the default step, top ops by memory they allocate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import psutil
import torch


def rss() -> float:
    return psutil.Process().memory_info().rss / 2**20


def phases(args) -> list[dict]:
    from loraplace import assets
    from loraplace.adapters import unload_adapters
    from loraplace.config import DataSettings, LoraSettings, TrainSettings
    from loraplace.records import RunSpec
    from loraplace.run.context import RunContext
    from loraplace.run.measure import PeakMemory, release_memory
    from loraplace.study.runs import RunRecipe

    ctx = RunContext(allow_fetch=False)
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="loraplace-mem-"))
    start = rss()
    for ckpt in args.checkpointing:
        spec = RunSpec(run_id=f"{args.strategy}-ckpt{int(ckpt)}", strategy=args.strategy,
                       model=assets.EMBEDDED_MODEL, dataset=str(assets.dataset_path()), lora=LoraSettings(),
                       train=TrainSettings(max_steps=args.steps, batch_size=args.batch, max_length=args.max_length,
                                           eval_every=0, loss_on=args.loss_on, gradient_checkpointing=ckpt),
                       data=DataSettings(eval_size=args.eval_size), device="cpu", run_dir=str(tmp / f"ckpt{int(ckpt)}"))
        recipe = RunRecipe(spec, ctx)
        setup = recipe.prepare()
        release_memory()
        row = {"gradient_checkpointing": ckpt, "rss_start_of_process_mib": round(start), "rss_loaded_mib": round(rss())}
        with PeakMemory(setup.device) as m_wrap:
            adapters = recipe.wrap_and_check(setup)
        with PeakMemory(setup.device) as m_train:
            outcome = recipe.train(setup, adapters)
        with PeakMemory(setup.device) as m_eval:
            ev = recipe.evaluate(setup, adapters.peft_model)
        unload_adapters(adapters.peft_model)
        row.update(wrap_increase_mib=round(m_wrap.increase_mib), train_start_mib=round(m_train.start_mib),
                   train_increase_mib=round(m_train.increase_mib), train_peak_mib=round(m_train.peak_mib),
                   eval_increase_mib=round(m_eval.increase_mib), eval_peak_mib=round(m_eval.peak_mib),
                   train_s=round(outcome.seconds, 2), s_per_step=round(outcome.seconds / outcome.steps, 2),
                   warmup_s=round(outcome.warmup_seconds, 2), eval_s=round(ev.seconds, 2),
                   eval_loss=round(ev.loss, 6), first_loss=[e["loss"] for e in outcome.log_history if "loss" in e][:1],
                   choices=outcome.choices)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def step(args) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile

    from loraplace import assets
    from loraplace.data import PadCollator, prepare_data
    from loraplace.placement.resolve import resolve_placement
    from loraplace.placement.strategies import parse_strategy
    from loraplace.run.evaluation import token_nll
    from loraplace.run.measure import PeakMemory
    from loraplace.run.models import load_model, load_tokenizer, round_linear_weights
    from loraplace.run.training import attention_as, checkpointing, frozen_weights_as, use_mask_dropout

    tok = load_tokenizer(str(assets.model_dir()))
    data = prepare_data(str(assets.dataset_path()), tok, eval_size=100, max_length=args.max_length,
                        loss_on=args.loss_on, split_seed=1234)
    order = sorted(range(len(data.train)), key=lambda i: -data.train[i]["length"])
    batch = PadCollator(tok.pad_token_id)([data.train[i] for i in order[:args.batch]])
    print(f"batch {tuple(batch['input_ids'].shape)}, real tokens {int(batch['attention_mask'].sum())}, "
          f"labelled {int((batch['labels'][:, 1:] != -100).sum())}", flush=True)
    r0 = rss()
    base = load_model(str(assets.model_dir()))
    round_linear_weights(base, torch.bfloat16)
    print(f"RSS: process {r0:.0f} MiB, + model float32 {rss() - r0:.0f} MiB "
          f"({sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters)", flush=True)
    placement = resolve_placement(base, parse_strategy(args.strategy), 16, 32)
    rows = []
    configs = [("default (eager, bf16 frozen weights, mask dropout 0.1)", "eager", False, 0.1),
               ("SDPA attention", "sdpa", False, 0.1),
               ("gradient checkpointing", "eager", True, 0.1),
               ("SDPA + gradient checkpointing", "sdpa", True, 0.1),
               ("LoRA dropout 0", "eager", False, 0.0)]
    configs = [configs[i] for i in args.configs]
    for name, attn, ckpt, dropout in configs:
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                                                target_modules=placement.module_names, task_type="CAUSAL_LM"))
        use_mask_dropout(model)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

        def one_step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                s, n = token_nll(model, batch)
            loss = s.sum() / n.sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        with frozen_weights_as(model, torch.bfloat16), attention_as(model, attn), checkpointing(model, ckpt):
            r_before = rss()
            one_step()  # optimizer states exist after this; allocator warm
            r_after_first = rss()
            times, peaks = [], []
            for _ in range(args.repeat):
                with PeakMemory(torch.device("cpu"), interval_s=0.005) as mem:
                    t = time.perf_counter()
                    loss = one_step()
                    times.append(time.perf_counter() - t)
                peaks.append(mem.increase_mib)
            row = {"config": name, "step_s": round(min(times), 2), "peak_increase_mib": round(min(peaks)),
                   "first_step_rss_growth_mib": round(r_after_first - r_before), "loss": round(loss, 5)}
            if name.startswith("default") and args.profile:
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    one_step()
                row["profile"] = prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=args.rows)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        if "profile" in row:
            print(row["profile"], flush=True)
        rows.append(row)
        model.unload()
        del model, opt
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step", action="store_true", help="one-step comparison of levers + profiler")
    parser.add_argument("--strategy", default="full")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--loss-on", default="response")
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1, help="timed steps per configuration (best of)")
    parser.add_argument("--configs", default="0,1", help="--step configurations by index: 0 default, 1 SDPA, "
                        "2 checkpointing, 3 SDPA + checkpointing, 4 LoRA dropout 0")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--checkpointing", default="0,1", help="comma list of 0/1 for the phase runs")
    args = parser.parse_args()
    args.checkpointing = [bool(int(x)) for x in args.checkpointing.split(",")]
    args.configs = [int(x) for x in args.configs.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    step(args) if args.step else phases(args)


if __name__ == "__main__":
    main()
