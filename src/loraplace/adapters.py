"""PEFT glue: the ``LoraConfig`` that adapts exactly a placement (with the arm's initialisation),
the loud check that PEFT wrapped exactly what was planned, per-module update norms, and unloading
that gives the shared base model back unchanged (base weights an initialisation rewrote included).
Below the adapter methods (:mod:`loraplace.methods`) and the run recipe, which both call it."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, ParamWrapper
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraplace.config import LoraSettings
from loraplace.errors import LoraplaceError
from loraplace.placement.strategies import DATA_INITS, DEFAULT_INIT, INIT_TITLES

REWRITES_BASE = ("pissa", "olora", "lora_ga", "corda")
"""Initialisations that move part of each adapted base weight into the adapter: PEFT replaces the
weight W by the residual W - (alpha / r) B A (LoRA-GA and CorDA as PEFT computes them, applied from
the study's stored start: :mod:`loraplace.methods.starts`). A run saves those weights (:func:`save_base_weights`)
and :func:`unload_adapters` puts them back, so the next arm on the shared base model sees W."""
NEED_FULL_PRECISION = ("pissa", "olora", "orthogonal")
"""Initialisations that read or cast to the base weight's dtype, which a quantized base does not have
in floating point (PEFT's PiSSA refuses it, OLoRA would re-quantize the residual, orthogonal would
cast A and B to the packed integer dtype)."""


def peft_init(init: str | None) -> bool | str:
    """PEFT's ``init_lora_weights`` for an arm's ``init=`` (:attr:`Strategy.init`): True (LoRA's
    default: Kaiming-uniform A, zero B) for None, ``default`` and a data-driven init (``eva``,
    ``default_scaled``: computed once per study and applied after wrapping), else the name (``pissa``
    is the exact SVD).

    Raises:
        LoraplaceError: a name not in :data:`~loraplace.placement.strategies.INIT_TITLES`.
    """
    if init in (None, DEFAULT_INIT) or init in DATA_INITS:  # a data init is applied after wrapping
        return True
    if init not in INIT_TITLES:
        raise LoraplaceError(f"unknown initialisation {init!r}; known: {', '.join(INIT_TITLES)}")
    return init


def check_init(model: nn.Module, placement, init: str | None, quantization: str = "none",
               ranks: bool = True) -> None:
    """Fail with one line where PEFT would not apply ``init`` to ``placement`` on ``model`` as named
    (weights may be on the meta device): a quantized base for an init that needs floating-point
    weights; an embedding (PEFT initialises it its own way whatever ``init_lora_weights`` says); a
    GPT-2 ``Conv1D`` for OLoRA (PEFT's OLoRA ignores ``fan_in_fan_out`` and builds A and B
    transposed); a weight tied to another module for an init that rewrites it (the tied module would
    change too); expert parameters for anything but the default and Gaussian; and, with ``ranks``, an
    odd rank for ``orthogonal``."""
    if init in (None, DEFAULT_INIT):
        return
    title = INIT_TITLES[init]
    where = f"strategy {placement.strategy!r}: init={init}"
    if quantization != "none" and init in DATA_INITS:
        raise LoraplaceError(f"{where}: the {title} is computed from the base model's module inputs once per study, "
                             f"which is not supported on a quantized base model (quantization={quantization}); use "
                             "quantization=none or a data-free init (default, gaussian)")
    if quantization != "none" and init in NEED_FULL_PRECISION:
        raise LoraplaceError(f"{where}: the {title} needs the base weights in floating point, but the base model "
                             f"is quantized (quantization={quantization}); use quantization=none or another init "
                             "(default, gaussian)")
    if placement.parameter_names and init != "gaussian":
        raise LoraplaceError(f"{where}: PEFT's {title} is not made for mixture-of-experts parameters "
                             f"({placement.parameter_names[0]}, ...); use init=default or gaussian, or leave the "
                             "experts out")
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    for name in placement.module_names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            raise LoraplaceError(f"{where}: PEFT gives an embedding's adapter ({name}) its own initialisation "
                                 "whatever init= says; leave the embed role out of this arm or use init=default")
        if init == "olora" and isinstance(module, Conv1D):
            raise LoraplaceError(f"{where}: PEFT's OLoRA does not handle GPT-2-style Conv1D layers ({name}: it "
                                 "builds A and B transposed); use init=pissa or another init on this model")
        shared = tied.get(id(module.weight), [])
        if init in REWRITES_BASE and len(shared) > 1:
            raise LoraplaceError(f"{where}: the {title} rewrites {name}'s weight, which is tied to "
                                 f"{', '.join(n for n in shared if n != name + '.weight')}; leave {name} out of "
                                 "this arm or use an init that keeps the base weights (default, gaussian, orthogonal)")
    if init == "orthogonal" and ranks:
        odd = [f"{m.name} (r={m.r})" for m in placement.modules if m.r % 2]
        if odd:
            raise LoraplaceError(f"{where}: PEFT's orthogonal init needs even ranks; {len(odd)} module(s) have odd "
                                 f"ones, e.g. {odd[0]}; use even r= (and an even budget-matched rank)")


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


def initial_adapters(peft_model, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A copy of each wrapped module's ``(A, B)`` where the initialisation left ``B A`` nonzero (PiSSA,
    OLoRA: the adapter starts at a part of the weight), for :func:`adapter_update_norms` to measure
    what training changed; empty when every ``B`` starts at zero (the update is then ``B A`` itself)."""
    layers = {name: m for name, m in peft_model.get_base_model().named_modules()
              if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper) and adapter in m.r
              and isinstance(getattr(m, "lora_B", None), nn.ModuleDict) and adapter in m.lora_B}  # not AdaLoRA's
    with torch.no_grad():
        if not any(bool(m.lora_B[adapter].weight.any()) for m in layers.values()):
            return {}
        return {name: (m.lora_A[adapter].weight.detach().to("cpu", copy=True),
                       m.lora_B[adapter].weight.detach().to("cpu", copy=True)) for name, m in layers.items()}


def adapter_update_norms(peft_model, placement, adapter: str = "default",
                         initial: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[dict[str, Any]]:
    """Post-hoc importance of a trained arm: per adapted module, the Frobenius norm of the update its
    adapter learned, ``||(alpha / r) B A||`` (PEFT's ``get_delta_weight``, which also orients GPT-2's
    Conv1D weights), in the placement's module order; with ``initial`` (:func:`initial_adapters`),
    ``||(alpha / r) (B A - B0 A0)||``, what training changed. Expert parameters have no single delta and
    are left out."""
    found: dict[str, float] = {}
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper) and adapter in module.r:
                if initial and name in initial:
                    a0, b0 = initial[name]
                    a, b = module.lora_A[adapter].weight.float().cpu(), module.lora_B[adapter].weight.float().cpu()
                    # transposing a Conv1D delta does not change its Frobenius norm
                    found[name] = float(module.scaling[adapter] * (b @ a - b0.float() @ a0.float()).norm())
                else:
                    found[name] = float(module.get_delta_weight(adapter).float().norm())
    return [{"name": m.name, "role": m.role, "stack": m.stack, "layer": m.layer, "r": m.r, "norm": found[m.name]}
            for m in placement.modules if m.name in found]


def exact_key(name: str) -> str:
    """A PEFT ``rank_pattern`` / ``alpha_pattern`` key that matches the module ``name`` only.

    PEFT matches a pattern key ``k`` against a module name ``n`` with
    ``re.match(rf"(.*\.)?({k})$", n)``: a bare name would also match any module whose name ends in
    ``.<name>``, and its dots match any character. The key is therefore ``^`` + the escaped exact
    name.
    """
    return "^" + re.escape(name)


def lora_config_for(placement, lora: LoraSettings, task_type: str = "CAUSAL_LM", init: str | None = None):
    """The PEFT ``LoraConfig`` that adapts exactly ``placement``: its modules as
    ``target_modules``, MoE expert parameters as ``target_parameters``, per-module ranks and
    alphas through ``rank_pattern`` / ``alpha_pattern``, and the arm's initialisation ``init``
    (:attr:`Strategy.init`, see :func:`peft_init`) as ``init_lora_weights``.

    Per-module keys are :func:`exact_key`, which match that one module only.

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
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=lora.dropout, bias="none", task_type=task_type,
        target_modules=placement.module_names,
        target_parameters=placement.parameter_names or None,
        rank_pattern={exact_key(m.name): m.r for m in placement.modules if m.r != r},
        alpha_pattern={exact_key(m.name): m.alpha for m in placement.modules if m.alpha != alpha},
        init_lora_weights=peft_init(init),
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


SavedWeights = list[tuple[nn.Parameter, torch.Tensor]]
"""Base weights saved before ``get_peft_model``: each parameter with a copy of its values."""


def save_base_weights(model: nn.Module, placement, init: str | bool | None) -> SavedWeights:
    """A copy, in CPU memory, of each base weight that the initialisation ``init`` (the arm's ``init=``
    or PEFT's ``init_lora_weights``) will rewrite (:data:`REWRITES_BASE`): the weights of
    ``placement``'s modules and its expert parameters; nothing for an init that leaves the base alone.
    :func:`unload_adapters` puts them back bit for bit.

    Held in CPU memory because a large arm's copies would otherwise take accelerator memory the memory
    plan does not count."""
    if not (isinstance(init, str) and init.startswith(REWRITES_BASE)):  # pissa_niter_N too
        return []
    params = [model.get_submodule(name).weight for name in placement.module_names]
    params += [model.get_parameter(name) for name in placement.parameter_names]
    unique = list({id(p): p for p in params}.values())
    return [(p, p.detach().to("cpu", copy=True)) for p in unique]


def restore_base_weights(saved: SavedWeights) -> None:
    """Put back what :func:`save_base_weights` copied (same parameter objects: ties stay)."""
    with torch.no_grad():
        for param, values in saved:
            param.data = values.to(param.device)


def unload_adapters(peft_model, saved: SavedWeights = ()) -> Any:
    """Remove every adapter and hand back the base model exactly as it was before
    ``get_peft_model``, with the base weights ``saved`` before it (:func:`save_base_weights`: an
    initialisation like PiSSA rewrote them) put back.

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
    model = peft_model.unload()
    restore_base_weights(list(saved))
    return model
