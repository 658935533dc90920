"""Side-by-side benchmark: EVA's components computed exactly (loraplace) versus by PEFT's incremental SVD.

On one model and a study's own scoring batches (the batches an ``eva`` arm reads), in one process
and one after the other:

  (a) peft:      ``peft.tuners.lora.eva.get_eva_state_dict`` at rank ``--rank`` with ``rho`` 2 (PEFT's
                 defaults otherwise: ``tau`` 0.99, label mask), cycling over the batches until every
                 needed component has converged, or until ``--max-passes`` passes over them;
  (b) exact:     :func:`loraplace.methods.eva.principal_components` for the same modules, as many
                 components as PEFT's pass handed each module.

It prints each side's seconds and forward passes, the ratio a/b, and how near PEFT's vectors come
to the exact ones: the |cosine| of each PEFT component with the exact component of the same index,
and the share of each PEFT component inside the span of the module's exact components of the same
count (components of nearly equal variance may swap or mix and still span the same space); the
minimum, the median, and the share at or above 0.99 (0.98). Usage::

    python benchmarks/eva_components.py benchmarks/auto_tuned_smollm2.yaml --rank 6
    python benchmarks/eva_components.py STUDY.yaml --rank 8 --max-passes 40
    python benchmarks/eva_components.py benchmarks/auto_tuned_qwen.yaml --rank 5 --exact-only

Measured (2026-12-05, 2 CPU cores): see the README's EVA paragraph.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import get_eva_state_dict

from loraplace.config import load_study
from loraplace.methods.eva import principal_components
from loraplace.placement.resolve import module_slots, slot_placement
from loraplace.run.context import RunContext
from loraplace.study.allocations import scoring_batches
from loraplace.study.runs import RunRecipe
from loraplace.study.specs import run_specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a study YAML: its model, data and importance batches")
    parser.add_argument("--rank", type=int, default=6, help="PEFT's EVA rank r (each module at most 2 r)")
    parser.add_argument("--max-passes", type=int, default=40, help="passes over the batches PEFT may cycle")
    parser.add_argument("--exact-only", action="store_true",
                        help="only (b), at EVA's cap of 2 x rank components per module (a model where (a) takes hours)")
    args = parser.parse_args()

    config = load_study(args.study)
    spec = run_specs(config, Path(tempfile.mkdtemp(prefix="eva-bench-")))[0]  # RunRecipe.load writes nothing
    setup = RunRecipe(spec, RunContext()).load()
    batches = scoring_batches(setup, config.importance)
    model = setup.base
    names = [m.name for m in module_slots(slot_placement(model))]
    use_label_mask = all(b["labels"].shape == b["input_ids"].shape for b in batches)
    print(f"{config.model}: {len(names)} modules, {len(batches)} batches, "
          f"{sum(int(b['attention_mask'].sum()) for b in batches)} tokens", flush=True)

    if args.exact_only:
        start = time.perf_counter()
        _, passes = principal_components(model, {n: 2 * args.rank for n in names}, batches)
        print(f"(b) exact: {time.perf_counter() - start:8.1f} s  {passes:4d} forward passes, "
              f"{2 * args.rank} components per module")
        return

    calls = [0]
    limit = args.max_passes * len(batches)

    def forward(m, inputs):
        calls[0] += 1
        if calls[0] > limit:
            raise RuntimeError(f"PEFT's EVA did not converge within {limit} forward passes")
        return m(**{k: v for k, v in inputs.items() if k != "labels"})

    peft_config = LoraConfig(r=args.rank, target_modules=names, task_type=setup.task.peft_task_type,
                             init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, use_label_mask=use_label_mask))
    start = time.perf_counter()
    try:
        peft_state = get_eva_state_dict(model, batches, peft_config=peft_config, forward_fn=forward,
                                        show_progress_bar=False)
    except RuntimeError as err:
        print(f"(a) peft: {err} ({time.perf_counter() - start:.1f} s)")
        return
    peft_s, peft_calls = time.perf_counter() - start, calls[0]

    counts = {n: max(1, int(w.shape[0])) for n, w in peft_state.items()}
    start = time.perf_counter()
    exact, passes = principal_components(model, counts, batches)
    exact_s = time.perf_counter() - start

    cos = [abs(float(c)) for n, w in peft_state.items() if w.shape[0]
           for c in (w.double() * exact[n][0][: w.shape[0]].double()).sum(1)]
    print(f"(a) peft:  {peft_s:8.1f} s  {peft_calls:4d} forward passes (rank {args.rank})")
    print(f"(b) exact: {exact_s:8.1f} s  {passes:4d} forward passes")
    print(f"a/b: {peft_s / exact_s:.1f}x the time, {peft_calls / passes:.1f}x the forward passes")
    # index by index, and as subspaces: the share of each PEFT vector inside the span of the module's
    # exact top components of the same count (1 where the two spans agree, whatever the order within)
    inside = [float(v) for n, w in peft_state.items() if w.shape[0]
              for v in ((w.double() @ exact[n][0][: w.shape[0]].double().T) ** 2).sum(1)]
    print(f"|cos| of PEFT's {len(cos)} components with the exact ones: min {min(cos):.4f}, "
          f"median {statistics.median(cos):.4f}, >= 0.99: {sum(c >= 0.99 for c in cos) / len(cos):.1%}")
    print(f"share of each PEFT component inside the exact span: min {min(inside):.4f}, "
          f"median {statistics.median(inside):.4f}, >= 0.98: {sum(v >= 0.98 for v in inside) / len(inside):.1%}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
