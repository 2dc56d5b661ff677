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


def _affine(ctx, normalised: LabelTensor, weight, bias, view, axes) -> LabelTensor:
    """The output of `normalised * weight + bias`. A parameter scale meets the normalised
    value where it multiplies it; a shift is only added and meets nothing; both are aligned
    with the positions they scale or shift. A scale or shift that is data adds its labels."""
    out = normalised
    for p in (weight, bias):
        if isinstance(p, LabelTensor) and not p.is_param and not p.is_free:
            out = LabelTensor(ctx.pool.union_ids(out.ids, _lay(p.ids, len(view), axes)), out.shape)
    for p, meets in ((weight, True), (bias, False)):
        if isinstance(p, LabelTensor) and p.is_param:
            met = _onto(ctx, normalised.ids, view, axes) if meets else torch.zeros([1] * p.ndim, dtype=torch.int64)
            ctx.meet(p, met, _onto(ctx, out.ids, view, axes))
    return out


def _lay(ids: torch.Tensor, ndim: int, axes) -> torch.Tensor:
    """A per-position parameter's ids placed on `axes` of an `ndim`-dimensional value."""
    shape = [1] * ndim
    for a, size in zip(axes, ids.shape):
        shape[a] = size
    return ids.reshape(shape)


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
    out = _affine(ctx, out, weight, bias, [1] * (x.ndim - k) + list(normalized_shape), dims)
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
    pool = ctx.pool
    if training:
        out = mixing(ctx, x, groups)
    else:
        out = LabelTensor(x.ids, x.shape)  # a per-channel affine map
        # y = (x - rm) / sqrt(rv + eps): running statistics that are data (computed in the
        # graph, not buffers) add their labels, channel by channel.
        for stat in (running_mean, running_var):
            if isinstance(stat, LabelTensor) and not stat.is_param and not stat.is_free:
                out = LabelTensor(pool.union_ids(out.ids, _lay(stat.ids.reshape(-1), x.ndim, [1])), x.shape)
    out = _affine(ctx, out, weight, bias, view, [1])
    w_ids = weight.ids.reshape(-1) if isinstance(weight, LabelTensor) and not weight.is_param \
        else torch.zeros([1], dtype=torch.int64)  # a data scale's labels, per channel
    channel = _onto(ctx, x.ids, view, [1])  # what each channel of x depends on
    # Running statistics. In evaluation y = (x - rm) / sqrt(rv + eps) * w + b: the mean is
    # subtracted, so it meets only a data scale; the variance divides the centred input, so
    # it meets x's channel and the scale. In training they do not touch the output.
    for stat, met in ((running_mean, w_ids), (running_var, pool.union_ids(channel, w_ids))):
        if isinstance(stat, LabelTensor) and stat.is_param:
            ctx.meet(stat, met if not training else torch.zeros([1], dtype=torch.int64),
                     _onto(ctx, out.ids, view, [1]))
    if not isinstance(ctx.out, (tuple, list)):
        return out
    # Saved batch statistics (and, functional variant, the updated running ones) depend on
    # x's channel across batch and space; in evaluation the saved ones are empty.
    stats = channel if training else torch.zeros([1], dtype=torch.int64)
    rest = []
    for k, v in enumerate(ctx.out[1:], start=1):
        if not isinstance(v, torch.Tensor):
            rest.append(v)
        elif v.numel() == 0 or not training:
            rest.append(LabelTensor.empty(v.shape))
        elif k >= 3:  # new running mean / var: (1 - m) * old + m * batch statistic
            old = (running_mean, running_var)[k - 3]
            ids = stats if not isinstance(old, LabelTensor) or old.is_param else pool.union_ids(stats, old.ids)
            rest.append(LabelTensor(ids, v.shape))
        else:
            rest.append(LabelTensor(stats, v.shape))
    return tuple([out] + rest)


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
    out = _affine(ctx, out, weight, bias, _channel_view(x), [1])
    if isinstance(ctx.out, (tuple, list)):  # native_group_norm: (out, mean, rstd), each [N, G]
        per_group = ctx.pool.reduce_ids(ids, [2] + list(range(3, ids.dim())), keepdim=False)
        per_group = per_group.reshape(per_group.shape[:2])
        return tuple([out] + [LabelTensor(per_group, v.shape) for v in ctx.out[1:]])
    return out
