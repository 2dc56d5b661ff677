"""Normalisations: layer / RMS / batch / instance / group norm, written out as means and
variances over their groups. The affine weight multiplies the normalised value (it meets the
whole group), the shift is only added (it meets nothing); in evaluation, batch norm's running
mean is only subtracted (meets nothing) while the running variance divides (meets the channel).
Every output of the native variants is checked, saved statistics included.
"""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from proof_harness import Case, D, Instance, Operand, check_case, main, proof_params, reduce_axes, variants

EPS = sp.Rational(1, 10 ** 5)
MOM = sp.Rational(1, 10)


def _mean(v):
    return sp.Add(*v) / len(v)


def _var(v, correction=0):
    m = _mean(v)
    return sp.Add(*[(t - m) ** 2 for t in v]) / (len(v) - correction)


def normalise(X, axes):
    """(normalised X, mean, 1/sqrt(var + eps)) over `axes`, statistics kept with size-1 axes."""
    m = reduce_axes(X, axes, _mean, keepdim=True)
    r = reduce_axes(X, axes, lambda v: 1 / sp.sqrt(_var(v) + EPS), keepdim=True)
    return (X - m) * r, m, r


def layer_norm(X, W=None, B=None, k=1):
    Y, m, r = normalise(X, list(range(X.ndim - k, X.ndim)))
    Y = Y * W if W is not None else Y
    return (Y + B if B is not None else Y), m, r


def rms_norm(X, W, k=1):
    r = reduce_axes(X, list(range(X.ndim - k, X.ndim)), lambda v: 1 / sp.sqrt(_mean([t ** 2 for t in v]) + EPS),
                    keepdim=True)
    return X * r * W, r


def chan(V, ndim):
    return V.reshape([1, -1] + [1] * (ndim - 2))


def bn_train(X, W, B):
    Y, m, r = normalise(X, [0] + list(range(2, X.ndim)))
    return Y * chan(W, X.ndim) + chan(B, X.ndim), m.reshape(-1), r.reshape(-1)


def bn_eval(X, W, B, RM, RV):
    Y = (X - chan(RM, X.ndim)) / np.vectorize(lambda v: sp.sqrt(v + EPS), otypes=[object])(chan(RV, X.ndim))
    return Y * chan(W, X.ndim) + chan(B, X.ndim)


def empty():
    return np.empty((0,), dtype=object)


def group_norm(X, W, B, g):
    n, c = X.shape[:2]
    Xg = X.reshape((n, g, c // g) + X.shape[2:])
    Y, m, r = normalise(Xg, list(range(2, Xg.ndim)))
    Y = Y.reshape(X.shape) * chan(W, X.ndim) + chan(B, X.ndim)
    return Y, m.reshape(n, g), r.reshape(n, g)


def Buf(name, shape, **kw):
    return Operand(name, tuple(shape), "buffer", **kw)


def norm_variants(op, operands, call, math, params, tag=""):
    """All operands labelled; each affine operand a parameter; and the usual setting, where
    every operand but the input is a parameter."""
    out = variants(op, operands, call, math, params=params, tag=tag)
    from dataclasses import replace
    ps = [replace(o, role="param") if k in params else o for k, o in enumerate(operands)]
    out.append(Instance(op, ps, call, math, label=(tag + " " if tag else "") + "affine parameters"))
    # the usual labelling: features along one axis (the last, or the channels), shared elsewhere
    axis = -1 if op in LAST_AXIS else 1
    ps2 = [replace(ps[0], label_axis=axis % len(ps[0].shape))] + ps[1:]
    out.append(Instance(op, ps2, call, math, label=(tag + " " if tag else "") + f"affine parameters, features on axis {axis}"))
    return out


LAST_AXIS = {"aten.layer_norm.default", "aten.native_layer_norm.default", "aten.rms_norm.default",
             "aten._fused_rms_norm.default"}


X2, X3 = (2, 4), (2, 2, 3)
POS = (0.5, 2.0)
# running statistics are buffers (torch.export refuses them as parameters of these operators)
EVAL = [D("x", X3), D("w", (2,)), D("b", (2,)), Buf("rm", (2,)), Buf("rv", (2,), domain=POS)]
CASES: list[Case] = [
    Case("aten.layer_norm.default", norm_variants(
        "aten.layer_norm.default", [D("x", X2), D("w", (4,)), D("b", (4,))],
        lambda o, x, w, b: o(x, [4], w, b, 1e-5), lambda X, W, B: layer_norm(X, W, B)[0], params=[1, 2])
        + [Instance("aten.layer_norm.default", [D("x", (2, 2, 2))], lambda o, x: o(x, [2, 2]),
                    lambda X: layer_norm(X, k=2)[0], label="two normalised axes, no affine")]),
    Case("aten.native_layer_norm.default", norm_variants(
        "aten.native_layer_norm.default", [D("x", X2), D("w", (4,)), D("b", (4,))],
        lambda o, x, w, b: o(x, [4], w, b, 1e-5), lambda X, W, B: layer_norm(X, W, B), params=[1, 2])),
    Case("aten.rms_norm.default", norm_variants(
        "aten.rms_norm.default", [D("x", X2), D("w", (4,))], lambda o, x, w: o(x, [4], w, 1e-5),
        lambda X, W: rms_norm(X, W)[0], params=[1])),
    Case("aten._fused_rms_norm.default", norm_variants(
        "aten._fused_rms_norm.default", [D("x", X2), D("w", (4,))], lambda o, x, w: o(x, [4], w, 1e-5),
        lambda X, W: rms_norm(X, W), params=[1])),
    Case("aten.batch_norm.default",
         norm_variants("aten.batch_norm.default", [D("x", X3), D("w", (2,)), D("b", (2,))],
                       lambda o, x, w, b: o(x, w, b, None, None, True, 0.1, 1e-5, False),
                       lambda X, W, B: bn_train(X, W, B)[0], params=[1, 2], tag="training")
         + norm_variants("aten.batch_norm.default", EVAL,
                         lambda o, x, w, b, rm, rv: o(x, w, b, rm, rv, False, 0.1, 1e-5, False),
                         bn_eval, params=[1, 2], tag="eval")),
    Case("aten.native_batch_norm.default",
         norm_variants("aten.native_batch_norm.default", [D("x", X3), D("w", (2,)), D("b", (2,))],
                       lambda o, x, w, b: o(x, w, b, None, None, True, 0.1, 1e-5),
                       bn_train, params=[1, 2], tag="training")
         + norm_variants("aten.native_batch_norm.default", EVAL,
                         lambda o, x, w, b, rm, rv: o(x, w, b, rm, rv, False, 0.1, 1e-5),
                         lambda *a: (bn_eval(*a), empty(), empty()), params=[1, 2], tag="eval")),
    Case("aten._native_batch_norm_legit_no_training.default", norm_variants(
        "aten._native_batch_norm_legit_no_training.default", EVAL,
        lambda o, x, w, b, rm, rv: o(x, w, b, rm, rv, 0.1, 1e-5),
        lambda *a: (bn_eval(*a), empty(), empty()), params=[1, 2])),
    Case("aten._native_batch_norm_legit.default", norm_variants(
        "aten._native_batch_norm_legit.default", EVAL,
        lambda o, x, w, b, rm, rv: o(x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5),
        lambda X, W, B, RM, RV: bn_train(X, W, B), params=[1, 2], tag="training")),
    Case("aten._native_batch_norm_legit_functional.default", norm_variants(
        "aten._native_batch_norm_legit_functional.default", EVAL,
        lambda o, x, w, b, rm, rv: o(x, w, b, rm, rv, True, 0.1, 1e-5),
        lambda X, W, B, RM, RV: bn_train(X, W, B) + (
            (1 - MOM) * RM + MOM * reduce_axes(X, [0, 2], _mean),
            (1 - MOM) * RV + MOM * reduce_axes(X, [0, 2], lambda v: _var(v, 1))),
        params=[1, 2], tag="training")),
    Case("aten.instance_norm.default", norm_variants(
        "aten.instance_norm.default", [D("x", X3), D("w", (2,)), D("b", (2,))],
        lambda o, x, w, b: o(x, w, b, None, None, True, 0.1, 1e-5, False),
        lambda X, W, B: normalise(X, [2])[0] * chan(W, 3) + chan(B, 3), params=[1, 2])),
    Case("aten.group_norm.default", norm_variants(
        "aten.group_norm.default", [D("x", (2, 4, 2)), D("w", (4,)), D("b", (4,))],
        lambda o, x, w, b: o(x, 2, w, b, 1e-5), lambda X, W, B: group_norm(X, W, B, 2)[0], params=[1, 2])),
    Case("aten.native_group_norm.default", norm_variants(
        "aten.native_group_norm.default", [D("x", (2, 4, 2)), D("w", (4,)), D("b", (4,))],
        lambda o, x, w, b: o(x, w, b, 2, 4, 2, 2, 1e-5), lambda X, W, B: group_norm(X, W, B, 2), params=[1, 2])),
]


@pytest.mark.parametrize("case", proof_params(CASES))
def test_rule_matches_derivatives(case):
    check_case(case)


if __name__ == "__main__":
    raise SystemExit(bool(main(CASES, "norms: ")))
