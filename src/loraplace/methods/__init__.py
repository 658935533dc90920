"""Adapter methods, one module each, registered once (:data:`METHODS`): plain LoRA at a hand-picked
placement (:mod:`~loraplace.methods.lora`), automatic placement from importance scores
(:mod:`~loraplace.methods.auto`), EVA (:mod:`~loraplace.methods.eva`) and AdaLoRA
(:mod:`~loraplace.methods.adalora`); data-driven initialisations beside them (EVA's in
:mod:`~loraplace.methods.eva`, LoRA-GA's and CorDA's in :mod:`~loraplace.methods.starts`). The study, the checks, the run recipe and the ``plan`` command
ask :func:`method_of` for an arm's method instead of testing its name; the protocol is
:class:`~loraplace.methods.base.Method`. A new method is one module that ends in ``register(...)``
and one import line here."""

from loraplace.methods import adalora, auto, eva, lora, starts  # noqa: F401  (each registers its method or inits)
from loraplace.methods.base import INITIALISERS, METHODS, Method, get_method, method_of, register, resolve_arm

__all__ = ["INITIALISERS", "METHODS", "Method", "get_method", "method_of", "register", "resolve_arm"]
