"""Profile one loraplace training step (torch.profiler) on the embedded SmolLM2, 'full' strategy:
what bounds the step once the matmuls run in bfloat16.

    python benchmarks/profile_step.py            # current levers
    python benchmarks/profile_step.py --plain    # without them (float32 weights, SDPA, nn.Dropout)

Prints step time, the time in matmuls (aten::mm/bmm/addmm) and their GFLOP/s, and the top ops.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (regional)")
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile

    from loraplace import assets
    from loraplace.data import PadCollator, prepare_data
    from loraplace.placement.resolve import resolve_placement
    from loraplace.placement.strategies import parse_strategy
    from loraplace.run.device import fast_attention
    from loraplace.run.evaluation import token_nll
    from loraplace.run.models import load_model, load_tokenizer
    from loraplace.run.training import attention_as, frozen_weights_as, use_mask_dropout

    tok = load_tokenizer(str(assets.model_dir()))
    data = prepare_data(str(assets.ensure_dataset(allow_fetch=False)), tok, eval_size=100, max_length=256,
                        loss_on="response", split_seed=1234)
    order = sorted(range(len(data.train)), key=lambda i: data.train[i]["length"])
    mid = len(order) // 2
    batch = PadCollator(tok.pad_token_id)([data.train[i] for i in order[mid:mid + 8]])
    real = int(batch["attention_mask"].sum())
    base = load_model(str(assets.model_dir()))
    placement = resolve_placement(base, parse_strategy("full"), 16, 32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1,
                                            target_modules=placement.module_names, task_type="CAUSAL_LM"))
    if not args.plain:
        use_mask_dropout(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, n = token_nll(model, batch)
        (s.sum() / n.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    import contextlib

    ctx = contextlib.ExitStack()
    if not args.plain:
        ctx.enter_context(frozen_weights_as(model, torch.bfloat16))
        ctx.enter_context(attention_as(model, fast_attention(torch.device("cpu"))))
    with ctx:
        if args.compile:
            for layer in model.get_base_model().model.layers:
                layer.compile(dynamic=True)
        t = time.perf_counter()
        step()
        print(f"first step (warm-up{', compilation' if args.compile else ''}): {time.perf_counter() - t:.1f}s")
        times = []
        for _ in range(3):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            step()
    best = min(times)
    print(f"batch {tuple(batch['input_ids'].shape)}, {real} real tokens; step best {best:.2f}s "
          f"({real / best:.0f} real tok/s), times {', '.join(f'{t:.2f}' for t in times)}")
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    groups = {"matmul (mm/bmm/addmm)": ("aten::mm", "aten::bmm", "aten::addmm"),
              "attention softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
              "sdpa": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                       "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
              "dropout RNG": ("aten::bernoulli_", "aten::uniform_"),
              "elementwise mul/add/div": ("aten::mul", "aten::add", "aten::add_", "aten::div", "aten::div_", "aten::mul_"),
              "dtype casts / copies": ("aten::copy_",),
              "vocab log-softmax": ("aten::_log_softmax", "aten::_log_softmax_backward_data")}
    print(f"profiled step: {total:.2f}s of self CPU time")
    for name, ops in groups.items():
        t = sum(e.self_cpu_time_total for e in events if e.key in ops) / 1e6
        print(f"  {name:<26} {t:6.2f}s  {100 * t / total:5.1f}%")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    # The matmul rate this model's shapes allow (tokens x in -> out, bfloat16), against 2048^3.
    print("bfloat16 matmul rate at this batch's shapes (M = real tokens):")
    for m, k, n in [(2048, 2048, 2048), (real, 576, 576), (real, 576, 192), (real, 576, 1536), (real, 1536, 576),
                    (real, 576, 16), (real, 16, 1536)]:
        a, b = torch.randn(m, k).bfloat16(), torch.randn(k, n).bfloat16()
        for _ in range(3):
            a @ b
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.0:
            a @ b
            reps += 1
        print(f"  {m}x{k} @ {k}x{n}: {2 * m * k * n * reps / (time.perf_counter() - t) / 1e9:7.0f} GFLOP/s")


if __name__ == "__main__":
    main()
