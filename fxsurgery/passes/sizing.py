"""How far a requested change reaches: the new size of every axis, read off the labels.

A change re-orders the members of *classes* of labels: the features of an input, the categories
of an index input, the units of a hidden axis (`Order`). Every value and parameter of the mapped
graph (keys mode) knows, element by element, which labels it carries; restricted to one class,
an axis whose positions carry that class's members one by one (a feature axis, a unit axis,
the rows of an LSTM gate block, the heads of an attention) is resized by the change, and an
axis whose positions all carry the same members (a reduction) or none is not. Nothing here
knows an operator: the 400-odd label rules already said where every position came from.

Per value and class, the positions along the axes where the class's members vary are read as
one sequence of *parts* (the members at each position). Three structures are recognised:

- repetition: the sequence viewed as [a, b, c] does not vary along b (an LSTM's four gate
  blocks of the same units, key/value heads repeated for grouped-query attention);
- blocks: each remaining position holds B members, the positions partition the members
  (B = 1: a feature or unit axis; B = head size: the heads axis of an attention);
- a window: positions without members (other features or units concatenated along the same
  axis) stay in place around the run of positions that carry the class.

The new sequence puts the members in their new order (new members where the order has them,
in blocks of B), and the new sizes of the axes follow; when several axes vary jointly (a view
that splits units into heads), the one axis whose size can change while every old position
keeps its coordinates along the others is chosen.

Two classes that index the same axis position by position (a residual stream: the embedding's
units and every layer's output units that are added into it) must change together: `closure`
extends the change to them, and refuses when the other class is an input's features (the
axis would also be a fixed-size input).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..labels import EMPTY

__all__ = ["Order", "SizingError", "ClassKey", "Sizer"]

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
        self.class_size: dict[ClassKey, int] = {}
        for lab in self.pool.labels:
            if lab.kind in ("unit", "feature", "category"):
                k = (lab.kind, lab.group)
                self.class_size[k] = max(self.class_size.get(k, 0), lab.index + 1)
        self._restrict: dict[tuple, int] = {}
        self._members: dict[int, frozenset] = {}

    # label sets restricted to one class -----------------------------------------------
    def _restricted_id(self, set_id: int, cls: ClassKey) -> int:
        key = (set_id, cls)
        r = self._restrict.get(key)
        if r is None:
            labels = self.pool.labels
            keep = [i for i in self.pool.sets[set_id] if (labels[i].kind, labels[i].group) == cls]
            r = self._restrict[key] = self.pool.intern(keep) if keep else EMPTY
        return r

    def _member_set(self, set_id: int) -> frozenset:
        m = self._members.get(set_id)
        if m is None:
            m = self._members[set_id] = frozenset(self.pool.labels[i].index for i in self.pool.sets[set_id])
        return m

    def restrict(self, ids: torch.Tensor, cls: ClassKey) -> torch.Tensor:
        uniq, inv = torch.unique(ids, return_inverse=True)
        table = torch.tensor([self._restricted_id(int(s), cls) for s in uniq.tolist()], dtype=torch.int64)
        return table[inv]

    def classes_in(self, ids: torch.Tensor) -> set:
        labels = self.pool.labels
        out = set()
        for s in torch.unique(ids).tolist():
            for i in self.pool.sets[int(s)]:
                if labels[i].kind in ("unit", "feature", "category"):
                    out.add((labels[i].kind, labels[i].group))
        return out

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
        t = restricted
        axes = tuple(d for d in range(t.dim()) if t.shape[d] > 1 and
                     bool((t != t.narrow(d, 0, 1)).any()))
        if not axes:
            return self._single_member(t, cls, shape)
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
        parts = [self._member_set(s) for s in reduced]
        present = frozenset().union(*parts)
        covers = len(present) == self.class_size.get(cls, -1)
        sizes = tuple(int(t.shape[d]) for d in axes)
        assert n == _prod(sizes)
        return Layout(axes, sizes, (a, b, c), parts, covers, self.class_size.get(cls, 0))

    def _single_member(self, t: torch.Tensor, cls: ClassKey, shape) -> Layout | None:
        """A value that carries the same single member everywhere holds one position of the
        class along an axis of size 1 (a single feature, the one channel a split leaves),
        which nothing tells from a broadcast axis: the last axis of size 1 is taken, the usual
        place of a feature or unit axis (a wrong guess fails the shape check; it is never
        silent)."""
        if shape is None or t.dim() == 0:
            return None
        part = self._member_set(int(t.reshape(-1)[0]))
        if len(part) != 1:
            return None
        ones = [d for d in range(t.dim()) if shape[d] == 1]
        if not ones:
            return None
        return Layout((ones[-1],), (1,), (1, 1, 1), [part], self.class_size.get(cls) == 1,
                      self.class_size.get(cls, 0))

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


# resizing one layout ----------------------------------------------------------------------

def resize_parts(lay: Layout, order: Order, where: str) -> list:
    """The new reduced sequence of parts (frozensets; new members as negative numbers)."""
    parts = lay.parts
    nonempty = [i for i, p in enumerate(parts) if p]
    if not nonempty:
        return list(parts)
    s, e = nonempty[0], nonempty[-1] + 1
    if len(nonempty) != e - s:
        raise SizingError(f"{where}: the positions of {_cls(order.cls)} are interleaved with other positions; "
                          "the change cannot be placed")
    run = parts[s:e]
    B = len(run[0])
    if any(len(p) != B for p in run) or len(frozenset().union(*run)) != B * len(run):
        raise SizingError(f"{where}: the positions of {_cls(order.cls)} overlap (each holds several members "
                          "shared with others); the change cannot be placed")
    present = frozenset().union(*run)
    strided = _strided_subset(run, present, order, lay.class_size)
    if strided is not None:
        return list(parts[:s]) + strided + list(parts[e:])
    # The members this run owns in the new order: its old members, and the new members that
    # follow one of them (or lead the order, when the run holds the first old member).
    first_old = next((m for m in order.members if m >= 0), None)
    owner = first_old in present if first_old is not None else True
    tokens = []
    for m in order.members:
        if m >= 0:
            owner = m in present
            if owner:
                tokens.append(m)
        elif owner:
            tokens.append(m)
    if len(tokens) % B:
        raise SizingError(f"{where}: takes {_cls(order.cls)} in blocks of {B} (heads, gates), but the change "
                          f"leaves {len(tokens)} members there, not a multiple of {B}")
    blocks = [frozenset(tokens[i:i + B]) for i in range(0, len(tokens), B)]
    old_blocks = set(run)
    bad = next((blk for blk in blocks if not (blk in old_blocks or all(m < 0 for m in blk))), None)
    if bad is None:
        firsts = [min(blk) for blk in run]
        if firsts != sorted(firsts):
            # The positions hold the members out of their own order (rotary's rotate_half puts
            # the second half of each head first): old positions stay where they are, new
            # blocks go before the old one they precede in the order. (Positions in member
            # order follow the new order instead: that is what a reordering asks.)
            blocks = _keep_positions(run, blocks, old_blocks)
    if bad is not None:
        patterned = _pattern_blocks(run, tokens, B)
        if patterned is None:
            patterned = _transversal_blocks(run, tokens)
        if patterned is None:
            raise SizingError(f"{where}: takes {_cls(order.cls)} in blocks of {B} (heads, gates); the change "
                              f"breaks a block ({sorted(bad)}): add or remove whole blocks")
        blocks = patterned
    return list(parts[:s]) + blocks + list(parts[e:])


def _strided_subset(run: list, present: frozenset, order: Order, size: int) -> list | None:
    """A value that holds the same offsets R of every group of P consecutive members (the second
    half of each head's dimensions, sliced off for rotary embeddings): when the order keeps
    every old member and adds whole groups at the end, the new positions are the old ones
    followed by the offsets R of each new group, in the old positions' pattern. None when the
    members present are not such a subset (then they are a range, handled by ownership)."""
    if not size or len(present) == size or max(present) - min(present) + 1 == len(present):
        return None
    for P in range(2, size):
        if size % P:
            continue
        R = sorted({m % P for m in present})
        if present != frozenset(g * P + r for g in range(size // P) for r in R):
            continue
        old = [m for m in order.members if m >= 0]
        new = [m for m in order.members if m < 0]
        if old != list(range(size)) or order.members[:size] != old or len(new) % P:
            return None
        patterns = [sorted(m % P for m in part) for part in run if all(m < P for m in part)]
        return list(run) + [frozenset(chunk[r] for r in pat)
                            for chunk in (new[i:i + P] for i in range(0, len(new), P)) for pat in patterns]
    return None


def _keep_positions(run: list, blocks: list, old_blocks: set) -> list:
    survivors = set(blk for blk in blocks if blk in old_blocks)
    before: dict = {}
    pending = []
    for blk in blocks:
        if blk in old_blocks:
            before[blk] = pending
            pending = []
        else:
            pending.append(blk)
    out = []
    for blk in run:
        if blk in survivors:
            out.extend(before.get(blk, []))
            out.append(blk)
    return out + pending


def _pattern_blocks(run: list, tokens: list, B: int) -> list | None:
    """Blocks that are not runs of consecutive members but follow one pattern within each
    group of P consecutive members (rotary embeddings pair member d with d + head_dim / 2
    inside each head): the new order must then come in whole groups, and a group of new
    members gets the old groups' pattern. None when there is no such P."""
    members = sorted(frozenset().union(*run))
    rank = {m: i for i, m in enumerate(members)}
    for P in range(2 * B, len(members) + 1, B):
        if len(members) % P:
            continue
        group_of = [{rank[m] // P for m in part} for part in run]
        if any(len(g) != 1 for g in group_of):
            continue
        groups = [next(iter(g)) for g in group_of]
        if groups != sorted(groups):      # each group's positions together, groups in order
            continue
        pattern = [tuple(sorted(rank[m] % P for m in part)) for part, g in zip(run, groups) if g == 0]
        per_group = {}
        for part, g in zip(run, groups):
            per_group.setdefault(g, []).append(tuple(sorted(rank[m] % P for m in part)))
        if any(p != pattern for p in per_group.values()):
            continue
        if len(tokens) % P:
            return None
        by_members = {frozenset(members[g * P:(g + 1) * P]): g for g in per_group}
        blocks = []
        for i in range(0, len(tokens), P):
            chunk = tokens[i:i + P]
            if all(m >= 0 for m in chunk) and frozenset(chunk) in by_members:
                g = by_members[frozenset(chunk)]
                blocks.extend(part for part, gg in zip(run, groups) if gg == g)
            elif all(m < 0 for m in chunk):
                blocks.extend(frozenset(chunk[r] for r in p) for p in pattern)
            else:
                return None
        return blocks
    return None


def _transversal_blocks(run: list, tokens: list) -> list | None:
    """Positions that each hold the same pattern of members from every group of P consecutive
    members (the head_dim axis of a [heads, head_dim] split seen from one head_dim position, a
    rotary frequency met by every head): a change in whole groups keeps the number of
    positions, and each position takes its pattern from the new groups too."""
    members = sorted(frozenset().union(*run))
    rank = {m: i for i, m in enumerate(members)}
    for P in range(1, len(members)):
        if len(members) % P or len(members) // P < 2:
            continue
        n_groups = len(members) // P
        patterns = []
        for part in run:
            by_group: dict[int, set] = {}
            for m in part:
                by_group.setdefault(rank[m] // P, set()).add(rank[m] % P)
            if len(by_group) != n_groups or len({frozenset(v) for v in by_group.values()}) != 1:
                break
            patterns.append(sorted(next(iter(by_group.values()))))
        else:
            if len(tokens) % P:
                return None
            chunks = [tokens[i:i + P] for i in range(0, len(tokens), P)]
            new = [c for c in chunks if all(m < 0 for m in c)]
            if any(not all(m < 0 for m in c) and not all(m >= 0 for m in c) for c in chunks):
                return None
            kept = frozenset(m for c in chunks if all(m >= 0 for m in c) for m in c)
            if kept != frozenset(members):
                return None   # whole old groups removed: not handled here
            return [frozenset(part) | frozenset(c[r] for c in new for r in pat) for part, pat in zip(run, patterns)]
    return None


def new_sizes(lay: Layout, new_parts: list, where: str) -> tuple:
    """New sizes of the layout's axes such that every old position keeps its coordinates along
    the axes that keep their size."""
    a, b, c = lay.abc
    m = len(new_parts)
    if m == len(lay.parts):       # a reordering (or nothing): the same shape
        return lay.sizes
    pos_new = {p: i for i, p in enumerate(new_parts) if p and all(x >= 0 for x in p)}
    olds = [(i, p) for i, p in enumerate(lay.parts) if p and p in pos_new]
    found = []
    for a2, c2 in {(m // c, c) if m % c == 0 else None, (a, m // a) if m % a == 0 else None} - {None}:
        if a2 != a and c2 != c:
            continue
        if c2 == c and any(i % c != pos_new[p] % c2 for i, p in olds):
            continue
        if a2 == a and any(i // c != pos_new[p] // c2 for i, p in olds):
            continue
        n2 = a2 * b * c2
        for k in range(len(lay.sizes)):
            rest = _prod(lay.sizes) // lay.sizes[k]
            if n2 % rest:
                continue
            sizes2 = lay.sizes[:k] + (n2 // rest,) + lay.sizes[k + 1:]
            if _keeps_coordinates(lay, sizes2, k, (a2, b, c2), pos_new, olds):
                found.append((sizes2, _keeps_coordinates(lay, sizes2, None, (a2, b, c2), pos_new, olds)))
    # Several axes could take the change (q/k/v thirds of 8 growing to 16, or 6 parts of 8):
    # the one where every old position keeps all its coordinates (the axis grows at its end
    # within each part) is the reading that keeps the parts what they were.
    exact = sorted({f for f, same in found if same})
    found = exact if len(exact) == 1 else sorted({f for f, _ in found})
    if len(found) != 1:
        raise SizingError(f"{where}: cannot tell how the axes {lay.axes} of sizes {lay.sizes} change "
                          f"({'no' if not found else 'several'} consistent shapes: {found})")
    return found[0]


def _keeps_coordinates(lay, sizes2, k, abc2, pos_new, olds) -> bool:
    a, b, c = lay.abc
    _, _, c2 = abc2
    for q, p in olds:
        q2 = pos_new[p]
        for r in range(b):
            old_flat = (q // c) * b * c + r * c + q % c
            new_flat = (q2 // c2) * b * c2 + r * c2 + q2 % c2
            o, n = _unravel(old_flat, lay.sizes), _unravel(new_flat, sizes2)
            if any(o[d] != n[d] for d in range(len(o)) if d != k):   # k=None: every axis
                return False
    return True


def _unravel(i: int, sizes) -> list:
    out = []
    for s in reversed(sizes):
        out.append(i % s)
        i //= s
    return out[::-1]


def _cls(cls: ClassKey) -> str:
    kind, group = cls
    return {"unit": f"the units of {group}", "feature": f"the features of input {group!r}",
            "category": f"the categories of input {group!r}"}.get(kind, f"{kind} {group}")


def coupled_order(lay_k: Layout, lay_j: Layout, order: Order, new_parts: list, cls_j: ClassKey,
                  counter) -> Order | None:
    """When class j indexes the same positions one by one as the changed class k (and holds all
    its members there), the order j must follow; None otherwise."""
    if (lay_j.axes != lay_k.axes or lay_j.abc != lay_k.abc or not lay_j.covers or not lay_j.singletons
            or not lay_k.singletons or len(lay_j.parts) != len(lay_k.parts)):
        return None
    if any(bool(pj) != bool(pk) for pj, pk in zip(lay_j.parts, lay_k.parts)):
        return None
    j_of_k = {next(iter(pk)): next(iter(pj)) for pj, pk in zip(lay_j.parts, lay_k.parts) if pk}
    members = []
    for p in new_parts:
        if not p:
            continue
        (m,) = tuple(p)
        members.append(j_of_k[m] if m >= 0 else next(counter))
    return Order(cls_j, members)
