"""Normalisations. Each output element depends on every element of its normalisation group
(the trailing axes for layer and RMS norm, a channel across batch and space for batch norm in
training, a group of channels for group norm); in evaluation, batch norm is a per-channel
affine map and mixes nothing. In keys mode positions stay aligned: a normalised unit is
still that unit."""
from __future__ import annotations

import torch

from ..label_tensor import LabelTensor
from ._ops import ops
from .helpers import mixing, reduce_to
from .registry import register


def _onto(ctx, ids: torch.Tensor, view, axes) -> torch.Tensor:
    """Unions a value's ids onto a per-position parameter laid out as `view` (1 on the axes
    the parameter does not have), keeping only the parameter's `axes` of the value."""
    ids = reduce_to(ctx, ids, view)
    return ids.reshape([ids.shape[d] for d in axes])


def _affine(ctx, normalised: LabelTensor, weight, bias, view, axes) -> None:
    """A scale meets the normalised value where it multiplies it; a shift is only added and
    meets nothing. Both are aligned with the positions they scale or shift."""
    for p, meets in ((weight, True), (bias, False)):
        if isinstance(p, LabelTensor) and p.is_param:
            ids = _onto(ctx, normalised.ids, view, axes)
            empty = torch.zeros([1] * p.ndim, dtype=torch.int64)
            ctx.meet(p, ids if meets else empty, ids)


def _channel_view(x: LabelTensor):
    return [1, x.shape[1]] + [1] * (x.ndim - 2)


@register(*ops("layer_norm.default", "native_layer_norm.default", "rms_norm.default",
               "_fused_rms_norm.default"), family="norm")
def layer_norm(ctx, x, normalized_shape, weight=None, bias=None, *args, **kwargs):
    if ctx.node.target._schema.name in ("aten::rms_norm", "aten::_fused_rms_norm"):
        bias = None
    k = len(normalized_shape)
    dims = list(range(x.ndim - k, x.ndim))
    out = mixing(ctx, x, dims)
    _affine(ctx, out, weight, bias, [1] * (x.ndim - k) + list(normalized_shape), dims)
    if isinstance(ctx.out, (tuple, list)):  # native_layer_norm: (out, mean, rstd)
        stats = ctx.pool.reduce_ids(x.ids, dims, keepdim=True)
        return tuple([out] + [LabelTensor(stats, v.shape) for v in ctx.out[1:]])
    return out


@register(*ops("batch_norm.default", "native_batch_norm.default", "_native_batch_norm_legit_no_training.default",
               "_native_batch_norm_legit.default", "_native_batch_norm_legit_functional.default",
               "cudnn_batch_norm.default", "instance_norm.default"), family="norm")
def batch_norm(ctx, x, weight=None, bias=None, running_mean=None, running_var=None, *args, **kwargs):
    name = ctx.node.target._schema.name
    names = [a.name for a in ctx.node.target._schema.arguments]
    bound = dict(zip(names, (x, weight, bias, running_mean, running_var) + args))
    bound.update(kwargs)
    view = _channel_view(x)
    if name == "aten::instance_norm":
        training = True
        groups = [d for d in range(2, x.ndim)]  # per sample and channel, over space
        use_input_stats = bound.get("use_input_stats", True)
        training = bool(use_input_stats)
    else:
        training = bool(bound.get("training", False)) if name != "aten::_native_batch_norm_legit_no_training" else False
        groups = [0] + list(range(2, x.ndim))  # one channel across batch and space
    if training:
        out = mixing(ctx, x, groups)
    else:
        out = LabelTensor(x.ids, x.shape)  # a per-channel affine map
    _affine(ctx, out, weight, bias, view, [1])
    # Running statistics: in evaluation the mean is only subtracted (meets nothing) while the
    # variance divides the centred input (meets it); in training they do not touch the output.
    for stat, meets in ((running_mean, False), (running_var, not training)):
        if isinstance(stat, LabelTensor) and stat.is_param:
            ids = _onto(ctx, out.ids, view, [1])
            ctx.meet(stat, ids if meets else torch.zeros([1] * stat.ndim, dtype=torch.int64), ids)
    if isinstance(ctx.out, (tuple, list)):
        rest = [LabelTensor.empty(v.shape) if isinstance(v, torch.Tensor) else v for v in ctx.out[1:]]
        return tuple([out] + rest)
    return out


@register(*ops("group_norm.default", "native_group_norm.default"), family="norm")
def group_norm(ctx, x, *args, **kwargs):
    names = [a.name for a in ctx.node.target._schema.arguments][1:]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    groups = bound.get("num_groups", bound.get("group"))
    weight, bias = bound.get("weight"), bound.get("bias")
    n, c = x.shape[0], x.shape[1]
    # Split channels into (groups, c/groups) and mix over the channels of a group and space.
    ids = x.ids.expand(x.shape).reshape([n, groups, c // groups] + list(x.shape[2:])) if x.ids.shape[1] > 1 \
        else x.ids.reshape([x.ids.shape[0], 1, 1] + list(x.ids.shape[2:]))
    if ctx.keys:
        out = LabelTensor(x.ids, x.shape)
    else:
        mixed = ctx.pool.reduce_ids(ids, [2] + list(range(3, ids.dim())))
        mixed = mixed.expand([mixed.shape[0], mixed.shape[1], c // groups] + [1] * (x.ndim - 2)).reshape(
            [mixed.shape[0], c if mixed.shape[1] > 1 else c] + [1] * (x.ndim - 2)) if mixed.shape[1] > 1 \
            else mixed.reshape([mixed.shape[0], 1] + [1] * (x.ndim - 2))
        out = LabelTensor(mixed, x.shape)
    _affine(ctx, out, weight, bias, _channel_view(x), [1])
    if isinstance(ctx.out, (tuple, list)):
        return tuple([out] + [LabelTensor.empty(v.shape) for v in ctx.out[1:]])
    return out
