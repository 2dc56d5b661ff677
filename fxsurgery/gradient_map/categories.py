"""The one-hot relaxation of `Categories` inputs.

An integer tensor moved from a `Categories` input (by data-movement operators only) is carried
as a `_Cat`: its values and, per element, its flat position in the input, where its one-hot row
lives. A lookup indexed by it (embedding, index, index_select, one_hot) is computed as
`onehot(idx) @ table`; a conversion to float as `onehot(idx) @ (0, 1, ..., n-1)`. Before any
point is drawn, `_check_indices` refuses integer indices that do not come from a `Categories`
input by data movement, since their relaxation is not defined.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..labels import Categories
from ..nodes import describe_node
from .dtypes import _is_float
from .errors import GradientMapError, _op_name, _schema

# Operators that only move elements (the values of an index tensor moved from a category input
# are still category values, so the one-hot relaxation follows them). Schema names.
_MOVES = frozenset(
    "aten::" + n for n in (
        "view _unsafe_view reshape permute transpose t expand expand_as unsqueeze squeeze slice "
        "select cat concat stack hstack vstack split split_with_sizes chunk unbind flatten unflatten "
        "flip roll repeat repeat_interleave narrow movedim swapaxes tile diagonal unfold view_as "
        "reshape_as broadcast_to rot90 tensor_split alias clone contiguous detach lift_fresh_copy "
        "_to_copy to type_as index index_select gather take take_along_dim _unsafe_index "
        "alias_copy view_copy permute_copy slice_copy select_copy unsqueeze_copy squeeze_copy "
        "expand_copy t_copy transpose_copy unbind_copy split_copy split_with_sizes_copy "
        "atleast_1d atleast_2d atleast_3d").split())
# Operators whose integer operand selects entries of another operand (schema name -> the argument
# positions holding indices).
_LOOKUPS = {"aten::embedding": (1,), "aten::index": (1,), "aten::index_select": (2,),
            "aten::gather": (2,), "aten::take": (1,), "aten::take_along_dim": (1,),
            "aten::one_hot": (0,), "aten::_unsafe_index": (1,), "aten::embedding_bag": (1,),
            "aten::_embedding_bag": (1,), "aten::index_put": (1,), "aten::index_put_": (1,),
            "aten::scatter": (2,), "aten::scatter_add": (2,), "aten::scatter_reduce": (2,),
            "aten::index_add": (2,), "aten::index_copy": (2,), "aten::index_fill": (2,)}


@dataclass
class _Cat:
    """An integer tensor whose elements were moved from a `Categories` input: its values, and
    for each element its flat position in that input (where its one-hot row lives)."""
    values: torch.Tensor
    pos: torch.Tensor
    input: str


class _CategoryRelaxation:
    """Part of `_Graph` (graph.py): the checks and the operator calls of the one-hot relaxation."""

    def _check_indices(self) -> None:
        """Integer values that index something must be moved from a Categories input."""
        desc = self.traced.descriptions
        origin: dict[str, tuple[frozenset, str | None]] = {}   # int node -> (int inputs, first non-move node)
        for n in self.nodes:
            val = n.meta.get("val")
            if n.op == "placeholder":
                if self.kind[n.name] == "input" and isinstance(val, torch.Tensor) and not _is_float(val):
                    origin[n.name] = (frozenset([self.input_of[n.name]]), None)
                continue
            if n.op != "call_function":
                continue
            name = _schema(n.target)
            if name in _LOOKUPS:
                flat_args = list(n.args) + list(n.kwargs.values())
                for k in _LOOKUPS[name]:
                    if k >= len(flat_args):
                        continue
                    for a in tree_flatten(flat_args[k])[0]:
                        if isinstance(a, torch.fx.Node) and a.name in origin:
                            inputs, via = origin[a.name]
                            for inp in sorted(inputs):
                                if not isinstance(desc.get(inp), Categories):
                                    raise GradientMapError(
                                        f"integer input {inp!r} reaches {_op_name(n.target)} at {describe_node(n)}: "
                                        "describe it with fs.Categories, so that the gradient mapping can "
                                        "differentiate the lookup through its one-hot relaxation")
                            if via is not None:
                                raise GradientMapError(
                                    f"the index of {_op_name(n.target)} at {describe_node(n)} is computed from "
                                    f"Categories input {sorted(inputs)[0]!r} by "
                                    f"{_op_name(self.by_name[via].target)} at node %{via}, which is not "
                                    "data movement: its one-hot relaxation is not defined")
                            if name not in ("aten::embedding", "aten::index", "aten::index_select",
                                            "aten::one_hot", "aten::_unsafe_index"):
                                raise GradientMapError(
                                    f"{_op_name(n.target)} at {describe_node(n)} is indexed by Categories input "
                                    f"{sorted(inputs)[0]!r}; the gradient mapping relaxes only embedding, "
                                    "index, index_select and one_hot lookups")
            ins = [origin[a.name] for a in n.all_input_nodes if a.name in origin]
            if not ins:
                continue
            outs = [v for v in tree_flatten(val)[0] if isinstance(v, torch.Tensor)]
            if not outs or all(_is_float(v) for v in outs):
                continue
            inputs = frozenset().union(*(i for i, _ in ins))
            via = next((v for _, v in ins if v is not None), None)
            if via is None and name not in _MOVES:
                via = n.name
            origin[n.name] = (inputs, via)

    def _call_cat(self, node, target, args, kwargs, onehot):
        """An operator with a category-derived index operand: lookups become one-hot products,
        data movement moves the positions along, anything else sees the plain values."""
        name = _schema(target)
        if name == "aten::embedding" and isinstance(args[1], _Cat):
            return _onehot_lookup(node, args[0], args[1], onehot)
        if name in ("aten::index", "aten::_unsafe_index") and any(isinstance(i, _Cat) for i in args[1]):
            indices = list(args[1])
            if len(indices) != 1 or isinstance(args[0], _Cat):
                raise GradientMapError(f"{_op_name(node.target)} at {describe_node(node)} indexes with Categories "
                                       "input values in a form the one-hot relaxation does not cover "
                                       "(only table[idx] along the first axis)")
            return _onehot_lookup(node, args[0], indices[0], onehot)
        if name == "aten::index_select" and isinstance(args[2], _Cat):
            if args[1] % args[0].dim() != 0:
                raise GradientMapError(f"{_op_name(node.target)} at {describe_node(node)} selects category rows "
                                       "along an axis other than the first; not relaxed")
            return _onehot_lookup(node, args[0], args[2], onehot)
        if name == "aten::one_hot" and isinstance(args[0], _Cat):
            num = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
            rows = _gather_rows(onehot[args[0].input], args[0].pos)
            return _pad_last(rows, num if num >= 0 else rows.shape[-1])
        flat, spec = tree_flatten((args, kwargs))
        cats = [a for a in flat if isinstance(a, _Cat)]
        ints = [a for a in flat if isinstance(a, torch.Tensor) and not _is_float(a)]
        values = tree_unflatten([a.values if isinstance(a, _Cat) else a for a in flat], spec)
        out = target(*values[0], **values[1])
        same_input = len({c.input for c in cats}) == 1
        moves = name in _MOVES and same_input and not (name in ("aten::cat", "aten::concat", "aten::stack") and ints)
        if name in ("aten::index", "aten::index_select", "aten::gather", "aten::take", "aten::take_along_dim",
                    "aten::_unsafe_index") and not isinstance(flat[0], _Cat):
            moves = False
        if not moves:
            return out
        conversion = name in ("aten::_to_copy", "aten::to", "aten::type_as")
        if conversion and _is_float(out):
            # The category's value as a number: onehot(idx) @ (0, 1, ..., n-1), linear in the
            # one-hot coordinates (category 0 has derivative 0 here: a zero by coincidence).
            rows = _gather_rows(onehot[cats[0].input], cats[0].pos)
            return torch.tensordot(rows, torch.arange(rows.shape[-1], dtype=rows.dtype), dims=1).to(out.dtype)
        pos_args = tree_unflatten([a.pos if isinstance(a, _Cat) else a for a in flat], spec)
        if conversion:
            pos_out = cats[0].pos
            outs = [out]
            poss = [pos_out]
        else:
            pos = target(*pos_args[0], **pos_args[1])
            outs, out_spec = tree_flatten(out)
            poss = tree_flatten(pos)[0]
        res = []
        for o, p in zip(outs, poss):
            if isinstance(o, torch.Tensor) and not _is_float(o) and o.dtype != torch.bool:
                res.append(_Cat(o, p, cats[0].input))
            else:
                res.append(o)
        if conversion:
            return res[0]
        return tree_unflatten(res, out_spec)


def _gather_rows(onehot: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    V = onehot.shape[-1]
    return onehot.reshape(-1, V)[pos.reshape(-1)].reshape(tuple(pos.shape) + (V,))


def _pad_last(rows: torch.Tensor, n: int) -> torch.Tensor:
    V = rows.shape[-1]
    if n < V:
        raise ValueError(f"{V} categories but only {n} one-hot classes")
    if n == V:
        return rows
    return torch.cat([rows, rows.new_zeros(tuple(rows.shape[:-1]) + (n - V,))], -1)


def _onehot_lookup(node, table, index: _Cat, onehot):
    """`table[index]` as `onehot(index) @ table`."""
    rows = _gather_rows(onehot[index.input], index.pos)
    V = rows.shape[-1]
    if isinstance(table, _Cat) or not isinstance(table, torch.Tensor):
        raise GradientMapError(f"{_op_name(node.target)} at {describe_node(node)}: the table is not a float tensor")
    if table.shape[0] < V:
        raise GradientMapError(f"Categories input {index.input!r} names {V} categories, but "
                               f"{_op_name(node.target)} at {describe_node(node)} looks up a table of "
                               f"{table.shape[0]} rows")
    return torch.tensordot(rows.to(table.dtype), table[:V], dims=1)
