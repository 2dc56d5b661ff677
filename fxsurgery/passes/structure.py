"""Structural passes: a layer inserted as the identity, attention heads added.

`insert_identity_layer` adds nodes to the graph (a Linear, or a 1x1 convolution over channels,
initialised to the identity) right after a module's output; the planner is told that the new
layer's units stand for the units of the module it follows (`units={new: after}`), so every old
weight is copied and the function is preserved exactly.

`add_heads` is a resize: it finds the attention's query, key and value projections from the
labels that reach `scaled_dot_product_attention` and appends whole heads to them (with grouped
key/value heads, whole groups: one key/value head per `heads / kv_heads` query heads); the output
projection's columns for the new heads follow by reach and start at zero.
"""
from __future__ import annotations

import keyword

import torch
import torch.fx

from .._sort import unique_values
from ..interaction_map import interaction_map
from ..nodes import module_path, module_paths, packet
from . import arguments as arg
from .core import Change, PassError, as_traced, finish, new_inputs, rewrite
from .graph import build_graph_module
from .reach import Reach
from .sizing import Order, Sizer

__all__ = ["insert_identity_layer", "add_heads"]

aten = torch.ops.aten


def _in_module(node, path: str) -> bool:
    return any(p == path or p.startswith(path + ".") for p in module_paths(node))


def _module_names(traced) -> list[str]:
    names = set()
    for node in traced.graph.nodes:
        names.update(p for p in module_paths(node) if p)
    return sorted(names)


def _output_node(graph, after: str, names) -> torch.fx.Node:
    """The value module `after` hands on: its last node used outside it."""
    inside = [n for n in graph.nodes if n.op == "call_function" and _in_module(n, after)]
    outs = [n for n in inside if any(not _in_module(u, after) for u in n.users)]
    if not inside:
        raise PassError(f"insert_identity_layer: no module {after!r} in the graph; its modules are "
                        f"{names[:24]}{' ...' if len(names) > 24 else ''}")
    if len(outs) != 1 or not isinstance(outs[0].meta.get("val"), torch.Tensor):
        raise PassError(f"insert_identity_layer: module {after!r} hands on {len(outs)} values "
                        f"({[n.name for n in outs]}); an identity layer goes after a module with one output")
    return outs[0]


def _fresh_name(gm, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        k += 1
        name = f"{base}{k}"
    return name


def insert_identity_layer(model, after: str, name: str | None = None, *, inputs=None, features=None):
    """Inserts a new layer right after module `after`'s output, starting as the identity: a
    Linear over the last axis (after a Linear-like module), or a 1x1 convolution over the
    channels (after a convolution). It is registered as submodule `name` (default
    `<after>_identity`, dots as underscores) and trains like any layer."""
    arg.name(after, "insert_identity_layer", "after")
    arg.optional_name(name, f"insert_identity_layer({after!r})", "name")
    traced = as_traced(model, inputs, features)
    names = _module_names(traced)
    out_old = _output_node(traced.graph, after, names)
    gm, _ = build_graph_module(traced, Reach({}, {}, {}, {}, []))
    out = next(n for n in gm.graph.nodes if n.name == out_old.name)
    val = out_old.meta["val"]
    imap = interaction_map(traced)
    axis = _unit_axis(traced, imap, out_old, after)
    n = int(val.shape[axis])
    if axis == val.dim() - 1:
        kind, layer = "linear", torch.nn.Linear(n, n, dtype=val.dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(n, dtype=val.dtype))
    elif axis == 1 and val.dim() in (3, 4, 5):
        conv = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[val.dim()]
        kind, layer = f"conv{val.dim() - 2}d", conv(n, n, 1, dtype=val.dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(n, dtype=val.dtype).reshape(n, n, *([1] * (val.dim() - 2))))
    else:
        raise PassError(f"insert_identity_layer: the units of {after!r} run along axis {axis} of a "
                        f"{val.dim()}-d value; an identity layer goes over the last axis or the channels")
    with torch.no_grad():
        layer.bias.zero_()
    name = name or _fresh_name(gm, after.replace(".", "_") + "_identity")
    if not name.isidentifier() or keyword.iskeyword(name):
        raise PassError(f"insert_identity_layer({after!r}): name={name!r} is not a plain attribute name "
                        "(letters, digits and underscores, not a Python keyword)")
    if hasattr(gm, name):
        raise PassError(f"insert_identity_layer({after!r}): name={name!r} is taken by an attribute of the module")
    gm.add_submodule(name, layer.to(val.device))
    graph = gm.graph
    with graph.inserting_after(out):
        w = graph.get_attr(f"{name}.weight")
    with graph.inserting_after(w):
        b = graph.get_attr(f"{name}.bias")
    with graph.inserting_after(b):
        target = aten.linear.default if kind == "linear" else aten.convolution.default
        args = (out, w, b) if kind == "linear" else (out, w, b, [1] * (val.dim() - 2), [0] * (val.dim() - 2),
                                                     [1] * (val.dim() - 2), False, [0] * (val.dim() - 2), 1)
        new = graph.call_function(target, args)
    new.meta["nn_module_stack"] = {name: (name, type(layer))}
    new.meta["val"] = val
    out.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    graph.lint()
    gm.recompile()
    change = Change({}, dict(traced.descriptions), new_inputs(traced, {}), what=f"insert_identity_layer({after!r})")
    return finish(gm, traced, change, {}, {name: _unit_group_of(imap, out_old, axis, after)})


def _unit_axis(traced, imap, node, after: str) -> int:
    """The axis of `node`'s value along which the units of `after` run."""
    sizer = Sizer(traced, imap)
    ids = sizer.node_ids(node)
    groups = [c for c in sizer.classes_in(ids) if c[0] == "unit"] if ids is not None else []
    for cls in sorted(groups, key=lambda c: (c[1] != after, not c[1].startswith(after))):
        lay = sizer.layout(sizer.restrict(ids, cls), cls)
        if lay is not None and len(lay.axes) == 1:
            return lay.axes[0]
    raise PassError(f"insert_identity_layer: the output of {after!r} (node %{node.name}) carries no hidden "
                    "units along one axis; insert after a Linear, a convolution or an LSTM")


def _unit_group_of(imap, node, axis, after) -> str:
    from ..propagate import META_KEY
    lt = node.meta[META_KEY]["keys"]
    pool = imap.pool
    groups = {pool.labels[i].group for s in unique_values(lt.ids).tolist() for i in pool.sets[int(s)]
              if pool.labels[i].kind == "unit"}
    for g in sorted(groups, key=lambda g: (g != after, not g.startswith(after))):
        return g
    raise PassError(f"insert_identity_layer: no hidden units at the output of {after!r}")


# attention heads ------------------------------------------------------------------------------

_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"}


def _attention_node(traced, attention: str):
    nodes = [n for n in traced.graph.nodes if n.op == "call_function" and packet(n) in _SDPA
             and _in_module(n, attention)]
    if len(nodes) != 1:
        where = sorted({module_path(n) for n in traced.graph.nodes if n.op == "call_function"
                        and packet(n) in _SDPA})
        raise PassError(f"add_heads: {'no' if not nodes else len(nodes)} scaled_dot_product_attention in module "
                        f"{attention!r}; attentions found in {where or 'no module'} (add_heads needs the fused "
                        "attention operator; an attention written as matmul + softmax is not recognised)")
    return nodes[0]


def _projection(sizer, node, what: str):
    """(unit class, its layout) of the projection whose units form the heads of `node`'s value
    [batch, heads, tokens, head_dim]: the unit class that varies along head_dim (and along the
    heads axis, unless there is one key/value head shared by all; only along the heads axis
    when heads have one dimension each)."""
    ids = sizer.node_ids(node)
    found = []
    for cls in sizer.classes_in(ids) if ids is not None else ():
        if cls[0] != "unit":
            continue
        lay = sizer.layout(sizer.restrict(ids, cls), cls)
        last = ids.dim() - 1
        if lay is not None and set(lay.axes) <= {1, last} and (last in lay.axes or node.meta["val"].shape[-1] == 1):
            found.append((cls, lay))
    if len(found) != 1:
        raise PassError(f"add_heads: cannot tell which projection makes the {what} heads at node %{node.name} "
                        f"(candidates: {[c[1] for c, _ in found]})")
    return found[0]


def add_heads(model, attention: str, n: int, *, inputs=None, features=None):
    """Adds `n` heads to the attention in module `attention` (its query, key and value
    projections grow by whole heads; with grouped key/value heads, `n` must be a multiple of
    the query heads per key/value head, and key/value heads are added with them). The new
    heads' output-projection columns start at zero: the function is preserved."""
    arg.name(attention, "add_heads", "attention")
    n = arg.count(n, f"add_heads({attention!r})", "n")
    traced = as_traced(model, inputs, features)
    sdpa = _attention_node(traced, attention)
    q, k, v = sdpa.args[:3]
    imap = interaction_map(traced)
    sizer = Sizer(traced, imap)
    hd = int(q.meta["val"].shape[-1])
    found = {}
    for value, what in ((q, "query"), (k, "key"), (v, "value")):
        cls, lay = _projection(sizer, value, what)
        members = sorted(frozenset().union(*lay.parts))
        found[what] = (cls, members, int(value.meta["val"].shape[-1]))
    # Heads are counted on the projections: the key/value passed to the attention may be
    # repeated to the query's head count (grouped-query attention).
    hq = len(found["query"][1]) // hd
    hk = len(found["key"][1]) // found["key"][2]
    if hk < 1 or hq % hk:
        raise PassError(f"add_heads: {hq} query heads over {hk} key/value heads")
    rep = hq // hk
    if hk == 1:
        what = "has a single head" if hq == 1 else \
            f"shares one key/value head among all {hq} query heads (multi-query attention)"
        raise PassError(f"add_heads: {attention!r} {what}: its heads axis has size 1, which the labels cannot "
                        "tell from a broadcast; not supported")
    if n % rep:
        raise PassError(f"add_heads: {attention!r} has {hq} query heads sharing {hk} key/value heads "
                        f"({rep} per group); add a multiple of {rep} heads (whole groups)")
    grow = {}
    for what, heads in (("query", n), ("key", n // rep), ("value", n // rep)):
        cls, members, dim = found[what]
        grow.setdefault(cls, []).append((members[0], members[-1], heads * dim))
    orders = {}
    fresh = -1
    for cls, parts in grow.items():
        size = sizer.class_size[cls]
        ends = {}
        for lo, hi, k_new in parts:
            ends.setdefault(hi, k_new)   # q, k and v read from one value: grown once
        members = []
        for m in range(size):
            members.append(m)
            for _ in range(ends.get(m, 0)):
                members.append(fresh)
                fresh -= 1
        orders[cls] = Order(cls, members)
    return rewrite(traced, Change(orders, dict(traced.descriptions), new_inputs(traced, {}),
                                  what=f"add_heads({attention!r}, {n})"), imap)
