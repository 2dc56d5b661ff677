"""Tensor building blocks of the label-set pool: growable buffers, a hash of integer sets, and
a hash table from pairs of int64 keys to ids, all operating on whole batches.

The pool interns label sets by the thousand per operator (a 14,336-unit axis, a residual
stream of 4096 positions); a Python dict and a frozenset per set cost microseconds each,
which on an 8B-parameter decoder was most of the mapping's time. Here a batch is a few tensor
calls, whatever its size.
"""
from __future__ import annotations

import torch

__all__ = ["Buffer", "Table", "set_hash", "set_hash_py", "gather_segments"]

_M1 = -4658895280553007687     # 0xBF58476D1CE4E5B9 as a signed int64 (splitmix64's multipliers)
_M2 = -7723592293110705685     # 0x94D049BB133111EB
_SEEDS = (-7046029254386353131, 0x5851F42D4C957F2D)  # 0x9E3779B97F4A7C15, a second odd constant
_LOW31 = (1 << 31) - 1


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of int64 whose outputs look independent (int64
    multiplication wraps, as the finaliser needs)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def set_hash(members: torch.Tensor, segment: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent 64-bit hashes of each of `n` sets, given as distinct `members` tagged
    with their set's `segment`: sums of mixed members, so independent of order. Two distinct
    sets agree on both with probability 2^-128."""
    out = []
    for seed in _SEEDS:
        h = torch.zeros(n, dtype=torch.int64)
        h.index_add_(0, segment, _mix(members ^ seed))
        out.append(h)
    return out[0], out[1]


_MASK = (1 << 64) - 1


def _mix_py(x: int) -> int:
    x = ((x ^ (x >> 30)) * (_M1 & _MASK)) & _MASK
    x = ((x ^ (x >> 27)) * (_M2 & _MASK)) & _MASK
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


_SEEDS_PY = tuple(s & _MASK for s in _SEEDS)


def set_hash_py(members) -> tuple[int, int]:
    """`set_hash` of one set in Python integers (bit for bit the same), for small batches where
    a tensor call costs more than the arithmetic."""
    a, b = _SEEDS_PY
    h1 = sum(_mix_py(m ^ a) for m in members) & _MASK
    h2 = sum(_mix_py(m ^ b) for m in members) & _MASK
    return _signed(h1), _signed(h2)


def gather_segments(flat: torch.Tensor, offsets: torch.Tensor, which: torch.Tensor):
    """The segments `which` of a CSR array (flat values, offsets with one more entry than
    segments): (their values concatenated, the position in `which` of each value)."""
    starts = offsets[which]
    lengths = offsets[which + 1] - starts
    total = int(lengths.sum())
    seg = torch.repeat_interleave(torch.arange(len(which)), lengths, output_size=total)
    first = torch.cumsum(lengths, 0) - lengths
    pos = starts[seg] + (torch.arange(total) - first[seg])
    return flat[pos], seg


class Buffer:
    """An int64 vector that grows by appending tensors (capacity doubles)."""

    def __init__(self, dtype=torch.int64):
        self.data = torch.empty(1024, dtype=dtype)
        self.n = 0
        self._np = None  # a numpy view of `data`, kept until the storage is replaced

    def append(self, values: torch.Tensor) -> None:
        m = values.numel()
        if self.n + m > self.data.numel():
            cap = max(2 * self.data.numel(), self.n + m)
            grown = torch.empty(cap, dtype=self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
            self._np = None
        self.data[self.n: self.n + m] = values.reshape(-1)
        self.n += m

    def view(self) -> torch.Tensor:
        return self.data[: self.n]

    def numpy(self):
        """The whole storage as a numpy array (entries past len() are garbage): reading one set
        at a time through it costs a slice, where `.numpy()` per read cost 5 us each."""
        if self._np is None:
            self._np = self.data.numpy()
        return self._np

    def __len__(self) -> int:
        return self.n


class Table:
    """Open-addressing hash table (linear probing) from distinct pairs (k1, k2) of int64 to
    non-negative int64 values; every operation takes whole batches."""

    def __init__(self, capacity: int = 1 << 12):
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.k1 = torch.zeros(capacity, dtype=torch.int64)
        self.k2 = torch.zeros(capacity, dtype=torch.int64)
        self.v = torch.full((capacity,), -1, dtype=torch.int64)
        self.n = 0

    def _slots(self, k1, k2):
        return _mix(k1 ^ _mix(k2)) & (self.v.numel() - 1)

    def get(self, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        """The value of each key, -1 where absent."""
        out = torch.full(k1.shape, -1, dtype=torch.int64)
        pending = torch.arange(k1.numel())
        slot = self._slots(k1, k2)
        mask = self.v.numel() - 1
        while pending.numel():
            tv = self.v[slot]
            hit = (tv >= 0) & (self.k1[slot] == k1[pending]) & (self.k2[slot] == k2[pending])
            out[pending[hit]] = tv[hit]
            go_on = ~hit & (tv >= 0)
            pending, slot = pending[go_on], (slot[go_on] + 1) & mask
        return out

    def put(self, k1: torch.Tensor, k2: torch.Tensor, values: torch.Tensor) -> None:
        """Inserts keys known to be absent and distinct."""
        if not k1.numel():
            return
        if 2 * (self.n + k1.numel()) > self.v.numel():
            cap = self.v.numel()
            while 2 * (self.n + k1.numel()) > cap:
                cap *= 2
            used = self.v >= 0
            o1, o2, ov = self.k1[used], self.k2[used], self.v[used]
            self._alloc(cap)
            self.put(o1, o2, ov)
        mask = self.v.numel() - 1
        pending = torch.arange(k1.numel())
        slot = self._slots(k1, k2)
        while pending.numel():
            free = self.v[slot] < 0
            # Several keys may reach one free slot: the first of them takes it, the rest probe on.
            cand, cslot = pending[free], slot[free]
            order = torch.argsort(cslot, stable=True)
            cand, cslot = cand[order], cslot[order]
            first = torch.ones(cslot.numel(), dtype=torch.bool)
            first[1:] = cslot[1:] != cslot[:-1]
            win, wslot = cand[first], cslot[first]
            self.k1[wslot], self.k2[wslot], self.v[wslot] = k1[win], k2[win], values[win]
            self.n += win.numel()
            placed = torch.zeros(k1.numel(), dtype=torch.bool)
            placed[win] = True
            go_on = ~placed[pending]
            pending, slot = pending[go_on], (slot[go_on] + 1) & mask
