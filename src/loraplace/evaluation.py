"""Token-level negative log-likelihood and perplexity: the one place both are computed.

Eval loss is the token-weighted mean NLL over every labelled token of the held-out split,
``L = sum_i nll_i / sum_i n_i`` (``nll_i``: summed NLL of example i, ``n_i``: its labelled
tokens), and perplexity is ``exp(L)`` from the same sums. Averaging per-batch losses or
per-example perplexities gives other numbers; see :mod:`loraplace.report` for that comparison.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplace.data import IGNORE_INDEX


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """``exp(nll_sum / n_tokens)``; inf when the mean NLL overflows."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    mean = nll_sum / n_tokens
    return math.exp(mean) if mean < 700 else float("inf")


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
    parts = _selective_parts(model) if selective else None
    if parts is not None:
        body, head = parts
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]  # (B, T, H)
        logits = head(hidden[:, :-1][mask])  # (N, V)
        nll = F.cross_entropy(logits.float(), labels[mask], reduction="none")  # (N,)
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1][mask]
        nll = F.cross_entropy(logits.float(), labels[mask], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[mask]
    nll_sum = torch.zeros(labels.shape[0], dtype=torch.float32, device=nll.device).index_add(0, rows, nll)
    return nll_sum, mask.sum(dim=1)


@dataclass
class EvalResult:
    """Per-example sums on the eval split, in dataset order, plus the batches they formed."""

    nll_sums: list[float]
    n_tokens: list[int]
    batch_of: list[int]  # batch index of each example (for per-batch aggregations in reports)
    seconds: float

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


@torch.no_grad()
def evaluate_nll(model: nn.Module, dataset, collator, *, batch_size: int, device: torch.device,
                 autocast_dtype: torch.dtype | None, selective: bool = True) -> EvalResult:
    """Evaluate summed NLL per example, without gradients, in dataset order."""
    import time

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll_sums: list[float] = []
    counts: list[int] = []
    batch_of: list[int] = []
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None else contextlib.nullcontext()
    )
    for b, first in enumerate(range(0, len(dataset), batch_size)):
        features = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collator(features).items()}
        with autocast:
            s, n = token_nll(model, batch, selective=selective)
        nll_sums += s.double().cpu().tolist()
        counts += n.cpu().tolist()
        batch_of += [b] * len(features)
    if was_training:
        model.train()
    return EvalResult(nll_sums, counts, batch_of, time.perf_counter() - start)
