"""Contractions: linear, mm, bmm, addmm, matmul, einsum and their relatives.

All of them are one label einsum: an output element is the union, over the contracted
indices, of what each operand element depends on, which (union distributing over union) is
each operand reduced over its contracted letters and broadcast into the output. A parameter
operand meets the other operands reduced onto its own letters. In keys mode the output axes
that only the parameter has (the rows of a weight) become that parameter's units.
"""
from __future__ import annotations

import string

import torch

from ..label_tensor import LabelTensor, ParamRef
from ._ops import ops
from .helpers import elementwise
from .registry import register


def unit_group(ref: ParamRef, axis: int) -> str:
    """Names a parameter axis as a hidden axis: `enc.fc` for the rows of `enc.fc.weight`,
    `attn.in_proj` for those of `attn.in_proj_weight`, `emb:1` for the columns of
    `emb.weight`, the parameter's name for anything else."""
    base = ref.name
    for suffix in (".weight", "_weight"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base if axis == 0 else f"{base}:{axis}"


def param_axis(ref: ParamRef, operand_shape, axis: int) -> int | None:
    """Which axis of the parameter an axis of a parameter-derived operand runs along."""
    if ref.index is None and not ref.everything:
        return axis if tuple(operand_shape) == tuple(ref.shape) else None
    if ref.everything or operand_shape[axis] < 2:
        return None
    line = ref.index
    for d in range(line.dim()):
        if d != axis:
            line = line.narrow(d, 0, 1)
    line = line.reshape(-1).long()
    if bool((line < 0).any()):
        return None
    coords = torch.stack(torch.unravel_index(line, ref.shape), 1) if len(ref.shape) else line[:, None]
    varying = [a for a in range(coords.shape[1]) if bool((coords[:, a] != coords[0, a]).any())]
    return varying[0] if len(varying) == 1 else None


def _arrange(ctx, ids: torch.Tensor, letters: str, target: str, keep_sizes=None) -> torch.Tensor:
    """Reduces `ids` (axes named by `letters`) over letters not in `target`, then orders and
    pads its axes to `target` (absent letters become size-1 axes)."""
    drop = [d for d, c in enumerate(letters) if c not in target]
    if drop:
        ids = ctx.pool.reduce_ids(ids, drop, keepdim=False)
        letters = "".join(c for c in letters if c in target)
    order = sorted(range(len(letters)), key=lambda d: target.index(letters[d]))
    ids = ids.permute(order) if ids.dim() else ids
    letters = "".join(letters[d] for d in order)
    view = [ids.shape[letters.index(c)] if c in letters else 1 for c in target]
    ids = ids.reshape(view)
    if keep_sizes is not None:  # undo broadcasting onto a smaller operand
        bad = [d for d, s in enumerate(keep_sizes) if s == 1 and ids.shape[d] != 1]
        if bad:
            ids = ctx.pool.reduce_ids(ids, bad)
    return ids


def contract(ctx, equation: str, operands: list[LabelTensor], shape=None) -> LabelTensor:
    ins, out = equation.split("->")
    letters = ins.split(",")
    shape = tuple(shape if shape is not None else ctx.out_shape())
    pool = ctx.pool
    ids = torch.zeros([1] * len(out), dtype=torch.int64)
    for op, lt in zip(operands, letters):
        ids = pool.union_ids(ids, _arrange(ctx, op.ids, lt, out))
    params = [k for k, op in enumerate(operands) if op.is_param]
    data = [k for k, op in enumerate(operands) if not op.is_param]
    if params and all(operands[k].is_free for k in data):
        refs = tuple(ParamRef(r.name, r.shape, everything=True) for k in params for r in operands[k].refs)
        return LabelTensor(ids, shape, refs)
    if ctx.keys and len(params) == 1:
        p = params[0]
        own = [c for c in out if c in letters[p] and all(c not in letters[k] for k in range(len(operands)) if k != p)]
        if own:
            ref = operands[p].refs[0]
            ids = torch.zeros([1] * len(out), dtype=torch.int64)
            for c in own:
                axis = letters[p].index(c)
                paxis = param_axis(ref, operands[p].shape, axis)
                group = unit_group(ref, paxis if paxis is not None else axis) if paxis is not None \
                    else f"{ref.name}@{ctx.node.name}:{axis}"
                view = [1] * len(out)
                view[out.index(c)] = shape[out.index(c)]
                ids = pool.union_ids(ids, ctx.units(group, shape[out.index(c)]).reshape(view))
    for p in params:
        meets = torch.zeros([1] * len(letters[p]), dtype=torch.int64)
        for k, op in enumerate(operands):
            if k != p:
                meets = pool.union_ids(meets, _arrange(ctx, op.ids, letters[k], letters[p], operands[p].shape))
        aligned = _arrange(ctx, ids, out, letters[p], operands[p].shape)
        ctx.meet(operands[p], meets, aligned)
    return LabelTensor(ids, shape)


def _letters(n: int, skip: str = "") -> str:
    return "".join(c for c in string.ascii_letters if c not in skip)[:n]


@register(*ops("linear.default"), family="contraction")
def linear(ctx, x, weight, bias=None):
    lead = _letters(x.ndim - 1, "io")
    y = contract(ctx, f"{lead}i,oi->{lead}o", [x, weight])
    return y if bias is None else _add_bias(ctx, y, bias)


def _add_bias(ctx, y: LabelTensor, bias) -> LabelTensor:
    if not isinstance(bias, LabelTensor):
        return y
    return elementwise(ctx, y, bias, additive=(0, 1))


@register(*ops("mm.default"), family="contraction")
def mm(ctx, a, b):
    return contract(ctx, "ij,jk->ik", [a, b])


@register(*ops("bmm.default"), family="contraction")
def bmm(ctx, a, b):
    return contract(ctx, "bij,bjk->bik", [a, b])


@register(*ops("mv.default"), family="contraction")
def mv(ctx, a, v):
    return contract(ctx, "ij,j->i", [a, v])


@register(*ops("dot.default", "vdot.default"), family="contraction")
def dot(ctx, a, b):
    return contract(ctx, "i,i->", [a, b])


@register(*ops("inner.default"), family="contraction")
def inner(ctx, a, b):
    """Contracts the last axes: out[I, J] = sum_k a[I, k] b[J, k]."""
    if a.ndim == 0 or b.ndim == 0:  # a scalar operand: a plain product
        return elementwise(ctx, a, b)
    la, lb = _letters(a.ndim - 1, "k"), _letters(a.ndim - 1 + b.ndim - 1, "k")[a.ndim - 1:]
    return contract(ctx, f"{la}k,{lb}k->{la}{lb}", [a, b])


@register(*ops("outer.default", "ger.default"), family="contraction")
def outer(ctx, a, b):
    return contract(ctx, "i,j->ij", [a, b])


@register(*ops("addmm.default"), family="contraction")
def addmm(ctx, bias, a, b, beta=1, alpha=1):
    return _add_bias(ctx, contract(ctx, "ij,jk->ik", [a, b]), bias)


@register(*ops("addmv.default"), family="contraction")
def addmv(ctx, bias, a, v, beta=1, alpha=1):
    return _add_bias(ctx, contract(ctx, "ij,j->i", [a, v]), bias)


@register(*ops("baddbmm.default"), family="contraction")
def baddbmm(ctx, bias, a, b, beta=1, alpha=1):
    return _add_bias(ctx, contract(ctx, "bij,bjk->bik", [a, b]), bias)


@register(*ops("matmul.default"), family="contraction")
def matmul(ctx, a, b):
    """torch.matmul's cases: vector-vector, matrix-vector, batched with broadcasting."""
    if a.ndim == 1 and b.ndim == 1:
        return contract(ctx, "k,k->", [a, b])
    if b.ndim == 1:
        lead = _letters(a.ndim - 1, "k")
        return contract(ctx, f"{lead}k,k->{lead}", [a, b])
    if a.ndim == 1:
        lead = _letters(b.ndim - 2, "kn")
        return contract(ctx, f"k,{lead}kn->{lead}n", [a, b])
    nb = max(a.ndim, b.ndim) - 2
    batch = _letters(nb, "mkn")
    ea, eb = batch[nb - (a.ndim - 2):], batch[nb - (b.ndim - 2):]
    return contract(ctx, f"{ea}mk,{eb}kn->{batch}mn", [a, b])


@register(*ops("einsum.default"), family="contraction")
def einsum(ctx, equation, operands, path=None):
    equation = equation.replace(" ", "")
    if "->" not in equation:  # implicit output: letters that appear once, sorted
        ins = equation.replace("...", "")
        out = "".join(sorted(c for c in set(ins.replace(",", "")) if ins.count(c) == 1))
        equation = equation + "->" + ("..." if "..." in equation else "") + out
    ins, out = equation.split("->")
    parts = ins.split(",")
    used = set(equation)
    free = [c for c in string.ascii_letters if c not in used]
    n_ell = max((op.ndim - len(p.replace("...", "")) for op, p in zip(operands, parts) if "..." in p), default=0)
    ell = "".join(free[:n_ell])
    parts = [p.replace("...", ell[n_ell - (op.ndim - len(p.replace("...", ""))):]) for op, p in zip(operands, parts)]
    out = out.replace("...", ell)
    operands = list(operands)
    for k, (op, p) in enumerate(zip(operands, parts)):
        while len(set(p)) < len(p):  # a repeated letter: take that diagonal first
            if op.is_param:
                from ..propagate import NotCovered
                raise NotCovered("a repeated einsum letter on a parameter operand")
            c = next(c for c in p if p.count(c) > 1)
            i, j = p.index(c), p.index(c, p.index(c) + 1)
            ids = op.ids.expand(op.shape).diagonal(dim1=i, dim2=j)
            p = "".join(ch for n, ch in enumerate(p) if n not in (i, j)) + c
            op = LabelTensor(ids, ids.shape)
        operands[k], parts[k] = op, p
    # Broadcast ellipsis dims of size 1 are fine: _arrange pads and reduce_to undoes them.
    return contract(ctx, ",".join(parts) + "->" + out, operands)
