"""Building a new parameter from an old one and a `Match`, with index operations only.

Per axis (block) the match gives the old position of each new position or -1. Copied
stretches are found as runs of consecutive positions: few runs (the usual case: features or
units added at one place, a prefix kept) are copied as slices, straight from the old tensor
into the new one; many runs (a reordering) become one `index_select` along that axis. An axis
map that is the identity costs nothing, and a parameter whose every axis is the identity is
handed over as the old tensor itself (`load_state_dict` does the one copy). Positions not
copied are then filled, slice by slice, from the new model's own values, zeroed where they
meet a new label.
"""
from __future__ import annotations

import itertools
import math

import torch

from .._sort import searchsorted
from .match import Match

__all__ = ["build", "in_place_writes", "writes_nothing", "select_matched", "RUN_LIMIT"]

RUN_LIMIT = 8          # at most this many copied stretches along an axis are copied as slices
REGION_LIMIT = 64      # and at most this many slice copies per parameter


def _runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal stretches (new start, old start, length) where index[i+1] = index[i] + 1 >= 1.
    More than a few hundred come back as a list of placeholders (the caller indexes instead)."""
    n = index.numel()
    if n == 0:
        return []
    valid = index >= 0
    start = valid.clone()
    if n > 1:
        start[1:] &= ~(valid[:-1] & (index[1:] == index[:-1] + 1))
    starts = torch.nonzero(start).reshape(-1)
    if starts.numel() > 512:
        return [(-1, -1, -1)] * int(starts.numel())
    breaks = torch.nonzero(start | ~valid).reshape(-1)
    nxt = searchsorted(breaks, starts, right=True)
    ends = torch.where(nxt < breaks.numel(), breaks[nxt.clamp(max=max(breaks.numel() - 1, 0))],
                       torch.full_like(starts, n))
    return [(s, o, e - s) for s, o, e in zip(starts.tolist(), index.index_select(0, starts).tolist(), ends.tolist())]


def _block_view(t: torch.Tensor, blocks, shape_attr: str) -> tuple[torch.Tensor, list[int]]:
    """The tensor with its axes grouped block by block and each block flattened."""
    perm = [a for b in blocks for a in b.axes]
    if all(len(b.axes) == 1 for b in blocks):
        return t, perm
    sizes = [math.prod(getattr(b, shape_attr)) for b in blocks]
    return t.permute(perm).reshape(sizes), perm


def _unview(t: torch.Tensor, blocks, perm, shape) -> torch.Tensor:
    if all(len(b.axes) == 1 for b in blocks):
        return t
    t = t.reshape([shape[a] for a in perm])
    inverse = [0] * len(perm)
    for i, a in enumerate(perm):
        inverse[a] = i
    return t.permute(inverse).contiguous()


def _zero_positions(m: Match, new_categories: str) -> list[torch.Tensor]:
    keep_cats = new_categories != "zero"
    return [b.zero & ~b.category if keep_cats else b.zero for b in m.blocks]


def _init_values(m: Match, new: torch.Tensor, new_categories: str, zero_pos=None) -> torch.Tensor:
    """The new model's values, zeroed where they meet a new label (a fresh tensor)."""
    out = new.clone()
    if m.unexplained:
        return out
    if m.zero_all and not (m.category_all and new_categories != "zero"):
        return out.zero_()
    for d, z in enumerate(zero_pos if zero_pos is not None else _zero_positions(m, new_categories)):
        idx = torch.nonzero(z).reshape(-1)
        if idx.numel():
            out.index_fill_(d, idx.to(out.device), 0)
    return out


def build(m: Match, old: torch.Tensor | None, new: torch.Tensor, new_categories: str = "zero") -> torch.Tensor:
    """The new value of one parameter: copied where matched, initialised elsewhere. Returns the
    old tensor itself (converted to the new dtype and device) when every element is copied in
    place; otherwise a fresh tensor. Neither `old` nor `new` is modified."""
    if not m.copy or old is None or m.unexplained:
        if not m.blocks and not m.unexplained:
            return new.clone().zero_() if m.zero_all and not (m.category_all and new_categories != "zero") \
                else new.clone()
        view, perm = _block_view(new, m.blocks, "new_shape") if m.blocks else (new, [])
        out = _init_values(m, view, new_categories)
        return _unview(out, m.blocks, perm, m.new_shape) if m.blocks else out
    old = old.to(device=new.device, dtype=new.dtype)
    if m.identity:
        return old
    old_v, perm = _block_view(old, m.blocks, "old_shape")
    new_v, _ = _block_view(new, m.blocks, "new_shape")
    maps = [b.index.to(new.device) for b in m.blocks]
    out = _gather(old_v, maps, tuple(new_v.shape))
    zero_pos = _zero_positions(m, new_categories)
    for d, idx in enumerate(maps):
        missing = torch.nonzero(idx < 0).reshape(-1)
        if missing.numel():
            part = new_v.index_select(d, missing)
            part = _zero_slice(m, part, d, missing, zero_pos, new_categories)
            out.index_copy_(d, missing, part)
    if new_categories == "mean":
        _mean_rows(m, out, maps)
    return _unview(out, m.blocks, perm, m.new_shape)


def _zero_slice(m: Match, part, d, missing, zero_pos, new_categories):
    if m.zero_all and not (m.category_all and new_categories != "zero"):
        return part.zero_()
    for e, z in enumerate(zero_pos):
        z = z[missing] if e == d else z
        idx = torch.nonzero(z).reshape(-1)
        if idx.numel():
            part.index_fill_(e, idx.to(part.device), 0)
    return part


def _mean_rows(m: Match, out: torch.Tensor, maps) -> None:
    """New category positions become the mean of the copied ones along their axis."""
    for d, b in enumerate(m.blocks):
        rows = torch.nonzero(b.category & (b.index < 0)).reshape(-1)
        copied = torch.nonzero(b.index >= 0).reshape(-1)
        if rows.numel() and copied.numel():
            mean = out.index_select(d, copied).mean(d, keepdim=True)
            shape = list(out.shape)
            shape[d] = rows.numel()
            out.index_copy_(d, rows, mean.expand(shape).contiguous())


def writes_nothing(m: Match, old: torch.Tensor | None, new_categories: str = "zero") -> bool:
    """True when the parameter keeps every value the new model gave it: nothing copied, nothing
    zeroed (re-initialised, or new and meeting no new label)."""
    if m.unexplained:
        return True
    if m.copy and old is not None:
        return False
    if m.zero_all and not (m.category_all and new_categories != "zero"):
        return False
    return not any(bool(z.any()) for z in _zero_positions(m, new_categories))


def _gather(old: torch.Tensor, maps, new_shape) -> torch.Tensor:
    """old re-indexed along every axis by `maps` (-1 positions hold arbitrary values)."""
    runs = [_runs(idx) for idx in maps]
    index_axes = _index_axes(runs)
    src = old
    for d in sorted(index_axes):
        src = src.index_select(d, maps[d].clamp(min=0))
    # Axes left: copied as slices. Identity axes are a single full run.
    full = all(d in index_axes or (len(runs[d]) == 1 and runs[d][0] == (0, 0, new_shape[d]) and
                                   old.shape[d] == new_shape[d]) for d in range(len(maps)))
    if full:
        return src if src is not old else old.clone()
    out = torch.empty(new_shape, dtype=old.dtype, device=old.device)
    for dst_sl, src_sl in _copy_regions(runs, index_axes, new_shape):
        out[dst_sl].copy_(src[src_sl])
    return out


def _copy_regions(runs, index_axes, new_shape):
    """(destination slices, source slices) of every region copied as a slice: the product of
    the per-axis runs, index axes taken whole (their source is already re-indexed)."""
    per_axis = [[(0, 0, new_shape[d])] if d in index_axes else runs[d] for d in range(len(runs))]
    for combo in itertools.product(*per_axis):
        yield (tuple(slice(s, s + n) for s, _, n in combo), tuple(slice(o, o + n) for _, o, n in combo))


def _index_axes(runs) -> set:
    """The axes re-indexed with index_select rather than copied run by run: those with many
    runs, then the longest ones until the number of slice copies is small."""
    index_axes = {d for d, r in enumerate(runs) if len(r) > RUN_LIMIT}
    while math.prod(1 if d in index_axes else max(len(r), 1) for d, r in enumerate(runs)) > REGION_LIMIT:
        index_axes.add(max((d for d in range(len(runs)) if d not in index_axes), key=lambda d: len(runs[d])))
    return index_axes


def in_place_writes(m: Match, old: torch.Tensor | None, dest: torch.Tensor, new_categories: str = "zero"):
    """The new value of one parameter as deferred writes into `dest`, which holds the new
    model's own values: a list of calls that allocate nothing and cannot fail on shape, to be
    run after every parameter has been prepared. Whatever needs memory (an axis re-indexed
    by a reordering, a dtype conversion) is computed here, before any write. None when the
    value cannot be written in place (the caller builds it fresh with `build`): positions that
    keep the new model's values along an axis that is re-indexed, mean rows for new
    categories, a grouping of axes that `dest` cannot be viewed as."""
    if m.unexplained:
        return []
    zero_pos = _zero_positions(m, new_categories)
    zero_everything = m.zero_all and not (m.category_all and new_categories != "zero")
    if zero_everything and not (m.copy and old is not None):
        return [dest.zero_]
    if m.copy and old is not None and m.identity:
        return [lambda: dest.copy_(old)]
    view = _dest_view(dest, m.blocks)
    if view is None:
        return None
    if not m.copy or old is None:
        return _zero_writes(view, zero_pos)
    if new_categories == "mean" and any(bool((b.category & (b.index < 0)).any()) for b in m.blocks):
        return None
    maps = [b.index.to(dest.device) for b in m.blocks]
    missing = [torch.nonzero(idx < 0).reshape(-1) for idx in maps]
    # Zeroing whole slabs along an axis is right only if no zeroed position is also copied.
    if any(bool((z.to(idx.device) & (idx >= 0)).any()) for z, idx in zip(zero_pos, maps)):
        return None
    runs = [_runs(idx) for idx in maps]
    index_axes = _index_axes(runs)
    if any(missing[d].numel() for d in index_axes):
        return None
    src, _ = _block_view(old, m.blocks, "old_shape")
    for d in sorted(index_axes):
        src = src.index_select(d, maps[d].to(src.device))
    if src.device != dest.device or src.dtype != dest.dtype:
        src = src.to(device=dest.device, dtype=dest.dtype)
    writes = [lambda d_sl=d_sl, s_sl=s_sl: view[d_sl].copy_(src[s_sl])
              for d_sl, s_sl in _copy_regions(runs, index_axes, tuple(view.shape))]
    if zero_everything:
        return writes + _zero_writes(view, missing)
    return writes + _zero_writes(view, zero_pos)


def _dest_view(dest: torch.Tensor, blocks):
    """`dest` with its axes grouped block by block, sharing its memory, or None."""
    if all(len(b.axes) == 1 for b in blocks):
        return dest
    perm = [a for b in blocks for a in b.axes]
    try:
        return dest.permute(perm).view([math.prod(b.new_shape) for b in blocks])
    except RuntimeError:
        return None


def _zero_writes(view: torch.Tensor, positions) -> list:
    """Zero every slab view[..., i, ...] along each axis d for i in positions[d] (bool or index)."""
    writes = []
    for d, pos in enumerate(positions):
        idx = torch.nonzero(pos).reshape(-1) if pos.dtype == torch.bool else pos
        if idx.numel():
            writes.append(lambda d=d, idx=idx.to(view.device): view.index_fill_(d, idx, 0))
    return writes


def select_matched(m: Match, old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The elements of `new` that were matched, and their counterparts in `old`, in the same
    order (used to compare outputs that gained or lost positions)."""
    if m.identity:
        return old, new
    old_v, _ = _block_view(old, m.blocks, "old_shape")
    new_v, _ = _block_view(new, m.blocks, "new_shape")
    for d, b in enumerate(m.blocks):
        keep = torch.nonzero(b.index >= 0).reshape(-1).to(new.device)
        new_v = new_v.index_select(d, keep)
        old_v = old_v.index_select(d, b.index.to(old.device)[keep])
    return old_v, new_v


def materialise(model: torch.nn.Module) -> torch.nn.Module:
    """Gives a model built on the meta device CPU storage and its modules' own
    initialisation (reset_parameters, reset_running_stats), so that a plan can write into
    it. A model with no meta tensor is returned untouched."""
    if not any(t.device.type == "meta" for t in model.state_dict(keep_vars=True).values()):
        return model
    model.to_empty(device="cpu")
    with torch.no_grad():
        for m in model.modules():
            for method in ("reset_parameters", "reset_running_stats"):
                reset = getattr(m, method, None)
                if callable(reset):
                    reset()
    return model
