"""Placement strategies: which roles (or, for the paper draft's arms, which literal PEFT
target strings) get an adapter.

Two kinds exist:

* role-based strategies (``full``, ``attention``, ``ffn``, ``qv``, ...) select roles from
  :mod:`loraplace.placement.roles` and are resolved to exact module names;
* literal strategies (``paper-full``, ``paper-attention``, ``paper-ffn``) reproduce the paper
  draft's ``target_modules`` lists *with PEFT's own suffix-matching rule*, so that the plan
  shows what those lists really adapted (GPT-2's ``c_proj`` matches both ``attn.c_proj`` and
  ``mlp.c_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplace.errors import LoraplaceError


@dataclass(frozen=True)
class Strategy:
    """One arm of a placement study.

    Attributes:
        name: the spec the user wrote (``"attention"``); also the run label.
        roles: role patterns for role-based strategies; ``"attn.*"`` selects every
            attention role the architecture has. Empty for literal strategies.
        peft_targets: literal PEFT ``target_modules`` strings (suffix-matched), or None.
        description: one line for tables and ``--help``.
    """

    name: str
    roles: tuple[str, ...] = ()
    peft_targets: tuple[str, ...] | None = None
    description: str = ""

    @property
    def is_literal(self) -> bool:
        return self.peft_targets is not None


BUILTIN_STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("full", ("attn.*", "mlp.*"), description="every attention and feed-forward linear layer"),
        Strategy("attention", ("attn.*",), description="attention projections only (q, k, v, o or fused qkv, o)"),
        Strategy("ffn", ("mlp.*",), description="feed-forward (MLP) projections only"),
        Strategy("qv", ("attn.q", "attn.v"), description="query and value projections, as in the LoRA paper"),
        Strategy("attn-o", ("attn.o",), description="attention output projection only"),
        Strategy("mlp-down", ("mlp.down",), description="FFN down projection only"),
        Strategy(
            "paper-full",
            peft_targets=("c_attn", "c_proj", "c_fc"),
            description="paper draft's literal 'full' list: target_modules=[c_attn, c_proj, c_fc]",
        ),
        Strategy(
            "paper-attention",
            peft_targets=("c_attn", "c_proj"),
            description="paper draft's literal 'attention-only' list: target_modules=[c_attn, c_proj]",
        ),
        Strategy(
            "paper-ffn",
            peft_targets=("c_fc",),
            description="paper draft's literal 'feed-forward-only' list: target_modules=[c_fc]",
        ),
    )
}


def parse_strategy(spec: str) -> Strategy:
    """A strategy from its name.

    Raises:
        LoraplaceError: unknown name; the message lists the built-in ones.
    """
    spec = spec.strip()
    if spec in BUILTIN_STRATEGIES:
        return BUILTIN_STRATEGIES[spec]
    known = ", ".join(BUILTIN_STRATEGIES)
    raise LoraplaceError(f"unknown strategy {spec!r}; built-in strategies: {known}")


def parse_strategies(specs: str | list[str]) -> list[Strategy]:
    """Strategies from a comma-separated string or a list; rejects duplicates."""
    items = [s for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise LoraplaceError("no strategies given; e.g. --strategies full,attention,ffn")
    strategies = [parse_strategy(s) for s in items]
    names = [s.name for s in strategies]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LoraplaceError(f"strategy listed more than once: {', '.join(dupes)}")
    return strategies
