"""Reductions (each output element is the union over what it reduces), the softmax family
(each element depends on the whole axis) and cumulative operators (on a prefix)."""
from __future__ import annotations

import torch

from ..label_tensor import LabelTensor, ParamRef
from ._ops import ops
from .helpers import mixing, no_dependence, reduce
from .registry import register


@register(*ops("sum.dim_IntList", "mean.dim", "amax.default", "amin.default", "nansum.default",
               "nanmean.default", "logsumexp.default", "prod.dim_int", "linalg_vector_norm.default",
               "norm.ScalarOpt_dim", "norm.Scalar", "std.dim", "var.dim", "std.correction", "var.correction",
               "sum.default", "mean.default", "prod.default", "max.default", "min.default"),
          family="reduction")
def reduction(ctx, x, *args, **kwargs):
    dim, keepdim = _dim_keepdim(ctx.node.target, args, kwargs)
    return reduce(ctx, x, dim, keepdim)


def _dim_keepdim(op, args, kwargs):
    """Reads `dim` and `keepdim` from the schema, whatever their position."""
    names = [a.name for a in op._schema.arguments][1:]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    dim = bound.get("dim")
    if dim is None:
        dim = None
    keepdim = bool(bound.get("keepdim", False))
    return dim, keepdim


@register(*ops("max.dim", "min.dim", "var_mean.correction", "std_mean.correction", "var_mean.dim",
               "std_mean.dim", "aminmax.default", "median.dim", "mode.default", "kthvalue.default",
               "nanmedian.dim"),
          family="reduction")
def reduction_pair(ctx, x, *args, **kwargs):
    """Two results: values (var_mean: both values) and, for max/min/median, integer indices
    whose derivative is zero."""
    dim, keepdim = _dim_keepdim(ctx.node.target, args, kwargs)
    if ctx.node.target._schema.name == "aten::kthvalue":
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
    values = reduce(ctx, x, dim, keepdim)
    second = ctx.out[1]
    if second.dtype.is_floating_point:
        return values, LabelTensor(values.ids, second.shape, values.refs)
    return values, LabelTensor.empty(second.shape)


@register(*ops("softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default",
               "_safe_softmax.default", "special_softmax.default"), family="mixing")
def softmax(ctx, x, dim, *args, **kwargs):
    return mixing(ctx, x, [dim])


@register(*ops("sort.default", "sort.stable", "topk.default"), family="mixing")
def sort(ctx, x, *args, **kwargs):
    """Values are a data-dependent permutation along `dim` (sound: the whole axis); indices
    have zero derivative."""
    names = [a.name for a in ctx.node.target._schema.arguments][1:]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    dim = bound.get("dim", -1)
    if x.ndim == 0:   # a scalar sorts to itself (and `dim` indexes no axis)
        return LabelTensor(x.ids, ctx.out_shape(0), x.refs), LabelTensor.empty(ctx.out_shape(1))
    mixed = mixing(ctx, x, [dim], aligned_in_keys=False)
    values_shape = ctx.out_shape(0)
    ids = mixed.ids if mixed.ids.shape[dim] == 1 or values_shape[dim] == x.shape[dim] else \
        ctx.pool.reduce_ids(mixed.ids, [dim])
    return LabelTensor(ids, values_shape, mixed.refs), LabelTensor.empty(ctx.out_shape(1))


@register(*ops("cumsum.default", "cumprod.default", "logcumsumexp.default", "cummax.default",
               "cummin.default"), family="mixing")
def cumulative(ctx, x, dim, *args, **kwargs):
    """Element i along `dim` depends on elements 0..i: a running union."""
    d = dim % x.ndim if x.ndim else 0
    ids = x.ids
    if x.ndim and ids.shape[d] > 1:
        parts = [ids.narrow(d, 0, 1)]
        for i in range(1, ids.shape[d]):
            parts.append(ctx.pool.union_ids(parts[-1], ids.narrow(d, i, 1)))
        ids = torch.cat(parts, d)
    refs = tuple(ParamRef(r.name, r.shape, everything=True) for r in x.refs)
    out = LabelTensor(ids, x.shape, refs)
    if isinstance(ctx.out, (tuple, list)):  # cummax / cummin also return indices
        return out, LabelTensor.empty(ctx.out_shape(1))
    return out


@register(*ops("argsort.default", "argsort.stable"), family="no_dependence")
def argsort(ctx, *args, **kwargs):
    return no_dependence(ctx)
