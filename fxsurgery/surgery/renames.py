"""The user's renames, `rename={old prefix: new prefix}`: applied to parameter names and
hidden-axis groups, and checked against both models."""
from __future__ import annotations

from typing import Mapping, Sequence

from .errors import SurgeryError, _listing

__all__ = ["rename_prefix", "check_rename"]

# A prefix matches whole name components: "fc" renames "fc.weight" and "fc[3]", not "fc1.weight".
_SEPARATORS = ".:@["


def rename_prefix(name: str, rename: Mapping[str, str] | None) -> str:
    """Applies the longest matching `old prefix -> new prefix` of `rename` to a parameter name or
    a hidden-axis group (a prefix matches whole name components only)."""
    if not rename:
        return name
    best = None
    for old in rename:
        if name == old or (name.startswith(old) and name[len(old)] in _SEPARATORS):
            if best is None or len(old) > len(best):
                best = old
    return name if best is None else rename[best] + name[len(best):]


def _prefix_exists(prefix: str, names) -> bool:
    return any(n == prefix or (n.startswith(prefix) and n[len(prefix)] in _SEPARATORS) for n in names)


def check_rename(rename: Mapping[str, str] | None, old_names: Sequence[str], new_names: Sequence[str]) -> None:
    if not rename:
        return
    if not isinstance(rename, Mapping):
        raise SurgeryError(f"rename must be a dict old name prefix -> new name prefix, got {type(rename).__name__}")
    for old, new in rename.items():
        if not isinstance(old, str) or not isinstance(new, str):
            raise SurgeryError(f"rename {old!r} -> {new!r}: both must be strings")
        if not _prefix_exists(old, old_names):
            raise SurgeryError(f"rename {old!r} -> {new!r}: the old model has no parameter or module named "
                               f"{old!r}; its parameters are {_listing(old_names)}")
        if not _prefix_exists(new, new_names):
            raise SurgeryError(f"rename {old!r} -> {new!r}: the new model has no parameter or module named "
                               f"{new!r}; its parameters are {_listing(new_names)}")
