"""PEFT glue: the ``LoraConfig`` that adapts exactly a placement, the loud check that PEFT wrapped
exactly what was planned, per-module update norms, and unloading that gives the shared base model
back unchanged. Below the adapter methods (:mod:`loraplace.methods`) and the run recipe, which both
call it."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, ParamWrapper
from peft.utils.other import AuxiliaryTrainingWrapper

from loraplace.config import LoraSettings
from loraplace.errors import LoraplaceError


def wrapped_adapters(peft_model, adapter: str = "default") -> dict[str, tuple[int, float]]:
    """What PEFT actually wrapped: name in the base model -> (rank, alpha).

    A wrapped module keeps its name; a wrapped MoE expert parameter (``lora.ParamWrapper``,
    possibly nested as ``experts.base_layer``) is reported as ``<module>.<parameter>``, the
    name the placement uses.
    """
    found = {}
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.r:
            continue
        if isinstance(module, ParamWrapper):
            name = f"{name.replace('.base_layer', '')}.{module.parameter_name}"
        found[name] = (module.r[adapter], module.lora_alpha[adapter])
    return found


def adapter_update_norms(peft_model, placement, adapter: str = "default") -> list[dict[str, Any]]:
    """Post-hoc importance of a trained arm: per adapted module, the Frobenius norm of the update its
    adapter learned, ``||(alpha / r) B A||`` (PEFT's ``get_delta_weight``, which also orients GPT-2's
    Conv1D weights), in the placement's module order. Expert parameters have no single delta and are
    left out."""
    found: dict[str, float] = {}
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper) and adapter in module.r:
                found[name] = float(module.get_delta_weight(adapter).float().norm())
    return [{"name": m.name, "role": m.role, "stack": m.stack, "layer": m.layer, "r": m.r, "norm": found[m.name]}
            for m in placement.modules if m.name in found]


def lora_config_for(placement, lora: LoraSettings, task_type: str = "CAUSAL_LM"):
    """The PEFT ``LoraConfig`` that adapts exactly ``placement``: its modules as
    ``target_modules``, MoE expert parameters as ``target_parameters``, and per-module ranks and
    alphas through ``rank_pattern`` / ``alpha_pattern``.

    PEFT matches a pattern key ``k`` against a module name ``n`` with
    ``re.match(rf"(.*\.)?({k})$", n)``: a bare name would also match any module whose name ends in
    ``.<name>``, and its dots match any character. Keys are therefore ``^`` + the escaped exact
    name, which matches that one name only.

    Raises:
        LoraplaceError: expert parameters with ``lora.dropout`` > 0 (PEFT has no dropout for them).
    """
    if placement.parameter_names and lora.dropout > 0:
        raise LoraplaceError(
            f"strategy {placement.strategy!r} adapts mixture-of-experts parameters, for which PEFT has no "
            f"adapter dropout; set lora.dropout=0 (got {lora.dropout:g}) or leave the experts out (e.g. attention)"
        )
    # The most common rank/alpha is the default; only the others need a pattern.
    r = Counter(m.r for m in placement.modules).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in placement.modules).most_common(1)[0][0]
    key = lambda name: "^" + re.escape(name)  # noqa: E731
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=lora.dropout, bias="none", task_type=task_type,
        target_modules=placement.module_names,
        target_parameters=placement.parameter_names or None,
        rank_pattern={key(m.name): m.r for m in placement.modules if m.r != r},
        alpha_pattern={key(m.name): m.alpha for m in placement.modules if m.alpha != alpha},
    )


def check_wrapped(peft_model, placement, trainable: int) -> None:
    """Fail loudly unless PEFT wrapped exactly the planned modules, at the planned ranks and
    alphas, and the model trains exactly the planned number of parameters.

    Raises:
        LoraplaceError: naming up to five differing modules.
    """
    wrapped = wrapped_adapters(peft_model)
    planned = {m.name: (m.r, m.alpha) for m in placement.modules}
    if set(wrapped) != set(planned):
        extra = sorted(set(wrapped) - set(planned))[:5]
        missing = sorted(set(planned) - set(wrapped))[:5]
        raise LoraplaceError(
            f"PEFT wrapped a different module set than planned for {placement.strategy!r}: "
            f"unexpected {extra}, missing {missing}"
        )
    differ = [f"{n}: r={wrapped[n][0]} alpha={wrapped[n][1]:g}, planned r={planned[n][0]} alpha={planned[n][1]:g}"
              for n in planned if (wrapped[n][0], float(wrapped[n][1])) != (planned[n][0], float(planned[n][1]))]
    if differ:
        raise LoraplaceError(
            f"PEFT applied other ranks/alphas than planned for {placement.strategy!r}: " + "; ".join(differ[:5])
        )
    if trainable != placement.lora_params:
        raise LoraplaceError(
            f"trainable parameters {trainable:,} differ from the plan's {placement.lora_params:,}"
        )


def unload_adapters(peft_model) -> Any:
    """Remove every adapter and hand back the base model exactly as it was before
    ``get_peft_model``.

    ``peft_model.unload()`` alone is not enough: a module PEFT trains in full
    (``modules_to_save``, e.g. a classifier's new head) sits in a ``ModulesToSaveWrapper`` that
    keeps the untouched original next to a trained copy, and ``unload`` puts the trained copy
    into the model, so the next run on the shared base model would start from this run's head.
    Each such wrapper (any ``AuxiliaryTrainingWrapper``) is first replaced by its original
    module; ``unload`` then removes the LoRA layers (restoring their untouched base layers).
    """
    base = peft_model.get_base_model()
    wrappers = [(name, m) for name, m in base.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    for name, wrapper in wrappers:
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, wrapper.original_module)
    return peft_model.unload()
