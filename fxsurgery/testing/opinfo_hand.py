"""Hand-written samples for the registered rules that torch's OpInfo samples do not reach, and
the reasons why some rules cannot be shown to autodiff at all: one table, HAND.

operator -> a function returning a list of `Case`s (most call the overload itself, since
torch.export keeps an operator called directly), or a string saying why no sample can check the
rule against autodiff. A rule that neither OpInfo nor this table checks fails
tests/test_opinfo.py, naming the operator, so that a new rule is checked the moment it is
registered. Only floating tensors are labelled; the values of the floating tensors here do not
matter (the gradient mapping draws its own random points), those of index tensors do.
"""
from __future__ import annotations

import torch

from .opinfo import Case, _on_a_copy

__all__ = ["HAND"]

aten = torch.ops.aten


def _t(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + len(shape)))


def direct(name: str, *args, **kwargs):
    """A sample that calls `aten.<name>` (packet.overload) itself; an in-place overload runs on
    a copy of its first operand."""
    packet, overload = name.split(".")
    op = getattr(getattr(aten, packet), overload)
    write = op._schema.arguments and op._schema.arguments[0].alias_info is not None \
        and op._schema.arguments[0].alias_info.is_write
    fn = _on_a_copy(op) if write else op
    return lambda: [Case(f"hand {name}", fn, args, kwargs)]


def _lstm_params(gates, n_in, hidden):
    return [_t(gates * hidden, n_in), _t(gates * hidden, hidden), _t(gates * hidden), _t(gates * hidden)]


NO_TENSOR = "a factory: it takes no tensor operand, so there is nothing to label"
INTEGER = "integer or boolean operands and result: autodiff has no derivative to compare"
BOOLEAN = "a boolean or integer result: autodiff has no derivative to compare"
NO_FORWARD_AD = "torch has no forward-mode derivative for it, which the gradient mapping needs"
RANDOM = "random: each call draws new numbers, so no two evaluations of the graph are the same function"

X4 = (1, 2, 4, 4)
MASK = torch.tensor([[True, False, True], [False, True, False]])

HAND: dict = {
    # no derivative to compare -----------------------------------------------------------
    **{op: INTEGER for op in ("aten.__and__.Tensor", "aten.__or__.Tensor", "aten.__xor__.Tensor",
                              "aten.bitwise_and.Tensor", "aten.bitwise_not.default", "aten.bitwise_or.Tensor",
                              "aten.bitwise_xor.Tensor", "aten.one_hot.default")},
    **{op: BOOLEAN for op in ("aten.all.default", "aten.all.dim", "aten.any.default", "aten.any.dim",
                              "aten.argmax.default", "aten.argmin.default", "aten.argsort.default",
                              "aten.argsort.stable", "aten.isfinite.default", "aten.isinf.default",
                              "aten.isnan.default", "aten.logical_not.default", "aten.eq.Scalar", "aten.ne.Scalar",
                              "aten.lt.Scalar", "aten.le.Scalar", "aten.gt.Scalar", "aten.ge.Scalar",
                              "aten.searchsorted.Tensor", "aten.bucketize.Tensor")},
    **{op: NO_TENSOR for op in ("aten.arange.default", "aten.arange.start", "aten.arange.start_step",
                                "aten.empty.memory_format", "aten.empty_strided.default", "aten.eye.default",
                                "aten.full.default", "aten.ones.default", "aten.zeros.default",
                                "aten.scalar_tensor.default", "aten.linspace.default", "aten.tril_indices.default",
                                "aten.triu_indices.default", "aten.where.Scalar")},
    **{op: RANDOM for op in ("aten.bernoulli.default", "aten.bernoulli.p", "aten.rand.default",
                             "aten.randint.default", "aten.randint.low", "aten.randint_like.default",
                             "aten.randn.default", "aten.randperm.default", "aten.rand_like.default",
                             "aten.randn_like.default")},
    "aten._local_scalar_dense.default": "returns a Python number, not a tensor",
    "aten.convolution_overrideable.default": "no CPU kernel: an extension point for out-of-tree backends",
    "aten.cudnn_batch_norm.default": "CUDA only",
    "aten.floor_divide.default": "torch has no forward-mode derivative for floor_divide (piecewise constant)",
    "aten.transpose_.default": ("the gradient mapping cannot run an in-place view operator (it has no "
                                "out-of-place variant there)"),
    # samples --------------------------------------------------------------------------
    "aten._convolution.default": direct("_convolution.default", _t(*X4), _t(3, 2, 3, 3), _t(3), [1, 1], [0, 0],
                                        [1, 1], False, [0, 0], 1, False, False, True, True),
    "aten._convolution.deprecated": direct("_convolution.deprecated", _t(*X4), _t(3, 2, 3, 3), _t(3), [1, 1],
                                           [0, 0], [1, 1], False, [0, 0], 1, False, False, True),
    "aten.conv2d.padding": direct("conv2d.padding", _t(*X4), _t(3, 2, 3, 3), _t(3), [1, 1], "same", [1, 1], 1),
    "aten.conv3d.default": direct("conv3d.default", _t(1, 2, 3, 3, 3), _t(2, 2, 2, 2, 2)),
    "aten._log_softmax_backward_data.default": direct("_log_softmax_backward_data.default", _t(2, 3), _t(2, 3), 1,
                                                      torch.float32),
    "aten._scaled_dot_product_flash_attention_for_cpu.default": NO_FORWARD_AD,
    "aten.native_channel_shuffle.default": NO_FORWARD_AD,
    "aten.lift_fresh_copy.default": ("torch's vmap has no batching rule for lift_fresh, which the gradient "
                                     "mapping's forward derivatives need"),
    "aten.lift_fresh.default": "torch.export records a direct call as lift_fresh_copy (checked on its own)",
    "aten.conv1d.padding": direct("conv1d.padding", _t(1, 2, 6), _t(3, 2, 3), _t(3), [1], "same", [1], 1),
    "aten._unsafe_index.Tensor": direct("_unsafe_index.Tensor", _t(3, 4), [torch.tensor([2, 0, 0])]),
    "aten._upsample_bicubic2d_aa.default": direct("_upsample_bicubic2d_aa.default", _t(1, 1, 4, 4), [6, 6], False),
    "aten._upsample_bicubic2d_aa.vec": direct("_upsample_bicubic2d_aa.vec", _t(1, 1, 4, 4), [6, 6], False, None),
    "aten._upsample_bilinear2d_aa.default": direct("_upsample_bilinear2d_aa.default", _t(1, 1, 4, 4), [3, 3], False),
    "aten._upsample_bilinear2d_aa.vec": direct("_upsample_bilinear2d_aa.vec", _t(1, 1, 4, 4), [3, 3], False, None),
    "aten.adaptive_avg_pool1d.default": direct("adaptive_avg_pool1d.default", _t(1, 2, 7), [3]),
    "aten.adaptive_avg_pool2d.default": direct("adaptive_avg_pool2d.default", _t(1, 2, 5, 5), [2, 3]),
    "aten.adaptive_avg_pool3d.default": direct("adaptive_avg_pool3d.default", _t(1, 1, 3, 3, 3), [2, 2, 2]),
    "aten.adaptive_max_pool1d.default": direct("adaptive_max_pool1d.default", _t(1, 2, 7), [3]),
    "aten.adaptive_max_pool2d.default": direct("adaptive_max_pool2d.default", _t(1, 2, 5, 5), [2, 3]),
    "aten.adaptive_max_pool3d.default": direct("adaptive_max_pool3d.default", _t(1, 1, 3, 3, 3), [2, 2, 2]),
    "aten.add.Scalar": direct("add.Scalar", _t(2, 3), 2.0),
    "aten.add_.Scalar": direct("add_.Scalar", _t(2, 3), 2.0),
    "aten.sub.Scalar": direct("sub.Scalar", _t(2, 3), 2.0),
    "aten.sub_.Scalar": direct("sub_.Scalar", _t(2, 3), 2.0),
    "aten.mul.Scalar": direct("mul.Scalar", _t(2, 3), 2.0),
    "aten.mul_.Scalar": direct("mul_.Scalar", _t(2, 3), 2.0),
    "aten.div.Scalar": direct("div.Scalar", _t(2, 3), 2.0),
    "aten.div_.Scalar": direct("div_.Scalar", _t(2, 3), 2.0),
    "aten.rsub.Scalar": direct("rsub.Scalar", _t(2, 3), 2.0),
    "aten.pow.Scalar": direct("pow.Scalar", 2.0, _t(2, 3)),
    "aten.pow.Tensor_Scalar": direct("pow.Tensor_Scalar", _t(2, 3), 3.0),
    "aten.clamp.default": direct("clamp.default", _t(2, 3), -0.5, 0.5),
    "aten.clamp_.default": direct("clamp_.default", _t(2, 3), -0.5, 0.5),
    "aten.clamp_max.default": direct("clamp_max.default", _t(2, 3), 0.3),
    "aten.clamp_min.default": direct("clamp_min.default", _t(2, 3), 0.3),
    "aten.where.ScalarOther": direct("where.ScalarOther", MASK, _t(2, 3), 0.0),
    "aten.where.ScalarSelf": direct("where.ScalarSelf", MASK, 0.0, _t(2, 3)),
    "aten.dropout.default": direct("dropout.default", _t(2, 3), 0.5, False),
    "aten.dropout_.default": direct("dropout_.default", _t(2, 3), 0.5, False),
    "aten.alpha_dropout.default": direct("alpha_dropout.default", _t(2, 3), 0.5, False),
    "aten.feature_dropout.default": direct("feature_dropout.default", _t(2, 3, 4), 0.5, False),
    "aten.feature_alpha_dropout.default": direct("feature_alpha_dropout.default", _t(2, 3, 4), 0.5, False),
    "aten.channel_shuffle.default": direct("channel_shuffle.default", _t(1, 4, 2, 2), 2),
    "aten.pixel_shuffle.default": direct("pixel_shuffle.default", _t(1, 4, 2, 2), 2),
    "aten.pixel_unshuffle.default": direct("pixel_unshuffle.default", _t(1, 1, 4, 4), 2),
    "aten.detach.default": direct("detach.default", _t(2, 3)),
    "aten.detach_.default": direct("detach_.default", _t(2, 3)),
    "aten.contiguous.default": direct("contiguous.default", _t(2, 3)),
    "aten.chunk.default": direct("chunk.default", _t(2, 6), 3, 1),
    "aten.narrow.default": direct("narrow.default", _t(3, 5), 1, 1, 3),
    "aten.movedim.int": direct("movedim.int", _t(2, 3, 4), 0, 2),
    "aten.select_copy.int": direct("select_copy.int", _t(3, 4), 1, 2),
    "aten.slice_copy.Tensor": direct("slice_copy.Tensor", _t(3, 5), 1, 1, 4),
    "aten.split_copy.Tensor": direct("split_copy.Tensor", _t(3, 5), 2, 1),
    "aten.type_as.default": direct("type_as.default", _t(2, 3), _t(3)),
    "aten.to.dtype": direct("to.dtype", _t(2, 3), torch.float64),
    "aten.to.dtype_layout": direct("to.dtype_layout", _t(2, 3), dtype=torch.float64),
    "aten.to.other": direct("to.other", _t(2, 3), _t(4).double()),
    "aten.embedding.default": direct("embedding.default", _t(5, 3), torch.tensor([[4, 0], [2, 2]])),
    "aten.ger.default": direct("ger.default", _t(3), _t(4)),
    "aten.lerp.Tensor": direct("lerp.Tensor", _t(2, 3), _t(2, 3), _t(2, 3)),
    "aten.prelu.default": direct("prelu.default", _t(2, 3, 4), _t(3)),
    "aten.rrelu.default": NO_FORWARD_AD,
    "aten.instance_norm.default": direct("instance_norm.default", _t(2, 3, 4), _t(3), _t(3), None, None, True, 0.1,
                                         1e-5, False),
    "aten.pad.default": direct("pad.default", _t(1, 2, 5), [1, 2], "reflect", None),
    "aten.reflection_pad1d.default": direct("reflection_pad1d.default", _t(1, 2, 5), [1, 2]),
    "aten.reflection_pad2d.default": direct("reflection_pad2d.default", _t(1, 1, 4, 4), [1, 1, 2, 0]),
    "aten.reflection_pad3d.default": direct("reflection_pad3d.default", _t(1, 1, 3, 3, 3), [1, 0, 1, 1, 0, 1]),
    "aten.replication_pad1d.default": direct("replication_pad1d.default", _t(1, 2, 5), [1, 2]),
    "aten.replication_pad2d.default": direct("replication_pad2d.default", _t(1, 1, 4, 4), [1, 1, 2, 0]),
    "aten.replication_pad3d.default": direct("replication_pad3d.default", _t(1, 1, 3, 3, 3), [1, 0, 1, 1, 0, 1]),
    "aten.upsample_nearest1d.default": direct("upsample_nearest1d.default", _t(1, 2, 4), [7]),
    "aten.upsample_nearest2d.default": direct("upsample_nearest2d.default", _t(1, 1, 3, 3), [5, 6]),
    "aten.upsample_nearest2d.vec": direct("upsample_nearest2d.vec", _t(1, 1, 3, 3), [5, 6], None),
    "aten.upsample_nearest3d.default": direct("upsample_nearest3d.default", _t(1, 1, 2, 2, 2), [3, 4, 4]),
    "aten.upsample_nearest3d.vec": direct("upsample_nearest3d.vec", _t(1, 1, 2, 2, 2), [3, 4, 4], None),
    "aten.upsample_linear1d.default": direct("upsample_linear1d.default", _t(1, 2, 4), [7], False),
    "aten.upsample_bilinear2d.default": direct("upsample_bilinear2d.default", _t(1, 1, 3, 3), [5, 6], False),
    "aten.upsample_bicubic2d.default": direct("upsample_bicubic2d.default", _t(1, 1, 3, 3), [5, 6], False),
    "aten.upsample_trilinear3d.default": direct("upsample_trilinear3d.default", _t(1, 1, 2, 2, 2), [3, 4, 4],
                                                False),
    **{f"aten.{name}.default": direct(f"{name}.default", _t(2, 3))
       for name in ("gelu_", "hardsigmoid_", "hardswish_", "hardtanh_", "relu_", "selu_", "silu_", "mish_",
                    "elu_", "zero_", "celu", "elu", "hardsigmoid", "mish", "selu", "silu", "softplus")},
    "aten.threshold.default": direct("threshold.default", _t(2, 3), 0.1, 2.0),
    "aten.gelu_backward.default": direct("gelu_backward.default", _t(2, 3), _t(2, 3)),
    "aten.threshold_backward.default": direct("threshold_backward.default", _t(2, 3), _t(2, 3), 0.0),
    "aten.lstm_cell.default": direct("lstm_cell.default", _t(2, 3), [_t(2, 4), _t(2, 4)], *_lstm_params(4, 3, 4)),
    "aten.gru_cell.default": direct("gru_cell.default", _t(2, 3), _t(2, 4), *_lstm_params(3, 3, 4)),
    "aten.rnn_tanh_cell.default": direct("rnn_tanh_cell.default", _t(2, 3), _t(2, 4), *_lstm_params(1, 3, 4)),
    "aten.rnn_relu_cell.default": direct("rnn_relu_cell.default", _t(2, 3), _t(2, 4), *_lstm_params(1, 3, 4)),
    "aten.lstm.input": direct("lstm.input", _t(2, 3, 3), [_t(1, 2, 4), _t(1, 2, 4)], _lstm_params(4, 3, 4),
                              True, 1, 0.0, False, False, True),
    "aten.gru.input": direct("gru.input", _t(2, 3, 3), _t(1, 2, 4), _lstm_params(3, 3, 4), True, 1, 0.0, False,
                             False, True),
    "aten.rnn_tanh.input": direct("rnn_tanh.input", _t(2, 3, 3), _t(1, 2, 4), _lstm_params(1, 3, 4), True, 1, 0.0,
                                  False, False, True),
    "aten.rnn_relu.input": direct("rnn_relu.input", _t(2, 3, 3), _t(1, 2, 4), _lstm_params(1, 3, 4), True, 1, 0.0,
                                  False, False, True),
}
