"""Labels, the user's description of inputs, and the interned label sets.

A *label* is something the model can be told apart by: an input feature, an embedding
category, an input as a whole, or a hidden unit created by a parameterised operation.
Label sets are interned in a `SetPool` (fxsurgery.setpool, re-exported here).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from .setpool import EMPTY, SetPool

__all__ = ["Label", "Features", "Categories", "SetPool", "EMPTY"]

class Label(NamedTuple):
    """One label. `kind` is "feature", "category", "input" or "unit"; `group` is the input
    argument (features, categories, inputs) or the hidden axis (units); `index` is the
    position along the labelled axis, the category's value, or the unit's position.
    (A named tuple: labels are hashed millions of times on large models.)"""

    kind: str
    group: str
    name: str
    index: int = 0

    def __str__(self) -> str:
        if self.kind == "unit":
            return f"{self.group}[{self.index}]"
        if self.kind == "input":
            return self.group
        return f"{self.group}:{self.name}"


def _check_names(names: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        raise TypeError(f"{what} expects a list of names, got the string {names!r}")
    names = tuple(names)
    if not names:
        raise ValueError(f"{what} needs at least one name")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"{what} names must be strings, got {n!r} ({type(n).__name__})")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise ValueError(f"{what}: duplicate label {n!r} at positions {seen[n]} and {i}")
        seen[n] = i
    return names


class Features:
    """Names the positions along one axis of an input: `Features(["hp", "mana"], dim=-1)`
    says that `x[..., 0]` is "hp" and `x[..., 1]` is "mana"."""

    def __init__(self, names: Sequence[str], dim: int = -1):
        self.names = _check_names(names, "Features")
        if not isinstance(dim, int):
            raise TypeError(f"Features dim must be an int, got {dim!r}")
        self.dim = dim

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other) -> bool:
        return isinstance(other, Features) and (self.names, self.dim) == (other.names, other.dim)

    def __repr__(self) -> str:
        return f"Features({list(self.names)!r}, dim={self.dim})"

    def to_json(self) -> dict:
        return {"features": list(self.names), "dim": self.dim}


class Categories:
    """Names the values of an integer input that indexes an embedding: value `v` is
    category `names[v]`. Every element may hold any category."""

    def __init__(self, names: Sequence[str]):
        self.names = _check_names(names, "Categories")

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other) -> bool:
        return isinstance(other, Categories) and self.names == other.names

    def __repr__(self) -> str:
        return f"Categories({list(self.names)!r})"

    def to_json(self) -> dict:
        return {"categories": list(self.names)}


def description_from_json(entry) -> Features | Categories:
    """Reads one entry of a features file: a list of names (features along the last axis),
    {"features": [...], "dim": d} or {"categories": [...]}."""
    if isinstance(entry, list):
        return Features(entry)
    if isinstance(entry, dict):
        if "features" in entry:
            return Features(entry["features"], dim=entry.get("dim", -1))
        if "categories" in entry:
            return Categories(entry["categories"])
    raise ValueError(f"cannot read input description {entry!r}: expected a list of names, "
                     "{'features': [...], 'dim': d} or {'categories': [...]}")
