"""Convolutions: conv1d/2d/3d, their transposes, and the generic `convolution` overloads.

A convolution is a contraction over (input channel of the group, kernel tap) whose input
index along each spatial axis is a sliding window. Output element `out[n, o, s]` depends on
the input channels of `o`'s group over the window of `s` (and, for a data-dependent weight, on
the weight taps that read a real input for `s`). Along every spatial axis the valid
(output, input, tap) triples are listed once (windows.py) and the unions are taken axis by
axis, so a feature map whose labels do not vary over space costs nothing per position.

Meetings (the non-zero pattern of d/dz d<c, conv(W, x(z))>/dW):
- weight `W[o, c', k]` meets the input channel it multiplies, over the input positions tap
  `k` touches (for some output position and some sample);
- an input that is a parameter meets the weight taps that touch each of its positions;
- the bias is only added: it meets nothing, and is aligned with its output channel.

In keys mode the output channels become units of the weight, `unit_group(ref, 0)` (the rows
of the weight; `unit_group(ref, 1)` for a transposed convolution, whose weight is
(C_in, C_out / groups, k...), as for any contraction along the columns of a parameter).
"""
from __future__ import annotations

import torch

from ..label_tensor import LabelTensor, ParamRef, compress
from ._ops import ops
from .contractions import param_axis, unit_group
from .helpers import bind_args
from .registry import register
from .windows import conv_axis, expand_arg, same_padding, window_union

__all__ = ["convolution"]



def _reduce(ctx, ids: torch.Tensor, dims) -> torch.Tensor:
    dims = [d for d in dims if ids.shape[d] > 1]
    return ctx.pool.reduce_ids(ids, dims, keepdim=True) if dims else ids


def _blocks(ctx, ids: torch.Tensor, axis: int, groups: int, n_out: int) -> torch.Tensor:
    """Along `axis` (size n_in or 1): the union over each of `groups` contiguous blocks,
    repeated over the n_out / groups positions of the matching output block."""
    n_in = ids.shape[axis]
    if n_in == 1:
        return ids
    if groups == 1:
        return _reduce(ctx, ids, [axis])
    shape = list(ids.shape)
    ids = ids.reshape(shape[:axis] + [groups, n_in // groups] + shape[axis + 1:])
    ids = ctx.pool.reduce_ids(ids, [axis + 1], keepdim=True)
    grown = shape[:axis] + [groups, n_out // groups] + shape[axis + 1:]
    return ids.expand(grown).reshape(shape[:axis] + [n_out] + shape[axis + 1:])


def _full_channels(ids: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Materialises the two leading (channel) axes of a weight's ids."""
    return ids.expand([a, b] + list(ids.shape[2:]))


def _everything(lt) -> tuple:
    if not isinstance(lt, LabelTensor):
        return ()
    return tuple(ParamRef(r.name, r.shape, everything=True) for r in lt.refs)


def convolution(ctx, x: LabelTensor, w: LabelTensor, bias, stride, padding, dilation,
                transposed: bool, groups: int) -> LabelTensor:
    """The rule shared by every convolution overload. `padding` is a list of ints or the
    strings "same" / "valid"; the output size is read from the node, so ceil-style sizes and
    `output_padding` need no special case."""
    nd = w.ndim - 2
    out_shape = tuple(ctx.out_shape())
    batched = x.ndim == nd + 2
    x0 = x
    if not batched:  # an unbatched (C, *spatial) input: give it a batch axis of 1
        x = LabelTensor(x.ids.reshape((1,) + tuple(x.ids.shape)), (1,) + tuple(x.shape), x.refs)
        out_shape = (1,) + out_shape
    groups = int(groups)
    c_in, c_out = x.shape[1], out_shape[1]
    kernel = tuple(w.shape[2:])
    stride = expand_arg(stride, nd, "stride")
    dilation = expand_arg(dilation, nd, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0,) * nd
        elif padding == "same":
            pad = tuple(same_padding(k, d)[0] for k, d in zip(kernel, dilation))
        else:
            raise ValueError(f"unknown convolution padding {padding!r} (expected 'same' or 'valid')")
    else:
        pad = expand_arg(padding, nd, "padding")
    axes = [conv_axis(x.shape[2 + d], out_shape[2 + d], kernel[d], stride[d], pad[d], dilation[d], bool(transposed))
            for d in range(nd)]
    a_size, b_size = w.shape[0], w.shape[1]  # (C_out, C_in/g) or, transposed, (C_in, C_out/g)
    pool = ctx.pool

    # What the output depends on: the input over its window and its group's channels ...
    ids = _blocks(ctx, x.ids, 1, groups, c_out)
    for d, ax in enumerate(axes):
        ids = window_union(ctx, ids, 2 + d, ax.out_inputs)
    # ... and a data-dependent weight over the taps that read a real input.
    if not w.is_free:
        wo = w.ids
        if not transposed:
            wo = _reduce(ctx, wo, [1]).squeeze(1)                      # (C_out?, k...)
        elif wo.shape[0] > 1 or wo.shape[1] > 1:
            wo = _full_channels(wo, a_size, b_size).reshape([groups, a_size // groups] + [b_size] + list(wo.shape[2:]))
            wo = pool.reduce_ids(wo, [1], keepdim=False).reshape([c_out] + list(wo.shape[3:]))
        else:
            wo = wo.squeeze(1)
        for d, ax in enumerate(axes):
            wo = window_union(ctx, wo, 1 + d, ax.out_taps)
        ids = pool.union_ids(ids, wo.unsqueeze(0))

    operands = [x, w]
    params = [op for op in operands if op.is_param]
    data = [op for op in operands if not op.is_param]
    view = [1, c_out] + [1] * nd
    bias_lt = bias if isinstance(bias, LabelTensor) else None
    if params and all(op.is_free for op in data):
        if bias_lt is None or bias_lt.is_free:  # computed from parameters alone
            refs = tuple(r for op in params for r in _everything(op)) + _everything(bias_lt)
            return _finish(LabelTensor(compress(ids), out_shape, refs), batched)
        # A labelled bias added to a parameter-only convolution: nothing is multiplied by data.
        ids = pool.union_ids(ids, bias_lt.ids.reshape([1, bias_lt.ids.numel()] + [1] * nd))
        for op in params:
            ctx.meet(op, torch.zeros([1] * op.ndim, dtype=torch.int64), torch.zeros([1] * op.ndim, dtype=torch.int64))
        return _finish(LabelTensor(compress(ids), out_shape), batched)

    if ctx.keys and w.is_param and not x.is_param:  # the output channels become units
        ref = w.refs[0]
        axis = 1 if transposed else 0
        paxis = param_axis(ref, w.shape, axis)
        group = unit_group(ref, paxis) if paxis is not None else f"{ref.name}@{ctx.node.name}:{axis}"
        ids = ctx.units(group, c_out).reshape(view)
    if bias_lt is not None and not bias_lt.is_free:
        ids = pool.union_ids(ids, bias_lt.ids.reshape([1, bias_lt.ids.numel()] + [1] * nd))
    ids = compress(ids)
    channel = _reduce(ctx, ids, [0] + list(range(2, 2 + nd))).reshape(-1)  # (C_out?,)

    if w.is_param:
        # W meets the input channel it multiplies over the positions its tap touches.
        m = _reduce(ctx, x.ids, [0])
        for d, ax in enumerate(axes):
            m = window_union(ctx, m, 2 + d, ax.tap_inputs)
        m = m[0]                                                         # (C_in?, k...)
        if not transposed:
            if m.shape[0] > 1:
                g_out = a_size // groups
                in_ch = (torch.arange(a_size)[:, None] // g_out) * b_size + torch.arange(b_size)[None, :]
                m = m[in_ch]                                             # (C_out, C_in/g, k...)
            else:
                m = m.unsqueeze(0)
        else:
            m = m.unsqueeze(1)                                           # (C_in?, 1, k...)
        if not transposed:
            aligned = channel.reshape([channel.numel(), 1] + [1] * nd)
        elif channel.numel() > 1:
            g_in = a_size // groups
            out_ch = (torch.arange(a_size)[:, None] // g_in) * b_size + torch.arange(b_size)[None, :]
            aligned = channel[out_ch].reshape([a_size, b_size] + [1] * nd)
        else:
            aligned = channel.reshape([1, 1] + [1] * nd)
        ctx.meet(w, compress(m), aligned)
    if x.is_param and not w.is_free:
        # An input that is a parameter meets the weight taps that touch each of its positions.
        m = w.ids
        for d, ax in enumerate(axes):
            m = window_union(ctx, m, 2 + d, ax.input_taps)                # (a?, b?, in...)
        if not transposed:
            if m.shape[0] > 1 or m.shape[1] > 1:
                m = _full_channels(m, a_size, b_size).reshape([groups, a_size // groups, b_size] + list(m.shape[2:]))
                m = pool.reduce_ids(m, [1], keepdim=False).reshape([c_in] + list(m.shape[3:]))
            else:
                m = m.squeeze(1)
        else:
            m = _reduce(ctx, m, [1]).squeeze(1)
        aligned = _blocks(ctx, channel.reshape(1, -1), 1, groups, c_in)
        m, aligned = m.unsqueeze(0), aligned.reshape([1, aligned.numel()] + [1] * nd)
        if not batched:
            m, aligned = m.squeeze(0), aligned.squeeze(0)
        ctx.meet(x0, compress(m), aligned)
    if bias_lt is not None and bias_lt.is_param:
        ctx.meet(bias_lt, torch.zeros([1], dtype=torch.int64), channel)
    return _finish(LabelTensor(ids, out_shape), batched)


def _finish(lt: LabelTensor, batched: bool) -> LabelTensor:
    if batched:
        return lt
    return LabelTensor(lt.ids.squeeze(0) if lt.ids.dim() else lt.ids, lt.shape[1:], lt.refs)


@register(*ops("conv1d.default", "conv2d.default", "conv3d.default", "conv1d.padding", "conv2d.padding",
               "conv3d.padding"), family="convolution")
def conv(ctx, *args, **kwargs):
    b = bind_args(ctx, args, kwargs)
    return convolution(ctx, b["input"], b["weight"], b.get("bias"), b["stride"], b["padding"], b["dilation"],
                       False, b["groups"])


@register(*ops("conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input"),
          family="convolution")
def conv_transpose(ctx, *args, **kwargs):
    b = bind_args(ctx, args, kwargs)
    return convolution(ctx, b["input"], b["weight"], b.get("bias"), b["stride"], b["padding"], b["dilation"],
                       True, b["groups"])


@register(*ops("convolution.default", "_convolution.default", "_convolution.deprecated",
               "convolution_overrideable.default"), family="convolution")
def generic_convolution(ctx, *args, **kwargs):
    b = bind_args(ctx, args, kwargs)
    return convolution(ctx, b["input"], b["weight"], b.get("bias"), b["stride"], b["padding"], b["dilation"],
                       bool(b["transposed"]), b["groups"])

