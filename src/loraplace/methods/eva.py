"""EVA (Paischer et al., 2024, arXiv:2410.07170; PEFT ``init_lora_weights="eva"``) as a study method.

Before training, the principal components of each module's inputs over a few batches; the budget
goes to the components with the largest explained-variance ratio, over all modules together (each
module at most ``round(rho * r)``, possibly 0), and each module's LoRA ``A`` starts as its top
components (B = 0). :func:`eva_allocation` resolves the ranks and those vectors once per study (stored
by the study as safetensors), :func:`~loraplace.placement.resolve.explicit_placement` turns them into a
placement that the usual ``lora_config_for`` / ``check_wrapped`` path wraps, and :func:`apply_eva`
initialises the wrapped adapters from them in every run, through PEFT's EVA loader.

The components are computed exactly (:func:`principal_components`: one forward pass over the batches
summing each module's input covariance, then its top eigenvectors), not by PEFT's
``get_eva_state_dict``. PEFT's incremental SVD cycles over the batches until every needed component
agrees with its previous estimate (cosine >= ``tau``); components of nearly equal variance keep
rotating into each other, so on SmolLM2-135M with the default 8 batches the pass at rank 6 needed
154 forward passes (9 minutes on 2 CPU cores) and the one at rank 8 205 (9 minutes; its last 100 spent
on one o_proj whose components 2 and 3 kept rotating). The exact covariance is what that SVD
estimates, costs one forward pass per batch, and has no convergence to wait for.

EVA fixes a total *rank*, not a parameter count: the parameters it trains depend on which modules
get the rank. A study's EVA arm is an arm of a parameter budget like the others, so
:func:`eva_allocation` applies EVA's redistribution rule with the budget counted in parameters
(:func:`select_by_parameters`); the record says how near the target it came.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.eva import initialize_lora_eva_weights
from safetensors.torch import load as load_tensors
from torch import nn

from loraplace.adapters import exact_key
from loraplace.config import StudyConfig
from loraplace.data import IGNORE_INDEX
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

EVA_RHO = 2.0
"""EVA's ``rho`` (PEFT's ``EvaConfig`` default): a module gets at most ``round(rho * r)`` components."""

COVARIANCE_BYTES = 2 * 2**30
"""The float64 input covariances one pass over the batches holds at most; inputs beyond it are summed
in further passes (Qwen2.5-0.5B, 24 layers of a 4864-wide down_proj input: 3 passes)."""

EXACT_EIGH_MAX = 2048
"""Inputs up to this width get a full symmetric eigendecomposition (1.6 s at 1536 on 2 CPU cores);
wider ones LOBPCG for the top components only (10 s against eigh's 50 s at 4864), checked by its
residual and decomposed in full where LOBPCG did not converge."""


def _selected(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The positions whose inputs EVA reads: real tokens, and of those the labelled ones where the
    batch carries token labels (PEFT's ``use_label_mask``)."""
    mask = batch["attention_mask"].bool()
    if "labels" in batch and batch["labels"].shape == batch["input_ids"].shape:
        mask = mask & (batch["labels"] != IGNORE_INDEX)
    return mask


@torch.no_grad()
def _forward_each(model: nn.Module, names: list[str], batches: list[dict[str, torch.Tensor]],
                  hook: Callable[[str, torch.Tensor], None]) -> None:
    """One forward pass per batch (labels left out), calling ``hook(name, x)`` with each module of
    ``names``'s input at the batch's selected positions (:func:`_selected`, ``(tokens, in)``); the
    logits of the last position only where no hooked module is the output projection (saves a
    ``(B, T, vocab)`` tensor). The model comes back as it was (mode, hooks), also on an error."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_hooked = head is not None and any(model.get_submodule(n) is head for n in names)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters \
        and not head_hooked else {}
    mask: dict[str, torch.Tensor] = {}

    def pre(name):
        def call(module, args):
            x = args[0].detach()
            hook(name, x[mask["m"].to(x.device)])
        return call

    handles = [model.get_submodule(name).register_forward_pre_hook(pre(name)) for name in names]
    training = model.training
    model.eval()
    try:
        for batch in batches:
            mask["m"] = _selected(batch)
            model(**{k: v for k, v in batch.items() if k != "labels"}, **extra)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)


@torch.no_grad()
def _shared_inputs(model: nn.Module, names: list[str], batch: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, str], dict[str, int]]:
    """Module name -> the first module of ``names`` fed the same input in a forward pass over ``batch``
    (q, k and v; gate and up): those share one covariance, as PEFT's EVA shares one SVD; and module
    name -> its input's width. Inputs are matched by shape and two fingerprints of the selected
    positions' values (their sum and a fixed random bilinear form, which a permutation of tokens or
    features changes): identical inputs give identical fingerprints, others differ."""
    seen: dict[tuple, str] = {}
    source: dict[str, str] = {}
    width: dict[str, int] = {}

    def hook(name: str, x: torch.Tensor) -> None:
        y = x.double()
        gen = torch.Generator().manual_seed(0)
        left = torch.randn(y.shape[0], generator=gen, dtype=torch.float64).to(y.device)
        right = torch.randn(y.shape[1], generator=gen, dtype=torch.float64).to(y.device)
        key = (tuple(x.shape), float(y.sum()), float(left @ y @ right))
        source.setdefault(name, seen.setdefault(key, name))
        width[name] = int(x.shape[-1])

    _forward_each(model, names, [batch], hook)
    missing = [n for n in names if n not in source]
    if missing:
        raise LoraplaceError(f"EVA: modules {missing[:5]} received no input in a forward pass")
    return source, width


def _top_eigen(cov: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues (descending) and their eigenvectors (columns) of the symmetric
    ``cov``: in full up to :data:`EXACT_EIGH_MAX`, else by LOBPCG from a fixed start."""
    n = cov.shape[0]
    if n > EXACT_EIGH_MAX and 3 * k < n:
        start = torch.randn(n, k, generator=torch.Generator().manual_seed(0), dtype=cov.dtype).to(cov.device)
        vals, vecs = torch.lobpcg(cov, X=start, largest=True, niter=1000)
        residual = (cov @ vecs - vecs * vals).norm(dim=0).max()
        if residual <= 1e-6 * float(vals.abs().max()):
            order = vals.argsort(descending=True)
            return vals[order], vecs[:, order]
    vals, vecs = torch.linalg.eigh(cov)
    return vals.flip(0)[:k], vecs.flip(1)[:, :k]


@torch.no_grad()
def principal_components(model: nn.Module, counts: dict[str, int], batches: list[dict[str, torch.Tensor]]
                         ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Per module (name -> number ``k`` of components): the top ``k`` principal components of its input
    over the batches' selected tokens (:func:`_selected`), centred as EVA's incremental PCA centres
    them, as unit rows ``(k, in)`` (float32, each row's largest entry positive, as PEFT's ``svd_flip``
    signs them) and their explained-variance ratios ``(k,)`` (float64, variance over total variance).

    Each distinct input's covariance is summed in float64 in one forward pass per batch (modules fed
    the same tensor share one), at most :data:`COVARIANCE_BYTES` of them per pass; the model comes
    back as it was.

    Returns:
        ``(components by module, forward passes run)``.

    Raises:
        LoraplaceError: an encoder-decoder model, a module asked for more components than its input's
            width, or that sees fewer selected tokens than ``k + 1`` or inputs that do not vary.
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise LoraplaceError("EVA as loraplace runs it needs one token mask for every layer; an encoder-decoder's "
                             "encoder and decoder see different tokens, so EVA is not supported for it")
    if not counts or not batches:
        raise LoraplaceError(f"EVA needs modules and batches: {len(counts)} modules, {len(batches)} batches")
    names = list(counts)
    probe = next((b for b in batches if _selected(b).any()), None)
    if probe is None:
        raise LoraplaceError("EVA: the scoring batches have no selected token (every label is ignored)")
    source, width = _shared_inputs(model, names, probe)
    group: dict[str, list[str]] = {}
    for name in names:
        group.setdefault(source[name], []).append(name)
    wanted = {s: max(counts[name] for name in members) for s, members in group.items()}
    for s, k in wanted.items():  # before any pass over the batches
        if k > width[s]:
            raise LoraplaceError(f"EVA: module {s} has {width[s]} input features, fewer than the {k} components "
                                 "asked of it; lower the rank")
    chunks: list[list[str]] = [[]]
    held = 0
    for s in group:
        size = 8 * width[s] ** 2
        if chunks[-1] and held + size > COVARIANCE_BYTES:
            chunks.append([])
            held = 0
        chunks[-1].append(s)
        held += size
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    passes = 1
    for chunk in chunks:
        sums: dict[str, list] = {}

        def add(name: str, x: torch.Tensor) -> None:
            x = x.to(torch.float64)
            if name not in sums:
                sums[name] = [0, x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1], x.shape[1])]
            s = sums[name]
            s[0] += x.shape[0]
            s[1] += x.sum(0)
            s[2].addmm_(x.T, x)

        _forward_each(model, chunk, batches, add)
        passes += len(batches)
        for s in chunk:
            n, total_x, xx = sums.pop(s, (0, None, None))
            k = wanted[s]
            if n < k + 1:
                raise LoraplaceError(f"EVA: module {s} sees {n} selected token(s) on the scoring batches, fewer "
                                     f"than the {k + 1} that {k} components need; give more or larger batches "
                                     "(importance.batches, importance.batch_size) or lower ranks")
            mean = total_x / n
            cov = xx / n - torch.outer(mean, mean)
            del xx
            total = float(cov.diagonal().sum())
            if not total > 0:
                raise LoraplaceError(f"EVA: module {s}'s inputs do not vary on the scoring batches")
            vals, vecs = _top_eigen(cov, k)
            rows = vecs.T
            rows = rows * rows.gather(1, rows.abs().argmax(1, keepdim=True)).sign()
            ratios = (vals.clamp_min(0.0) / total).cpu()
            rows = rows.float().cpu()
            for name in group[s]:
                out[name] = (rows[: counts[name]].clone(), ratios[: counts[name]].clone())
    return {name: out[name] for name in names}, passes


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
    config.rank_pattern = {exact_key(PEFT_PREFIX + n): r for n, (r, _) in before.items()}
    config.alpha_pattern = {exact_key(PEFT_PREFIX + n): a for n, (_, a) in before.items()}
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


def eva_allocation(setup, arm: Arm, lora, batches: list[dict]):
    """EVA's placement of ``arm`` (``eva`` or ``eva~REFERENCE``) on the loaded base model, at the arm's
    budget in *parameters*.

    EVA itself spends a total *rank* (``r * modules``), so the parameters it trains depend on which modules
    get the rank (at the budget's uniform rank, 8% below the budget on SmolLM2-135M, 17% on
    Qwen2.5-0.5B). Here every module of ``full`` gets its top ``round(rho * uniform)`` principal components
    (:func:`principal_components`, EVA's cap at the budget's uniform rank) and EVA's own redistribution
    rule is applied with the budget counted in parameters (:func:`select_by_parameters`): the arm trains
    the budget to within one component's ``in + out``.

    Returns:
        ``(placement, state)``: the placement (modules EVA gave rank 0 left out) with its ``budget``
        record (``selection``: ``"parameters"``; ``components``: ``"exact"``; ``cap``), its alphas at the
        study's update-scale rule (every module at the scale of a uniform arm of the budget on EVA's
        modules), and EVA's initial A matrices by module name.
    """
    reference = arm.reference if arm.reference is not None else REFERENCE_STRATEGY
    target = budget_target(setup.base, reference, lora.r, lora.alpha)
    slots = slot_placement(setup.base)
    modules = module_slots(slots)
    sizes = {m.name: m.in_features + m.out_features for m in modules}
    uniform = uniform_rank(target, sum(m.size for m in slots.modules))
    cap = max(1, round(EVA_RHO * uniform))
    start = time.perf_counter()
    components, passes = principal_components(setup.base, {m.name: min(cap, m.in_features) for m in modules},
                                              batches)
    ranks, achieved, short = select_by_parameters({n: components[n][1] for n in sizes}, sizes, target, cap)
    notes = []
    if slots.parameter_names:
        notes.append(f"{len(slots.parameter_names)} mixture-of-experts parameters left out: "
                     "EVA initialises linear modules only")
    if short:
        notes.append(f"EVA's components, at most {cap} per module, reach {achieved:,} of the {target:,} parameters")
    kept = {name: k for name, k in ranks.items() if k > 0}
    budget = {"reference": reference, "target": target, "achieved": achieved,
              "deviation_pct": 100.0 * (achieved - target) / target, "method": "eva", "selection": "parameters",
              "components": "exact", "cap": cap, "rho": EVA_RHO, "seconds": time.perf_counter() - start,
              "forward_passes": passes, "dropped": len(ranks) - len(kept), "notes": notes}
    placement = apply_scale(explicit_placement(setup.base, arm.label, kept, lora.alpha, budget), lora.scale, lora.r)
    placement.budget["ranks"] = placement.ranks()  # type: ignore[index]
    return placement, {name: components[name][0][:k] for name, k in ranks.items()}


def eva_init_state(model: nn.Module, placement: Placement, batches: list[dict[str, torch.Tensor]],
                   task_type: str = "CAUSAL_LM", shared: dict | None = None) -> dict[str, torch.Tensor]:
    """``init=eva``: EVA's A for every module of ``placement`` at the rank the placement gives it (module
    name -> ``(r_m, in_m)``, the top ``r_m`` principal components of its inputs, :func:`principal_components`),
    without EVA's rank redistribution. ``task_type`` is the initialisers' common signature: the components
    do not depend on it.

    ``shared`` (a study's allocations pass one dict to every arm's initialiser on the same batches)
    keeps each computation by its modules and ranks: ``init=eva`` and ``init=default_scaled`` on one
    placement compute the components once.

    Raises:
        LoraplaceError: expert parameters (EVA initialises linear modules only) or too few selected
            tokens for a module's rank.
    """
    if placement.parameter_names:
        raise LoraplaceError(f"init=eva on {placement.strategy!r}: EVA initialises linear modules only, not "
                             "mixture-of-experts parameters; leave the experts out")
    modules = module_slots(placement)
    counts = {m.name: m.r for m in modules}
    key = ("eva_init", tuple(counts.items()))
    state = (shared or {}).get(key)
    if state is None:
        components, _ = principal_components(model, counts, batches)
        state = {name: rows for name, (rows, _) in components.items()}
        if shared is not None:
            shared[key] = state
    return dict(state)


def input_energies(model: nn.Module, rows: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]]
                   ) -> dict[str, tuple[float, float]]:
    """Per module of ``rows`` (name -> a matrix ``(k, in)``): the mean over the batches' selected tokens
    (:func:`_selected`) of ``||x||^2`` and of ``||rows x||^2``, ``x`` the module's input, in float64. One
    forward pass per batch, the model left as it was."""
    sums = {name: [0, 0.0, 0.0] for name in rows}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.double()
        p = x @ rows[name].to(x.device, torch.float64).T
        s = sums[name]
        s[0] += int(x.shape[0])
        s[1] += float((x * x).sum())
        s[2] += float((p * p).sum())

    _forward_each(model, list(rows), batches, add)
    return {name: (x2 / max(n, 1), p2 / max(n, 1)) for name, (n, x2, p2) in sums.items()}


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
        they train, and whether every component was taken below the target (more components are needed).
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
    in expectation over the draw, so every seed keeps its own random directions. EVA's components are
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
    """``eva``: ranks and initial A matrices from the principal components of the module inputs, once per study."""

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
