"""Reading a change off the labels: which positions of every value hold which members.

A change re-orders the members of *classes* of labels: the features of an input, the categories
of an index input, the units of a hidden axis (`Order`). Every value and parameter of the mapped
graph (keys mode) knows, element by element, which labels it carries; restricted to one class,
an axis whose positions carry that class's members is resized by the change, and an axis whose
positions all carry the same members (a reduction) or none is not. Nothing here knows an
operator: the 400-odd label rules already said where every position came from.

`Sizer.layout` reads, per value and class, the positions along the axes where the members vary
as one sequence of *parts* (the members at each position), after three simplifications:

- one axis: when the members depend on one axis and the others only say where the class is
  present (rows of other inputs concatenated along the tokens), that axis alone;
- repetition: the sequence viewed as [a, b, c] does not vary along b (an LSTM's four gate
  blocks of the same units, key/value heads repeated for grouped-query attention; `loose`:
  skipping rows where the class is absent, for a flattened tokens x channels axis);
- one member on an axis of size one (a single feature, the one channel a split leaves).

`new_layouts` then puts the members of a layout in their new order and gives the new sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._sort import isin, map_distinct, unique, unique_values
from ..labels import EMPTY

__all__ = ["Order", "SizingError", "ClassKey", "Component", "Layout", "Sizer"]

ClassKey = tuple  # (label kind, group): ("unit", "fc1"), ("feature", "obs"), ("category", "tok")


class SizingError(ValueError):
    """The change cannot be expressed in this graph (names the node or parameter at fault)."""


@dataclass
class Order:
    """The new order of a class's members: position -> old member index, or a negative number
    for a new member (each new member its own number)."""
    cls: ClassKey
    members: list
    names: list | None = None          # features / categories: the new names, in order

    @property
    def n_new(self) -> int:
        return sum(1 for m in self.members if m < 0)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True, eq=False)
class Component:
    """Classes that change together (a residual stream's units, coupled by `reach`), read as
    one: each member stands for the member of the root class it shares positions with. Where
    several of them share one axis (a flattened tokens x channels axis, each input's rows
    carrying its own), only together do they show the axis' structure."""
    root: ClassKey
    classes: frozenset
    canon: dict          # class -> {member: root member}
    size: int

    def __hash__(self):
        return hash((self.root, self.classes))


@dataclass
class Layout:
    """One class along one value: the varying axes, the repetition [a, b, c] of the flattened
    positions, and the reduced sequence of parts (frozensets of member indices)."""
    axes: tuple
    sizes: tuple
    abc: tuple
    parts: list
    covers: bool = False      # the parts hold every member of the class
    class_size: int = 0       # members of the class in the old model

    @property
    def singletons(self) -> bool:
        return all(len(p) == 1 for p in self.parts)


class Sizer:
    """Reads the layouts of the classes along every value and parameter of a mapped graph."""

    def __init__(self, traced, imap):
        self.traced, self.imap, self.pool = traced, imap, imap.pool
        self.class_size: dict[ClassKey, int] = self.pool.class_sizes(("unit", "feature", "category"))
        self._restrict: dict[tuple, int] = {}
        self._members: dict[int, frozenset] = {}

    # label sets restricted to one class -----------------------------------------------
    def _member_set(self, set_id: int, cls=None) -> frozenset:
        """The members of a restricted set: label indices, or, for a component, the members of
        its root class they stand for."""
        key = (set_id, cls) if isinstance(cls, Component) else set_id
        m = self._members.get(key)
        if m is None:
            labels = [self.pool.labels[i] for i in self.pool.sets[set_id]]
            if isinstance(cls, Component):
                m = frozenset(cls.canon[(lab.kind, lab.group)][lab.index] for lab in labels)
            else:
                m = frozenset(lab.index for lab in labels)
            self._members[key] = m
        return m

    def size_of(self, cls) -> int:
        return cls.size if isinstance(cls, Component) else self.class_size.get(cls, 0)

    def restrict(self, ids: torch.Tensor, cls: ClassKey) -> torch.Tensor:
        """Each set of `ids` restricted to the labels of a class (or a component's classes),
        in tensor code: members gathered, filtered by class and interned as one batch (a
        policy's 16,000 features made a Label per member per set)."""
        classes = cls.classes if isinstance(cls, Component) else (cls,)
        uniq, inverse = unique(ids)
        todo = [i for i in uniq.tolist() if (i, cls) not in self._restrict]
        if todo:
            sids = torch.tensor(todo, dtype=torch.int64)
            members, seg = self.pool.members(sids)
            keys = self.pool.class_keys()
            keep = isin(self.pool.class_ids(members), [keys.index(c) for c in classes if c in keys])
            got = self.pool.intern_segments(members.masked_select(keep), seg.masked_select(keep), sids.numel())
            self._restrict.update(zip(((i, cls) for i in todo), got.tolist()))
        out = torch.tensor([self._restrict[(i, cls)] for i in uniq.tolist()], dtype=torch.int64)
        return out.index_select(0, inverse.reshape(-1)).reshape(ids.shape)

    def classes_in(self, ids: torch.Tensor) -> set:
        """The classes (units, features, categories) whose labels some set of `ids` holds."""
        members, _ = self.pool.members(unique_values(ids.reshape(-1)))
        if not members.numel():
            return set()
        keys = self.pool.class_keys()
        return {keys[c] for c in unique_values(self.pool.class_ids(members)).tolist()
                if keys[c][0] in ("unit", "feature", "category")}

    # values and parameters --------------------------------------------------------------
    def node_ids(self, node) -> torch.Tensor | None:
        from ..propagate import META_KEY
        lt = (node.meta.get(META_KEY) or {}).get("keys")
        return lt.ids if lt is not None and hasattr(lt, "ids") else None

    def param_ids(self, name: str, cls: ClassKey) -> torch.Tensor | None:
        """The parameter's keys (met and aligned) restricted to a class, compressed: the
        union of its terms' restrictions, dropping terms without the class."""
        e = self.imap.entries[name]
        out = None
        for terms in (e.key_meets, e.key_aligned):
            if terms is None:
                continue
            for t in terms.terms:
                r = self.restrict(t, cls)
                if bool((r == EMPTY).all()):
                    continue
                out = r if out is None else self.pool.union_ids(out, r)
        return out

    def param_classes(self, name: str) -> set:
        e = self.imap.entries[name]
        out = set()
        for terms in (e.key_meets, e.key_aligned):
            for t in (terms.terms if terms is not None else []):
                out |= self.classes_in(t)
        return out

    def layout(self, restricted: torch.Tensor, cls: ClassKey, loose: bool = False,
               shape: tuple | None = None) -> Layout | None:
        """The layout of a class along a value, from its restricted ids; None when no
        position carries the class or every position carries the same members. `loose`:
        repetition may skip positions where the class is absent (a flattened [tokens x
        channels] axis whose rows of other inputs carry other classes)."""
        if restricted is None or restricted.numel() == 0:
            return None
        t, part_of = self._part_ids(restricted, cls)
        axes = tuple(d for d in range(t.dim()) if t.shape[d] > 1 and
                     bool((t != t.narrow(d, 0, 1)).any()))
        if not axes:
            return self._single_member(t, part_of, cls, shape)
        line = _one_axis(t, axes) if len(axes) > 1 else None
        if line is not None:
            # The members depend on one axis; the others only say where the class is present
            # (rows of other inputs concatenated along the tokens, zero-padded channels).
            axes, flat = line
        else:
            # Along the other axes the class does not vary: take index 0 there.
            idx = tuple(slice(None) if d in axes else 0 for d in range(t.dim()))
            flat = t[idx].reshape(-1)
        n = flat.numel()
        a, b, c = _repetition(flat, loose)
        reduced = flat.reshape(a, b, c).max(1).values.reshape(-1).tolist() if loose else \
            flat.reshape(a, b, c)[:, 0, :].reshape(-1).tolist()
        parts = [part_of[s] for s in reduced]
        present = frozenset().union(*parts)
        covers = len(present) == self.size_of(cls)
        sizes = tuple(int(t.shape[d]) for d in axes)
        assert n == _prod(sizes)
        return Layout(axes, sizes, (a, b, c), parts, covers, self.size_of(cls))

    def _part_ids(self, restricted: torch.Tensor, cls) -> tuple[torch.Tensor, list]:
        """The restricted ids renumbered by the members they hold (0: none), and the members of
        each number. Two sets with the same members are one part: for a component, a root
        unit and the coupled unit standing for it (an embedding's channel c and another
        input's channel c, concatenated along the tokens) are the same position."""
        numbers: dict = {frozenset(): 0}
        numbered = map_distinct(restricted, lambda sid: numbers.setdefault(
            self._member_set(sid, cls) if sid != EMPTY else frozenset(), len(numbers)))
        part_of = [None] * len(numbers)
        for members, k in numbers.items():
            part_of[k] = members
        return numbered, part_of

    def _single_member(self, t: torch.Tensor, part_of: list, cls, shape) -> Layout | None:
        """A value that carries the same single member everywhere holds one position of the
        class along an axis of size 1 (a single feature, the one channel a split leaves),
        which nothing tells from a broadcast axis: the last axis of size 1 is taken, the usual
        place of a feature or unit axis (a wrong guess fails the shape check; it is never
        silent)."""
        if shape is None or t.dim() == 0:
            return None
        part = part_of[int(t.reshape(-1)[0])]
        if len(part) != 1:
            return None
        ones = [d for d in range(t.dim()) if shape[d] == 1]
        if not ones:
            return None
        return Layout((ones[-1],), (1,), (1, 1, 1), [part], self.size_of(cls) == 1, self.size_of(cls))

def _one_axis(t: torch.Tensor, axes) -> tuple | None:
    """((d,), the part id at each index along d) when, along every axis but d, the class is
    either absent or the same as wherever else it is present at that index of d."""
    for d in axes:
        rows = t.movedim(d, 0).reshape(t.shape[d], -1)
        present = rows != EMPTY
        big = torch.iinfo(rows.dtype).max
        lo = torch.where(present, rows, torch.full_like(rows, big)).min(1).values
        hi = torch.where(present, rows, torch.full_like(rows, -1)).max(1).values
        has = present.any(1)
        if bool((~has | (lo == hi)).all()):
            return (d,), torch.where(has, hi, torch.zeros_like(hi))
    return None


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def _repetition(flat: torch.Tensor, loose: bool = False) -> tuple[int, int, int]:
    """(a, b, c) with flat.view(a, b, c) constant along b (`loose`: where present), b as large
    as possible."""
    n = flat.numel()
    for b in sorted(_divisors(n), reverse=True):
        if b == 1:
            break
        for c in _divisors(n // b):
            a = n // (b * c)
            v = flat.reshape(a, b, c)
            if not loose:
                if bool((v == v[:, :1, :]).all()):
                    return a, b, c
                continue
            top = v.max(1, keepdim=True).values
            if bool(((v == top) | (v == EMPTY)).all()) and bool((v != EMPTY).any(1).all()):
                return a, b, c
    return n, 1, 1


def _cls(cls) -> str:
    if isinstance(cls, Component):
        return " and ".join(_cls(c) for c in sorted(cls.classes))
    kind, group = cls
    return {"unit": f"the units of {group}", "feature": f"the features of input {group!r}",
            "category": f"the categories of input {group!r}"}.get(kind, f"{kind} {group}")
