"""Data movement: one rule for every operator that only moves elements.

The operator itself is run on the label ids (as float64, exact below 2**53): each output element
receives the set of the element it came from, and elements it invents (padding, a zeroed
triangle) receive the empty set. Gathers whose indices are constants are movement too; with
data-dependent indices an element may come from anywhere along the gathered axis.
"""
from __future__ import annotations

import torch

from ..label_tensor import LabelTensor, ParamRef
from ._ops import ops
from .helpers import movement
from .registry import register

MOVES = ops(
    "view.default", "_unsafe_view.default", "reshape.default", "permute.default", "transpose.int",
    "t.default", "expand.default", "expand_as.default", "unsqueeze.default", "squeeze.default",
    "squeeze.dim", "squeeze.dims", "slice.Tensor", "select.int", "cat.default", "concat.default",
    "stack.default", "hstack.default", "vstack.default", "split.Tensor", "split_with_sizes.default",
    "chunk.default", "unbind.int", "flatten.using_ints", "unflatten.int", "flip.default", "roll.default",
    "repeat.default", "repeat_interleave.self_int", "narrow.default", "movedim.int", "swapaxes.default",
    "transpose_.default", "tile.default", "diagonal.default", "tril.default", "triu.default",
    "unfold.default", "pixel_shuffle.default", "pixel_unshuffle.default", "channel_shuffle.default",
    "native_channel_shuffle.default", "upsample_nearest1d.vec", "upsample_nearest2d.vec",
    "upsample_nearest3d.vec", "upsample_nearest1d.default", "upsample_nearest2d.default",
    "upsample_nearest3d.default", "view_as.default", "reshape_as.default",
    "broadcast_to.default", "rot90.default", "diag_embed.default", "tensor_split.indices",
    "tensor_split.sections", "split.sizes", "alias_copy.default", "view_copy.default",
    "permute_copy.default", "slice_copy.Tensor", "select_copy.int", "unsqueeze_copy.default",
    "squeeze_copy.dim", "expand_copy.default", "t_copy.default", "transpose_copy.int",
    "unbind_copy.int", "split_copy.Tensor", "split_with_sizes_copy.default", "atleast_1d.default",
    "atleast_2d.default", "atleast_3d.default", "reflection_pad1d.default", "reflection_pad2d.default",
    "reflection_pad3d.default", "replication_pad1d.default", "replication_pad2d.default",
    "replication_pad3d.default", "slice_scatter.default", "select_scatter.default",
    "diagonal_scatter.default",
)


@register(*MOVES, family="movement")
def move(ctx, *args, **kwargs):
    return movement(ctx, ctx.node.target, args, kwargs)


@register(*ops("constant_pad_nd.default"), family="movement")
def constant_pad(ctx, x, pad, value=0.0):
    return movement(ctx, ctx.node.target, (x, pad), {}, fill=())


@register(*ops("pad.default"), family="movement")
def pad(ctx, x, pad, mode="constant", value=None):
    return movement(ctx, ctx.node.target, (x, pad, mode), {})


def _fit(ctx, ids: torch.Tensor, shape) -> torch.Tensor:
    """Unions away every axis of `ids` whose size does not match `shape` (sound)."""
    bad = [d for d in range(ids.dim()) if ids.shape[d] not in (1, shape[d])]
    return ctx.pool.reduce_ids(ids, bad, keepdim=True) if bad else ids


def _data_gather(ctx, x: LabelTensor, dim: int, index: LabelTensor) -> LabelTensor:
    """An index that is not a known constant may pick any element along `dim`: each output
    element depends on the union along that axis and on what the index depends on."""
    shape = ctx.out_shape()
    d = dim % x.ndim
    ids = _fit(ctx, ctx.pool.reduce_ids(x.ids, [d], keepdim=True), shape)
    if index.ndim == len(shape):
        idx = _fit(ctx, index.ids, shape)
    else:  # index_select: a 1-D index along `dim`
        view = [1] * len(shape)
        view[d] = index.ids.shape[0] if index.ids.dim() else 1
        idx = index.ids.reshape(view)
    refs = tuple(ParamRef(r.name, r.shape, everything=True) for r in x.refs) if x.is_free and index.is_free else ()
    return LabelTensor(ctx.pool.union_ids(ids, idx), shape, refs)


@register(*ops("index_select.default"), family="movement")
def index_select(ctx, x, dim, index):
    if index.const is not None:
        return movement(ctx, ctx.node.target, (x, dim, index.const), {})
    if x.is_param:
        from .embedding import lookup
        return lookup(ctx, x, index, dim=dim)
    return _data_gather(ctx, x, dim, index)


@register(*ops("gather.default"), family="movement")
def gather(ctx, x, dim, index, sparse_grad=False):
    if index.const is not None:
        return movement(ctx, ctx.node.target, (x, dim, index.const), {})
    return _data_gather(ctx, x, dim, index)


@register(*ops("index_copy.default"), family="movement")
def index_copy(ctx, x, dim, index, source):
    if index.const is None:
        from ..propagate import NotCovered
        raise NotCovered("a data-dependent index")
    return movement(ctx, ctx.node.target, (x, dim, index.const, source), {})


@register(*ops("index.Tensor", "_unsafe_index.Tensor"), family="movement")
def index(ctx, x, indices):
    if all(i is None or i.const is not None for i in indices):
        consts = [None if i is None else i.const for i in indices]
        return movement(ctx, ctx.node.target, (x, consts), {})
    used = [d for d, i in enumerate(indices) if i is not None]
    if len(used) == 1:
        d, idx = used[0], indices[used[0]]
        if x.is_param and x.is_free:
            if d == 0 and len(indices) == 1:
                from .embedding import lookup
                return lookup(ctx, x, idx, dim=0)
            from ..propagate import NotCovered
            raise NotCovered("a parameter indexed by data along an inner axis")
        # y[..., k..., :] = x[..., idx[k...], :]: the union along the indexed axis, with the
        # index's own labels on the axes it brings.
        shape = ctx.out_shape()
        along = ctx.pool.reduce_ids(x.ids, [d], keepdim=False)
        along = along.reshape(list(along.shape[:d]) + [1] * idx.ndim + list(along.shape[d:]))
        idx_ids = idx.ids.reshape([1] * d + list(idx.ids.shape) + [1] * (x.ndim - d - 1))
        return LabelTensor(ctx.pool.union_ids(along, idx_ids), shape)
    # Several data indices broadcast together: sound, each output element may come from any
    # position along the indexed axes.
    shape = ctx.out_shape()
    everything = ctx.pool.union_many([x.total(ctx.pool)] + [i.total(ctx.pool) for i in indices if i is not None])
    if x.is_param:
        from ..propagate import NotCovered
        raise NotCovered("a parameter indexed by several data indices")
    return LabelTensor(torch.tensor(everything).reshape([1] * len(shape)), shape)
