"""Reductions, the softmax / cumulative / sorting family (rule family "mixing"), and the
index-valued reductions of zero derivative (argmax, argsort, any, all).

Order statistics (median, kthvalue, sort, topk, max) are written with the identity
k-th smallest = min over k-subsets of their max, whose derivative at a generic point is the
indicator of the element of that rank; over random points every element of the reduced axis
takes every rank, which is the pattern the rules claim.
"""
from __future__ import annotations


import numpy as np
import pytest
import sympy as sp

from proof_harness import Case, D, H, Instance, check_case, kth_smallest, main, proof_params, reduce_axes

X = (2, 2, 3)
add_, mul_ = (lambda v: sp.Add(*v)), (lambda v: sp.Mul(*v))


def red(f, axes, keepdim=False):
    return lambda X_: reduce_axes(X_, axes, f, keepdim)


def mean(v):
    return sp.Add(*v) / len(v)


def var(v, correction=1):
    m = mean(v)
    return sp.Add(*[(x - m) ** 2 for x in v]) / (len(v) - correction)


def std(v):
    return sp.sqrt(var(v))


def lse(v):
    return sp.log(sp.Add(*[sp.exp(x) for x in v]))


def one(op, call, math, shape=X, **kw) -> Case:
    return Case(op, [Instance(op, [D("x", shape, **kw)], call, math)])


def along(X_, axis, f):
    """f(list along the axis) -> list of the same length, written back along the axis."""
    Xm = np.moveaxis(np.asarray(X_, dtype=object), axis, -1)
    rows = {idx: f(list(Xm[idx])) for idx in np.ndindex(*Xm.shape[:-1])}
    out = np.empty(Xm.shape[:-1] + (len(next(iter(rows.values()))),), dtype=object)
    for idx, vals in rows.items():
        for k, v in enumerate(vals):
            out[idx + (k,)] = v
    return np.moveaxis(out, -1, axis)


def softmax(v):
    z = sp.Add(*[sp.exp(x) for x in v])
    return [sp.exp(x) / z for x in v]


def log_softmax(v):
    return [x - lse(v) for x in v]


def prefix(f):
    return lambda v: [f(v[: i + 1]) for i in range(len(v))]


def sorted_values(v, descending=False):
    n = len(v)
    out = [kth_smallest(v, k) for k in range(1, n + 1)]
    return out[::-1] if descending else out


def argrank(v, rank):
    """Index of the element of the given rank (0 = smallest), as a step function."""
    terms = []
    for i, x in enumerate(v):
        r = sp.Add(*[H(x - y) for j, y in enumerate(v) if j != i])
        terms.append(i * sp.Piecewise((1, sp.Eq(r, rank)), (0, True)))
    return sp.Add(*terms)


def nonzero(x):
    return sp.Piecewise((0, sp.Eq(x, 0)), (1, True))


CASES: list[Case] = [
    Case("aten.sum.dim_IntList", [
        Instance("aten.sum.dim_IntList", [D("x", X)], lambda o, x: o(x, [1]), red(add_, [1]), label="dim 1"),
        Instance("aten.sum.dim_IntList", [D("x", X)], lambda o, x: o(x, [0, 2], True), red(add_, [0, 2], True),
                 label="dims 0,2 keepdim")]),
    one("aten.sum.default", lambda o, x: o(x), red(add_, None)),
    one("aten.mean.dim", lambda o, x: o(x, [2]), red(mean, [2])),
    one("aten.mean.default", lambda o, x: o(x), red(mean, None)),
    one("aten.nansum.default", lambda o, x: o(x, [1]), red(add_, [1])),
    one("aten.nanmean.default", lambda o, x: o(x, [1]), red(mean, [1])),
    one("aten.amax.default", lambda o, x: o(x, [2]), red(lambda v: sp.Max(*v), [2])),
    one("aten.amin.default", lambda o, x: o(x, [0, 2]), red(lambda v: sp.Min(*v), [0, 2])),
    one("aten.max.default", lambda o, x: o(x), red(lambda v: sp.Max(*v), None)),
    one("aten.min.default", lambda o, x: o(x), red(lambda v: sp.Min(*v), None)),
    one("aten.logsumexp.default", lambda o, x: o(x, [2]), red(lse, [2])),
    one("aten.prod.dim_int", lambda o, x: o(x, 2), red(mul_, [2])),
    one("aten.prod.default", lambda o, x: o(x), red(mul_, None)),
    Case("aten.linalg_vector_norm.default", [
        Instance("aten.linalg_vector_norm.default", [D("x", X)], lambda o, x: o(x, 2, [2]),
                 red(lambda v: sp.sqrt(sp.Add(*[t ** 2 for t in v])), [2]), label="ord 2"),
        Instance("aten.linalg_vector_norm.default", [D("x", X)], lambda o, x: o(x, 1, [2]),
                 red(lambda v: sp.Add(*[sp.Abs(t) for t in v]), [2]), label="ord 1"),
        Instance("aten.linalg_vector_norm.default", [D("x", X)], lambda o, x: o(x, float("inf"), [2]),
                 red(lambda v: sp.Max(*[sp.Abs(t) for t in v]), [2]), label="ord inf")]),
    one("aten.norm.ScalarOpt_dim", lambda o, x: o(x, 2, [2]), red(lambda v: sp.sqrt(sp.Add(*[t ** 2 for t in v])), [2])),
    one("aten.norm.Scalar", lambda o, x: o(x, 2), red(lambda v: sp.sqrt(sp.Add(*[t ** 2 for t in v])), None)),
    one("aten.std.dim", lambda o, x: o(x, [2], True), red(std, [2])),
    one("aten.var.dim", lambda o, x: o(x, [2], True), red(var, [2])),
    one("aten.std.correction", lambda o, x: o(x, [2], correction=1), red(std, [2])),
    one("aten.var.correction", lambda o, x: o(x, [2], correction=1), red(var, [2])),
    one("aten.std_mean.correction", lambda o, x: o(x, [2], correction=1), lambda X_: (red(std, [2])(X_), red(mean, [2])(X_))),
    one("aten.var_mean.correction", lambda o, x: o(x, [2], correction=1), lambda X_: (red(var, [2])(X_), red(mean, [2])(X_))),
    one("aten.std_mean.dim", lambda o, x: o(x, [2], True), lambda X_: (red(std, [2])(X_), red(mean, [2])(X_))),
    one("aten.var_mean.dim", lambda o, x: o(x, [2], True), lambda X_: (red(var, [2])(X_), red(mean, [2])(X_))),
    one("aten.max.dim", lambda o, x: o(x, 2), lambda X_: (red(lambda v: sp.Max(*v), [2])(X_), None)),
    one("aten.min.dim", lambda o, x: o(x, 2, True), lambda X_: (red(lambda v: sp.Min(*v), [2], True)(X_), None)),
    one("aten.aminmax.default", lambda o, x: o(x, dim=2),
        lambda X_: (red(lambda v: sp.Min(*v), [2])(X_), red(lambda v: sp.Max(*v), [2])(X_))),
    one("aten.median.dim", lambda o, x: o(x, 2), lambda X_: (red(lambda v: kth_smallest(v, 2), [2])(X_), None)),
    one("aten.nanmedian.dim", lambda o, x: o(x, 2), lambda X_: (red(lambda v: kth_smallest(v, 2), [2])(X_), None)),
    # with distinct values every count is 1 and torch returns the smallest
    one("aten.mode.default", lambda o, x: o(x, 2), lambda X_: (red(lambda v: sp.Min(*v), [2])(X_), None)),
    one("aten.kthvalue.default", lambda o, x: o(x, 2, 2), lambda X_: (red(lambda v: kth_smallest(v, 2), [2])(X_), None)),
    # the mixing family
    one("aten.softmax.int", lambda o, x: o(x, 2), lambda X_: along(X_, 2, softmax)),
    one("aten._softmax.default", lambda o, x: o(x, 1, False), lambda X_: along(X_, 1, softmax)),
    one("aten._safe_softmax.default", lambda o, x: o(x, 2), lambda X_: along(X_, 2, softmax)),
    one("aten.special_softmax.default", lambda o, x: o(x, 2), lambda X_: along(X_, 2, softmax)),
    one("aten.log_softmax.int", lambda o, x: o(x, 2), lambda X_: along(X_, 2, log_softmax)),
    one("aten._log_softmax.default", lambda o, x: o(x, 0, False), lambda X_: along(X_, 0, log_softmax)),
    one("aten.cumsum.default", lambda o, x: o(x, 2), lambda X_: along(X_, 2, prefix(add_))),
    one("aten.cumprod.default", lambda o, x: o(x, 2), lambda X_: along(X_, 2, prefix(mul_))),
    one("aten.logcumsumexp.default", lambda o, x: o(x, 2), lambda X_: along(X_, 2, prefix(lse))),
    one("aten.cummax.default", lambda o, x: o(x, 2), lambda X_: (along(X_, 2, prefix(lambda v: sp.Max(*v))), None)),
    one("aten.cummin.default", lambda o, x: o(x, 2), lambda X_: (along(X_, 2, prefix(lambda v: sp.Min(*v))), None)),
    one("aten.sort.default", lambda o, x: o(x, 2), lambda X_: (along(X_, 2, sorted_values), None)),
    one("aten.sort.stable", lambda o, x: o(x, stable=True, dim=2, descending=True),
        lambda X_: (along(X_, 2, lambda v: sorted_values(v, True)), None)),
    one("aten.topk.default", lambda o, x: o(x, 2, 2), lambda X_: (along(X_, 2, lambda v: sorted_values(v, True)[:2]), None)),
    # index-valued: piecewise constant
    one("aten.argmax.default", lambda o, x: o(x, 2), red(lambda v: argrank(v, len(v) - 1), [2])),
    one("aten.argmin.default", lambda o, x: o(x, 2, True), red(lambda v: argrank(v, 0), [2], True)),
    one("aten.argsort.default", lambda o, x: o(x, 2), lambda X_: along(X_, 2, lambda v: [argrank(v, r) for r in range(len(v))])),
    one("aten.argsort.stable", lambda o, x: o(x, stable=True, dim=2, descending=True),
        lambda X_: along(X_, 2, lambda v: [argrank(v, r) for r in reversed(range(len(v)))])),
    one("aten.any.default", lambda o, x: o(x), red(lambda v: 1 - sp.Mul(*[1 - nonzero(t) for t in v]), None)),
    one("aten.any.dim", lambda o, x: o(x, 1), red(lambda v: 1 - sp.Mul(*[1 - nonzero(t) for t in v]), [1])),
    one("aten.all.default", lambda o, x: o(x), red(lambda v: sp.Mul(*[nonzero(t) for t in v]), None)),
    one("aten.all.dim", lambda o, x: o(x, 1), red(lambda v: sp.Mul(*[nonzero(t) for t in v]), [1])),
]


@pytest.mark.parametrize("case", proof_params(CASES))
def test_rule_matches_derivatives(case):
    check_case(case)


if __name__ == "__main__":
    raise SystemExit(bool(main(CASES, "reductions: ")))
