"""The common shapes of rule, so that most rules are one line.

- `elementwise`: each output element depends on the broadcast-aligned operand elements;
- `movement`: the operator only moves elements; it is run on the label ids themselves;
- `reduce`: unions over the reduced axes;
- `mixing`: every element depends on every element along some axes (softmax, cumulative ops
  mix a prefix, see `prefix`);
- `no_dependence`: piecewise-constant results (comparisons, argmax, creation ops) whose
  derivative is zero everywhere it exists.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..label_tensor import MAX_INDEX_NUMEL, LabelTensor, ParamRef, compress, full_ids

__all__ = ["bind_args", "elementwise", "movement", "reduce", "mixing", "no_dependence", "reduce_to",
           "union", "dims_of", "param_free"]


def bind_args(ctx, args, kwargs) -> dict:
    """The operator's arguments by schema name, defaults filled in."""
    schema = ctx.node.target._schema
    bound = {a.name: v for a, v in zip(schema.arguments, args)}
    bound.update(kwargs)
    for a in schema.arguments:
        if a.name not in bound and a.has_default_value():
            bound[a.name] = a.default_value
    return bound


def dims_of(dim, ndim: int) -> list[int]:
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    if ndim == 0:
        return []
    return sorted({d % ndim for d in dim}) if dim else list(range(ndim))


def union(ctx, *ids: torch.Tensor) -> torch.Tensor:
    out = ids[0]
    for t in ids[1:]:
        out = ctx.pool.union_ids(out, t)
    return out


def reduce_to(ctx, ids: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Unions a broadcast-shaped id tensor down to an operand's shape (undoes broadcasting)."""
    shape = tuple(shape)
    lead = ids.dim() - len(shape)
    if lead > 0:
        ids = ctx.pool.reduce_ids(ids, range(lead), keepdim=False) if ids.dim() else ids
    elif lead < 0:
        ids = ids.reshape([1] * (-lead) + list(ids.shape))
    dims = [d for d, s in enumerate(shape) if s == 1 and ids.shape[d] != 1]
    if dims:
        ids = ctx.pool.reduce_ids(ids, dims)
    return ids


def param_free(*operands) -> bool:
    """True when no operand carries a label, i.e. the value is computed from parameters and
    constants alone and has not met the data yet."""
    return all(op.is_free for op in operands if isinstance(op, LabelTensor))


def _broadcast_refs(op: LabelTensor, shape) -> tuple:
    if tuple(op.shape) == tuple(shape):
        return op.refs
    refs = []
    for r in op.refs:
        pos = r.positions()
        if pos is None or r.everything:
            refs.append(ParamRef(r.name, r.shape, everything=True))
        else:
            view = pos.reshape([1] * (len(shape) - len(op.shape)) + list(op.shape))
            refs.append(ParamRef(r.name, r.shape, index=view.expand(shape)))
    return tuple(refs)


def elementwise(ctx, *operands, additive: Sequence[int] = (), ignore: Sequence[int] = (),
                meets: dict | None = None) -> LabelTensor:
    """Element-wise operator over broadcast operands (scalars allowed).

    `additive` lists operand positions that enter linearly and alone (x + p, x - p) or only
    select (max(x, p)): such a parameter meets nothing, its mixed derivative being zero.
    `ignore` lists operands whose derivative is zero (a `where` condition, a mask): they add
    no dependence. `meets` maps an operand position to the positions it meets when that is
    not "all the others" (lerp's endpoints meet only the weight).
    """
    shape = ctx.out_shape()
    tensors = [(i, op) for i, op in enumerate(operands) if isinstance(op, LabelTensor)]
    live = [(i, op) for i, op in tensors if i not in ignore]
    ids = union(ctx, *[op.ids.reshape([1] * (len(shape) - op.ids.dim()) + list(op.ids.shape))
                       for _, op in live]) if live else full_ids(shape)
    ids = ids.reshape([1] * (len(shape) - ids.dim()) + list(ids.shape))
    params = [(i, op) for i, op in live if op.is_param]
    if params and param_free(*[op for _, op in live]):
        refs = tuple(r for _, op in params for r in _broadcast_refs(op, shape))
        return LabelTensor(ids, shape, refs)
    for i, op in params:
        partners = meets.get(i, ()) if meets is not None else None
        others = [o.ids.reshape([1] * (len(shape) - o.ids.dim()) + list(o.ids.shape))
                  for j, o in live if j != i and (partners is None or j in partners)]
        met = full_ids(op.shape) if i in additive or not others else reduce_to(ctx, union(ctx, *others), op.shape)
        ctx.meet(op, met, reduce_to(ctx, ids, op.shape))
    return LabelTensor(compress(ids), shape)


def no_dependence(ctx, *args, **kwargs):
    """Outputs that depend on no label (their derivative is zero where it exists)."""
    return tree_map(lambda v: LabelTensor.empty(v.shape) if isinstance(v, torch.Tensor) else v, ctx.out)


def _run_on(fn, args, kwargs, field, fill_positions):
    """Runs `fn` with every LabelTensor replaced by `field(lt)` (a float64 tensor)."""
    a, k = tree_map(lambda v: field(v) if isinstance(v, LabelTensor) else v, (args, kwargs))
    for pos, value in fill_positions:
        if isinstance(pos, int) and pos < len(a):
            a = list(a)
            a[pos] = value
        elif isinstance(pos, str) and pos in k:
            k[pos] = value
    return fn(*a, **k)


def movement(ctx, op, args, kwargs, fill: Sequence = ()) -> object:
    """Runs a data-movement operator on the label ids: each output element receives the set of
    the element it was moved from. `fill` names arguments holding a fill value, which is
    replaced by 0, the empty set (a padded element depends on nothing)."""
    fills = [(f, 0.0) for f in fill]
    out = _run_on(op, args, kwargs, lambda lt: lt.ids.expand(lt.shape).to(torch.float64), fills)
    out = tree_map(lambda t: compress(t.round().to(torch.int64)) if isinstance(t, torch.Tensor) else t, out)
    result = out
    flat_args = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, LabelTensor)]
    vals, spec = tree_flatten(ctx.out)
    n_out = sum(isinstance(v, torch.Tensor) for v in vals)
    refs_by_output = _movement_refs(op, args, kwargs, flat_args, fills, n_out)
    outs, _ = tree_flatten(result)
    lts = []
    k = 0
    for v, o in zip(vals, outs):
        if isinstance(v, torch.Tensor):
            lts.append(LabelTensor(o, v.shape, refs_by_output[k] if refs_by_output else ()))
            k += 1
        else:
            lts.append(v)
    return torch.utils._pytree.tree_unflatten(lts, spec)


def _movement_refs(op, args, kwargs, operands, fills, n_out):
    """Moves parameter provenance: runs the operator on flat parameter positions (+1, so that
    0 means 'not from this parameter'), once per parameter."""
    # One run per distinct provenance: an operand used twice (cat([x, x]), as rotary embeddings
    # do) lists the same ref twice. Membership is by identity: a ref holds an index tensor,
    # which `==` (and so `in`) cannot compare.
    params = list({id(r): r for lt in operands for r in lt.refs}.values())
    if not params or not all(lt.is_free for lt in operands):
        return None
    per_output: list[list[ParamRef]] | None = None
    for ref in params:
        pos = ref.positions()
        if pos is None or ref.everything:
            moved = None
        else:
            def field(lt, ref=ref, pos=pos):
                if any(r is ref for r in lt.refs):
                    return (pos if tuple(pos.shape) == tuple(lt.shape) else pos.expand(lt.shape)) + 1
                return torch.zeros(lt.shape, dtype=torch.float64)
            moved = _run_on(op, args, kwargs, field, fills)
        flat = [t for t in tree_flatten(moved)[0] if isinstance(t, torch.Tensor)] if moved is not None else None
        if per_output is None:
            per_output = [[] for _ in range(n_out)]
        if flat is None:
            for lst in per_output:
                lst.append(ParamRef(ref.name, ref.shape, everything=True))
        else:
            for k, t in enumerate(flat):
                idx = t.round() - 1
                if bool((idx >= 0).any()):
                    per_output[k].append(ParamRef(ref.name, ref.shape, index=idx))
    return [tuple(x) for x in per_output] if per_output is not None else None


def reduce(ctx, x: LabelTensor, dim=None, keepdim: bool = False) -> LabelTensor:
    """A reduction over `dim`: each output element is the union over what it reduces."""
    dims = dims_of(dim, x.ndim)
    shape = ctx.out_shape() if isinstance(ctx.out, torch.Tensor) else ctx.out_shape(0)
    ids = ctx.pool.reduce_ids(x.ids, dims, keepdim=True)
    if not keepdim and dims:
        ids = ids.reshape([s for d, s in enumerate(ids.shape) if d not in dims]) if len(shape) else ids.reshape(())
    ids = ids.reshape([1] * (len(shape) - ids.dim()) + list(ids.shape)) if ids.dim() < len(shape) else ids
    refs = tuple(ParamRef(r.name, r.shape, everything=True) for r in x.refs)
    return LabelTensor(ids, shape, refs)


def mixing(ctx, x: LabelTensor, dims, *, aligned_in_keys: bool = True) -> LabelTensor:
    """Each element depends on every element along `dims` (softmax, normalisation). In keys
    mode the positions stay aligned: a normalised unit is still that unit."""
    if ctx.keys and aligned_in_keys:
        return LabelTensor(x.ids, x.shape, x.refs)
    ids = ctx.pool.reduce_ids(x.ids, dims_of(dims, x.ndim), keepdim=True)
    refs = tuple(ParamRef(r.name, r.shape, everything=True) for r in x.refs)
    return LabelTensor(ids, x.shape, refs)


def big(shape) -> bool:
    n = 1
    for s in shape:
        n *= s
    return n > MAX_INDEX_NUMEL
