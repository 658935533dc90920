"""Two published rank-allocation baselines, run through PEFT, at a parameter budget.

**AdaLoRA** (Zhang et al., 2023, arXiv:2303.10512; PEFT ``AdaLoraConfig``). Each adapted module
gets an SVD-shaped update ``x -> W0 x + (alpha / init_r) * B diag(E) A x`` with ``A: (r, in)``,
``E: (r, 1)``, ``B: (out, r)``: ``r * (in + out + 1)`` trainable parameters at rank r. Every module
starts at rank ``init_r``; during training a sensitivity score (smoothed ``|p * grad|``) prunes
singular triplets (zeroes entries of E) along a cubic schedule until a total rank of
``target_r * modules`` is left, spread over the modules by importance; the last ``tfinal`` steps
train that final allocation. The HF Trainer never calls AdaLoRA's allocator:
:class:`AdaLoraCallback` does.

**EVA** (Paischer et al., 2024, arXiv:2410.07170; PEFT ``init_lora_weights="eva"``). Before
training, an incremental SVD of each module's inputs over a few batches; the rank budget
``r * modules`` goes to the right-singular vectors with the largest explained-variance ratio,
over all modules together (each module at most ``round(rho * r)``, possibly 0), and each module's
LoRA ``A`` starts as its top right-singular vectors (B = 0). :func:`eva_ranks` resolves the ranks
and those vectors once, :func:`eva_placement` turns them into a placement that the usual
``lora_config_for`` / ``check_wrapped`` path wraps, and :func:`apply_eva` initialises the
wrapped adapters from them in every run.

Both methods fix a total *rank*, not a parameter count: the parameters they train depend on
which modules get the rank. Each function picks its method's rank knob so that the parameters
come as near a target as the method allows, and reports what it achieved.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from loraplace.errors import LoraplaceError

if TYPE_CHECKING:
    from peft import AdaLoraConfig
    from torch import nn

    from loraplace.config import LoraSettings
    from loraplace.placement.resolve import Placement

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


def _adapted_modules(placement: Placement) -> list:
    return [m for m in placement.modules if not m.is_parameter]


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
    (:data:`INIT_RANK_RATIO`), the schedule from :func:`adalora_schedule`, ``lora_alpha =
    lora.alpha`` (PEFT scales the update by ``alpha / init_r``), ``lora_dropout = lora.dropout``,
    and PEFT's defaults for the rest (beta1 = beta2 = 0.85, orth_reg_weight = 0.5).

    Mixture-of-experts parameters (``placement.parameter_names``) are left out: PEFT's AdaLoRA
    adapts modules only. :func:`adalora_placement` is the placement it wraps.

    Args:
        placement: the modules to adapt (the ``full`` strategy's, resolved at any rank).
        lora: ``alpha`` and ``dropout`` (``r`` is not used).
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
    from peft import AdaLoraConfig

    modules = _adapted_modules(placement)
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
        lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=[m.name for m in modules],
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
    modules = [replace(m, r=config.init_r, alpha=config.lora_alpha) for m in _adapted_modules(placement)]
    return replace(placement, modules=modules, warnings=list(placement.warnings))


def _adalora_layers(peft_model, adapter: str = "default") -> dict[str, Any]:
    """The AdaLoRA layers of a PEFT model: name in the base model -> layer."""
    from peft.tuners.adalora import AdaLoraLayer

    return {name: m for name, m in peft_model.get_base_model().named_modules()
            if isinstance(m, AdaLoraLayer) and adapter in m.lora_A}


def check_adalora_wrapped(peft_model, placement: Placement, trainable: int, adapter: str = "default") -> None:
    """:func:`loraplace.study.runs.check_wrapped` for AdaLoRA: the planned modules, ranks and
    alphas (``placement`` from :func:`adalora_placement`), every E vector of length r, and
    ``trainable`` (the adapters' trainable parameters, a classifier's head excluded) equal to
    the plan's A and B plus those E entries.

    Raises:
        LoraplaceError: from ``check_wrapped``, or an E vector of another length.
    """
    from loraplace.study.runs import check_wrapped

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


# ----------------------------------------------------------------------------------------- EVA

PEFT_PREFIX = "base_model.model."
"""What a module's name in the base model is prefixed with inside a ``PeftModel``."""


def _exact_key(name: str) -> str:
    """A PEFT pattern key that matches ``name`` only (see ``lora_config_for``)."""
    return "^" + re.escape(name)


def _remove_eva_hooks(model: nn.Module) -> None:
    """Take off forward hooks PEFT's EVA left behind when it stopped with an error."""
    from peft.tuners.lora.eva import _Hook

    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, _Hook):
                del module._forward_hooks[key]


class _EvaForward:
    """EVA's ``forward_fn``: the model on a batch without its labels (EVA needs only the layer
    inputs), keeping the logits of the last position only where no adapted module is the output
    projection (saves a ``(B, T, vocab)`` tensor); counts its calls and stops after ``limit``
    (PEFT cycles over the batches until every SVD converges)."""

    def __init__(self, model: nn.Module, names: set[str], limit: int):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_adapted = any(module is head for name, module in model.named_modules() if name in names)
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.extra = {"logits_to_keep": 1} if accepts and not head_adapted else {}
        self.limit = limit
        self.calls = 0

    def __call__(self, model, inputs):
        self.calls += 1
        if self.calls > self.limit:
            raise LoraplaceError(
                f"EVA's incremental SVD did not converge within {self.limit - 1} forward passes over the "
                "batches; give it more (or larger) batches"
            )
        return model(**{k: v for k, v in inputs.items() if k != "labels"}, **self.extra)


def _eva_selected_tokens(batch: dict[str, torch.Tensor], use_label_mask: bool) -> int:
    mask = batch["attention_mask"].bool()
    if use_label_mask:
        mask = mask & (batch["labels"] != -100)
    return int(mask.sum())


def eva_ranks(model: nn.Module, placement: Placement, lora: LoraSettings, batches: list[dict[str, torch.Tensor]], *,
              target_params: int, rho: float = 2.0, task_type: str = "CAUSAL_LM", tau: float = 0.99,
              max_passes: int = 20, r: int | None = None) -> tuple[dict[str, int], dict[str, torch.Tensor], dict[str, Any]]:
    """EVA's ranks and initial A matrices for ``placement``'s modules, at about ``target_params``.

    PEFT's ``get_eva_state_dict`` runs on the unwrapped ``model`` with a ``LoraConfig`` of rank
    ``r`` on the placement's modules: an incremental SVD of each module's inputs (at most
    ``round(rho * r)`` components; modules fed the same input, like q/k/v, share one) until the
    components that matter have converged (cosine similarity >= ``tau`` between two batches),
    then the rank budget ``r * modules`` goes to the largest explained-variance ratios over all
    modules. Its inputs are the batch's real tokens, and, for token-level labels (causal LMs),
    only those with a label (EVA's ``use_label_mask``; PEFT's default
    ``prepare_model_inputs_fn`` reads ``attention_mask`` and ``labels``, so padding is left out);
    class labels (classification) are not token-aligned, so only the attention mask is used.

    The budget is a sum of ranks, so the parameters ``sum r_i * (in_i + out_i)`` depend on where
    EVA puts them. ``r`` is searched: from the uniform rank for the target, a secant step, then
    single steps until the count crosses the target; the nearest wins. Each candidate reruns
    PEFT's whole EVA pass (not only its redistribution): PEFT does not expose the
    explained-variance ratios, and its SVD itself depends on ``r`` (components kept, stopping
    point), so a rerun gives exactly what PEFT's EVA gives at that ``r``.

    Args:
        model: the base model (not PEFT-wrapped); left as it was (mode, weights, hooks).
        placement: the modules (the ``full`` strategy's); expert parameters are left out.
        lora: its ``alpha`` goes into the ``LoraConfig`` EVA runs with (it changes no rank or
            vector; the run's alphas come from :func:`eva_placement`).
        batches: collated batches (``input_ids``, ``attention_mask``, ``labels``), on any device.
        target_params: the parameter budget.
        rho: EVA's redistribution limit (>= 1; 1: every module keeps ``r``).
        tau: EVA's convergence threshold.
        max_passes: stop with an error after this many passes over ``batches``.
        r: the ``LoraConfig`` rank to run EVA at, without the search (a run re-creating the state
            of a rank chosen once per study).

    Returns:
        ``(ranks, state, info)``: ``ranks`` module name -> rank (0: EVA gives it none), in
        model order; ``state`` module name -> ``(rank, in)`` tensor, the rows of its A (PEFT's
        EVA state dict, keyed by the names in the base model); ``info`` with ``r`` (the
        ``LoraConfig`` rank chosen), ``rho``, ``tau``, ``rank_budget``, ``target``,
        ``achieved``, ``deviation_pct``, ``candidates`` (r -> parameters), ``seconds`` (all
        passes), ``seconds_chosen`` (the chosen r's pass), ``forward_passes``,
        ``use_label_mask``, ``tokens`` (selected tokens per batch) and ``notes``.

    Raises:
        LoraplaceError: an encoder-decoder model, no module or batch, a batch without enough
            selected tokens, a budget below rank 1, or an SVD that does not converge.
    """
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise LoraplaceError("EVA as loraplace runs it needs one token mask for every layer; an encoder-decoder's "
                             "encoder and decoder see different tokens, so EVA is not supported for it")
    modules = _adapted_modules(placement)
    if not modules or not batches:
        raise LoraplaceError(f"EVA needs modules and batches: {len(modules)} modules of {placement.strategy!r}, "
                             f"{len(batches)} batches")
    names = [m.name for m in modules]
    use_label_mask = all(b["labels"].shape == b["input_ids"].shape for b in batches)
    tokens = [_eva_selected_tokens(b, use_label_mask) for b in batches]
    size = sum(m.in_features + m.out_features for m in modules)
    r0 = round(target_params / size)
    if r0 < 1:
        raise LoraplaceError(f"EVA's budget of {target_params:,} parameters is below half of rank 1 on every module "
                             f"of {placement.strategy!r} ({size:,}); raise the budget")
    smallest = min(min(m.in_features for m in modules), max(tokens))
    r_max = max(1, int(smallest / rho))  # round(rho * r) components must fit the inputs and a batch
    if r0 > r_max:
        raise LoraplaceError(
            f"EVA at rank {r0} needs {round(rho * r0)} components per module, more than the smallest input "
            f"width or the largest batch's selected tokens ({smallest}); lower rho ({rho:g}) or give larger batches"
        )
    notes = []
    if placement.parameter_names:
        notes.append(f"{len(placement.parameter_names)} mixture-of-experts parameters left out: "
                     "PEFT's EVA initialises linear modules only")
    runs: dict[int, tuple[int, dict[str, torch.Tensor], float]] = {}
    forwards = []

    def run(r: int) -> int:
        """EVA at config rank r; returns the parameters its ranks train."""
        if r not in runs:
            config = LoraConfig(r=r, lora_alpha=lora.alpha, target_modules=names, task_type=task_type,
                                init_lora_weights="eva",
                                eva_config=EvaConfig(rho=rho, tau=tau, use_label_mask=use_label_mask))
            forward = _EvaForward(model, set(names), limit=max_passes * len(batches) + 1)
            forwards.append(forward)
            start = time.perf_counter()
            training = model.training
            try:
                state = get_eva_state_dict(model, batches, peft_config=config, forward_fn=forward,
                                           show_progress_bar=False)
            except BaseException:
                _remove_eva_hooks(model)  # the shared base model must come back unchanged
                model.train(training)
                raise
            if set(state) != set(names):
                raise LoraplaceError(f"PEFT's EVA covered other modules than planned: "
                                     f"missing {sorted(set(names) - set(state))[:5]}, "
                                     f"unexpected {sorted(set(state) - set(names))[:5]}")
            params = sum(state[m.name].shape[0] * (m.in_features + m.out_features) for m in modules)
            runs[r] = (params, state, time.perf_counter() - start)
        return runs[r][0]

    if r is not None:  # the rank chosen before: one pass
        run(r)
    else:  # uniform guess, one secant step, then single steps until the count crosses the target
        r = min(r_max, max(1, round(r0 * target_params / run(r0))))
        while True:
            params = run(r)
            step = 1 if params < target_params else -1
            if params == target_params or not 1 <= r + step <= r_max:
                break
            if r + step in runs or (run(r + step) - target_params) * (params - target_params) <= 0:
                break
            r += step
    best = min(runs, key=lambda c: (abs(runs[c][0] - target_params), c))
    achieved, state, seconds = runs[best]
    ranks = {name: int(state[name].shape[0]) for name in names}
    info = {
        "method": "eva", "r": best, "rho": rho, "tau": tau, "rank_budget": best * len(names),
        "target": target_params, "achieved": achieved,
        "deviation_pct": 100.0 * (achieved - target_params) / target_params,
        "candidates": {c: runs[c][0] for c in sorted(runs)}, "seconds": sum(v[2] for v in runs.values()),
        "seconds_chosen": seconds, "forward_passes": sum(f.calls for f in forwards), "use_label_mask": use_label_mask,
        "tokens": tokens, "notes": notes,
    }
    return ranks, {name: state[name] for name in names}, info


def eva_placement(placement: Placement, ranks: dict[str, int], *, r: int) -> Placement:
    """``placement`` with EVA's ranks: each module at its rank, modules at rank 0 (and expert
    parameters) left out with a warning, and alpha scaled with the rank, ``alpha * r_i / r``
    (``r``: the ``LoraConfig`` rank EVA ran with, ``info["r"]`` of :func:`eva_ranks`). The alpha
    scaling is EVA's ``adjust_scaling_factors`` (PEFT's default): every module keeps the update
    scale ``alpha / r`` of the uniform rank-``r`` LoRA, whatever rank EVA gave it.

    Raises:
        LoraplaceError: a module of ``placement`` without a rank in ``ranks``.
    """
    modules = _adapted_modules(placement)
    missing = [m.name for m in modules if m.name not in ranks]
    if missing:
        raise LoraplaceError(f"EVA ranks miss {len(missing)} modules of {placement.strategy!r}, e.g. {missing[:3]}")
    kept = [replace(m, r=ranks[m.name], alpha=m.alpha * ranks[m.name] / r) for m in modules if ranks[m.name] > 0]
    notes = list(placement.warnings)
    dropped = [m.name for m in modules if ranks[m.name] == 0]
    if dropped:
        notes.append(f"EVA gave rank 0 to {len(dropped)} modules, which get no adapter: "
                     + ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""))
    if placement.parameter_names:
        notes.append(f"{len(placement.parameter_names)} mixture-of-experts parameters left out: "
                     "PEFT's EVA initialises linear modules only")
    return replace(placement, modules=kept, warnings=notes)


@torch.no_grad()
def apply_eva(peft_model, eva_state: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """Initialise the wrapped LoRA A matrices from EVA's state (module name in the base model
    -> ``(r_i, in_i)``), through PEFT's ``initialize_lora_eva_weights``; ranks and alphas stay
    as wrapped, so ``check_wrapped`` sees the planned ones. The model must be wrapped with
    :func:`eva_placement`'s placement (``lora_config_for``); B is 0 as in any LoRA init.

    PEFT's loader looks each module's rank up in the config's ``rank_pattern`` under its name
    in the *PEFT model* (``base_model.model.<name>``) and re-creates, with a rescaled alpha, every
    adapter whose rank differs from that; loraplace's exact keys (``^<name>``) match names in the
    base model only, so for the call the patterns are set to exact keys of the prefixed names
    with the wrapped ranks and alphas (then nothing is re-created: A is copied), and restored
    afterwards (PEFT rewrites them with bare names, which match by suffix). The config's
    ``init_lora_weights`` becomes ``"eva"``, as PEFT requires.

    Raises:
        LoraplaceError: the state covers other modules than the wrapped ones, a shape differs
            from a wrapped A, or A does not hold the state afterwards.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    layers = {name: m for name, m in peft_model.get_base_model().named_modules()
              if isinstance(m, LoraLayer) and adapter in m.lora_A}
    state = {name: w for name, w in eva_state.items() if w.shape[0] > 0}
    if set(layers) != set(state):
        raise LoraplaceError(f"EVA's state covers other modules than were wrapped: missing "
                             f"{sorted(set(layers) - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - set(layers))[:5]}")
    differ = [f"{n}: EVA {tuple(w.shape)}, wrapped A {tuple(layers[n].lora_A[adapter].weight.shape)}"
              for n, w in state.items() if w.shape != layers[n].lora_A[adapter].weight.shape]
    if differ:
        raise LoraplaceError("EVA's ranks differ from the wrapped ones (wrap with eva_placement's placement): "
                             + "; ".join(differ[:5]))
    before = {n: (m.r[adapter], m.lora_alpha[adapter]) for n, m in layers.items()}
    config = peft_model.peft_config[adapter]
    saved = config.rank_pattern, config.alpha_pattern, config.target_modules
    config.rank_pattern = {_exact_key(PEFT_PREFIX + n): r for n, (r, _) in before.items()}
    config.alpha_pattern = {_exact_key(PEFT_PREFIX + n): a for n, (_, a) in before.items()}
    config.init_lora_weights = "eva"
    try:
        initialize_lora_eva_weights(peft_model, eva_state_dict={PEFT_PREFIX + n: w for n, w in state.items()},
                                    adapter_name=adapter, show_progress_bar=False)
    finally:
        config.rank_pattern, config.alpha_pattern, config.target_modules = saved
    after = {n: (m.r[adapter], m.lora_alpha[adapter]) for n, m in layers.items()}
    wrong = [n for n, m in layers.items()
             if not torch.equal(m.lora_A[adapter].weight, state[n].to(m.lora_A[adapter].weight))]
    if after != before or wrong:
        raise LoraplaceError(f"PEFT's EVA loader changed ranks/alphas or left A unset: {wrong[:5]}")


def eva_batches(train_dataset, collator, *, batch_size: int, batches: int) -> list[dict[str, torch.Tensor]]:
    """The first ``batches`` batches of ``batch_size`` training examples, collated: EVA's input.
    The same examples for every arm and seed (the dataset's order, not the training sampler's)."""
    n = min(len(train_dataset), batch_size * batches)
    rows = [train_dataset[i] for i in range(n)]
    return [collator(rows[i:i + batch_size]) for i in range(0, n, batch_size)]

