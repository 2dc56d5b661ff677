"""The analysis and the rewrites as torch.fx pass-infrastructure citizens.

    from torch.fx.passes.infra.pass_manager import PassManager
    pm = PassManager([InteractionMapPass(inputs, features),     # labels every node (node.meta)
                      AddFeatures("obs", ["armor", "speed"]),   # fs.passes.add_features
                      Widen("fc1", by=8),                       # fs.passes.widen
                      my_own_pass])
    gm = pm(torch.fx.symbolic_trace(model)).graph_module
    fs.verify(gm.meta["fxsurgery"].plan)                        # the last rewrite's plan
    fs.verify(gm.meta["fxsurgery"].composite())                 # the pipeline's first model vs its last

Every pass is a `PassBase`: called on a GraphModule it returns a `PassResult`. The analysis
leaves the graph as it is (`modified=False`) and writes per node:

- `node.meta["fxsurgery_labels"]`: the labels the node's value depends on (the boolean
  mapping, "deps"), as sorted strings (`"obs:hp"`, `"tokens:<eos>"`); for a parameter or
  buffer (`get_attr`) node, the labels the parameter *meets* (the interaction map);
- `node.meta["fxsurgery_key_labels"]`: the same in "keys" mode (the nearest labels, units
  included: `"fc1[3]"`); for a parameter, the labels its elements meet and the units they are
  aligned with;
- `node.meta["fxsurgery"]`: the raw label tensors ({"deps": LabelTensor, "keys": LabelTensor}),
  whose set ids refer to `gm.meta["fxsurgery_map"].pool`, the InteractionMap of the graph.

A rewrite (`AddFeatures`, `RemoveFeatures`, `ReorderFeatures`, `AddCategories`, `Widen`,
`PruneUnits`, `InsertIdentityLayer`, `AddHeads`) runs the `fs.passes` function of the same name and returns its new GraphModule
(`modified=True`); the pass object keeps the last result (`.result`, `.plan`). Rewrites are not
idempotent (adding a feature twice is an error): run them with the PassManager's default
`steps=1`.

Example inputs and features. A pass needs them to trace the graph; it takes the first of:
1. those a GraphModule made by an fxsurgery pass carries (`gm.meta["fxsurgery"]`);
2. those an earlier pass of this module recorded on the graph's input placeholders
   (`node.meta["fxsurgery_input"]`): node meta survives passes that build a new GraphModule
   around the graph (which drops `gm.meta`), so a pipeline needs them once, at its start;
3. those given to the pass's constructor.
The first two describe the graph as it is now; the constructor's describe the module the
pipeline started from, which an earlier rewrite may have changed (new inputs' shapes).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils._pytree import tree_flatten

from ..capture import Traced, trace
from ..interaction_map import InteractionMap, interaction_map
from ..label_tensor import LabelTensor
from ..propagate import META_KEY
from .driver import META, PassError, as_traced
from .heads import add_heads
from .identity_layer import insert_identity_layer
from .record import PassRecord
from .resize import add_categories, add_features, prune_units, remove_features, reorder_features, widen

__all__ = ["InteractionMapPass", "RewritePass", "rewrite_pass", "REWRITE_PASSES", "AddFeatures",
           "RemoveFeatures", "ReorderFeatures", "AddCategories", "Widen", "PruneUnits", "InsertIdentityLayer",
           "AddHeads", "annotate", "match_nodes",
           "traced_source", "LABELS", "KEY_LABELS", "INPUT", "MAP"]

LABELS = "fxsurgery_labels"          # node.meta: labels the value depends on / the parameter meets
KEY_LABELS = "fxsurgery_key_labels"  # node.meta: the same in keys mode (units included)
INPUT = "fxsurgery_input"            # placeholder node.meta: (input name, example, description)
MAP = "fxsurgery_map"                # gm.meta: the InteractionMap of the last analysis

_KIND_ORDER = {"feature": 0, "category": 0, "input": 0, "unit": 1}


# --- example inputs ----------------------------------------------------------------------------

def _recorded_inputs(gm: torch.nn.Module):
    """(inputs, features) recorded on the placeholders by an earlier pass, or None."""
    graph = getattr(gm, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    records = [n.meta.get(INPUT) for n in placeholders]
    if not records or any(r is None for r in records):
        return None
    return {r["name"]: r["example"] for r in records}, \
        {r["name"]: r["description"] for r in records if r["description"] is not None}


def traced_source(gm: torch.nn.Module, inputs=None, features=None, what: str = "pass") -> Traced:
    """The Traced a pass works on (see the module docstring for where the example inputs come
    from). A GraphModule made by a rewrite and not changed since is not traced again."""
    if isinstance(gm, Traced):
        return gm
    if not isinstance(gm, torch.nn.Module):
        raise PassError(f"{what}: expected a torch.fx.GraphModule (or any torch.nn.Module), got "
                        f"{type(gm).__name__}")
    meta = getattr(gm, "meta", None)
    carried = meta.get(META) if isinstance(meta, dict) else None
    if isinstance(carried, (dict, PassRecord)) and "inputs" in carried:
        return as_traced(gm)     # the pass's own inputs first; its trace while unchanged
    recorded = _recorded_inputs(gm)
    if recorded is not None:
        inputs, features = recorded
    if inputs is None:
        raise PassError(f"{what}: {type(gm).__name__} carries no example inputs; give them to the pass, "
                        f"e.g. {what}(..., inputs={{'x': example}}, features={{'x': fs.Features([...])}}), "
                        "or put an fxsurgery pass that has them earlier in the pipeline")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_flat_weights.*")
        return trace(gm, inputs, features)


def _record_inputs(gm: torch.fx.GraphModule, traced: Traced, matched: dict) -> None:
    """Writes each user input's name, example and description on its placeholder."""
    for name, node_name, example in zip(traced.input_names, traced.input_nodes, traced.inputs):
        node = matched.get(node_name)
        if node is not None:
            node.meta[INPUT] = {"name": name, "example": example,
                                "description": traced.descriptions.get(name)}


# --- matching the exported graph to the GraphModule's -------------------------------------------

def _sources(node: torch.fx.Node):
    """Every (name, graph id) in a node's provenance (`meta["from_node"]`), nearest first."""
    todo = list(node.meta.get("from_node") or [])
    while todo:
        src = todo.pop(0)
        yield getattr(src, "name", None), getattr(src, "graph_id", None)
        todo.extend(getattr(src, "from_node", None) or [])


def _shape_of(node: torch.fx.Node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def match_nodes(gm: torch.fx.GraphModule, traced: Traced) -> tuple[dict, dict, list]:
    """Which node of the exported graph (`traced`, a capture of `gm`) holds the value of each node
    of `gm`.

    Returns (values, params, unmatched): `values` maps exported node names to gm nodes (inputs
    and operators), `params` maps gm get_attr nodes to state_dict names, `unmatched` lists gm
    nodes that got nothing.

    Why names: torch.export builds a new graph with new Node objects and keeps none of our meta,
    so a gm node and its exported counterpart share no identity. What they do share is the name:
    the exporter names each node after its ATen operator with the same de-duplicating counter
    that named the nodes of a GraphModule that itself came from torch.export or from an
    fxsurgery pass (`linear`, `linear_1`, ...), and it keeps the names of user inputs. A name is
    trusted when the operator is the same too, or when the exporter's own provenance record
    (`meta["from_node"]`: the node of `gm.graph` an exported node was traced from) agrees.
    Provenance alone covers gm nodes that the exporter expanded into several ATen operators (a
    `call_module` of a symbolically traced module: its value is the last of them), and it keeps
    a name that collides with an expanded module's inner node from being matched wrongly. (It
    cannot serve alone: the `getitem`s of a multi-output operator are recorded as coming from
    the operator.)
    Parameters are matched by their state_dict name (`get_attr` target) instead.
    """
    ours = {n.name: n for n in gm.graph.nodes}
    gid = id(gm.graph)
    exported = [n for n in traced.graph.nodes if n.op == "call_function"]
    claimed: dict[str, list] = {}        # gm node name -> exported nodes traced from it
    claimed_by: dict[str, str] = {}      # exported node name -> gm node name
    for e in exported:
        for name, graph_id in _sources(e):
            if name in ours and graph_id == gid:
                claimed.setdefault(name, []).append(e)
                claimed_by[e.name] = name
                break
    by_name = {e.name: e for e in exported}
    values: dict[str, torch.fx.Node] = {}
    params: dict[torch.fx.Node, str] = {}
    unmatched: list[str] = []

    # Inputs: by name, else by position (a dict of inputs may name positional placeholders).
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ph_names = {n.name: n for n in ph}
    for i, (name, node_name) in enumerate(zip(traced.input_names, traced.input_nodes)):
        node = ph_names.get(node_name) or ph_names.get(name) or (ph[i] if i < len(ph) else None)
        if node is not None:
            values[node_name] = node
    # Parameters, buffers and constants: by state_dict name, tied names included.
    state = {traced.canonical(target): kind for kind, target in traced.placeholders.values()
             if kind in ("parameter", "buffer", "constant")}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            name = traced.canonical(str(node.target))
            if name in state:
                params[node] = name
            else:
                unmatched.append(node.name)
    # Operators: the same name backed by the same operator or by provenance; else provenance
    # (a node the exporter expanded into several); else the same name, if nothing contradicts it.
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module", "call_method"):
            continue
        want = _shape_of(node)
        e = by_name.get(node.name)
        if e is not None and (claimed_by.get(e.name) == node.name
                              or (node.op == "call_function" and e.target == node.target)):
            found = e
        elif node.name in claimed:
            # The value of a node expanded into several is the last of them with its shape; a
            # node's "val" may be stale (a pass that resized the graph), so shape only chooses.
            fits = [c for c in claimed[node.name] if want is None or _shape_of(c) == want]
            found = (fits or claimed[node.name])[-1]
        elif e is not None and e.name not in claimed_by and (want is None or _shape_of(e) == want):
            found = e
        else:
            found = None
        if found is not None and found.name not in values:
            values[found.name] = node
        elif node.users or want is not None:   # (a guard or assertion has no value to label)
            unmatched.append(node.name)
    return values, params, unmatched


# --- the analysis -------------------------------------------------------------------------------

class _Names:
    """Readable, sorted label names of set ids (each label's string made once)."""

    def __init__(self, imap: InteractionMap):
        self.pool = imap.pool
        self._str: dict[int, str] = {}
        self._key: dict[int, tuple] = {}

    def _label(self, i: int):
        if i not in self._str:
            lab = self.pool.labels[i]
            self._str[i] = str(lab)
            self._key[i] = (_KIND_ORDER.get(lab.kind, 2), lab.group, lab.index, lab.name)
        return self._str[i]

    def of_ids(self, label_ids) -> tuple[str, ...]:
        ids = list(label_ids)
        for i in ids:
            self._label(i)
        return tuple(self._str[i] for i in sorted(ids, key=self._key.__getitem__))

    def of_sets(self, set_ids) -> tuple[str, ...]:
        members: set[int] = set()
        for s in set_ids:
            members |= self.pool.sets[s]
        return self.of_ids(members)

    def of_value(self, value) -> tuple[str, ...] | None:
        tensors = [v for v in tree_flatten(value)[0] if isinstance(v, LabelTensor)]
        if not tensors:
            return None
        return self.of_sets(t.total(self.pool) for t in tensors)


def annotate(gm: torch.fx.GraphModule, traced: Traced, imap: InteractionMap) -> list[str]:
    """Copies the per-node labels of `traced` (already propagated by `interaction_map`) onto the
    matching nodes of `gm`, and writes the readable summaries. Returns the unmatched gm nodes."""
    values, params, unmatched = match_nodes(gm, traced)
    names = _Names(imap)
    for node in gm.graph.nodes:          # no stale summaries of an earlier analysis
        node.meta.pop(LABELS, None)
        node.meta.pop(KEY_LABELS, None)
    exported = {n.name: n for n in traced.graph.nodes}
    for ename, node in values.items():
        info = exported[ename].meta.get(META_KEY)
        if not info:
            continue
        node.meta[META_KEY] = dict(info)
        deps = names.of_value(info.get("deps"))
        if deps is not None:
            node.meta[LABELS] = deps
        keys = names.of_value(info.get("keys"))
        if keys is not None:
            node.meta[KEY_LABELS] = keys
    for node, name in params.items():
        e = imap.entries.get(name)
        if e is None:
            continue
        node.meta[LABELS] = names.of_sets([e.meets.total(imap.pool)])
        if e.key_meets is not None:
            node.meta[KEY_LABELS] = names.of_sets([e.key_meets.total(imap.pool), e.key_aligned.total(imap.pool)])
    _record_inputs(gm, traced, values)
    return unmatched


class InteractionMapPass(PassBase):
    """Labels a GraphModule: per node, the labels its value depends on, and per parameter node
    the labels the parameter meets (see the module docstring for the node.meta keys). Leaves the
    graph unchanged. `inputs`/`features` are as for `fs.trace` (a dict of example inputs, and
    `fs.Features`/`fs.Categories` per input); a GraphModule made by an fxsurgery pass needs none.

    After a call: `.map` (the InteractionMap, also `gm.meta["fxsurgery_map"]`), `.traced`, and
    `.unmatched` (gm nodes that no exported node could be matched to; they get no labels)."""

    def __init__(self, inputs=None, features=None, *, keys: bool = True):
        self.inputs, self.features, self.keys = inputs, features, keys
        self.map: InteractionMap | None = None
        self.traced: Traced | None = None
        self.unmatched: list[str] = []

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        if not isinstance(graph_module, torch.fx.GraphModule):
            raise PassError(f"InteractionMapPass: expected a torch.fx.GraphModule, got {type(graph_module).__name__}")
        traced = traced_source(graph_module, self.inputs, self.features, "InteractionMapPass")
        imap = interaction_map(traced, keys=self.keys)
        self.unmatched = annotate(graph_module, traced, imap)
        self.map, self.traced = imap, traced
        graph_module.meta[MAP] = imap
        return PassResult(graph_module, False)

    def __repr__(self) -> str:
        given = f"inputs={list(self.inputs)}" if isinstance(self.inputs, dict) else ""
        return f"InteractionMapPass({given})"


# --- the rewrites ------------------------------------------------------------------------------

class RewritePass(PassBase):
    """A rewriting pass of `fs.passes` as a `PassBase`. Subclasses hold the function (see
    `rewrite_pass`); the constructor takes its arguments after the model (checked against its
    signature at once), plus `inputs=`/`features=` for a GraphModule that carries none (see the
    module docstring).

    After a call: `.result` (the new GraphModule), `.plan` (its SurgeryPlan) and `.record`
    (its PassRecord: every plan of the chain, and the composite plan)."""

    function: Callable | None = None     # the fs.passes function (a staticmethod)

    def __init__(self, *args, inputs=None, features=None, **kwargs):
        fn = type(self).function
        if fn is None:
            raise TypeError(f"{type(self).__name__} is not a rewrite; make pass classes with rewrite_pass(function)")
        try:
            inspect.signature(fn).bind(None, *args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__}{_signature(fn)}: {err}") from None
        self.args, self.kwargs = args, kwargs
        self.inputs, self.features = inputs, features
        self.result: torch.fx.GraphModule | None = None

    @property
    def record(self) -> PassRecord | None:
        return self.result.meta.get(META) if self.result is not None else None

    @property
    def plan(self):
        return self.record.plan if self.record is not None else None

    def call(self, graph_module: torch.nn.Module) -> PassResult:
        source = traced_source(graph_module, self.inputs, self.features, type(self).__name__)
        new = type(self).function(source, *self.args, **self.kwargs)
        # The summaries of an earlier analysis describe the old graph: never leave them behind.
        for node in new.graph.nodes:
            node.meta.pop(LABELS, None)
            node.meta.pop(KEY_LABELS, None)
        carried = new.meta.get(META)
        made = carried.get("traced") if carried is not None else None
        if isinstance(made, Traced) and made.model is new:
            _record_inputs(new, made, match_nodes(new, made)[0])
        self.result = new
        return PassResult(new, True)

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{type(self).__name__}({', '.join(parts)})"


def _signature(fn) -> str:
    params = list(inspect.signature(fn).parameters.values())[1:]   # without the model
    return str(inspect.Signature(params))


def rewrite_pass(function: Callable, name: str | None = None) -> type[RewritePass]:
    """The pass class of a rewriting function (`fs.passes.widen`, or one of your own taking the
    model first and returning a GraphModule): `rewrite_pass(widen)` is `Widen`, whose
    constructor takes widen's arguments after the model."""
    if not callable(function) or not hasattr(function, "__name__"):
        raise TypeError(f"rewrite_pass expects the pass function itself (e.g. fs.passes.widen), got {function!r}")
    fname = function.__name__
    name = name or "".join(part.title() for part in fname.split("_"))
    doc = (f"`{fname}` as a torch.fx pass: `{name}{_signature(function)}` (the arguments of {fname} after "
           "the model); `call(gm)` returns `PassResult(new_gm, True)`. See RewritePass.")
    cls = type(name, (RewritePass,), {"function": staticmethod(function), "__doc__": doc, "__module__": __name__})
    cls.__qualname__ = name
    REWRITE_PASSES[fname] = cls
    return cls


REWRITE_PASSES: dict[str, type[RewritePass]] = {}   # fs.passes function name -> its pass class

AddFeatures = rewrite_pass(add_features)
RemoveFeatures = rewrite_pass(remove_features)
ReorderFeatures = rewrite_pass(reorder_features)
AddCategories = rewrite_pass(add_categories)
Widen = rewrite_pass(widen)
PruneUnits = rewrite_pass(prune_units)
InsertIdentityLayer = rewrite_pass(insert_identity_layer)
AddHeads = rewrite_pass(add_heads)
