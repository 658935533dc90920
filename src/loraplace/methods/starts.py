"""Data-driven initialisations that start the adapter at a part of the weight's update (``init=lora_ga``,
``init=corda``): PEFT's own preprocessing and initialiser, run once per study, stored as each module's
starting ``(A0, B0)``, and applied in every run as PEFT applies them.

* ``lora_ga``: LoRA-GA (Wang et al., 2024, arXiv:2407.05000; PEFT ``init_lora_weights="lora_ga"``). The
  gradient of the loss with respect to each adapted weight, averaged over the scoring batches
  (:func:`peft.tuners.lora.loraga.preprocess_loraga`), is decomposed by a randomized SVD; A takes its
  top ``r`` right-singular vectors, B the next ``r`` left-singular vectors times their singular values
  (PEFT's ``ArB2r`` direction, ``stable`` scale ``out^(1/4) / sqrt(16)``), so that the first step of
  LoRA approximates the first step of full fine-tuning.
* ``corda``: CorDA's instruction-previewed mode (Yang et al., 2024, arXiv:2406.05223; PEFT
  ``init_lora_weights="corda"`` with ``corda_method="ipm"``). The SVD of each weight times the
  covariance of its inputs on the scoring batches' examples (one forward pass each, all real tokens) (:func:`peft.tuners.lora.corda.preprocess_corda`);
  A and B take the top ``r`` components.

Both replace the base weight ``W`` by ``W - s B0 A0`` (``s`` the module's alpha / r under the study's
update-scale rule), so the model starts where the base model is. A run saves those weights and puts
them back bit for bit (:data:`loraplace.adapters.REWRITES_BASE`).

Why compute once and store ``(A0, B0)`` instead of calling PEFT in every run: the preprocessing reads
data (one gradient or covariance pass over the scoring batches), LoRA-GA's randomized SVD draws from
torch's random state, and the study's rule is that every seed and resume of an arm trains the same
data-driven start (as EVA's).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import CordaConfig, LoraGAConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.loraga import preprocess_loraga
from peft.utils.other import transpose
from torch import nn

from loraplace.adapters import lora_config_for, save_base_weights, unload_adapters
from loraplace.config import LoraSettings
from loraplace.errors import LoraplaceError
from loraplace.methods.base import INITIALISERS, Initialiser
from loraplace.placement.resolve import Placement

START_SEED = 0
"""The torch seed of the one computation of a start (LoRA-GA's randomized SVD), whatever the study's seeds."""
A_KEY, B_KEY = "{}::A", "{}::B"
"""How a module's starting A and B are keyed in the stored state (safetensors names)."""


def _lora_layers(peft_model, adapter: str = "default") -> dict[str, Any]:
    return {name: m for name, m in peft_model.get_base_model().named_modules()
            if isinstance(m, LoraLayer) and adapter in getattr(m, "lora_A", {})}


def _check_linear(placement: Placement, init: str) -> None:
    if placement.parameter_names:
        raise LoraplaceError(f"init={init} on {placement.strategy!r}: PEFT's initialiser handles linear modules only, "
                             "not mixture-of-experts parameters; leave the experts out")


def _start_config(placement: Placement, task_type: str, init: str, **subconfig: Any) -> LoraConfig:
    """The placement's ``LoraConfig`` with PEFT's ``init`` and its sub-configuration (``lora_ga_config``,
    ``corda_config``); dropout plays no part in an initialisation."""
    config = lora_config_for(placement, LoraSettings(dropout=0.0), task_type=task_type)
    config.init_lora_weights = init
    for name, value in subconfig.items():
        setattr(config, name, value)
    return config


PREPROCESS_FIELDS = ("_peft_loraga_grad", "eigens", "covariance_matrix", "sample_count", "corda_method")
"""What PEFT's LoRA-GA and CorDA preprocessing attach to a module for the initialiser to read."""


def _attached(module: nn.Module) -> list[torch.Tensor]:
    eigens = getattr(module, "eigens", None)
    grad = getattr(module, "_peft_loraga_grad", None)
    found = [grad] if grad is not None else []
    return found + ([eigens.S_WC, eigens.U_WC, eigens.V_WC] if eigens is not None else [])


def _peft_start(model: nn.Module, placement: Placement, config: LoraConfig, init: str,
                preprocess: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Run PEFT's preprocessing and initialiser on ``model`` once, read each wrapped module's ``(A, B)``,
    and hand the model back as it was (the rewritten base weights restored bit for bit).

    Raises:
        LoraplaceError: expert parameters, or preprocessing that gives a non-finite value for a
            module (a NaN loss or gradient on the scoring batches); nothing is left attached.
    """
    _check_linear(placement, init)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        return _wrapped_start(model, placement, config, init, preprocess)
    finally:  # PEFT's preprocessing and wrapping change which parameters require grad
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])


def _wrapped_start(model: nn.Module, placement: Placement, config: LoraConfig, init: str,
                   preprocess: Callable[[], None]) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(START_SEED)
        preprocess()
        bad = [name for name in placement.module_names
               if not all(torch.isfinite(t).all() for t in _attached(model.get_submodule(name)))]
        if bad:
            for module in model.modules():
                for field in PREPROCESS_FIELDS:
                    module.__dict__.pop(field, None)
            raise LoraplaceError(f"init={init} on {placement.strategy!r}: PEFT's preprocessing gave non-finite values "
                                 f"for {len(bad)} module(s), e.g. {bad[0]} (a NaN loss or input on the scoring "
                                 "batches?); use another init or check the data")
        saved = save_base_weights(model, placement, init)
        peft_model = get_peft_model(model, config)
    try:
        return {key.format(name): getattr(layer, which)["default"].weight.detach().float().cpu().clone()
                for name, layer in _lora_layers(peft_model).items()
                for key, which in ((A_KEY, "lora_A"), (B_KEY, "lora_B"))}
    finally:
        unload_adapters(peft_model, saved)


def real_rows(batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Each example of the batches alone, its padding removed, as a ``(1, tokens)`` batch: PEFT's CorDA
    hook reads one example per forward pass (as CorDA's own calibration does)."""
    rows = []
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            rows.append(ids[mask.bool()][None])
    return rows


def lora_ga_state(model: nn.Module, placement: Placement, batches: list[dict[str, torch.Tensor]],
                  task_type: str = "CAUSAL_LM", shared: dict | None = None) -> dict[str, torch.Tensor]:
    """``init=lora_ga``: each module's starting ``(A0, B0)`` from PEFT's LoRA-GA, the gradient averaged
    over the scoring batches, which are on the model's device as the study puts them (one forward and
    backward pass each, the loss the batches' labels give: the study's ``loss_on``)."""
    config = _start_config(placement, task_type, "lora_ga", lora_ga_config=LoraGAConfig())

    def train_step() -> None:
        with warnings.catch_warnings():  # PEFT counts backward passes with a full backward hook on frozen inputs
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            for batch in batches:
                model(**batch).loss.backward()

    return _peft_start(model, placement, config, "lora_ga", lambda: preprocess_loraga(model, config, train_step))


def corda_state(model: nn.Module, placement: Placement, batches: list[dict[str, torch.Tensor]],
                task_type: str = "CAUSAL_LM", shared: dict | None = None) -> dict[str, torch.Tensor]:
    """``init=corda``: each module's starting ``(A0, B0)`` from PEFT's CorDA (instruction-previewed), the
    input covariances from one forward pass per scoring batch."""
    config = _start_config(placement, task_type, "corda",
                           corda_config=CordaConfig(corda_method="ipm", verbose=False))

    @torch.no_grad()
    def run_model() -> None:
        for row in real_rows(batches):
            model(input_ids=row)

    return _peft_start(model, placement, config, "corda", lambda: preprocess_corda(model, config, run_model=run_model))


@torch.no_grad()
def apply_start(peft_model, state: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """Set each wrapped module's A and B to its stored start and its base weight to ``W - s B0 A0``,
    computed as PEFT's LoRA-GA and CorDA initialisers compute it (in float32, cast back to the weight's
    dtype; transposed for a GPT-2 ``Conv1D``). The run saved those base weights before wrapping.

    Raises:
        LoraplaceError: the state covers other modules than were wrapped, or a shape differs.
    """
    layers = _lora_layers(peft_model, adapter)
    names = {k.rsplit("::", 1)[0] for k in state}
    if names != set(layers):
        raise LoraplaceError(f"the stored start covers other modules than were wrapped: missing "
                             f"{sorted(set(layers) - names)[:5]}, unexpected {sorted(names - set(layers))[:5]}")
    for name, layer in layers.items():
        a, b = state[A_KEY.format(name)], state[B_KEY.format(name)]
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if a.shape != lora_a.shape or b.shape != lora_b.shape:
            raise LoraplaceError(f"the stored start of {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; the wrapped "
                                 f"module has A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} (delete the arm's "
                                 "files in allocations/ to recompute them)")
        lora_a.copy_(a.to(lora_a))
        lora_b.copy_(b.to(lora_b))
        weight = layer.get_base_layer().weight
        delta = layer.scaling[adapter] * (lora_b.float() @ lora_a.float())
        delta = transpose(delta, layer.fan_in_fan_out)
        weight.data = (weight.data.float() - delta.to(weight.device)).to(weight.dtype)


INITIALISERS.register("lora_ga", Initialiser("lora_ga", lora_ga_state, apply_start))
INITIALISERS.register("corda", Initialiser("corda", corda_state, apply_start))
