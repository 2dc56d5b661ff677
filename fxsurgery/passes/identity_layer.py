"""A layer inserted as the identity: a pass that adds nodes rather than resizing them.

`insert_identity_layer` adds nodes to the graph (a Linear, or a 1x1 convolution over channels,
initialised to the identity) right after a module's output; the planner is told that the new
layer's units stand for the units of the module it follows (`units={new: after}`), so every old
weight is copied and the function is preserved exactly.
"""
from __future__ import annotations

import keyword

import torch
import torch.fx

from .._sort import unique_values
from ..interaction_map import interaction_map
from ..nodes import in_module, module_paths
from . import arguments as arg
from .driver import Change, PassError, as_traced, finish, new_inputs
from .layouts import Sizer
from .new_module import build_graph_module
from .new_shapes import Reach

__all__ = ["insert_identity_layer"]

aten = torch.ops.aten


def _module_names(traced) -> list[str]:
    names = set()
    for node in traced.graph.nodes:
        names.update(p for p in module_paths(node) if p)
    return sorted(names)


def _output_node(graph, after: str, names) -> torch.fx.Node:
    """The value module `after` hands on: its last node used outside it."""
    inside = [n for n in graph.nodes if n.op == "call_function" and in_module(n, after)]
    outs = [n for n in inside if any(not in_module(u, after) for u in n.users)]
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
    return finish(gm, traced, change, {}, {name: _unit_group_of(imap, out_old, axis, after)}, imap=imap)


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
