"""Element-wise operators: unary, binary with broadcasting, selection, and the operators whose
derivative is zero (comparisons, rounding, creation)."""
from __future__ import annotations


from ..label_tensor import LabelTensor, ParamRef
from ._ops import ops
from .helpers import elementwise, no_dependence, reduce_to
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
    "softshrink.default", "hardshrink.default", "pow.Tensor_Scalar",
    "clamp.default", "clamp_.default", "clamp_min.default", "clamp_max.default", "nan_to_num.default",
    "alias.default", "clone.default", "contiguous.default", "detach.default", "detach_.default",
    "lift_fresh_copy.default", "lift_fresh.default", "_to_copy.default", "to.dtype", "to.dtype_layout", "to.device",
    "to.other", "type_as.default", "positive.default", "frac.default",
    "add.Scalar", "sub.Scalar", "mul.Scalar", "div.Scalar", "rsub.Scalar", "add_.Scalar",
    "mul_.Scalar", "div_.Scalar", "sub_.Scalar", "fill_.Scalar", "dropout.default", "dropout_.default",
    "feature_dropout.default", "alpha_dropout.default", "feature_alpha_dropout.default",
    "rrelu.default", "threshold.default",
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


@register(*ops("mul.Tensor", "mul_.Tensor", "div.Tensor", "div_.Tensor", "pow.Tensor_Tensor", "pow.Scalar",
               "atan2.default", "hypot.default", "xlogy.Tensor", "logaddexp.default",
               "gelu_backward.default", "_prelu_kernel.default"),
          family="elementwise")
def binary(ctx, *args, **kwargs):
    """Each operand meets all the others: the mixed derivative of a product-like map."""
    operands = list(args) + [v for v in kwargs.values() if isinstance(v, LabelTensor)]
    return elementwise(ctx, *operands)


@register(*ops("maximum.default", "minimum.default", "fmax.default", "fmin.default", "remainder.Tensor",
               "fmod.Tensor", "clamp.Tensor", "lerp.Scalar"), family="elementwise")
def selecting(ctx, *args, **kwargs):
    """Each operand passes through (or is shifted by a piecewise-constant amount): the mixed
    derivative vanishes, so a parameter operand meets nothing."""
    operands = list(args) + list(kwargs.values())
    tensors = tuple(i for i, a in enumerate(operands) if isinstance(a, LabelTensor))
    return elementwise(ctx, *operands, additive=tensors)


@register(*ops("div.Tensor_mode"), family="elementwise")
def div_mode(ctx, a, b, rounding_mode=None):
    if rounding_mode is None:
        return elementwise(ctx, a, b)
    return no_dependence(ctx)  # floor / trunc division is piecewise constant


@register(*ops("copysign.Tensor"), family="elementwise")
def copysign(ctx, a, b):
    # |a| * sign(b): the sign is piecewise constant, so b adds nothing and a only passes.
    return elementwise(ctx, a, b, additive=(0,), ignore=(1,))


@register(*ops("lerp.Tensor"), family="elementwise")
def lerp(ctx, a, b, t):
    # a + t (b - a): the endpoints meet the weight, the weight meets both endpoints.
    return elementwise(ctx, a, b, t, meets={0: (2,), 1: (2,), 2: (0, 1)})


@register(*ops("addcmul.default", "addcdiv.default"), family="elementwise")
def addc(ctx, x, t1, t2, value=1):
    # x + value * t1 (*|/) t2: x is only added, t1 and t2 meet each other.
    return elementwise(ctx, x, t1, t2, additive=(0,), meets={1: (2,), 2: (1,)})


@register(*ops("threshold_backward.default"), family="elementwise")
def threshold_backward(ctx, grad, x, threshold):
    # grad where x > threshold else 0: x only selects.
    return elementwise(ctx, grad, x, additive=(0,), ignore=(1,))


@register(*ops("prelu.default"), family="elementwise")
def prelu(ctx, x, weight):
    """max(0, x) + w[c] min(0, x), the weight running along the channel axis (dim 1): an
    element-wise product once the weight is laid along that axis."""
    view = [1] * x.ndim
    if weight.ndim and weight.shape[0] > 1:
        view[1 if x.ndim > 1 else 0] = weight.shape[0]
    ids = weight.ids.reshape(view if weight.ids.numel() > 1 else [1] * x.ndim)
    return elementwise(ctx, x, LabelTensor(ids, view, tuple(_laid_along(r, view) for r in weight.refs)))


def _laid_along(ref: ParamRef, view) -> ParamRef:
    """The same parameter elements, reshaped to `view`."""
    pos = ref.index if ref.index is not None else ref.positions()
    if ref.everything or pos is None:
        return ParamRef(ref.name, ref.shape, everything=True)
    return ParamRef(ref.name, ref.shape, index=pos.reshape(view))


@register(*ops("log_sigmoid_forward.default"), family="elementwise")
def log_sigmoid_forward(ctx, x):
    # (value, buffer): the buffer (exp(-|x|), or empty on the CPU) is element-wise too.
    value = LabelTensor(x.ids, ctx.out_shape(0), x.refs)
    buffer = ctx.out[1]
    return value, (LabelTensor(x.ids, buffer.shape, x.refs) if tuple(buffer.shape) == tuple(x.shape)
                   else LabelTensor.empty(buffer.shape))


@register(*ops("_log_softmax_backward_data.default", "_softmax_backward_data.default"), family="mixing")
def softmax_backward(ctx, grad, output, dim, input_dtype):
    """log-softmax: g - exp(out) * sum_dim g; softmax: out * (g - sum_dim(g * out)). Each
    element depends on g along dim (and on out along dim, for softmax) and on out itself; a
    parameter operand meets the other operand along dim."""
    from .helpers import dims_of
    d = dims_of(dim, grad.ndim)
    g_row, o_row = ctx.pool.reduce_ids(grad.ids, d), ctx.pool.reduce_ids(output.ids, d)
    softmax = ctx.node.target._schema.name == "aten::_softmax_backward_data"
    ids = ctx.pool.union_ids(ctx.pool.union_ids(g_row, output.ids), o_row if softmax else output.ids)
    if (grad.is_param or output.is_param) and grad.is_free and output.is_free:
        from ..label_tensor import ParamRef
        refs = tuple(ParamRef(r.name, r.shape, everything=True) for op in (grad, output) for r in op.refs)
        return LabelTensor(ids, ctx.out_shape(), refs)
    for op, other_row in ((grad, o_row), (output, g_row)):
        if op.is_param:
            ctx.meet(op, other_row.expand(op.shape) if other_row.dim() == op.ndim else other_row,
                     reduce_to(ctx, ids, op.shape))
    return LabelTensor(ids, ctx.out_shape())


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
    "bitwise_or.Tensor", "bitwise_not.default", "bitwise_xor.Tensor",
    # `a & b` on tensors (attention-mask building in Hugging Face models) exports as __and__.
    "__and__.Tensor", "__or__.Tensor", "__xor__.Tensor", "isnan.default", "isinf.default",
    "isfinite.default", "sign.default", "floor.default", "ceil.default", "round.default", "trunc.default",
    "floor_divide.default", "argmax.default", "argmin.default", "any.default", "any.dim", "all.default",
    "all.dim", "zeros_like.default", "ones_like.default", "full_like.default", "empty_like.default",
    "rand_like.default", "randn_like.default", "randint_like.default", "bernoulli.p", "bernoulli.default",
    "new_zeros.default", "new_ones.default", "new_full.default", "new_empty.default", "zeros.default",
    "ones.default", "full.default", "empty.memory_format", "arange.default", "arange.start",
    "arange.start_step", "scalar_tensor.default", "rand.default", "randn.default", "randint.default",
    "randint.low", "eye.default", "linspace.default", "fill_.Scalar", "fill.Scalar", "zero_.default",
    "_local_scalar_dense.default", "searchsorted.Tensor", "bucketize.Tensor",
    "randperm.default", "tril_indices.default", "triu_indices.default", "empty_strided.default",
    "nonzero.default", "sgn.default",
)


@register(*dict.fromkeys(ZERO_DERIVATIVE), family="no_dependence")
def zero_derivative(ctx, *args, **kwargs):
    return no_dependence(ctx)
