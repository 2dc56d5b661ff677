"""Matching the elements of one old and one new parameter by key, axis by axis.

An element's key is (labels met, units aligned with). Keys are factorised: each term of a
parameter's Terms varies along few axes, usually one. The axes are grouped into *blocks*
(axes that some term varies along jointly); an element's key is then the union of one set per
block, and matching is an outer product of per-block matches: for each block, the old position
of every new position, or -1. Blocks are single axes in the common case, so nothing per element
is ever computed; a block of several axes (a key that varies jointly along them) is matched
element-wise over that block only, for small parameters.

Within a block, positions are classed by their (meets, aligned) token sets; positions of equal
class match by order of occurrence (i-th with i-th), which is how an axis that labels do not
tell apart (kernel taps, an unlabelled batch-like axis) is carried over when its size is
unchanged. A class whose count differs between old and new, where the positions are not told
apart, cannot be matched: the shape change is not explained by the labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..labels import EMPTY
from ..terms import Terms
from .._sort import argsort, searchsorted, unique
from .tokens import LabelSpace

__all__ = ["Block", "Match", "match", "DENSE_LIMIT"]

# A block of axes whose keys vary jointly is matched element-wise up to this many positions.
DENSE_LIMIT = 1 << 24


@dataclass
class Block:
    axes: tuple                      # parameter axes, in order
    old_shape: tuple                 # sizes of those axes in the old parameter
    new_shape: tuple
    index: torch.Tensor              # (n_new,) old flat block position of each new one, or -1
    zero: torch.Tensor               # (n_new,) bool: the meets side holds a new label
    category: torch.Tensor           # (n_new,) bool: ... and every new label it meets is a category
    removed_data: torch.Tensor       # (n_old,) bool: old meets side holds a removed feature/input/unit
    removed: torch.Tensor            # (n_old,) bool: old key holds a label the new model lacks
    aligned_new: torch.Tensor | None = None  # (n_new,) bool: the aligned side holds a new label

    @property
    def n_new(self) -> int:
        return int(self.index.numel())

    @property
    def n_old(self) -> int:
        return int(self.removed.numel())

    @property
    def identity(self) -> bool:
        return self.n_old == self.n_new and bool((self.index == torch.arange(self.n_new)).all())

    @property
    def copied(self) -> torch.Tensor:
        return self.index >= 0

    def stays(self) -> torch.Tensor:
        """(n_new,) bool: copied from the old position with the same index along every axis of
        the block (an axis that grows or shrinks at its end keeps its other positions)."""
        copied = self.copied
        if len(self.axes) == 1:
            return copied & (self.index == torch.arange(self.n_new))
        new_at = torch.unravel_index(torch.arange(self.n_new), self.new_shape)
        old_at = torch.unravel_index(self.index.clamp(min=0), self.old_shape)
        same = copied
        for o, n in zip(old_at, new_at):
            same = same & (o == n)
        return same


@dataclass
class Match:
    """How the elements of a new parameter come from an old one."""
    new_shape: tuple
    old_shape: tuple | None
    blocks: list = field(default_factory=list)
    copy: bool = True                # False: no element is copied (new, unexplained, keys differ throughout)
    unexplained: str | None = None   # why the shape change is not explained
    zero_all: bool = False           # every element meets a new label
    category_all: bool = False
    removed_all: bool = False        # every old element holds a removed label
    removed_data_all: bool = False
    new_met: frozenset = frozenset()       # new labels met / aligned with, removed labels, for reports
    new_aligned: frozenset = frozenset()
    removed_labels: frozenset = frozenset()
    removed_met: frozenset = frozenset()   # removed labels on the meets side
    aligned_new_all: bool = False          # every element is aligned with a new label

    @property
    def identity(self) -> bool:
        return self.copy and self.old_shape == self.new_shape and all(b.identity for b in self.blocks)

    # element counts (outer products: nothing per element) ----------------------------
    def n_copied(self) -> int:
        if not self.copy:
            return 0
        n = 1
        for b in self.blocks:
            n *= int(b.copied.sum())
        return n

    def n_moved(self) -> int:
        """Copied elements whose old index differs from their new one (a reordered or shifted
        axis): the same value, at another place."""
        if not self.copy:
            return 0
        stay = 1
        for b in self.blocks:
            stay *= int(b.stays().sum())
        return self.n_copied() - stay

    def n_zeroed(self, new_categories: str = "zero") -> int:
        total = _numel(self.new_shape)
        if self.unexplained:
            return 0
        keep_cats = new_categories != "zero"
        if self.zero_all:
            return 0 if keep_cats and self.category_all else total
        n = 1
        for b in self.blocks:
            z = b.zero & ~b.category if keep_cats else b.zero
            n *= int((~z).sum())
        return total - n

    def n_unmatched(self) -> tuple[int, int]:
        """(new elements neither copied nor meeting nor aligned with a new label: they keep the
        new model's values although nothing marks them new; old elements neither copied nor
        holding a removed label: lost although nothing marks them gone). Both are zero when the
        labels explain every element."""
        if self.unexplained or self.old_shape is None:
            return 0, 0
        new_bad = 0
        if not (self.zero_all or self.aligned_new_all):
            free = cfree = 1
            for b in self.blocks:
                f = ~b.zero
                if b.aligned_new is not None:
                    f = f & ~b.aligned_new
                free *= int(f.sum())
                cfree *= int((f & b.copied).sum())
            new_bad = free - (cfree if self.copy else 0)
        old_bad = 0
        if not self.removed_all:
            live = clive = 1
            for b in self.blocks:
                keep = ~b.removed
                used = torch.zeros(b.n_old, dtype=torch.bool)
                idx = b.index[b.index >= 0]
                if idx.numel():
                    used[idx] = True
                live *= int(keep.sum())
                clive *= int((keep & used).sum())
            old_bad = live - (clive if self.copy else 0)
        return new_bad, old_bad

    def n_dropped(self) -> int:
        if self.old_shape is None:
            return 0
        total = _numel(self.old_shape)
        if self.removed_all:
            return total
        n = 1
        for b in self.blocks:
            n *= int((~b.removed).sum())
        return total - n


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class _Side:
    """One parameter of one model: the token set shared by every element, and per block the
    token set (number) of each flat position, for the meets or the aligned side of its key."""

    def __init__(self, space: LabelSpace, side: str, terms: Terms | None, blocks, shape):
        pool = space.pools[side]
        shared = EMPTY
        flat = [torch.zeros([1] * len(axes), dtype=torch.int64) for axes in blocks]
        block_of = {a: k for k, axes in enumerate(blocks) for a in axes}
        for t in (terms.terms if terms is not None else []):
            vary = [d for d in range(t.dim()) if t.shape[d] > 1]
            if not vary:
                shared = pool.union(shared, int(t.reshape(-1)[0]))
                continue
            k = block_of[vary[0]]
            axes = blocks[k]
            rest = [d for d in range(t.dim()) if d not in axes]
            tb = t.permute(list(axes) + rest).reshape([t.shape[a] for a in axes])
            flat[k] = pool.union_ids(flat[k], tb)
        self.shared = space.tset(side, shared)
        self.per_block, self.uniq = [], []
        for k, axes in enumerate(blocks):
            ids = flat[k]
            if ids.numel() == 1:  # constant along the block: translate once
                t = space.tset(side, int(ids.reshape(-1)[0]))
                self.per_block.append(torch.full((_numel(shape[a] for a in axes),), t, dtype=torch.int64))
                self.uniq.append(torch.tensor([t], dtype=torch.int64))
            else:
                tsets, uniq = space.translate(side, ids.expand([shape[a] for a in axes]).reshape(-1))
                self.per_block.append(tsets)
                self.uniq.append(uniq)


def _blocks(n: int, terms) -> list[tuple]:
    """Axes grouped by the terms that vary along several of them (union-find)."""
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for ts in terms:
        if ts is None:
            continue
        for t in ts.terms:
            vary = [d for d in range(t.dim()) if t.shape[d] > 1]
            for d in vary[1:]:
                parent[find(d)] = find(vary[0])
    groups: dict[int, list[int]] = {}
    for a in range(n):
        groups.setdefault(find(a), []).append(a)
    return sorted(tuple(g) for g in groups.values())


def _universal(space: LabelSpace, s: _Side) -> frozenset:
    """Labels held by every element: the shared set and what every position of a block holds.

    The shared set is returned as it is when no block adds to it: past a norm it is the whole
    residual stream (thousands of labels a layer), and copying it per parameter made planning
    quadratic in depth."""
    sets = space.tset_tokens
    shared = sets[s.shared]
    more = set()
    for uniq in s.uniq:
        common = None
        for t in uniq.tolist():
            common = set(sets[t]) if common is None else common & sets[t]
            if not common:
                break
        if common:
            more |= common
    more -= shared
    return shared | more if more else shared


def _minus(a: frozenset, b: frozenset) -> frozenset:
    """a - b, free when both sides hold the same token set (the same object: token sets are
    interned), which is the common case of an unchanged residual stream."""
    return frozenset() if a is b else a - b


def _home(space: LabelSpace, s: _Side, label: int):
    """The first block along which some position's set holds `label`, or None."""
    for k, uniq in enumerate(s.uniq):
        if any(label in space.tset_tokens[t] for t in uniq.tolist()):
            return k
    return None


def _ranks(c: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(occurrence rank of each position within its class, count of each class)."""
    counts = torch.bincount(c, minlength=k)
    order = argsort(c, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(c)
    rank.scatter_(0, order, torch.arange(c.numel()) - starts.index_select(0, c.index_select(0, order)))
    return rank, counts


def _match_classes(c_old: torch.Tensor, c_new: torch.Tensor):
    """Old position of each new one (-1 if none) and the classes whose counts differ although
    their positions are not told apart."""
    if c_old.shape == c_new.shape and torch.equal(c_old, c_new):
        return torch.arange(c_new.numel()), torch.zeros(0, dtype=torch.int64)
    uniq, inverse = unique(torch.cat([c_old, c_new]))
    k = uniq.numel()
    c_old, c_new = inverse[:c_old.numel()], inverse[c_old.numel():]
    r_old, n_old = _ranks(c_old, k)
    r_new, n_new = _ranks(c_new, k)
    ambiguous = (n_old > 0) & (n_new > 0) & (n_old != n_new)
    width = int(max(int(n_old.max()) if n_old.numel() else 0, int(n_new.max()) if n_new.numel() else 0)) + 1
    key_old = c_old * width + r_old
    key_new = c_new * width + r_new
    order = argsort(key_old)
    sorted_old = key_old.index_select(0, order)
    if len(sorted_old):
        pos = searchsorted(sorted_old, key_new).clamp(max=len(sorted_old) - 1)
        index = torch.where(sorted_old.index_select(0, pos) == key_new, order.index_select(0, pos),
                            torch.full_like(key_new, -1))
    else:
        index = torch.full_like(key_new, -1)
    return index, torch.nonzero(ambiguous).reshape(-1)


_SHIFT = 1 << 31


def match(space: LabelSpace, new_shape, new_meets: Terms | None, new_aligned: Terms | None,
          old_shape=None, old_meets: Terms | None = None, old_aligned: Terms | None = None) -> Match:
    """Matches a new parameter's elements with an old one's (`old_shape=None`: no old one)."""
    new_shape = tuple(new_shape)
    has_old = old_shape is not None
    old_shape = tuple(old_shape) if has_old else None
    m = Match(new_shape=new_shape, old_shape=old_shape)
    if has_old and len(old_shape) != len(new_shape):
        m.unexplained = f"rank changed from {len(old_shape)} to {len(new_shape)} dimensions"
        has_old = False
        old_meets = old_aligned = None
    ref_old = old_shape if has_old else tuple(0 for _ in new_shape)
    blocks = _blocks(len(new_shape), [new_meets, new_aligned, old_meets, old_aligned])
    for axes in blocks:
        size = max(_numel(new_shape[a] for a in axes), _numel(ref_old[a] for a in axes))
        if len(axes) > 1 and size > DENSE_LIMIT:
            m.unexplained = (f"keys vary jointly along axes {axes} ({size} positions), too many to "
                             "match element by element")
            m.copy = False
            return m
    nm, na = _Side(space, "new", new_meets, blocks, new_shape), _Side(space, "new", new_aligned, blocks, new_shape)
    u_nm, u_na = _universal(space, nm), _universal(space, na)
    u_om = u_oa = frozenset()
    if has_old:
        om, oa = _Side(space, "old", old_meets, blocks, old_shape), _Side(space, "old", old_aligned, blocks, old_shape)
        u_om, u_oa = _universal(space, om), _universal(space, oa)
    # Labels universal on one side only are moved onto the block where the other side has them
    # (a one-feature input that gains a second feature: the first is universal in the old key).
    extra = {("old", "m"): {}, ("old", "a"): {}, ("new", "m"): {}, ("new", "a"): {}}
    if has_old:
        same = True
        for which, (u_o, u_n, s_o, s_n) in {"m": (u_om, u_nm, om, nm), "a": (u_oa, u_na, oa, na)}.items():
            only_o, only_n = _minus(u_o, u_n), _minus(u_n, u_o)
            moved_o = {lab for lab in only_o if _home(space, s_n, lab) is not None}
            moved_n = {lab for lab in only_n if _home(space, s_o, lab) is not None}
            for lab in moved_o:
                extra[("old", which)].setdefault(_home(space, s_n, lab), set()).add(lab)
            for lab in moved_n:
                extra[("new", which)].setdefault(_home(space, s_o, lab), set()).add(lab)
            # What stays universal is the same on both sides iff nothing else differs.
            same = same and only_o == moved_o and only_n == moved_n
        if not same:
            m.copy = False  # some label is held by every element on one side only: no key is shared
    else:
        m.copy = False
    slow = bool(u_nm or u_na or u_om or u_oa)  # else a position's class is its pair of token sets
    new_only, removed = space.new_only, space.removed
    sets = space.tset_tokens
    m.zero_all = bool(u_nm & new_only)
    m.aligned_new_all = bool(u_na & new_only)
    m.category_all = m.zero_all and (u_nm & new_only) <= space.categories
    new_met, new_aligned_l, removed_l = set(u_nm & new_only), set(u_na & new_only), set()
    if has_old:
        gone = (u_om & removed) | (u_oa & removed)   # not (u_om | u_oa) & removed: a copy of both
        m.removed_all = bool(gone)
        m.removed_data_all = bool(u_om & space.removed_data)
        removed_l |= gone
        removed_met_l = set(u_om & removed)
    else:
        removed_met_l = set()

    def classes(side, sm: _Side, sa: _Side, u_m, u_a, k) -> torch.Tensor:
        tm, ta = sm.per_block[k], sa.per_block[k]
        if not slow:
            return tm * _SHIFT + ta
        em, ea = frozenset(extra[(side, "m")].get(k, ())), frozenset(extra[(side, "a")].get(k, ()))
        return _stripped(space, tm, u_m, em) * _SHIFT + _stripped(space, ta, u_a, ea)

    problems = []
    for k, axes in enumerate(blocks):
        c_new = classes("new", nm, na, u_nm, u_na, k)
        zero, category = space.flags(nm.per_block[k], nm.uniq[k], 0), space.flags(nm.per_block[k], nm.uniq[k], 1)
        # Only the sets flagged as holding such labels are opened (a vocabulary axis has 128k).
        for t in space.hits(nm.uniq[k], 0):
            new_met.update(sets[t] & new_only)
        for t in space.hits(na.uniq[k], 0):
            new_aligned_l.update(sets[t] & new_only)
        if has_old:
            c_old = classes("old", om, oa, u_om, u_oa, k)
            removed_data_f = space.flags(om.per_block[k], om.uniq[k], 3)
            removed_f = space.flags(om.per_block[k], om.uniq[k], 2) | space.flags(oa.per_block[k], oa.uniq[k], 2)
            for t in space.hits(om.uniq[k], 2):
                removed_met_l.update(sets[t] & removed)
            for t in space.hits(unique(torch.cat([om.uniq[k], oa.uniq[k]]))[0], 2):
                removed_l.update(sets[t] & removed)
            index, ambiguous = _match_classes(c_old, c_new)
            if ambiguous.numel():
                problems.append(_ambiguity(axes, old_shape, new_shape))
        else:
            n_old = _numel(ref_old[a] for a in axes)
            index = torch.full((c_new.numel(),), -1, dtype=torch.int64)
            removed_data_f = removed_f = torch.zeros(n_old, dtype=torch.bool)
        m.blocks.append(Block(axes=axes, old_shape=tuple(ref_old[a] for a in axes),
                              new_shape=tuple(new_shape[a] for a in axes), index=index, zero=zero,
                              category=category, removed_data=removed_data_f, removed=removed_f,
                              aligned_new=space.flags(na.per_block[k], na.uniq[k], 0)))
    if problems:
        m.unexplained = "; ".join(problems)
        m.copy = False
    m.new_met, m.new_aligned, m.removed_labels = frozenset(new_met), frozenset(new_aligned_l), frozenset(removed_l)
    m.removed_met = frozenset(removed_met_l)
    return m


def _stripped(space: LabelSpace, tsets: torch.Tensor, universal: frozenset, extra: frozenset) -> torch.Tensor:
    """Each token set of `tsets` without the labels every element holds, with `extra` added."""
    if not universal and not extra:
        return tsets
    return space.stripped(tsets, universal, extra)


def _ambiguity(axes, old_shape, new_shape) -> str:
    where = "axis " + str(axes[0]) if len(axes) == 1 else f"axes {axes}"
    old = "x".join(str(old_shape[a]) for a in axes)
    new = "x".join(str(new_shape[a]) for a in axes)
    if old != new:
        return (f"{where} changes size ({old} -> {new}) but its positions carry no labels that tell "
                "them apart")
    return f"{where} has positions that labels do not tell apart whose number changed"
