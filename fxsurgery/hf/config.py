"""The new configuration: each requested change resolved to the field the model's config uses.

Model families name the same size differently (GPT-2's `n_embd` and `n_inner`, T5's `d_model`
and `d_ff`, OPT's `ffn_dim`). transformers maps some of them (`config.attribute_map`: GPT-2's
`hidden_size` is `n_embd`); the rest are listed here, so that `resize(model,
intermediate_size=256)` means the same thing on every family. A change that no field of the
config expresses is an error naming the field, never a silent no-op: a config accepts any
attribute, and an unknown one would just be ignored by the model.
"""
from __future__ import annotations

import copy

from ..surgery.errors import SurgeryError

__all__ = ["SIZE_FIELDS", "resolve_changes", "new_config", "layers_field", "hidden_field"]

# The usual name -> the names other families give the same size (first found wins).
SIZE_FIELDS = {
    "vocab_size": (),
    "hidden_size": ("n_embd", "d_model", "dim"),
    "intermediate_size": ("n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim", "hidden_dim"),
    "num_attention_heads": ("n_head", "num_heads", "n_heads"),
    "num_key_value_heads": ("num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "num_hidden_layers": ("n_layer", "num_layers", "n_layers"),
    "head_dim": ("d_kv",),
    "num_channels": ("in_channels",),
}


def _has(config, name: str) -> bool:
    return name in getattr(config, "attribute_map", {}) or name in config.to_dict() or hasattr(config, name)


def _field(config, name: str) -> str:
    """The attribute of `config` that holds the size called `name` (through the config's own
    attribute_map: GPT-2's num_hidden_layers is n_layer)."""
    mapped = getattr(config, "attribute_map", {})
    if _has(config, name):
        return mapped.get(name, name)
    for usual, others in SIZE_FIELDS.items():
        names = (usual, *others)
        if name in names:
            for other in names:
                if _has(config, other):
                    return mapped.get(other, other)
    sizes = [n for usual, others in SIZE_FIELDS.items() for n in (usual, *others) if _has(config, n)]
    raise SurgeryError(f"resize: {type(config).__name__} has no field {name!r}, so the change {name}=... "
                       f"cannot be expressed; its size fields are {', '.join(sorted(set(sizes))) or 'none'}")


def resolve_changes(config, changes: dict) -> dict:
    """{config attribute: new value}, each value checked to be a positive integer (or None
    where the config allows it, as GPT-2's n_inner: 4 x hidden)."""
    out = {}
    for name, value in changes.items():
        attr = _field(config, name)
        if attr in out:
            raise SurgeryError(f"resize: {name}=... and another argument both set {type(config).__name__}.{attr}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            if not (value is None and getattr(config, attr, 0) is None):
                raise SurgeryError(f"resize: {name} must be a positive integer, got {value!r}")
        out[attr] = value
    return out


def new_config(config, fields: dict):
    """A copy of `config` with `fields` set. A change of heads or of the stream's width keeps
    each head's width: a config without a `head_dim` field (Qwen2, Mistral read
    `getattr(config, "head_dim", hidden // heads)`) is given the old one, so that new heads are
    whole heads of the old width and a wider stream keeps its heads. (GPT-2 and BERT compute
    the head width from the stream's: there the heads must grow with it.)"""
    new = copy.deepcopy(config)
    heads = _field(config, "num_attention_heads") if _has_any(config, "num_attention_heads") else None
    width = _field(config, "hidden_size") if _has_any(config, "hidden_size") else None
    if heads and width and (heads in fields or width in fields) and not _has_any(config, "head_dim"):
        hidden = getattr(config, width)
        if hidden and getattr(config, heads) and hidden % getattr(config, heads) == 0:
            new.head_dim = hidden // getattr(config, heads)
    for attr, value in fields.items():
        setattr(new, attr, value)
    return new


def layers_field(config, fields: dict) -> str | None:
    """The config attribute of the layer count, if `fields` changes it."""
    for name in ("num_hidden_layers", *SIZE_FIELDS["num_hidden_layers"]):
        if _has(config, name) and _field(config, name) in fields:
            return _field(config, name)
    return None


def hidden_field(config, fields: dict) -> str | None:
    """The config attribute of the residual stream's width, if `fields` changes it."""
    for name in ("hidden_size", *SIZE_FIELDS["hidden_size"]):
        if _has(config, name) and _field(config, name) in fields:
            return _field(config, name)
    return None


def _has_any(config, usual: str) -> bool:
    return any(_has(config, n) for n in (usual, *SIZE_FIELDS.get(usual, ())))
