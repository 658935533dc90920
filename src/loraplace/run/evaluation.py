"""Evaluation: the causal-LM per-example NLL (:func:`token_nll`, selective logits, and its check
against the model's own logits) and the held-out evaluation of any task (:func:`evaluate_nll`).

Eval loss is the token-weighted mean NLL over every labelled token of the held-out split,
``L = sum_i nll_i / sum_i n_i`` (``nll_i``: summed NLL of example i, ``n_i``: its labelled
tokens), and perplexity is ``exp(L)`` from the same sums, computed by
:func:`loraplace.metrics.perplexity` (plain arithmetic, shared with the report). Averaging
per-batch losses or per-example perplexities gives other numbers; see
:mod:`loraplace.report.perplexity` for that comparison.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraplace.data import IGNORE_INDEX
from loraplace.errors import LoraplaceError
from loraplace.metrics import perplexity


def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _selective_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(body, head)`` when logits are exactly ``head(body(x).last_hidden_state)``; else None.

    Models that post-process logits (soft-capping, logit scales) return None and take the plain
    full-logits path.
    """
    base = _unwrap(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return None
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or body is base or head is None:
        return None
    return body, head


def _hidden_and_head(model: nn.Module, batch: dict[str, torch.Tensor], selective: bool):
    """``(hidden (B, T, H), head)`` when the logits are ``head(hidden)``; else ``(logits (B, T, V), None)``."""
    parts = _selective_parts(model) if selective else None
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if parts is not None:
        body, head = parts
        return body(**kwargs)[0], head
    return model(**kwargs).logits, None


def _nll_at(states: torch.Tensor, head: nn.Module | None, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL (float32) of ``targets (N,)`` from hidden states or logits ``(N, .)``."""
    logits = head(states) if head is not None else states
    return F.cross_entropy(logits.float(), targets, reduction="none")


EVAL_CHUNK = 1024
"""Positions projected to the vocabulary at once in the final evaluation's all-token sums: memory
stays at ``EVAL_CHUNK x vocab`` floats (200 MB for a 49k vocabulary) whatever the batch and length."""


def _nll_chunked(states: torch.Tensor, head: nn.Module | None, targets: torch.Tensor,
                 chunk: int = EVAL_CHUNK) -> torch.Tensor:
    """:func:`_nll_at` over blocks of at most ``chunk`` positions (the same calls as one
    :func:`_nll_at` when ``N <= chunk``)."""
    n = states.shape[0]
    if n <= chunk:
        return _nll_at(states, head, targets)
    return torch.cat([_nll_at(states[s:s + chunk], head, targets[s:s + chunk]) for s in range(0, n, chunk)])


TRAIN_CHUNK_ELEMENTS = 1 << 24
"""Logits elements (positions x vocab) projected at once by the training loss: 64 MiB of float32
(341 positions of a 49k vocabulary, 64 of a 262k one)."""


def train_chunk(vocab: int) -> int:
    """Positions per block of the training loss's vocabulary projection (:func:`_nll_recomputed`)."""
    return max(16, TRAIN_CHUNK_ELEMENTS // max(1, vocab))


def _nll_recomputed(states: torch.Tensor, head: nn.Module | None, targets: torch.Tensor) -> torch.Tensor:
    """:func:`_nll_at` with gradients, in blocks of :func:`train_chunk` positions whose logits are
    recomputed in backward (non-reentrant checkpointing) instead of kept.

    The unchunked loss keeps ``N x vocab`` logits, their float32 copy and the log-softmax for
    backward (about 1 GB for 1,688 labelled positions and a 49k vocabulary, at the step's memory
    peak); this keeps the hidden states only and holds one block's logits at a time, for one more
    vocabulary matmul per position in backward. A plain ``nn.Linear`` head's weight is cast to the
    autocast dtype once for all blocks (autocast would cast it once per block and again in each
    recomputation); other heads (an adapted or quantized head) are called as they are, and their
    recomputation replays the forward's random state, so an adapter's dropout draws the same masks.
    """
    n = states.shape[0]
    vocab = getattr(head, "out_features", None)  # None: full logits given (no head), or a head of unknown width
    if vocab is None or n <= train_chunk(vocab):
        return _nll_at(states, head, targets)
    chunk = train_chunk(vocab)
    if type(head) is nn.Linear:
        device = states.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
        weight = head.weight.to(dtype)
        bias = head.bias.to(dtype) if head.bias is not None else None

        def part(s: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return F.cross_entropy(F.linear(s.to(weight.dtype), weight, bias).float(), t, reduction="none")

        args = (weight, bias)
        random = False  # a plain projection draws nothing
    else:
        def part(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # A new view at each call: shared dropout masks (SharedMasks) match an input by identity,
            # and the recomputation must draw its mask again as the forward did, not take the
            # forward's cached output (that saves fewer tensors and fails the checkpoint's check).
            return _nll_at(s.view_as(s), head, t)

        args = ()
        random = True  # an adapted head may draw dropout masks: the recomputation must draw the same ones

    # preserve_rng_state: the recomputation restores the random state each block's forward started
    # from (so it redraws the forward's masks, and the gradient is that of the logged loss), then
    # puts back the state it found, so the masks drawn after this step are not shifted.
    return torch.cat([checkpoint(part, states[i:i + chunk], targets[i:i + chunk], *args, use_reentrant=False,
                                 preserve_rng_state=random) for i in range(0, n, chunk)])


def token_nll(model: nn.Module, batch: dict[str, torch.Tensor], selective: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and labelled-token count per example of a causal-LM batch.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels``: ``(B, T)``; labels -100 where ignored.
        selective: project to the vocabulary only at positions that predict a label
            (``(N, hidden) -> (N, vocab)`` with N the labelled tokens) instead of at all B*T
            positions. Same result, less compute; falls back to full logits where unsafe.

    Returns:
        ``nll_sum: (B,)`` float32 and ``n_tokens: (B,)`` int64. Position t predicts label t+1.
    """
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX  # (B, T-1)
    states, head = _hidden_and_head(model, batch, selective)
    # The vocabulary projection runs in blocks: without gradients (evaluation) of EVAL_CHUNK positions
    # (with loss_on=all, N is about B*T); with gradients of train_chunk(vocab), recomputed in backward.
    nll_fn = _nll_recomputed if torch.is_grad_enabled() else _nll_chunked
    nll = nll_fn(states[:, :-1][mask], head, labels[mask])  # (N,)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[mask]
    nll_sum = torch.zeros(labels.shape[0], dtype=torch.float32, device=nll.device).index_add(0, rows, nll)
    return nll_sum, mask.sum(dim=1)


class SelectiveLossMismatch(LoraplaceError):
    """The selective-logits loss differs from the loss of the model's own logits."""


@torch.no_grad()
def check_selective_loss(model: nn.Module, batch: dict[str, torch.Tensor], *,
                         max_tokens: int = 64) -> tuple[float, float] | None:
    """Compare the selective-logits loss with the model's own full-logits loss on one batch.

    The selective path (:func:`_selective_parts`) computes ``head(body(x))`` itself and knows
    only a list of logit post-processing config keys (soft-capping, logit scales); a model that
    post-processes its logits in another way would silently train and evaluate on a wrong loss.
    This runs both paths on the first ``max_tokens`` positions of ``batch`` with every real token
    as a target, in eval mode, without autocast and without gradients: two short forward passes.

    Returns:
        ``(selective, full)`` mean NLL per token, or None where the selective path is not used
        (the model takes the full-logits path anyway) or the batch has no target.

    Raises:
        SelectiveLossMismatch: the two differ by more than float rounding of the model's dtype
            (relative 1e-4 in float32, 2e-2 with 16-bit weights or TF32 matmuls); names the model
            type and both values.
    """
    parts = _selective_parts(model)
    if parts is None:
        return None
    head_weight = getattr(parts[1], "weight", None)
    device = head_weight.device if head_weight is not None else next(model.parameters()).device
    ids = batch["input_ids"][:, :max_tokens].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask[:, :max_tokens].to(device)
    small = {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, IGNORE_INDEX)}
    was_training = model.training
    model.eval()
    no_autocast = (torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda", "mps", "xpu")
                   else contextlib.nullcontext())
    try:
        with no_autocast:
            sel, n = token_nll(model, small, selective=True)
            full, _ = token_nll(model, small, selective=False)
    finally:
        model.train(was_training)
    count = int(n.sum())
    if count == 0:
        return None
    selective, reference = sel.double().sum().item() / count, full.double().sum().item() / count
    dtype = head_weight.dtype if head_weight is not None else torch.float32
    exact_fp32 = dtype in (torch.float32, torch.float64) and torch.get_float32_matmul_precision() == "highest" and not (
        device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    tol = 1e-4 if exact_fp32 else 2e-2  # float32, else 16-bit weights or TF32 matmuls
    if not (abs(selective - reference) <= tol * max(1.0, abs(reference))):
        base = _unwrap(model)
        model_type = getattr(getattr(base, "config", None), "model_type", None) or type(base).__name__
        raise SelectiveLossMismatch(
            f"model type {model_type!r} ({type(base).__name__}): the loss from loraplace's selective logits "
            f"(head(hidden states) at the labelled positions) is {selective:.6f} nats/token, the loss from the "
            f"model's own logits is {reference:.6f} on the same tokens. The model post-processes its logits "
            f"(a scale, a soft cap, ...) in a way loraplace does not know, so its fast loss would be wrong; "
            f"please report the model type to loraplace (the fix is a config key in "
            f"loraplace.run.evaluation._selective_parts)"
        )
    return selective, reference


@dataclass
class AllTokenNLL:
    """Per-row sums over every position, for reports that compare loss definitions."""

    nll_sum_all: torch.Tensor  # (B,) NLL of tokens 1..len-1 (prompt and response), float32
    n_all: torch.Tensor  # (B,) len-1
    nll_sum_pad: torch.Tensor  # (B,) NLL of predicting the pad token at each padding position
    n_pad: torch.Tensor  # (B,) padding positions in the row


def token_nll_all(model: nn.Module, batch: dict[str, torch.Tensor], pad_token_id: int,
                  selective: bool = True, chunk: int = EVAL_CHUNK) -> tuple[torch.Tensor, torch.Tensor, AllTokenNLL]:
    """:func:`token_nll` plus, per row, the NLL over all non-padding tokens and over padding.

    Needs the logits at every position: the vocabulary projection runs one row at a time and in
    blocks of at most ``chunk`` positions of it (:data:`EVAL_CHUNK`), from the hidden states, so
    no ``(B, T, vocab)`` logits tensor is made and memory stays at ``(min(T, chunk), vocab)``
    floats (models that post-process their logits, which take the full-logits path of
    :func:`_selective_parts`, are the exception: their forward returns ``(B, T, vocab)``). Rows are right-padded (``attention_mask`` 1 then 0);
    padding position j (j >= len) contributes the NLL of predicting ``pad_token_id`` at j from
    position j-1, which is what a loss over padded labels would add. The labelled sums come from
    the same logits (label where there is one, else the input token, as target).
    """
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    states, head = _hidden_and_head(model, batch, selective)
    lengths = batch["attention_mask"].sum(dim=1)
    width = batch["input_ids"].shape[1]
    sums, sums_all, sums_pad = [], [], []
    for i in range(labels.shape[0]):
        n = int(lengths[i])
        targets = torch.where(mask[i], labels[i], batch["input_ids"][i, 1:])
        targets[n - 1:] = pad_token_id  # positions >= n are padding: their target is the pad token
        row = _nll_chunked(states[i, :-1], head, targets, chunk)  # (T-1,)
        sums.append(row[mask[i]].sum())
        sums_all.append(row[: n - 1].sum())
        sums_pad.append(row[n - 1:].sum())
    extra = AllTokenNLL(
        nll_sum_all=torch.stack(sums_all).float(), n_all=(lengths - 1).clamp(min=0),
        nll_sum_pad=torch.stack(sums_pad).float(), n_pad=width - lengths,
    )
    return torch.stack(sums).float(), mask.sum(dim=1), extra


@dataclass
class EvalResult:
    """Per-example sums on the eval split, in dataset order, plus the batches they formed.

    With ``all_tokens=True`` (the run's final evaluation) also, per example: ``nll_sums_all`` /
    ``n_tokens_all``, the NLL over every non-padding token (prompt and response, positions
    1..len-1), and ``nll_sums_pad`` / ``n_pad``, the NLL of predicting the pad token at the
    padding positions of its batch row and how many there are. Empty lists otherwise.
    """

    nll_sums: list[float]
    n_tokens: list[int]
    batch_of: list[int]  # batch index of each example (for per-batch aggregations in reports)
    seconds: float
    nll_sums_all: list[float] = field(default_factory=list)
    n_tokens_all: list[int] = field(default_factory=list)
    nll_sums_pad: list[float] = field(default_factory=list)
    n_pad: list[int] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)  # classification: 1 where the arg-max class is right

    @property
    def accuracy(self) -> float | None:
        return sum(self.correct) / len(self.correct) if self.correct else None

    @property
    def nll_sum(self) -> float:
        return float(sum(self.nll_sums))

    @property
    def tokens(self) -> int:
        return int(sum(self.n_tokens))

    @property
    def loss(self) -> float:
        """Token-weighted mean NLL (nats per token)."""
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll_sum, self.tokens)


def _batches(dataset, batch_size: int, by_length: bool) -> list[list[int]]:
    """Index lists of the eval batches: consecutive in dataset order, or (``by_length``) of
    examples of similar length, which pads less."""
    order = list(range(len(dataset)))
    if by_length:
        lengths = dataset["length"] if "length" in getattr(dataset, "column_names", ()) else [
            len(dataset[i]["input_ids"]) for i in order]
        order.sort(key=lambda i: (-lengths[i], i))
    return [order[first:first + batch_size] for first in range(0, len(order), batch_size)]


@torch.no_grad()
def evaluate_nll(model: nn.Module, dataset, collator, *, batch_size: int, device: torch.device,
                 autocast_dtype: torch.dtype | None, nll_fn: Callable = token_nll, all_tokens: bool = False,
                 by_length: bool = False) -> EvalResult:
    """Evaluate summed NLL per example, without gradients; results in dataset order.

    Args:
        nll_fn: the task's per-example ``(nll_sum, n_tokens[, correct])`` of a batch
            (:attr:`loraplace.run.tasks.Task.nll`; default the causal-LM :func:`token_nll`);
            ``correct`` fills :attr:`EvalResult.correct`.
        all_tokens: also fill the all-token and padding fields of :class:`EvalResult` (full
            logits at every position: slower; meant for a run's final evaluation). Causal LMs
            only (:attr:`loraplace.run.tasks.Task.all_token_sums`): needs ``nll_fn`` :func:`token_nll`.
        by_length: batch examples of similar length together (less padding, faster); batches
            are otherwise consecutive runs of the dataset order. The loss is the same up to
            float rounding; ``batch_of`` and ``n_pad`` describe the batches actually formed.

    Raises:
        ValueError: ``all_tokens`` with another loss than :func:`token_nll`.
    """

    if all_tokens and nll_fn is not token_nll:
        raise ValueError("all_tokens sums are defined for the causal-LM loss token_nll only")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    n = len(dataset)
    nll_sums: list[float] = [0.0] * n
    counts: list[int] = [0] * n
    batch_of: list[int] = [0] * n
    sums_all: list[float] = [0.0] * n if all_tokens else []
    counts_all: list[int] = [0] * n if all_tokens else []
    sums_pad: list[float] = [0.0] * n if all_tokens else []
    pads: list[int] = [0] * n if all_tokens else []
    correct: list[int] = [-1] * n
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None else contextlib.nullcontext()
    )
    pad_id = getattr(collator, "pad_token_id", 0)
    for b, indices in enumerate(_batches(dataset, batch_size, by_length)):
        features = [dataset[i] for i in indices]
        batch = {k: v.to(device) for k, v in collator(features).items()}
        with autocast:
            if all_tokens:
                s, c, extra = token_nll_all(model, batch, pad_id)
            else:
                s, c, *rest = nll_fn(model, batch)
                if rest:
                    for i, ok in zip(indices, rest[0].cpu().tolist()):
                        correct[i] = int(ok)
        s, c = s.double().cpu().tolist(), c.cpu().tolist()
        for j, i in enumerate(indices):
            nll_sums[i], counts[i], batch_of[i] = s[j], c[j], b
        if all_tokens:
            values = zip(extra.nll_sum_all.double().cpu().tolist(), extra.n_all.cpu().tolist(),
                         extra.nll_sum_pad.double().cpu().tolist(), extra.n_pad.cpu().tolist())
            for i, (sa, na, sp, npad) in zip(indices, values):
                sums_all[i], counts_all[i], sums_pad[i], pads[i] = sa, int(na), sp, int(npad)
    if was_training:
        model.train()
    return EvalResult(nll_sums, counts, batch_of, time.perf_counter() - start,
                      nll_sums_all=sums_all, n_tokens_all=counts_all, nll_sums_pad=sums_pad, n_pad=pads,
                      correct=correct if all(x >= 0 for x in correct) else [])
