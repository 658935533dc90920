"""Resolve a strategy against a concrete model to the exact set of modules that get adapters."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from loraplace.errors import LoraplaceError
from loraplace.placement.params import linear_modules, lora_param_count
from loraplace.placement.roles import ArchitectureRoles, group_of, roles_for
from loraplace.placement.strategies import Strategy

# "<stack>.<layer index>.<path inside the block>", e.g. "model.layers.7.self_attn.q_proj".
_BLOCK_NAME = re.compile(r"^(?P<stack>.+?)\.(?P<layer>\d+)\.(?P<rel>.+)$")


@dataclass(frozen=True)
class AdaptedModule:
    """One module that receives a LoRA adapter.

    Attributes:
        name: exact module name in the base model (``model.layers.0.self_attn.q_proj``).
        role: its role (``attn.q``), or ``"?"`` when a literal strategy hits a module no role
            table covers.
        layer: block index, or None for modules outside the block stack.
        in_features, out_features: the linear map's shape.
        r, alpha: the adapter's rank and scaling numerator.
    """

    name: str
    role: str
    layer: int | None
    in_features: int
    out_features: int
    r: int
    alpha: float

    @property
    def params(self) -> int:
        return lora_param_count(self.in_features, self.out_features, self.r)


@dataclass
class Placement:
    """A strategy resolved on one model: exact module names, roles, ranks and counts."""

    strategy: str
    family: str
    modules: list[AdaptedModule]
    num_layers: int
    warnings: list[str] = field(default_factory=list)

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def lora_params(self) -> int:
        """Trainable parameters this placement adds: sum of r * (in + out)."""
        return sum(m.params for m in self.modules)

    def roles(self) -> list[str]:
        """Adapted roles in first-seen order."""
        return list(dict.fromkeys(m.role for m in self.modules))

    def by_role(self) -> dict[str, list[int | None]]:
        """role -> sorted layer indices adapted for that role."""
        out: dict[str, list[int | None]] = defaultdict(list)
        for m in self.modules:
            out[m.role].append(m.layer)
        return {k: sorted(v, key=lambda x: -1 if x is None else x) for k, v in out.items()}

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "family": self.family,
            "num_layers": self.num_layers,
            "lora_params": self.lora_params,
            "warnings": list(self.warnings),
            "modules": [
                {"name": m.name, "role": m.role, "layer": m.layer, "in_features": m.in_features,
                 "out_features": m.out_features, "r": m.r, "alpha": m.alpha}
                for m in self.modules
            ],
        }


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise LoraplaceError("the model has no config.model_type; is it a transformers model?")
    return model_type


def module_roles(model: nn.Module, table: ArchitectureRoles) -> dict[str, tuple[str, int | None]]:
    """Every linear module that has a role: name -> (role, layer index)."""
    roles = {}
    for name in linear_modules(model):
        match = _BLOCK_NAME.match(name)
        if not match:
            continue
        role = table.role_of(match["rel"])
        if role is not None:
            roles[name] = (role, int(match["layer"]))
    return roles


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


def resolve_placement(model: nn.Module, strategy: Strategy, r: int, alpha: float) -> Placement:
    """Resolve ``strategy`` on ``model`` (real or meta weights) to exact adapted modules.

    Role-based strategies use the architecture's role table; literal strategies apply PEFT's own
    ``target_modules`` matching rule to every linear module, so the result is what PEFT adapts.

    Raises:
        LoraplaceError: unknown architecture, or the strategy matches nothing.
    """
    shapes = linear_modules(model)
    model_type = model_type_of(model)
    warnings: list[str] = []
    try:
        table: ArchitectureRoles | None = roles_for(model_type)
    except LoraplaceError:
        if not strategy.is_literal:
            raise
        table = None
    roles = module_roles(model, table) if table else {}

    selected: list[str] = []
    if strategy.is_literal:
        config = LoraConfig(target_modules=list(strategy.peft_targets or ()))
        selected = [name for name in shapes if check_target_module_exists(config, name)]
        # Say plainly what each literal target matched, by role: the paper draft's mistake.
        for target in strategy.peft_targets or ():
            hits = [n for n in selected if n == target or n.endswith("." + target)]
            hit_roles = sorted({roles.get(n, ("?", None))[0] for n in hits})
            groups = sorted({group_of(role) or role for role in hit_roles})
            if len(groups) > 1:
                warnings.append(
                    f"literal target {target!r} matches modules of several roles "
                    f"({', '.join(hit_roles)}; groups {', '.join(groups)}) because PEFT matches "
                    f"target_modules by name suffix: {len(hits)} modules, e.g. "
                    + ", ".join(sorted({_relative(h) for h in hits}))
                )
    else:
        patterns = strategy.roles
        selected = [
            name for name, (role, _) in roles.items() if any(fnmatchcase(role, p) for p in patterns)
        ]
    if not selected:
        raise _no_match_error(strategy, model)

    modules = []
    for name in selected:
        role, layer = roles.get(name, ("?", None))
        if layer is None:
            match = _BLOCK_NAME.match(name)
            layer = int(match["layer"]) if match else None
        in_f, out_f = shapes[name]
        modules.append(AdaptedModule(name, role, layer, in_f, out_f, r, alpha))
    return Placement(
        strategy=strategy.name,
        family=table.family if table else model_type,
        modules=modules,
        num_layers=_num_layers(model),
        warnings=warnings,
    )


def _relative(name: str) -> str:
    match = _BLOCK_NAME.match(name)
    return match["rel"] if match else name
