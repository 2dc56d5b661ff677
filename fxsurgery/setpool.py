"""The pool of labels and interned label sets, stored as integer ranges and arrays.

Labels are allocated in ranges: an input's features, a vocabulary, a hidden axis's units are
one contiguous range of label ids, made in one call, and a `Label` object exists only when
someone asks for one (`pool.labels[i]`). Every label gets its singleton set when its range is
made; singleton set ids are a range too.

A set is a sorted run of label ids in one flat array (CSR: members and offsets). Sets are
hash-consed: each distinct set is stored once and referred to by an integer id, id 0 being
the empty set, so label tensors are plain integer tensors. Interning and unions take whole
batches: members are gathered, sorted and de-duplicated in tensor code, sets are found by a
128-bit hash in a tensor hash table, and each union of two set ids is memoised.

`pool.labels` and `pool.sets` still read like the lists they were (a `Label` per id, a
frozenset of label ids per set id), for reporting and for code that asks about a few sets.
"""
from __future__ import annotations

import bisect
import functools
from typing import Iterable, NamedTuple, Sequence

import torch

from ._sort import one_thread, sort, unique, unique_values
from ._table import Buffer, Table, gather_segments, set_hash, set_hash_py

__all__ = ["SetPool", "EMPTY", "KINDS"]

EMPTY = 0  # id of the empty set in every pool
# Batches up to this many members (or pairs) are interned in Python: on a small model a tensor
# call costs more than the arithmetic, and the map of a small model was 4x slower than with
# Python sets before this path. Both paths read and write one index, so ids stay canonical.
SMALL = 96
# A tensor-path batch of at most this many new entries is copied into the small path's dicts
# at once; larger ones stay in the tensor tables only, and the small path asks those on a miss
# (the copy, .tolist() and dict.update per entry, cost a third of uniting two 14k-unit axes).
MIRROR = 512
KINDS = ("feature", "category", "input", "unit")
# `contains` on one set of more members than this reads a mask over label ids, not a search.
_MASK_RUN = 4096


# Every batch here is sorted, searched and scattered: on torch's intra-op pool under load a
# call on a few hundred ids was measured at 20 ms against 50 us on one thread (_sort).
_one_thread = one_thread()   # as a decorator: a fresh context per call


@functools.cache
def _label_class():
    # labels.py imports this module: Label is looked up once, on first use (an import statement
    # per Label made cost more than the Label itself when the planner walks a vocabulary).
    from .labels import Label
    return Label


class _Range(NamedTuple):
    start: int            # first label id
    n: int
    kind: str
    group: str
    first: int            # Label.index of the first label
    names: tuple | None   # Label.name of each label; None: str(index) (units)
    first_set: int        # singleton set id of the first label

    def label(self, k: int):
        """The `Label` of this range's k-th label (the one place a Label is made from a range)."""
        index = self.first + k
        return _label_class()(self.kind, self.group, self.names[k] if self.names is not None else str(index), index)


class _Labels(Sequence):
    """`pool.labels`: the Label of each label id, made on demand."""

    def __init__(self, pool: "SetPool"):
        self._pool = pool
        self._cache: list = []
        self._done = 0  # ranges whose Labels are in _cache

    def __len__(self) -> int:
        return self._pool.n_labels

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if 0 <= i < len(self._cache):
            return self._cache[i]
        return self._pool.label(i)

    def __iter__(self):
        # Code that walks every label (reports, the planner's tokens) walks them more than once:
        # the Labels are made on the first walk and kept.
        if len(self._cache) < self._pool.n_labels:
            for r in self._pool._ranges[self._done:]:
                self._cache.extend(r.label(k) for k in range(r.n))
            self._done = len(self._pool._ranges)
        return iter(self._cache)

    def __contains__(self, label) -> bool:
        return self._pool.find_label(label) is not None


class _Sets(Sequence):
    """`pool.sets`: the frozenset of label ids of each set id, made on demand."""

    def __init__(self, pool: "SetPool"):
        self._pool = pool
        self._memo: dict[int, frozenset] = {}  # a set never changes once interned

    def __len__(self) -> int:
        return self._pool.n_sets

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        s = self._memo.get(i)
        if s is None:
            if not 0 <= i < self._pool.n_sets:
                raise IndexError(f"set id {i} out of range (the pool has {self._pool.n_sets} sets)")
            s = self._memo[i] = frozenset(self._pool.members_list(i))
        return s


class SetPool:
    """Label ranges, interned label sets and memoised unions (see the module's docstring)."""

    def __init__(self):
        self._ranges: list[_Range] = []
        self._starts: list[int] = []
        self._by_group: dict[tuple[str, str], list[int]] = {}
        self._class_of_range: torch.Tensor | None = None   # class_ids' tables, made on first use
        self._starts_t: torch.Tensor | None = None
        self.n_labels = 0
        self._kind = Buffer(torch.int8)          # per label id: index into KINDS
        self._singleton = Buffer()               # per label id: its singleton set id
        self._members = Buffer()                 # CSR of every set's sorted label ids
        self._offsets = Buffer()
        self._offsets.append(torch.zeros(1, dtype=torch.int64))
        self._offsets.append(torch.zeros(1, dtype=torch.int64))  # set 0: the empty set
        # Per set id: its two hashes (set_hash), kept so that the union of two sets that do not
        # overlap is hashed from theirs, without reading their members (the hash is a sum).
        self._hash1, self._hash2 = Buffer(), Buffer()
        self._hash1.append(torch.zeros(1, dtype=torch.int64))
        self._hash2.append(torch.zeros(1, dtype=torch.int64))
        self._index = Buffer()                   # per label id: its Label.index
        self._sets = Table()                     # (hash1, hash2) -> set id, sets of 2+ labels
        self._unions = Table()                   # (smaller id, larger id) -> id of their union
        # The same two indexes as dicts, for the small-batch path, holding what that path wrote
        # or read and the tensor path's small batches (MIRROR); the flags say whether a tensor
        # table holds entries its dict lacks, so that the small path must ask it on a miss.
        self._sets_py: dict[tuple[int, int], int] = {}
        self._unions_py: dict[tuple[int, int], int] = {}
        self._sets_unmirrored = False
        self._unions_unmirrored = False
        # The largest label id in a set of the hash table and the largest second id of a pair
        # in the tensor union memo: a set holding a newer label, a pair with a newer set, is
        # not there, and a batch of only such (a fresh axis united unit by unit) skips the lookup.
        self._sets_top_label = -1
        self._unions_top = -1
        self.labels = _Labels(self)
        self.sets = _Sets(self)

    @property
    def n_sets(self) -> int:
        return len(self._offsets) - 1

    # labels -------------------------------------------------------------------------
    @_one_thread
    def label_range(self, kind: str, group: str, n: int, names: Sequence[str] | None = None,
                    first: int = 0) -> int:
        """Allocates `n` labels `Label(kind, group, names[k], first + k)` (names None: units,
        named by their index) with their singleton sets; returns the first label id."""
        if kind not in KINDS:
            raise ValueError(f"label kind must be one of {KINDS}, got {kind!r}")
        start, first_set = self.n_labels, self.n_sets
        r = _Range(start, n, kind, group, first, tuple(names) if names is not None else None, first_set)
        self._ranges.append(r)
        self._starts.append(start)
        self._by_group.setdefault((kind, group), []).append(len(self._ranges) - 1)
        self.n_labels += n
        ids = torch.arange(start, start + n, dtype=torch.int64)
        self._kind.append(torch.full((n,), KINDS.index(kind), dtype=torch.int8))
        self._index.append(torch.arange(first, first + n, dtype=torch.int64))
        singles = torch.arange(first_set, first_set + n, dtype=torch.int64)
        self._singleton.append(singles)
        self._members.append(ids)
        self._offsets.append(torch.arange(1, n + 1, dtype=torch.int64) + self._offsets.data[self.n_sets])
        h1, h2 = set_hash(ids, torch.arange(n), n)
        self._hash1.append(h1)
        self._hash2.append(h2)
        return start

    def ranges(self, kind: str, group: str) -> list[_Range]:
        return [self._ranges[i] for i in self._by_group.get((kind, group), ())]

    def label_ids(self, kind: str, group: str, names: Sequence[str]) -> torch.Tensor:
        """Label ids of `Label(kind, group, names[i], i)`, allocated as one range unless all
        are known already (the same names described twice)."""
        names = tuple(names)
        for r in self.ranges(kind, group):
            if r.first == 0 and r.names == names:
                return torch.arange(r.start, r.start + r.n, dtype=torch.int64)
        if not self.ranges(kind, group):
            start = self.label_range(kind, group, len(names), names)
            return torch.arange(start, start + len(names), dtype=torch.int64)
        from .labels import Label  # overlapping descriptions of one group: label by label
        return torch.tensor([self.label_id(Label(kind, group, n, i)) for i, n in enumerate(names)],
                            dtype=torch.int64)

    def unit_label_ids(self, group: str, n: int) -> torch.Tensor:
        """Label ids of units group[0] ... group[n-1], extending the group's ranges as needed."""
        rs = sorted((r for r in self.ranges("unit", group) if r.names is None), key=lambda r: r.first)
        covered, parts = 0, []
        for r in rs:
            if r.first != covered:
                break
            parts.append(torch.arange(r.start, r.start + r.n, dtype=torch.int64))
            covered += r.n
        else:
            if covered < n:
                start = self.label_range("unit", group, n - covered, None, first=covered)
                parts.append(torch.arange(start, start + n - covered, dtype=torch.int64))
                covered = n
        if covered >= n:
            return parts[0][:n] if len(parts) == 1 else torch.cat(parts)[:n]
        from .labels import Label  # units made one by one, out of order: label by label
        return torch.tensor([self.label_id(Label("unit", group, str(i), i)) for i in range(n)], dtype=torch.int64)

    def class_sizes(self, kinds=KINDS) -> dict[tuple[str, str], int]:
        """(kind, group) -> one more than the largest Label.index of the group, from the ranges
        (no Label made): the size of a hidden axis, of a feature axis, of a vocabulary."""
        out: dict[tuple[str, str], int] = {}
        for r in self._ranges:
            if r.kind in kinds:
                k = (r.kind, r.group)
                out[k] = max(out.get(k, 0), r.first + r.n)
        return out

    def label(self, i: int):
        if not 0 <= i < self.n_labels:
            raise IndexError(f"label id {i} out of range (the pool has {self.n_labels} labels)")
        r = self._ranges[bisect.bisect_right(self._starts, i) - 1]
        return r.label(i - r.start)

    def label_id(self, label) -> int:
        i = self.find_label(label)
        if i is None:
            i = self.label_range(label.kind, label.group, 1, None if _unit_named(label) else (label.name,),
                                 first=label.index)
        return i

    def find_label(self, label) -> int | None:
        for r in self.ranges(label.kind, label.group):
            k = label.index - r.first
            if 0 <= k < r.n and (r.names[k] if r.names is not None else str(label.index)) == label.name:
                return r.start + k
        return None

    def all_ranges(self) -> list[_Range]:
        """Every label range, in the order they were made (their label ids ascending)."""
        return list(self._ranges)

    def ranges_of(self, label_ids: torch.Tensor) -> list[_Range]:
        """The distinct ranges that `label_ids` fall in, in id order."""
        return [self._ranges[k] for k in unique_values(self._range_index(label_ids)).tolist()]

    def _range_index(self, label_ids: torch.Tensor) -> torch.Tensor:
        """The position in the ranges of each label id (flat)."""
        self._range_tables()
        return torch.searchsorted(self._starts_t, label_ids.reshape(-1), right=True) - 1

    def _range_tables(self) -> None:
        """The tensors `class_ids` and `ranges_of` search, remade when ranges were added."""
        if self._class_of_range is None or self._class_of_range.numel() != len(self._ranges):
            number = {k: i for i, k in enumerate(self._by_group)}
            self._class_of_range = torch.tensor([number[(r.kind, r.group)] for r in self._ranges], dtype=torch.int64)
            self._starts_t = torch.tensor(self._starts, dtype=torch.int64)

    def class_ids(self, label_ids: torch.Tensor) -> torch.Tensor:
        """The class of each label id, as a position in `class_keys()`: a class is the (kind,
        group) of a range (a hidden axis, an input's features, a vocabulary)."""
        where = self._range_index(label_ids)   # first: it makes the table read below
        return self._class_of_range.index_select(0, where).reshape(label_ids.shape)

    def class_keys(self) -> list[tuple[str, str]]:
        """Every (kind, group) of the pool, in the order its first range was made."""
        return list(self._by_group)

    def kinds(self, label_ids: torch.Tensor) -> torch.Tensor:
        """Index into KINDS of each label id."""
        return self._kind.view()[label_ids].long()

    def indices(self, label_ids: torch.Tensor) -> torch.Tensor:
        """`Label.index` of each label id (a feature's position, a category's value, a unit's)."""
        return self._index.view()[label_ids]

    # sets ---------------------------------------------------------------------------
    def singletons(self, label_ids: torch.Tensor) -> torch.Tensor:
        """Set ids of {label} for each label id."""
        return self._singleton.view()[label_ids]

    def singleton(self, label) -> int:
        i = self.label_id(label)  # first: it may grow the buffer
        return int(self._singleton.view()[i])

    def members_of(self, set_id: int) -> torch.Tensor:
        off = self._offsets.data
        return self._members.data[int(off[set_id]): int(off[set_id + 1])]

    def members_list(self, set_id: int) -> list[int]:
        """The members of one set as Python ints, through numpy views of the buffers (a tensor
        slice per set costs ten times more, and the planner asks set by set)."""
        off = self._offsets.numpy()
        return self._members.numpy()[off[set_id]: off[set_id + 1]].tolist()

    @_one_thread
    def members(self, set_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(label ids, position in `set_ids`) of the members of each set, sorted within each."""
        return gather_segments(self._members.view(), self._offsets.view(), set_ids.reshape(-1))

    def sizes(self, set_ids: torch.Tensor) -> torch.Tensor:
        off, flat = self._offsets.data, set_ids.reshape(-1)
        return (off.index_select(0, flat + 1) - off.index_select(0, flat)).reshape(set_ids.shape)

    @_one_thread
    def intern_segments(self, members: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
        """Set ids of `n` sets given as label ids tagged with their set's segment in [0, n)
        (any order, repeats allowed)."""
        if members.numel() <= SMALL and n <= SMALL:
            groups: list[set] = [set() for _ in range(n)]
            for sgm, m in zip(segment.tolist(), members.tolist()):
                groups[sgm].add(m)
            return torch.tensor(self._intern_py([sorted(g) for g in groups]), dtype=torch.int64)
        # index_select/index_copy_/masked_select here and below: advanced indexing (t[idx],
        # t[mask] = v) was measured 3-8x slower on the same tensors.
        with one_thread():
            if members.numel():
                n_lab = max(self.n_labels, 1)
                key = unique_values(segment * n_lab + members)  # sorted: by segment, then member
                segment = key // n_lab
                members = key - segment * n_lab
            sizes = torch.bincount(segment, minlength=n)
            out = torch.zeros(n, dtype=torch.int64)
            one = torch.nonzero(sizes == 1).reshape(-1)
            if one.numel():
                first = (torch.cumsum(sizes, 0) - sizes).index_select(0, one)
                out.index_copy_(0, one, self._singleton.data.index_select(0, members.index_select(0, first)))
            rows = torch.nonzero(sizes > 1).reshape(-1)
            if rows.numel():
                if one.numel():
                    keep = (sizes > 1).index_select(0, segment)
                    members, segment = members.masked_select(keep), segment.masked_select(keep)
                h1, h2 = set_hash(members, segment, n)
                out.index_copy_(0, rows, self._intern_hashed(h1.index_select(0, rows), h2.index_select(0, rows),
                                                             members, segment, rows))
            return out

    def _intern_hashed(self, h1, h2, members, segment, rows):
        """Set ids of the sets `rows` (segments of `members`), found or stored by hash."""
        # Distinct sets of the batch by their first hash (unique over pairs is several times
        # slower); two sets of one batch sharing it and differing in the second is a 2^-64 event
        # that is checked, never assumed away.
        u1, inverse = unique(h1)
        first = torch.empty(u1.numel(), dtype=torch.int64)  # the first row of each distinct set
        if u1.numel() == rows.numel():  # all distinct: `inverse` is a permutation
            first.index_copy_(0, inverse, torch.arange(rows.numel()))
        else:
            first.fill_(rows.numel()).scatter_reduce_(0, inverse, torch.arange(rows.numel()), reduce="amin")
        u2 = h2.index_select(0, first)
        if not bool((u2.index_select(0, inverse) == h2).all()):
            raise RuntimeError("label-set hash collision (two distinct sets share a 64-bit hash); "
                               "please report this model")
        ids = self._lookup(self._sets, u1, u2, self._top_labels(members, segment, rows).index_select(0, first),
                           self._sets_top_label)
        new = torch.nonzero(ids < 0).reshape(-1)
        if new.numel():
            new_rows = rows.index_select(0, first.index_select(0, new))  # segments holding new sets
            new_rows, order = sort(new_rows)
            new = new.index_select(0, order)
            assigned = torch.arange(self.n_sets, self.n_sets + new.numel(), dtype=torch.int64)
            if new.numel() == rows.numel():
                # every set of the batch is new and distinct: all members are kept, in order
                counts = torch.bincount(segment, minlength=int(rows[-1]) + 1).index_select(0, rows)
            else:
                slot = torch.full((int(rows[-1]) + 1,), -1, dtype=torch.int64)  # rows: sorted
                slot.index_copy_(0, new_rows, torch.arange(new.numel()))
                which = slot.index_select(0, segment)
                take = which >= 0  # members arrive sorted by segment, so by new set id too
                counts = torch.bincount(which.masked_select(take), minlength=new.numel())
                members = members.masked_select(take)
            self._members.append(members)
            self._offsets.append(torch.cumsum(counts, 0) + self._offsets.data[self.n_sets])
            n1, n2 = u1.index_select(0, new), u2.index_select(0, new)
            self._hash1.append(n1)
            self._hash2.append(n2)
            self._sets.put(n1, n2, assigned)
            self._sets_top_label = max(self._sets_top_label, int(members.max()))
            if new.numel() <= MIRROR:
                self._sets_py.update(zip(zip(n1.tolist(), n2.tolist()), assigned.tolist()))
            else:
                self._sets_unmirrored = True
            ids.index_copy_(0, new, assigned)
        return ids.index_select(0, inverse)

    def _intern_py(self, sets: list[list[int]]) -> list[int]:
        """Ids of sets given as sorted lists of distinct label ids; new ones stored as one batch."""
        out, new, new_keys = [], {}, []
        single = self._singleton.data
        known = self._sets_py
        keys = [set_hash_py(ms) if len(ms) > 1 else None for ms in sets]
        if self._sets_unmirrored:
            self._read_tensor_index(self._sets, known, keys)
        for ms, key in zip(sets, keys):
            if not ms:
                out.append(EMPTY)
            elif len(ms) == 1:
                out.append(int(single[ms[0]]))
            else:
                i = known.get(key)
                if i is None:
                    i = new.get(key)
                    if i is None:
                        i = new[key] = self.n_sets + len(new)
                        new_keys.append((key, ms))
                out.append(i)
        if new_keys:
            members = torch.tensor([m for _, ms in new_keys for m in ms], dtype=torch.int64)
            counts = torch.tensor([len(ms) for _, ms in new_keys], dtype=torch.int64)
            assigned = torch.arange(self.n_sets, self.n_sets + len(new_keys), dtype=torch.int64)
            self._members.append(members)
            self._offsets.append(torch.cumsum(counts, 0) + self._offsets.data[self.n_sets])
            k = torch.tensor([key for key, _ in new_keys], dtype=torch.int64)
            self._hash1.append(k[:, 0])
            self._hash2.append(k[:, 1])
            self._sets.put(k[:, 0], k[:, 1], assigned)
            self._sets_top_label = max(self._sets_top_label, int(members.max()))
            self._sets_py.update(new)
        return out

    @staticmethod
    def _read_tensor_index(table: Table, known: dict, keys) -> None:
        """Copies into `known` what the tensor `table` holds of the `keys` it lacks (None
        entries skipped): one lookup for a batch of the small path."""
        miss = list(dict.fromkeys(k for k in keys if k is not None and k not in known))
        if miss:
            k = torch.tensor(miss, dtype=torch.int64)
            found = table.get(k[:, 0].contiguous(), k[:, 1].contiguous()).tolist()
            known.update((key, i) for key, i in zip(miss, found) if i >= 0)

    def intern(self, members: Iterable[int]) -> int:
        m = torch.tensor(sorted(set(int(x) for x in members)), dtype=torch.int64)
        return int(self.intern_segments(m, torch.zeros(m.numel(), dtype=torch.int64), 1)[0])

    def labels_in(self, set_id: int) -> list:
        return sorted(self.labels[i] for i in self.members_of(set_id).tolist())

    # unions -------------------------------------------------------------------------
    @_one_thread
    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Id of a[i] | b[i] for each i (1-d, any repeats)."""
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        out = hi.clone()
        todo = (lo != hi) & (lo != EMPTY)
        if not bool(todo.any()):
            return out
        count = int(todo.sum())
        if count <= SMALL:
            out[todo] = torch.tensor(self._union_py(lo[todo].tolist(), hi[todo].tolist()), dtype=torch.int64)
            return out
        with one_thread():
            where = None if count == todo.numel() else torch.nonzero(todo).reshape(-1)
            if where is not None:
                lo, hi = lo.index_select(0, where), hi.index_select(0, where)
            n = max(self.n_sets, 1)
            uniq, inverse = unique(lo * n + hi)
            ulo = uniq // n
            uhi = uniq - ulo * n
            res = self._lookup(self._unions, ulo, uhi, uhi, self._unions_top)
            miss = torch.nonzero(res < 0).reshape(-1)
            if miss.numel():
                a, b = ulo.index_select(0, miss), uhi.index_select(0, miss)
                got = self._unite(a, b)
                if miss.numel() <= MIRROR:
                    self._unions_py.update(zip(zip(a.tolist(), b.tolist()), got.tolist()))
                else:
                    self._unions_unmirrored = True
                res.index_copy_(0, miss, got)
            res = res.index_select(0, inverse)
            if where is None:
                return res
            out.index_copy_(0, where, res)
        return out

    def _unite(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Ids of a[i] | b[i] for distinct pairs not in the union memo (a < b, neither empty),
        memoised."""
        got = self._subset_union(a, b)
        rest = torch.nonzero(got < 0).reshape(-1)
        if rest.numel():
            self._disjoint_union(a, b, got, rest)
            rest = torch.nonzero(got < 0).reshape(-1)
        if rest.numel():
            # Each pair's two sets side by side: when one's labels all precede the other's (two
            # axes united unit by unit) the members arrive sorted and need no sort (_sort.unique).
            pair = torch.stack([a.index_select(0, rest), b.index_select(0, rest)], 1).reshape(-1)
            m, seg = self.members(pair)
            got.index_copy_(0, rest, self.intern_segments(m, seg >> 1, rest.numel()))
        self._unions.put(a, b, got)
        self._unions_top = max(self._unions_top, int(b.max()))
        return got

    def _ends(self, set_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest and the largest member of each (non-empty) set."""
        off, flat = self._offsets.data, self._members.data
        return (flat.index_select(0, off.index_select(0, set_ids)),
                flat.index_select(0, off.index_select(0, set_ids + 1) - 1))

    def _disjoint_union(self, a: torch.Tensor, b: torch.Tensor, got: torch.Tensor, rest: torch.Tensor) -> None:
        """Fills got[rest] for the pairs whose two sets do not overlap and lie in order, all of
        one's labels before the other's (a residual stream gaining a layer's units): their
        union is the two runs end to end, already sorted, and its hashes are the sums of theirs,
        so that nothing is sorted or hashed per member."""
        a, b = a.index_select(0, rest), b.index_select(0, rest)
        (a_first, a_last), (b_first, b_last) = self._ends(a), self._ends(b)
        a_before = a_last < b_first
        ordered = torch.nonzero(a_before | (b_last < a_first)).reshape(-1)
        if not ordered.numel():
            return
        first = torch.where(a_before, a, b).index_select(0, ordered)
        second = torch.where(a_before, b, a).index_select(0, ordered)
        h1 = self._hash1.data.index_select(0, first) + self._hash1.data.index_select(0, second)
        h2 = self._hash2.data.index_select(0, first) + self._hash2.data.index_select(0, second)
        m, seg = self.members(torch.stack([first, second], 1).reshape(-1))
        ids = self._intern_hashed(h1, h2, m, seg >> 1, torch.arange(ordered.numel()))
        got.index_copy_(0, rest.index_select(0, ordered), ids)

    @staticmethod
    def _lookup(table: Table, k1: torch.Tensor, k2: torch.Tensor, top: torch.Tensor, table_top: int) -> torch.Tensor:
        """table.get(k1, k2), asking only for keys whose `top` is at most `table_top` (the
        others cannot be there)."""
        maybe = top <= table_top
        count = int(maybe.sum())
        if count == k1.numel():
            return table.get(k1, k2)
        out = torch.full((k1.numel(),), -1, dtype=torch.int64)
        if count:
            where = torch.nonzero(maybe).reshape(-1)
            out.index_copy_(0, where, table.get(k1.index_select(0, where), k2.index_select(0, where)))
        return out

    @staticmethod
    def _top_labels(members: torch.Tensor, segment: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The largest member of each set `rows` (members sorted by segment, then label)."""
        last = torch.cumsum(torch.bincount(segment, minlength=int(rows[-1]) + 1), 0) - 1
        return members.index_select(0, last.index_select(0, rows))

    def _union_py(self, lo: list[int], hi: list[int]) -> list[int]:
        memo = self._unions_py
        keys = list(zip(lo, hi))
        if self._unions_unmirrored:
            self._read_tensor_index(self._unions, memo, keys)
        miss = list(dict.fromkeys(k for k in keys if k not in memo))
        if miss:
            sets, off = self.sets, self._offsets.numpy()
            # sizes from the offsets: a frozenset of a large set is what this test avoids
            if sum(int(off[a + 1] - off[a] + off[b + 1] - off[b]) for a, b in miss) > 64 * SMALL:
                got = self.union_pairs_tensor([a for a, _ in miss], [b for _, b in miss])
            else:
                got = self._intern_py([sorted(sets[a] | sets[b]) for a, b in miss])
            memo.update(zip(miss, got))
        return [memo[k] for k in keys]

    def union_pairs_tensor(self, lo: list[int], hi: list[int]) -> list[int]:
        """The tensor path of `union_pairs` for pairs of large sets (lo < hi, neither empty)."""
        a, b = torch.tensor(lo, dtype=torch.int64), torch.tensor(hi, dtype=torch.int64)
        with one_thread():
            return self._unite(a, b).tolist()

    def _subset_union(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a[i] | b[i] where one of them holds the other (found by looking the smaller one's
        members up in the larger), -1 elsewhere: a stream's positions united with the set of
        all of them (a norm's statistic) costs the small sets, not a copy of the large one."""
        sa, sb = self.sizes(a), self.sizes(b)
        out = torch.full_like(a, -1)
        # Sets of one size hold each other only if equal, and distinct ids are distinct sets:
        # only pairs of two sizes are searched (none, when two axes are united unit by unit).
        rows = torch.nonzero(sa != sb).reshape(-1)
        if not rows.numel():
            return out
        a, b, sa, sb = a.index_select(0, rows), b.index_select(0, rows), sa.index_select(0, rows), sb.index_select(0, rows)
        a_small = sa < sb
        small, big = torch.where(a_small, a, b), torch.where(a_small, b, a)
        # A set holds another only if its first and last members bound the other's: pairs
        # failing that (sets over different labels) are dropped before the member search.
        (s_first, s_last), (b_first, b_last) = self._ends(small), self._ends(big)
        bounded = torch.nonzero((s_first >= b_first) & (s_last <= b_last)).reshape(-1)
        if not bounded.numel():
            return out
        if bounded.numel() < rows.numel():
            rows, small, big = rows.index_select(0, bounded), small.index_select(0, bounded), big.index_select(0, bounded)
        m, seg = self.members(small)
        inside = self.contains(big.index_select(0, seg), m)
        holds = torch.ones(rows.numel(), dtype=torch.bool)
        holds.index_fill_(0, seg.masked_select(~inside), False)
        return out.index_copy_(0, rows, torch.where(holds, big, -1))

    @_one_thread
    def contains(self, set_ids: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        """Whether set set_ids[i] holds label label_ids[i], for each i."""
        # A binary search of each set's own sorted run, all queries a step at a time: as many
        # steps as the longest run asked has bits, where a search of one sorted array of every
        # member of every set took the log of tens of millions, each step a cache miss.
        set_ids, label_ids = torch.broadcast_tensors(set_ids, label_ids)
        shape, set_ids, label_ids = set_ids.shape, set_ids.reshape(-1), label_ids.reshape(-1)
        if not set_ids.numel():
            return torch.zeros(shape, dtype=torch.bool)
        off, members = self._offsets.data, self._members.data
        first = int(set_ids[0])
        if bool((set_ids == first).all()):
            # one set asked (a stream's positions inside the set of all of them): one search
            run = members[int(off[first]): int(off[first + 1])]
            if not run.numel():
                return torch.zeros(shape, dtype=torch.bool)
            if run.numel() > _MASK_RUN:
                # A large run (a deep decoder's residual stream: 100k+ labels) as a mask over
                # label ids: one scatter and one gather, where a binary search of each query
                # was 20 ms a norm, a cache miss per step.
                mask = torch.zeros(self.n_labels, dtype=torch.bool)
                mask.index_fill_(0, run, True)
                return mask.index_select(0, label_ids).reshape(shape)
            pos = torch.searchsorted(run, label_ids).clamp_(max=run.numel() - 1)
            return (run.index_select(0, pos) == label_ids).reshape(shape)
        lo = off.index_select(0, set_ids)
        end = off.index_select(0, set_ids + 1)
        hi, top = end, max(len(self._members) - 1, 0)
        for _ in range(int((end - lo).max()).bit_length()):
            mid = (lo + hi) >> 1
            below = (lo < hi) & (members.index_select(0, mid.clamp(max=top)) < label_ids)
            lo = torch.where(below, mid + 1, lo)
            hi = torch.where(below, hi, mid)
        return ((lo < end) & (members.index_select(0, lo.clamp(max=top)) == label_ids)).reshape(shape)

    def union(self, a: int, b: int) -> int:
        if a == b or b == EMPTY:
            return a
        if a == EMPTY:
            return b
        return int(self.union_pairs(torch.tensor([a]), torch.tensor([b]))[0])

    @_one_thread
    def union_many(self, ids: Iterable[int]) -> int:
        ids = torch.tensor(sorted(set(int(i) for i in ids)), dtype=torch.int64)
        if ids.numel() <= 1:
            return int(ids[0]) if ids.numel() else EMPTY
        m, _ = self.members(ids)
        return int(self.intern_segments(m, torch.zeros(m.numel(), dtype=torch.int64), 1)[0])

    @_one_thread
    def union_ids(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Element-wise union of two broadcastable int64 id tensors."""
        if b.numel() == 1 and int(b.reshape(-1)[0]) == EMPTY:
            return a.expand(torch.broadcast_shapes(a.shape, b.shape)) if a.shape != b.shape else a
        if a.numel() == 1 and int(a.reshape(-1)[0]) == EMPTY:
            return b.expand(torch.broadcast_shapes(a.shape, b.shape)) if a.shape != b.shape else b
        a, b = torch.broadcast_tensors(a, b)
        if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
            return a.contiguous()
        return self.union_pairs(a.reshape(-1), b.reshape(-1)).reshape(a.shape)

    @_one_thread
    def segment_union(self, ids: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
        """For each segment s in range(n_segments), the union of ids[segment == s]."""
        ids, segment = ids.reshape(-1), segment.reshape(-1)
        n = max(self.n_sets, 1)
        pair = unique_values(segment * n + ids)
        seg = pair // n
        sid = pair - seg * n
        counts = torch.bincount(seg, minlength=n_segments)
        out = torch.zeros(n_segments, dtype=torch.int64)
        single = counts.index_select(0, seg) == 1
        if bool(single.all()):  # one set per segment: nothing to unite
            return out.index_copy_(0, seg, sid)
        if bool(single.any()):
            out.index_copy_(0, seg.masked_select(single), sid.masked_select(single))
            many = ~single
            seg, sid = seg.masked_select(many), sid.masked_select(many)
        rows, local = unique(seg)
        m, which = self.members(sid)
        out.index_copy_(0, rows, self.intern_segments(m, local.index_select(0, which), rows.numel()))
        return out

    @_one_thread
    def reduce_ids(self, ids: torch.Tensor, dims: Sequence[int], keepdim: bool = True) -> torch.Tensor:
        """Union of an id tensor over `dims` (axes of size 1 are already reduced)."""
        asked = sorted({d % ids.dim() for d in dims}) if ids.dim() else []
        dims = [d for d in asked if ids.shape[d] > 1]
        if dims:
            rest = [d for d in range(ids.dim()) if d not in dims]
            moved = ids.permute(rest + dims)
            outer = [ids.shape[d] for d in rest]
            n_out = 1
            for s in outer:
                n_out *= s
            flat = moved.reshape(n_out, -1)
            seg = torch.arange(n_out).unsqueeze(1).expand(flat.shape)
            red = self.segment_union(flat, seg, n_out)
            view = list(ids.shape)
            for d in dims:
                view[d] = 1
            ids = red.reshape(view)
        if not keepdim:
            for d in reversed(asked):
                ids = ids.squeeze(d)
        return ids

    @_one_thread
    def contains_table(self, label_id: int) -> torch.Tensor:
        """Boolean per set id: does the set hold this label."""
        members = self._members.view()
        where = torch.nonzero(members == label_id).reshape(-1)
        out = torch.zeros(self.n_sets, dtype=torch.bool)
        if where.numel():
            from ._sort import searchsorted
            out[searchsorted(self._offsets.view(), where, right=True) - 1] = True
        return out


def _unit_named(label) -> bool:
    return label.kind == "unit" and label.name == str(label.index)
