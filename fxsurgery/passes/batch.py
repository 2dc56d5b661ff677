"""Freeing the batch size of a rewritten module.

torch.export specialises the graph to its example inputs: a `view(x, [2, 3, 4, 8])` holds the
batch size 2 as a literal, so the unlifted module runs on batches of 2 only. The old model is
at hand, so it is captured once more with one more row in every input that has the batch size
along its first axis, and the two graphs are compared node by node: a literal that differs
between them is a function of the batch size, a*B + c, read off the two captures. In the new
module each such literal becomes that expression of `x.size(0)` of a batched input. The result
is run on fake tensors with yet another batch size; if anything fails (a graph that the batch
size changes structurally), every edit is undone and the module keeps its fixed batch size,
which `gm.meta["fxsurgery"]["batch"]` says.
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from ..capture import trace

__all__ = ["free_batch"]

aten = torch.ops.aten


def _batch(traced) -> tuple[int | None, list[int]]:
    """The example batch size and the inputs that carry it along their first axis."""
    sizes = [x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None for x in traced.inputs]
    known = [s for s in sizes if s is not None]
    if not known:
        return None, []
    b = max(set(known), key=known.count)
    return b, [i for i, s in enumerate(sizes) if s == b]


def _grown(names, inputs, batched: list[int], extra: int) -> dict:
    """The inputs with `extra` more rows (copies of the first) in the batched ones."""
    out = {}
    for i, (name, x) in enumerate(zip(names, inputs)):
        if i in batched:
            x = torch.cat([x] + [x[:1]] * extra, 0)
        out[name] = x
    return out


def _literals(node) -> list:
    """Every literal of a node's args and kwargs (nodes stand for themselves by name), in order."""
    flat, _ = tree_flatten((node.args, node.kwargs))
    return [("node", v.name) if isinstance(v, torch.fx.Node) else v for v in flat]


def _literal_rules(old_graph, alt_graph, b: int) -> dict | None:
    """node name -> {flat position: (a, c)} for the int literals equal to a*B + c; None when the
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
            found[k] = (v2 - v1, v1 - (v2 - v1) * b)
        if found:
            rules[n.name] = found
    return rules


def free_batch(gm: torch.fx.GraphModule, traced, new_inputs: dict) -> str:
    """Makes the batch size of `gm` (made from `traced`'s graph, whose example inputs are
    `new_inputs`, by user name) follow its inputs. Returns what was done, for the module's
    metadata."""
    b, batched = _batch(traced)
    if b is None:
        return "no batched input"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alt = trace(traced.model, _grown(traced.input_names, traced.inputs, batched, 1),
                        dict(traced.descriptions))
    except Exception as err:  # noqa: BLE001 - any capture failure leaves the batch fixed
        return f"fixed at {b} (the model does not capture with batch {b + 1}: {type(err).__name__})"
    rules = _literal_rules(traced.graph, alt.graph, b)
    if rules is None:
        return f"fixed at {b} (the graph changes with the batch size)"
    if not rules:
        return "free (no literal depends on it)"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    source = placeholders[batched[0]]
    undo, added = [], []
    graph = gm.graph
    with graph.inserting_after(placeholders[-1]):
        size = graph.call_function(aten.sym_size.int, (source, 0))
    added.append(size)
    for node in list(graph.nodes):
        rule = rules.get(node.name)
        if rule is None or node.op != "call_function":
            continue
        flat, spec = tree_flatten((node.args, node.kwargs))
        if len(flat) <= max(rule):
            continue
        undo.append((node, node.args, node.kwargs))
        for k, (a, c) in rule.items():
            if type(flat[k]) is not int:
                continue
            c = flat[k] - a * b          # the new module's own literal (a pass may have changed c)
            with graph.inserting_before(node):
                expr = size if a == 1 else graph.call_function(operator.mul, (size, a))
                if expr is not size:
                    added.append(expr)
                if c:
                    expr = graph.call_function(operator.add, (expr, c))
                    added.append(expr)
            flat[k] = expr
        args, kwargs = spec.unflatten(flat)
        node.args, node.kwargs = tuple(args), kwargs
    gm.recompile()
    try:
        grown = _grown(traced.input_names, [new_inputs[n] for n in traced.input_names], batched, 2)
        with torch.no_grad():
            traced.call(gm, list(grown.values()))
    except Exception as err:  # noqa: BLE001 - undone below, and said
        for node, args, kwargs in undo:
            node.args, node.kwargs = args, kwargs
        for node in reversed(added):
            graph.erase_node(node)
        gm.recompile()
        return f"fixed at {b} (with a free batch size the module fails: {type(err).__name__})"
    return f"free ({sum(len(r) for r in rules.values())} literals follow x.size(0))"
