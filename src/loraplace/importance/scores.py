"""Importance scores of the slots a LoRA adapter can go on: for every slot (a linear module of the
``full`` strategy) a curve over rank, ``curve[k-1]`` = the predicted gain of a rank-k adapter
there, k = 1..max_rank. Four scores, from most to least informed:

* ``gradient``: the loss gradient ``G = dL/dW (out x in)`` of each frozen slot weight, averaged over
  a few batches of the task's training data (``L`` = the task's token-mean loss of a batch,
  :attr:`loraplace.run.tasks.Task.nll`). The best rank-k update ``Delta W`` of unit Frobenius norm
  lowers the loss to first order by ``sqrt(sum_{i<=k} sigma_i(G)^2)``; the curve is that energy,
  ``curve[k-1] = sum_{i<=k} sigma_i(G)^2`` (nondecreasing and concave, since the sigma_i descend).
  No weight gradient (``.grad``) is formed: each slot's input ``x (tokens, in)`` is caught by a
  forward hook and its output gradient ``dy (tokens, out)`` by a hook on the output tensor, and
  ``G = sum dy^T x`` is fed to a :class:`~loraplace.importance.spectrum.SpectrumAccumulator`
  (for GPT-2's ``Conv1D``, whose weight is stored ``in x out``, ``G`` is its gradient transposed:
  the same singular values). No parameter needs ``requires_grad``: the input embeddings' output
  is made to require it.
* ``adam``: the same ``G`` from the same pass, read for a normalised (Adam-like) step instead of a
  gradient-descent one: ``curve[k-1] = sqrt(out) * sum_{i<=k} sigma_i(G)``, the first-order loss
  decrease of the best rank-k update whose every direction moves by at most
  ``c ~ sqrt(out)`` (spectral norm, ``max <G, D>`` over ``||D||_2 <= c``, ``rank D <= k``): what
  Adam's first, sign-like step on a LoRA adapter's ``B`` (``out`` entries each moved by ``eta``)
  gains when ``A`` spans ``G``'s top-k right singular vectors. Linear in the gradient's scale, not
  quadratic. Derivation, the per-slot bound and the L1 alternative: :func:`adam_curve`.
* ``activation`` (the spirit of EVA, Paischer et al. 2024): the covariance of the slot's input
  over non-padding tokens, ``C = (1/T) sum x x^T (in x in)``; ``curve[k-1]`` = the sum of its k
  largest eigenvalues, the input energy a rank-k adapter's ``A`` can capture. Forward passes only.
  Modules that read the same input tensor (q/k/v, gate/up) share one accumulator and one curve.
* ``weight`` (the spirit of AlphaLoRA, Qing et al. 2024; data-free): the heavy-tail exponent
  ``alpha`` of the eigenvalues of ``W^T W`` (:func:`hill_alpha`; a higher alpha means a less
  well-trained layer, which is given more rank), and ``curve[k-1] = alpha * (in + out) * H_k``
  with ``H_k = sum_{i<=k} 1/i``: a prior with diminishing returns whose gain per adapter
  parameter, ``alpha * H_k / k``, compares slots of any shape. It is a prior, not a measurement.

A fifth, ``pilot`` (:mod:`loraplace.importance.pilot`, registered here when the package is
imported), trains rank-4 LoRA on every slot for a few steps and reads the energy of each update's
output on held-out batches (LoRA-drop's signal), times an assumed concave shape in k.

Cost, for a model whose slots hold ``P`` weights, ``b`` batches of ``T`` tokens, ``R = max_rank``
and sketch sizes ``k = 2R + 1``, ``l = 2k + 1``:

* gradient and adam (the same pass, read two ways; a study using both runs it twice): one forward
  and backward per batch (about ``6 T P`` flops, like a training step but without optimizer state or
  weight gradients); activation memory like LoRA on every slot (each
  slot's input is held until its output gradient arrives); per ``m x n`` slot an accumulator of
  ``m * n`` floats (exact: when every slot has at most
  :data:`~loraplace.importance.spectrum.EXACT_MAX_FLOATS` entries or would not shrink as a sketch)
  or ``max(m, n) k + l min(m, n)`` floats (sketch: every slot, as soon as one must be; one
  estimator per score, :func:`~loraplace.importance.spectrum.score_mode`), far fewer than ``P``
  floats in all for a large model; updates cost ``T m n`` (exact) or
  ``T (k + l)(m + n)`` (sketch) multiply-adds per slot and batch.
* activation: one forward per batch without gradients (about ``2 T P`` flops); per distinct input
  of width ``n`` an accumulator of ``n^2`` (exact) or ``n (k + l)`` (sketch) floats.
* weight: no data; per slot the Gram matrix of its shorter side (``min(m, n)^2`` floats) and its
  eigenvalues, ``min^2 max + min^3`` flops: seconds for a 7B model on a GPU.

Scoring leaves the model exactly as it was: hooks removed, ``requires_grad`` flags and train/eval
modes restored, no weight or ``.grad`` written (the pilot's adapters are removed again). It runs in
eval mode (no dropout), in float32 inside the hooks.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel, set_seed

from loraplace.data import IGNORE_INDEX
from loraplace.errors import LoraplaceError
from loraplace.importance.spectrum import SKETCH_MODES, SpectrumAccumulator, score_mode, sketch_sizes
from loraplace.placement.arms import REFERENCE_STRATEGY
from loraplace.placement.resolve import module_slots, resolve_placement
from loraplace.placement.strategies import parse_strategy
from loraplace.registry import Registry
from loraplace.run.device import pick_device
from loraplace.run.evaluation import check_selective_loss, token_nll
from loraplace.run.measure import PeakMemory
from loraplace.run.models import load_config, load_model, load_tokenizer, resolve_model_path
from loraplace.run.tasks import get_task, task_of

FORMAT = "loraplace-importance/1"
ALPHA_CAP = 100.0
"""Hill exponent given to a weight whose eigenvalues have no tail to measure (a flat top half)."""



@dataclass(frozen=True)
class SlotScore:
    """One slot's score curve.

    Attributes:
        name, role, stack, layer, in_features, out_features: as in
            :class:`loraplace.placement.resolve.AdaptedModule`.
        curve: ``curve[k-1]`` = predicted gain of a rank-k adapter, k = 1..max_rank.
        approximation: ``exact`` or ``sketch (k=.., l=..)``: how the slot's spectrum was read.
    """

    name: str
    role: str
    stack: str | None
    layer: int | None
    in_features: int
    out_features: int
    curve: tuple[float, ...]
    approximation: str = "exact"

    @property
    def size(self) -> int:
        """Adapter parameters per unit of rank: ``in + out``."""
        return self.in_features + self.out_features

    def gain(self, r: int) -> float:
        """Predicted gain of a rank-``r`` adapter: 0 at r = 0, ``curve[r-1]`` up to max_rank.

        Raises:
            ValueError: ``r`` below 0 or above the scored max_rank (nothing was measured there:
                score again with a larger max_rank).
        """
        if not 0 <= r <= len(self.curve):
            raise ValueError(f"rank {r} is outside the scored range 0..{len(self.curve)} of {self.name}; "
                             "score with a larger max_rank")
        return 0.0 if r == 0 else self.curve[r - 1]

    def gain_per_param(self, r: int) -> float:
        """``gain(r) / (r * (in + out))``: gain per adapter parameter at rank ``r`` >= 1."""
        return self.gain(r) / (r * self.size)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "stack": self.stack, "layer": self.layer,
                "in_features": self.in_features, "out_features": self.out_features, "curve": list(self.curve),
                "approximation": self.approximation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SlotScore":
        return cls(name=data["name"], role=data["role"], stack=data.get("stack"), layer=data.get("layer"),
                   in_features=int(data["in_features"]), out_features=int(data["out_features"]),
                   curve=tuple(float(x) for x in data["curve"]), approximation=data.get("approximation", "exact"))


@dataclass
class ImportanceResult:
    """The curves of one score over a model's slots, and what they cost.

    Attributes:
        score: a registered score's name (:data:`SCORES`).
        max_rank: length of every curve.
        slots: one per scored slot, in model order.
        tokens: target tokens of the task's loss seen while scoring (0 for ``weight``).
        batches, batch_size: batches used and rows of the first one (0 for ``weight``).
        seconds: wall time of the scoring (``time.perf_counter``).
        forward_passes, backward_passes: model forward and backward passes the scoring ran (None in a
            file written before they were recorded); with ``batches`` and ``tokens``, its cost.
        peak_memory_mib, memory_kind: peak memory while scoring (:class:`loraplace.run.measure.PeakMemory`:
            process RSS on CPU, allocated tensors on CUDA), with the model loaded.
        method: one sentence: what the curve is.
        approximation: ``exact`` or ``sketch (k=.., l=..)``: the one estimator of every slot's
            spectrum (:func:`~loraplace.importance.spectrum.score_mode`: with ``auto``, every slot
            is sketched alike as soon as one must be, so that curves compare like with like).
        model, dataset: what was scored (dataset None for ``weight``).
        warnings: things to read: slots left out (mixture-of-experts parameters), slots never run.
    """

    score: str
    max_rank: int
    slots: list[SlotScore]
    tokens: int
    batches: int
    batch_size: int
    seconds: float
    peak_memory_mib: float | None
    memory_kind: str | None
    method: str
    approximation: str
    model: str = ""
    dataset: str | None = None
    warnings: list[str] = field(default_factory=list)
    forward_passes: int | None = None
    backward_passes: int | None = None

    def total_gain(self, r: int) -> float:
        """Sum over slots of ``gain(r)``: the gain of a uniform rank-``r`` placement on every slot."""
        return sum(s.gain(r) for s in self.slots)

    def to_dict(self) -> dict[str, Any]:
        """The ``loraplace-importance/1`` JSON document."""
        return {
            "format": FORMAT, "score": self.score, "model": self.model, "dataset": self.dataset,
            "max_rank": self.max_rank, "batches": self.batches, "batch_size": self.batch_size,
            "tokens": self.tokens, "seconds": self.seconds, "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes, "peak_memory_mib": self.peak_memory_mib,
            "memory_kind": self.memory_kind, "method": self.method, "approximation": self.approximation,
            "warnings": list(self.warnings), "slots": [s.to_dict() for s in self.slots],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImportanceResult":
        """Read a ``loraplace-importance/1`` document.

        Raises:
            LoraplaceError: another format, or a curve whose length is not max_rank.
        """
        if data.get("format") != FORMAT:
            raise LoraplaceError(f"not an importance file: format {data.get('format')!r}, expected {FORMAT!r}")
        slots = [SlotScore.from_dict(s) for s in data["slots"]]
        max_rank = int(data["max_rank"])
        bad = [s.name for s in slots if len(s.curve) != max_rank]
        if bad:
            raise LoraplaceError(f"importance file: the curves of {', '.join(bad[:3])} do not have max_rank = "
                                 f"{max_rank} values")
        return cls(score=data["score"], max_rank=max_rank, slots=slots, tokens=int(data["tokens"]),
                   batches=int(data["batches"]), batch_size=int(data["batch_size"]), seconds=float(data["seconds"]),
                   peak_memory_mib=data.get("peak_memory_mib"), memory_kind=data.get("memory_kind"),
                   method=data["method"], approximation=data["approximation"], model=data.get("model", ""),
                   dataset=data.get("dataset"), warnings=list(data.get("warnings", [])),
                   forward_passes=data.get("forward_passes"), backward_passes=data.get("backward_passes"))

    @classmethod
    def load(cls, path: str | Path) -> "ImportanceResult":
        """Read an importance JSON file.

        Raises:
            LoraplaceError: the file is missing, not JSON, or not an importance file; names it.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LoraplaceError(f"could not read importance file {path}: {e}") from None
        try:
            return cls.from_dict(data)
        except LoraplaceError as e:
            raise LoraplaceError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------- slots
def scored_slots(model: nn.Module) -> tuple[list, list, list[str]]:
    """The slots a score covers: the ``full`` strategy's modules
    (:class:`~loraplace.placement.resolve.AdaptedModule`) except mixture-of-experts parameters.

    Returns:
        ``(slots, left_out, warnings)``: the scored modules, the expert parameters left out (a
        score reads one linear map per slot), and the resolution's warnings (inferred roles).
    """
    placement = resolve_placement(model, parse_strategy(REFERENCE_STRATEGY), 1, 1.0)
    return module_slots(placement), [m for m in placement.modules if m.is_parameter], list(placement.warnings)


def _first_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _combined_approximation(labels: list[str]) -> str:
    kinds = sorted(set(labels))
    if len(kinds) == 1:
        return kinds[0]
    sketched = [a for a in labels if a != "exact"]
    return f"{sketched[0]} for {len(sketched)} of {len(labels)} slots, exact for the others"


# ----------------------------------------------------------------------------------- scoring
class _Measured(NamedTuple):
    """One scoring pass: what its measure returned, what it cost, and the warnings it raised."""

    state: dict
    approximations: dict
    tokens: int
    used: int
    passes: tuple
    seconds: float
    peak_mib: float | None
    memory_kind: str | None
    warnings: list


def score_slots(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]] | None, score: str, max_rank: int, *,
                nll_fn: Callable | None = None, device: torch.device | str | None = None, sketch: str = "auto",
                model_name: str | None = None, dataset: str | None = None,
                shared: dict[str, Any] | None = None) -> ImportanceResult:
    """Score every slot of ``model`` (see the module docstring for the scores).

    Args:
        model: a loaded transformers model (any head; base weights frozen or not). It is left
            exactly as it was.
        batches: collated batches of the task's training data (``input_ids``, ``attention_mask``,
            ``labels``, as :attr:`loraplace.run.tasks.Task.collator` makes them), on any device; unused
            (may be None) for ``weight``.
        score: a registered score's name (:data:`SCORES`: ``gradient``, ``adam``, ``activation``, ``weight``).
        max_rank: the length of every curve.
        nll_fn: the task's loss ``(model, batch) -> (nll_sum (B,), n_tokens (B,)[, ...])``
            (default :func:`loraplace.run.evaluation.token_nll`, the causal-LM loss).
        device: where batches go (default: the device of the model's first parameter).
        sketch: ``auto`` (every slot exact when each has at most
            :data:`~loraplace.importance.spectrum.EXACT_MAX_FLOATS` entries or would not shrink as
            a sketch; else every slot sketched alike: one estimator per score,
            :func:`~loraplace.importance.spectrum.score_mode`), ``exact`` or ``sketch``
            (:class:`~loraplace.importance.spectrum.SpectrumAccumulator`).
        model_name, dataset: recorded in the result (default: the model's ``name_or_path``;
            dataset None).
        shared: a dict the caller keeps across calls on the same model and batches: a score that
            reads a pass another score reads too (:attr:`Score.shared`: ``gradient`` and ``adam``
            read one gradient pass) stores the pass there, and the next such score reuses it (its
            result records the pass's cost and says it was shared). None: every call runs its own pass.

    Returns:
        An :class:`ImportanceResult` with one :class:`SlotScore` per slot in model order.

    Raises:
        LoraplaceError: unknown score, max_rank < 1, no batch for a data score, or a model
            whose loss does not reach the slots.
    """
    spec = get_score(score)
    if max_rank < 1:
        raise LoraplaceError(f"max_rank must be at least 1, got {max_rank}")
    if sketch not in SKETCH_MODES:
        raise LoraplaceError(f"unknown sketch mode {sketch!r}; use one of {', '.join(SKETCH_MODES)}")
    batches = list(batches or []) if spec.needs_data else []
    if spec.needs_data and not batches:
        raise LoraplaceError(f"the {score} score needs at least one batch of training data")
    slots, left_out, warnings = scored_slots(model)
    if left_out:
        warnings.append(f"{len(left_out)} mixture-of-experts parameters (e.g. {left_out[0].name}) are not scored: "
                        "a score reads one linear map per slot")
    modules = {s.name: model.get_submodule(s.name) for s in slots}
    device = torch.device(device) if device is not None else _first_device(model)
    key = (spec.shared.name, max_rank, sketch) if spec.shared is not None else None
    reused = shared is not None and key in shared
    if reused:
        pass_ = shared[key]  # type: ignore[index]
        warnings += pass_.warnings
    else:
        with PeakMemory(device) as memory, _frozen_eval(model):
            start = time.perf_counter()
            on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]
            measure = spec.shared.measure if spec.shared is not None else spec.curves
            state, approximations, tokens, used, passes = measure(model, slots, modules, on_device, max_rank,
                                                                  nll_fn or token_nll, sketch, warnings)
            seconds = time.perf_counter() - start
        pass_ = _Measured(state, approximations, tokens, used, passes, seconds, memory.peak_mib, memory.kind,
                          list(warnings))
        if shared is not None and key is not None:
            shared[key] = pass_
    state, approximations, tokens, used, passes, seconds = (pass_.state, pass_.approximations, pass_.tokens,
                                                            pass_.used, pass_.passes, pass_.seconds)
    curves = spec.curves(state, slots) if spec.shared is not None else state
    scored = [SlotScore(s.name, s.role, s.stack, s.layer, s.in_features, s.out_features,
                        tuple(float(x) for x in curves[s.name]), approximations[s.name]) for s in slots]
    method = spec.method
    if left_out:
        method += " Mixture-of-experts parameters are not scored."
    if reused:
        method += (f" Read the {spec.shared.name} pass another score of the same call ran (its cost, passes and "  # type: ignore[union-attr]
                   "memory are that pass's, not spent again).")
    return ImportanceResult(
        score=score, max_rank=max_rank, slots=scored, tokens=int(tokens), batches=used,
        batch_size=int(batches[0]["input_ids"].shape[0]) if batches else 0, seconds=seconds,
        peak_memory_mib=pass_.peak_mib, memory_kind=pass_.memory_kind, method=method,
        approximation=_combined_approximation([approximations[s.name] for s in slots]),
        model=model_name if model_name is not None else str(getattr(getattr(model, "config", None),
                                                                    "name_or_path", "") or ""),
        dataset=dataset if spec.needs_data else None, warnings=warnings,
        forward_passes=int(passes[0]), backward_passes=int(passes[1]),
    )


@contextlib.contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode and no ``requires_grad`` on any parameter inside the block; every module's mode
    and every parameter's flag restored on exit (each module's: a model may mix modes)."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _input_embeddings(model: nn.Module) -> list[nn.Module]:
    """Every distinct input embedding of the model and its sub-models (T5's encoder and decoder
    share one), as transformers' ``enable_input_require_grads`` finds them."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        if not (isinstance(module, PreTrainedModel) and hasattr(module, "get_input_embeddings")):
            continue
        try:
            embeddings = module.get_input_embeddings()
        except NotImplementedError:
            continue
        if isinstance(embeddings, nn.Module):
            found.setdefault(id(embeddings), embeddings)
    return list(found.values())


def _gradient_spectra(model, slots, modules, batches, max_rank, nll_fn, sketch, warnings):
    """The ``max_rank`` largest singular values (float64, descending) of ``G``, the batch-averaged loss
    gradient of each slot weight: one forward and backward per batch, the state of the gradient
    score (module docstring). Returns ``(sigmas by slot, estimator label by slot, target tokens, batches used,
    (forward passes, backward passes))``;
    the ``gradient`` and ``adam`` scores are two curves of these same values."""
    shared: dict = {}
    mode = score_mode([(s.out_features, s.in_features) for s in slots], max_rank, sketch)  # one for all slots
    accumulators = {
        s.name: SpectrumAccumulator(s.out_features, s.in_features, max_rank, mode=mode,
                                    device=modules[s.name].weight.device, test_matrices=shared)
        for s in slots
    }
    seen: set[str] = set()

    def forward_hook(name: str):
        def hook(module, args, output):
            if not args or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return  # an input passed by keyword, or an output the loss cannot reach: not scored
            x = args[0].detach()

            def on_output_grad(dy: torch.Tensor) -> None:
                # G = dy^T x (out x in): the weight gradient of nn.Linear, the transpose of Conv1D's.
                dy_rows, x_rows = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
                live = dy_rows.ne(0).any(dim=1)  # padding (and what follows the last target) adds nothing
                if not bool(live.all()):
                    dy_rows, x_rows = dy_rows[live], x_rows[live]
                accumulators[name].update(dy_rows.float(), x_rows.float())
                seen.add(name)

            output.register_hook(on_output_grad)
        return hook

    embeddings = _input_embeddings(model)
    if not embeddings:
        raise LoraplaceError(f"{type(model).__name__} exposes no input embeddings (get_input_embeddings): the "
                             "gradient and adam scores cannot reach its slots without weight gradients; use the "
                             "activation or weight score")

    def require_grad(module, args, output) -> None:
        output.requires_grad_(True)  # so that backward reaches the slots, with every parameter frozen

    handles = [e.register_forward_hook(require_grad) for e in embeddings]
    handles += [modules[s.name].register_forward_hook(forward_hook(s.name)) for s in slots]
    tokens, used, forwards = 0, 0, 0
    try:
        for b, batch in enumerate(batches):
            with torch.enable_grad():
                nll_sum, n_tokens, *_ = nll_fn(model, batch)
                forwards += 1
                count = int(n_tokens.sum())
                if count == 0:
                    warnings.append(f"batch {b} has no target token and was skipped")
                    continue
                loss = nll_sum.sum() / count
                if not loss.requires_grad:
                    raise LoraplaceError("the loss does not depend on the input embeddings' output, so its "
                                         "gradient cannot reach the slots; use the activation or weight score")
                loss.backward()
            tokens += count
            used += 1
    finally:
        for h in handles:
            h.remove()
    if used == 0:
        raise LoraplaceError("no batch had a target token: nothing to take the gradient of")
    sigmas = {s.name: accumulators[s.name].singular_values(max_rank) / used for s in slots}
    _warn_unseen(slots, seen, warnings)
    return sigmas, {s.name: accumulators[s.name].approximation for s in slots}, tokens, used, (forwards, used)


def energy_curve(sigma: torch.Tensor) -> list[float]:
    """The ``gradient`` score's curve from ``G``'s descending singular values:
    ``curve[k-1] = sum_{i<=k} sigma_i^2``."""
    return torch.cumsum(sigma.double() ** 2, 0).tolist()


def adam_curve(sigma: torch.Tensor, out_features: int) -> list[float]:
    """The ``adam`` score's curve from ``G``'s descending singular values:
    ``curve[k-1] = sqrt(out) * sum_{i<=k} sigma_i``: the first-order loss decrease of the best
    rank-k step whose every direction has a bounded size (spectral norm at most ``c``), with the
    per-slot bound ``c`` of Adam's first step on a LoRA adapter, in units of ``eta * rho * alpha / r``
    (the same on every slot, see below).

    The constraint. The ``gradient`` score bounds the Frobenius norm of the update: the k
    directions share one budget, each moves in proportion to its ``sigma_i`` (a gradient-descent
    step, ``D ~ G_k``), and the first-order gain is ``c sqrt(sum_{i<=k} sigma_i^2)`` (its square is
    that score's curve: quadratic in the gradient's scale). Adam divides
    each coordinate's step by the gradient's own size (its first step is exactly
    ``eta sign(g)``: bias-corrected ``m / sqrt(v) = g / |g|``), so a weak direction moves as far as
    a strong one. The rotation-invariant form of that normalisation bounds each direction:
    ``max <G, D>`` over ``rank D <= k``, ``||D||_2 <= c`` is ``c sum_{i<=k} sigma_i(G)`` (von
    Neumann's trace inequality; attained by ``D = c U_k V_k^T``, the top-k part of ``G``'s polar
    factor), a step whose size does not depend on the gradient's scale.

    Why it models LoRA under Adam. LoRA trains ``Delta W = (alpha / r) B A``, ``B (out x k)`` from
    zero and ``A (k x in)`` from an init whose rows have a norm ``rho`` that does not depend on the
    shape (PEFT's Kaiming-uniform entries of scale ``1/sqrt(in)``: ``rho = 1/sqrt(3)``). At the
    first step ``A``'s gradient ``(alpha / r) B^T G`` is zero and ``B`` moves by exactly
    ``-eta sign((alpha / r) G A^T)``; the loss falls to first order by
    ``(alpha / r) eta sum_i ||G a_i||_1`` (``a_i`` the rows of ``A``). For the adapter whose rows span
    ``G``'s top-k right singular vectors, one each (``a_i = rho v_i``: the best rank-k subspace the
    gradient score presumes too), that is ``(alpha / r) eta rho sum_{i<=k} sigma_i ||u_i||_1``, and
    with flat left singular vectors (``||u_i||_1 = sqrt(out)``, the largest value) exactly
    ``c sum_{i<=k} sigma_i`` with ``c = (alpha / r) eta rho sqrt(out)``: the step above (each column
    of ``B``, ``out`` entries each moved by ``eta``, has norm ``eta sqrt(out)``). An ``A`` that splits
    one direction over several rows gains up to ``sqrt(k)`` times more from the same direction (a
    larger step, not a more useful rank); the curve does not count that.

    The per-slot bound. ``eta``, ``rho`` and ``alpha / r`` are the same on every slot (an automatic
    arm keeps ``alpha_m / r_m = alpha / r``) and are dropped; ``sqrt(out)`` is kept, since Adam
    normalises per element and a longer ``B`` column moves further; the allocator's gain per
    parameter ``curve / (k (in + out))`` then compares slots in one unit of loss. Rejected: one
    ``c`` for every slot (a shape-blind spectral bound, as orthogonalised optimisers take), which
    ignores the per-element normalisation; ``eta sqrt(in * out)`` (the spectral norm of a sign
    matrix of ``Delta W``'s shape: Adam on the full weight), since LoRA's Adam normalises ``B`` and
    ``A``, not ``Delta W``, and ``A``'s rows keep their shape-free norm until they move (at second
    order in ``eta``). So the curve describes the start of training; later ``A`` moves by ``eta``
    per entry too and the input width enters.

    The L1 alternative. Adam without averaging (sign descent) is steepest descent under the
    max-entry norm (Bernstein & Newhouse 2024, "Old optimizer, new norm"), whose dual is the
    entrywise L1 norm: a sign step of the whole ``Delta W`` gains ``eta ||G||_1``, the same at every
    rank, and the best rank-k step with entries bounded by ``eta`` is NP-hard already at k = 1 (the
    ``inf -> 1`` norm). Both, like the exact ``sum ||u_i||_1`` factor above, need ``G`` or its
    singular vectors, which a sketched slot does not keep; the spectral form needs only the
    singular values the gradient score already reads. It overestimates the first step's gain by
    ``sqrt(out) / ||u_i||_1`` per direction: 1 for flat vectors, about ``sqrt(pi / 2)`` for
    Gaussian-like ones (then the same on every slot: the allocation does not change).

    Properties: nondecreasing and concave in k (the sigma_i descend); ``G -> t G`` scales it by
    ``t``, not ``t^2``: a slot with a large but concentrated gradient no longer outweighs one whose
    gain is spread over many directions.
    """
    return (math.sqrt(out_features) * torch.cumsum(sigma.double(), 0)).tolist()


def _gradient_curves(sigmas: dict[str, torch.Tensor], slots) -> dict[str, list[float]]:
    """``curve[k-1] = sum_{i<=k} sigma_i(G)^2`` (:func:`energy_curve`) from the gradient pass."""
    return {s.name: energy_curve(sigmas[s.name]) for s in slots}


def _adam_curves(sigmas: dict[str, torch.Tensor], slots) -> dict[str, list[float]]:
    """``curve[k-1] = sqrt(out) sum_{i<=k} sigma_i(G)`` (:func:`adam_curve`) from the gradient pass."""
    return {s.name: adam_curve(sigmas[s.name], s.out_features) for s in slots}


def _token_masks(model: nn.Module, slots, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Per slot, which positions of its input are real tokens: the attention mask for inputs of
    encoder or decoder-only positions; for encoder-decoder models, the decoder's positions
    (``labels != -100``: the decoder reads the labels shifted right) in decoder blocks, except
    cross-attention keys and values, which read the encoder's output."""
    mask = batch.get("attention_mask")
    enc = mask.bool() if mask is not None else None
    config = getattr(model, "config", None)
    labels = batch.get("labels")
    dec = (labels != IGNORE_INDEX) if getattr(config, "is_encoder_decoder", False) and labels is not None and \
        labels.dim() == 2 else None
    out = {}
    for s in slots:
        in_decoder = dec is not None and s.stack is not None and "decoder" in s.stack
        out[s.name] = dec if in_decoder and s.role not in ("xattn.k", "xattn.v") else enc
    return out


def token_rows(name: str, t: torch.Tensor, mask: torch.Tensor | None, unmasked: set[str], warnings: list[str],
               what: str, measure: str) -> torch.Tensor:
    """``t`` (``(..., features)``, a module's input or output) as rows, one per token the ``mask``
    selects; where no mask has ``t``'s token shape, every row, with one warning per module that its
    ``measure`` averages over padding too (``what``: input or output, for the warning)."""
    rows = t.reshape(-1, t.shape[-1])
    if mask is not None and tuple(mask.shape) == tuple(t.shape[:-1]):
        return rows[mask.reshape(-1)]
    if name not in unmasked:
        unmasked.add(name)
        warnings.append(f"{name}: {what} of shape {tuple(t.shape)} matches no token mask; its {measure} averages "
                        "over every position, padding included")
    return rows


def _activation_curves(model, slots, modules, batches, max_rank, nll_fn, sketch, warnings):
    """``curve[k-1]`` = sum of the k largest eigenvalues of each slot input's covariance over real tokens."""
    shared: dict = {}
    mode = score_mode([(s.in_features, s.in_features) for s in slots], max_rank, sketch)  # one for all slots
    accumulators: dict[str, SpectrumAccumulator] = {}
    leader: dict[str, str] = {}  # slot -> the slot whose accumulator holds its input (itself, or q for k and v)
    unmasked: set[str] = set()
    state: dict[str, Any] = {"x": None, "slot": None, "masks": {}}

    def pre_hook(name: str):
        def hook(module, args):
            if not args:
                return  # an input passed by keyword: not scored (its slot is reported as never run)
            x = args[0]
            if x is state["x"]:  # the same tensor as the previous slot's input: one covariance
                if leader.setdefault(name, leader[state["slot"]]) != leader[state["slot"]]:
                    raise RuntimeError(f"{name} shared its input with another module in an earlier batch")
                return
            if leader.setdefault(name, name) != name:
                raise RuntimeError(f"{name} no longer reads the same input as {leader[name]}")
            state["x"], state["slot"] = x, name
            rows = token_rows(name, x.detach(), state["masks"][name], unmasked, warnings, "input", "covariance")
            if name not in accumulators:
                accumulators[name] = SpectrumAccumulator(rows.shape[1], rows.shape[1], max_rank, mode=mode,
                                                         device=rows.device, test_matrices=shared)
            rows = rows.float()
            accumulators[name].update(rows, rows)
        return hook

    handles = [modules[s.name].register_forward_pre_hook(pre_hook(s.name)) for s in slots]
    tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                state["masks"] = _token_masks(model, slots, batch)
                _, n_tokens, *_ = nll_fn(model, batch)
                tokens += int(n_tokens.sum())
                state["x"] = state["slot"] = None  # hold no activation between batches
    finally:
        for h in handles:
            h.remove()
        state.clear()
    curves, approximations, seen = {}, {}, set()
    for s in slots:
        acc = accumulators.get(leader.get(s.name, ""))
        if acc is None or acc.rows == 0:
            curves[s.name], approximations[s.name] = [0.0] * max_rank, (  # the label its accumulator would have
                "exact" if mode == "exact" else "sketch (k={}, l={})".format(*sketch_sizes(max_rank)))
            continue
        seen.add(s.name)
        eigenvalues = acc.singular_values(max_rank) / acc.rows  # a covariance is PSD: singular = eigen values
        curves[s.name], approximations[s.name] = torch.cumsum(eigenvalues, 0).tolist(), acc.approximation
    _warn_unseen(slots, seen, warnings)
    return curves, approximations, tokens, len(batches), (len(batches), 0)


def _warn_unseen(slots, seen: set[str], warnings: list[str]) -> None:
    unseen = [s.name for s in slots if s.name not in seen]
    if unseen:
        warnings.append(f"{len(unseen)} slots never ran (or got no gradient) in the scored batches and have a zero "
                        f"curve: {', '.join(unseen[:5])}" + (", ..." if len(unseen) > 5 else ""))


def hill_alpha(eigenvalues: torch.Tensor) -> float:
    """The heavy-tail exponent of an empirical spectral density, Hill's estimator on its top half.

    With the positive eigenvalues sorted descending, ``lambda_1 >= ... >= lambda_N`` and
    ``k = N // 2``: ``alpha = 1 + k / sum_{i<=k} ln(lambda_i / lambda_{k+1})`` (the ``PL_Alpha_Hill``
    of TempBalance and AlphaLoRA): the exponent of a density ``p(lambda) ~ lambda^-alpha``, i.e.
    one more than the tail index of ``P(Lambda > x) ~ x^-(alpha-1)``. Heavier tails (stronger
    correlations, a better-trained layer) give a lower alpha. A spectrum with fewer than two
    positive eigenvalues or a flat top half has no tail to measure and gets :data:`ALPHA_CAP`.
    """
    values = torch.sort(eigenvalues.double().flatten(), descending=True).values
    values = values[values > 0]
    k = values.numel() // 2
    if k < 1:
        return ALPHA_CAP
    spread = torch.log(values[:k] / values[k]).sum().item()
    return ALPHA_CAP if spread <= 0 else min(ALPHA_CAP, 1.0 + k / spread)


def weight_eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """The ``min(m, n)`` eigenvalues of ``W^T W`` for a 2-D weight (those of the smaller Gram
    matrix: ``W^T W`` and ``W W^T`` share their nonzero eigenvalues), float64, on the weight's device."""
    w = weight.detach().float()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.linalg.eigvalsh(gram.double())


def _weight_curves(slots, modules, max_rank, warnings):
    """``curve[k-1] = alpha * (in + out) * H_k`` per slot (:func:`hill_alpha`)."""
    harmonic = torch.cumsum(1.0 / torch.arange(1, max_rank + 1, dtype=torch.float64), 0)
    curves, flat = {}, []
    with torch.no_grad():
        for s in slots:
            alpha = hill_alpha(weight_eigenvalues(modules[s.name].weight))
            if alpha >= ALPHA_CAP:
                flat.append(s.name)
            curves[s.name] = (alpha * s.size * harmonic).tolist()
    if flat:
        warnings.append(f"{len(flat)} weights have no spectral tail to measure and got alpha = {ALPHA_CAP:g}: "
                        + ", ".join(flat[:5]))
    return curves, {s.name: "exact" for s in slots}


# ------------------------------------------------------------------------------- the scores
@dataclass(frozen=True)
class SharedPass:
    """A measurement more than one score reads (the gradient pass: ``gradient`` and ``adam``):
    ``measure`` has the signature of :attr:`Score.curves` but returns its state by slot (e.g. the
    singular values) where a score returns curves; each score that names it derives its curves
    from that state, so :func:`score_slots` with a ``shared`` dict runs the pass once."""

    name: str
    measure: Callable


@dataclass(frozen=True)
class Score:
    """One importance score, registered once in :data:`SCORES`.

    Attributes:
        name: what ``auto[score=...]`` and ``loraplace importance --score`` call it.
        method: one line of maths, written into every result (``ImportanceResult.method``).
        needs_data: False for a data-free prior (no batches are read, the result names no dataset).
        curves: ``(model, slots, modules, batches, max_rank, nll_fn, sketch, warnings) ->
            (curves by slot, estimator label by slot, target tokens read, batches used,
            (forward passes, backward passes))``; for a score with a :attr:`shared` pass,
            ``(the pass's state by slot, slots) -> curves by slot``.
        shared: the pass the score reads with others, None for a pass of its own.
    """

    name: str
    method: str
    needs_data: bool
    curves: Callable
    shared: SharedPass | None = None


def _weight_score(model, slots, modules, batches, max_rank, nll_fn, sketch, warnings):
    curves, approximations = _weight_curves(slots, modules, max_rank, warnings)
    return curves, approximations, 0, 0, (0, 0)


GRADIENT_PASS = SharedPass("gradient", _gradient_spectra)
"""The gradient pass (:func:`_gradient_spectra`): the top singular values of each slot's loss gradient."""
SCORES: Registry[Score] = Registry("importance score")
for _score in (
    Score("gradient", "curve[k-1] = sum of the k largest squared singular values of the loss gradient G (out x in) of "
                 "the frozen weight, averaged over the batches (token-mean loss per batch): the squared "
                 "first-order loss decrease of the best rank-k update of unit Frobenius norm.", True, _gradient_curves,
          GRADIENT_PASS),
    Score("adam", "curve[k-1] = sqrt(out) * sum of the k largest singular values of the same loss gradient G "
                  "(out x in, same pass as gradient): the first-order loss decrease of the best rank-k update "
                  "whose every direction moves by at most sqrt(out) (spectral norm), the size of Adam's first, "
                  "sign-like step on a LoRA adapter's B column; linear, not quadratic, in the gradient's scale.",
          True, _adam_curves, GRADIENT_PASS),
    Score("activation", "curve[k-1] = sum of the k largest eigenvalues of the input covariance (1/T) sum x x^T over "
                   "non-padding tokens (forward passes only, EVA-style); modules that read the same input "
                   "(q/k/v, gate/up) share one curve.", True, _activation_curves),
    Score("weight", "a prior, not a measurement: curve[k-1] = alpha * (in + out) * H_k, alpha the Hill estimate of "
               "the heavy-tail exponent of the eigenvalues of W^T W (top half; higher = less trained = more "
               "rank, AlphaLoRA-style), H_k the k-th harmonic number.", False, _weight_score),
):
    SCORES.register(_score.name, _score)
"""Every importance score by name (the strategy grammar's ``AUTO_SCORES`` names the same ones, plus
``random``, which needs no score)."""


def get_score(name: str) -> Score:
    """The registered score ``name``; an unknown name fails with one line listing the known ones."""
    return SCORES.get_entry(name)


# ------------------------------------------------------------------------------- from a model
def score_batches(train, collator: Callable, *, batches: int, batch_size: int, seed: int = 0) -> list[dict]:
    """The batches a score reads: the first ``batches * batch_size`` examples of a seeded
    permutation of the training split, collated ``batch_size`` at a time (CPU tensors). A split
    with fewer examples gives fewer (and a last smaller) batches.

    Args:
        train: the tokenized training split (:attr:`loraplace.data.PreparedData.train`); the eval
            split must never be scored.
        collator: the task's collator (:attr:`loraplace.run.tasks.Task.collator` of the pad id).
        seed: permutation seed (``torch.randperm`` with a generator of its own).

    Raises:
        LoraplaceError: fewer than one batch or example asked for, or an empty split.
    """
    if batches < 1 or batch_size < 1:
        raise LoraplaceError(f"batches and batch size must be at least 1, got {batches} and {batch_size}")
    if len(train) == 0:
        raise LoraplaceError("the training split has no example to score on (every one was truncated away? "
                             "raise max_length)")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:batches * batch_size]
    picked = order.tolist()
    return [collator([train[i] for i in picked[s:s + batch_size]]) for s in range(0, len(picked), batch_size)]


@dataclass
class ScoringSetup:
    """A model loaded for scoring, its task, and the batches drawn from its training split."""

    model: nn.Module
    task: Any  # loraplace.run.tasks.Task
    batches: list[dict]
    model_name: str
    dataset: str | None
    device: torch.device


def load_for_scoring(model_name_or_path: str, dataset: str | None, *, batches: int = 8, batch_size: int = 8,
                     max_length: int = 256, eval_size: int = 100, split_seed: int = 1234, loss_on: str = "response",
                     device: str = "auto", allow_fetch: bool = True) -> ScoringSetup:
    """Load a model, its task and its scoring batches the way a study run does
    (:class:`loraplace.run.context.RunContext`): the task follows the architecture, the data is
    prepared by the task with the study's split settings, and batches come from the train split
    only (:func:`score_batches`, seed 0). ``dataset`` None loads no data (the weight score).

    Raises:
        LoraplaceError: the model, tokenizer or data cannot be loaded; the selective loss does
            not match the model's own logits.
    """
    where = pick_device(device)
    path = resolve_model_path(model_name_or_path, allow_fetch)
    task = get_task(task_of(load_config(path)[0]))
    drawn: list[dict] = []
    num_labels = None
    tokenizer = None
    if dataset is not None:
        tokenizer = load_tokenizer(path)
        data = task.prepare(dataset, tokenizer, eval_size=eval_size, max_length=max_length, split_seed=split_seed,
                            loss_on=loss_on, max_train_examples=None, allow_fetch=allow_fetch)
        num_labels = len(data.labels) if data.labels is not None else None
        drawn = score_batches(data.train, task.collator(tokenizer.pad_token_id), batches=batches,
                              batch_size=batch_size)
    set_seed(0)  # a classification head is initialised at load: the same head as a study's runs
    model = load_model(path, task.name, num_labels).to(where)
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if drawn and task.selective_logits:
        check_selective_loss(model, {k: v.to(where) for k, v in drawn[0].items()})
    return ScoringSetup(model=model, task=task, batches=drawn, model_name=model_name_or_path, dataset=dataset,
                        device=where)


def score_setup(setup: ScoringSetup, score: str, max_rank: int, *, sketch: str = "auto",
                shared: dict[str, Any] | None = None) -> ImportanceResult:
    """:func:`score_slots` on a :class:`ScoringSetup` (its task's loss, device and names); ``shared``
    as :func:`score_slots` takes it (one dict per setup: the batches must be the same)."""
    return score_slots(setup.model, setup.batches, score, max_rank, nll_fn=setup.task.nll, device=setup.device,
                       sketch=sketch, model_name=setup.model_name,
                       dataset=setup.dataset if get_score(score).needs_data else None, shared=shared)


def score_model(model_name_or_path: str, dataset: str, score: str, *, batches: int = 8, batch_size: int = 8,
                max_rank: int = 64, max_length: int = 256, eval_size: int = 100, split_seed: int = 1234,
                device: str = "auto", allow_fetch: bool = True) -> ImportanceResult:
    """Load a model (and, for a data score, its training batches: :func:`load_for_scoring`) and
    score its slots (:func:`score_slots`)."""
    setup = load_for_scoring(model_name_or_path, dataset if get_score(score).needs_data else None, batches=batches,
                             batch_size=batch_size, max_length=max_length, eval_size=eval_size,
                             split_seed=split_seed, device=device, allow_fetch=allow_fetch)
    return score_setup(setup, score, max_rank)
