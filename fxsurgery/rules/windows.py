"""Sliding windows along one spatial axis, shared by the convolution and pooling rules.

A convolution or a pooling operator reads, along each spatial axis independently, a window of
input positions for every output position. Along one axis it is fully described by the valid
(output position, input position, kernel tap) triples; the rules need the four ways of
grouping them:

- `out_inputs[o]`: the input positions output `o` reads (what an output depends on);
- `out_taps[o]`: the kernel taps that read a real (not padded) input for output `o` (what an
  output depends on through a data-dependent weight);
- `tap_inputs[k]`: the input positions tap `k` touches over all outputs (what a weight meets);
- `input_taps[i]`: the taps that touch input `i` (what an input meets of a data weight).

A window over several spatial axes is the product of one window per axis, and a union over a
product window is separable, so `window_union` is applied axis by axis. Label tensors are
compressed: an axis along which every set is equal has size 1 and stays size 1 through a
window union (unless some window is empty), which is the common case of a feature map whose
labels do not vary over space.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch

from ..labels import EMPTY

__all__ = ["ConvAxis", "conv_axis", "conv_output_size", "pool_output_size", "same_padding",
           "pool_windows", "adaptive_windows", "interpolation_windows", "window_union", "windows_union", "expand_arg"]

Windows = tuple  # tuple[tuple[int, ...], ...]: one tuple of source positions per target position


def expand_arg(value, n: int, name: str = "argument") -> tuple:
    """An int or a list of 1 or n ints as n ints (`stride=[]` stays empty)."""
    if isinstance(value, (int, torch.SymInt)):
        return (int(value),) * n
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * n
    if len(value) not in (0, n):
        raise ValueError(f"{name} {list(value)} does not fit {n} spatial dimensions")
    return value


def _left(padding) -> int:
    """Padding as an int or a (left, right) pair; only the left side shifts positions, the
    right side only changes the output size."""
    return int(padding[0]) if isinstance(padding, (tuple, list)) else int(padding)


# output sizes --------------------------------------------------------------------------

def same_padding(kernel: int, dilation: int = 1) -> tuple[int, int]:
    """The (left, right) padding of `padding="same"`: PyTorch puts the odd extra on the right."""
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def conv_output_size(n_in: int, kernel: int, stride: int = 1, padding=0, dilation: int = 1,
                     transposed: bool = False, output_padding: int = 0) -> int:
    if isinstance(padding, (tuple, list)):
        total = int(padding[0]) + int(padding[1])
    else:
        total = 2 * int(padding)
    if transposed:
        return (n_in - 1) * stride - total + dilation * (kernel - 1) + output_padding + 1
    return (n_in + total - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(n_in: int, kernel: int, stride: int | None = None, padding: int = 0,
                     dilation: int = 1, ceil_mode: bool = False) -> int:
    """PyTorch's pooling output size; with `ceil_mode`, a last window that would start in the
    right padding is dropped."""
    stride = stride or kernel
    span = n_in + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= n_in + padding:
        out -= 1
    return out


# windows -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvAxis:
    """The valid (output, input, tap) triples of one spatial axis, grouped four ways."""

    n_in: int
    n_out: int
    kernel: int
    out_inputs: Windows
    out_taps: Windows
    tap_inputs: Windows
    input_taps: Windows


def _group(pairs, n: int) -> Windows:
    buckets: list[list[int]] = [[] for _ in range(n)]
    for key, value in pairs:
        buckets[key].append(value)
    return tuple(tuple(sorted(set(b))) for b in buckets)


@lru_cache(maxsize=4096)
def conv_axis(n_in: int, n_out: int, kernel: int, stride: int = 1, padding=0, dilation: int = 1,
              transposed: bool = False) -> ConvAxis:
    """One spatial axis of a convolution (or pooling, kernel = window) of `n_in` positions into
    `n_out`. Forward: input `o*stride - padding + k*dilation` feeds output `o` through tap `k`;
    transposed: input `i` feeds output `i*stride - padding + k*dilation`. Positions outside
    the input (or output) are padding and carry nothing. `padding` is the left padding, or a
    (left, right) pair; the output size is given, so ceil_mode and output_padding need no
    special case."""
    left = _left(padding)
    triples = []
    for k in range(kernel):
        if transposed:
            for i in range(n_in):
                o = i * stride - left + k * dilation
                if 0 <= o < n_out:
                    triples.append((o, i, k))
        else:
            for o in range(n_out):
                i = o * stride - left + k * dilation
                if 0 <= i < n_in:
                    triples.append((o, i, k))
    return ConvAxis(n_in, n_out, kernel,
                    out_inputs=_group(((o, i) for o, i, k in triples), n_out),
                    out_taps=_group(((o, k) for o, i, k in triples), n_out),
                    tap_inputs=_group(((k, i) for o, i, k in triples), kernel),
                    input_taps=_group(((i, k) for o, i, k in triples), n_in))


def pool_windows(n_in: int, kernel: int, stride: int | None = None, padding: int = 0, dilation: int = 1,
                 ceil_mode: bool = False, n_out: int | None = None) -> Windows:
    """The input positions each output of a max or average pool reads (padding excluded:
    max pooling pads with -inf, average pooling with zeros that only change the divisor)."""
    stride = stride or kernel
    if n_out is None:
        n_out = pool_output_size(n_in, kernel, stride, padding, dilation, ceil_mode)
    return conv_axis(n_in, n_out, kernel, stride, padding, dilation).out_inputs


@lru_cache(maxsize=4096)
def adaptive_windows(n_in: int, n_out: int) -> Windows:
    """Adaptive pooling: output `i` reads [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))."""
    return tuple(tuple(range((i * n_in) // n_out, -(-((i + 1) * n_in) // n_out))) for i in range(n_out))


def interpolation_windows(run: Callable[[torch.Tensor, list, list], torch.Tensor], nd: int, axis: int,
                          n_in: int, n_out: int, scale, dtype=torch.float64) -> Windows:
    """The input positions with a non-zero interpolation weight for each output position along
    `axis` of a separable `nd`-dimensional interpolation (linear, bilinear, bicubic,
    antialiased). The operator itself is run on one-hot inputs along `axis` (2 -> 2 along the
    other axes, which it copies unchanged), so the weights are the ones PyTorch computes,
    including those that are exactly zero (an output that falls on an input position, clamping
    at the borders, a filter tap on the edge of its support). `run(x, output_size, scales)`
    calls the operator's `.default` overload.

    The kernels compute some weights that are zero in exact arithmetic as rounding residue:
    in float64 up to about 2e-15 of the largest weight of the output (7.9e-17 for
    antialiased 5 -> 3), in float32 up to about 2e-6 (1.8e-14 and 3.8e-8 for bicubic
    antialiased 5 -> 3). A genuine weight is far larger in float64 (at least about
    0.12 / n_in**2 of the largest, a bicubic tap next to the edge of its support), but not in
    float32, where the two ranges meet for a few hundred inputs. So the weights are computed in
    float64 (`dtype`), whatever the model's dtype (float32 kernels only add residue to the same
    windows), and a weight of at most `_WEIGHT_RTOL` (1e-10) times the largest weight of its
    output counts as zero: the windows are those of exact arithmetic. A float32 model's
    gradient map may see the residue (a floating-point zero, proofs/README.md)."""
    return _interpolation_windows(run, nd, axis, n_in, n_out, None if scale is None else float(scale), dtype)


_WEIGHT_RTOL = 1e-10  # see interpolation_windows


@lru_cache(maxsize=1024)
def _interpolation_windows(run, nd, axis, n_in, n_out, scale, dtype) -> Windows:
    # The other axes are 2 -> 2 without a scale, which every interpolation mode copies
    # unchanged (size 1 would do too, but the antialiased kernels mishandle a single column).
    shape = [n_in, 1] + [2] * nd
    shape[2 + axis] = n_in
    view = [n_in, 1] + [1] * nd
    view[2 + axis] = n_in
    eye = torch.eye(n_in, dtype=dtype).reshape(view).expand(shape).contiguous()
    size = [2] * nd
    size[axis] = n_out
    scales = [None] * nd
    scales[axis] = scale
    with torch.no_grad():
        out = run(eye, size, scales)
    out = out.movedim(2 + axis, -1).reshape(n_in, -1, n_out)[:, 0].abs()
    # nz[i, o]: input i has a weight in output o above the rounding residue of an exact zero
    peak = out.amax(0, keepdim=True)
    nz = out > _WEIGHT_RTOL * peak
    return tuple(tuple(torch.nonzero(nz[:, o]).reshape(-1).tolist()) for o in range(n_out))


# unions over windows ---------------------------------------------------------------------

def window_union(ctx, ids: torch.Tensor, dim: int, windows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Along axis `dim` of a compressed id tensor, target position `t` receives the union of
    the source positions `windows[t]` (the empty set for an empty window). The other axes are
    untouched. An axis of size 1 (the same set everywhere) stays size 1 when no window is empty."""
    d = dim % ids.dim()
    n_out = len(windows)
    view = [1] * ids.dim()
    view[d] = n_out
    if ids.shape[d] == 1:
        nonempty = [len(w) > 0 for w in windows]
        if all(nonempty):
            return ids
        mask = torch.tensor(nonempty, dtype=torch.bool).reshape(view)
        return torch.where(mask, ids, torch.full_like(ids, EMPTY))
    n_src = ids.shape[d]
    width = max((len(w) for w in windows), default=0)
    if width == 0:
        shape = list(ids.shape)
        shape[d] = n_out
        return torch.full(shape, EMPTY, dtype=torch.int64)
    if all(len(w) == 1 for w in windows) and [w[0] for w in windows] == list(range(n_src)):
        return ids  # the identity window
    # Pad every window to the same width with the position of an appended empty slice, gather,
    # and union over the window axis with the pool's halving tree.
    index = torch.full((n_out, width), n_src, dtype=torch.int64)
    for t, w in enumerate(windows):
        if w:
            index[t, : len(w)] = torch.as_tensor(list(w), dtype=torch.int64)
    empty = torch.full([s if a != d else 1 for a, s in enumerate(ids.shape)], EMPTY, dtype=torch.int64)
    padded = torch.cat([ids, empty], d)
    gathered = padded.index_select(d, index.reshape(-1))
    shape = list(ids.shape)
    gathered = gathered.reshape(shape[:d] + [n_out, width] + shape[d + 1:])
    return ctx.pool.reduce_ids(gathered, [d + 1], keepdim=False)


def windows_union(ctx, ids: torch.Tensor, first_axis: int, per_axis: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """`window_union` applied to consecutive axes from `first_axis` (a product window)."""
    for j, windows in enumerate(per_axis):
        ids = window_union(ctx, ids, first_axis + j, windows)
    return ids
