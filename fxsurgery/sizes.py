"""Free sizes: one capture with torch.export dynamic shapes, read as the static graph the
analyses need plus the rule that makes each literal size follow the inputs.

`fs.trace(..., dynamic=True)` captures with `Dim.AUTO` on every axis of every tensor input, so
torch.export itself decides which sizes are free (the batch, a sequence length, an image size,
a number of entities) and which the graph fixes (an LSTM's sequence length, a flatten into a
fixed Linear). The labelling rules work on concrete shapes, so the captured graph is then
*concretised*: every symbolic size in an operator's arguments (`view(x, [s0, s1, 192])`, where
`s0` comes from `sym_size(input_ids, 0)`) is replaced by its value on the example inputs, the
symbolic-size nodes are erased, and every value's metadata gets concrete shapes. What was
symbolic is remembered per node and argument position, as a sympy expression of the free
sizes: a rewriting pass writes those expressions back into the module it builds, so the new
module runs at every size the old one ran at, from this one capture.

An axis of size 0 or 1 in the example stays fixed (torch.export specialises such sizes); the
record says so, and an example with two or more positions frees it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx
from torch.utils._pytree import tree_flatten

__all__ = ["FreeSizes", "dynamic_spec", "concretise", "size_value"]


@dataclass
class FreeSizes:
    """What a capture with free sizes left free.

    symbols:  symbol name -> (input index, axis): where the new module reads that size;
    axes:     symbol name -> every (input index, axis) that has that size (export found equal);
    hints:    symbol name -> its value on the example inputs;
    literals: node name -> {flat argument position: sympy expression of the symbols}, the
              arguments that were symbolic before concretising (positions as
              `tree_flatten((node.args, node.kwargs))` numbers them);
    fixed:    (input name, axis, size, why) for the axes that stay fixed.
    """
    symbols: dict = field(default_factory=dict)
    axes: dict = field(default_factory=dict)
    hints: dict = field(default_factory=dict)
    literals: dict = field(default_factory=dict)
    fixed: list = field(default_factory=list)

    def free(self, input_names) -> list[str]:
        """The free sizes in words: `input_ids[0]`, `input_ids[1]`..."""
        return [f"{input_names[i]}[{axis}]" for i, axis in sorted(set(self.symbols.values()))]


def dynamic_spec(args: tuple, kwargs: dict, model) -> tuple[object, list]:
    """The `dynamic_shapes` argument that frees every axis of two or more positions of every
    tensor input (`Dim.AUTO`: export specialises what the graph fixes), and the axes left fixed
    because the example has 0 or 1 positions there."""
    shapes = torch.export.ShapesCollection()
    small = []
    for k, x in enumerate(list(args) + list(kwargs.values())):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            continue
        shapes[x] = {axis: torch.export.Dim.AUTO for axis in range(x.dim()) if x.shape[axis] >= 2}
        small += [(k, axis, x.shape[axis]) for axis in range(x.dim()) if x.shape[axis] < 2]
    return shapes.dynamic_shapes(model, args, kwargs), small


def _is_symbolic(v) -> bool:
    return isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))


def size_value(expr, hints: dict):
    """The value of a size expression on the example inputs, or None when it involves a size
    the inputs do not determine (an unbacked size from nonzero)."""
    expr = sympy.sympify(expr)
    value = sympy.sympify(expr.xreplace({s: hints[s.name] for s in expr.free_symbols if s.name in hints}))
    return int(value) if value.is_number else None


def _concrete_val(val, hints: dict):
    """A node's metadata with every backed symbolic size replaced by its value."""
    if isinstance(val, (list, tuple)):
        return type(val)(_concrete_val(v, hints) for v in val)
    if isinstance(val, torch.Tensor) and any(_is_symbolic(s) for s in (*val.shape, *val.stride())):
        shape = [_size(s, hints) for s in val.shape]
        stride = [_size(s, hints) for s in val.stride()]
        if any(s is None for s in shape + stride):
            return val                       # an unbacked size: left as the capture made it
        mode = getattr(val, "fake_mode", None)
        with mode if mode is not None else torch.device("meta"):
            out = torch.empty_strided(shape, stride, dtype=val.dtype, device=val.device)
        return out.requires_grad_(val.requires_grad) if val.is_floating_point() else out
    return val


def _size(s, hints: dict):
    return size_value(s.node.expr, hints) if isinstance(s, torch.SymInt) else s


def concretise(program: torch.export.ExportedProgram, input_nodes: list[str]) -> FreeSizes:
    """Makes `program` (captured with free sizes) static in place, as described in the module
    docstring, and returns what was free. `input_nodes`: the user inputs' placeholder names."""
    graph = program.graph_module.graph
    sizes = FreeSizes()
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for k, name in enumerate(input_nodes):
        val = placeholders[name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for axis, s in enumerate(val.shape):
            if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                sym = s.node.expr.name
                if sym not in sizes.symbols:   # an axis equal to an earlier one shares its symbol
                    sizes.symbols[sym] = (k, axis)
                    sizes.hints[sym] = int(s.node.hint)
                sizes.axes.setdefault(sym, []).append((k, axis))
    _concretise_graph(program.graph_module, "", sizes)
    # The guards export would check on the unlifted module speak of the symbols erased above.
    program._range_constraints = {}
    program.graph_module.recompile()
    return sizes


def _concretise_graph(gm: torch.fx.GraphModule, prefix: str, sizes: FreeSizes) -> None:
    """Concretises one graph and the graphs it wraps (a no_grad region is a submodule whose
    placeholders have symbolic sizes too). Literals are recorded under `prefix + node name`."""
    graph = gm.graph
    for name, sub in gm.named_children():
        if isinstance(sub, torch.fx.GraphModule):
            _concretise_graph(sub, f"{prefix}{name}.", sizes)
    symbolic = []
    for node in graph.nodes:
        if _is_symbolic(node.meta.get("val")):
            if node.op == "placeholder":      # a size passed into a wrapped graph: now its value
                node.meta["val"] = _size(node.meta["val"], sizes.hints)
            else:
                symbolic.append(node)
            continue
        flat, spec = tree_flatten((node.args, node.kwargs))
        found = {}
        for pos, v in enumerate(flat):
            if isinstance(v, torch.fx.Node) and _is_symbolic(v.meta.get("val")):
                expr = v.meta["val"].node.expr
                value = size_value(expr, sizes.hints)
                if value is None:
                    continue                  # an unbacked size stays a node
                found[pos] = expr
                flat[pos] = value
        if found:
            sizes.literals[prefix + node.name] = found
            args, kwargs = spec.unflatten(flat)
            node.args, node.kwargs = tuple(args), kwargs
        if "val" in node.meta:
            node.meta["val"] = _concrete_val(node.meta["val"], sizes.hints)
    for node in reversed(symbolic):
        if not node.users:
            graph.erase_node(node)
    gm.recompile()
