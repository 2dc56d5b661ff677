"""Embeddings and other lookups of a parameter by an integer index.

A category input's elements may each hold any of its categories. Row `c` of an embedding
table meets category `c` (and whatever the index positions depend on); the looked-up vector
depends on every category the index may hold. This is the one-hot reading of an embedding:
`embedding(i, E) = onehot(i) @ E`, which is how the gradient mapping differentiates it.
"""
from __future__ import annotations

import torch

from ..label_tensor import LabelTensor
from .._sort import unique
from ..labels import EMPTY
from ..setpool import KINDS
from ._ops import ops
from .contractions import unit_group
from .registry import register


_CATEGORY = KINDS.index("category")


def _split_categories(ctx, index: LabelTensor):
    """(category label ids, their values, set id of the non-category labels) of an index
    tensor, as tensors: a vocabulary of 128k costs a few tensor calls."""
    pool = ctx.pool
    members = pool.members_of(index.total(pool))
    is_cat = pool.kinds(members) == _CATEGORY
    cats, rest = members[is_cat], members[~is_cat]
    other = int(pool.intern_segments(rest, torch.zeros_like(rest), 1)[0])
    return cats, pool.indices(cats), other


def _rows(pool, cats, values, other: int, n: int) -> torch.Tensor:
    """Per value v in range(n): the set of the categories of value v with the labels of
    `other`, or EMPTY where no category has that value."""
    keep = values < n
    cats, values = cats[keep], values[keep]
    present = torch.unique(values)
    extra = pool.members_of(other)
    members = torch.cat([cats, extra.repeat(present.numel())])
    segment = torch.cat([values, present.repeat_interleave(extra.numel())])
    return pool.intern_segments(members, segment, n)


def lookup(ctx, table: LabelTensor, index: LabelTensor, dim: int = 0) -> LabelTensor:
    """Rows of `table` along `dim` picked by a data-dependent `index`."""
    pool = ctx.pool
    shape = ctx.out_shape()
    dim = dim % table.ndim
    n_rows = table.shape[dim]
    cats, values, other = _split_categories(ctx, index)
    if table.is_param and table.is_free:
        ref = table.refs[0]
        if cats.numel():
            rows = _rows(pool, cats, values, other, n_rows)
        else:  # an index without categories may hold any value
            rows = torch.full((n_rows,), other, dtype=torch.int64)
        view = [1] * table.ndim
        view[dim] = n_rows
        meets = rows.reshape(view)
        if ctx.keys:
            # The looked-up vector's positions are the table's other axes: units of the table.
            ids = torch.zeros([1] * len(shape), dtype=torch.int64)
            lead = index.ndim
            for axis in range(table.ndim):
                if axis == dim:
                    continue
                out_axis = lead + (axis if axis < dim else axis - 1)
                v = [1] * len(shape)
                v[out_axis] = table.shape[axis]
                ids = pool.union_ids(ids, ctx.units(unit_group(ref, axis), table.shape[axis]).reshape(v))
            aligned = ids.reshape([s for s in ids.shape[lead:]]) if lead else ids
            aligned = aligned.unsqueeze(dim) if aligned.dim() < table.ndim else aligned
        else:
            ids = index.ids.reshape(list(index.ids.shape) + [1] * (len(shape) - index.ndim))
            aligned = None
        ctx.meet(table, meets, aligned)
        return LabelTensor(ids, shape)
    # A data table looked up by data: each output may come from any row.
    along = pool.reduce_ids(table.ids, [dim], keepdim=False)
    ids = pool.union_ids(index.ids.reshape(list(index.ids.shape) + [1] * (len(shape) - index.ndim)),
                         along.reshape([1] * index.ndim + list(along.shape)))
    return LabelTensor(ids, shape)


@register(*ops("embedding.default"), family="embedding")
def embedding(ctx, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return lookup(ctx, weight, indices, dim=0)


@register(*ops("one_hot.default"), family="embedding")
def one_hot(ctx, index, num_classes=-1):
    """Position c of the one-hot vector depends on category c of the index (and on what the
    index positions depend on)."""
    pool = ctx.pool
    shape = ctx.out_shape()
    cats, values, _ = _split_categories(ctx, index)
    n = shape[-1]
    if cats.numel():
        cls = _rows(pool, cats, values, EMPTY, n)
        nocat = _without_categories(ctx, index)
        ids = pool.union_ids(nocat.reshape(list(nocat.shape) + [1]), cls.reshape([1] * index.ndim + [n]))
    else:
        ids = index.ids.reshape(list(index.ids.shape) + [1])
    return LabelTensor(ids, shape)


def _without_categories(ctx, index: LabelTensor) -> torch.Tensor:
    pool = ctx.pool
    uniq, inv = unique(index.ids)
    members, seg = pool.members(uniq)
    keep = pool.kinds(members) != _CATEGORY
    return pool.intern_segments(members[keep], seg[keep], uniq.numel())[inv]
