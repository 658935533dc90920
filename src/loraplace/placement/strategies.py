"""Placement strategies: which roles (or, for the paper draft's arms, which literal PEFT
target strings) get an adapter, in which layers, with which rank.

Two kinds exist:

* role-based strategies select roles from :mod:`loraplace.placement.roles` and are resolved
  to exact module names. They are written in a small language, the same in YAML and on the
  command line::

      strategy  := term ("+" term)*
      term      := selector ["@" layers] ["[" options "]"]      (layers and options in any order)
      selector  := name ("|" name)*     a built-in name (full, attention, ffn, qv, ...), a group
                                        (attention, cross-attention, ffn), a role (attn.q) or a
                                        role pattern (attn.*); embed and lm_head are opt-in roles
      layers    := item ("," item)*     all | first:K | last:K | A-B | N | every:N[:OFFSET] | part:I/N
                                        K is a count, or a fraction of the stack: 1/2, 0.25, 50%;
                                        part:I/N the I-th of N near-equal consecutive parts (part:2/3:
                                        the middle third)
      options   := r=INT, alpha=NUMBER and/or init=INIT, comma-separated
      INIT      := default | gaussian | pissa | olora | orthogonal        (see INIT_TITLES)

  Examples: ``attention@last:12``, ``ffn[r=8]+attention[r=16]``, ``qv@0-11``,
  ``full@last:1/2``, ``attn.q|attn.v@every:2[r=4]``. Where terms overlap, the later term's
  rank and alpha win. Layers count within each block stack (an encoder-decoder model's
  encoder and decoder are selected separately, with the same rule).

  ``init=`` chooses PEFT's data-free initialisation of the arm's adapters (``init_lora_weights``):
  ``default`` (Kaiming-uniform A, zero B), ``gaussian`` (Gaussian A, zero B), ``pissa`` (A and B
  from the exact SVD of each base weight, PiSSA; the base weight keeps the residual), ``olora``
  (from its QR decomposition, OLoRA; residual likewise) or ``orthogonal`` (orthogonal A and B with
  B A = 0; even ranks only). PEFT initialises an arm one way, so the init is the whole arm's: a term
  without ``init=`` takes the one another term gives, and two terms giving different ones is an
  error (``ffn[init=pissa]+attention`` initialises both with PiSSA). ``auto[...]`` takes it too;
  ``eva`` and ``adalora`` initialise their adapters themselves and take none.

* literal strategies (``paper-full``, ``paper-attention``, ``paper-ffn``) reproduce the paper
  draft's ``target_modules`` lists *with PEFT's own suffix-matching rule*, so that the plan
  shows what those lists really adapted (GPT-2's ``c_proj`` matches both ``attn.c_proj`` and
  ``mlp.c_proj``).

* automatic strategies choose their modules and ranks from data, once per study, under the
  arm's parameter budget (``auto~attention``: as many parameters as ``attention``; plain
  ``auto``: as many as ``full`` at the study's rank). Their slots are the modules of ``full``::

      auto[score=gradient|adam|activation|weight|pilot|random, mode=best|worst|uniform, step=INT,
           max_r=INT, draw=INT, alpha=NUMBER, init=INIT]

  ``score`` (default gradient) names the importance score (:mod:`loraplace.importance`);
  ``mode=best`` (default) gives rank where the score gains most per parameter, ``worst`` where it
  gains least (a falsification check), ``uniform`` the slots ``best`` chose at one uniform rank;
  ``score=random`` with ``draw=N`` is a random placement at the budget. ``step`` (default 2) is the
  rank granularity, ``max_r`` (default 4x the study's rank) the highest rank of one slot. See
  :mod:`loraplace.placement.allocate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from fractions import Fraction

from loraplace.errors import LoraplaceError
from loraplace.placement.roles import ALL_ROLES

LAYER_SYNTAX = ("all, first:K, last:K, A-B, N, every:N or every:N:OFFSET (K a count or a fraction: 1/2, 0.25, 50%), "
                "or part:I/N (the I-th of N equal parts)")


def layer_span(first: int, last: int) -> str:
    """Consecutive layers ``first..last`` as written in a layer selection: ``"0-11"``, or ``"5"``."""
    return f"{first}-{last}" if last != first else f"{first}"


def layer_ranges(layers: list[int | None]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (None, a module outside the blocks, is left out;
    ``"-"`` when no layer is left)."""
    nums = sorted(x for x in layers if x is not None)
    if not nums:
        return "-"
    parts, start, prev = [], nums[0], nums[0]
    for x in nums[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(layer_span(start, prev))
        if x is not None:
            start = prev = x
    return ",".join(parts)


@dataclass(frozen=True)
class LayerSelection:
    """Which blocks of a stack a term adapts.

    Attributes:
        text: the selection as written (``"last:12"``, ``"0-3,8"``).
        items: parsed items, unioned: ``("all",)``, ``("first", K)``, ``("last", K)`` (K an int
            or a Fraction of the stack), ``("range", a, b)`` (inclusive), ``("every", n, offset)``.
    """

    text: str
    items: tuple[tuple, ...]

    def layers(self, num_layers: int, context: str = "") -> list[int]:
        """The sorted layer indices this selection picks in a stack of ``num_layers`` blocks.

        Raises:
            LoraplaceError: an index or count beyond the stack, or a fraction that selects nothing.
        """
        where = f" in {context}" if context else ""
        chosen: set[int] = set()
        for item in self.items:
            kind = item[0]
            if kind == "all":
                chosen.update(range(num_layers))
            elif kind in ("first", "last"):
                k = item[1]
                if isinstance(k, Fraction):
                    count = int(k * num_layers + Fraction(1, 2))  # round half up
                    if count == 0:
                        raise LoraplaceError(
                            f"layer selection {self.text!r}{where}: {kind}:{k} of {num_layers} layers selects no "
                            f"layer; use a larger fraction or a count like {kind}:1"
                        )
                else:
                    count = k
                    if count > num_layers:
                        raise LoraplaceError(
                            f"layer selection {self.text!r}{where}: {kind}:{k} asks for {k} layers but the model "
                            f"has {num_layers} (0-{num_layers - 1})"
                        )
                chosen.update(range(count) if kind == "first" else range(num_layers - count, num_layers))
            elif kind == "range":
                a, b = item[1], item[2]
                if b >= num_layers:
                    raise LoraplaceError(
                        f"layer selection {self.text!r}{where}: {layer_span(a, b)} names layer {b} but the model has "
                        f"{num_layers} layers (0-{num_layers - 1})"
                    )
                chosen.update(range(a, b + 1))
            elif kind == "part":
                i, n = item[1], item[2]
                start, stop = (i - 1) * num_layers // n, i * num_layers // n
                if start == stop:
                    raise LoraplaceError(
                        f"layer selection {self.text!r}{where}: part {i} of {n} of {num_layers} layers is empty; "
                        f"use fewer parts than layers"
                    )
                chosen.update(range(start, stop))
            elif kind == "every":
                n, offset = item[1], item[2]
                if offset >= num_layers:
                    raise LoraplaceError(
                        f"layer selection {self.text!r}{where}: offset {offset} is beyond the model's "
                        f"{num_layers} layers (0-{num_layers - 1})"
                    )
                chosen.update(range(offset, num_layers, n))
        return sorted(chosen)


@dataclass(frozen=True)
class Term:
    """One ``+``-separated part of a strategy: roles, optional layers, optional rank/alpha.

    Attributes:
        text: the term as written (``"attention@last:12[r=16]"``).
        roles: role patterns (``"attn.*"``, ``"attn.q"``, ``"embed"``).
        layers: the layer selection, or None for every layer.
        r, alpha: per-term rank and alpha; None means the study's ``lora.r`` / ``lora.alpha``.
        init: the ``init=`` as written (a key of :data:`INIT_TITLES`), None where the term gives none.
    """

    text: str
    roles: tuple[str, ...]
    layers: LayerSelection | None = None
    r: int | None = None
    alpha: float | None = None
    init: str | None = None


AUTO = "auto"
METHOD_TITLES = {"lora": "LoRA", AUTO: "automatic placement", "eva": "EVA", "adalora": "AdaLoRA"}
"""The adapter methods a strategy can name (:attr:`Strategy.method_name`) and how reports call
them; each one's behaviour is its module in :mod:`loraplace.methods`."""
DEFAULT_INIT = "default"
INIT_TITLES = {DEFAULT_INIT: "default init (Kaiming-uniform A, zero B)", "gaussian": "Gaussian init (zero B)",
               "pissa": "PiSSA init", "olora": "OLoRA init", "orthogonal": "orthogonal init",
               "eva": "EVA init (A from the inputs' top singular vectors, ranks as placed)",
               "default_scaled": "default init rescaled to EVA's ||A x|| (a scale control)",
               "lora_ga": "LoRA-GA init (A, B from the SVD of the accumulated gradient)",
               "corda": "CorDA init (A, B from the SVD of the weight times the inputs' covariance)"}
"""The adapter initialisations an arm can name with ``init=`` (:attr:`Strategy.init`; PEFT's
``init_lora_weights``, see :func:`loraplace.adapters.peft_init`) and how reports call them. ``pissa``
is PEFT's exact-SVD PiSSA (not its randomized ``pissa_niter_N``)."""
DATA_INITS = ("eva", "default_scaled", "lora_ga", "corda")
"""Initialisations computed from data once per study (on the scoring batches) and carried to every
run of the arm, as EVA's is (:data:`loraplace.methods.INITIALISERS`): ``eva``, EVA's A (the top principal
components of each module's inputs: every module keeps the rank its placement gives it, no
redistribution); ``default_scaled``, PEFT's default random A with each module's rows rescaled so
that the expected ||A x|| on the scoring batches equals EVA's (the same scale in random directions:
separates EVA's directions from its scale); ``lora_ga`` and ``corda``, PEFT's LoRA-GA and CorDA
(instruction-previewed) starts, which also rewrite the base weights (:mod:`loraplace.methods.starts`)."""
AUTO_SCORES = ("gradient", "adam", "activation", "weight", "pilot", "random")
AUTO_MODES = ("best", "worst", "uniform")


@dataclass(frozen=True)
class AutoOptions:
    """The options of an ``auto`` strategy (see the module docstring); None: the study's default."""

    score: str = "gradient"
    mode: str = "best"
    step: int | None = None
    max_r: int | None = None
    draw: int | None = None
    alpha: float | None = None
    init: str | None = None


@dataclass(frozen=True)
class Strategy:
    """One arm of a placement study.

    Attributes:
        name: the spec the user wrote, without spaces (``"attention@last:12"``); also the run label.
        roles: role patterns of all terms together (``"attn.*"`` selects every attention role
            the architecture has). Empty for literal strategies.
        peft_targets: literal PEFT ``target_modules`` strings (suffix-matched), or None.
        description: one line for tables and ``--help``.
        terms: the parsed terms; a strategy built from ``roles`` alone gets one term with them.
        auto: the options of an automatic strategy (its ranks come from a study-level allocation),
            else None.
        method: a published baseline that places rank itself on the modules of ``full``:
            ``eva`` (ranks from the inputs' explained variance, allocated once per study, like
            ``auto``) or ``adalora`` (ranks pruned during training); see :mod:`loraplace.methods`.
    """

    name: str
    roles: tuple[str, ...] = ()
    peft_targets: tuple[str, ...] | None = None
    description: str = ""
    terms: tuple[Term, ...] = ()
    auto: AutoOptions | None = None
    method: str | None = None

    def __post_init__(self) -> None:
        if not self.terms and self.roles:
            object.__setattr__(self, "terms", (Term(self.name, tuple(self.roles)),))
        if self.terms and not self.roles:
            object.__setattr__(self, "roles", tuple(dict.fromkeys(p for t in self.terms for p in t.roles)))

    @property
    def is_literal(self) -> bool:
        return self.peft_targets is not None

    @property
    def is_auto(self) -> bool:
        """True for an ``auto[...]`` strategy."""
        return self.auto is not None

    @property
    def method_name(self) -> str:
        """The adapter method that trains this strategy (:data:`loraplace.methods.METHODS`): ``auto``
        for ``auto[...]``, the baseline's name (``eva``, ``adalora``), else ``lora``."""
        return AUTO if self.auto is not None else self.method or "lora"

    @property
    def hand_picked(self) -> bool:
        """True for a placement chosen by hand (roles, layers, ranks), not by an algorithm."""
        return self.method_name == "lora"

    @property
    def init(self) -> str | None:
        """The adapters' initialisation (``init=``, a key of :data:`INIT_TITLES`), None for PEFT's
        default (``init=default`` included). The parser allows one per arm, whichever term gives it."""
        given = self.auto.init if self.auto is not None else next((t.init for t in self.terms if t.init), None)
        return None if given in (None, DEFAULT_INIT) else given

    @property
    def has_fixed_ranks(self) -> bool:
        """True when every term sets its own ``r=`` (nothing is left for budget matching to choose)."""
        return bool(self.terms) and all(t.r is not None for t in self.terms)


_ROLE_STRATEGIES = (
    Strategy("full", ("attn.*", "xattn.*", "mlp.*"),
             description="every attention (self and cross) and feed-forward linear layer"),
    Strategy("attention", ("attn.*", "xattn.*"),
             description="attention projections only (q, k, v, o or fused qkv, o; cross-attention too)"),
    Strategy("self-attention", ("attn.*",), description="self-attention projections only"),
    Strategy("cross-attention", ("xattn.*",), description="cross-attention projections only (encoder-decoder)"),
    Strategy("ffn", ("mlp.*",), description="feed-forward (MLP) projections only; MoE experts count as FFN"),
    Strategy("qv", ("attn.q", "attn.v"), description="query and value projections, as in the LoRA paper"),
    Strategy("attn-o", ("attn.o",), description="attention output projection only"),
    Strategy("mlp-down", ("mlp.down",), description="FFN down projection only"),
)

BUILTIN_STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        *_ROLE_STRATEGIES,
        Strategy("eva", _ROLE_STRATEGIES[0].roles, method="eva",
                 description="EVA on full's modules: ranks redistributed by the explained variance of "
                 "each module's inputs, A initialised from their top principal components"),
        Strategy("adalora", _ROLE_STRATEGIES[0].roles, method="adalora",
                 description="PEFT's AdaLoRA on full's modules: every module starts at 1.5x the final mean rank, "
                 "ranks pruned by sensitivity during training"),
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

_SELECTOR_NAMES: dict[str, tuple[str, ...]] = {s.name: s.roles for s in _ROLE_STRATEGIES}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.*?-]*")


def _error(spec: str, part: str, position: int, problem: str, expected: str) -> LoraplaceError:
    return LoraplaceError(
        f"invalid strategy {spec!r}: {problem} at {part!r} (character {position + 1}); expected {expected}"
    )


def _parse_selector(spec: str, text: str, offset: int) -> tuple[str, ...]:
    patterns: list[str] = []
    pos = offset
    for name in text.split("|"):
        if name in _SELECTOR_NAMES:
            patterns.extend(_SELECTOR_NAMES[name])
        elif name == AUTO:
            raise _error(spec, name, pos, "auto chooses its own modules and cannot be combined with other terms",
                         "auto on its own, e.g. auto[score=activation]")
        elif name in BUILTIN_STRATEGIES:
            raise _error(spec, name, pos, f"the strategy {name} cannot be combined with other terms, layers or ranks",
                         f"{name} on its own")
        elif _NAME.fullmatch(name) and any(fnmatchcase(role, name) for role in ALL_ROLES):
            patterns.append(name)
        else:
            raise _error(
                spec, name, pos, "unknown role or strategy name",
                f"one of {', '.join(_SELECTOR_NAMES)}, a role ({', '.join(ALL_ROLES)}) or a pattern like attn.*",
            )
        pos += len(name) + 1
    return tuple(dict.fromkeys(patterns))


def _parse_count(spec: str, text: str, pos: int) -> int | Fraction:
    try:
        if text.isdigit():
            value: int | Fraction = int(text)
            if value == 0:
                raise ValueError
            return value
        if text.endswith("%"):
            frac = Fraction(text[:-1]) / 100
        else:
            frac = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise _error(spec, text, pos, "not a layer count or fraction", "a count >= 1 or a fraction in (0, 1]: "
                     "1/2, 0.25, 50%") from None
    if not 0 < frac <= 1:
        raise _error(spec, text, pos, "fraction outside (0, 1]", "a fraction like 1/2, 0.25 or 50%")
    return frac


def parse_layers(spec: str, text: str, offset: int = 0) -> LayerSelection:
    """A :class:`LayerSelection` from its text (the part after ``@``).

    Raises:
        LoraplaceError: naming the offending item and its position in ``spec``.
    """
    items: list[tuple] = []
    pos = offset
    if not text:
        raise _error(spec, "@", offset - 1, "empty layer selection", LAYER_SYNTAX)
    for item in text.split(","):
        if item == "all":
            items.append(("all",))
        elif m := re.fullmatch(r"(first|last):(.+)", item):
            items.append((m[1], _parse_count(spec, m[2], pos + len(m[1]) + 1)))
        elif m := re.fullmatch(r"(\d+)(?:-(\d+))?", item):
            a, b = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if b < a:
                raise _error(spec, item, pos, "range ends before it starts", f"A-B with A <= B, e.g. {b}-{a}")
            items.append(("range", a, b))
        elif m := re.fullmatch(r"part:(\d+)/(\d+)", item):
            i, n = int(m[1]), int(m[2])
            if not 1 <= i <= n:
                raise _error(spec, item, pos, "part outside 1..N", "part:I/N with 1 <= I <= N, e.g. part:2/3")
            items.append(("part", i, n))
        elif m := re.fullmatch(r"every:(\d+)(?::(\d+))?", item):
            n, start = int(m[1]), int(m[2] or 0)
            if n == 0:
                raise _error(spec, item, pos, "every:0 selects nothing", "every:N with N >= 1")
            items.append(("every", n, start))
        else:
            raise _error(spec, item, pos, "unknown layer selection", LAYER_SYNTAX)
        pos += len(item) + 1
    return LayerSelection(text, tuple(items))


def _init_error(spec: str, item: str, pos: int) -> LoraplaceError:
    return _error(spec, item, pos, "unknown initialisation", f"init={'|'.join(INIT_TITLES)}")


def _parse_options(spec: str, text: str, offset: int) -> tuple[int | None, float | None, str | None]:
    r: int | None = None
    alpha: float | None = None
    init: str | None = None
    pos = offset
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key == "r" and value.isdigit() and int(value) >= 1:
            r = int(value)
        elif key == "init":
            if value not in INIT_TITLES:
                raise _init_error(spec, item, pos)
            init = value
        elif key == "alpha":
            try:
                alpha = float(value)
            except ValueError:
                alpha = None
            if alpha is None or not alpha > 0:
                raise _error(spec, item, pos, "alpha must be a positive number", "alpha=16 or alpha=0.5")
        elif key == "r":
            raise _error(spec, item, pos, "rank must be a whole number >= 1", "r=8")
        else:
            raise _error(spec, item, pos, "unknown option",
                         "r=INT, alpha=NUMBER and/or init=INIT, e.g. [r=8,alpha=16,init=pissa]")
        pos += len(item) + 1
    return r, alpha, init


def _split_top_level(text: str, separator: str, unless_digit_follows: bool = False) -> list[tuple[str, int]]:
    """Split on ``separator`` outside ``[...]`` (and, with ``unless_digit_follows``, not where the
    next non-blank character is a digit); returns (part, start offset) pairs."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == separator and depth == 0 and not (unless_digit_follows and text[i + 1:].lstrip()[:1].isdigit()):
            parts.append((text[start:i], start))
            start = i + 1
    parts.append((text[start:], start))
    return parts


def _parse_term(spec: str, text: str, offset: int) -> Term:
    m = re.match(r"[^@\[\]]*", text)
    selector = m.group(0) if m else ""
    if not selector:
        raise _error(spec, text or "+", offset, "missing role or strategy name",
                     "a name before @ or [, e.g. attention@last:4")
    method = BUILTIN_STRATEGIES[selector].method if selector in BUILTIN_STRATEGIES else None
    if method is not None and re.search(r"[\[,]init=", text):
        raise _error(spec, text, offset, f"{METHOD_TITLES[method]} initialises its adapters itself and takes no init=",
                     f"{selector} on its own, or init= on a hand-picked arm like full[init=pissa]")
    roles = _parse_selector(spec, selector, offset)
    rest, pos = text[len(selector):], offset + len(selector)
    layers: LayerSelection | None = None
    r = alpha = init = None
    seen: set[str] = set()
    while rest:
        if rest[0] == "@" and "@" not in seen:
            seen.add("@")
            body = re.match(r"[^@\[\]]*", rest[1:]).group(0)  # type: ignore[union-attr]
            layers = parse_layers(spec, body, pos + 1)
            used = 1 + len(body)
        elif rest[0] == "[" and "[" not in seen and "]" in rest:
            seen.add("[")
            body = rest[1:rest.index("]")]
            r, alpha, init = _parse_options(spec, body, pos + 1)
            used = len(body) + 2
        else:
            raise _error(spec, rest, pos, "unexpected text", "at most one @LAYERS and one [OPTIONS] after the name")
        rest, pos = rest[used:], pos + used
    return Term(text, roles, layers, r, alpha, init)


def parse_strategy(spec: str) -> Strategy:
    """A strategy from its spec: a built-in name or a composition in the strategy language.

    Raises:
        LoraplaceError: unknown name or malformed spec; the message quotes the offending part,
            its position, and what was expected.
    """
    spec = "".join(spec.split())
    if spec in BUILTIN_STRATEGIES:
        return BUILTIN_STRATEGIES[spec]
    if spec == AUTO or spec.startswith(AUTO + "[") or spec.startswith(AUTO + "@") or spec.startswith(AUTO + "+"):
        return _parse_auto(spec)
    if not spec:
        raise LoraplaceError("empty strategy; built-in strategies: " + ", ".join(BUILTIN_STRATEGIES))
    if spec.count("[") != spec.count("]"):
        raise _error(spec, spec, 0, "unbalanced brackets", "[OPTIONS] like [r=8]")
    terms = tuple(_parse_term(spec, text, offset) for text, offset in _split_top_level(spec, "+"))
    inits = list(dict.fromkeys(t.init for t in terms if t.init is not None))
    if len(inits) > 1:
        raise LoraplaceError(
            f"invalid strategy {spec!r}: its terms give different initialisations ({', '.join(inits)}); PEFT "
            "initialises an arm's adapters one way: give init= on one term only (it applies to the whole arm)"
        )
    description = " + ".join(_describe(t) for t in terms) + (f"; {INIT_TITLES[inits[0]]}" if inits else "")
    return Strategy(spec, terms=terms, description=description)


def _parse_auto(spec: str) -> Strategy:
    """An ``auto[...]`` strategy; its slots are the modules of ``full``."""
    m = re.fullmatch(r"auto(?:\[([^\[\]]*)\])?", spec)
    if not m:
        where = len(AUTO)
        raise _error(spec, spec[where:], where, "auto takes only [OPTIONS]: it chooses its own layers and cannot be "
                     "combined with other terms", "auto or auto[score=activation,step=4]")
    values: dict[str, object] = {}
    pos = len(AUTO) + 1
    for item in (m[1] or "").split(",") if m[1] else []:
        key, sep, value = item.partition("=")
        if key in values:
            raise _error(spec, item, pos, f"option {key!r} given twice", "each option once")
        if key == "score" and value in AUTO_SCORES:
            values[key] = value
        elif key == "mode" and value in AUTO_MODES:
            values[key] = value
        elif key in ("step", "max_r", "draw") and value.isdigit() and (int(value) >= 1 or key == "draw"):
            values[key] = int(value)
        elif key == "init" and value in INIT_TITLES:
            values[key] = value
        elif key == "init":
            raise _init_error(spec, item, pos)
        elif key == "alpha":
            try:
                values[key] = float(value)
            except ValueError:
                values[key] = -1.0
            if not values[key] > 0:  # type: ignore[operator]
                raise _error(spec, item, pos, "alpha must be a positive number", "alpha=16")
        else:
            expected = (f"score={'|'.join(AUTO_SCORES)}" if key == "score" else f"mode={'|'.join(AUTO_MODES)}"
                        if key == "mode" else f"{key}=INT >= 1" if key in ("step", "max_r") else "draw=INT"
                        if key == "draw" else "score=, mode=, step=, max_r=, draw=, alpha= or init=")
            raise _error(spec, item, pos, "unknown auto option" if not sep or key not in (
                "score", "mode", "step", "max_r", "draw") else "invalid value", expected)
        pos += len(item) + 1
    options = AutoOptions(**values)  # type: ignore[arg-type]
    if options.draw is not None and options.score != "random":
        raise _error(spec, spec, 0, "draw= applies to score=random only", "auto[score=random,draw=1]")
    if options.step and options.max_r and options.max_r < options.step:
        raise _error(spec, spec, 0, "max_r is below step", "max_r >= step")
    what = (f"random placement (draw {options.draw or 0})" if options.score == "random"
            else f"{options.score} score, {options.mode} slots")
    if options.init is not None:
        what += f", {INIT_TITLES[options.init]}"
    full_roles = _SELECTOR_NAMES["full"]
    return Strategy(spec, roles=full_roles, description=f"automatic placement under the arm's budget: {what}",
                    terms=(Term(spec, full_roles),), auto=options)


def _describe(term: Term) -> str:
    text = "|".join(term.roles)
    if term.layers is not None:
        text += f" in layers {term.layers.text}"
    if term.r is not None:
        text += f", r={term.r}"
    if term.alpha is not None:
        text += f", alpha={term.alpha:g}"
    return text


def split_strategy_list(text: str) -> list[str]:
    """Split a comma-separated list of strategies.

    A comma inside ``[...]`` or followed by a digit (a layer list like ``qv@0,3,5``) does not
    separate strategies: no strategy name starts with a digit.
    """
    return [p.strip() for p, _ in _split_top_level(text, ",", unless_digit_follows=True) if p.strip()]


def parse_strategies(specs: str | list[str]) -> list[Strategy]:
    """Strategies from a comma-separated string or a list; rejects duplicates."""
    items = split_strategy_list(specs) if isinstance(specs, str) else [s for s in specs if s.strip()]
    if not items:
        raise LoraplaceError("no strategies given; e.g. --strategies full,attention,ffn")
    strategies = [parse_strategy(s) for s in items]
    names = [s.name for s in strategies]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LoraplaceError(f"strategy listed more than once: {', '.join(dupes)}")
    return strategies
