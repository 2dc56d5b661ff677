"""The common path of every resizing pass: a change of label orders -> the new GraphModule
with the old weights carried over by the surgery planner.

    source -> Traced (fs.trace, unless given one) -> interaction map (keys)
           -> reach (classes dragged along, the new shape of everything)
           -> new GraphModule (resized parameters, re-specialised shapes), checked on meta tensors
           -> fs.trace of the new module -> fs.plan(old, new) -> plan.apply()

The returned module is an ordinary `torch.fx.GraphModule`: it trains, saves and loads a
state_dict under the old names, and it can be traced and changed again (it remembers its
example inputs and features in `gm.meta`, so a pass accepts it directly). The plan is in
`gm.meta["fxsurgery"].plan` (a `PassRecord`, also read as `gm.meta["fxsurgery"]["plan"]`): its
table, issues and `fs.verify(plan)` say what was carried over and whether the function is
preserved; after a chain of passes, `.plans` holds every pass's plan in order and
`.composite()` plans the first model against the last. Nothing of the old model is written.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import torch

from ..capture import Traced, trace
from ..interaction_map import interaction_map
from ..surgery.planning import plan as make_plan
from .free_sizes import free_sizes
from .layouts import SizingError
from .new_module import build_graph_module, check_shapes
from .new_shapes import reach
from .record import PassRecord

__all__ = ["PassError", "as_traced", "fingerprint", "rewrite", "finish", "META"]

META = "fxsurgery"


class PassError(SizingError):
    """A pass was asked for something the model does not have or the graph cannot express."""


def fingerprint(gm: torch.nn.Module):
    """What a trace of `gm` depends on: its code and its parameters' and buffers' shapes. A pass
    that changes the graph in place changes the code."""
    code = gm.code if isinstance(gm, torch.fx.GraphModule) else None
    return code, tuple((k, tuple(v.shape)) for k, v in gm.state_dict(keep_vars=True).items())


def as_traced(model, inputs=None, features=None) -> Traced:
    """A Traced from a Traced, a GraphModule made by a pass (its inputs and features are
    remembered, and so is its trace, reused while the module is unchanged), or a module with
    example inputs and features."""
    if isinstance(model, Traced):
        return model
    if not isinstance(model, torch.nn.Module):
        raise PassError(f"expected a traced model (fs.trace) or a torch.nn.Module, got {type(model).__name__}")
    meta = getattr(model, "meta", None)
    carried = meta.get(META) if isinstance(meta, dict) else None
    if inputs is None and isinstance(carried, (dict, PassRecord)) and "inputs" in carried:
        made = carried.get("traced")
        if isinstance(made, Traced) and made.model is model and features is None \
                and carried.get("fingerprint") == fingerprint(model):
            return made
        inputs = carried["inputs"]
        features = carried["features"] if features is None else features
    if inputs is None:
        raise PassError(f"{type(model).__name__}: give example inputs (and features) with the module, or "
                        "pass fs.trace(model, inputs, features)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_flat_weights.*")
        # Captured here with free sizes: the pass then needs no second capture to free them. An
        # example batch of one would stay fixed that way (export specialises sizes 0 and 1);
        # captured statically, the batch is freed from a second capture with one more row.
        values = list(inputs.values()) if isinstance(inputs, Mapping) else \
            list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        dynamic = all(x.shape[0] >= 2 for x in values if isinstance(x, torch.Tensor) and x.dim())
        return trace(model, inputs, features, dynamic=dynamic)


@dataclass
class Change:
    """What a pass asks: new orders of label classes, the new descriptions of the inputs, the
    example inputs of the new model, and how the planner should match what it cannot tell."""
    orders: dict
    descriptions: dict
    inputs: dict
    units: Mapping | None = None
    new_categories: str = "zero"
    what: str = ""


def new_inputs(traced: Traced, shapes: Mapping[str, tuple]) -> dict:
    """Example inputs of the new model: the old ones, resized where the change reaches an input
    (new positions filled with random values of the input's kind)."""
    out = {}
    for name, x in zip(traced.input_names, traced.inputs):
        shape = shapes.get(name)
        if shape is None or not isinstance(x, torch.Tensor):
            out[name] = x
            continue
        if x.is_floating_point():
            y = torch.randn(shape, dtype=x.dtype, device=x.device)
        else:
            y = torch.zeros(shape, dtype=x.dtype, device=x.device)
        region = tuple(slice(0, min(a, b)) for a, b in zip(x.shape, shape))
        y[region] = x[region] if x.device.type != "meta" else y[region]
        out[name] = y
    return out


def rewrite(traced: Traced, change: Change, imap=None) -> torch.fx.GraphModule:
    """The new module for `change` (see the module docstring). `imap`: the traced model's
    interaction map, when the pass already made it to read the request."""
    imap = imap if imap is not None else interaction_map(traced)
    r = reach(traced, imap, change.orders)
    gm, shapes = build_graph_module(traced, r)
    inputs = change.inputs
    for name, shape in r.input_shapes.items():
        got = tuple(inputs[name].shape)
        if got != shape:
            raise PassError(f"{change.what}: input {name!r} must become {shape} after the change, but its new "
                            f"example has shape {got}")
    # Units kept in another order or pruned, in the asked axis and every axis it drags along.
    units = dict(change.units or {})
    for (kind, group), o in r.orders.items():
        if kind == "unit" and o.n_new == 0 and o.members != list(range(len(o.members))):
            units.setdefault(group, list(o.members))
    return finish(gm, traced, change, shapes, units, r, imap)


def finish(gm: torch.fx.GraphModule, traced: Traced, change: Change, shapes: dict, units: dict,
           r=None, imap=None) -> torch.fx.GraphModule:
    """What every pass does once its new module is built: check it on fake tensors, free its
    batch size, trace it, plan it against the old model with `units`, carry the weights over,
    and remember all of it in `gm.meta`."""
    inputs = change.inputs
    check_shapes(gm, traced, inputs, shapes)
    sizes, batch = free_sizes(gm, traced, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        new = trace(gm, inputs, change.descriptions)
    p = make_plan(traced, new, units=units or None, new_categories=change.new_categories, old_map=imap)
    if not any(t.is_meta for t in gm.state_dict(keep_vars=True).values()):   # meta: planned only, streamed later
        p.apply()
    # The chain continues when this pass started from the unchanged output of an earlier one.
    before = getattr(traced.model, "meta", None)
    before = before.get(META) if isinstance(before, dict) else None
    chained = isinstance(before, PassRecord) and before.traced is traced and before.first is not None
    gm.meta[META] = PassRecord(plan=p, inputs=inputs, features=dict(change.descriptions), what=change.what,
                               traced=new, batch=batch, sizes=sizes, fingerprint=fingerprint(gm), reach=r,
                               plans=(before.plans if chained else []) + [p],
                               changes=(before.changes if chained else []) + [change.what],
                               first=before.first if chained else traced)
    return gm
