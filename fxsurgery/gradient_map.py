"""The gradient mapping: the interaction map computed with autodiff alone.

This module is the independent witness of the boolean mapping. It never reads a label rule:
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
step from a zero initial state, category 0 read as the number 0): see DESIGN.md and
tests/test_gradient_map.py, which names each.
"""
from __future__ import annotations

import contextlib
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.export.graph_signature import OutputKind
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .capture import Traced, wrapped_call
from .interaction_map import InteractionMap, ParamEntry
from .label_tensor import compress
from .labels import Categories, Features, Label, SetPool
from .terms import Terms

__all__ = ["gradient_interaction_map", "gradient_dependence", "GradientDependence",
           "GradientMapError", "dependence_difference"]

aten = torch.ops.aten

# Non-zero means |M| > RELATIVE_TOL * (largest |M| of the node in that trial), and > ABSOLUTE_TOL.
RELATIVE_TOL = 1e-9
ABSOLUTE_TOL = 1e-12
# Labels differentiated at once (the vmap chunk): bounds memory at about this many tangents.
CHUNK = 64


class GradientMapError(RuntimeError):
    """The gradient mapping cannot run on this graph (the node and operator are named)."""


# Operators that only move elements (the values of an index tensor moved from a category input
# are still category values, so the one-hot relaxation follows them). Schema names.
_MOVES = frozenset(
    "aten::" + n for n in (
        "view _unsafe_view reshape permute transpose t expand expand_as unsqueeze squeeze slice "
        "select cat concat stack hstack vstack split split_with_sizes chunk unbind flatten unflatten "
        "flip roll repeat repeat_interleave narrow movedim swapaxes tile diagonal unfold view_as "
        "reshape_as broadcast_to rot90 tensor_split alias clone contiguous detach lift_fresh_copy "
        "_to_copy to type_as index index_select gather take take_along_dim _unsafe_index "
        "alias_copy view_copy permute_copy slice_copy select_copy unsqueeze_copy squeeze_copy "
        "expand_copy t_copy transpose_copy unbind_copy split_copy split_with_sizes_copy "
        "atleast_1d atleast_2d atleast_3d").split())
# Operators whose integer operand selects entries of another operand (schema name -> the argument
# positions holding indices).
_LOOKUPS = {"aten::embedding": (1,), "aten::index": (1,), "aten::index_select": (2,),
            "aten::gather": (2,), "aten::take": (1,), "aten::take_along_dim": (1,),
            "aten::one_hot": (0,), "aten::_unsafe_index": (1,), "aten::embedding_bag": (1,),
            "aten::_embedding_bag": (1,), "aten::index_put": (1,), "aten::index_put_": (1,),
            "aten::scatter": (2,), "aten::scatter_add": (2,), "aten::scatter_reduce": (2,),
            "aten::index_add": (2,), "aten::index_copy": (2,), "aten::index_fill": (2,)}


def _where(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return f"node %{node.name}" + (f" ({path})" if path else "")


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return "aten." + target._schema.name.split("::")[-1] if target.namespace == "aten" else str(target)
    return getattr(target, "__name__", str(target))


def _schema(target) -> str | None:
    return target._schema.name if isinstance(target, torch._ops.OpOverload) else None


def _is_float(v) -> bool:
    return isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.dtype.is_complex)


@dataclass
class _Cat:
    """An integer tensor whose elements were moved from a `Categories` input: its values, and
    for each element its flat position in that input (where its one-hot row lives)."""
    values: torch.Tensor
    pos: torch.Tensor
    input: str


@dataclass
class _Point:
    """One random point: placeholder values, the one-hot tensors of category inputs, the
    perturbation variables' shapes and the cotangents of the meeting nodes."""
    values: dict
    onehot: dict
    cotangents: dict


class _Graph:
    """The graph, classified: inputs, state, data-dependent and parameter-derived nodes, the
    meeting nodes, and the labelled directions."""

    def __init__(self, traced: Traced):
        self.traced = traced
        self.gm = traced.graph_module
        self.nodes = list(self.gm.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.kind: dict[str, str] = {}
        self.state: dict[str, str] = {}
        self.input_of: dict[str, str] = {}     # placeholder -> user input name
        for n in self.nodes:
            if n.op != "placeholder":
                continue
            kind, name = traced.placeholders.get(n.name, ("input", n.name))
            if kind in ("parameter", "buffer"):
                name = _canonical(traced, name)   # tied parameters: one name, one tensor
            self.kind[n.name] = kind
            self.state[n.name] = name
        for name, node in zip(traced.input_names, traced.input_nodes):
            self.input_of[node] = name
        self._check_outputs()
        self._functionalise()
        self._classify()
        self._check_indices()
        self._substitute()
        self.labels = self._labels()
        self.cat_outputs: set = set()

    # structure --------------------------------------------------------------------------
    def _check_outputs(self) -> None:
        out = next(n for n in self.nodes if n.op == "output")
        flat = tree_flatten(out.args[0])[0] if out.args else []
        specs = self.traced.program.graph_signature.output_specs
        for i, (spec, arg) in enumerate(zip(specs, flat)):
            if spec.kind != OutputKind.USER_OUTPUT:
                continue
            val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg
            if not isinstance(val, torch.Tensor):
                where = f" (from {_where(arg)})" if isinstance(arg, torch.fx.Node) else ""
                raise GradientMapError(
                    f"model output {i} is {type(val).__name__} {val!r}{where}, not a tensor: the "
                    "gradient mapping needs the model to return a tensor or a tuple of tensors")

    def _functionalise(self) -> None:
        """In-place operators are run out of place (each meeting node is evaluated twice, and
        vmap cannot write into an unbatched tensor); their result replaces the operand."""
        self.functional: dict[str, Any] = {}
        self.inplace: set[str] = set()
        for n in self.nodes:
            t = n.target
            if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
                continue
            args = t._schema.arguments
            if not (args and args[0].alias_info is not None and args[0].alias_info.is_write):
                continue
            base = t._schema.name.split("::")[-1]
            packet = getattr(aten, base.rstrip("_"), None) if base.endswith("_") else None
            overload = getattr(packet, t._overloadname, None) if packet is not None else None
            if overload is None:
                raise GradientMapError(f"{_op_name(t)} at {_where(n)} writes into its operand and has no "
                                       "out-of-place variant the gradient mapping could run instead")
            self.functional[n.name] = overload
            if n.args and isinstance(n.args[0], torch.fx.Node):
                self.inplace.add(n.name)

    def _classify(self) -> None:
        """data: depends on a user input; param: computed from parameters/buffers/constants
        with at least one float parameter or buffer among its ancestors."""
        self.data: set[str] = set()
        self.param: set[str] = set()
        self.param_states: dict[str, set[str]] = {}   # param-derived node -> float states behind it
        for n in self.nodes:
            if n.op == "placeholder":
                kind = self.kind[n.name]
                if kind == "input":
                    self.data.add(n.name)
                elif kind in ("parameter", "buffer") and _is_float(n.meta.get("val")):
                    self.param.add(n.name)
                    self.param_states[n.name] = {self.state[n.name]}
                continue
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            ins = n.all_input_nodes
            if any(a.name in self.data for a in ins):
                self.data.add(n.name)
            elif any(a.name in self.param for a in ins):
                self.param.add(n.name)
                self.param_states[n.name] = set().union(*(self.param_states.get(a.name, set()) for a in ins))
        # Meeting nodes: data-dependent, with a parameter-derived operand.
        self.meeting: dict[str, list[str]] = {}
        for n in self.nodes:
            if n.op == "call_function" and n.name in self.data:
                states: set[str] = set()
                for a in n.all_input_nodes:
                    if a.name in self.param:
                        states |= self.param_states[a.name]
                if states:
                    self.meeting[n.name] = sorted(states)

    def _substitute(self) -> None:
        """Operators autograd cannot differentiate in an operand the map needs are run through
        their decomposition, still as one node: batch norm's running statistics (eval mode) are
        operands `native_batch_norm` refuses to differentiate."""
        self.impl: dict[str, tuple] = {}
        for n in self.nodes:
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) \
                    and _schema(n.target) in _SUBSTITUTED:
                flat = tree_flatten((n.args, n.kwargs))[0]
                positions = [i for i, a in enumerate(flat) if isinstance(a, torch.fx.Node)]
                self.impl[n.name] = (self._decompose(n), positions)

    def _decompose(self, node: torch.fx.Node) -> torch.fx.GraphModule:
        from torch.fx.experimental.proxy_tensor import make_fx
        flat, spec = tree_flatten((node.args, node.kwargs))
        positions = [i for i, a in enumerate(flat) if isinstance(a, torch.fx.Node)]
        examples = []
        for i in positions:
            val = flat[i].meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise GradientMapError(f"{_op_name(node.target)} at {_where(node)} has an operand "
                                       f"%{flat[i].name} that is not a tensor; cannot decompose it")
            dtype = torch.float64 if val.dtype.is_floating_point else val.dtype
            examples.append(torch.zeros(tuple(val.shape), dtype=dtype))

        def fn(*tensors):
            vals = list(flat)
            for i, t in zip(positions, tensors):
                vals[i] = t
            a, k = _to_cpu64(tree_unflatten(vals, spec))
            return node.target(*_without_updated_statistics(node.target, list(a), k), **k)

        try:
            with _quiet():
                return make_fx(fn, decomposition_table=_decompositions(), tracing_mode="fake")(*examples)
        except Exception as err:  # noqa: BLE001 - re-raised with the node named
            raise GradientMapError(f"{_op_name(node.target)} at {_where(node)} could not be decomposed into "
                                   f"the operations autograd differentiates: {type(err).__name__}: {err}") from err

    def _check_indices(self) -> None:
        """Integer values that index something must be moved from a Categories input."""
        desc = self.traced.descriptions
        origin: dict[str, tuple[frozenset, str | None]] = {}   # int node -> (int inputs, first non-move node)
        for n in self.nodes:
            val = n.meta.get("val")
            if n.op == "placeholder":
                if self.kind[n.name] == "input" and isinstance(val, torch.Tensor) and not _is_float(val):
                    origin[n.name] = (frozenset([self.input_of[n.name]]), None)
                continue
            if n.op != "call_function":
                continue
            name = _schema(n.target)
            if name in _LOOKUPS:
                flat_args = list(n.args) + list(n.kwargs.values())
                for k in _LOOKUPS[name]:
                    if k >= len(flat_args):
                        continue
                    for a in tree_flatten(flat_args[k])[0]:
                        if isinstance(a, torch.fx.Node) and a.name in origin:
                            inputs, via = origin[a.name]
                            for inp in sorted(inputs):
                                if not isinstance(desc.get(inp), Categories):
                                    raise GradientMapError(
                                        f"integer input {inp!r} reaches {_op_name(n.target)} at {_where(n)}: "
                                        "describe it with fs.Categories, so that the gradient mapping can "
                                        "differentiate the lookup through its one-hot relaxation")
                            if via is not None:
                                raise GradientMapError(
                                    f"the index of {_op_name(n.target)} at {_where(n)} is computed from "
                                    f"Categories input {sorted(inputs)[0]!r} by "
                                    f"{_op_name(self.by_name[via].target)} at node %{via}, which is not "
                                    "data movement: its one-hot relaxation is not defined")
                            if name not in ("aten::embedding", "aten::index", "aten::index_select",
                                            "aten::one_hot", "aten::_unsafe_index"):
                                raise GradientMapError(
                                    f"{_op_name(n.target)} at {_where(n)} is indexed by Categories input "
                                    f"{sorted(inputs)[0]!r}; the gradient mapping relaxes only embedding, "
                                    "index, index_select and one_hot lookups")
            ins = [origin[a.name] for a in n.all_input_nodes if a.name in origin]
            if not ins:
                continue
            outs = [v for v in tree_flatten(val)[0] if isinstance(v, torch.Tensor)]
            if not outs or all(_is_float(v) for v in outs):
                continue
            inputs = frozenset().union(*(i for i, _ in ins))
            via = next((v for _, v in ins if v is not None), None)
            if via is None and name not in _MOVES:
                via = n.name
            origin[n.name] = (inputs, via)

    def _labels(self) -> list[tuple[Label, str, Any]]:
        """(label, input name, where) for every label, in the order of the inputs."""
        out = []
        for name, node in zip(self.traced.input_names, self.traced.input_nodes):
            desc = self.traced.descriptions.get(name)
            if isinstance(desc, Features):
                out += [(Label("feature", name, f, i), name, i) for i, f in enumerate(desc.names)]
            elif isinstance(desc, Categories):
                out += [(Label("category", name, c, i), name, i) for i, c in enumerate(desc.names)]
            else:
                out.append((Label("input", name, name, 0), name, None))
        return out

    # random points ----------------------------------------------------------------------
    def draw(self, gen: torch.Generator) -> _Point:
        values, onehot, drawn = {}, {}, {}
        constants = self.traced.program.constants
        model_state = {**dict(self.traced.model.named_parameters(remove_duplicate=False)),
                       **dict(self.traced.model.named_buffers(remove_duplicate=False))}
        for n in self.nodes:
            if n.op != "placeholder":
                continue
            val = n.meta.get("val")
            kind, state = self.kind[n.name], self.state[n.name]
            if not isinstance(val, torch.Tensor):
                values[n.name] = val
                continue
            shape = tuple(val.shape)
            if kind == "input":
                name = self.input_of[n.name]
                desc = self.traced.descriptions.get(name)
                if isinstance(desc, Categories):
                    idx = torch.randint(0, len(desc), shape, generator=gen, dtype=torch.int64)
                    values[n.name] = idx.to(val.dtype)
                    onehot[name] = torch.nn.functional.one_hot(idx, len(desc)).to(torch.float64)
                elif _is_float(val):
                    values[n.name] = torch.randn(shape, generator=gen, dtype=torch.float64)
                else:
                    values[n.name] = self._fixed(self._example(name), val)
            elif kind in ("parameter", "buffer"):
                if state in drawn:
                    values[n.name] = drawn[state]
                elif _is_float(val):
                    r = torch.randn(shape, generator=gen, dtype=torch.float64)
                    values[n.name] = (0.5 * r).exp() if kind == "buffer" and "var" in state.rsplit(".", 1)[-1] else r
                else:
                    values[n.name] = self._fixed(model_state.get(state), val)
                drawn[state] = values[n.name]
            else:
                const = constants.get(state)
                if _is_float(val) and (not isinstance(const, torch.Tensor) or const.device.type == "meta"):
                    values[n.name] = torch.randn(shape, generator=gen, dtype=torch.float64)
                else:
                    values[n.name] = self._fixed(const, val)
        return _Point(values, onehot, {})

    def _example(self, name: str):
        i = self.traced.input_names.index(name)
        return self.traced.inputs[i] if i < len(self.traced.inputs) else None

    @staticmethod
    def _fixed(tensor, val: torch.Tensor) -> torch.Tensor:
        """A non-differentiable value: the real one when it exists, else zeros."""
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta" and tuple(tensor.shape) == tuple(val.shape):
            t = tensor.detach().to("cpu")
            return t.to(torch.float64) if t.dtype.is_floating_point else t.clone()
        dtype = torch.float64 if val.dtype.is_floating_point else val.dtype
        return torch.zeros(tuple(val.shape), dtype=dtype)

    def z_shapes(self, point: _Point) -> dict[str, tuple]:
        """Shapes of the perturbation variables, by input name (differentiable inputs only)."""
        shapes = {}
        for node, name in self.input_of.items():
            if name in point.onehot:
                shapes[name] = tuple(point.onehot[name].shape)
            elif _is_float(point.values.get(node)):
                shapes[name] = tuple(point.values[node].shape)
        return shapes

    def directions(self, point: _Point, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One direction per label: random normal weights on the label's positions."""
        shapes = self.z_shapes(point)
        L = len(self.labels)
        dirs = {name: torch.zeros((L,) + s, dtype=torch.float64) for name, s in shapes.items()}
        for k, (label, name, where) in enumerate(self.labels):
            if name not in shapes:
                continue   # an integer input without Categories: nothing to differentiate
            shape = shapes[name]
            w = torch.randn(shape, generator=gen, dtype=torch.float64)
            if label.kind == "feature":
                dim = self.traced.descriptions[name].dim % len(shape)
                dirs[name][k].select(dim, where).copy_(w.select(dim, where))
            elif label.kind == "category":
                dirs[name][k][..., where] = w[..., where]
            else:
                dirs[name][k] = w
        return dirs

    # running the graph ------------------------------------------------------------------
    def forward(self, point: _Point, z: dict, thetas: dict | None = None, collect: bool = False):
        """Runs the graph at `point + z`. With `thetas` ({meeting node: {state: tensor}}),
        returns the sum of <c_N, N(theta_N, u(z))> over the meeting nodes; with `collect`, the
        value of every node (category-derived indices as their one-hot rows)."""
        env: dict[str, Any] = {}
        onehot = {name: oh + z[name] for name, oh in point.onehot.items()}
        total = None
        for n in self.nodes:
            if n.op == "placeholder":
                v = point.values[n.name]
                if self.kind[n.name] == "input":
                    name = self.input_of[n.name]
                    if name in onehot:
                        pos = torch.arange(v.numel(), dtype=torch.int64).reshape(v.shape)
                        v = _Cat(v, pos, name)
                    elif name in z:
                        v = v + z[name]
                env[n.name] = v
            elif n.op == "get_attr":
                obj = self.gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                env[n.name] = obj
            elif n.op == "call_function":
                args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env[a.name])
                env[n.name] = self.call(n, args, kwargs, onehot)
                if n.name in self.inplace:
                    # An in-place operator changes its first argument for every later reader.
                    env[n.args[0].name] = env[n.name]
                if thetas is not None and n.name in thetas:
                    memo: dict[str, Any] = {}
                    theta = thetas[n.name]
                    args2, kwargs2 = torch.fx.node.map_arg(
                        (n.args, n.kwargs),
                        lambda a: self._param_value(a, theta, memo, env, onehot) if a.name in self.param else env[a.name])
                    out = self.call(n, args2, kwargs2, onehot)
                    outs = [o for o in tree_flatten(out)[0] if isinstance(o, (torch.Tensor, _Cat))]
                    for c, o in zip(point.cotangents[n.name], outs):
                        if c is not None and _is_float(o):
                            term = (c * o).sum()
                            total = term if total is None else total + term
            elif n.op == "output":
                break
            else:
                raise GradientMapError(f"{n.op} nodes are not supported ({_where(n)})")
        if thetas is not None:
            return total if total is not None else torch.zeros((), dtype=torch.float64)
        if collect:
            # Category-moved indices are represented by their one-hot rows (a trailing axis of
            # categories); their names go to self.cat_outputs as (node, output) pairs.
            out = {}
            for name, v in env.items():
                if isinstance(v, (tuple, list)):
                    reps = []
                    for k, x in enumerate(v):
                        if isinstance(x, _Cat):
                            self.cat_outputs.add((name, k))
                            reps.append(_gather_rows(onehot[x.input], x.pos))
                        elif _is_float(x):
                            reps.append(x)
                        else:
                            reps = None
                            break
                    if reps:
                        out[name] = tuple(reps)
                elif isinstance(v, _Cat):
                    self.cat_outputs.add((name, None))
                    out[name] = _gather_rows(onehot[v.input], v.pos)
                elif _is_float(v):
                    out[name] = v
            return out
        return env

    def _param_value(self, node, theta, memo, env, onehot):
        """The parameter-derived value of `node` recomputed from the parameter copy `theta`."""
        if node.name in memo:
            return memo[node.name]
        if node.name not in self.param:
            return env[node.name]
        if node.op == "placeholder":
            v = theta.get(self.state[node.name], env[node.name])
        else:
            args, kwargs = torch.fx.node.map_arg(
                (node.args, node.kwargs), lambda a: self._param_value(a, theta, memo, env, onehot))
            v = self.call(node, args, kwargs, onehot)
        memo[node.name] = v
        return v

    def call(self, node, args, kwargs, onehot):
        target = self.functional.get(node.name, node.target)
        try:
            if target is operator.getitem:
                return args[0][args[1]]
            args, kwargs = _to_cpu64((args, kwargs))
            flat = tree_flatten((args, kwargs))[0]
            if any(isinstance(a, _Cat) for a in flat):
                return self._call_cat(node, target, args, kwargs, onehot)
            if node.name in self.impl:
                gm, positions = self.impl[node.name]
                return gm(*[flat[i] for i in positions])
            wrapped = wrapped_call(target, args)
            if wrapped is not None and not kwargs:
                # A no_grad / autocast region is run as if inlined: under no_grad its
                # derivatives, which this mapping reads, would vanish.
                return wrapped[0](*wrapped[1])
            return target(*args, **kwargs)
        except GradientMapError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the node and operator named
            raise GradientMapError(f"{_op_name(target)} at {_where(node)} could not be differentiated: "
                                   f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err

    def _call_cat(self, node, target, args, kwargs, onehot):
        """An operator with a category-derived index operand: lookups become one-hot products,
        data movement moves the positions along, anything else sees the plain values."""
        name = _schema(target)
        if name == "aten::embedding" and isinstance(args[1], _Cat):
            return _onehot_lookup(node, args[0], args[1], onehot)
        if name in ("aten::index", "aten::_unsafe_index") and any(isinstance(i, _Cat) for i in args[1]):
            indices = list(args[1])
            if len(indices) != 1 or isinstance(args[0], _Cat):
                raise GradientMapError(f"{_op_name(node.target)} at {_where(node)} indexes with Categories "
                                       "input values in a form the one-hot relaxation does not cover "
                                       "(only table[idx] along the first axis)")
            return _onehot_lookup(node, args[0], indices[0], onehot)
        if name == "aten::index_select" and isinstance(args[2], _Cat):
            if args[1] % args[0].dim() != 0:
                raise GradientMapError(f"{_op_name(node.target)} at {_where(node)} selects category rows "
                                       "along an axis other than the first; not relaxed")
            return _onehot_lookup(node, args[0], args[2], onehot)
        if name == "aten::one_hot" and isinstance(args[0], _Cat):
            num = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
            rows = _gather_rows(onehot[args[0].input], args[0].pos)
            return _pad_last(rows, num if num >= 0 else rows.shape[-1])
        flat, spec = tree_flatten((args, kwargs))
        cats = [a for a in flat if isinstance(a, _Cat)]
        ints = [a for a in flat if isinstance(a, torch.Tensor) and not _is_float(a)]
        values = tree_unflatten([a.values if isinstance(a, _Cat) else a for a in flat], spec)
        out = target(*values[0], **values[1])
        same_input = len({c.input for c in cats}) == 1
        moves = name in _MOVES and same_input and not (name in ("aten::cat", "aten::concat", "aten::stack") and ints)
        if name in ("aten::index", "aten::index_select", "aten::gather", "aten::take", "aten::take_along_dim",
                    "aten::_unsafe_index") and not isinstance(flat[0], _Cat):
            moves = False
        if not moves:
            return out
        conversion = name in ("aten::_to_copy", "aten::to", "aten::type_as")
        if conversion and _is_float(out):
            # The category's value as a number: onehot(idx) @ (0, 1, ..., n-1), linear in the
            # one-hot coordinates (category 0 has derivative 0 here: a zero by coincidence).
            rows = _gather_rows(onehot[cats[0].input], cats[0].pos)
            return torch.tensordot(rows, torch.arange(rows.shape[-1], dtype=rows.dtype), dims=1).to(out.dtype)
        pos_args = tree_unflatten([a.pos if isinstance(a, _Cat) else a for a in flat], spec)
        if conversion:
            pos_out = cats[0].pos
            outs = [out]
            poss = [pos_out]
        else:
            pos = target(*pos_args[0], **pos_args[1])
            outs, out_spec = tree_flatten(out)
            poss = tree_flatten(pos)[0]
        res = []
        for o, p in zip(outs, poss):
            if isinstance(o, torch.Tensor) and not _is_float(o) and o.dtype != torch.bool:
                res.append(_Cat(o, p, cats[0].input))
            else:
                res.append(o)
        if conversion:
            return res[0]
        return tree_unflatten(res, out_spec)


_DECOMPOSITIONS: dict | None = None


def _decompositions() -> dict:
    """Batch norm written out, so that its running statistics are differentiable operands."""
    global _DECOMPOSITIONS
    if _DECOMPOSITIONS is None:
        from torch._decomp import get_decompositions
        names = ("native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                 "_native_batch_norm_legit_functional", "_batch_norm_with_update", "_batch_norm_no_update",
                 "_batch_norm_with_update_functional", "cudnn_batch_norm", "miopen_batch_norm")
        ops = [getattr(aten, n) for n in names if hasattr(aten, n)]
        _DECOMPOSITIONS = get_decompositions(ops)
    return _DECOMPOSITIONS


_SUBSTITUTED = frozenset("aten::" + n for n in (
    "batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
    "_batch_norm_impl_index", "_batch_norm_no_update", "instance_norm"))


def _without_updated_statistics(target, args: list, kwargs: dict) -> list:
    """A normalisation that uses its batch statistics (training mode) only updates its running
    statistics, which its output does not read: they are left out, so that the decomposition
    writes into no operand (a transform refuses in-place writes into captured tensors)."""
    schema = target._schema.arguments
    names = [a.name for a in schema]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if not (bound.get("training") is True or bound.get("use_input_stats") is True):
        return args
    for stat in ("running_mean", "running_var"):
        if stat in names and isinstance(schema[names.index(stat)].type, torch.OptionalType):
            i = names.index(stat)
            if i < len(args):
                args[i] = None
            elif stat in kwargs:
                kwargs[stat] = None
    return args


def _canonical(traced: Traced, name: str) -> str:
    """The one name a group of tied parameters is known by."""
    if hasattr(traced, "canonical"):
        return traced.canonical(name)
    return next((names[0] for names in traced.aliases.values() if name in names), name)


def _to_cpu64(tree):
    """Creation arguments: every device becomes the CPU, every float dtype float64."""
    def fix(v):
        if isinstance(v, torch.device):
            return torch.device("cpu")
        if isinstance(v, torch.dtype) and v.is_floating_point:
            return torch.float64
        return v
    return tree_map(fix, tree)


def _gather_rows(onehot: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    V = onehot.shape[-1]
    return onehot.reshape(-1, V)[pos.reshape(-1)].reshape(tuple(pos.shape) + (V,))


def _pad_last(rows: torch.Tensor, n: int) -> torch.Tensor:
    V = rows.shape[-1]
    if n < V:
        raise ValueError(f"{V} categories but only {n} one-hot classes")
    if n == V:
        return rows
    return torch.cat([rows, rows.new_zeros(tuple(rows.shape[:-1]) + (n - V,))], -1)


def _onehot_lookup(node, table, index: _Cat, onehot):
    """`table[index]` as `onehot(index) @ table`."""
    rows = _gather_rows(onehot[index.input], index.pos)
    V = rows.shape[-1]
    if isinstance(table, _Cat) or not isinstance(table, torch.Tensor):
        raise GradientMapError(f"{_op_name(node.target)} at {_where(node)}: the table is not a float tensor")
    if table.shape[0] < V:
        raise GradientMapError(f"Categories input {index.input!r} names {V} categories, but "
                               f"{_op_name(node.target)} at {_where(node)} looks up a table of "
                               f"{table.shape[0]} rows")
    return torch.tensordot(rows.to(table.dtype), table[:V], dims=1)


# the two passes ---------------------------------------------------------------------------

def _cotangents(graph: _Graph, point: _Point, gen: torch.Generator) -> None:
    env = graph.forward(point, {k: torch.zeros(s, dtype=torch.float64) for k, s in graph.z_shapes(point).items()})
    for name in graph.meeting:
        outs = [o for o in tree_flatten(env[name])[0] if isinstance(o, (torch.Tensor, _Cat))]
        point.cotangents[name] = [torch.randn(tuple(o.shape), generator=gen, dtype=torch.float64)
                                  if isinstance(o, torch.Tensor) and _is_float(o) else None for o in outs]


def _finite(t: torch.Tensor, notes: list, where: str) -> torch.Tensor:
    """|t|, with non-finite derivatives read as zero (and said so in the notes)."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        msg = (f"non-finite derivatives at {where} were read as zero (a random point fell outside the "
               "operator's domain)")
        if msg not in notes:
            notes.append(msg)
        t = torch.where(bad, torch.zeros((), dtype=t.dtype), t)
    return t.abs()


def _threshold(scale: float) -> float:
    return max(RELATIVE_TOL * scale, ABSOLUTE_TOL)


def _nonzero(t: torch.Tensor, notes: list, where: str) -> torch.Tensor:
    """Non-zero pattern of a batch of derivatives, relative to their largest magnitude."""
    a = _finite(t, notes, where)
    return a > _threshold(float(a.max()) if a.numel() else 0.0)


@contextlib.contextmanager
def _quiet():
    """Transforms run with the math attention kernel (the fused CPU kernels have no forward-mode
    derivative) and without functorch's performance warnings."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with warnings.catch_warnings(), sdpa_kernel([SDPBackend.MATH]):
        warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
        warnings.filterwarnings("ignore", message=".*_flat_weights.*")
        yield


def _meeting_masks(graph: _Graph, trials: int, seed: int, notes: list) -> dict[str, torch.Tensor]:
    """Per parameter state name: bool (labels, *shape): element meets label."""
    masks: dict[str, torch.Tensor] = {}
    if not graph.meeting or not graph.labels:
        return masks
    gen = torch.Generator().manual_seed(seed)
    for trial in range(trials):
        point = graph.draw(gen)
        _cotangents(graph, point, gen)
        dirs = graph.directions(point, gen)
        if not dirs:
            return masks   # no differentiable input: nothing is met
        z0 = {k: torch.zeros(v.shape[1:], dtype=torch.float64) for k, v in dirs.items()}
        state_of = {graph.state[n]: n for n in graph.param if n in graph.kind}
        thetas = {node: {s: point.values[state_of[s]] for s in states} for node, states in graph.meeting.items()}

        def f(th, z):
            return graph.forward(point, z, thetas=th)

        def mixed(v):
            g = lambda z: torch.func.grad(f, argnums=0)(thetas, z)  # noqa: E731
            return torch.func.jvp(g, (z0,), (v,))[1]

        with _quiet():
            M = torch.func.vmap(mixed, chunk_size=CHUNK, randomness="same")(dirs)
        for node, per_state in M.items():
            # One scale per node and trial: every parameter it consumes, every label.
            mags = {state: _finite(t, notes, _where(graph.by_name[node])) for state, t in per_state.items()}
            scale = max((float(a.max()) for a in mags.values() if a.numel()), default=0.0)
            for state, a in mags.items():
                nz = a > _threshold(scale)
                masks[state] = masks[state] | nz if state in masks else nz
    return masks


@dataclass
class GradientDependence:
    """Per graph node, the non-zero pattern of d value / dz along each label: a bool tensor of
    shape (*value.shape, n_labels) (a tuple of them for a node with several outputs). Nodes
    holding neither floats nor category-moved indices are left out (their derivative is zero)."""
    labels: list
    masks: dict

    def __getitem__(self, name):
        return self.masks[name]

    def __contains__(self, name) -> bool:
        return name in self.masks

    def __iter__(self):
        return iter(self.masks)

    def items(self):
        return self.masks.items()

    def label_sets(self, name: str, index: tuple, output: int | None = None) -> set:
        m = self.masks[name]
        m = m[output] if output is not None else m
        return {self.labels[i] for i in torch.nonzero(m[tuple(index)]).reshape(-1).tolist()}


def gradient_dependence(traced: Traced, trials: int = 4, seed: int = 0) -> GradientDependence:
    """The dependence D(v) of every node's value, from forward-mode derivatives."""
    graph = _Graph(traced)
    notes: list[str] = []
    return GradientDependence([l for l, _, _ in graph.labels], _dependence(graph, trials, seed, notes))


def _dependence(graph: _Graph, trials: int, seed: int, notes: list) -> dict:
    gen = torch.Generator().manual_seed(seed + 7919)
    masks: dict = {}
    if not graph.labels:
        return masks
    for trial in range(trials):
        point = graph.draw(gen)
        dirs = graph.directions(point, gen)
        if not dirs:
            return masks
        z0 = {k: torch.zeros(v.shape[1:], dtype=torch.float64) for k, v in dirs.items()}

        def tangents(v):
            return torch.func.jvp(lambda z: graph.forward(point, z, collect=True), (z0,), (v,))[1]

        with _quiet():
            T = torch.func.vmap(tangents, chunk_size=CHUNK, randomness="same")(dirs)

        def pattern(name, k, x):
            # (labels, *shape[, categories]) -> (*shape, labels)
            nz = _nonzero(x, notes, f"node %{name}")
            if (name, k) in graph.cat_outputs:
                nz = nz.any(-1)
            return nz.movedim(0, -1)

        for name, t in T.items():
            if isinstance(t, tuple):
                m = tuple(pattern(name, k, x) for k, x in enumerate(t))
                masks[name] = tuple(a | b for a, b in zip(masks[name], m)) if name in masks else m
            else:
                m = pattern(name, None, t)
                masks[name] = masks[name] | m if name in masks else m
    return masks


def dependence_difference(dep: GradientDependence, traced: Traced, pool: SetPool, subset: bool = False) -> list:
    """Compares gradient dependence with the boolean mapping's `node.meta["fxsurgery"]["deps"]`
    (written by `fs.interaction_map(traced)`, whose map's `pool` the ids refer to). Returns
    (node, output, element index, only in gradient, only in boolean) for the first differing
    element of each differing node; with `subset`, only labels the gradient has and the boolean
    mapping lacks count."""
    rows = []
    index = {l: k for k, l in enumerate(dep.labels)}
    for n in traced.graph.nodes:
        if n.name not in dep.masks:
            continue
        meta = n.meta.get("fxsurgery", {}).get("deps")
        if meta is None:
            continue
        g = dep.masks[n.name]
        gs = list(g) if isinstance(g, tuple) else [g]
        bs = [b for b in tree_flatten(meta, is_leaf=lambda x: hasattr(x, "ids"))[0] if hasattr(b, "ids")]
        if len(bs) != len(gs):
            bs = bs[:len(gs)]
        for k, (gm, b) in enumerate(zip(gs, bs)):
            dense = b.dense()
            uniq, inv = torch.unique(dense, return_inverse=True)
            table = torch.zeros((len(uniq), len(dep.labels)), dtype=torch.bool)
            for u, sid in enumerate(uniq.tolist()):
                for lid in pool.sets[sid]:
                    lab = pool.labels[lid]
                    if lab in index:
                        table[u, index[lab]] = True
            bm = table[inv]
            if tuple(bm.shape) != tuple(gm.shape):
                rows.append((n.name, k, (), {"shape"}, {str(tuple(bm.shape))}))
                continue
            only_g = gm & ~bm
            only_b = bm & ~gm if not subset else torch.zeros_like(bm)
            bad = (only_g | only_b).any(-1)
            if bool(bad.any()):
                where = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
                rows.append((n.name, k, where,
                             {dep.labels[i] for i in torch.nonzero(only_g[where]).reshape(-1).tolist()},
                             {dep.labels[i] for i in torch.nonzero(only_b[where]).reshape(-1).tolist()}))
    return rows


def gradient_interaction_map(traced: Traced, trials: int = 4, seed: int = 0) -> InteractionMap:
    """The interaction map from autodiff alone (no label rule is read): parameter element p
    meets label f iff, at one of `trials` random points, the mixed derivative
    d/dz_f d<c, N>/dp of some operation N that consumes p is non-zero. Keys are absent."""
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    graph = _Graph(traced)
    notes: list[str] = []
    for name, node in zip(traced.input_names, traced.input_nodes):
        val = graph.by_name[node].meta.get("val")
        if isinstance(val, torch.Tensor) and not _is_float(val) and \
                not isinstance(traced.descriptions.get(name), Categories):
            notes.append(f"integer input {name!r} is not differentiable: the gradient mapping gives it no "
                         "derivative (its label meets nothing here)")
    masks = _meeting_masks(graph, trials, seed, notes)
    pool = SetPool()
    label_ids = [pool.label_id(l) for l, _, _ in graph.labels]
    entries: dict[str, ParamEntry] = {}
    for n in graph.nodes:
        if n.op != "placeholder" or graph.kind[n.name] not in ("parameter", "buffer") \
                or graph.state[n.name] in entries:
            continue
        state = graph.state[n.name]
        val = n.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else ()
        terms = Terms(shape)
        mask = masks.get(state)
        if mask is not None and bool(mask.any()):
            flat = mask.reshape(len(label_ids), -1).T                      # (numel, labels)
            uniq, inv = torch.unique(flat, dim=0, return_inverse=True)
            ids = torch.tensor([pool.intern(label_ids[i] for i in torch.nonzero(row).reshape(-1).tolist())
                                for row in uniq], dtype=torch.int64)
            terms.add(compress(ids[inv].reshape(shape)), pool)
        entries[state] = ParamEntry(name=state, shape=shape, kind=graph.kind[n.name], meets=terms,
                                    aliases=tuple(traced.aliases.get(state) or next(
                                        (v for v in traced.aliases.values() if state in v), (state,))))
    return InteractionMap(pool, entries, dict(traced.descriptions), "gradient", notes)
