"""Labels, the user's description of inputs, and the interned label sets.

A *label* is something the model can be told apart by: an input feature, an embedding
category, an input as a whole, or a hidden unit created by a parameterised operation.
Label sets are hash-consed: each distinct set is stored once in a `SetPool` and referred to
by an integer id, so that label tensors are plain integer tensors and unions are memoised.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch

from ._sort import unique, unique_values

__all__ = ["Label", "Features", "Categories", "SetPool", "EMPTY"]

EMPTY = 0  # id of the empty set in every pool


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


class SetPool:
    """Interned label sets and memoised unions.

    Labels are numbered in the order they are first seen; sets of label numbers are numbered
    in the order they are first interned, id 0 being the empty set. `union_ids` unions two
    broadcastable id tensors element by element while computing each distinct pair once.
    """

    def __init__(self):
        self.labels: list[Label] = []
        self._label_ids: dict[Label, int] = {}
        self.sets: list[frozenset[int]] = [frozenset()]
        self._set_ids: dict[frozenset[int], int] = {frozenset(): EMPTY}
        self._unions: dict[tuple[int, int], int] = {}

    # labels -------------------------------------------------------------------------
    def label_id(self, label: Label) -> int:
        i = self._label_ids.get(label)
        if i is None:
            i = self._label_ids[label] = len(self.labels)
            self.labels.append(label)
        return i

    def find_label(self, label: Label) -> int | None:
        return self._label_ids.get(label)

    # sets ---------------------------------------------------------------------------
    def intern(self, members: Iterable[int]) -> int:
        s = frozenset(members)
        i = self._set_ids.get(s)
        if i is None:
            i = self._set_ids[s] = len(self.sets)
            self.sets.append(s)
        return i

    def singleton(self, label: Label) -> int:
        return self.intern((self.label_id(label),))

    def labels_in(self, set_id: int) -> list[Label]:
        return sorted(self.labels[i] for i in self.sets[set_id])

    def union(self, a: int, b: int) -> int:
        if a == b or b == EMPTY:
            return a
        if a == EMPTY:
            return b
        if a > b:
            a, b = b, a
        r = self._unions.get((a, b))
        if r is None:
            sa, sb = self.sets[a], self.sets[b]
            if sb <= sa:
                r = a
            elif sa <= sb:
                r = b
            else:
                r = self.intern(sa | sb)
            self._unions[(a, b)] = r
        return r

    def union_many(self, ids: Iterable[int]) -> int:
        acc: set[int] = set()
        for i in set(ids):
            acc |= self.sets[i]
        return self.intern(acc)

    def union_ids(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Element-wise union of two broadcastable int64 id tensors."""
        if a.numel() == 1 and b.numel() == 1:
            shape = torch.broadcast_shapes(a.shape, b.shape)
            return torch.tensor(self.union(int(a.reshape(())), int(b.reshape(()))),
                                dtype=torch.int64).reshape(shape)
        if b.numel() == 1 and int(b.reshape(-1)[0]) == EMPTY:
            return a.expand(torch.broadcast_shapes(a.shape, b.shape)) if a.shape != b.shape else a
        if a.numel() == 1 and int(a.reshape(-1)[0]) == EMPTY:
            return b.expand(torch.broadcast_shapes(a.shape, b.shape)) if a.shape != b.shape else b
        a, b = torch.broadcast_tensors(a, b)
        if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
            return a.contiguous()
        n = len(self.sets)
        pair = (a.reshape(-1) * n + b.reshape(-1))
        uniq, inverse = unique(pair)
        ua, ub = (uniq // n).tolist(), (uniq % n).tolist()
        out = torch.tensor([self.union(x, y) for x, y in zip(ua, ub)], dtype=torch.int64)
        return out[inverse].reshape(a.shape)

    def reduce_ids(self, ids: torch.Tensor, dims: Sequence[int], keepdim: bool = True) -> torch.Tensor:
        """Union of an id tensor over `dims` (axes of size 1 are already reduced)."""
        dims = sorted({d % ids.dim() for d in dims}) if ids.dim() else []
        for d in dims:
            ids = self._reduce_dim(ids, d)
        if not keepdim:
            for d in reversed(dims):
                ids = ids.squeeze(d)
        return ids

    def _reduce_dim(self, ids: torch.Tensor, d: int) -> torch.Tensor:
        # Halving tree: log2(n) vectorised unions, each computing a distinct pair only once.
        while ids.shape[d] > 1:
            n = ids.shape[d]
            half = n // 2
            lo, hi = ids.narrow(d, 0, half), ids.narrow(d, half, half)
            merged = self.union_ids(lo, hi)
            if n % 2:
                merged = torch.cat([merged, ids.narrow(d, n - 1, 1)], d)
            ids = merged
        return ids

    def segment_union(self, ids: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
        """For each segment s in range(n_segments), the union of ids[segment == s]."""
        ids, segment = ids.reshape(-1), segment.reshape(-1)
        n = len(self.sets)
        uniq = unique_values(segment * n + ids)
        segs, vals = (uniq // n).tolist(), (uniq % n).tolist()
        out = [EMPTY] * n_segments
        for s, v in zip(segs, vals):
            out[s] = self.union(out[s], v)
        return torch.tensor(out, dtype=torch.int64)

    def contains_table(self, label_id: int) -> torch.Tensor:
        """Boolean per set id: does the set hold this label."""
        return torch.tensor([label_id in s for s in self.sets], dtype=torch.bool)
