"""Convolutions, pooling and interpolation, written as explicit sums, maxima and weighted sums
over index windows (a cross-correlation with stride, padding, dilation and groups; its
transpose as a scatter; PyTorch's source-index and filter formulas for interpolation, in exact
rational arithmetic so that a weight that vanishes at a grid point is exactly zero).

A maximum's derivative at a generic point is the indicator of the maximal element; over random
points every element of a window is maximal somewhere, so the pattern is the window (ties are
a null set). Convolution weights meet the input positions their tap reads; a bias meets nothing.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import sympy as sp
import torch

from proof_harness import Case, D, Instance, check_case, main, proof_params, variants

R = sp.Rational


# convolution ---------------------------------------------------------------------------------

def _tuple(v, n):
    return tuple(v) * n if isinstance(v, (list, tuple)) and len(v) == 1 else (tuple(v) if isinstance(v, (list, tuple)) else (v,) * n)


def conv(X, W, B=None, stride=1, padding=0, dilation=1, groups=1):
    nd = X.ndim - 2
    s, d = _tuple(stride, nd), _tuple(dilation, nd)
    K = W.shape[2:]
    if padding == "same":
        left = [d[i] * (K[i] - 1) // 2 for i in range(nd)]
    elif padding == "valid":
        left = [0] * nd
    else:
        left = list(_tuple(padding, nd))
    right = [(d[i] * (K[i] - 1) - left[i]) if padding == "same" else left[i] for i in range(nd)]
    n, cin = X.shape[:2]
    cout, cg = W.shape[:2]
    out_sp = [(X.shape[2 + i] + left[i] + right[i] - d[i] * (K[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
    Y = np.empty((n, cout) + tuple(out_sp), dtype=object)
    per_group = cout // groups
    for idx in np.ndindex(*Y.shape):
        b, o, pos = idx[0], idx[1], idx[2:]
        g = o // per_group
        terms = [] if B is None else [B[o]]
        for c in range(cg):
            for k in np.ndindex(*K):
                src = [pos[i] * s[i] - left[i] + k[i] * d[i] for i in range(nd)]
                if all(0 <= src[i] < X.shape[2 + i] for i in range(nd)):
                    terms.append(W[(o, c) + k] * X[(b, g * cg + c) + tuple(src)])
        Y[idx] = sp.Add(*terms)
    return Y


def conv_transpose(X, W, B=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    nd = X.ndim - 2
    s, p, op_, d = (_tuple(v, nd) for v in (stride, padding, output_padding, dilation))
    K = W.shape[2:]
    n, cin = X.shape[:2]
    cg_out = W.shape[1]
    cout = cg_out * groups
    in_per_group = cin // groups
    out_sp = [(X.shape[2 + i] - 1) * s[i] - 2 * p[i] + d[i] * (K[i] - 1) + op_[i] + 1 for i in range(nd)]
    acc = {idx: ([] if B is None else [B[idx[1]]]) for idx in np.ndindex(n, cout, *out_sp)}
    for b in range(n):
        for c in range(cin):
            g = c // in_per_group
            for pos in np.ndindex(*X.shape[2:]):
                for oc in range(cg_out):
                    for k in np.ndindex(*K):
                        dst = [pos[i] * s[i] - p[i] + k[i] * d[i] for i in range(nd)]
                        if all(0 <= dst[i] < out_sp[i] for i in range(nd)):
                            acc[(b, g * cg_out + oc) + tuple(dst)].append(X[(b, c) + pos] * W[(c, oc) + k])
    Y = np.empty((n, cout) + tuple(out_sp), dtype=object)
    for idx, terms in acc.items():
        Y[idx] = sp.Add(*terms)
    return Y


def _conv_case(op, x, w, b, call, math_, **kw):
    ops_ = [D("x", x), D("w", w)] + ([D("b", b)] if b else [])
    return variants(op, ops_, call, math_, **kw)


CONV = [
    Case("aten.convolution.default",
         _conv_case("aten.convolution.default", (1, 2, 5), (2, 2, 2), (2,),
                    lambda o, x, w, b: o(x, w, b, [2], [1], [1], False, [0], 1),
                    lambda X, W, B: conv(X, W, B, 2, 1, 1, 1), tag="stride 2 pad 1")
         + _conv_case("aten.convolution.default", (1, 2, 4), (2, 1, 2), None,
                      lambda o, x, w: o(x, w, None, [1], [0], [2], False, [0], 2),
                      lambda X, W: conv(X, W, None, 1, 0, 2, 2), tag="groups 2 dilation 2")
         + _conv_case("aten.convolution.default", (1, 2, 2), (2, 1, 2), (1,),
                      lambda o, x, w, b: o(x, w, b, [2], [0], [1], True, [1], 1),
                      lambda X, W, B: conv_transpose(X, W, B, 2, 0, 1, 1), tag="transposed")),
    Case("aten._convolution.default", _conv_case(
        "aten._convolution.default", (1, 2, 5), (2, 2, 2), (2,),
        lambda o, x, w, b: o(x, w, b, [1], [1], [1], False, [0], 1, False, False, False, False),
        lambda X, W, B: conv(X, W, B, 1, 1, 1, 1))),
    Case("aten._convolution.deprecated", _conv_case(
        "aten._convolution.deprecated", (1, 2, 5), (2, 2, 2), (2,),
        lambda o, x, w, b: o(x, w, b, [1], [1], [1], False, [0], 1, False, False, False),
        lambda X, W, B: conv(X, W, B, 1, 1, 1, 1))),
    # convolution_overrideable has no CPU kernel: it has convolution's schema and meaning, so the
    # instance runs aten.convolution and retargets that node to the overload under test
    Case("aten.convolution_overrideable.default", [
        replace(i, substitute=("aten.convolution.default",)) for i in _conv_case(
            "aten.convolution_overrideable.default", (1, 2, 5), (2, 2, 2), (2,),
            lambda o, x, w, b: torch.ops.aten.convolution.default(x, w, b, [1], [1], [1], False, [0], 1),
            lambda X, W, B: conv(X, W, B, 1, 1, 1, 1))]),
    Case("aten.conv1d.default", _conv_case(
        "aten.conv1d.default", (1, 2, 5), (2, 2, 2), (2,), lambda o, x, w, b: o(x, w, b, [1], [1], [2], 1),
        lambda X, W, B: conv(X, W, B, 1, 1, 2, 1))),
    Case("aten.conv2d.default", _conv_case(
        "aten.conv2d.default", (1, 1, 3, 3), (2, 1, 2, 2), (2,), lambda o, x, w, b: o(x, w, b, [1, 1], [0, 1]),
        lambda X, W, B: conv(X, W, B, 1, (0, 1), 1, 1))),
    Case("aten.conv3d.default", _conv_case(
        "aten.conv3d.default", (1, 1, 2, 2, 3), (1, 1, 2, 1, 2), (1,), lambda o, x, w, b: o(x, w, b),
        lambda X, W, B: conv(X, W, B))),
    Case("aten.conv1d.padding", _conv_case(
        "aten.conv1d.padding", (1, 2, 4), (2, 2, 3), (2,), lambda o, x, w, b: o(x, w, b, [1], "same"),
        lambda X, W, B: conv(X, W, B, 1, "same"))),
    Case("aten.conv2d.padding", _conv_case(
        "aten.conv2d.padding", (1, 1, 3, 3), (1, 1, 2, 2), (1,), lambda o, x, w, b: o(x, w, b, [1, 1], "same"),
        lambda X, W, B: conv(X, W, B, 1, "same"))),
    Case("aten.conv3d.padding", _conv_case(
        "aten.conv3d.padding", (1, 1, 2, 2, 2), (1, 1, 2, 1, 2), (1,), lambda o, x, w, b: o(x, w, b, [1, 1, 1], "valid"),
        lambda X, W, B: conv(X, W, B, 1, "valid"))),
    Case("aten.conv_transpose1d.default", _conv_case(
        "aten.conv_transpose1d.default", (1, 2, 3), (2, 1, 2), (1,), lambda o, x, w, b: o(x, w, b, [2], [0], [1]),
        lambda X, W, B: conv_transpose(X, W, B, 2, 0, 1))),
    Case("aten.conv_transpose2d.input", _conv_case(
        "aten.conv_transpose2d.input", (1, 1, 2, 2), (1, 2, 2, 2), (2,), lambda o, x, w, b: o(x, w, b, [2, 2], [1, 1]),
        lambda X, W, B: conv_transpose(X, W, B, 2, 1))),
    Case("aten.conv_transpose3d.input", _conv_case(
        "aten.conv_transpose3d.input", (1, 1, 2, 1, 2), (1, 1, 2, 1, 2), (1,), lambda o, x, w, b: o(x, w, b),
        lambda X, W, B: conv_transpose(X, W, B))),
]


# pooling -------------------------------------------------------------------------------------

def _pool_out(n, k, s, p, d, ceil_mode):
    num = n + 2 * p - d * (k - 1) - 1
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def max_pool(X, k, s=None, p=0, d=1, ceil_mode=False):
    nd = len(k)
    s = s or k
    p, d = _tuple(p, nd), _tuple(d, nd)
    ins = X.shape[-nd:]
    outs = [_pool_out(ins[i], k[i], s[i], p[i], d[i], ceil_mode) for i in range(nd)]
    Y = np.empty(X.shape[:-nd] + tuple(outs), dtype=object)
    for idx in np.ndindex(*Y.shape):
        lead, pos = idx[:-nd], idx[-nd:]
        vals = []
        for t in np.ndindex(*k):
            src = [pos[i] * s[i] - p[i] + t[i] * d[i] for i in range(nd)]
            if all(0 <= src[i] < ins[i] for i in range(nd)):
                vals.append(X[lead + tuple(src)])
        Y[idx] = sp.Max(*vals)
    return Y


def avg_pool(X, k, s=None, p=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    nd = len(k)
    s = s or k
    p = _tuple(p, nd)
    ins = X.shape[-nd:]
    outs = [_pool_out(ins[i], k[i], s[i], p[i], 1, ceil_mode) for i in range(nd)]
    Y = np.empty(X.shape[:-nd] + tuple(outs), dtype=object)
    for idx in np.ndindex(*Y.shape):
        lead, pos = idx[:-nd], idx[-nd:]
        pool_size, valid, ranges = 1, 1, []
        for i in range(nd):
            start = pos[i] * s[i] - p[i]
            end = min(start + k[i], ins[i] + p[i])
            pool_size *= end - start
            start, end = max(start, 0), min(end, ins[i])
            valid *= end - start
            ranges.append(range(start, end))
        total = sp.Add(*[X[lead + t] for t in itertools.product(*ranges)])
        div = divisor_override or (pool_size if count_include_pad else valid)
        Y[idx] = total / div
    return Y


def adaptive(X, out_sizes, f):
    nd = len(out_sizes)
    ins = X.shape[-nd:]
    Y = np.empty(X.shape[:-nd] + tuple(out_sizes), dtype=object)
    for idx in np.ndindex(*Y.shape):
        lead, pos = idx[:-nd], idx[-nd:]
        ranges = [range((pos[i] * ins[i]) // out_sizes[i], -(-((pos[i] + 1) * ins[i]) // out_sizes[i]))
                  for i in range(nd)]
        Y[idx] = f([X[lead + t] for t in itertools.product(*ranges)])
    return Y


def amean(v):
    return sp.Add(*v) / len(v)


def amax(v):
    return sp.Max(*v)


# interpolation: per output position along an axis, {input position: weight} ------------------

def _scale(n_in, n_out, align_corners, factor=None):
    if align_corners:
        return R(n_in - 1, n_out - 1) if n_out > 1 else R(0)
    return 1 / sp.nsimplify(factor) if factor else R(n_in, n_out)


def _src(scale, dst, align_corners, cubic):
    if align_corners:
        return scale * dst
    src = scale * (dst + R(1, 2)) - R(1, 2)
    return src if cubic else max(src, R(0))


def linear_weights(n_in, n_out, align_corners, factor=None):
    sc = _scale(n_in, n_out, align_corners, factor)
    rows = []
    for j in range(n_out):
        src = _src(sc, j, align_corners, False)
        i0 = int(sp.floor(src))
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        l1 = min(max(src - i0, R(0)), R(1))
        w = {}
        w[i0] = w.get(i0, 0) + (1 - l1)
        w[i1] = w.get(i1, 0) + l1
        rows.append(w)
    return rows


A_CUBIC = R(-3, 4)


def _c1(x, a=A_CUBIC):
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _c2(x, a=A_CUBIC):
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def cubic_weights(n_in, n_out, align_corners, factor=None):
    sc = _scale(n_in, n_out, align_corners, factor)
    rows = []
    for j in range(n_out):
        real = _src(sc, j, align_corners, True)
        i0 = int(sp.floor(real))
        t = real - i0
        coeffs = [_c2(t + 1), _c1(t), _c1(1 - t), _c2(2 - t)]
        w = {}
        for k, c in enumerate(coeffs):
            i = min(max(i0 - 1 + k, 0), n_in - 1)
            w[i] = w.get(i, 0) + c
        rows.append(w)
    return rows


def _aa_filter_linear(x):
    x = abs(x)
    return 1 - x if x < 1 else R(0)


def _aa_filter_cubic(x, a=R(-1, 2)):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return R(0)


def aa_weights(n_in, n_out, interp_size, filt):
    """PyTorch's antialiased weights (align_corners=False): a filter stretched by the scale."""
    scale = R(n_in, n_out)
    support = R(interp_size, 2) * scale if scale >= 1 else R(interp_size, 2)
    invscale = 1 / scale if scale >= 1 else R(1)
    rows = []
    for j in range(n_out):
        center = scale * (j + R(1, 2))
        xmin = max(int(center - support + R(1, 2)), 0)
        xsize = min(int(center + support + R(1, 2)), n_in) - xmin
        ws = [filt((k + xmin - center + R(1, 2)) * invscale) for k in range(xsize)]
        total = sum(ws)
        rows.append({xmin + k: (w / total if total != 0 else w) for k, w in enumerate(ws)})
    return rows


def interpolate(X, per_axis):
    """Separable interpolation of the trailing axes with one weight table per axis."""
    nd = len(per_axis)
    Y = np.empty(X.shape[:-nd] + tuple(len(t) for t in per_axis), dtype=object)
    for idx in np.ndindex(*Y.shape):
        lead, pos = idx[:-nd], idx[-nd:]
        terms = []
        for srcs in itertools.product(*[list(per_axis[i][pos[i]].items()) for i in range(nd)]):
            w = sp.Mul(*[wt for _, wt in srcs])
            if w != 0:
                terms.append(w * X[lead + tuple(i for i, _ in srcs)])
        Y[idx] = sp.Add(*terms)
    return Y


def interp_math(kind, sizes, align_corners=False, factors=None):
    def math_(X):
        nd = len(sizes)
        ins = X.shape[-nd:]
        tables = []
        for i in range(nd):
            f = factors[i] if factors else None
            if kind == "linear":
                tables.append(linear_weights(ins[i], sizes[i], align_corners, f))
            elif kind == "cubic":
                tables.append(cubic_weights(ins[i], sizes[i], align_corners, f))
            elif kind == "linear_aa":
                tables.append(aa_weights(ins[i], sizes[i], 2, _aa_filter_linear))
            else:
                tables.append(aa_weights(ins[i], sizes[i], 4, _aa_filter_cubic))
        return interpolate(X, tables)
    return math_


def one(op, shape, call, math_, label="", points=None):
    kw = {"points": points} if points else {}
    return Instance(op, [D("x", shape)], call, math_, label=label, **kw)


MAXPTS = 160  # a window of up to 8: each element is the maximum at a point with probability >= 1/8

POOL = [
    Case("aten.max_pool1d.default", [
        one("aten.max_pool1d.default", (1, 2, 5), lambda o, x: o(x, [2], [2]), lambda X: max_pool(X, [2], [2]),
            "k2 s2", MAXPTS),
        one("aten.max_pool1d.default", (1, 1, 6), lambda o, x: o(x, [3], [2], [1], [1], True),
            lambda X: max_pool(X, [3], [2], 1, 1, True), "k3 s2 pad 1 ceil", MAXPTS)]),
    Case("aten.max_pool1d_with_indices.default", [
        one("aten.max_pool1d_with_indices.default", (1, 2, 5), lambda o, x: o(x, [2], [1], [0], [2]),
            lambda X: (max_pool(X, [2], [1], 0, 2), None), "dilation 2", MAXPTS)]),
    Case("aten.max_pool2d.default", [
        one("aten.max_pool2d.default", (1, 1, 3, 4), lambda o, x: o(x, [2, 2], [1, 2], [1, 0]),
            lambda X: max_pool(X, [2, 2], [1, 2], (1, 0)), "pad (1,0)", MAXPTS)]),
    Case("aten.max_pool2d_with_indices.default", [
        one("aten.max_pool2d_with_indices.default", (1, 1, 3, 3), lambda o, x: o(x, [2, 2], [1, 1]),
            lambda X: (max_pool(X, [2, 2], [1, 1]), None), "", MAXPTS)]),
    Case("aten.max_pool3d.default", [
        one("aten.max_pool3d.default", (1, 1, 2, 2, 3), lambda o, x: o(x, [2, 2, 2], [1, 1, 1]),
            lambda X: max_pool(X, [2, 2, 2], [1, 1, 1]), "", MAXPTS)]),
    Case("aten.max_pool3d_with_indices.default", [
        one("aten.max_pool3d_with_indices.default", (1, 1, 2, 2, 3), lambda o, x: o(x, [1, 2, 2], [1, 1, 1]),
            lambda X: (max_pool(X, [1, 2, 2], [1, 1, 1]), None), "", MAXPTS)]),
    Case("aten.avg_pool1d.default", [
        one("aten.avg_pool1d.default", (1, 2, 5), lambda o, x: o(x, [3], [2], [1]), lambda X: avg_pool(X, [3], [2], 1),
            "count_include_pad"),
        one("aten.avg_pool1d.default", (1, 1, 6), lambda o, x: o(x, [3], [2], [1], True, False),
            lambda X: avg_pool(X, [3], [2], 1, True, False), "ceil, exclude pad")]),
    Case("aten.avg_pool2d.default", [
        one("aten.avg_pool2d.default", (1, 1, 3, 4), lambda o, x: o(x, [2, 2], [1, 2], [1, 0], False, False),
            lambda X: avg_pool(X, [2, 2], [1, 2], (1, 0), False, False), "exclude pad"),
        one("aten.avg_pool2d.default", (1, 1, 3, 3), lambda o, x: o(x, [2, 2], [1, 1], [0, 0], False, True, 3),
            lambda X: avg_pool(X, [2, 2], [1, 1], 0, divisor_override=3), "divisor_override")]),
    Case("aten.avg_pool3d.default", [
        one("aten.avg_pool3d.default", (1, 1, 2, 2, 3), lambda o, x: o(x, [2, 2, 2], [1, 1, 1]),
            lambda X: avg_pool(X, [2, 2, 2], [1, 1, 1]))]),
]
for nd, shape, out in ((1, (1, 2, 5), [3]), (2, (1, 1, 3, 5), [2, 3]), (3, (1, 1, 2, 3, 3), [1, 2, 2])):
    names = [f"adaptive_avg_pool{nd}d.default"] + ([f"_adaptive_avg_pool{nd}d.default"] if nd > 1 else [])
    for name in names:
        POOL.append(Case(f"aten.{name}", [one(f"aten.{name}", shape, lambda o, x, _s=out: o(x, _s),
                                              lambda X, _s=out: adaptive(X, _s, amean))]))
    POOL.append(Case(f"aten.adaptive_max_pool{nd}d.default", [
        one(f"aten.adaptive_max_pool{nd}d.default", shape, lambda o, x, _s=out: o(x, _s),
            lambda X, _s=out: (adaptive(X, _s, amax), None), points=MAXPTS)]))

INTERP = [
    ("upsample_linear1d", "linear", (1, 2, 4), [6]),
    ("upsample_bilinear2d", "linear", (1, 1, 3, 3), [4, 5]),
    ("upsample_trilinear3d", "linear", (1, 1, 2, 2, 2), [3, 3, 4]),
    ("upsample_bicubic2d", "cubic", (1, 1, 3, 3), [4, 5]),
]
for name, kind, shape, size in INTERP:
    POOL.append(Case(f"aten.{name}.default", [
        one(f"aten.{name}.default", shape, lambda o, x, _s=size, _a=ac: o(x, _s, _a),
            interp_math(kind, size, ac), f"align_corners={ac}") for ac in (False, True)]))
    POOL.append(Case(f"aten.{name}.vec", [
        one(f"aten.{name}.vec", shape, lambda o, x, _s=size: o(x, _s, False, None), interp_math(kind, size),
            "output size"),
        one(f"aten.{name}.vec", shape, lambda o, x, _n=len(size): o(x, None, False, [1.5] * _n),
            interp_math(kind, [int(math.floor(s * 1.5)) for s in shape[-len(size):]], False, [1.5] * len(size)),
            "scale factor 1.5")]))
for name, kind in (("_upsample_bilinear2d_aa", "linear_aa"), ("_upsample_bicubic2d_aa", "cubic_aa")):
    POOL.append(Case(f"aten.{name}.default", [
        one(f"aten.{name}.default", (1, 1, 5, 4), lambda o, x, _s=s: o(x, _s, False), interp_math(kind, s),
            f"to {s}") for s in ([2, 3], [7, 6])]))
    # 5 -> 3 puts a filter tap exactly on the edge of its support: the weight is 0 in exact arithmetic,
    # exactly 0 in float32 and about 1e-17 in float64
    POOL.append(Case(f"aten.{name}.vec", [
        one(f"aten.{name}.vec", (1, 1, 5, 4), lambda o, x: o(x, [3, 2], False, None), interp_math(kind, [3, 2]),
            "to [3, 2], float64"),
        Instance(f"aten.{name}.vec", [D("x", (1, 1, 5, 4), dtype=torch.float32)],
                 lambda o, x: o(x, [3, 2], False, None), interp_math(kind, [3, 2]), label="to [3, 2], float32")]))

CASES: list[Case] = CONV + POOL


@pytest.mark.parametrize("case", proof_params(CASES))
def test_rule_matches_derivatives(case):
    check_case(case)


if __name__ == "__main__":
    raise SystemExit(bool(main(CASES, "conv/pool: ")))
