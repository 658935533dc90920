"""Plain LoRA (Hu et al., 2021, arXiv:2106.09685) at a placement chosen by hand: a role set, layers,
ranks, or ranks matched to a budget reference. Its behaviour is :class:`loraplace.methods.base.Method`'s
default."""

from __future__ import annotations

from loraplace.methods.base import Method, register

LORA = register(Method())
