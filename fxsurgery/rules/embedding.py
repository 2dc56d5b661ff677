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
from ._ops import ops
from .contractions import unit_group
from .registry import register


def _split_categories(ctx, index: LabelTensor):
    """(category label ids by value, set id of the non-category labels) of an index tensor."""
    pool = ctx.pool
    total = index.total(pool)
    by_value: dict[int, list[int]] = {}
    other = []
    for lid in pool.sets[total]:
        label = pool.labels[lid]
        if label.kind == "category":
            by_value.setdefault(label.index, []).append(lid)
        else:
            other.append(lid)
    return by_value, pool.intern(other)


def lookup(ctx, table: LabelTensor, index: LabelTensor, dim: int = 0) -> LabelTensor:
    """Rows of `table` along `dim` picked by a data-dependent `index`."""
    pool = ctx.pool
    shape = ctx.out_shape()
    dim = dim % table.ndim
    n_rows = table.shape[dim]
    by_value, other = _split_categories(ctx, index)
    if table.is_param and table.is_free:
        ref = table.refs[0]
        if by_value:
            rows = [pool.intern(set(by_value.get(v, ())) | pool.sets[other]) if v in by_value else EMPTY
                    for v in range(n_rows)]
        else:  # an index without categories may hold any value
            rows = [other] * n_rows
        view = [1] * table.ndim
        view[dim] = n_rows
        meets = torch.tensor(rows, dtype=torch.int64).reshape(view)
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
    by_value, other = _split_categories(ctx, index)
    n = shape[-1]
    if by_value:
        cls = torch.tensor([pool.intern(by_value.get(v, ())) for v in range(n)], dtype=torch.int64)
        nocat = _without_categories(ctx, index)
        ids = pool.union_ids(nocat.reshape(list(nocat.shape) + [1]), cls.reshape([1] * index.ndim + [n]))
    else:
        ids = index.ids.reshape(list(index.ids.shape) + [1])
    return LabelTensor(ids, shape)


def _without_categories(ctx, index: LabelTensor) -> torch.Tensor:
    pool = ctx.pool
    uniq, inv = unique(index.ids)
    keep = [pool.intern(l for l in pool.sets[int(u)] if pool.labels[l].kind != "category") for u in uniq.tolist()]
    return torch.tensor(keep, dtype=torch.int64)[inv]
