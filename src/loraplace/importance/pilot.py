"""The ``pilot`` importance score: train LoRA briefly on every slot, then measure how much each
adapter's update adds to its module's output on held-out training batches (the signal of
LoRA-drop, Zhou et al. 2024, arXiv 2402.07721). Registered in
:data:`~loraplace.importance.scores.SCORES` when this module is imported (the package does).

The pilot. The scoring batches (the study's ``importance.batches``, drawn from the training split
only) are split in two: the first ``ceil(b / 2)`` train, the last ``floor(b / 2)`` are held out
(with a single batch, that batch does both, and a warning says so). PEFT LoRA of rank
:data:`PILOT_RANK` and scale ``alpha / r =`` :data:`PILOT_ALPHA` ``/`` :data:`PILOT_RANK` (no dropout,
PEFT's own init: ``B = 0``, Kaiming-uniform ``A`` drawn from :data:`PILOT_SEED` in a forked RNG, so the
caller's random state is untouched) wraps every slot (the modules of ``full``,
:func:`~loraplace.placement.resolve.slot_placement`) and trains for :data:`PILOT_STEPS` AdamW steps
(lr :data:`PILOT_LR`, no weight decay, betas (0.9, 0.999), eps 1e-8, constant rate), one training
batch per step in turn, on the batch's token-mean task loss. Then, on every held-out batch, a
forward hook on each adapter's ``lora_B`` reads ``y = scale * B A x`` at every real (non-padding)
token (the positions :func:`~loraplace.importance.scores._token_masks` gives the activation score),
and the slot's pilot energy is ``E_s = (1 / T_s) sum_t ||y_t||^2``, the mean squared norm of its
update's output (LoRA-drop's importance, before its normalisation over slots, which the allocator's
comparison makes unnecessary). The adapters are then removed
(:func:`~loraplace.adapters.unload_adapters`): the base model, shared with the runs that follow,
comes back bit-identical (only adapter parameters are ever given to the optimizer).

The curve. ``curve[k-1] = E_s * H_k / H_R``, ``H_k = sum_{i<=k} 1/i``, ``R = PILOT_RANK``: the
measured energy at the pilot rank, times a shared concave shape in k elsewhere (nondecreasing,
concave, zero only for a slot whose update never reaches its output). Why this and not the pilot
update's own spectrum (the singular values of ``Delta W X`` over held-out tokens, ``curve[k-1] =
sum_{i<=k} sigma_i^2``):

* that spectrum predicts nothing beyond the pilot rank (a curve of ``max_rank`` values would be
  flat after R, and the allocator would spend the rest of the budget on ties), and within R it
  measures the random init more than the task: after a few steps from ``B = 0`` ``A`` has barely
  moved (its gradient is proportional to ``B``), so ``Delta W``'s row space is ``A``'s random one;
* the pilot measures one number per slot, how much the update moves its output; the shape in k is
  an assumption, stated as one. ``H_k`` is the diminishing-returns prior the ``weight`` score and
  the ``random`` arms use (:func:`~loraplace.placement.allocate.random_curves`), so an
  ``auto[score=pilot]`` arm differs from a random one only by the measured factor. With it the
  greedy allocator's marginal gain per parameter of slot s at rank k is
  ``E_s / (H_R k (in + out))``: ranks come out roughly in proportion to ``E_s / (in + out)``, the
  measured output energy per adapter parameter.

Limitations (this is a research probe): the shape is assumed, not measured (a rank-resolved curve
would need pilots at several ranks, each costing as much again); :data:`PILOT_STEPS` steps at
:data:`PILOT_LR` stay in Adam's first, sign-like steps (each ``B`` entry moves by about the learning
rate per step), so ``E_s`` mostly reads the slot's output width, its input energy seen through a random
``A``, and how consistently the gradient's signs persist over the steps: closer to the ``adam`` and
``activation`` scores than to the outcome of a full training run (on SmolLM2-135M, 90% of the summed
energy falls on the ``mlp.down`` slots, 60% on layer 11's alone, whose input carries the model's
outlier activations: ``E`` reads input scale as much as usefulness), and while the pilot moves the
model only a little, ``E_s`` scales as ``lr^2`` on every slot alike, so the allocation hardly depends
on the learning rate; LoRA-drop trains its pilot on a sizable share of the data. The scoring call does
not receive the study's settings, so the pilot's rate is :data:`PILOT_LR` (the default ``train.lr``),
not a study's own or tuned rate. Slots train jointly: one slot's energy depends on the others'
adapters (v's adapter changes o's input). One seed of ``A``; eval mode (no dropout in the base
model); the model's own precision, without the runs' autocast.

Cost, with ``b`` scoring batches: :data:`PILOT_STEPS` forward and backward passes (each like a LoRA
training step on every slot) plus ``floor(b / 2)`` forward passes without gradients (one when
``b = 1``): 8 x (forward + backward) + 4 forwards with the defaults, about 28 forward-equivalents
against the gradient score's 24 (backward ~ 2 forwards). Memory: LoRA training on every slot
(activations kept for backward) plus rank-R adapters, gradients and AdamW state on every slot,
``4 R (in + out)`` floats per slot. Both counts are recorded in the result (``forward_passes``,
``backward_passes``).
"""

from __future__ import annotations

import warnings as _warnings
from dataclasses import replace
from typing import Any

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from loraplace.adapters import lora_config_for, unload_adapters
from loraplace.config import LoraSettings
from loraplace.errors import LoraplaceError
from loraplace.importance.scores import SCORES, Score, _token_masks, _warn_unseen, token_rows
from loraplace.placement.resolve import slot_placement

PILOT_RANK = 4
"""Rank of the pilot adapters. Small: the pilot measures how much each slot's update moves its
output, not how many directions it needs (see the module docstring), and a few steps from
``B = 0`` leave ``A`` near its random init, so a larger rank adds random directions, not
information; 4 is the smallest rank commonly trained, and the adapters' optimizer state stays
negligible (``4 R (in + out)`` floats per slot)."""

PILOT_ALPHA = 8.0
"""LoRA alpha of the pilot adapters: scale ``alpha / r = 2``, the ratio of the study defaults
(``lora.alpha = 32``, ``lora.r = 16``). The same on every slot."""

PILOT_STEPS = 8
"""AdamW steps of the pilot: with the default 8 scoring batches, two passes over the 4 training
batches; the pilot then costs about as much as the gradient score (module docstring), the budget a
score before the study's training should keep to."""

PILOT_LR = 2e-4
"""The pilot's learning rate: the default ``train.lr`` of a study (:class:`loraplace.config.TrainSettings`).
The scoring call (:func:`~loraplace.importance.scores.score_slots`, as a study calls it) does not
receive the study's settings, so a study's own rate is not used."""

PILOT_SEED = 0
"""Seed of the pilot adapters' init (in a forked RNG: the caller's random state is left alone)."""

ADAPTER = "default"


def split_batches(batches: list) -> tuple[list, list]:
    """``(training, held-out)`` batches of the pilot: the first ``ceil(b / 2)`` and the last
    ``floor(b / 2)``; a single batch is both."""
    held = len(batches) // 2
    if held == 0:
        return list(batches), list(batches)
    return list(batches[:len(batches) - held]), list(batches[len(batches) - held:])


def pilot_curve(energy: float, max_rank: int, pilot_rank: int = PILOT_RANK) -> list[float]:
    """``curve[k-1] = energy * H_k / H_R`` for k = 1..max_rank (``H_k = sum_{i<=k} 1/i``, ``R`` the
    pilot rank): the measured energy at the pilot rank, a shared concave shape elsewhere."""
    harmonic = torch.cumsum(1.0 / torch.arange(1, max(max_rank, pilot_rank) + 1, dtype=torch.float64), 0)
    return (float(energy) * harmonic[:max_rank] / harmonic[pilot_rank - 1]).tolist()


def pilot_energies(model, slots, batches: list, nll_fn, warnings: list[str], *, rank: int = PILOT_RANK,
                   alpha: float = PILOT_ALPHA, steps: int = PILOT_STEPS, lr: float = PILOT_LR,
                   seed: int = PILOT_SEED) -> tuple[dict[str, float], dict[str, Any]]:
    """Train the pilot and measure each slot's ``E_s`` (module docstring); the model comes back as it was.

    Args:
        model: the base model, frozen and in eval mode (:func:`~loraplace.importance.scores.score_slots`
            sees to it).
        slots: the scored slots (:func:`~loraplace.importance.scores.scored_slots`).
        batches: the scoring batches, on the model's device (split by :func:`split_batches`).
        nll_fn: the task's loss ``(model, batch) -> (nll_sum (B,), n_tokens (B,)[, ...])``.
        warnings: appended to.

    Returns:
        ``(E_s by slot name, cost)``: cost holds ``forward_passes``, ``backward_passes``,
        ``steps`` (optimizer steps taken), ``tokens`` (target tokens of every forward) and
        ``batches`` (distinct batches read).

    Raises:
        LoraplaceError: no batch, bad settings, or a loss the adapters cannot reach.
    """
    if not batches:
        raise LoraplaceError("the pilot score needs at least one batch of training data")
    if rank < 1 or steps < 1 or not lr > 0:
        raise LoraplaceError(f"pilot rank {rank} and steps {steps} must be at least 1, lr {lr} above 0")
    train, held_out = split_batches(batches)
    if len(batches) == 1:
        warnings.append("the pilot trained and measured on the same single batch (score with 2 or more "
                        "batches to measure on held-out ones)")
    names = {s.name for s in slots}
    slot_set = slot_placement(model)
    placement = replace(slot_set, strategy="pilot", modules=[replace(m, r=rank, alpha=alpha, scale_r=None)
                                                             for m in slot_set.modules if m.name in names])
    config = lora_config_for(placement, LoraSettings(r=rank, alpha=alpha, dropout=0.0), task_type=None)
    with torch.random.fork_rng(devices=[]), _warnings.catch_warnings():
        _warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys", category=RuntimeWarning)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    cost = {"forward_passes": 0, "backward_passes": 0, "steps": 0, "tokens": 0,
            "batches": len({id(b) for b in train} | {id(b) for b in held_out})}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    try:
        layers = {s.name: model.get_submodule(s.name) for s in slots}
        missing = [n for n, layer in layers.items() if not isinstance(layer, LoraLayer) or ADAPTER not in layer.r]
        if missing:
            raise LoraplaceError(f"PEFT did not wrap {len(missing)} slots for the pilot: {', '.join(missing[:5])}")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        skipped = 0
        for step in range(steps):
            batch = train[step % len(train)]
            with torch.enable_grad():
                nll_sum, n_tokens, *_ = nll_fn(model, batch)
                cost["forward_passes"] += 1
                count = int(n_tokens.sum())
                if count == 0:
                    skipped += 1
                    continue
                loss = nll_sum.sum() / count
                if not loss.requires_grad:
                    raise LoraplaceError("the task's loss does not reach the pilot adapters")
                loss.backward()
            cost["backward_passes"] += 1
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            cost["steps"] += 1
            cost["tokens"] += count
        if skipped:
            warnings.append(f"{skipped} of the pilot's {steps} training steps had no target token and took no step")
        del optimizer, params

        masks: dict[str, torch.Tensor | None] = {}
        unmasked: set[str] = set()

        def hook(name: str, scale: float):
            def read(module, args, output) -> None:
                y = output.detach().float() * scale
                rows = token_rows(name, y, masks.get(name), unmasked, warnings, "output", "pilot energy")
                energy = rows.double().pow(2).sum()
                sums[name] = sums[name] + energy if name in sums else energy
                counts[name] = counts.get(name, 0) + rows.shape[0]
            return read

        handles = [layer.lora_B[ADAPTER].register_forward_hook(hook(name, float(layer.scaling[ADAPTER])))
                   for name, layer in layers.items()]
        with torch.no_grad():
            for batch in held_out:
                masks = _token_masks(model, slots, batch)
                _, n_tokens, *_ = nll_fn(model, batch)
                cost["forward_passes"] += 1
                cost["tokens"] += int(n_tokens.sum())
    finally:
        for h in handles:
            h.remove()
        unload_adapters(peft_model)
    energies = {s.name: float(sums[s.name]) / counts[s.name] if counts.get(s.name) else 0.0 for s in slots}
    _warn_unseen(slots, {n for n, c in counts.items() if c > 0}, warnings)
    return energies, cost


def _pilot_curves(model, slots, modules, batches, max_rank, nll_fn, sketch, warnings):
    """``curve[k-1] = E_s * H_k / H_R`` (:func:`pilot_curve` of :func:`pilot_energies`)."""
    energies, cost = pilot_energies(model, slots, batches, nll_fn, warnings)
    curves = {name: pilot_curve(energy, max_rank) for name, energy in energies.items()}
    return (curves, {s.name: "exact" for s in slots}, cost["tokens"], cost["batches"],
            (cost["forward_passes"], cost["backward_passes"]))


PILOT_SCORE = Score(
    "pilot", f"curve[k-1] = E * H_k / H_{PILOT_RANK}, E the mean squared norm of scale * B A x over held-out "
             f"non-padding tokens after a pilot of rank-{PILOT_RANK} LoRA on every slot trained {PILOT_STEPS} "
             f"AdamW steps at lr {PILOT_LR:g} (LoRA-drop's signal), H_k the k-th harmonic number: a measured "
             "energy times an assumed concave shape in k.", True, _pilot_curves)
SCORES.register(PILOT_SCORE.name, PILOT_SCORE)
