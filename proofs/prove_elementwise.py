"""Element-wise operators (and the element-wise operators of zero derivative): each rule's
pattern against the derivatives of an independent sympy formula.

One table of scalar formulas for the unary operators, one for the n-ary ones (each proved with
every operand labelled, and once more with each operand turned into a parameter, which proves
what the parameter meets), one for the piecewise-constant operators.
"""
from __future__ import annotations

import pytest
import sympy as sp
import torch

from proof_harness import (Case, D, Instance, check_case, ew, gt0, H, main, proof_params, aux, reduce_axes,
                           step_floor, step_round, step_trunc, step_ceil, variants)

SHAPE = (2, 3)
erf, exp, log, sqrt = sp.erf, sp.exp, sp.log, sp.sqrt
Max, Min, Pw = sp.Max, sp.Min, sp.Piecewise
F = sp.Float
SELU_ALPHA = F("1.6732632423543772848170429916717")
SELU_SCALE = F("1.0507009873554804934193349852946")


def softplus(x):
    return log(1 + exp(x))


def _gelu(x):
    return x / 2 * (1 + erf(x / sqrt(2)))


# name -> (formula, domain, extra positional args of the call)
UNARY = {
    "relu": (lambda x: Max(0, x), None, ()),
    "gelu": (_gelu, None, ()),
    "silu": (lambda x: x / (1 + exp(-x)), None, ()),
    "sigmoid": (lambda x: 1 / (1 + exp(-x)), None, ()),
    "tanh": (sp.tanh, None, ()),
    "exp": (exp, None, ()),
    "exp2": (lambda x: 2 ** x, None, ()),
    "log": (log, (0.1, 3.0), ()),
    "log2": (lambda x: log(x) / log(2), (0.1, 3.0), ()),
    "log10": (lambda x: log(x) / log(10), (0.1, 3.0), ()),
    "log1p": (lambda x: log(1 + x), (-0.5, 2.0), ()),
    "expm1": (lambda x: exp(x) - 1, None, ()),
    "neg": (lambda x: -x, None, ()),
    "abs": (sp.Abs, None, ()),
    "sqrt": (sqrt, (0.1, 3.0), ()),
    "rsqrt": (lambda x: 1 / sqrt(x), (0.1, 3.0), ()),
    "reciprocal": (lambda x: 1 / x, (0.2, 2.0), ()),
    "sin": (sp.sin, None, ()),
    "cos": (sp.cos, None, ()),
    "tan": (sp.tan, (-1.2, 1.2), ()),
    "asin": (sp.asin, (-0.9, 0.9), ()),
    "acos": (sp.acos, (-0.9, 0.9), ()),
    "atan": (sp.atan, None, ()),
    "sinh": (sp.sinh, None, ()),
    "cosh": (sp.cosh, None, ()),
    "asinh": (sp.asinh, None, ()),
    "acosh": (sp.acosh, (1.1, 3.0), ()),
    "atanh": (sp.atanh, (-0.9, 0.9), ()),
    "erf": (erf, None, ()),
    "erfc": (sp.erfc, None, ()),
    "erfinv": (sp.erfinv, (-0.9, 0.9), ()),
    "square": (lambda x: x ** 2, None, ()),
    "elu": (lambda x: Max(0, x) + Min(0, exp(x) - 1), None, ()),
    "selu": (lambda x: SELU_SCALE * (Max(0, x) + Min(0, SELU_ALPHA * (exp(x) - 1))), None, ()),
    "celu": (lambda x: Max(0, x) + Min(0, exp(x) - 1), None, ()),
    "leaky_relu": (lambda x: Max(0, x) + F("0.01") * Min(0, x), None, ()),
    "hardtanh": (lambda x: Min(Max(x, -1), 1), None, ()),
    "relu6": (lambda x: Min(Max(x, 0), 6), (-2.0, 8.0), ()),
    "softplus": (softplus, None, ()),
    "mish": (lambda x: x * sp.tanh(softplus(x)), None, ()),
    "hardswish": (lambda x: x * Min(Max(x + 3, 0), 6) / 6, (-4.0, 4.0), ()),
    "hardsigmoid": (lambda x: Min(Max(x + 3, 0), 6) / 6, (-4.0, 4.0), ()),
    "logit": (lambda x: log(x / (1 - x)), (0.05, 0.95), ()),
    "softshrink": (lambda x: Pw((x - F(0.5), x > F(0.5)), (x + F(0.5), x < -F(0.5)), (0, True)), None, (0.5,)),
    "hardshrink": (lambda x: Pw((x, sp.Abs(x) > F(0.5)), (0, True)), None, (0.5,)),
    "threshold": (lambda x: Pw((x, x > F(0.1)), (20, True)), None, (0.1, 20.0)),
    "rrelu": (lambda x: Max(0, x) + (F(1) / 8 + F(1) / 3) / 2 * Min(0, x), None, (1 / 8, 1 / 3, False)),
    "clamp": (lambda x: Min(Max(x, F(-0.5)), F(0.7)), None, (-0.5, 0.7)),
    "clamp_min": (lambda x: Max(x, F(-0.5)), None, (-0.5,)),
    "clamp_max": (lambda x: Min(x, F(0.7)), None, (0.7,)),
    "nan_to_num": (lambda x: x, None, ()),
    "alias": (lambda x: x, None, ()),
    "clone": (lambda x: x, None, ()),
    "contiguous": (lambda x: x, None, ()),
    "detach": (lambda x: x, None, ()),          # detach is the identity on values
    "lift_fresh_copy": (lambda x: x, None, ()),
    "positive": (lambda x: x, None, ()),
    "frac": (lambda x: x - step_trunc(x), None, ()),
    "sgn": (sp.sign, None, ()),
}
# name -> the same formula as another entry, applied in place on a copy of the input
IN_PLACE = {"relu_": "relu", "gelu_": "gelu", "silu_": "silu", "sigmoid_": "sigmoid", "tanh_": "tanh",
            "elu_": "elu", "selu_": "selu", "leaky_relu_": "leaky_relu", "hardtanh_": "hardtanh",
            "mish_": "mish", "hardswish_": "hardswish", "hardsigmoid_": "hardsigmoid", "clamp_": "clamp",
            "detach_": "detach"}
# overload -> (formula, call)
SCALAR_AND_CONVERSIONS = {
    "add.Scalar": (lambda x: x + 2, lambda o, x: o(x, 2.0)),
    "sub.Scalar": (lambda x: x - 2, lambda o, x: o(x, 2.0)),
    "mul.Scalar": (lambda x: 3 * x, lambda o, x: o(x, 3.0)),
    "div.Scalar": (lambda x: x / 4, lambda o, x: o(x, 4.0)),
    "rsub.Scalar": (lambda x: 2 - x, lambda o, x: o(x, 2.0)),
    "add_.Scalar": (lambda x: x + 2, lambda o, x: o(x.clone(), 2.0)),
    "sub_.Scalar": (lambda x: x - 2, lambda o, x: o(x.clone(), 2.0)),
    "mul_.Scalar": (lambda x: 3 * x, lambda o, x: o(x.clone(), 3.0)),
    "div_.Scalar": (lambda x: x / 4, lambda o, x: o(x.clone(), 4.0)),
    "pow.Tensor_Scalar": (lambda x: x ** 3, lambda o, x: o(x, 3)),
    "pow.Scalar": (lambda x: 2 ** x, lambda o, x: o(2.0, x)),
    "_to_copy.default": (lambda x: x, lambda o, x: o(x, dtype=torch.float32)),
    "to.dtype": (lambda x: x, lambda o, x: o(x, torch.float32)),
    "to.dtype_layout": (lambda x: x, lambda o, x: o(x, dtype=torch.float32, layout=torch.strided)),
    "to.device": (lambda x: x, lambda o, x: o(x, torch.device("cpu"), torch.float32)),
}


def _unary_case(op: str, f, domain, args, inplace=False, call=None) -> Case:
    kw = {"domain": domain} if domain else {}
    call = call or (lambda o, x, _a=args: o(x.clone() if inplace else x, *_a))
    return Case(op, [Instance(op, [D("x", SHAPE, **kw)], call, lambda X, _f=f: ew(_f, X))])


CASES: list[Case] = []
for name, (f, dom, args) in UNARY.items():
    CASES.append(_unary_case(f"aten.{name}.default", f, dom, args))
for name, base in IN_PLACE.items():
    f, dom, args = UNARY[base]
    CASES.append(_unary_case(f"aten.{name}.default", f, dom, args, inplace=True))
for name, (f, call) in SCALAR_AND_CONVERSIONS.items():
    CASES.append(_unary_case(f"aten.{name}", f, None, (), call=call))

# operators whose second tensor only gives a dtype or shape: it must contribute nothing
for name, call in (("to.other", lambda o, x, y: o(x, y)), ("type_as.default", lambda o, x, y: o(x, y))):
    CASES.append(Case(f"aten.{name}", [Instance(f"aten.{name}", [D("x", SHAPE), D("y", (1,), dtype=torch.float32)],
                                                call, lambda X, Y: ew(lambda x: x, X))]))

# log_sigmoid_forward returns (log sigmoid(x), buffer = exp(-|x|)) on CPU
CASES.append(Case("aten.log_sigmoid_forward.default", [Instance(
    "aten.log_sigmoid_forward.default", [D("x", SHAPE)], lambda o, x: o(x),
    lambda X: (ew(lambda x: -softplus(-x), X), ew(lambda x: exp(-sp.Abs(x)), X)))]))


# dropout family: random masks are auxiliary Bernoulli variables; a masked-out element does
# not depend on its input for that draw, and every element is kept in some draw.
def _mask(shape, p=0.5):
    return aux("m", shape, "bernoulli", 1 - p)


def _dropout_math(feature=False, alpha=False):
    a_neg = F("-1.7580993408473766")  # -selu_alpha * selu_scale

    def math(X):
        m = _mask(X.shape[:2] + (1,) * (X.ndim - 2) if feature else X.shape)
        if not alpha:
            return ew(lambda x, k: 2 * x * k, X, m)
        a = (F(0.5) * (1 + F(0.5) * a_neg ** 2)) ** F(-0.5)
        return ew(lambda x, k: a * (x * k + a_neg * (1 - k)) - a * a_neg * F(0.5), X, m)
    return math


for name, feature, alpha, inplace in (("dropout", False, False, False), ("dropout_", False, False, True),
                                       ("feature_dropout", True, False, False),
                                       ("alpha_dropout", False, True, False),
                                       ("feature_alpha_dropout", True, True, False)):
    op = f"aten.{name}.default"
    CASES.append(Case(op, [Instance(op, [D("x", (2, 3, 2))],
                                    lambda o, x, _i=inplace: o(x.clone() if _i else x, 0.5, True),
                                    _dropout_math(feature, alpha), check_values=False)]))


# n-ary operators -------------------------------------------------------------------------
A, B3, POS = (2, 3), (3,), (0.5, 2.0)


def _nary(op, f, operands, call=None, params=None, tag=""):
    call = call or (lambda o, *t: o(*t))
    return variants(op, operands, call, lambda *arrs, _f=f: ew(_f, *arrs), params=params, tag=tag)


def _gelu_grad(g, x):
    return g * ((1 + erf(x / sqrt(2))) / 2 + x * exp(-x ** 2 / 2) / sqrt(2 * sp.pi))


NARY = {
    "add.Tensor": (lambda a, b: a + 2 * b, [D("a", A), D("b", B3)], lambda o, a, b: o(a, b, alpha=2)),
    "sub.Tensor": (lambda a, b: a - 2 * b, [D("a", A), D("b", B3)], lambda o, a, b: o(a, b, alpha=2)),
    "rsub.Tensor": (lambda a, b: b - 2 * a, [D("a", A), D("b", B3)], lambda o, a, b: o(a, b, alpha=2)),
    "add_.Tensor": (lambda a, b: a + b, [D("a", A), D("b", B3)], lambda o, a, b: o(a.clone(), b)),
    "sub_.Tensor": (lambda a, b: a - b, [D("a", A), D("b", B3)], lambda o, a, b: o(a.clone(), b)),
    "mul.Tensor": (lambda a, b: a * b, [D("a", A), D("b", B3)], None),
    "mul_.Tensor": (lambda a, b: a * b, [D("a", A), D("b", B3)], lambda o, a, b: o(a.clone(), b)),
    "div.Tensor": (lambda a, b: a / b, [D("a", A), D("b", B3, domain=POS)], None),
    "div_.Tensor": (lambda a, b: a / b, [D("a", A), D("b", B3, domain=POS)], lambda o, a, b: o(a.clone(), b)),
    "pow.Tensor_Tensor": (lambda a, b: a ** b, [D("a", A, domain=POS), D("b", B3)], None),
    "maximum.default": (Max, [D("a", A), D("b", B3)], None),
    "minimum.default": (Min, [D("a", A), D("b", B3)], None),
    "fmax.default": (Max, [D("a", A), D("b", B3)], None),
    "fmin.default": (Min, [D("a", A), D("b", B3)], None),
    "atan2.default": (sp.atan2, [D("a", A), D("b", B3)], None),
    "hypot.default": (lambda a, b: sqrt(a ** 2 + b ** 2), [D("a", A), D("b", B3)], None),
    "xlogy.Tensor": (lambda a, b: a * log(b), [D("a", A), D("b", B3, domain=POS)], None),
    "copysign.Tensor": (lambda a, b: sp.Abs(a) * sp.sign(b), [D("a", A), D("b", B3)], None),
    "remainder.Tensor": (lambda a, b: a - b * step_floor(a / b), [D("a", A), D("b", B3, domain=POS)], None),
    "fmod.Tensor": (lambda a, b: a - b * step_trunc(a / b), [D("a", A), D("b", B3, domain=POS)], None),
    "logaddexp.default": (lambda a, b: log(exp(a) + exp(b)), [D("a", A), D("b", B3)], None),
    "lerp.Scalar": (lambda a, b: a + F(0.3) * (b - a), [D("a", A), D("b", B3)], lambda o, a, b: o(a, b, 0.3)),
    "lerp.Tensor": (lambda a, b, t: a + t * (b - a), [D("a", A), D("b", B3), D("t", A)], None),
    "addcmul.default": (lambda s, t1, t2: s + F(0.5) * t1 * t2, [D("s", A), D("t1", B3), D("t2", A)],
                        lambda o, s, t1, t2: o(s, t1, t2, value=0.5)),
    "addcdiv.default": (lambda s, t1, t2: s + F(0.5) * t1 / t2, [D("s", A), D("t1", B3), D("t2", A, domain=POS)],
                        lambda o, s, t1, t2: o(s, t1, t2, value=0.5)),
    "clamp.Tensor": (lambda x, lo, hi: Min(Max(x, lo), hi),
                     [D("x", A), D("lo", B3, domain=(-1.5, 0.0)), D("hi", A, domain=(0.0, 1.5))], None),
    "_prelu_kernel.default": (lambda x, w: Max(0, x) + w * Min(0, x), [D("x", A), D("w", B3)], None),
    "gelu_backward.default": (_gelu_grad, [D("g", A), D("x", B3)], None),
    "threshold_backward.default": (lambda g, x: Pw((g, x > F(0.1)), (0, True)), [D("g", A), D("x", A)],
                                   lambda o, g, x: o(g, x, 0.1)),
}
for name, (f, operands, call) in NARY.items():
    CASES.append(Case(f"aten.{name}", _nary(f"aten.{name}", f, operands, call)))

# div with a rounding mode: the true quotient, and the floored one (piecewise constant)
CASES.append(Case("aten.div.Tensor_mode",
                  _nary("aten.div.Tensor_mode", lambda a, b: a / b, [D("a", A), D("b", B3, domain=POS)],
                        lambda o, a, b: o(a, b, rounding_mode=None), tag="rounding_mode=None")
                  + _nary("aten.div.Tensor_mode", lambda a, b: step_floor(a / b), [D("a", A), D("b", B3, domain=POS)],
                          lambda o, a, b: o(a, b, rounding_mode="floor"), tag="rounding_mode=floor")))


def _prelu_math(X, W):
    return ew(lambda x, w: Max(0, x) + w * Min(0, x), X, W.reshape(3, 1))


CASES.append(Case("aten.prelu.default", variants("aten.prelu.default", [D("x", (2, 3, 2)), D("w", (3,))],
                                                 lambda o, x, w: o(x, w), _prelu_math)))

# selections: the condition or mask is a boolean input (modelled as s > 0), whose derivative is zero
BOOL = dict(dtype=torch.bool)


def _sel(c, a, b):
    return Pw((a, c > 0), (b, True))


CASES += [
    Case("aten.where.self", variants("aten.where.self", [D("c", A, **BOOL), D("a", A), D("b", B3)],
                                     lambda o, c, a, b: o(c, a, b), lambda C_, A_, B_: ew(_sel, C_, A_, B_))),
    Case("aten.where.ScalarSelf", variants("aten.where.ScalarSelf", [D("c", A, **BOOL), D("b", B3)],
                                           lambda o, c, b: o(c, 2.0, b), lambda C_, B_: ew(lambda c, b: _sel(c, 2, b), C_, B_))),
    Case("aten.where.ScalarOther", variants("aten.where.ScalarOther", [D("c", A, **BOOL), D("a", B3)],
                                            lambda o, c, a: o(c, a, 2.0), lambda C_, A_: ew(lambda c, a: _sel(c, a, 2), C_, A_))),
    Case("aten.where.Scalar", [Instance("aten.where.Scalar", [D("c", A, **BOOL)], lambda o, c: o(c, 1.0, 2.0),
                                        lambda C_: ew(lambda c: _sel(c, 1, 2), C_))]),
]
for name, inplace in (("masked_fill.Scalar", False), ("masked_fill_.Scalar", True)):
    CASES.append(Case(f"aten.{name}", variants(
        f"aten.{name}", [D("x", A), D("m", B3, **BOOL)],
        lambda o, x, m, _i=inplace: o(x.clone() if _i else x, m, 2.0),
        lambda X, M: ew(lambda x, m: _sel(m, 2, x), X, M))))
for name, inplace in (("masked_fill.Tensor", False), ("masked_fill_.Tensor", True)):
    CASES.append(Case(f"aten.{name}", variants(
        f"aten.{name}", [D("x", A), D("m", B3, **BOOL), D("v", ())],
        lambda o, x, m, v, _i=inplace: o(x.clone() if _i else x, m, v),
        lambda X, M, V: ew(lambda x, m, v: _sel(m, v, x), X, M, V))))

# _log_softmax_backward_data(grad_output, output, dim, dtype) = g - exp(out) * sum(g, dim)


def _lsm_backward(G, O):
    s = reduce_axes(G, 1, lambda v: sp.Add(*v), keepdim=True)
    return ew(lambda g, o, t: g - exp(o) * t, G, O, s)


CASES.append(Case("aten._log_softmax_backward_data.default", variants(
    "aten._log_softmax_backward_data.default", [D("g", A), D("out", A, domain=(-3.0, -0.1))],
    lambda o, g, out: o(g, out, 1, torch.float64), _lsm_backward)))

# _softmax_backward_data(grad_output, output, dim, dtype) = out * (g - sum(g * out, dim))


def _sm_backward(G, O):
    s = reduce_axes(ew(lambda g, o: g * o, G, O), 1, lambda v: sp.Add(*v), keepdim=True)
    return ew(lambda g, o, t: o * (g - t), G, O, s)


CASES.append(Case("aten._softmax_backward_data.default", variants(
    "aten._softmax_backward_data.default", [D("g", A), D("out", A, domain=(0.1, 0.9))],
    lambda o, g, out: o(g, out, 1, torch.float64), _sm_backward)))

# zero derivative: comparisons, logic, rounding, creation from a tensor ---------------------------


def _zero(X):
    return ew(lambda x: sp.S.Zero, X)


ZERO = {
    "eq.Tensor": (lambda a, b: Pw((1, sp.Eq(a, b)), (0, True)), [D("a", A), D("b", B3)], None),
    "ne.Tensor": (lambda a, b: Pw((0, sp.Eq(a, b)), (1, True)), [D("a", A), D("b", B3)], None),
    "lt.Tensor": (lambda a, b: H(b - a), [D("a", A), D("b", B3)], None),
    "le.Tensor": (lambda a, b: H(b - a), [D("a", A), D("b", B3)], None),
    "gt.Tensor": (lambda a, b: H(a - b), [D("a", A), D("b", B3)], None),
    "ge.Tensor": (lambda a, b: H(a - b), [D("a", A), D("b", B3)], None),
    "eq.Scalar": (lambda a: Pw((1, sp.Eq(a, F(0.5))), (0, True)), [D("a", A)], lambda o, a: o(a, 0.5)),
    "ne.Scalar": (lambda a: Pw((0, sp.Eq(a, F(0.5))), (1, True)), [D("a", A)], lambda o, a: o(a, 0.5)),
    "lt.Scalar": (lambda a: H(F(0.5) - a), [D("a", A)], lambda o, a: o(a, 0.5)),
    "le.Scalar": (lambda a: H(F(0.5) - a), [D("a", A)], lambda o, a: o(a, 0.5)),
    "gt.Scalar": (lambda a: H(a - F(0.5)), [D("a", A)], lambda o, a: o(a, 0.5)),
    "ge.Scalar": (lambda a: H(a - F(0.5)), [D("a", A)], lambda o, a: o(a, 0.5)),
    "logical_and.default": (lambda a, b: gt0(a) * gt0(b), [D("a", A, **BOOL), D("b", B3, **BOOL)], None),
    "logical_or.default": (lambda a, b: 1 - (1 - gt0(a)) * (1 - gt0(b)), [D("a", A, **BOOL), D("b", B3, **BOOL)], None),
    "logical_xor.default": (lambda a, b: (gt0(a) - gt0(b)) ** 2, [D("a", A, **BOOL), D("b", B3, **BOOL)], None),
    "logical_not.default": (lambda a: 1 - gt0(a), [D("a", A, **BOOL)], None),
    "bitwise_and.Tensor": (lambda a, b: gt0(a) * gt0(b), [D("a", A, **BOOL), D("b", B3, **BOOL)], None),
    "bitwise_or.Tensor": (lambda a, b: 1 - (1 - gt0(a)) * (1 - gt0(b)), [D("a", A, **BOOL), D("b", B3, **BOOL)], None),
    "bitwise_xor.Tensor": (lambda a, b: (gt0(a) - gt0(b)) ** 2, [D("a", A, **BOOL), D("b", B3, **BOOL)], None),
    "bitwise_not.default": (lambda a: 1 - gt0(a), [D("a", A, **BOOL)], None),
    "__and__.Tensor": (lambda a, b: gt0(a) * gt0(b), [D("a", A, **BOOL), D("b", B3, **BOOL)], None),
    "__or__.Tensor": (lambda a, b: 1 - (1 - gt0(a)) * (1 - gt0(b)), [D("a", A, **BOOL), D("b", B3, **BOOL)], None),
    "__xor__.Tensor": (lambda a, b: (gt0(a) - gt0(b)) ** 2, [D("a", A, **BOOL), D("b", B3, **BOOL)], None),
    "isnan.default": (lambda a: sp.S.Zero, [D("a", A)], None),
    "isinf.default": (lambda a: sp.S.Zero, [D("a", A)], None),
    "isfinite.default": (lambda a: sp.S.One, [D("a", A)], None),
    "sign.default": (sp.sign, [D("a", A)], None),
    "floor.default": (step_floor, [D("a", A)], None),
    "ceil.default": (step_ceil, [D("a", A)], None),
    "round.default": (step_round, [D("a", A)], None),
    "trunc.default": (step_trunc, [D("a", A)], None),
    "floor_divide.default": (lambda a, b: step_floor(a / b), [D("a", A), D("b", B3, domain=POS)], None),
    "zeros_like.default": (lambda a: sp.S.Zero, [D("a", A)], None),
    "ones_like.default": (lambda a: sp.S.One, [D("a", A)], None),
    "full_like.default": (lambda a: F(3.0), [D("a", A)], lambda o, a: o(a, 3.0)),
    "fill.Scalar": (lambda a: F(3.0), [D("a", A)], lambda o, a: o(a, 3.0)),
    "fill_.Scalar": (lambda a: F(3.0), [D("a", A)], lambda o, a: o(a.clone(), 3.0)),
    "zero_.default": (lambda a: sp.S.Zero, [D("a", A)], lambda o, a: o(a.clone())),
}
for name, (f, operands, call) in ZERO.items():
    CASES.append(Case(f"aten.{name}", _nary(f"aten.{name}", f, operands, call)))

NEW = {  # the tensor operand gives only dtype and device
    "new_zeros.default": (lambda o, a: o(a, [2, 2]), lambda X: _zero(X[:2, :2]), True),
    "new_ones.default": (lambda o, a: o(a, [2, 2]), lambda X: ew(lambda x: sp.S.One, X[:2, :2]), True),
    "new_full.default": (lambda o, a: o(a, [2, 2], 3.0), lambda X: ew(lambda x: F(3.0), X[:2, :2]), True),
    "new_empty.default": (lambda o, a: o(a, [2, 2]), lambda X: aux("mem", (2, 2)), False),
    "empty_like.default": (lambda o, a: o(a), lambda X: aux("mem", X.shape), False),
    "rand_like.default": (lambda o, a: o(a), lambda X: aux("u", X.shape), False),
    "randn_like.default": (lambda o, a: o(a), lambda X: aux("u", X.shape, "uniform", -3, 3), False),
    "randint_like.default": (lambda o, a: o(a, 10), lambda X: ew(step_floor, aux("u", X.shape, "uniform", 0, 10)), False),
    "bernoulli.default": (lambda o, a: o(a), lambda X: ew(lambda x, u: H(x - u), X, aux("u", X.shape)), False),
    "bernoulli.p": (lambda o, a: o(a, 0.3), lambda X: ew(lambda u: H(F(0.3) - u), aux("u", X.shape)), False),
}
for name, (call, math, check) in NEW.items():
    dom = {"domain": (0.1, 0.9)} if name.startswith("bernoulli") else {}
    CASES.append(Case(f"aten.{name}", [Instance(f"aten.{name}", [D("a", A, **dom)], call, math, check_values=check)]))


def _sorted_example(rng):
    return torch.sort(torch.from_numpy(rng.uniform(-2, 2, 4)))[0]


def _count_below(x, seq):
    return sp.Add(*[H(x - s) for s in seq])


CASES += [
    Case("aten.searchsorted.Tensor", [Instance(
        "aten.searchsorted.Tensor", [D("s", (4,), example=_sorted_example), D("x", A)], lambda o, s, x: o(s, x),
        lambda S, X: ew(lambda x: _count_below(x, list(S)), X))]),
    Case("aten.bucketize.Tensor", [Instance(
        "aten.bucketize.Tensor", [D("x", A), D("s", (4,), example=_sorted_example)], lambda o, x, s: o(x, s),
        lambda X, S: ew(lambda x: _count_below(x, list(S)), X))]),
    # lift_fresh returns its argument (torch.export inserts it on constants, and captures a call
    # on a traced value as lift_fresh_copy, so that node is retargeted)
    Case("aten.lift_fresh.default", [Instance("aten.lift_fresh.default", [D("x", A)], lambda o, x: o(x),
                                              lambda X: X, substitute=("aten.lift_fresh_copy.default",))]),
]


@pytest.mark.parametrize("case", proof_params(CASES))
def test_rule_matches_derivatives(case):
    check_case(case)


if __name__ == "__main__":
    raise SystemExit(bool(main(CASES, "elementwise: ")))
