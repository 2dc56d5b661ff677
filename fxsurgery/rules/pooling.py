"""Pooling and interpolation: each output element depends on a window of input positions along
each of the trailing spatial axes (and nothing else is mixed: batch and channel positions stay
where they are). Pooling has no parameter, so it behaves the same in deps and keys mode.

- max pooling (with dilation, padding, ceil_mode): the window the operator reads; padding is
  -inf and never selected. The indices of `*_with_indices` and adaptive max pooling carry no
  dependence (their derivative is zero).
- average pooling: the window without its padding (zero padding only changes the divisor,
  as do `count_include_pad` and `divisor_override`).
- adaptive pooling: [floor(i*In/Out), ceil((i+1)*In/Out)).
- linear / bilinear / trilinear / bicubic interpolation (antialiased too): the input positions
  with a non-zero weight, read off the operator itself (windows.interpolation_windows), so an
  output that falls exactly on an input position depends on that position alone. A weight
  that is zero in exact arithmetic but that the kernel rounds to a tiny residue (1e-17 in
  float64, up to 1e-6 in float32) counts as zero.

LP pooling is not a distinct ATen operator: torch.export lowers it to pow, avg_pool, sign, abs,
relu and mul, which have their own rules. Nearest-neighbour upsampling is data movement
(movement.py).
"""
from __future__ import annotations

import torch

from ..label_tensor import LabelTensor, ParamRef, compress
from ._ops import ops
from .helpers import bind_args
from .registry import register
from .windows import adaptive_windows, conv_axis, expand_arg, interpolation_windows, window_union

aten = torch.ops.aten

__all__ = ["pool_windowed"]



def _by_nd(*patterns: str) -> dict:
    """{overload: number of spatial dimensions} for names with a `{}` in place of 1, 2, 3."""
    return {op: nd for nd in (1, 2, 3) for p in patterns for op in ops(p.format(nd))}


MAX_POOL = _by_nd("max_pool{}d.default", "max_pool{}d_with_indices.default")
AVG_POOL = _by_nd("avg_pool{}d.default")
ADAPTIVE = _by_nd("adaptive_avg_pool{}d.default", "_adaptive_avg_pool{}d.default", "adaptive_max_pool{}d.default")
INTERPOLATE = {op: nd for names, nd in (
    (("upsample_linear1d.default", "upsample_linear1d.vec"), 1),
    (("upsample_bilinear2d.default", "upsample_bilinear2d.vec", "upsample_bicubic2d.default",
      "upsample_bicubic2d.vec", "_upsample_bilinear2d_aa.default", "_upsample_bilinear2d_aa.vec",
      "_upsample_bicubic2d_aa.default", "_upsample_bicubic2d_aa.vec"), 2),
    (("upsample_trilinear3d.default", "upsample_trilinear3d.vec"), 3)) for op in ops(*names)}
SPATIAL = {**MAX_POOL, **AVG_POOL, **ADAPTIVE, **INTERPOLATE}


def _nd(ctx) -> int:
    return SPATIAL[ctx.node.target]


def pool_windowed(ctx, x: LabelTensor, per_axis, shape) -> LabelTensor:
    """Unions the input over one window per trailing spatial axis."""
    nd = len(per_axis)
    ids = x.ids
    for j, windows in enumerate(per_axis):
        ids = window_union(ctx, ids, x.ndim - nd + j, windows)
    refs = tuple(ParamRef(r.name, r.shape, everything=True) for r in x.refs)
    return LabelTensor(compress(ids), shape, refs)


def _out_spatial(ctx, nd: int) -> tuple:
    out = ctx.out[0] if isinstance(ctx.out, (tuple, list)) else ctx.out
    return tuple(out.shape[-nd:]), tuple(out.shape)


def _sliding(ctx, x, kernel_size, stride, padding, dilation=1):
    nd = _nd(ctx)
    kernel = expand_arg(kernel_size, nd, "kernel_size")
    stride = expand_arg(stride, nd, "stride") or kernel
    padding = expand_arg(padding, nd, "padding")
    dilation = expand_arg(dilation, nd, "dilation")
    out_sp, shape = _out_spatial(ctx, nd)
    in_sp = x.shape[-nd:]
    per_axis = [conv_axis(in_sp[d], out_sp[d], kernel[d], stride[d], padding[d], dilation[d]).out_inputs
                for d in range(nd)]
    return pool_windowed(ctx, x, per_axis, shape)


def _with_indices(ctx, values: LabelTensor):
    if isinstance(ctx.out, (tuple, list)):
        return values, LabelTensor.empty(ctx.out_shape(1))
    return values


@register(*MAX_POOL, family="pooling")
def max_pool(ctx, *args, **kwargs):
    b = bind_args(ctx, args, kwargs)
    values = _sliding(ctx, b["self"], b["kernel_size"], b["stride"], b["padding"], b["dilation"])
    return _with_indices(ctx, values)


@register(*AVG_POOL, family="pooling")
def avg_pool(ctx, *args, **kwargs):
    b = bind_args(ctx, args, kwargs)
    return _sliding(ctx, b["self"], b["kernel_size"], b["stride"], b["padding"])


@register(*ADAPTIVE, family="pooling")
def adaptive_pool(ctx, x, output_size, *args, **kwargs):
    nd = _nd(ctx)
    out_sp, shape = _out_spatial(ctx, nd)
    in_sp = x.shape[-nd:]
    values = pool_windowed(ctx, x, [adaptive_windows(in_sp[d], out_sp[d]) for d in range(nd)], shape)
    return _with_indices(ctx, values)


# interpolation ---------------------------------------------------------------------------

_RUNNERS: dict = {}


def _interp_runner(name: str, align_corners: bool):
    """`run(x, output_size, scales)` for an interpolation operator's `.default` overload (one
    function per operator and alignment, so that the windows it yields are cached)."""
    key = (name, bool(align_corners))
    run = _RUNNERS.get(key)
    if run is None:
        op = getattr(aten, name).default

        def run(x, size, scales, op=op, ac=bool(align_corners)):
            return op(x, size, ac, *scales)
        _RUNNERS[key] = run
    return run


@register(*INTERPOLATE, family="pooling")
def interpolate(ctx, *args, **kwargs):
    target = ctx.node.target
    b = bind_args(ctx, args, kwargs)
    x = b.get("self", b.get("input"))
    nd = _nd(ctx)
    out_sp, shape = _out_spatial(ctx, nd)
    in_sp = x.shape[-nd:]
    if target._overloadname == "vec":
        # Either an output size (the source index then uses In/Out) or scale factors (1/factor).
        factors = b.get("scale_factors")
        scales = list(factors) if factors is not None else [None] * nd
        scales = scales * nd if len(scales) == 1 else scales
    else:
        names = [a.name for a in target._schema.arguments if a.name.startswith("scales")]
        scales = [b.get(n) for n in names]
    # The windows of exact arithmetic, read off the float64 kernel whatever the model's dtype.
    run = _interp_runner(target._schema.name.split("::")[1], b["align_corners"])
    per_axis = [interpolation_windows(run, nd, d, in_sp[d], out_sp[d], scales[d]) for d in range(nd)]
    return pool_windowed(ctx, x, per_axis, shape)

