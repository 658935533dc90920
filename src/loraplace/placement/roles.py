"""Module roles per architecture family: the one table that says which linear layer does what.

A *role* names what a linear module computes, independent of how an architecture spells it:

================  ==========================================================
role              meaning
================  ==========================================================
``attn.q``        query projection            (hidden -> heads * head_dim)
``attn.k``        key projection
``attn.v``        value projection
``attn.qkv``      fused query/key/value       (hidden -> 3 * heads * head_dim)
``attn.o``        attention output projection (heads * head_dim -> hidden)
``xattn.q/k/v/o`` cross-attention (encoder-decoder models' decoder blocks)
``mlp.gate``      gated-FFN gate projection   (hidden -> intermediate)
``mlp.up``        FFN up projection           (hidden -> intermediate)
``mlp.gate_up``   fused gate+up projection    (hidden -> 2 * intermediate)
``mlp.down``      FFN down projection         (intermediate -> hidden)
``embed``         input token embedding (opt-in; never part of a group)
``lm_head``       output projection to the vocabulary (opt-in; never part of a group)
================  ==========================================================

Roles whose name starts with ``attn.`` form the *self-attention* group, ``xattn.`` the
*cross-attention* group, ``mlp.`` the *ffn* group. Module paths in a table are relative to
one transformer block (``model.layers.7.`` is the block prefix of
``model.layers.7.self_attn.q_proj``), so the table never relies on suffix matching: GPT-2's
``attn.c_proj`` and ``mlp.c_proj`` are different rows.

Mixture-of-experts FFNs (Mixtral) store all experts of a block in 3-D parameters rather than
``nn.Linear`` modules; those are listed under ``expert_params`` (paths of parameters relative to
a block) and count as FFN roles. The router is listed under ``never`` and is never adapted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from loraplace.errors import LoraplaceError

BLOCK_NAME = re.compile(r"^(?P<stack>.+?)\.(?P<layer>\d+)\.(?P<rel>.+)$")
"""``<stack>.<layer index>.<path inside the block>``, e.g. ``model.layers.7.self_attn.q_proj``."""

ROLE_GROUPS: Mapping[str, str] = MappingProxyType({"attention": "attn.", "cross-attention": "xattn.", "ffn": "mlp."})
"""Group name -> the prefix its roles share."""

BLOCK_ROLES: tuple[str, ...] = (
    "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o",
    "xattn.q", "xattn.k", "xattn.v", "xattn.o",
    "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down",
)
"""Every role a module inside a transformer block can have, in display order."""

OUTER_ROLES: tuple[str, ...] = ("embed", "lm_head")
"""Roles of modules outside the block stack; only adapted when a strategy names them."""

ALL_ROLES: tuple[str, ...] = BLOCK_ROLES + OUTER_ROLES


@dataclass(frozen=True)
class ArchitectureRoles:
    """How one architecture family names its per-block linear modules.

    Attributes:
        family: short family name shown to users (``"gpt2"``, ``"llama"``).
        model_types: ``config.model_type`` values that use this table.
        roles: role -> module paths relative to a block (a role may have several paths, e.g.
            T5's FFN sits in ``layer.1`` of encoder blocks and ``layer.2`` of decoder blocks).
        expert_params: role -> paths of 3-D expert parameters relative to a block (MoE).
        never: paths relative to a block that must never be adapted (MoE routers).
        inferred: True when the table was derived from the module tree, not written here.
    """

    family: str
    model_types: tuple[str, ...]
    roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    expert_params: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    never: tuple[str, ...] = ()
    inferred: bool = False

    def role_of(self, relative_path: str) -> str | None:
        """The role of a module path relative to its block, or None if it has none."""
        if relative_path in self.never:
            return None
        for role, paths in self.roles.items():
            if relative_path in paths:
                return role
        return None

    def expert_role_of(self, relative_path: str) -> str | None:
        """The role of an expert parameter path relative to its block, or None."""
        for role, paths in self.expert_params.items():
            if relative_path in paths:
                return role
        return None


_LLAMA_ROLES = {
    "attn.q": ("self_attn.q_proj",),
    "attn.k": ("self_attn.k_proj",),
    "attn.v": ("self_attn.v_proj",),
    "attn.o": ("self_attn.o_proj",),
}
_NEOX_STYLE = {  # GPT-NeoX names its attention "attention", BLOOM and Falcon "self_attention"
    "mlp.up": ("mlp.dense_h_to_4h",),
    "mlp.down": ("mlp.dense_4h_to_h",),
}

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
        family="gptj",
        model_types=("gptj",),
        roles={
            "attn.q": ("attn.q_proj",),
            "attn.k": ("attn.k_proj",),
            "attn.v": ("attn.v_proj",),
            "attn.o": ("attn.out_proj",),
            "mlp.up": ("mlp.fc_in",),
            "mlp.down": ("mlp.fc_out",),
        },
    ),
    ArchitectureRoles(
        family="gpt_neox",
        model_types=("gpt_neox",),
        roles={"attn.qkv": ("attention.query_key_value",), "attn.o": ("attention.dense",), **_NEOX_STYLE},
    ),
    ArchitectureRoles(
        family="bloom",
        model_types=("bloom",),
        roles={"attn.qkv": ("self_attention.query_key_value",), "attn.o": ("self_attention.dense",), **_NEOX_STYLE},
    ),
    ArchitectureRoles(
        family="falcon",
        model_types=("falcon",),
        # query_key_value is fused q + (shared or grouped) k, v: one module, so one role.
        roles={"attn.qkv": ("self_attention.query_key_value",), "attn.o": ("self_attention.dense",), **_NEOX_STYLE},
    ),
    ArchitectureRoles(
        family="opt",
        model_types=("opt",),
        roles={
            "attn.q": ("self_attn.q_proj",),
            "attn.k": ("self_attn.k_proj",),
            "attn.v": ("self_attn.v_proj",),
            "attn.o": ("self_attn.out_proj",),
            "mlp.up": ("fc1",),
            "mlp.down": ("fc2",),
        },
    ),
    ArchitectureRoles(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2"),
        roles={
            **_LLAMA_ROLES,
            "mlp.gate": ("mlp.gate_proj",),
            "mlp.up": ("mlp.up_proj",),
            "mlp.down": ("mlp.down_proj",),
        },
    ),
    ArchitectureRoles(
        family="phi3",
        model_types=("phi3",),
        roles={
            "attn.qkv": ("self_attn.qkv_proj",),
            "attn.o": ("self_attn.o_proj",),
            "mlp.gate_up": ("mlp.gate_up_proj",),
            "mlp.down": ("mlp.down_proj",),
        },
    ),
    ArchitectureRoles(
        family="mixtral",
        model_types=("mixtral",),
        roles=dict(_LLAMA_ROLES),
        # All experts of a block live in two 3-D parameters: (experts, 2 * intermediate, hidden)
        # and (experts, hidden, intermediate).
        expert_params={"mlp.gate_up": ("mlp.experts.gate_up_proj",), "mlp.down": ("mlp.experts.down_proj",)},
        never=("mlp.gate",),
    ),
    ArchitectureRoles(
        family="bert",
        model_types=("bert", "roberta"),
        roles={
            "attn.q": ("attention.self.query",),
            "attn.k": ("attention.self.key",),
            "attn.v": ("attention.self.value",),
            "attn.o": ("attention.output.dense",),
            "mlp.up": ("intermediate.dense",),
            "mlp.down": ("output.dense",),
        },
    ),
    ArchitectureRoles(
        family="t5",
        model_types=("t5",),
        # Encoder blocks: layer.0 self-attention, layer.1 FFN. Decoder blocks: layer.0
        # self-attention, layer.1 cross-attention, layer.2 FFN. Gated FFNs (T5 v1.1, flan-t5)
        # split wi into wi_0 (gate) and wi_1 (up).
        roles={
            "attn.q": ("layer.0.SelfAttention.q",),
            "attn.k": ("layer.0.SelfAttention.k",),
            "attn.v": ("layer.0.SelfAttention.v",),
            "attn.o": ("layer.0.SelfAttention.o",),
            "xattn.q": ("layer.1.EncDecAttention.q",),
            "xattn.k": ("layer.1.EncDecAttention.k",),
            "xattn.v": ("layer.1.EncDecAttention.v",),
            "xattn.o": ("layer.1.EncDecAttention.o",),
            "mlp.gate": ("layer.1.DenseReluDense.wi_0", "layer.2.DenseReluDense.wi_0"),
            "mlp.up": (
                "layer.1.DenseReluDense.wi", "layer.2.DenseReluDense.wi",
                "layer.1.DenseReluDense.wi_1", "layer.2.DenseReluDense.wi_1",
            ),
            "mlp.down": ("layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo"),
        },
    ),
    ArchitectureRoles(
        family="bart",
        model_types=("bart",),
        roles={
            "attn.q": ("self_attn.q_proj",),
            "attn.k": ("self_attn.k_proj",),
            "attn.v": ("self_attn.v_proj",),
            "attn.o": ("self_attn.out_proj",),
            "xattn.q": ("encoder_attn.q_proj",),
            "xattn.k": ("encoder_attn.k_proj",),
            "xattn.v": ("encoder_attn.v_proj",),
            "xattn.o": ("encoder_attn.out_proj",),
            "mlp.up": ("fc1",),
            "mlp.down": ("fc2",),
        },
    ),
)


def known_model_types() -> list[str]:
    """Every ``config.model_type`` with a written role table, sorted."""
    return sorted(t for f in FAMILIES for t in f.model_types)


def roles_for(model_type: str) -> ArchitectureRoles:
    """The role table for a ``config.model_type``.

    Raises:
        LoraplaceError: the architecture has no table; the message lists the known ones.
    """
    for table in FAMILIES:
        if model_type in table.model_types:
            return table
    raise LoraplaceError(
        f"no role table for model_type {model_type!r}; known model types: {', '.join(known_model_types())}. "
        "Use a paper-style literal strategy or add a table in loraplace/placement/roles.py."
    )


def group_of(role: str) -> str | None:
    """``"attention"`` / ``"cross-attention"`` / ``"ffn"`` for a role, or None for roles outside them."""
    for group, prefix in ROLE_GROUPS.items():
        if role.startswith(prefix):
            return group
    return None
