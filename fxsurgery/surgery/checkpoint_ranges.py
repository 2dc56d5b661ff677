"""Copied elements as byte ranges of the source file, so that they never pass through torch.

Going through torch, a copied tensor costs a page fault per page of the mapped source, a copy
into the output buffer and a write of that buffer: three passes over the bytes. But what a
plan copies is, for most parameters, a few slices of the old tensor (units or tokens added at
one end, a prefix kept); in a safetensors file those are stretches of bytes at known offsets.
So, when the output has the source's dtype and every copied region is a slice:

  - a long stretch (FILE_COPY_MIN bytes or more, e.g. the old rows of a widened layer, a whole
    unchanged tensor) goes from file to file in the kernel (`os.copy_file_range`; a plain read
    and write where the file system refuses it), never entering the process;
  - short stretches (the old part of each row of a layer that gained columns) are read with
    `os.preadv` straight into their places in the output buffer, one call for up to 1024
    stretches that are consecutive in the source;
  - what is not copied (new rows or columns: the new model's values, or zeros) is written
    from the output buffer, which `checkpoint` prepared as before.

`copy_chunks` says where each copied stretch goes (None: this parameter takes the torch route:
a re-indexed axis, grouped axes, mean rows); `parts` turns an output buffer and those chunks
into the `Parts` that `ShardWriter.write` writes in order.
"""
from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .apply import _copy_regions, _index_axes, _runs, _zero_positions
from .errors import SurgeryError
from .match import Match

__all__ = ["FILE_COPY_MIN", "FileRange", "Parts", "copy_chunks", "worth_it", "zero_writes", "parts", "copy_range",
           "write_all"]

FILE_COPY_MIN = 1 << 20    # bytes: a copied stretch this long goes file to file
_MAX_CHUNKS = 1 << 16      # more stretches than this: the torch route (one gather)
_SMALL_CHUNK = 4096        # many stretches shorter than this on average: the torch route too
_IOV_MAX = 1024            # buffers per preadv call (the POSIX minimum of IOV_MAX)
_FALLBACK_ERRNOS = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}


@dataclass(frozen=True)
class FileRange:
    path: Path
    offset: int      # absolute, in bytes
    length: int


@dataclass
class Parts:
    """A tensor's bytes in order: memoryviews (of the output buffer) and FileRanges."""
    pieces: list
    nbytes: int


def copy_chunks(m: Match, new_categories: str, old_shape, new_shape, memo: dict | None = None):
    """The copied elements of a parameter as (destination offset, source offset, count) in
    elements of the contiguous tensors, sorted and merged; None when the copy is not a few
    slices (then checkpoint builds the tensor with torch, as in_place_writes / build do).
    `memo` keeps the answers by what they depend on: the layers of a model repeat one match."""
    if memo is None:
        return _copy_chunks(m, new_categories, old_shape, new_shape)
    key = (new_categories, tuple(old_shape), tuple(new_shape), m.copy, m.unexplained, m.identity,
           tuple((b.axes, b.old_shape, b.new_shape, _key(b.index), _key(b.zero), _key(b.category))
                 for b in m.blocks))
    if key not in memo:
        memo[key] = _copy_chunks(m, new_categories, old_shape, new_shape)
    return memo[key]


def _key(t: torch.Tensor) -> tuple:
    return (t.dtype, tuple(t.shape), t.numpy().tobytes())


def _copy_chunks(m: Match, new_categories: str, old_shape, new_shape):
    if m.unexplained or not m.copy or m.old_shape is None or not m.blocks or m.identity:
        return None
    if any(len(b.axes) != 1 for b in m.blocks) or len(m.blocks) != len(new_shape):
        return None          # grouped axes: their slices are not slices of the file
    if new_categories == "mean" and any(bool((b.category & (b.index < 0)).any()) for b in m.blocks):
        return None
    maps = [b.index for b in m.blocks]
    if any(bool((z & (idx >= 0)).any()) for z, idx in zip(_zero_positions(m, new_categories), maps)):
        return None          # a copied position is zeroed too: build() decides, not slices
    runs = [_runs(idx) for idx in maps]
    if any(r and r[0][0] < 0 for r in runs) or _index_axes(runs):
        return None          # a reordering: one index_select, the torch route
    old_meta = torch.empty(tuple(old_shape), device="meta")
    new_meta = torch.empty(tuple(new_shape), device="meta")
    dst, src, lengths = [], [], []
    for d_sl, s_sl in _copy_regions(runs, set(), tuple(new_shape)):
        dv, sv = new_meta[d_sl], old_meta[s_sl]
        found = _strided(tuple(dv.shape), dv.stride(), dv.storage_offset(), sv.stride(), sv.storage_offset())
        if found is None:
            return None
        d, s, n = found
        dst.append(d)
        src.append(s)
        lengths.append(torch.full_like(d, n))
        if sum(x.numel() for x in dst) > _MAX_CHUNKS:
            return None
    if not dst:
        return []
    d, s, n = torch.cat(dst), torch.cat(src), torch.cat(lengths)
    order = torch.argsort(d)
    return _merge(d[order], s[order], n[order])


def _strided(shape, dstride, doff, sstride, soff):
    """The contiguous stretches of a region with these shapes and strides, as (destination
    offsets, source offsets, stretch length)."""
    if any(n == 0 for n in shape):
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0
    dims = [(n, a, b) for n, a, b in zip(shape, dstride, sstride) if n != 1]
    length, k = 1, len(dims)
    while k and dims[k - 1][1] == length and dims[k - 1][2] == length:
        length *= dims[k - 1][0]
        k -= 1
    if math.prod(n for n, _, _ in dims[:k]) > _MAX_CHUNKS:
        return None
    d, s = torch.tensor([doff]), torch.tensor([soff])
    for n, a, b in dims[:k]:
        i = torch.arange(n)
        d = (d[:, None] + i[None, :] * a).reshape(-1)
        s = (s[:, None] + i[None, :] * b).reshape(-1)
    return d, s, length


def _merge(d: torch.Tensor, s: torch.Tensor, n: torch.Tensor) -> list[tuple[int, int, int]]:
    """Sorted stretches merged where one continues the previous in both tensors (vectorised:
    a widened layer has thousands of stretches, one per row)."""
    if d.numel() > 1:
        cont = (d[1:] == d[:-1] + n[:-1]) & (s[1:] == s[:-1] + n[:-1])
        first = torch.cat([torch.ones(1, dtype=torch.bool), ~cont])
        starts = torch.nonzero(first).reshape(-1)
        bounds = torch.cat([torch.zeros(1, dtype=n.dtype), torch.cumsum(n, 0)])
        ends = torch.cat([starts[1:], torch.tensor([d.numel()])])
        lengths = bounds[ends] - bounds[starts]
        d, s, n = d[starts], s[starts], lengths
    return list(zip(d.tolist(), s.tolist(), n.tolist()))


def worth_it(chunks, itemsize: int) -> bool:
    """Whether the byte route pays: not too many tiny stretches (one syscall per few)."""
    if chunks is None:
        return False
    return len(chunks) <= 64 or sum(c[2] for c in chunks) * itemsize / len(chunks) >= _SMALL_CHUNK


def zero_writes(m: Match, new_categories: str, dest: torch.Tensor) -> list:
    """The zeroing part of in_place_writes: the positions that are neither copied nor keep the
    new model's values (copy_chunks has refused every case where a zeroed one is copied)."""
    if m.zero_all and not (m.category_all and new_categories != "zero"):
        positions = [b.index < 0 for b in m.blocks]
    else:
        positions = _zero_positions(m, new_categories)
    writes = []
    for d, pos in enumerate(positions):
        runs = _true_runs(pos)
        if runs is None:          # scattered positions: one index_fill_
            idx = torch.nonzero(pos).reshape(-1)
            writes.append(lambda d=d, idx=idx: dest.index_fill_(d, idx, 0))
        else:                     # a few stretches (new units' columns): a strided fill each, far faster
            writes += [lambda d=d, a=a, n=n: dest.narrow(d, a, n).zero_() for a, n in runs]
    return writes


def _true_runs(mask: torch.Tensor, limit: int = 64):
    """The stretches (start, length) where the bool `mask` holds; None when more than `limit`."""
    idx = torch.nonzero(mask).reshape(-1)
    if not idx.numel():
        return []
    starts = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool), idx[1:] != idx[:-1] + 1])).reshape(-1)
    if starts.numel() > limit:
        return None
    ends = torch.cat([starts[1:], torch.tensor([idx.numel()])])
    return [(int(idx[a]), int(b - a)) for a, b in zip(starts.tolist(), ends.tolist())]


def parts(dest: torch.Tensor, chunks, src: FileRange, itemsize: int, name: str) -> Parts:
    """`dest` (the output tensor, prepared except for its copied elements) as Parts: long
    copied stretches as FileRanges of `src` (the old tensor's bytes), short ones read into
    `dest` now."""
    buf = memoryview(dest.reshape(-1).view(torch.uint8).numpy()).cast("B")
    total = len(buf)
    small = [(a * itemsize, b * itemsize, c * itemsize) for a, b, c in chunks if c * itemsize < FILE_COPY_MIN]
    _read_into(src, buf, small, name)
    pieces, at = [], 0
    for a, b, c in chunks:
        a, b, c = a * itemsize, b * itemsize, c * itemsize
        if c < FILE_COPY_MIN:
            continue          # already in buf: written with its neighbours
        if a > at:
            pieces.append(buf[at:a])
        pieces.append(FileRange(src.path, src.offset + b, c))
        at = a + c
    if at < total:
        pieces.append(buf[at:total])
    return Parts(pieces, total)


def _read_into(src: FileRange, buf: memoryview, chunks, name: str) -> None:
    """Reads the (destination, source, length) byte stretches of `src` into `buf`: one preadv
    per run of stretches that follow each other in the file."""
    if not chunks:
        return
    t = torch.tensor(chunks, dtype=torch.long)       # grouped in one pass, not stretch by stretch in Python
    d, s, n = t[:, 0].tolist(), t[:, 1], t[:, 2]
    follows = torch.nonzero(s[1:] != s[:-1] + n[:-1]).reshape(-1) + 1
    bounds = [0] + follows.tolist() + [len(chunks)]
    s, n = s.tolist(), n.tolist()
    fd = os.open(src.path, os.O_RDONLY)
    try:
        for lo, hi in zip(bounds, bounds[1:]):
            for i in range(lo, hi, _IOV_MAX):
                j = min(i + _IOV_MAX, hi)
                _preadv_all(fd, [buf[a:a + c] for a, c in zip(d[i:j], n[i:j])], src.offset + s[i], src.path, name)
    finally:
        os.close(fd)


def _preadv_all(fd: int, views: list, offset: int, path: Path, name: str) -> None:
    i = 0                 # views[:i] are filled (an index: dropping them one by one is quadratic)
    while i < len(views):
        got = os.preadv(fd, views[i:] if i else views, offset)
        if got == 0:
            raise SurgeryError(f"{path} ended inside the data of {name}; is the file truncated?")
        offset += got
        while i < len(views) and got >= len(views[i]):
            got -= len(views[i])
            i += 1
        if got:
            views[i] = views[i][got:]


def copy_range(r: FileRange, out_fd: int, name: str, state: dict) -> None:
    """Appends the bytes of `r` to the file open at `out_fd` (at its current position), in the
    kernel when it can (state["kernel"] turns False once the file system refuses)."""
    fd = os.open(r.path, os.O_RDONLY)
    try:
        done = 0
        while done < r.length and state.get("kernel", True) and hasattr(os, "copy_file_range"):
            try:
                n = os.copy_file_range(fd, out_fd, r.length - done, r.offset + done)
            except OSError as e:
                if e.errno not in _FALLBACK_ERRNOS:
                    raise
                state["kernel"] = False
                break
            if n == 0:
                raise SurgeryError(f"{r.path} ended inside the data of {name}; is the file truncated?")
            done += n
        if done < r.length:
            _copy_by_reading(fd, out_fd, r, done, name)
    finally:
        os.close(fd)


def _copy_by_reading(fd: int, out_fd: int, r: FileRange, done: int, name: str) -> None:
    block = memoryview(bytearray(min(8 << 20, r.length - done)))
    while done < r.length:
        n = os.preadv(fd, [block[:min(len(block), r.length - done)]], r.offset + done)
        if n == 0:
            raise SurgeryError(f"{r.path} ended inside the data of {name}; is the file truncated?")
        write_all(out_fd, block[:n])
        done += n


def write_all(fd: int, data) -> None:
    """os.write until every byte is written (a single write stops at about 2 GB)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view)
        view = view[n:]
