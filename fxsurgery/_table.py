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
_TAIL = 24  # keys left probing that a table finishes in Python


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
    starts = offsets.index_select(0, which)
    lengths = offsets.index_select(0, which + 1) - starts
    total = int(lengths.sum())
    if total == which.numel() and bool((lengths == 1).all()):  # singletons: one value each
        return flat.index_select(0, starts), torch.arange(total)
    seg = torch.repeat_interleave(lengths, output_size=total)
    # position = start of its segment + rank within it = arange + (start - first output slot)
    shift = starts - (torch.cumsum(lengths, 0) - lengths)
    pos = torch.arange(total) + torch.repeat_interleave(shift, lengths, output_size=total)
    return flat.index_select(0, pos), seg


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
    non-negative int64 values; every operation takes whole batches.

    Laid out like CPython's compact dict: the entries (k1, k2, value) are rows appended in
    insertion order, and the probed array holds only an int32 entry index per slot. Growing
    then allocates and probes 4 bytes a slot (the rows are copied, never rehashed); with rows
    in the slots, the fresh memory's page faults and the reinsertion made growing cost more
    than every insertion in between. The slots stay at most 3/8 used, so nearly every key
    settles in the first probe round."""

    def __init__(self, capacity: int = 1 << 12):
        self.rows = torch.empty(capacity, 3, dtype=torch.int64)
        self.n = 0
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.slots = torch.full((capacity,), -1, dtype=torch.int32)
        self._shift = 64 - (capacity.bit_length() - 1)

    def _hash(self, k1, k2):
        # Multiplicative (Fibonacci) hashing: the top bits of a product depend on every bit of
        # the key, which spreads the small consecutive ids of union pairs as well as it does
        # the random set hashes; two multiplications where splitmix's finaliser took twenty calls.
        return _shr((k1 * _M1 + k2) * _M2, self._shift)

    def get(self, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        """The value of each key, -1 where absent."""
        # index_select/masked_select throughout: advanced indexing (t[idx], t[mask]) was
        # measured 3-8x slower on the same tensors.
        mask = self.slots.numel() - 1
        slot = self._hash(k1, k2)
        out = None
        pending = None  # positions in the batch still probing (None: all of them)
        while True:
            entry = self.slots.index_select(0, slot)
            used = entry >= 0
            row = self.rows.index_select(0, entry.clamp(min=0))
            hit = used & (row[:, 0] == k1) & (row[:, 1] == k2)
            if out is None:
                out = torch.where(hit, row[:, 2], -1)
            else:
                out.index_copy_(0, pending.masked_select(hit), row[:, 2].masked_select(hit))
            go_on = used & ~hit
            if not bool(go_on.any()):
                return out
            keep = torch.nonzero(go_on).reshape(-1)
            pending = keep if pending is None else pending.index_select(0, keep)
            k1, k2 = k1.index_select(0, keep), k2.index_select(0, keep)
            slot = (slot.index_select(0, keep) + 1) & mask
            if pending.numel() <= _TAIL:
                self._get_tail(k1, k2, slot, pending, out)
                return out

    def _get_tail(self, k1, k2, slot, pending, out) -> None:
        # The last few keys of a batch, probe by probe in Python: the tail of linear probing's
        # chains is ~20 slots long at this load, each a round of tensor calls on a few keys.
        slots, rows, mask, found = self.slots.numpy(), self.rows.numpy(), self.slots.numel() - 1, []
        for a, b, s in zip(k1.tolist(), k2.tolist(), slot.tolist()):
            while True:
                e = slots[s]
                if e < 0:
                    found.append(-1)
                    break
                if rows[e, 0] == a and rows[e, 1] == b:
                    found.append(int(rows[e, 2]))
                    break
                s = (s + 1) & mask
        out.index_copy_(0, pending, torch.tensor(found, dtype=torch.int64))

    def put(self, k1: torch.Tensor, k2: torch.Tensor, values: torch.Tensor) -> None:
        """Inserts keys known to be absent and distinct."""
        m = k1.numel()
        if not m:
            return
        if self.n + m > self.rows.shape[0]:
            grown = torch.empty(max(2 * self.rows.shape[0], self.n + m), 3, dtype=torch.int64)
            grown[: self.n] = self.rows[: self.n]
            self.rows = grown
        self.rows[self.n: self.n + m, 0] = k1
        self.rows[self.n: self.n + m, 1] = k2
        self.rows[self.n: self.n + m, 2] = values
        if 8 * (self.n + m) > 3 * self.slots.numel():
            cap = self.slots.numel()
            while 8 * (self.n + m) > 3 * cap:
                cap *= 2
            self._alloc(cap)
            self._place(0, self.n + m)
        else:
            self._place(self.n, self.n + m)
        self.n += m

    def _place(self, lo: int, hi: int) -> None:
        """Enters rows lo..hi-1 in the slots."""
        mask = self.slots.numel() - 1
        rows = self.rows[lo:hi]
        pending = torch.arange(lo, hi, dtype=torch.int32)
        slot = self._hash(rows[:, 0], rows[:, 1])
        while pending.numel() > _TAIL:
            free = torch.nonzero(self.slots.index_select(0, slot) < 0).reshape(-1)
            # Several rows may reach one free slot: each writes its index there and the last
            # written stays (which one is immaterial: a lookup probes until it finds its key);
            # the others read back another index and probe on.
            cand, cslot = pending.index_select(0, free), slot.index_select(0, free)
            self.slots.index_copy_(0, cslot, cand)
            won = self.slots.index_select(0, cslot) == cand
            if int(won.sum()) == pending.numel():
                return
            go_on = torch.ones(pending.numel(), dtype=torch.bool)
            go_on.index_fill_(0, free.masked_select(won), False)
            keep = torch.nonzero(go_on).reshape(-1)
            pending, slot = pending.index_select(0, keep), (slot.index_select(0, keep) + 1) & mask
        slots = self.slots.numpy()  # the tail, in Python (see _get_tail)
        for e, s in zip(pending.tolist(), slot.tolist()):
            while slots[s] >= 0:
                s = (s + 1) & mask
            slots[s] = e
