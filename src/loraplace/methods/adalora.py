"""AdaLoRA as a study method, run through PEFT at a parameter budget.

**AdaLoRA** (Zhang et al., 2023, arXiv:2303.10512; PEFT ``AdaLoraConfig``). Each adapted module
gets an SVD-shaped update ``x -> W0 x + (alpha / init_r) * B diag(E) A x`` with ``A: (r, in)``,
``E: (r, 1)``, ``B: (out, r)``: ``r * (in + out + 1)`` trainable parameters at rank r. Every module
starts at rank ``init_r``; during training a sensitivity score (smoothed ``|p * grad|``) prunes
singular triplets (zeroes entries of E) along a cubic schedule until a total rank of
``target_r * modules`` is left, spread over the modules by importance; the last ``tfinal`` steps
train that final allocation. The HF Trainer never calls AdaLoRA's allocator:
:class:`AdaLoraCallback` does.

AdaLoRA fixes a total *rank*, not a parameter count: the parameters it trains depend on which
modules keep rank. :func:`adalora_config` picks the rank knob so that the final parameters come as
near a target as the method allows, and reports what it achieved.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraLayer
from torch import nn
from transformers import TrainerCallback

from loraplace.adapters import check_wrapped
from loraplace.config import LoraSettings, StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.files import atomic_write_json
from loraplace.methods.base import Method, full_stand_in, register
from loraplace.placement.arms import REFERENCE_STRATEGY, Arm
from loraplace.placement.budget import budget_target
from loraplace.placement.resolve import Placement, module_slots, slot_placement
from loraplace.placement.scale import DEFAULT_SCALE, update_scale
from loraplace.records import RunSpec

# ------------------------------------------------------------------------------------- AdaLoRA

INIT_RANK_RATIO = 1.5
"""``init_r = ceil(1.5 * target_r)``: the AdaLoRA paper starts from a budget 1.5 times the final
one (b(0) = 1.5 b(T)), as PEFT's defaults do (init_r=12, target_r=8)."""

TINIT_FRACTION = 0.10  # steps before any pruning (warm-up of the sensitivity scores)
TFINAL_FRACTION = 0.25  # last steps: fine-tune the final allocation, ranks fixed
REALLOCATIONS = 10  # aim for at least this many reallocations in the pruning phase
MAX_DELTA_T = 10  # ...but never fewer than one every 10 steps in long runs


def adalora_schedule(total_steps: int) -> tuple[int, int, int]:
    """AdaLoRA's phases for a run of ``total_steps`` optimizer steps: ``(tinit, tfinal, deltaT)``.

    ``tinit`` = 10% of the steps (at least 1; no pruning yet), ``tfinal`` = 25% (at least 1;
    final ranks fixed; PEFT's last allocation happens at step ``total_steps - tfinal``, so
    ``tfinal`` = 0 would never reach the target budget), and ``deltaT`` (steps between
    reallocations) = a tenth of the pruning phase, between 1 and 10: e.g. 40 steps -> (4, 10, 2).

    Raises:
        LoraplaceError: fewer than 2 steps left for the pruning phase (runs under 4 steps).
    """
    tinit = max(1, int(TINIT_FRACTION * total_steps + 0.5))
    tfinal = max(1, int(TFINAL_FRACTION * total_steps + 0.5))
    pruning = total_steps - tfinal - tinit
    if pruning < 2:
        raise LoraplaceError(
            f"AdaLoRA needs a pruning phase between its warm-up and its final fine-tuning: {total_steps} steps "
            f"give tinit={tinit}, tfinal={tfinal} and {max(pruning, 0)} pruning steps (at least 2 needed); "
            "train for at least 4 optimizer steps (train.max_steps), better 40 or more"
        )
    delta_t = max(1, min(MAX_DELTA_T, pruning // REALLOCATIONS))
    return tinit, tfinal, delta_t


def _rank_range(sizes: list[int], total_rank: int, cap: int) -> tuple[int, int]:
    """Fewest and most parameters ``sum r_i * sizes_i`` of any ranks ``0 <= r_i <= cap`` that sum
    to ``total_rank``: the rank goes to the smallest (largest) modules first."""
    def fill(order: list[int]) -> int:
        left, total = total_rank, 0
        for size in order:
            take = min(cap, left)
            total, left = total + take * size, left - take
        return total

    return fill(sorted(sizes)), fill(sorted(sizes, reverse=True))


def adalora_config(placement: Placement, lora: LoraSettings, *, total_steps: int, target_params: int,
                   task_type: str = "CAUSAL_LM") -> tuple[AdaLoraConfig, dict[str, Any]]:
    """The PEFT ``AdaLoraConfig`` that adapts ``placement``'s modules and ends near ``target_params``.

    AdaLoRA's budget is a total rank ``target_r * modules``, redistributed by sensitivity, so
    its final parameter count ``sum r_i * (in_i + out_i + 1)`` depends on which modules keep
    rank. ``target_r = round(target_params / S)`` with ``S = sum (in + out + 1)`` over the
    modules (the count if every module kept ``target_r``), ``init_r = ceil(1.5 * target_r)``
    (:data:`INIT_RANK_RATIO`), the schedule from :func:`adalora_schedule`, ``lora_alpha = s * init_r``
    with ``s`` the study's update scale (``lora.scale``) at rank ``target_r``, the scale of a uniform
    arm of the budget (PEFT scales AdaLoRA's update by ``lora_alpha / init_r``, so every module trains
    at ``s``), ``lora_dropout = lora.dropout``,
    and PEFT's defaults for the rest (beta1 = beta2 = 0.85, orth_reg_weight = 0.5).

    Mixture-of-experts parameters (``placement.parameter_names``) are left out: PEFT's AdaLoRA
    adapts modules only. :func:`adalora_placement` is the placement it wraps.

    Args:
        placement: the modules to adapt (the ``full`` strategy's, resolved at any rank).
        lora: ``alpha``, ``scale`` and ``dropout`` (``r`` only for ``scale=fixed``).
        total_steps: the run's optimizer steps (PEFT's ``total_step``).
        target_params: the parameter budget of the final allocation.
        task_type: PEFT task type (``CAUSAL_LM``, ``SEQ_CLS``, ...).

    Returns:
        ``(config, info)``; info holds ``init_r``, ``target_r``, ``modules``, ``rank_budget``
        (``target_r * modules``), ``init_rank``, the schedule, ``reallocations`` (allocation steps
        planned), ``target``, ``initial_params`` (``init_r * S``: trainable at the start),
        ``uniform_final_params`` (``target_r * S``), ``final_params_range`` (fewest and most
        parameters any final allocation of that rank can train) and ``notes``.

    Raises:
        LoraplaceError: no module to adapt, a run too short for AdaLoRA, or a budget below
            rank 1 on average.
    """
    modules = module_slots(placement)
    if not modules:
        raise LoraplaceError(f"strategy {placement.strategy!r} has no module AdaLoRA can adapt "
                             "(PEFT's AdaLoRA adapts linear modules, not expert parameters)")
    tinit, tfinal, delta_t = adalora_schedule(total_steps)
    sizes = [m.in_features + m.out_features + 1 for m in modules]
    size = sum(sizes)
    target_r = round(target_params / size)
    if target_r < 1:
        raise LoraplaceError(
            f"AdaLoRA's budget of {target_params:,} parameters is below half of what an average rank of 1 costs "
            f"on the {len(modules)} modules of {placement.strategy!r} ({size:,}); raise the budget or adapt "
            "fewer modules"
        )
    init_r = math.ceil(INIT_RANK_RATIO * target_r)
    notes = []
    if placement.parameter_names:
        notes.append(f"{len(placement.parameter_names)} mixture-of-experts parameters left out: "
                     "PEFT's AdaLoRA adapts modules only")
    config = AdaLoraConfig(
        init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=total_steps,
        lora_alpha=update_scale(lora.scale, lora.alpha, target_r, lora.r) * init_r, lora_dropout=lora.dropout,
        target_modules=[m.name for m in modules],
        task_type=task_type,
    )
    pruning_steps = range(tinit + 1, total_steps - tfinal)
    low, high = _rank_range(sizes, target_r * len(modules), init_r)
    info = {
        "method": "adalora", "init_r": init_r, "target_r": target_r, "modules": len(modules),
        "rank_budget": target_r * len(modules), "init_rank": init_r * len(modules),
        "total_step": total_steps, "tinit": tinit, "tfinal": tfinal, "deltaT": delta_t,
        "reallocations": sum(1 for s in pruning_steps if s % delta_t == 0) + 1,  # + the final one
        "target": target_params, "initial_params": init_r * size, "uniform_final_params": target_r * size,
        "final_params_range": [low, high], "notes": notes,
    }
    return config, info


def adalora_placement(placement: Placement, config: AdaLoraConfig) -> Placement:
    """``placement``'s modules as PEFT wraps them for AdaLoRA: every module at rank
    ``config.init_r`` with alpha ``config.lora_alpha``, expert parameters left out. Its
    ``lora_params`` count A and B (``init_r * (in + out)``); the E vectors are checked by
    :func:`check_adalora_wrapped`."""
    modules = [replace(m, r=config.init_r, alpha=config.lora_alpha) for m in module_slots(placement)]
    return replace(placement, modules=modules, warnings=list(placement.warnings))


def _adalora_layers(peft_model, adapter: str = "default") -> dict[str, Any]:
    """The AdaLoRA layers of a PEFT model: name in the base model -> layer."""
    return {name: m for name, m in peft_model.get_base_model().named_modules()
            if isinstance(m, AdaLoraLayer) and adapter in m.lora_A}


def check_adalora_wrapped(peft_model, placement: Placement, trainable: int, adapter: str = "default") -> None:
    """:func:`loraplace.adapters.check_wrapped` for AdaLoRA: the planned modules, ranks and
    alphas (``placement`` from :func:`adalora_placement`), every E vector of length r, and
    ``trainable`` (the adapters' trainable parameters, a classifier's head excluded) equal to
    the plan's A and B plus those E entries.

    Raises:
        LoraplaceError: from ``check_wrapped``, or an E vector of another length.
    """
    layers = _adalora_layers(peft_model, adapter)
    wrong = [f"{name}: E {tuple(m.lora_E[adapter].shape)} at r={m.r[adapter]}" for name, m in layers.items()
             if tuple(m.lora_E[adapter].shape) != (m.r[adapter], 1)]
    if wrong:
        raise LoraplaceError("AdaLoRA's singular values E do not match the ranks: " + "; ".join(wrong[:5]))
    singular_values = sum(m.lora_E[adapter].numel() for m in layers.values())
    check_wrapped(peft_model, placement, trainable - singular_values)


def adalora_orth_penalty(peft_model, adapter: str = "default") -> torch.Tensor:
    """AdaLoRA's orthogonality regulariser, as PEFT's ``AdaLoraModel.forward`` computes it:
    the mean over the adapter's A and B matrices of ``||A A^T - I||_F`` and ``||B^T B - I||_F``
    (a scalar tensor with gradients; multiplied by ``orth_reg_weight`` it joins the loss)."""
    terms = []
    for name, p in peft_model.get_base_model().named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


class AdaLoraCallback(TrainerCallback):
    """Runs AdaLoRA inside the HF Trainer: its regulariser and its rank allocator.

    * ``on_optimizer_step`` (after ``optimizer.step()``, before ``model.zero_grad()``: the order
      PEFT's ``update_and_allocate`` documents, and the hook PEFT's own AdaMSS callback uses)
      calls ``model.base_model.update_and_allocate(state.global_step)`` (the steps done before
      this one: 0 .. total_step - 1), which scores every triplet from ``p * p.grad`` and prunes
      to the step's budget; the HF Trainer never calls it by itself.
    * ``on_step_begin`` (before the step's first forward, gradients empty) adds the gradient of
      ``orth_reg_weight * R`` (:func:`adalora_orth_penalty`) to the adapters' gradients. PEFT adds
      ``R`` to ``outputs.loss`` inside ``AdaLoraModel.forward``, which loraplace's selective-logits
      loss never calls; adding its gradient before the backward means gradient clipping, the
      optimizer and the sensitivity scores all see loss + R, as in PEFT. Under fp16 loss scaling
      the gradient is scaled as the backward's will be.

    Attributes:
        calls: how many times the allocator ran (one per optimizer step).
        history: per step ``{"step", "budget", "rank", "orth_penalty"}``: the schedule's total-rank
            budget, the total rank the mask keeps after the step, and R before it.
    """

    def __init__(self, adapter: str = "default"):
        self.adapter = adapter
        self.calls = 0
        self.history: list[dict[str, Any]] = []
        self._penalty: float | None = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        weight = model.peft_config[self.adapter].orth_reg_weight
        params = [p for n, p in model.get_base_model().named_parameters()
                  if ("lora_A" in n or "lora_B" in n) and self.adapter in n and p.requires_grad]
        penalty = adalora_orth_penalty(model, self.adapter)
        self._penalty = penalty.item()
        if weight == 0 or not params:
            return
        scaler = getattr(optimizer, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        grads = torch.autograd.grad(weight * scale * penalty, params)
        for p, g in zip(params, grads):
            p.grad = g if p.grad is None else p.grad + g

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        adalora = model.base_model
        adalora.update_and_allocate(state.global_step)
        self.calls += 1
        budget = adalora.rankallocator.budget_schedule(state.global_step)[0]
        self.history.append({"step": state.global_step, "budget": budget,
                             "rank": sum(adalora_final_ranks(model, self.adapter).values()),
                             "orth_penalty": self._penalty})


def _rank_masks(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Per AdaLoRA layer (name in the base model): the boolean mask of the singular triplets it
    keeps, ``(init_r,)``; all True before the allocator's first pruning."""
    pattern = peft_model.peft_config[adapter].rank_pattern or {}
    masks = {}
    for name, layer in _adalora_layers(peft_model, adapter).items():
        kept = pattern.get(f"{name}.lora_E.{adapter}", pattern.get(f"{name}.lora_E"))
        device = layer.lora_E[adapter].device
        masks[name] = (torch.ones(layer.r[adapter], dtype=torch.bool, device=device) if kept is None
                       else torch.as_tensor(kept, dtype=torch.bool, device=device).view(-1))
    return masks


def adalora_final_ranks(peft_model, adapter: str = "default") -> dict[str, int]:
    """The rank each module keeps: the True entries of AdaLoRA's rank mask (PEFT stores it in
    the config's ``rank_pattern``, ``<module>.lora_E.<adapter>`` -> one bool per triplet), by
    the module's name in the base model; ``init_r`` everywhere before any pruning."""
    return {name: int(mask.sum()) for name, mask in _rank_masks(peft_model, adapter).items()}


def adalora_params(peft_model, adapter: str = "default") -> tuple[int, int]:
    """``(initial_trainable, final_effective)``: the A, E and B entries PEFT trains,
    ``sum init_r * (in + out + 1)``, and the parameters of the allocation the rank mask keeps,
    ``sum r_i * (in_i + out_i + 1)`` (what a model resized to those ranks would train)."""
    layers = _adalora_layers(peft_model, adapter)
    ranks = adalora_final_ranks(peft_model, adapter)
    initial = sum(m.lora_A[adapter].numel() + m.lora_E[adapter].numel() + m.lora_B[adapter].numel()
                  for m in layers.values())
    final = sum(ranks[name] * (m.in_features + m.out_features + 1) for name, m in layers.items())
    return initial, final


@torch.no_grad()
def adalora_update_norms(peft_model, adapter: str = "default") -> dict[str, float]:
    """Frobenius norm of each module's learned update ``B diag(E * mask) A * alpha / (init_r + 1e-5)``
    (the scaling PEFT's ``SVDLinear`` applies), by name in the base model; 0 for a module
    whose every triplet was pruned."""
    masks = _rank_masks(peft_model, adapter)
    norms = {}
    for name, m in _adalora_layers(peft_model, adapter).items():
        e = m.lora_E[adapter] * masks[name].view(-1, 1)
        delta = m.lora_B[adapter] @ (m.lora_A[adapter] * e) * m.scaling[adapter] / (m.ranknum[adapter] + 1e-5)
        norms[name] = float(torch.linalg.matrix_norm(delta.float()))
    return norms


class AdaLoraMethod(Method):
    """``adalora``: AdaLoRA on the modules of ``full``, its final rank budget set to meet the arm's
    parameter budget; ranks pruned during training by :class:`AdaLoraCallback`."""

    name = "adalora"
    resumable = False  # its rank allocator's sensitivity averages live in the callback, not the checkpoint

    def check(self, skeleton: nn.Module, arm: Arm, config: StudyConfig) -> None:
        adalora_schedule(config.train.max_steps)  # a run too short for AdaLoRA's phases fails here

    def stand_in(self, skeleton: nn.Module, arm: Arm, config: StudyConfig) -> Placement:
        return full_stand_in(skeleton, config)

    def placement(self, model: nn.Module, arm: Arm, r: int, alpha: float, ranks: dict[str, int] | None = None,
                  budget: dict | None = None, scale: str = DEFAULT_SCALE) -> Placement:
        raise LoraplaceError(f"arm {arm.label!r}: AdaLoRA places its ranks during training "
                             "(see loraplace.methods.adalora)")

    def adapters(self, model: nn.Module, spec: RunSpec, task_type: str) -> tuple[Placement, Any, list]:
        """``(initial placement, AdaLoraConfig, [its allocator callback])``."""
        reference = Arm.parse(spec.strategy).reference
        reference = reference if reference is not None else REFERENCE_STRATEGY
        target = budget_target(model, reference, spec.lora.r, spec.lora.alpha)
        full = slot_placement(model)
        full.modules = [replace(m, alpha=spec.lora.alpha) for m in full.modules]
        config, info = adalora_config(full, spec.lora, total_steps=spec.train.max_steps, target_params=target,
                                      task_type=task_type)
        placement = adalora_placement(full, config)
        placement.strategy = spec.strategy
        placement.budget = {"reference": reference, "target": target, "method": "adalora", **info}
        return placement, config, [AdaLoraCallback()]

    def check_wrapped(self, peft_model: Any, placement: Placement, trainable: int) -> None:
        check_adalora_wrapped(peft_model, placement, trainable)

    def after_training(self, peft_model: Any, placement: Placement, callbacks: list, run_dir: Path) -> None:
        """What AdaLoRA's allocator left: the final ranks and parameters, into the placement's budget
        record (the result's ``final_params``) and ``adalora.json``."""
        ranks = adalora_final_ranks(peft_model)
        initial, final = adalora_params(peft_model)
        budget = placement.budget
        budget.update(initial_params=initial, final_params=final, achieved=final,
                      deviation_pct=100.0 * (final - budget["target"]) / budget["target"])
        history = callbacks[0].history if callbacks else []
        atomic_write_json(run_dir / "adalora.json", {"final_ranks": ranks, "initial_params": initial,
                                                     "final_params": final, "budget": budget,
                                                     "allocator_calls": len(history), "history": history})

    def update_norms(self, peft_model: Any, placement: Placement, initial: dict | None = None) -> list[dict[str, Any]]:
        norms, ranks = adalora_update_norms(peft_model), adalora_final_ranks(peft_model)
        return [{"name": m.name, "role": m.role, "stack": m.stack, "layer": m.layer, "r": ranks.get(m.name, 0),
                 "norm": norms[m.name]} for m in placement.modules if m.name in norms]


ADALORA = register(AdaLoraMethod())
