"""The gradient mapping: the interaction map computed with autodiff alone.

This package is the independent witness of the boolean mapping. It never reads a label rule:
it runs the captured ATen graph on random numbers (float64, CPU) and reads the relation off
derivatives.

- **Labelled positions.** Every labelled input gets a perturbation variable `z`: a float input
  is `x + z`; an input with `Categories` is replaced by its one-hot relaxation, `onehot(idx) + z`
  of shape `idx.shape + (n_categories,)`, and every lookup whose index is that input (or was moved
  from it by data-movement operators) is computed as `onehot(idx) @ table`. A label is a set of
  positions of `z`: the slice at position i along the `Features` axis, the one-hot coordinate c
  (at every position) for a category, the whole tensor for an input without a description.
  Each label becomes one direction in `z`-space: random normal weights on its positions, zero
  elsewhere (random rather than all-ones weights, so that a structural invariance such as the
  shift invariance of a normalisation cannot cancel a derivative along the label).
- **Dependence.** `D(v)` is the non-zero pattern of the forward derivative `dv/dz` along each
  label's direction (vmapped over labels with `torch.func`).
- **Meeting.** A *meeting node* consumes a parameter-derived value (computed from parameters,
  buffers and constants only) together with a data-dependent one. For each meeting node N, the
  parameters reach N only through its parameter-derived operands (a private copy `theta_N` of the
  parameters is fed through the parameter-only subgraph to N), while its data operands are the
  values of the rest of the graph at the random point. With a random cotangent `c_N`,
        M_N = d/dz [ d<c_N, N(theta_N, u(z))> / d theta_N ]
  and parameter element p meets label f iff M_N[p, f] is non-zero (relative to the node's
  scale) for some node and some trial. All meeting nodes are summed into one scalar (each with
  its own parameter copy, so they cannot cancel) and differentiated with one vmapped
  forward-over-reverse pass per trial: the cost is about (#labels) forward-over-reverse passes.

An operation is a graph node: a fused operator (`aten.lstm.input`, `aten.gru.input`) is one
operation, inside which every weight and bias enters non-linearly and so meets what the op's
data depend on. Two operators run through a substitute, still as one node: batch norm through
its decomposition (autograd refuses its running statistics as differentiable operands), and
attention with the math kernel (the fused CPU kernels have no forward-mode derivative). A
category index converted to float is the linear relaxation `onehot(idx) @ (0, 1, ..., n-1)`.

Parameters and buffers are replaced by random tensors of their shapes (normal; buffers whose
name holds "var" log-normal, hence positive), float inputs are normal, category inputs uniform
over their categories, so the model may live on the meta device. Non-float buffers and
constants keep their values (zeros on the meta device), since they are indices and counters.

At generic points the result equals the boolean map; it is contained in it everywhere. It can
be smaller where a value is zero by coincidence (`x - x`, an explicitly zero weight, a ReLU
branch the random points never take, a max that always picks the same entity, one recurrent
step from a zero initial state, category 0 read as the number 0): see the README's known divergences and
tests/test_gradient_map.py, which names each.

Modules, from the bottom up:

- errors.py         GradientMapError; how nodes and operators are named
- dtypes.py         float64 on the CPU
- categories.py     the one-hot relaxation of Categories inputs
- substitutes.py    in-place operators, batch norm, attention run through a substitute
- random_points.py  the labels, their directions in z-space, the random points
- evaluation.py     the graph run at a point plus z
- graph.py          `_Graph`: the graph classified (data, parameter-derived, meeting nodes)
- nonzero.py        tolerances: derivatives read as a non-zero pattern
- meeting.py        the forward-over-reverse mixed derivatives of the meeting nodes
- dependence.py     forward derivatives of every node; comparison with the boolean mapping
- assemble.py       the InteractionMap built from the meeting masks
"""
from .assemble import gradient_interaction_map  # noqa: F401
from .dependence import GradientDependence, dependence_difference, gradient_dependence  # noqa: F401
from .errors import GradientMapError  # noqa: F401

__all__ = ["gradient_interaction_map", "gradient_dependence", "GradientDependence",
           "GradientMapError", "dependence_difference"]
