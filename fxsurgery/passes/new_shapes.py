"""The reach of a change: every class it drags along, and the new shape of every value and
parameter of the graph (see `layouts` for how one axis is read)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..nodes import describe_node
from .layouts import Component, Sizer, SizingError, _cls
from .new_layouts import coupled_order, new_sizes, resize_parts

__all__ = ["Reach", "reach"]


@dataclass
class Reach:
    orders: dict                  # class -> Order (the requested ones and those coupled to them)
    node_shapes: dict             # node name -> new shape (values whose shape changes)
    param_shapes: dict            # state_dict name -> new shape (those whose shape changes)
    input_shapes: dict            # user input name -> new shape
    coupled: list                 # (class, the class it follows, where the coupling was seen)


def _values(traced, sizer):
    """(what, where, old shape, id tensors) of every labelled value and parameter; `what` is
    ("node", name), ("param", name) or ("input", name). A parameter contributes each term of
    its keys (met and aligned) apart: a unit axis it meets and one it is aligned with are
    different axes even when they are the same class (an LSTM's recurrent weight)."""
    user_names = dict(zip(traced.input_nodes, traced.input_names))
    for node in traced.graph.nodes:
        kind = traced.placeholders.get(node.name, ("", ""))[0]
        if node.op not in ("placeholder", "call_function") or kind in ("parameter", "buffer", "constant"):
            continue
        val = node.meta.get("val")
        ids = sizer.node_ids(node)
        if not isinstance(val, torch.Tensor) or ids is None or ids.dim() != val.dim():
            continue
        what = ("input", user_names.get(node.name, node.name)) if kind == "input" else ("node", node.name)
        yield what, describe_node(node), tuple(val.shape), [ids]
    for name, e in sizer.imap.entries.items():
        terms = [t for keys in (e.key_meets, e.key_aligned) if keys is not None for t in keys.terms]
        yield ("param", name), f"parameter {name}", tuple(e.shape), terms


class _Reader:
    """The layouts of the classes along the values, each read once: the closure goes over every
    value until nothing changes, and the sizing once more."""

    def __init__(self, sizer):
        self.sizer = sizer
        self.restricted: dict = {}
        self.read: dict = {}

    def layout(self, ids: torch.Tensor, cls, shape, loose: bool = False):
        key = (id(ids), cls)
        if key not in self.restricted:
            self.restricted[key] = self.sizer.restrict(ids, cls)
        if key + (loose,) not in self.read:
            self.read[key + (loose,)] = self.sizer.layout(self.restricted[key], cls, loose=loose, shape=shape)
        return self.read[key + (loose,)]

    def layouts(self, sources, cls, shape) -> list:
        """The layouts of a class along a value (one per id tensor that carries it)."""
        return [lay for ids in sources if (lay := self.layout(ids, cls, shape)) is not None]

    def placed(self, sources, cls, shape, order, where) -> list:
        """(layout, its parts in the new order) per id tensor carrying the class. When the
        strict reading cannot place the order (positions of the class interleaved with
        others), the loose one (repetition across rows where the class is absent, as in a
        flattened tokens x channels axis) is tried before giving up."""
        out = []
        for ids in sources:
            lay = self.layout(ids, cls, shape)
            if lay is None:
                continue
            try:
                out.append((lay, resize_parts(lay, order, where)))
            except SizingError:
                loose = self.layout(ids, cls, shape, loose=True)
                if loose is None or loose.abc == lay.abc:
                    raise
                out.append((loose, resize_parts(loose, order, where)))
        return out


def _components(sizer, orders, links) -> dict:
    """Each changed class's component: the classes that follow the same root change, with the
    root member each of their members stands for."""
    def root_map(c):
        if c not in links:
            return c, None
        k, k_of_j = links[c]
        r, up = root_map(k)
        return r, ({j: (up[m] if up is not None else m) for j, m in k_of_j.items()})
    groups: dict = {}
    canon: dict = {}
    for c in orders:
        r, m = root_map(c)
        groups.setdefault(r, set()).add(c)
        canon[c] = m if m is not None else {i: i for i in range(sizer.class_size.get(c, 0))}
    out = {}
    for r, members in groups.items():
        comp = Component(r, frozenset(members), {c: canon[c] for c in members}, sizer.class_size.get(r, 0))
        for c in members:
            out[c] = comp
    return out


def _readings(changed: set, components: dict) -> list:
    """How to read the changed classes present in a value: a class alone, or, where several
    classes of one component are present, the component."""
    out, seen = [], set()
    for c in sorted(changed):
        comp = components[c]
        present = comp.classes & changed
        if len(present) > 1:
            if comp not in seen:
                seen.add(comp)
                out.append(comp)
        else:
            out.append(c)
    return out


def _share_positions(lay_k, lay_j) -> bool:
    """Some position along the same axes holds members of both classes (in one row or in
    different rows of a concatenation)."""
    return lay_k.axes == lay_j.axes and lay_k.abc == lay_j.abc and \
        any(pk and pj for pk, pj in zip(lay_k.parts, lay_j.parts))


def _refuse_raw(where, k, j):
    # An input fed straight into a hidden axis (zero-padded into a stream): its features and
    # other units share positions, and what follows (a layer across tokens) cannot tell them
    # apart. (Categories are another matter: the rows of an output projection tied to the
    # embedding follow them, as they should.)
    raise SizingError(f"{where}: {_cls(k)} share their positions with {_cls(j)} (the input runs straight "
                      "into a hidden axis); changing them would move those units too, which is not supported")


def reach(traced, imap, orders: dict) -> Reach:
    sizer = Sizer(traced, imap)
    reader = _Reader(sizer)
    orders = dict(orders)
    counter = itertools.count(-1_000_000, -1)    # new members of coupled classes
    coupled = []
    links = {}                                   # coupled class -> (the class it follows, member map)
    values = [(what, where, shape, sources, set().union(*[sizer.classes_in(t) for t in sources]))
              for what, where, shape, sources in _values(traced, sizer)]
    # Closure: classes that index a changed axis position by position follow its change.
    changed = True
    while changed:
        changed = False
        for what, where, shape, sources, present in values:
            for k in [c for c in present if c in orders]:
                for lay_k, new_parts in reader.placed(sources, k, shape, orders[k], where):
                    for j in present - set(orders):
                        for lay_j in reader.layouts(sources, j, shape):
                            if k[0] == "feature" and j[0] == "unit" and _share_positions(lay_k, lay_j):
                                _refuse_raw(where, k, j)
                            found = coupled_order(lay_k, lay_j, orders[k], new_parts, j, counter)
                            if found is None:
                                continue
                            o, k_of_j = found
                            if j[0] != "unit":
                                raise SizingError(f"{where}: {_cls(k)} share their positions with {_cls(j)}, "
                                                  "which cannot change size; the change reaches a fixed-size input")
                            orders[j] = o
                            links[j] = (k, k_of_j)
                            coupled.append((j, k, where))
                            changed = True
                            break
    components = _components(sizer, orders, links)
    node_shapes, param_shapes, input_shapes = {}, {}, {}
    for what, where, shape, sources, present in values:
        new = list(shape)
        by = {}
        for k in _readings(present & set(orders), components):
            order = orders[k.root] if isinstance(k, Component) else orders[k]
            for lay, new_parts in reader.placed(sources, k, shape, order, where):
                sizes = new_sizes(lay, new_parts, where)
                for d, s in zip(lay.axes, sizes):
                    if d in by and new[d] != s:
                        raise SizingError(f"{where}: axis {d} would be {new[d]} long for {_cls(by[d])} and {s} "
                                          f"for {_cls(k)}; the change cannot be expressed")
                    new[d], by[d] = s, k
        if 0 in new and 0 not in shape:
            raise SizingError(f"{where}: would become empty (shape {tuple(new)}); the change removes every "
                              "position of an axis")
        if tuple(new) != shape:
            {"node": node_shapes, "param": param_shapes, "input": input_shapes}[what[0]][what[1]] = tuple(new)
    return Reach(orders, node_shapes, param_shapes, input_shapes, coupled)
