"""Perplexity: the one place it is computed, as plain arithmetic (no torch import), so that the
evaluation (:mod:`loraplace.run.evaluation`) and the report (``loraplace report``, which must start
without torch) call the same function.

Perplexity is ``exp(L)`` with ``L = sum_i nll_i / sum_i n_i`` the token-weighted mean NLL
(nats/token) over every labelled token; see :mod:`loraplace.report.perplexity` for the other
aggregations people mistake for it.
"""

from __future__ import annotations

import math

OVERFLOW = 700.0  # math.exp overflows a float above ~709.78: report inf instead


def perplexity(nll_sum: float, n_tokens: float = 1) -> float:
    """``exp(nll_sum / n_tokens)``; inf when the mean NLL overflows.

    ``perplexity(loss)`` (``n_tokens`` 1) is the perplexity of a mean loss already divided out.

    Raises:
        ValueError: ``n_tokens`` <= 0.
    """
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    mean = nll_sum / n_tokens
    return math.exp(mean) if mean < OVERFLOW else float("inf")
