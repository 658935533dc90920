"""A named registry (lm-evaluation-harness's pattern): entries are added once, by name, where they
are defined, and looking up an unknown name fails with one line that lists the known ones. The
adapter methods (:data:`loraplace.methods.METHODS`) and the importance scores
(:data:`loraplace.importance.SCORES`) are registries."""

from __future__ import annotations

from typing import Generic, TypeVar

from loraplace.errors import LoraplaceError

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """``name -> entry``; ``what`` names the kind of entry in errors (``adapter method``)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` (once; a second registration is a programming error)."""
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self[name] = entry
        return entry

    def get_entry(self, name: str) -> T:
        """The entry ``name``.

        Raises:
            LoraplaceError: an unknown name, listing the available ones.
        """
        try:
            return self[name]
        except KeyError:
            raise LoraplaceError(f"unknown {self.what} {name!r}. Available: {', '.join(sorted(self))}") from None
