"""Attention heads added: a resize of the query, key and value projections by whole heads.

`add_heads` finds the attention's query, key and value projections from the labels that reach
`scaled_dot_product_attention` and appends whole heads to them (with grouped key/value heads,
whole groups: one key/value head per `heads / kv_heads` query heads); the output projection's
columns for the new heads follow by reach and start at zero.
"""
from __future__ import annotations

from ..interaction_map import interaction_map
from ..nodes import in_module, module_path, packet
from . import arguments as arg
from .driver import Change, PassError, as_traced, new_inputs, rewrite
from .layouts import Order, Sizer

__all__ = ["add_heads"]

_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"}


def _attention_node(traced, attention: str):
    nodes = [n for n in traced.graph.nodes if n.op == "call_function" and packet(n) in _SDPA
             and in_module(n, attention)]
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
