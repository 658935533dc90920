"""Role inference for architectures without a written table in :mod:`loraplace.placement.roles`.

The block stack is found from module names (``<stack>.<index>.<path>``); each linear module of
a block is classified by its container (attention vs MLP, from the names of the modules that
hold it) and its own name, with shapes as a check. Whatever cannot be classified unambiguously
stops the inference: guessing wrong would silently run a different experiment.
"""

from __future__ import annotations

from torch import nn

from loraplace.errors import LoraplaceError
from loraplace.placement.params import linear_modules
from loraplace.placement.roles import BLOCK_NAME, ArchitectureRoles

# Last path component -> role, per container kind. Only names whose meaning is unambiguous
# inside that container are listed.
_ATTENTION_NAMES = {
    "attn.q": {"q", "q_proj", "query", "wq", "q_lin"},
    "attn.k": {"k", "k_proj", "key", "wk", "k_lin"},
    "attn.v": {"v", "v_proj", "value", "wv", "v_lin"},
    "attn.qkv": {"qkv", "qkv_proj", "c_attn", "query_key_value", "wqkv", "in_proj"},
    "attn.o": {"o", "o_proj", "out_proj", "dense", "c_proj", "out_lin", "wo", "proj"},
}
_MLP_NAMES = {
    "mlp.gate": {"gate_proj", "w1", "wi_0"},
    "mlp.up": {"up_proj", "fc1", "fc_in", "c_fc", "dense_h_to_4h", "wi", "wi_1", "w3", "lin1"},
    "mlp.gate_up": {"gate_up_proj"},
    "mlp.down": {"down_proj", "fc2", "fc_out", "c_proj", "dense_4h_to_h", "wo", "w2", "lin2"},
}
_ATTENTION_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "ffn", "feed_forward", "feedforward")


def _container_kind(rel: str) -> str | None:
    """``"attention"``, ``"mlp"`` or None from the containers of a block-relative path."""
    containers = rel.split(".")[:-1]
    kinds = set()
    for part in containers:
        low = part.lower()
        if any(h in low for h in _ATTENTION_HINTS):
            kinds.add("attention")
        elif any(h in low for h in _MLP_HINTS):
            kinds.add("mlp")
    return kinds.pop() if len(kinds) == 1 else None


def _classify(rel: str, shape: tuple[int, int], hidden: int | None) -> str | None:
    """A role for one block-relative linear path, or None when unsure."""
    kind = _container_kind(rel)
    leaf = rel.split(".")[-1].lower()
    table = _ATTENTION_NAMES if kind == "attention" else _MLP_NAMES if kind == "mlp" else None
    if table is None:
        return None
    for role, names in table.items():
        if leaf in names:
            in_f, out_f = shape
            if hidden is not None:
                # Shapes must agree with the name: an FFN "down" maps back to the hidden size, etc.
                if role in ("mlp.up", "mlp.gate", "mlp.gate_up", "attn.q", "attn.k", "attn.v", "attn.qkv") and in_f != hidden:
                    return None
                if role in ("mlp.down", "attn.o") and out_f != hidden:
                    return None
            return role
    return None


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def infer_roles(model: nn.Module, model_type: str) -> ArchitectureRoles:
    """A role table derived from ``model``'s module tree.

    Returns:
        An :class:`ArchitectureRoles` with ``inferred=True`` and family ``"<model_type> (inferred)"``.

    Raises:
        LoraplaceError: a block's linear module has no clear role, or two modules of one block
            would get the same role; the message lists the model's linear modules.
    """
    shapes = linear_modules(model)
    hidden = _hidden_size(model)
    roles: dict[str, set[str]] = {}
    problems: list[str] = []
    per_block: dict[tuple[str, int], dict[str, str]] = {}
    for name, shape in shapes.items():
        match = BLOCK_NAME.match(name)
        if not match:
            continue  # embeddings, heads: outside the blocks, opt-in roles only
        rel = match["rel"]
        role = _classify(rel, shape, hidden)
        if role is None:
            problems.append(f"no clear role for {rel!r} (shape {shape[0]}->{shape[1]})")
            continue
        block = per_block.setdefault((match["stack"], int(match["layer"])), {})
        if role in block and block[role] != rel:
            problems.append(f"{block[role]!r} and {rel!r} would both be {role}")
        block[role] = rel
        roles.setdefault(role, set()).add(rel)
    if not per_block and not problems:
        problems.append("no numbered block stack (like model.layers.0...) holds a linear module")
    if problems:
        names = list(shapes)
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise LoraplaceError(
            f"model_type {model_type!r} has no role table and its roles cannot be inferred safely: "
            f"{'; '.join(sorted(set(problems))[:5])}. Its linear modules are: {shown}. "
            "Add a table in loraplace/placement/roles.py, or use a literal strategy."
        )
    return ArchitectureRoles(
        family=f"{model_type} (inferred)",
        model_types=(model_type,),
        roles={role: tuple(sorted(paths)) for role, paths in roles.items()},
        inferred=True,
    )
