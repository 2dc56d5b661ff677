"""Freeing the sizes of a rewritten module: batch, sequence length, image size...

torch.export specialises a static graph to its example inputs: `view(x, [2, 8, 192])` holds the
batch size 2 and the sequence length 8 as literals, so the unlifted module runs at those sizes
only. Each such literal gets a rule: a sympy expression of the free sizes, each size read in
the new module as `x.size(axis)` of an input. The rules come from one of two places:

- a capture with free sizes (`fs.trace(..., dynamic=True)`, see `fxsurgery.sizes`) recorded
  every symbolic argument: every free size, and no second capture;
- otherwise the old model is captured once more with one more row in every input that has the
  batch size along its first axis, and the two graphs are compared node by node: a literal that
  differs between them is a*B + c, read off the two captures (the batch size only).

A literal the pass itself changed (a head dimension widened inside `s0 * s1 * 64`) keeps its
rule with the constant rescaled, or its constant term moved; a rule that cannot be adjusted
leaves that literal fixed, naming the node. The result is then run on the new example inputs
grown along every free axis; if it fails (a graph that the sizes change structurally), every
edit is undone and the module keeps its fixed sizes, which `gm.meta["fxsurgery"].sizes` says.
"""
from __future__ import annotations

import operator
import warnings

import sympy
import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from ..capture import trace
from ..sizes import size_value

__all__ = ["free_sizes"]

aten = torch.ops.aten


# rules: node name -> {flat argument position: sympy expression of size symbols}; bindings:
# symbol name -> (input index, axis); hints: symbol name -> its value in the old example.

def _batch(traced) -> tuple[int | None, list[int]]:
    """The example batch size and the inputs that carry it along their first axis."""
    sizes = [x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None for x in traced.inputs]
    known = [s for s in sizes if s is not None]
    if not known:
        return None, []
    b = max(set(known), key=known.count)
    return b, [i for i, s in enumerate(sizes) if s == b]


def _resized(inputs: list, grow: dict) -> list:
    """The inputs with `grow[(input index, axis)]` more positions along those axes (copies of
    the first position, so that index inputs stay in range)."""
    out = []
    for i, x in enumerate(inputs):
        for (k, axis), extra in sorted(grow.items()):
            if k == i and isinstance(x, torch.Tensor):
                x = torch.cat([x] + [x.narrow(axis, 0, 1)] * extra, axis)
        out.append(x)
    return out


def _literals(node) -> list:
    """Every literal of a node's args and kwargs (nodes stand for themselves by name), in order."""
    flat, _ = tree_flatten((node.args, node.kwargs))
    return [("node", v.name) if isinstance(v, torch.fx.Node) else v for v in flat]


def _diff_rules(old_graph, alt_graph, b: int, symbol) -> dict | None:
    """The int literals equal to a*B + c, from two captures at batch b and b + 1; None when the
    two captures differ in anything else (nodes, operators, other literals: a forward that
    branches on the batch size)."""
    alt = {n.name: n for n in alt_graph.nodes}
    if set(alt) != {n.name for n in old_graph.nodes}:
        return None
    rules = {}
    for n in old_graph.nodes:
        m = alt[n.name]
        if m.op != n.op or m.target != n.target:
            return None
        x, y = _literals(n), _literals(m)
        if len(x) != len(y):
            return None
        found = {}
        for k, (v1, v2) in enumerate(zip(x, y)):
            if v1 == v2 and type(v1) is type(v2):
                continue
            if type(v1) is not int or type(v2) is not int:
                return None
            a = v2 - v1
            found[k] = a * symbol + (v1 - a * b)
        if found:
            rules[n.name] = found
    return rules


def _adjusted(expr, old: int, new: int, hints: dict):
    """The rule for a literal the pass changed from `old` to `new`: the expression with its
    constant factor rescaled (`64*s0*s1` -> `96*s0*s1`) or its constant term moved
    (`s0 + 1` -> `s0 + 3`); None when neither gives `new` (the literal stays fixed)."""
    expr = sympy.sympify(expr)
    if new == old:
        return expr
    const, rest = expr.as_coeff_Add()
    if const == 0:
        coeff, mono = expr.as_coeff_Mul()
        scaled = coeff * sympy.Rational(new, old)
        if scaled.is_integer:
            return scaled * mono
        return None
    if rest.is_polynomial() and sympy.Poly(rest).total_degree() == 1:
        return rest + (new - size_value(rest, hints))
    return None


def _emit(graph, expr, sizes: dict):
    """fx nodes computing `expr` from the size nodes; raises ValueError for an operator the
    translation does not know (the literal then stays fixed)."""
    from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        if expr.name not in sizes:
            raise ValueError(f"size {expr.name} is not an input's")
        return sizes[expr.name]
    ops = {sympy.Add: operator.add, sympy.Mul: operator.mul, FloorDiv: operator.floordiv,
           Mod: operator.mod, PythonMod: operator.mod}
    op = next((f for cls, f in ops.items() if isinstance(expr, cls)), None)
    if op is None:
        raise ValueError(f"no translation of {type(expr).__name__}")
    args = list(expr.args)
    if op in (operator.add, operator.mul):   # symbols first: int + node is a valid fx node too
        args.sort(key=lambda a: a.is_number)
    out = _emit(graph, args[0], sizes)
    for a in args[1:]:
        out = graph.call_function(op, (out, _emit(graph, a, sizes)))
    return out


def _write(gm, rules: dict, bindings: dict, hints: dict):
    """Writes the rules into `gm`'s top-level graph. Returns (undo log, added nodes, number of
    literals freed, names of the nodes whose literals stayed fixed)."""
    graph = gm.graph
    before = set(graph.nodes)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    size_nodes, undo, freed, kept = {}, [], 0, []
    with graph.inserting_after(placeholders[-1]):
        for sym, (k, axis) in bindings.items():
            size_nodes[sym] = graph.call_function(aten.sym_size.int, (placeholders[k], axis))
    for node in list(graph.nodes):
        rule = rules.get(node.name)
        if rule is None or node.op != "call_function":
            continue
        flat, spec = tree_flatten((node.args, node.kwargs))
        if len(flat) <= max(rule):
            continue
        undo.append((node, node.args, node.kwargs))
        for pos, expr in rule.items():
            if type(flat[pos]) is not int:
                continue
            expr = _adjusted(expr, size_value(expr, hints), flat[pos], hints)
            try:
                if expr is None:
                    raise ValueError("the pass changed it")
                with graph.inserting_before(node):
                    flat[pos] = _emit(graph, expr, size_nodes)
                freed += 1
            except ValueError:
                kept.append(node.name)
        args, kwargs = spec.unflatten(flat)
        node.args, node.kwargs = tuple(args), kwargs
    gm.recompile()
    return undo, [n for n in graph.nodes if n not in before], freed, kept


def _run_at(gm, traced, args) -> None:
    """Runs `gm` on `args`, for real: a run on fake tensors (shapes only, no compute) passed
    where the real run failed on a random architecture, so it cannot stand in for it."""
    with torch.no_grad():
        traced.call(gm, args)


def _rules(traced):
    """(rules, bindings, axes, hints, what) for `traced`, or a string saying why there are
    none. axes: symbol -> every (input index, axis) that carries it."""
    if traced.sizes is not None:
        s = traced.sizes
        if not s.symbols:
            return "fixed (no size of the example inputs is free: " + \
                   "; ".join(f"{n}[{a}]: {why}" for n, a, _, why in s.fixed[:3]) + ")"
        return s.literals, s.symbols, s.axes, s.hints, ", ".join(s.free(traced.input_names))
    b, batched = _batch(traced)
    if b is None:
        return "no batched input"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grown = _resized(list(traced.inputs), {(k, 0): 1 for k in batched})
            alt = trace(traced.model, dict(zip(traced.input_names, grown)), dict(traced.descriptions))
    except Exception as err:  # noqa: BLE001 - any capture failure leaves the batch fixed
        return f"fixed at {b} (the model does not capture with batch {b + 1}: {type(err).__name__})"
    symbol = sympy.Symbol("batch", integer=True, positive=True)
    rules = _diff_rules(traced.graph, alt.graph, b, symbol)
    if rules is None:
        return f"fixed at {b} (the graph changes with the batch size)"
    return rules, {"batch": (batched[0], 0)}, {"batch": [(k, 0) for k in batched]}, {"batch": b}, "the batch size"


def free_sizes(gm: torch.fx.GraphModule, traced, new_inputs: dict) -> tuple[str, str]:
    """Makes the free sizes of `gm` (made from `traced`'s graph, whose example inputs are
    `new_inputs`, by user name) follow its inputs. Returns what was done, for the module's
    metadata, for all sizes and for the batch size: "free (...)" or "fixed ... (why)"."""
    text = _free_sizes(gm, traced, new_inputs)
    b, batched = _batch(traced)
    if traced.sizes is None or not text.startswith("free"):
        return text, text
    axes = {ka for v in traced.sizes.axes.values() for ka in v}
    if b is not None and batched and all((k, 0) in axes for k in batched):
        return text, "free (with " + ", ".join(traced.sizes.free(traced.input_names)) + ")"
    return text, f"fixed at {b} (the graph fixes it)" if b is not None else "no batched input"


def _free_sizes(gm: torch.fx.GraphModule, traced, new_inputs: dict) -> str:
    found = _rules(traced)
    if isinstance(found, str):
        return found
    rules, bindings, axes, hints, what = found
    if not rules:
        return f"free ({what}; no literal depends on them)"
    undo, added, freed, kept = _write(gm, rules, bindings, hints)
    try:
        # Every free axis one position longer (all the axes that carry the same size at once).
        grow = {ka: 1 for sym in bindings for ka in axes[sym]}
        _run_at(gm, traced, _resized([new_inputs[n] for n in traced.input_names], grow))
    except Exception as err:  # noqa: BLE001 - undone below, and said
        for node, a, kw in undo:
            node.args, node.kwargs = a, kw
        for node in reversed(added):
            gm.graph.erase_node(node)
        gm.recompile()
        return f"fixed (with {what} free the module fails: {type(err).__name__}: {str(err)[:120]})"
    note = f"; the change fixed the literals of {', '.join(sorted(set(kept))[:3])}" if kept else ""
    return f"free ({what}: {freed} literals follow the inputs' sizes{note})"
