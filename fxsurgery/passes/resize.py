"""The resizing passes: features, categories and units, each a new order of one label class.

Each takes a traced model (or a module with `inputs=` and `features=`, or a GraphModule made by
an earlier pass) and returns a new `torch.fx.GraphModule` with the old weights carried over
(see `core`). Names are checked against the model before anything is built.
"""
from __future__ import annotations

from typing import Sequence

from ..interaction_map import interaction_map
from ..labels import Categories, Features
from ..surgery.planning import NEW_CATEGORIES
from ..surgery.units import unit_sizes
from . import arguments as arg
from .driver import Change, PassError, as_traced, new_inputs, rewrite
from .layouts import Order

__all__ = ["add_features", "remove_features", "reorder_features", "add_categories", "widen", "prune_units",
           "unit_groups"]


def _description(traced, input_name: str, kind):
    if input_name not in traced.input_names:
        raise PassError(f"the model has no input {input_name!r}; its inputs are {traced.input_names}")
    desc = traced.descriptions.get(input_name)
    if not isinstance(desc, kind):
        what = "fs.Features" if kind is Features else "fs.Categories"
        raise PassError(f"input {input_name!r} is not described by {what} (it is {desc!r}); trace the model "
                        f"with features={{{input_name!r}: {what}([...])}}")
    return desc


def _new_names(names, existing, what) -> list[str]:
    names = arg.names(names, what, "names")
    if not names:
        raise PassError(f"{what}: no names given")
    dup = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(existing)))
    if dup:
        raise PassError(f"{what}: {dup} already exist or are repeated")
    return names


def _feature_change(traced, input_name, desc, new_names: list[str], what: str, extra=None) -> Change:
    old = list(desc.names)
    pos = {n: i for i, n in enumerate(old)}
    members, fresh = [], -1
    for n in new_names:
        if n in pos:
            members.append(pos[n])
        else:
            members.append(fresh)
            fresh -= 1
    new_desc = Features(new_names, dim=desc.dim)
    descriptions = dict(traced.descriptions)
    descriptions[input_name] = new_desc
    shapes = {}
    x = traced.inputs[traced.input_names.index(input_name)]
    shape = list(x.shape)
    shape[desc.dim] = len(new_names)
    shapes[input_name] = tuple(shape)
    order = Order(("feature", input_name), members, new_names)
    return Change({order.cls: order}, descriptions, new_inputs(traced, shapes), what=what, **(extra or {}))


def add_features(model, input: str, names, at: int | str | None = None, *, inputs=None, features=None):
    """Adds features to input `input`: at the end, at position `at` (an int), or after the
    feature named `at`. Their weights start at zero where they meet the data, so the new model
    computes what the old one did whatever they hold."""
    what = f"add_features({input!r})"
    arg.name(input, "add_features", "input")
    arg.names(names, what, "names")
    if at is not None and not isinstance(at, str):
        at = arg.integer(at, what, "at")       # a position (else the name of a feature)
    traced = as_traced(model, inputs, features)
    desc = _description(traced, input, Features)
    names = _new_names(names, desc.names, what)
    old = list(desc.names)
    if at is None:
        k = len(old)
    elif isinstance(at, int):
        if not -len(old) <= at <= len(old):
            raise PassError(f"{what}: position {at} is outside 0..{len(old)}")
        k = at % (len(old) + 1) if at < 0 else at
    elif at in old:
        k = old.index(at) + 1
    else:
        raise PassError(f"{what}: no feature {at!r} to add after; the features are {old}")
    return rewrite(traced, _feature_change(traced, input, desc, old[:k] + names + old[k:], what))


def remove_features(model, input: str, names, *, inputs=None, features=None):
    """Removes features from input `input`. The new model computes what the old one did with
    those features held at zero (the plan reports where a removed feature had weight)."""
    what = f"remove_features({input!r})"
    arg.name(input, "remove_features", "input")
    names = arg.names(names, what, "names")
    traced = as_traced(model, inputs, features)
    desc = _description(traced, input, Features)
    if not names:
        raise PassError(f"{what}: no names given")
    missing = [n for n in names if n not in desc.names]
    if missing:
        raise PassError(f"{what}: no features {missing}; the features are {list(desc.names)}")
    keep = [n for n in desc.names if n not in set(names)]
    if not keep:
        raise PassError(f"{what}: would remove every feature of {input!r}")
    return rewrite(traced, _feature_change(traced, input, desc, keep, what))


def reorder_features(model, input: str, order: Sequence[str], *, inputs=None, features=None):
    """Puts the features of input `input` in a new order (every feature once)."""
    what = f"reorder_features({input!r})"
    arg.name(input, "reorder_features", "input")
    order = arg.names(order, what, "order", single=False)
    traced = as_traced(model, inputs, features)
    desc = _description(traced, input, Features)
    if sorted(order) != sorted(desc.names) or len(set(order)) != len(order):
        raise PassError(f"{what}: the new order must name every feature once; the features are "
                        f"{list(desc.names)}, got {order}")
    return rewrite(traced, _feature_change(traced, input, desc, order, what))


def add_categories(model, input: str, names, *, new_categories: str = "zero", inputs=None, features=None):
    """Adds categories (embedding rows, and the rows of an output projection tied to them) to
    index input `input`. `new_categories`: "zero" (default), "mean" of the old rows, or "keep"
    (freshly initialised)."""
    what = f"add_categories({input!r})"
    arg.name(input, "add_categories", "input")
    arg.names(names, what, "names")
    arg.choice(new_categories, what, "new_categories", NEW_CATEGORIES)
    traced = as_traced(model, inputs, features)
    desc = _description(traced, input, Categories)
    names = _new_names(names, desc.names, what)
    order = Order(("category", input), list(range(len(desc.names))) + [-1 - i for i in range(len(names))],
                  list(desc.names) + names)
    descriptions = dict(traced.descriptions)
    descriptions[input] = Categories(order.names)
    change = Change({order.cls: order}, descriptions, new_inputs(traced, {}), new_categories=new_categories,
                    what=what)
    return rewrite(traced, change)


def unit_groups(traced, imap=None) -> dict[str, int]:
    """The hidden axes of a traced model and their sizes (the unit groups a widen can name;
    an LSTM's gate labels are not axes of their own). `imap`: its map, if already made."""
    imap = imap if imap is not None else interaction_map(traced)
    return {g: n for g, n in unit_sizes(imap.pool).items() if not g.endswith(".gate")}


def _groups(traced, imap, name: str, what: str) -> dict[str, int]:
    groups = unit_groups(traced, imap)
    if name in groups:
        return {name: groups[name]}
    # A module name stands for the axes under it: its layers ("core" -> "core.l0") and the
    # columns of a weight stored [in, out] ("c_fc" -> "c_fc:1", GPT-2's Conv1D).
    under = {g: n for g, n in groups.items() if g.startswith(name + ".") or g.startswith(name + ":")}
    if not under:
        raise PassError(f"{what}: no hidden axis {name!r}; the model's hidden axes are "
                        f"{sorted(groups)} (a module name stands for the axes under it)")
    return under


def widen(model, group: str, size: int | None = None, *, by: int | None = None, inputs=None, features=None):
    """Widens hidden axis `group` (a module name: a Linear's outputs, an LSTM's units, `core`
    for every layer of an LSTM module) to `size` units, or `by` more. New units are appended;
    their outgoing weights start at zero, so the function is preserved unless a normalisation
    or softmax spans the axis (the plan says where). Axes coupled to it (a residual stream)
    widen with it."""
    what = f"widen({group!r})"
    arg.name(group, "widen", "group")
    if (size is None) == (by is None):
        raise PassError(f"{what}: give exactly one of size= and by= (got size={size!r}, by={by!r})")
    size = None if size is None else arg.count(size, what, "size")
    by = None if by is None else arg.count(by, what, "by")
    traced = as_traced(model, inputs, features)
    imap = interaction_map(traced)
    orders = {}
    for g, n in _groups(traced, imap, group, what).items():
        k = (size - n) if size is not None else by
        if k < 0:
            raise PassError(f"{what}: {g} has {n} units; use prune_units to make it smaller")
        if k:
            orders[("unit", g)] = Order(("unit", g), list(range(n)) + [-1 - i for i in range(k)])
    if not orders:
        raise PassError(f"{what}: already {size} units wide; nothing to do")
    return rewrite(traced, Change(orders, dict(traced.descriptions), new_inputs(traced, {}), what=what), imap)


def prune_units(model, group: str, keep: Sequence[int], *, inputs=None, features=None):
    """Keeps only units `keep` (old positions, in their new order) of hidden axis `group`; the
    surviving units' weights are kept exactly, the others dropped."""
    what = f"prune_units({group!r})"
    arg.name(group, "prune_units", "group")
    keep = arg.positions(keep, what, "keep")
    traced = as_traced(model, inputs, features)
    imap = interaction_map(traced)
    groups = _groups(traced, imap, group, what)
    if len(groups) != 1:
        raise PassError(f"{what}: names several hidden axes {sorted(groups)}; name one")
    (g, n), = groups.items()
    bad = [k for k in keep if not 0 <= k < n]
    if bad or len(set(keep)) != len(keep) or not keep:
        raise PassError(f"{what}: keep must list distinct positions in 0..{n - 1} (some); got {keep}")
    order = Order(("unit", g), keep)
    return rewrite(traced, Change({order.cls: order}, dict(traced.descriptions), new_inputs(traced, {}),
                                  units={g: keep}, what=what), imap)
