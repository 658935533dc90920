"""EVA (Paischer et al., 2024, arXiv:2410.07170; PEFT ``init_lora_weights="eva"``) as a study method.

Before training, an incremental SVD of each module's inputs over a few batches; the rank budget
``r * modules`` goes to the right-singular vectors with the largest explained-variance ratio,
over all modules together (each module at most ``round(rho * r)``, possibly 0), and each module's
LoRA ``A`` starts as its top right-singular vectors (B = 0). :func:`eva_ranks` resolves the ranks
and those vectors once per study (:func:`eva_allocation`, stored by the study as safetensors),
:func:`~loraplace.placement.resolve.explicit_placement` turns them into a placement that the usual
``lora_config_for`` / ``check_wrapped`` path wraps, and :func:`apply_eva` initialises the wrapped adapters from them in
every run.

EVA fixes a total *rank*, not a parameter count: the parameters it trains depend on which modules
get the rank. A study's EVA arm is an arm of a parameter budget like the others, so
:func:`eva_allocation` applies EVA's redistribution rule with the budget counted in parameters
(:func:`select_by_parameters`); the record says how near the target it came.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import _Hook, get_eva_state_dict, initialize_lora_eva_weights
from safetensors.torch import load as load_tensors
from torch import nn

from loraplace.config import LoraSettings, StudyConfig
from loraplace.errors import LoraplaceError
from loraplace.methods.base import INITIALISERS, Initialiser, Method, full_stand_in, register, stored_ranks
from loraplace.placement.arms import REFERENCE_STRATEGY, Arm
from loraplace.placement.budget import budget_target
from loraplace.placement.params import uniform_rank
from loraplace.placement.resolve import Placement, explicit_placement, module_slots, slot_placement
from loraplace.placement.scale import DEFAULT_SCALE, apply_scale
from loraplace.records import RunSpec

PEFT_PREFIX = "base_model.model."
"""What a module's name in the base model is prefixed with inside a ``PeftModel``."""


def _exact_key(name: str) -> str:
    """A PEFT pattern key that matches ``name`` only (see ``lora_config_for``)."""
    return "^" + re.escape(name)


def _remove_eva_hooks(model: nn.Module) -> None:
    """Take off forward hooks PEFT's EVA left behind when it stopped with an error."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, _Hook):
                del module._forward_hooks[key]


class EvaNotConverged(LoraplaceError):
    """EVA's incremental SVD did not converge within the forward-pass limit."""


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
            raise EvaNotConverged(
                f"EVA's incremental SVD did not converge within {self.limit - 1} forward passes over the "
                "batches; give it more (or larger) batches"
            )
        return model(**{k: v for k, v in inputs.items() if k != "labels"}, **self.extra)


def _eva_state(model: nn.Module, names: list[str], config: LoraConfig, batches: list[dict[str, torch.Tensor]],
               max_passes: int) -> tuple[dict[str, torch.Tensor], "_EvaForward"]:
    """PEFT's ``get_eva_state_dict`` for ``names`` under ``config`` on the unwrapped ``model``, which
    comes back unchanged (mode, hooks) also when EVA fails; and the forward counter it ran with."""
    forward = _EvaForward(model, set(names), limit=max_passes * len(batches) + 1)
    training = model.training
    try:
        state = get_eva_state_dict(model, batches, peft_config=config, forward_fn=forward, show_progress_bar=False)
    except BaseException:
        _remove_eva_hooks(model)  # the shared base model must come back unchanged
        model.train(training)
        raise
    if set(state) != set(names):
        raise LoraplaceError(f"PEFT's EVA covered other modules than planned: "
                             f"missing {sorted(set(names) - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - set(names))[:5]}")
    return state, forward


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
            vector; the run's alphas come from ``explicit_placement``).
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
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise LoraplaceError("EVA as loraplace runs it needs one token mask for every layer; an encoder-decoder's "
                             "encoder and decoder see different tokens, so EVA is not supported for it")
    modules = module_slots(placement)
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
            start = time.perf_counter()
            state, forward = _eva_state(model, names, config, batches, max_passes)
            forwards.append(forward)
            params = sum(state[m.name].shape[0] * (m.in_features + m.out_features) for m in modules)
            runs[r] = (params, state, time.perf_counter() - start)
        return runs[r][0]

    if r is not None:  # the rank chosen before: one pass (at most r_max)
        run(min(r, r_max))
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


@torch.no_grad()
def apply_eva(peft_model, eva_state: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """Initialise the wrapped LoRA A matrices from EVA's state (module name in the base model
    -> ``(r_i, in_i)``), through PEFT's ``initialize_lora_eva_weights``; ranks and alphas stay
    as wrapped, so ``check_wrapped`` sees the planned ones. The model must be wrapped with
    the placement ``explicit_placement`` makes of EVA's ranks (``lora_config_for``); B is 0 as in any LoRA init.

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
        raise LoraplaceError("EVA's ranks differ from the wrapped ones (wrap with the placement of EVA's ranks): "
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


EVA_HEADROOM = 1.25
"""EVA runs at this multiple of the budget's uniform rank (rounded up), so that the components it returns
usually cover the budget in parameters wherever its redistribution puts them (it moved 8% of SmolLM2-135M's
and 17% of Qwen2.5-0.5B's parameters below the budget at the uniform rank); where they do not, one more pass
at a larger rank."""


def eva_allocation(setup, arm: Arm, lora, batches: list[dict], max_passes: int = 3):
    """EVA's placement of ``arm`` (``eva`` or ``eva~REFERENCE``) on the loaded base model, at the arm's
    budget in *parameters*.

    EVA itself spends a total *rank* (``r * modules``), so the parameters it trains depend on which modules
    get the rank (at the budget's uniform rank, 8% below the budget on SmolLM2-135M, 17% on
    Qwen2.5-0.5B). Here PEFT's EVA runs once on the modules of ``full`` at :data:`EVA_HEADROOM` times the
    budget's uniform rank; each component it returns is ranked by its explained-variance ratio
    (:func:`explained_variance`, one forward pass) and EVA's own redistribution rule is applied with the
    budget counted in parameters (:func:`select_by_parameters`, each module at most ``round(rho * uniform)``
    components as EVA caps it): the arm trains the budget to within one component's ``in + out``. Where
    the returned components do not reach the budget, EVA runs again at the rank that would (at most
    ``max_passes`` passes; then the nearest, with a note). A search over EVA's own rank
    (``loraplace.methods.eva_ranks`` without ``r``) would cost one whole EVA pass per candidate, 8 minutes
    each for SmolLM2-135M on 2 CPU cores, and still miss the budget by whole ranks.

    Returns:
        ``(placement, state)``: the placement (modules EVA gave rank 0 left out) with its ``budget``
        record (``eva_r``: the ``LoraConfig`` rank of the EVA pass used; ``selection``: ``"parameters"``),
        its alphas at the study's update-scale rule (every module at the scale of a uniform arm of the budget
        on EVA's modules), and EVA's initial A matrices by module name.
    """
    reference = arm.reference if arm.reference is not None else REFERENCE_STRATEGY
    target = budget_target(setup.base, reference, lora.r, lora.alpha)
    slots = slot_placement(setup.base)
    modules = module_slots(slots)
    sizes = {m.name: m.in_features + m.out_features for m in modules}
    uniform = uniform_rank(target, sum(m.size for m in slots.modules))
    rho = 2.0
    r = math.ceil(uniform * EVA_HEADROOM)
    passes, notes, failed = [], [], 0.0
    while True:
        start = time.perf_counter()
        try:
            _, state, info = eva_ranks(setup.base, slots, lora, batches, target_params=target, rho=rho,
                                       task_type=setup.task.peft_task_type, r=r)
        except EvaNotConverged:
            if r <= uniform:
                raise
            failed += time.perf_counter() - start
            if passes:  # a larger pass after a short one: keep the short one
                notes.append(f"EVA at rank {r} did not converge on these batches within the pass limit")
                break
            notes.append(f"EVA at rank {r} did not converge on these batches within the pass limit, so it ran at "
                         f"the budget's uniform rank {uniform}, whose components may not reach the budget (more "
                         "importance batches let it run above the uniform rank)")
            r = uniform
            continue
        start = time.perf_counter()
        ratios = explained_variance(setup.base, {n: w for n, w in state.items() if w.shape[0] > 0}, batches)
        passes.append({**info, "seconds": info["seconds"] + time.perf_counter() - start})
        ranks, achieved, short = select_by_parameters({n: ratios.get(n, torch.zeros(0)) for n in sizes}, sizes,
                                                      target, cap=round(rho * uniform))
        if not short or len(passes) == max_passes or info["r"] < r or notes:
            break
        r = max(r + 1, math.ceil(r * target / max(achieved, 1)))
    if short:
        notes.append(f"EVA's components reach {achieved:,} of the {target:,} parameters after {len(passes)} "
                     f"pass(es) (rank {info['r']})")
    kept = {name: k for name, k in ranks.items() if k > 0}
    budget = {"reference": reference, "target": target, "achieved": achieved,
              "deviation_pct": 100.0 * (achieved - target) / target, "method": "eva", "selection": "parameters",
              "eva_r": info["r"], "rho": rho, "tau": info["tau"], "passes": len(passes),
              "seconds": sum(p["seconds"] for p in passes) + failed,
              "forward_passes": sum(p["forward_passes"] for p in passes) + len(passes) * len(batches),
              "dropped": len(ranks) - len(kept), "notes": notes}
    placement = apply_scale(explicit_placement(setup.base, arm.label, kept, lora.alpha, budget), lora.scale, lora.r)
    placement.budget["ranks"] = placement.ranks()  # type: ignore[index]
    return placement, {name: state[name][:k] for name, k in ranks.items()}


def eva_init_state(model: nn.Module, placement: Placement, batches: list[dict[str, torch.Tensor]],
                   task_type: str = "CAUSAL_LM", shared: dict | None = None, tau: float = 0.99,
                   max_passes: int = 20) -> dict[str, torch.Tensor]:
    """``init=eva``: EVA's A for every module of ``placement`` at the rank the placement gives it (module
    name -> ``(r_m, in_m)``), without EVA's rank redistribution.

    PEFT's EVA runs once at the placement's largest rank ``R`` with ``rho = 1`` (every module keeps
    ``R``: nothing is redistributed), and each module keeps its top ``r_m`` right-singular vectors
    (PEFT's incremental PCA orders them by explained variance). One rank for every module keeps PEFT's
    sharing of one SVD between modules fed the same input (q, k, v) from moving rank between them.

    ``shared`` (a study's allocations pass one dict to every arm's initialiser on the same batches)
    keeps each pass by its modules and ``R``: ``init=eva`` and ``init=default_scaled`` on one
    placement run EVA once (a pass took 9 minutes for SmolLM2-135M on 2 CPU cores).

    Raises:
        LoraplaceError: expert parameters (PEFT's EVA initialises linear modules only), too few
            selected tokens for ``R`` components, or an SVD that does not converge.
    """
    if placement.parameter_names:
        raise LoraplaceError(f"init=eva on {placement.strategy!r}: PEFT's EVA initialises linear modules only, not "
                             "mixture-of-experts parameters; leave the experts out")
    modules = module_slots(placement)
    names = [m.name for m in modules]
    top = max(m.r for m in modules)
    use_label_mask = all(b["labels"].shape == b["input_ids"].shape for b in batches)
    tokens = max(_eva_selected_tokens(b, use_label_mask) for b in batches)
    if top > min(tokens, min(m.in_features for m in modules)):
        raise LoraplaceError(f"init=eva on {placement.strategy!r}: rank {top} needs as many components, more than a "
                             f"scoring batch's selected tokens ({tokens}) or the narrowest input; use larger "
                             "importance.batch_size or lower ranks")
    key = ("eva_init", tuple(names), top, tau, task_type)
    state = (shared or {}).get(key)
    if state is None:
        config = LoraConfig(r=top, target_modules=names, task_type=task_type, init_lora_weights="eva",
                            eva_config=EvaConfig(rho=1.0, tau=tau, use_label_mask=use_label_mask))
        state, _ = _eva_state(model, names, config, batches, max_passes)
        if shared is not None:
            shared[key] = state
    return {m.name: state[m.name][: m.r].float().cpu() for m in modules}


@torch.no_grad()
def _input_moments(model: nn.Module, rows: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]]
                   ) -> dict[str, dict[str, Any]]:
    """Per module of ``rows`` (name -> a matrix ``(k, in)``), sums over the batches' selected tokens
    (real tokens with a label, as EVA selects them) of the module's input ``x``: ``n`` tokens, ``x``
    (``(in,)``), ``||x||^2``, ``rows x`` (``(k,)``) and ``(rows x)^2`` (``(k,)``), in float64. One forward pass
    per batch, the model left as it was."""
    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float64)

    sums = {name: {"n": 0, "x": zeros(w.shape[1]), "x2": 0.0, "p": zeros(w.shape[0]), "p2": zeros(w.shape[0])}
            for name, w in rows.items()}
    mask: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre(module, args):
            x = args[0].detach()[mask["m"].to(args[0].device)].double()
            p = x @ rows[name].to(x.device, torch.float64).T
            s = sums[name]
            s["n"] += int(x.shape[0])
            s["x"] = s["x"] + x.sum(0).cpu()
            s["x2"] += float((x * x).sum())
            s["p"] = s["p"] + p.sum(0).cpu()
            s["p2"] = s["p2"] + (p * p).sum(0).cpu()
        return pre

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in rows]
    training = model.training
    model.eval()
    try:
        for batch in batches:
            use_labels = batch["labels"].shape == batch["input_ids"].shape
            m = batch["attention_mask"].bool()
            mask["m"] = m & (batch["labels"] != -100) if use_labels else m
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return sums


def input_energies(model: nn.Module, rows: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]]
                   ) -> dict[str, tuple[float, float]]:
    """Per module of ``rows`` (name -> a matrix ``(k, in)``): the mean over the batches' selected tokens
    (real tokens with a label, as EVA selects them) of ``||x||^2`` and of ``||rows x||^2``, ``x`` the
    module's input. One forward pass per batch, the model left as it was."""
    return {name: (s["x2"] / max(s["n"], 1), float(s["p2"].sum()) / max(s["n"], 1))
            for name, s in _input_moments(model, rows, batches).items()}


def explained_variance(model: nn.Module, rows: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]]
                       ) -> dict[str, torch.Tensor]:
    """Per module of ``rows`` (name -> unit rows ``(k, in)``, EVA's components): each row's explained-variance
    ratio over the batches' selected tokens, ``Var(v . x) / sum_j Var(x_j)`` with ``x`` centred as EVA's
    incremental PCA centres it (``(k,)``, float64). One forward pass per batch: EVA keeps its own ratios inside
    PEFT (``get_eva_state_dict`` returns the vectors only), so they are measured again here."""
    out = {}
    for name, s in _input_moments(model, rows, batches).items():
        n = s["n"]
        if n < 2:
            raise LoraplaceError(f"EVA: module {name} sees {n} selected token(s) on the scoring batches; "
                                 "give more or larger batches")
        mean = s["x"] / n
        total = s["x2"] / n - float(mean @ mean)
        variance = s["p2"] / n - (s["p"] / n) ** 2
        if not total > 0:
            raise LoraplaceError(f"EVA: module {name}'s inputs do not vary on the scoring batches")
        out[name] = variance.clamp_min(0.0) / total
    return out


def select_by_parameters(ratios: dict[str, torch.Tensor], sizes: dict[str, int], target: int, cap: int
                         ) -> tuple[dict[str, int], int, bool]:
    """EVA's rank redistribution with the budget counted in parameters instead of ranks.

    EVA gives its budget of ``r * modules`` ranks to the components with the largest explained-variance
    ratios over all modules, each module at most ``cap``; here the same order is walked, each component
    costing its module's ``in + out`` parameters, and the walk stops where the count comes nearest
    ``target``. A module's components come in PCA order, so its ratios are made non-increasing first (a
    measured ratio may wobble above the one before it) and every module keeps a prefix of its rows. Ties go
    to the module that comes first in ``ratios``.

    Returns:
        ``(ranks, parameters, exhausted)``: ranks by module (0 for a module that gets none), the parameters
        they train, and whether every component was taken below the target (a larger EVA pass is needed).
    """
    order = {name: i for i, name in enumerate(ratios)}
    items = sorted(((-float(v), order[name], i, name) for name, r in ratios.items()
                    for i, v in enumerate(torch.cummin(r.double(), 0).values[:cap].tolist())))
    ranks = dict.fromkeys(ratios, 0)
    spent = 0
    for *_, name in items:
        cost = sizes[name]
        if spent + cost > target:
            if spent + cost - target < target - spent:  # one more component comes nearer
                ranks[name] += 1
                spent += cost
            return ranks, spent, False
        ranks[name] += 1
        spent += cost
    return ranks, spent, spent < target


def default_scaled_state(model: nn.Module, placement: Placement, batches: list[dict[str, torch.Tensor]],
                         task_type: str = "CAUSAL_LM", shared: dict | None = None) -> dict[str, torch.Tensor]:
    """``init=default_scaled``, the scale control: per module the factor ``c_m`` (a ``(1,)`` tensor) by
    which a run multiplies PEFT's default random A so that its expected ``||A x||`` on the scoring
    batches equals that of EVA's A (:func:`eva_init_state`) for the same module and rank.

    PEFT's default A is Kaiming-uniform with ``a = sqrt(5)``: entries uniform on ``(-b, b)``,
    ``b = 1 / sqrt(in)``, variance ``1 / (3 in)``, so over its draw ``E ||A x||^2 = r ||x||^2 / (3 in)``;
    EVA's A gives ``||A_eva x||^2``. Averaged over the selected tokens:
    ``c_m = sqrt(mean ||A_eva x||^2 / (r_m mean ||x||^2 / (3 in_m)))``. The factor matches the scale
    in expectation over the draw, so every seed keeps its own random directions. EVA's pass is
    ``shared`` with an ``init=eva`` arm on the same placement (:func:`eva_init_state`)."""
    eva = eva_init_state(model, placement, batches, task_type, shared=shared)
    energies = input_energies(model, eva, batches)
    out = {}
    for m in module_slots(placement):
        x2, ax2 = energies[m.name]
        default = m.r * x2 / (3 * m.in_features)
        if not default > 0 or not ax2 >= 0:
            raise LoraplaceError(f"init=default_scaled: module {m.name} sees no input energy on the scoring batches")
        out[m.name] = torch.tensor([math.sqrt(ax2 / default)])
    return out


@torch.no_grad()
def apply_scale_factors(peft_model, factors: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """Multiply each wrapped module's A by its factor (:func:`default_scaled_state`).

    Raises:
        LoraplaceError: the factors cover other modules than were wrapped.
    """
    layers = {name: m for name, m in peft_model.get_base_model().named_modules()
              if isinstance(m, LoraLayer) and adapter in m.lora_A}
    if set(layers) != set(factors):
        raise LoraplaceError(f"the scale control's factors cover other modules than were wrapped: missing "
                             f"{sorted(set(layers) - set(factors))[:5]}, unexpected {sorted(set(factors) - set(layers))[:5]}")
    for name, layer in layers.items():
        layer.lora_A[adapter].weight.mul_(float(factors[name].reshape(-1)[0]))


INITIALISERS.register("eva", Initialiser("eva", eva_init_state, apply_eva))
INITIALISERS.register("default_scaled", Initialiser("default_scaled", default_scaled_state, apply_scale_factors))


class EvaMethod(Method):
    """``eva``: ranks and initial A matrices from EVA's SVD of the module inputs, once per study."""

    name = "eva"
    allocated_per_study = True
    state_suffix = "eva"

    def check(self, skeleton: nn.Module, arm: Arm, config: StudyConfig) -> None:
        """Nothing to check before training: EVA's ranks come from data."""

    def stand_in(self, skeleton: nn.Module, arm: Arm, config: StudyConfig) -> Placement:
        return full_stand_in(skeleton, config)

    def allocate(self, setup: Any, arm: Arm, config: StudyConfig, batches: Any,
                 scores: dict[str, Any]) -> tuple[Placement, dict | None]:
        return eva_allocation(setup, arm, config.lora, batches())

    def placement(self, model: nn.Module, arm: Arm, r: int, alpha: float, ranks: dict[str, int] | None = None,
                  budget: dict | None = None, scale: str = DEFAULT_SCALE) -> Placement:
        # every module at the scale of a uniform arm of the budget on EVA's modules (loraplace.placement.scale)
        return apply_scale(explicit_placement(model, arm.label, stored_ranks(arm, ranks), alpha, budget), scale, r)

    def initialise(self, peft_model: Any, spec: RunSpec) -> None:
        """EVA's initial A matrices: the ones the study computed once (:func:`eva_allocation`),
        carried in the spec; checked against the stored ranks."""
        if not spec.init_state:
            raise LoraplaceError(f"arm {spec.strategy!r}: the study's EVA initialisation is missing from the run")
        state = load_tensors(spec.init_state)
        ranks = {name: int(w.shape[0]) for name, w in state.items() if w.shape[0] > 0}
        if ranks != spec.ranks:
            raise LoraplaceError(f"arm {spec.strategy!r}: the stored EVA initialisation has other ranks than the "
                                 "stored allocation; delete both files in allocations/ to recompute them")
        apply_eva(peft_model, state)


EVA = register(EvaMethod())
