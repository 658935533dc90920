"""Module roles per architecture family: the one table that says which linear layer does what.

A *role* names what a linear module computes, independent of how an architecture spells it:

=============  ==========================================================
role           meaning
=============  ==========================================================
``attn.q``     query projection            (hidden -> heads * head_dim)
``attn.k``     key projection
``attn.v``     value projection
``attn.qkv``   fused query/key/value       (hidden -> 3 * heads * head_dim)
``attn.o``     attention output projection (heads * head_dim -> hidden)
``mlp.gate``   gated-FFN gate projection   (hidden -> intermediate)
``mlp.up``     FFN up projection           (hidden -> intermediate)
``mlp.gate_up`` fused gate+up projection   (hidden -> 2 * intermediate)
``mlp.down``   FFN down projection         (intermediate -> hidden)
=============  ==========================================================

Roles whose name starts with ``attn.`` form the *attention* group, ``mlp.`` the *ffn* group.
Module paths in a table are relative to one transformer block (``model.layers.7.`` is the
block prefix of ``model.layers.7.self_attn.q_proj``), so the table never relies on suffix
matching: GPT-2's ``attn.c_proj`` and ``mlp.c_proj`` are different rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from loraplace.errors import LoraplaceError

ROLE_GROUPS: Mapping[str, str] = MappingProxyType({"attention": "attn.", "ffn": "mlp."})
"""Group name -> the prefix its roles share."""


@dataclass(frozen=True)
class ArchitectureRoles:
    """How one architecture family names its per-block linear modules.

    Attributes:
        family: short family name shown to users (``"gpt2"``, ``"llama"``).
        model_types: ``config.model_type`` values that use this table.
        roles: role -> module paths relative to a block (a role may have several paths,
            e.g. mixture-of-experts FFNs).
    """

    family: str
    model_types: tuple[str, ...]
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def role_of(self, relative_path: str) -> str | None:
        """The role of a module path relative to its block, or None if it has none."""
        for role, paths in self.roles.items():
            if relative_path in paths:
                return role
        return None


FAMILIES: tuple[ArchitectureRoles, ...] = (
    ArchitectureRoles(
        family="gpt2",
        model_types=("gpt2",),
        # GPT-2 uses transformers' Conv1D (weight shape (in, out)); c_proj exists twice.
        roles={
            "attn.qkv": ("attn.c_attn",),
            "attn.o": ("attn.c_proj",),
            "mlp.up": ("mlp.c_fc",),
            "mlp.down": ("mlp.c_proj",),
        },
    ),
    ArchitectureRoles(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2"),
        roles={
            "attn.q": ("self_attn.q_proj",),
            "attn.k": ("self_attn.k_proj",),
            "attn.v": ("self_attn.v_proj",),
            "attn.o": ("self_attn.o_proj",),
            "mlp.gate": ("mlp.gate_proj",),
            "mlp.up": ("mlp.up_proj",),
            "mlp.down": ("mlp.down_proj",),
        },
    ),
)


def roles_for(model_type: str) -> ArchitectureRoles:
    """The role table for a ``config.model_type``.

    Raises:
        LoraplaceError: the architecture has no table; the message lists the known ones.
    """
    for table in FAMILIES:
        if model_type in table.model_types:
            return table
    known = ", ".join(sorted(t for f in FAMILIES for t in f.model_types))
    raise LoraplaceError(
        f"no role table for model_type {model_type!r}; known model types: {known}. "
        "Use a paper-style literal strategy or add a table in loraplace/placement/roles.py."
    )


def group_of(role: str) -> str | None:
    """``"attention"`` / ``"ffn"`` for a role, or None for roles outside both groups."""
    for group, prefix in ROLE_GROUPS.items():
        if role.startswith(prefix):
            return group
    return None
