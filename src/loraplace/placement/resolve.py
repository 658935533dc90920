"""Resolve a strategy against a concrete model to the exact set of modules that get adapters."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any, Mapping

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from loraplace.errors import LoraplaceError
from loraplace.placement.arms import REFERENCE_STRATEGY
from loraplace.placement.infer import infer_roles
from loraplace.placement.matrix import rank_rows
from loraplace.placement.params import linear_modules, lora_param_count, uniform_rank
from loraplace.placement.roles import ALL_ROLES, BLOCK_NAME, OUTER_ROLES, ArchitectureRoles, group_of, roles_for
from loraplace.placement.strategies import Strategy, Term, parse_strategy


@dataclass(frozen=True)
class AdaptedModule:
    """One module (or MoE expert parameter) that receives a LoRA adapter.

    Attributes:
        name: exact module name in the base model (``model.layers.0.self_attn.q_proj``); for an
            expert parameter, the parameter's name (``model.layers.0.mlp.experts.down_proj``).
        role: its role (``attn.q``), or ``"?"`` when a literal strategy hits a module no role
            table covers.
        layer: block index within its stack, or None for modules outside the block stack.
        in_features, out_features: the linear map's shape (num_embeddings, dim for ``embed``).
        r, alpha: the adapter's rank and scaling numerator.
        stack: the block stack's module path (``model.layers``; ``encoder.block`` and
            ``decoder.block`` in T5), or None outside the blocks.
        num_experts: experts sharing this parameter (1 for an ordinary module).
        is_parameter: True for an expert parameter (PEFT ``target_parameters``), False for a module.
        scale_r: the rank its update scale is computed from when its rank was chosen for a budget
            (:mod:`loraplace.placement.scale`); None: its own rank.
    """

    name: str
    role: str
    layer: int | None
    in_features: int
    out_features: int
    r: int
    alpha: float
    stack: str | None = None
    num_experts: int = 1
    is_parameter: bool = False
    scale_r: int | None = None

    @property
    def params(self) -> int:
        return lora_param_count(self.in_features, self.out_features, self.r, self.num_experts)

    @property
    def size(self) -> int:
        """Parameters per unit of rank: ``experts * (in + out)``."""
        return lora_param_count(self.in_features, self.out_features, 1, self.num_experts)


@dataclass
class Placement:
    """A strategy resolved on one model: exact module names, roles, ranks and counts.

    Attributes:
        strategy, family: the strategy spec and the role table's family.
        modules: the adapted modules in model order.
        num_layers: the model's block count (of the encoder, for encoder-decoder models).
        warnings: things a person should read before training (suffix matches, inferred roles).
        stacks: block stack path -> number of blocks (two entries for encoder-decoder models).
        available_roles: roles this model has, in display order (the columns of the matrix).
        budget: for a budget-matched placement, the reference, target and achieved counts.
        scale: the update-scale rule once applied (:func:`loraplace.placement.scale.apply_scale`):
            rule, scale ranks and the distinct scales; None while alphas are scaling numerators.
    """

    strategy: str
    family: str
    modules: list[AdaptedModule]
    num_layers: int
    warnings: list[str] = field(default_factory=list)
    stacks: dict[str, int] = field(default_factory=dict)
    available_roles: list[str] = field(default_factory=list)
    budget: dict[str, Any] | None = None
    scale: dict[str, Any] | None = None

    @property
    def module_names(self) -> list[str]:
        """Names of adapted modules (PEFT ``target_modules``), expert parameters excluded."""
        return [m.name for m in self.modules if not m.is_parameter]

    @property
    def parameter_names(self) -> list[str]:
        """Names of adapted expert parameters (PEFT ``target_parameters``)."""
        return [m.name for m in self.modules if m.is_parameter]

    @property
    def lora_params(self) -> int:
        """Trainable parameters this placement adds: sum of r * (in + out)."""
        return sum(m.params for m in self.modules)

    def roles(self) -> list[str]:
        """Adapted roles in first-seen order."""
        return list(dict.fromkeys(m.role for m in self.modules))

    def ranks(self) -> dict[str, list[int]]:
        """role -> the distinct ranks its modules got, ascending."""
        out: dict[str, set[int]] = defaultdict(set)
        for m in self.modules:
            out[m.role].add(m.r)
        return {role: sorted(out[role]) for role in self.roles()}

    def by_role(self) -> dict[str, list[int | None]]:
        """role -> sorted layer indices adapted for that role (all stacks together)."""
        out: dict[str, list[int | None]] = defaultdict(list)
        for m in self.modules:
            out[m.role].append(m.layer)
        return {k: sorted(v, key=lambda x: -1 if x is None else x) for k, v in out.items()}

    def matrix(self) -> dict[str, Any]:
        """The layer x role view: which role is adapted in which layer, and at which rank.

        Returns:
            ``{"columns": [role, ...], "rows": [{"stack", "layers": "0-11", "cells": {role: rank
            or None}}]}``; consecutive layers with identical cells share one row; modules outside
            the blocks (embed, lm_head) form a last row with stack None and layers ``"-"``. A cell
            holds ``"8/16"`` when a role's modules in one layer got different ranks.
        """
        adapted_roles = set(self.roles())
        columns = [r for r in self.available_roles if r not in OUTER_ROLES or r in adapted_roles]
        columns += [r for r in self.roles() if r not in columns]
        rows = rank_rows(((m.stack, m.layer, m.role, m.r) for m in self.modules), self.stacks, columns)
        return {"columns": columns, "rows": rows}

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "family": self.family,
            "num_layers": self.num_layers,
            "stacks": dict(self.stacks),
            "lora_params": self.lora_params,
            "ranks": self.ranks(),
            "budget": self.budget,
            "scale": self.scale,
            "warnings": list(self.warnings),
            "modules": [
                {"name": m.name, "role": m.role, "stack": m.stack, "layer": m.layer, "in_features": m.in_features,
                 "out_features": m.out_features, "num_experts": m.num_experts, "is_parameter": m.is_parameter,
                 "r": m.r, "alpha": m.alpha, "params": m.params}
                for m in self.modules
            ],
        }


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise LoraplaceError("the model has no config.model_type; is it a transformers model?")
    return model_type


@dataclass(frozen=True)
class _Candidate:
    name: str
    role: str
    stack: str | None
    layer: int | None
    in_features: int
    out_features: int
    num_experts: int = 1
    is_parameter: bool = False


def _module_name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _candidates(model: nn.Module, table: ArchitectureRoles) -> list[_Candidate]:
    """Every module (and expert parameter) that has a role, in model order."""
    found: list[_Candidate] = []
    for name, (in_f, out_f) in linear_modules(model).items():
        match = BLOCK_NAME.match(name)
        if not match:
            continue
        role = table.role_of(match["rel"])
        if role is not None:
            found.append(_Candidate(name, role, match["stack"], int(match["layer"]), in_f, out_f))
    if table.expert_params:
        modules = dict(model.named_modules())
        for name, param in model.named_parameters():
            match = BLOCK_NAME.match(name)
            role = table.expert_role_of(match["rel"]) if match else None
            if role is None or param.dim() != 3:
                continue
            owner = modules[name.rpartition(".")[0]]
            experts, first, second = (int(x) for x in param.shape)
            # PEFT's rule (lora.ParamWrapper): (experts, out, in) unless the module says it
            # stores (experts, in, out) with ``is_transposed``.
            in_f, out_f = (first, second) if getattr(owner, "is_transposed", False) else (second, first)
            found.append(_Candidate(name, role, match["stack"], int(match["layer"]), in_f, out_f, experts, True))
    # Opt-in roles outside the blocks: the input embedding and the output projection.
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embed = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    embed_name = _module_name_of(model, embed)
    if embed_name and isinstance(embed, nn.Embedding):
        found.append(_Candidate(embed_name, "embed", None, None, embed.num_embeddings, embed.embedding_dim))
    head_name = _module_name_of(model, head)
    shapes = linear_modules(model)
    if head_name and head_name in shapes:
        found.append(_Candidate(head_name, "lm_head", None, None, *shapes[head_name]))
    order = {name: i for i, name in enumerate(n for n, _ in model.named_modules())}
    # Stable sort: expert parameters of one module keep their registration order.
    return sorted(found, key=lambda c: order.get(c.name, order.get(c.name.rpartition(".")[0], 0)))


def _stacks(model: nn.Module) -> dict[str, int]:
    """Block stack path -> number of blocks, from the names of the model's linear modules."""
    stacks: dict[str, int] = {}
    for name in linear_modules(model):
        match = BLOCK_NAME.match(name)
        if match:
            stacks[match["stack"]] = max(stacks.get(match["stack"], 0), int(match["layer"]) + 1)
    return stacks


def _num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return 0


def _no_match_error(strategy: Strategy, model: nn.Module) -> LoraplaceError:
    names = list(linear_modules(model))
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    return LoraplaceError(
        f"strategy {strategy.name!r} matches no module of this {model_type_of(model)} model; "
        f"its linear modules are: {shown}"
    )


def _term_error(strategy: Strategy, term: Term, model: nn.Module, available: list[str], family: str) -> LoraplaceError:
    names = list(linear_modules(model))
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    part = f" in its term {term.text!r}" if len(strategy.terms) > 1 else ""
    layers = f" in layers {term.layers.text}" if term.layers is not None else ""
    return LoraplaceError(
        f"strategy {strategy.name!r} matches no module of this {model_type_of(model)} model{part} "
        f"(roles {', '.join(term.roles)}{layers}); pick roles it has: {', '.join(available)} "
        f"(role table {family}); its linear modules are: {shown}"
    )


def _table(model: nn.Module, model_type: str, warnings: list[str]) -> ArchitectureRoles:

    try:
        return roles_for(model_type)
    except LoraplaceError:
        table = infer_roles(model, model_type)  # raises, listing the linear modules, when unsure
    mapping = "; ".join(f"{role}: {', '.join(paths)}" for role, paths in table.roles.items())
    warnings.append(
        f"model_type {model_type!r} has no role table: roles were inferred from the module tree ({mapping}); "
        "check them against the model before training"
    )
    return table


def _term_selects(term: Term, candidates: list[_Candidate], stacks: dict[str, int], strategy: str) -> list[_Candidate]:
    allowed: dict[str, set[int]] = {}
    if term.layers is not None:
        for stack, count in stacks.items():
            context = f"strategy {strategy!r}" + (f", stack {stack}" if len(stacks) > 1 else "")
            allowed[stack] = set(term.layers.layers(count, context))
    picked = []
    for c in candidates:
        if not any(fnmatchcase(c.role, p) for p in term.roles):
            continue
        if term.layers is not None and (c.stack is None or c.layer not in allowed.get(c.stack, ())):
            continue  # modules outside the blocks have no layer index to select
        picked.append(c)
    return picked


def resolve_placement(model: nn.Module, strategy: Strategy, r: int, alpha: float) -> Placement:
    """Resolve ``strategy`` on ``model`` (real or meta weights) to exact adapted modules.

    Role-based strategies use the architecture's role table (inferred from the module tree,
    with a warning, when none is written); each term's roles, layers and rank/alpha are
    applied in order, a later term overriding an earlier one's rank. Literal strategies apply
    PEFT's own ``target_modules`` matching rule to every linear module, so the result is what
    PEFT adapts.

    Args:
        model: a transformers model (weights may be on the meta device).
        strategy: from :func:`parse_strategy`.
        r, alpha: rank and alpha for terms that do not set their own.

    Returns:
        A :class:`Placement` whose modules are in model order.

    Raises:
        LoraplaceError: unknown architecture whose roles cannot be inferred, a term that selects
            nothing, or a layer selection beyond the model's blocks.
    """
    shapes = linear_modules(model)
    model_type = model_type_of(model)
    warnings: list[str] = []
    stacks = _stacks(model)
    if strategy.is_literal:
        try:
            table: ArchitectureRoles | None = roles_for(model_type)
        except LoraplaceError:
            table = None
    else:
        table = _table(model, model_type, warnings)
    candidates = _candidates(model, table) if table else []
    by_name = {c.name: c for c in candidates}
    available = [role for role in ALL_ROLES if any(c.role == role for c in candidates)]

    chosen: dict[str, tuple[_Candidate, int, float]] = {}
    if strategy.is_literal:
        config = LoraConfig(target_modules=list(strategy.peft_targets or ()))
        for name in shapes:
            if check_target_module_exists(config, name):
                match = BLOCK_NAME.match(name)
                chosen[name] = (by_name.get(name) or _Candidate(
                    name, "?", match["stack"] if match else None, int(match["layer"]) if match else None, *shapes[name]
                ), r, alpha)
        # Say plainly what each literal target matched, by role: the paper draft's mistake.
        for target in strategy.peft_targets or ():
            hits = [n for n in chosen if n == target or n.endswith("." + target)]
            hit_roles = sorted({chosen[n][0].role for n in hits})
            groups = sorted({group_of(role) or role for role in hit_roles})
            if len(groups) > 1:
                warnings.append(
                    f"literal target {target!r} matches modules of several roles "
                    f"({', '.join(hit_roles)}; groups {', '.join(groups)}) because PEFT matches "
                    f"target_modules by name suffix: {len(hits)} modules, e.g. "
                    + ", ".join(sorted({_relative(h) for h in hits}))
                )
        if not chosen:
            raise _no_match_error(strategy, model)
    else:
        assert table is not None
        for term in strategy.terms:
            picked = _term_selects(term, candidates, stacks, strategy.name)
            if not picked:
                raise _term_error(strategy, term, model, available, table.family)
            for c in picked:
                chosen[c.name] = (c, term.r if term.r is not None else r, term.alpha if term.alpha is not None else alpha)

    # Model order: literal matches were collected in module order already.
    order = {name: i for i, name in enumerate(c.name for c in candidates)}
    names = list(chosen) if strategy.is_literal else sorted(chosen, key=order.__getitem__)
    modules = [
        AdaptedModule(c.name, c.role, c.layer, c.in_features, c.out_features, mr, ma, c.stack, c.num_experts,
                      c.is_parameter)
        for c, mr, ma in (chosen[n] for n in names)
    ]
    return Placement(
        strategy=strategy.name,
        family=table.family if table else model_type,
        modules=modules,
        num_layers=_num_layers(model),
        warnings=warnings,
        stacks=stacks,
        available_roles=available,
    )


def _relative(name: str) -> str:
    match = BLOCK_NAME.match(name)
    return match["rel"] if match else name


def module_slots(placement: Placement) -> list[AdaptedModule]:
    """The placement's slots: its modules without mixture-of-experts parameters (the one definition
    of a slot, for importance scores, automatic allocation, EVA and AdaLoRA)."""
    return [m for m in placement.modules if not m.is_parameter]


def slot_placement(model: nn.Module) -> Placement:
    """The slots an automatic strategy allocates over: the modules of ``full`` (rank 1), without
    mixture-of-experts parameters (no importance score covers them yet)."""
    placement = resolve_placement(model, parse_strategy(REFERENCE_STRATEGY), 1, 1.0)
    placement.modules = module_slots(placement)
    if not placement.modules:
        raise LoraplaceError("automatic placement found no linear module to place adapters on")
    return placement


def explicit_placement(model: nn.Module, label: str, ranks: Mapping[str, int], alpha: float,
                       budget: dict[str, Any] | None = None, target: int | None = None) -> Placement:
    """The placement that adapts exactly the modules of ``ranks`` at those ranks, each with scaling
    numerator ``alpha``. Ranks chosen for a budget of ``target`` parameters (an automatic or EVA
    allocation) give every module the scale rank of a uniform arm of that budget on these modules
    (:mod:`loraplace.placement.scale`); ``target`` defaults to ``budget["target"]``.

    Raises:
        LoraplaceError: a module name that is not a slot of this model (an allocation of another model).
    """
    slots = slot_placement(model)
    known = {m.name for m in slots.modules}
    unknown = sorted(set(ranks) - known)
    if unknown:
        raise LoraplaceError(f"the stored allocation of {label!r} names modules this model does not have: "
                             f"{', '.join(unknown[:5])}; was it made for another model?")
    bad = {n: k for n, k in ranks.items() if not isinstance(k, int) or k < 1}
    if bad:
        raise LoraplaceError(f"the allocation of {label!r} has ranks below 1: {bad}")
    modules = [replace(m, r=int(ranks[m.name]), alpha=alpha) for m in slots.modules if m.name in ranks]
    if target is None and budget:
        target = budget.get("target")
    if target is not None:
        scale_r = uniform_rank(target, sum(m.size for m in modules))
        modules = [replace(m, scale_r=scale_r) for m in modules]
    placement = replace(slots, strategy=label, modules=modules, warnings=[])
    placement.budget = dict(budget) if budget else None
    return placement
