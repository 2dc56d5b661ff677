"""Element-wise operators: unary, binary with broadcasting, selection, and the operators whose
derivative is zero (comparisons, rounding, creation)."""
from __future__ import annotations

import torch

from ..label_tensor import LabelTensor
from ._ops import ops
from .helpers import elementwise, no_dependence
from .registry import register

UNARY = ops(
    "relu.default", "relu_.default", "gelu.default", "gelu_.default", "silu.default", "silu_.default",
    "sigmoid.default", "sigmoid_.default", "tanh.default", "tanh_.default", "exp.default", "exp2.default",
    "log.default", "log2.default", "log10.default", "log1p.default", "expm1.default", "neg.default",
    "abs.default", "sqrt.default", "rsqrt.default", "reciprocal.default", "sin.default", "cos.default",
    "tan.default", "asin.default", "acos.default", "atan.default", "sinh.default", "cosh.default",
    "asinh.default", "acosh.default", "atanh.default", "erf.default", "erfc.default", "erfinv.default",
    "square.default", "elu.default", "elu_.default", "selu.default", "selu_.default", "celu.default",
    "leaky_relu.default", "leaky_relu_.default", "hardtanh.default", "hardtanh_.default",
    "relu6.default", "softplus.default", "mish.default", "mish_.default", "hardswish.default",
    "hardswish_.default", "hardsigmoid.default", "hardsigmoid_.default", "logit.default",
    "log_sigmoid_forward.default", "softshrink.default", "hardshrink.default", "pow.Tensor_Scalar",
    "clamp.default", "clamp_.default", "clamp_min.default", "clamp_max.default", "nan_to_num.default",
    "alias.default", "clone.default", "contiguous.default", "detach.default", "detach_.default",
    "lift_fresh_copy.default", "_to_copy.default", "to.dtype", "to.dtype_layout", "to.device",
    "to.other", "type_as.default", "positive.default", "frac.default", "sgn.default",
    "add.Scalar", "sub.Scalar", "mul.Scalar", "div.Scalar", "rsub.Scalar", "add_.Scalar",
    "mul_.Scalar", "div_.Scalar", "sub_.Scalar", "fill_.Scalar", "dropout.default", "dropout_.default",
    "feature_dropout.default", "alpha_dropout.default", "feature_alpha_dropout.default",
    "_log_softmax_backward_data.default", "rrelu.default", "threshold.default",
)

# `fill_` replaces every value: it is registered as a creation op below, not here.
UNARY = [op for op in UNARY if op._schema.name != "aten::fill_"]


@register(*UNARY, family="elementwise")
def unary(ctx, x, *args, **kwargs):
    if isinstance(x, (int, float, bool)) or x is None:
        return no_dependence(ctx)
    return elementwise(ctx, x)


@register(*ops("add.Tensor", "sub.Tensor", "add_.Tensor", "sub_.Tensor", "rsub.Tensor"), family="elementwise")
def additive(ctx, a, b, alpha=1):
    # A parameter that is only added meets nothing: d/dz d(x + p)/dp = 0.
    return elementwise(ctx, a, b, additive=(0, 1))


@register(*ops("mul.Tensor", "mul_.Tensor", "div.Tensor", "div_.Tensor", "div.Tensor_mode",
               "pow.Tensor_Tensor", "pow.Scalar", "maximum.default", "minimum.default", "fmax.default",
               "fmin.default", "atan2.default", "hypot.default", "xlogy.Tensor", "copysign.Tensor",
               "remainder.Tensor", "fmod.Tensor", "lerp.Scalar", "lerp.Tensor", "addcmul.default",
               "addcdiv.default", "clamp.Tensor", "prelu.default", "_prelu_kernel.default",
               "logaddexp.default", "gelu_backward.default", "threshold_backward.default"),
          family="elementwise")
def binary(ctx, *args, **kwargs):
    operands = list(args) + [v for v in kwargs.values() if isinstance(v, LabelTensor)]
    return elementwise(ctx, *operands)


@register(*ops("where.self", "where.ScalarSelf", "where.ScalarOther", "where.Scalar"), family="elementwise")
def where(ctx, cond, a, b):
    # The condition is piecewise constant: it selects, it adds no derivative. Each branch is
    # only passed through, so a parameter branch meets nothing.
    return elementwise(ctx, cond, a, b, additive=(1, 2), ignore=(0,))


@register(*ops("masked_fill.Scalar", "masked_fill.Tensor", "masked_fill_.Scalar", "masked_fill_.Tensor"),
          family="elementwise")
def masked_fill(ctx, x, mask, value):
    return elementwise(ctx, x, mask, value, additive=(0, 2), ignore=(1,))


ZERO_DERIVATIVE = ops(
    "eq.Tensor", "eq.Scalar", "ne.Tensor", "ne.Scalar", "lt.Tensor", "lt.Scalar", "le.Tensor",
    "le.Scalar", "gt.Tensor", "gt.Scalar", "ge.Tensor", "ge.Scalar", "logical_and.default",
    "logical_or.default", "logical_not.default", "logical_xor.default", "bitwise_and.Tensor",
    "bitwise_or.Tensor", "bitwise_not.default", "bitwise_xor.Tensor", "isnan.default", "isinf.default",
    "isfinite.default", "sign.default", "floor.default", "ceil.default", "round.default", "trunc.default",
    "floor_divide.default", "argmax.default", "argmin.default", "any.default", "any.dim", "all.default",
    "all.dim", "zeros_like.default", "ones_like.default", "full_like.default", "empty_like.default",
    "rand_like.default", "randn_like.default", "randint_like.default", "bernoulli.p", "bernoulli.default",
    "new_zeros.default", "new_ones.default", "new_full.default", "new_empty.default", "zeros.default",
    "ones.default", "full.default", "empty.memory_format", "arange.default", "arange.start",
    "arange.start_step", "scalar_tensor.default", "rand.default", "randn.default", "randint.default",
    "randint.low", "eye.default", "linspace.default", "fill_.Scalar", "fill.Scalar", "zero_.default",
    "_local_scalar_dense.default", "searchsorted.Tensor", "bucketize.Tensor", "lift_fresh.default",
    "randperm.default", "tril_indices.default", "triu_indices.default", "empty_strided.default",
    "nonzero.default", "ones_like.default",
)


@register(*dict.fromkeys(ZERO_DERIVATIVE), family="no_dependence")
def zero_derivative(ctx, *args, **kwargs):
    return no_dependence(ctx)
