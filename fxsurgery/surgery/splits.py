"""Unit axes that the graph splits into parts: the q/k/v thirds of a fused projection, the heads
of an attention layer.

A contraction numbers its output units by row (`attn.in_proj[r]`). When the graph later cuts
that axis into equal parts (`unflatten(-1, (3, E))`, `chunk(3)`, `view(B, L, heads, head_dim)`),
row r really is (part r // E, position r % E), and a widened model must be matched part by part,
never by raw row number. This module reads those cuts off the mapped graph (the keys of each
movement node's input and outputs) as chunk sizes per unit group: `{"attn.in_proj": [16, 4]}`
says row r is (r // 16, r % 16 // 4, r % 4).
"""
from __future__ import annotations

import math

import torch

from ..propagate import META_KEY
from ..setpool import KINDS
from .units import unit_sizes

__all__ = ["unit_splits", "digits"]

_RESHAPES = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::unflatten", "aten::view_copy"}
_SPLITS = {"aten::chunk", "aten::split", "aten::split_with_sizes", "aten::unsafe_split",
           "aten::unsafe_split_with_sizes", "aten::tensor_split", "aten::unbind", "aten::split_copy",
           "aten::split_with_sizes_copy", "aten::unbind_copy"}


def _keys(node):
    if not isinstance(node, torch.fx.Node):
        return None
    return (node.meta.get(META_KEY) or {}).get("keys")


def _units_along(lt, pool, sizes):
    """(group, first index, length) when the label ids vary along one axis only and hold
    consecutive units of one group there (an axis cut out of a unit axis), else None."""
    if lt is None or not hasattr(lt, "ids"):
        return None
    ids = lt.ids
    vary = [d for d in range(ids.dim()) if ids.shape[d] > 1]
    if len(vary) != 1:
        return None
    line = ids.reshape(-1)
    # Checked in tensor code: the line may be a 14,336-unit axis, at every reshape of the graph.
    if not bool((pool.sizes(line) == 1).all()):
        return None
    members, _ = pool.members(line)
    if not bool((pool.kinds(members) == KINDS.index("unit")).all()):
        return None
    first = pool.label(int(members[0]))
    if line.numel() > 1:
        rest = members[1:]
        steps = pool.indices(rest) - first.index - torch.arange(1, line.numel())
        if bool((steps != 0).any()) or {r.group for r in pool.ranges_of(rest)} != {first.group}:
            return None
    return first.group, first.index, int(line.numel())


def _inner(lt) -> int | None:
    """Size of the innermost axis along which an output's ids vary (when several do); 1 when
    they vary along one axis only and the reshape put an axis of size 1 right after it (parts
    of one position each: the heads of an attention whose heads are one channel wide)."""
    if lt is None or not hasattr(lt, "ids"):
        return None
    vary = [d for d in range(lt.ids.dim()) if lt.ids.shape[d] > 1]
    if len(vary) >= 2:
        return lt.ids.shape[vary[-1]]
    shape = tuple(lt.shape)
    if len(vary) == 1 and vary[0] + 1 < len(shape) and shape[vary[0] + 1] == 1:
        return 1
    return None


def unit_splits(traced, pool) -> dict[str, list[int]]:
    """Per unit group, the chunk sizes its axis is cut into by the graph, outermost first."""
    sizes = unit_sizes(pool)
    found: dict[str, set[int]] = {}
    for node in traced.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "_schema") or not node.args:
            continue
        name = node.target._schema.name
        if name not in _RESHAPES and name not in _SPLITS:
            continue
        src = _units_along(_keys(node.args[0]), pool, sizes)
        if src is None:
            continue
        group, first, n = src
        out = _keys(node)
        chunk = None
        if name in _RESHAPES:
            chunk = _inner(out)
        else:
            outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if hasattr(o, "ids")]
            lens = {_len_along(o, n) for o in outs}
            if len(outs) > 1 and len(lens) == 1:
                chunk = lens.pop()
        if chunk and 0 < chunk < n and n % chunk == 0 and sizes[group] % chunk == 0:
            found.setdefault(group, set()).add(int(chunk))
    result = {}
    for group, chunks in found.items():
        ordered = sorted(chunks, reverse=True)
        if all(a % b == 0 for a, b in zip(ordered, ordered[1:])):
            result[group] = ordered
    return result


def _len_along(lt, n: int) -> int | None:
    """Length of the one axis an output of a split varies along (its share of the unit axis)."""
    vary = [d for d in range(lt.ids.dim()) if lt.ids.shape[d] > 1]
    if len(vary) != 1:
        return None
    return int(lt.ids.shape[vary[0]])


def digits(index: int, chunks: list[int]) -> tuple:
    """Row `index` as (part, ..., position within the innermost part)."""
    out = []
    for c in chunks:
        out.append(index // c)
        index %= c
    out.append(index)
    return tuple(out)


def _radices(n: int, chunks: list[int]) -> tuple[int, ...]:
    """How many values each part of `digits` takes on an axis of n units."""
    bounds = [-(-n // chunks[0])] + [-(-a // b) for a, b in zip(chunks, chunks[1:])] + [chunks[-1]]
    return tuple(max(b, 1) for b in bounds)


class SplitBlock:
    """The tokens of a hidden axis cut into parts on both sides (heads x positions), numbered
    by arithmetic: the parts read as digits of one mixed-radix number whose radices hold both
    sides' parts, so that equal parts get the same token with no entry per unit."""

    def __init__(self, start: int, sides: dict):
        self.start = start
        self.sides = sides          # "old"/"new" -> (units, chunks), old first
        rads = [_radices(n, c) for n, c in sides.values()]
        self.radices = tuple(max(r) for r in zip(*rads))
        self.size = math.prod(self.radices)

    def tokens(self, index: torch.Tensor, chunks: list[int]) -> torch.Tensor:
        """The token of each unit index of a side whose parts are `chunks`."""
        code = torch.zeros_like(index)
        for c, r in zip(chunks, self.radices):
            code = code * r + index // c
            index = index % c
        return self.start + code * self.radices[-1] + index

    def token(self, parts: tuple) -> int | None:
        """The token of one tuple of parts (None when a part lies outside the block)."""
        code = 0
        for p, r in zip(parts, self.radices):
            if not 0 <= p < r:
                return None
            code = code * r + p
        return self.start + code

    def parts(self, token: int) -> tuple:
        code, out = token - self.start, []
        for r in reversed(self.radices):
            code, d = divmod(code, r)
            out.append(d)
        return tuple(reversed(out))

    def index(self, parts: tuple) -> int:
        """The unit index the parts first had: on the old side if it has them, else the new."""
        for n, chunks in self.sides.values():
            i = sum(p * c for p, c in zip(parts, chunks)) + parts[-1]
            if i < n and digits(i, chunks) == parts:
                return i
        return parts[-1]
