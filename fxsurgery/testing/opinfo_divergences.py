"""Named divergences of the OpInfo check (fxsurgery.testing.opinfo_check): operators whose
rule is sound but, on some samples, larger than what autodiff sees at every random point.

One table, DIVERGENCES: operator -> (reason, when). `when(node, output)` says whether a
difference at graph node `node` (output index `output`; None for what a parameter meets) is the
case the reason describes; None means every difference at that operator is. A difference that
no entry explains fails the check, so an entry excuses only its own case.
"""
from __future__ import annotations

__all__ = ["DIVERGENCES", "KNOWN_DEFECTS", "explains"]


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _shape(node, i=0):
    val = node.args[i].meta.get("val") if len(node.args) > i and hasattr(node.args[i], "meta") else None
    return tuple(val.shape) if val is not None else ()


def _along_one(node, output):
    """The softmax's axis has one element."""
    shape, dim = _shape(node), _arg(node, 1, "dim", 0)
    return not shape or shape[dim % len(shape)] == 1


def _normalised_one(node, output):
    """The normalised shape holds one element."""
    n = 1
    for s in _arg(node, 1, "normalized_shape", ()):
        n *= s
    return n == 1


def _auxiliary(node, output):
    """An auxiliary result (saved statistics, a backward buffer)."""
    return output is not None and output >= 1


def _result(node, output):
    """A result's dependence (not what a parameter meets)."""
    return output is not None


def _many_factors(node, output):
    n = 1
    for s in _shape(node):
        n *= s
    return n > 16


MAX_REASON = ("a max, min or order statistic takes its winner's derivative: an element that wins at "
              "none of the random points is never seen, though it wins elsewhere")
MASK_REASON = ("the condition is a constant here and the rule does not read its values: an element the "
               "mask replaces keeps the labels of what it replaces")
CONSTANT_SOFTMAX = "a softmax over one element is the constant 1 (log-softmax: 0)"
CONSTANT_NORM = "a normalisation over one element is constant (x - mean(x) = 0; x / rms(x) = sign(x))"
AUXILIARY = ("torch's autograd marks this auxiliary result non-differentiable (output_differentiability), "
             "so autodiff sees no dependence; the rule gives it the statistics' dependence")
PIECEWISE = ("clamp between tensor bounds takes one of three operands per element: a branch that no "
             "random point takes is never seen")

DIVERGENCES: dict = {
    **{op: (MAX_REASON, None) for op in (
        "aten.amax.default", "aten.amin.default", "aten.max.default", "aten.min.default", "aten.max.dim",
        "aten.min.dim", "aten.aminmax.default", "aten.max_pool1d.default", "aten.max_pool2d.default",
        "aten.max_pool3d.default", "aten.max_pool2d_with_indices.default", "aten.max_pool1d_with_indices.default",
        "aten.max_pool3d_with_indices.default", "aten.adaptive_max_pool1d.default",
        "aten.adaptive_max_pool2d.default", "aten.adaptive_max_pool3d.default", "aten.cummax.default",
        "aten.cummin.default", "aten.median.dim", "aten.nanmedian.dim", "aten.kthvalue.default",
        "aten.mode.default", "aten.sort.default", "aten.sort.stable", "aten.topk.default",
        "aten.maximum.default", "aten.minimum.default", "aten.fmax.default", "aten.fmin.default")},
    **{op: (MASK_REASON, None) for op in (
        "aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar",
        "aten.masked_fill.Scalar", "aten.masked_fill.Tensor", "aten.masked_fill_.Scalar",
        "aten.masked_fill_.Tensor")},
    **{op: (CONSTANT_SOFTMAX, _along_one) for op in (
        "aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default",
        "aten._safe_softmax.default", "aten.special_softmax.default")},
    **{op: (CONSTANT_NORM, _normalised_one) for op in (
        "aten.layer_norm.default", "aten.rms_norm.default", "aten._fused_rms_norm.default")},
    "aten.native_layer_norm.default": (CONSTANT_NORM + "; " + AUXILIARY + " (mean, rstd)",
                                       lambda n, k: _auxiliary(n, k) or _normalised_one(n, k)),
    **{op: (AUXILIARY + " (saved mean and inverse std, updated running statistics)", _auxiliary) for op in (
        "aten.native_batch_norm.default", "aten._native_batch_norm_legit.default",
        "aten._native_batch_norm_legit_functional.default", "aten._native_batch_norm_legit_no_training.default",
        "aten.native_group_norm.default")},
    "aten.log_sigmoid_forward.default": (AUXILIARY + " (the buffer for the backward)", _auxiliary),
    "aten.hardtanh.default": ("hardtanh with min_val == max_val is constant",
                              lambda n, k: _arg(n, 1, "min_val", -1.0) == _arg(n, 2, "max_val", 1.0)),
    "aten.clamp.Tensor": (PIECEWISE, None),
    **{op: ("the weights are given as data here: the fused rule models them as parameters (what each "
            "weight element meets is exact) and gives every result every weight's labels", _result)
       for op in ("aten.lstm.input", "aten.gru.input", "aten.rnn_tanh.input", "aten.rnn_relu.input",
                  "aten.lstm_cell.default", "aten.gru_cell.default", "aten.rnn_tanh_cell.default",
                  "aten.rnn_relu_cell.default")},
    "aten.embedding.default": ("the table is given as data here: the rule models it as a parameter (its rows "
                               "meet the index's categories) and gives every result the whole table's labels",
                               _result),
    **{op: ("detach stops derivatives by definition; the value still depends on its operand, as the rule says",
            None) for op in ("aten.detach.default", "aten.detach_.default")},
    **{op: ("a product of more than 16 random factors underflows below the gradient mapping's absolute "
            "tolerance", _many_factors) for op in ("aten.prod.default", "aten.prod.dim_int")},
    "aten.norm.Scalar": ("the 0-norm counts non-zero elements: piecewise constant",
                         lambda n, k: _arg(n, 1, "p", 2) == 0),
    "aten.linalg_vector_norm.default": ("the 0-norm counts non-zero elements: piecewise constant",
                                        lambda n, k: _arg(n, 1, "ord", 2) == 0),
}


def explains(node, output) -> str | None:
    """The reason of the entry that explains a difference at `node` (output `output`), if any."""
    entry = DIVERGENCES.get(str(node.target))
    if entry is None:
        return None
    reason, when = entry
    return f"{node.target}: {reason}" if when is None or when(node, output) else None


# Rules the check finds wrong today, each with what is wrong: the check must still fail on them
# (tests/test_opinfo.py), so that an entry is removed when its rule is fixed.
KNOWN_DEFECTS: dict[str, str] = {
    "aten.nonzero.default": ("the no-dependence rule builds labels of the result's shape, which torch.export "
                             "leaves data-dependent (an unbacked size): GuardOnDataDependentSymNode"),
    "aten.tensor_split.indices": ("called with its indices as a tensor, torch.export reads them as data-dependent "
                                  "sizes, and the movement rule cannot build labels of an unbacked shape"),
}
