"""Attention: `aten.scaled_dot_product_attention` and its CPU / math variants.

    out[..., l, e] = sum_s softmax_s(q[..., l, :] . k[..., s, :] * scale + mask[..., l, s]) v[..., s, e]

deps mode: an output element depends on v[..., s, e] for every position s that row l may
attend to, and, when the row attends to at least two positions (otherwise its weight is the
constant 1), on all of q[..., l, :], on all of k[..., s, :] for those s and on a float mask's
mask[..., l, s]. A boolean mask has zero derivative; it only restricts the positions. The
positions allowed are all of them, restricted by `is_causal` (torch's tril(ones(L, S)): s <= l)
and by a mask whose value is a known constant (False, or -inf in a float mask, forbids). With
`enable_gqa`, query head h reads key / value head h // (Hq // Hkv).

keys mode: the output is aligned with the value's features: out[..., l, e] carries the keys of
v[..., s, e] over the allowed s; queries and keys only weight it.

A parameter operand (a learned query, learned memory slots, a learned bias) meets, position
by position, what the mixed derivative of <c, out> in it involves (see `_meet_params`); this
equals the autodiff pattern at generic points. The CPU flash kernel's logsumexp output is
given its mathematical dependence (q, k, mask of the row), although autograd treats it as not
differentiable. `_scaled_dot_product_attention_math` is the exception to the boolean-mask
semantics: it adds a boolean mask to the scores as 0 / 1 (the public operator converts it to
0 / -inf first), so there a boolean mask removes no position (and still has zero derivative).
"""
from __future__ import annotations

import torch

from .._sort import unique
from ..label_tensor import LabelTensor, ParamRef, compress
from ..labels import EMPTY
from ._ops import ops
from .helpers import reduce_to
from .registry import register


def _lift(ids: torch.Tensor, ndim: int) -> torch.Tensor:
    return ids.reshape([1] * (ndim - ids.dim()) + list(ids.shape))


def _allowed(mask, is_causal: bool, L: int, S: int) -> torch.Tensor:
    """[L, S] bool: may row l attend to position s in some batch element and head."""
    allowed = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        allowed = allowed.tril()
    if isinstance(mask, LabelTensor) and isinstance(mask.const, torch.Tensor):
        c = mask.const
        a = c if c.dtype == torch.bool else c != float("-inf")
        a = a.reshape([1] * (2 - a.dim()) + list(a.shape)) if a.dim() < 2 else a
        a = a.reshape(-1, a.shape[-2], a.shape[-1]).any(0)  # any batch element or head
        allowed = allowed & a.expand(L, S)
    return allowed


def _scan(ctx, ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Inclusive running union along `dim` in log2(n) vectorised steps."""
    n = ids.shape[dim]
    k = 1
    while k < n:
        head = ids.narrow(dim, 0, k)
        tail = ctx.pool.union_ids(ids.narrow(dim, k, n - k), ids.narrow(dim, 0, n - k))
        ids = torch.cat([head, tail], dim)
        k *= 2
    return ids


def masked_union(ctx, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """x [..., S', F] (S' in {1, S}), allowed [L, S] -> [..., L, F]: per row l, the union of
    x over the positions s that row l allows (the empty set for a row that allows none)."""
    L, S = allowed.shape
    counts = allowed.sum(1)
    nonempty = (counts > 0).reshape(L, 1)
    empty = torch.zeros((), dtype=torch.int64)
    if x.shape[-2] == 1:
        return x if bool(nonempty.all()) else torch.where(nonempty, x, empty)
    pos = torch.arange(S)
    if bool((allowed == (pos[None, :] < counts[:, None])).all()):          # prefixes (causal)
        cum = _scan(ctx, x, x.dim() - 2)
        out = cum.index_select(x.dim() - 2, (counts - 1).clamp(min=0))
    elif bool((allowed == (pos[None, :] >= S - counts[:, None])).all()):   # suffixes
        cum = _scan(ctx, x.flip(-2), x.dim() - 2).flip(-2)
        out = cum.index_select(x.dim() - 2, (S - counts).clamp(max=S - 1))
    else:                                                                  # one union per distinct row
        rows, inverse = unique(allowed, dim=0)
        parts = []
        for r in rows:
            sel = torch.nonzero(r).reshape(-1)
            parts.append(ctx.pool.reduce_ids(x.index_select(x.dim() - 2, sel), [x.dim() - 2]) if sel.numel()
                         else torch.zeros(list(x.shape[:-2]) + [1, x.shape[-1]], dtype=torch.int64))
        out = torch.cat(parts, -2).index_select(x.dim() - 2, inverse)
    return out if bool(nonempty.all()) else torch.where(nonempty, out, empty)


def _gqa(ids: torch.Tensor, q_heads: int, enable_gqa: bool) -> torch.Tensor:
    """Key / value head h // (Hq // Hkv) serves query head h."""
    if enable_gqa and ids.dim() >= 3 and ids.shape[-3] > 1 and ids.shape[-3] != q_heads:
        ids = ids.repeat_interleave(q_heads // ids.shape[-3], dim=-3)
    return ids


def _parts(ctx, q, k, v, mask, is_causal, enable_gqa, nd):
    """The id tensors of an attention: (allowed, rows that mix, q per row, k per position, v,
    float-mask ids or None), all lifted to `nd` axes."""
    pool = ctx.pool
    L, S = q.shape[-2], k.shape[-2]
    allowed = _allowed(mask, bool(is_causal), L, S)
    multi = allowed.sum(1) >= 2
    q_heads = q.shape[-3] if q.ndim >= 3 else 1
    qi = _lift(pool.reduce_ids(q.ids, [q.ndim - 1]), nd) if q.ndim else _lift(q.ids, nd)
    ki = _lift(_gqa(pool.reduce_ids(k.ids, [k.ndim - 1]), q_heads, enable_gqa), nd)
    vi = _lift(_gqa(v.ids, q_heads, enable_gqa), nd)
    mi = None
    if isinstance(mask, LabelTensor) and not mask.is_free and _is_float_mask(ctx):
        mi = _lift(mask.ids, nd)
    return allowed, multi, qi, ki, vi, mi


def _mask_dtype(ctx):
    """The dtype of the node's `attn_mask` (or `attn_bias`) tensor operand, None without one."""
    names = [a.name for a in ctx.node.target._schema.arguments]
    for name, arg in list(zip(names, ctx.node.args)) + list(ctx.node.kwargs.items()):
        if name in ("attn_mask", "attn_bias") and isinstance(arg, torch.fx.Node):
            val = arg.meta.get("val")
            return val.dtype if isinstance(val, torch.Tensor) else None
    return None


def _is_float_mask(ctx) -> bool:
    dtype = _mask_dtype(ctx)
    return dtype is not None and dtype != torch.bool


def _is_bool_mask(ctx, mask) -> bool:
    if not isinstance(mask, LabelTensor):
        return False
    if isinstance(mask.const, torch.Tensor):
        return mask.const.dtype == torch.bool
    return _mask_dtype(ctx) == torch.bool


def _row_terms(ctx, allowed, rows, qi, ki, mi) -> torch.Tensor:
    """[..., L, 1]: what the attention weights of each row depend on, for the rows in `rows`
    (q of the row, k and a float mask over the positions the row allows)."""
    pool = ctx.pool
    L = allowed.shape[0]
    keep = rows.reshape(L, 1)
    empty = torch.zeros((), dtype=torch.int64)
    weights_allowed = allowed & keep
    ids = torch.where(keep, qi, empty)
    ids = pool.union_ids(ids, masked_union(ctx, ki, weights_allowed))
    if mi is not None:
        if mi.shape[-2] == 1:
            m = masked_union(ctx, mi.transpose(-1, -2), weights_allowed)
        else:
            m = pool.reduce_ids(torch.where(weights_allowed, mi, empty), [mi.dim() - 1])
        ids = pool.union_ids(ids, m)
    return ids


def _operands(q, k, v, mask):
    return [t for t in (q, k, v, mask) if isinstance(t, LabelTensor)]


def _meet_params(ctx, q, k, v, mask, parts, enable_gqa: bool) -> None:
    """What a parameter operand meets (the mixed derivative of <c, out> in it), per position,
    in the broadcast query-head layout, then folded back onto the operand's shape:

        q[l]     meets k, v and mask over the positions row l mixes;
        k[s]     meets, over the rows l that mix s, q[l] and k, v, mask over row l's positions;
        v[s]     meets, over the rows l that mix s, q[l] and k, mask over row l's positions;
        mask[l, s] as k[s], for row l only (a float mask; a boolean one meets nothing).

    A row that attends to a single position has the constant weight 1: nothing meets there."""
    if not any(isinstance(t, LabelTensor) and t.is_param for t in (q, k, v, mask)):
        return
    pool = ctx.pool
    allowed, multi, qi, ki, vi, mi = parts
    mixes = allowed & multi.reshape(-1, 1)
    rows = _row_terms(ctx, allowed, multi, qi, ki, mi)                      # q, k, mask per row
    values = masked_union(ctx, pool.reduce_ids(vi, [vi.dim() - 1]), mixes)  # v per row
    full = pool.union_ids(rows, values)
    empty = torch.zeros((), dtype=torch.int64)
    wanted = {"q": lambda: full,
              "k": lambda: masked_union(ctx, full, mixes.t()),
              "v": lambda: masked_union(ctx, rows, mixes.t()),
              "mask": lambda: empty.reshape([1] * mask.ndim) if _is_bool_mask(ctx, mask)  # zero derivative
              else torch.where(mixes, full, empty)}
    for name, op in (("q", q), ("k", k), ("v", v), ("mask", mask)):
        if isinstance(op, LabelTensor) and op.is_param:
            ctx.meet(op, _fold(ctx, wanted[name](), op, enable_gqa and name in ("k", "v")))


def _fold(ctx, ids: torch.Tensor, op: LabelTensor, gqa: bool) -> torch.Tensor:
    """Brings ids in the output's layout back onto an operand: key / value heads gather the
    query heads they serve, broadcast axes are unioned away."""
    if gqa and op.ndim >= 3 and ids.dim() >= 3 and ids.shape[-3] > 1 and ids.shape[-3] != op.shape[-3]:
        kv = op.shape[-3]
        ids = ids.reshape(list(ids.shape[:-3]) + [kv, ids.shape[-3] // kv] + list(ids.shape[-2:]))
        ids = ctx.pool.reduce_ids(ids, [ids.dim() - 3], keepdim=False)
    return reduce_to(ctx, ids, op.shape)


def _param_only(ctx, operands) -> bool:
    return any(op.is_param for op in operands) and all(op.is_free for op in operands)


def _refs(operands) -> tuple:
    return tuple(ParamRef(r.name, r.shape, everything=True) for op in operands for r in op.refs)


def attention(ctx, q, k, v, mask=None, is_causal=False, enable_gqa=False, shapes=None):
    """(output ids [..., L, Ev], row ids [..., L, 1] for the log-sum-exp, weight ids [..., L, S]
    or None). `shapes`: which of the three to compute ("out", "lse", "weights")."""
    shapes = shapes or ("out",)
    out_shape = ctx.out_shape() if isinstance(ctx.out, torch.Tensor) else ctx.out_shape(0)
    nd = len(out_shape)
    pool = ctx.pool
    parts = _parts(ctx, q, k, v, mask, is_causal, enable_gqa, nd)
    allowed, multi, qi, ki, vi, mi = parts
    _meet_params(ctx, q, k, v, mask, parts, bool(enable_gqa))
    results = {}
    if "out" in shapes:
        ids = masked_union(ctx, vi, allowed)
        if not ctx.keys:
            ids = pool.union_ids(ids, _row_terms(ctx, allowed, multi, qi, ki, mi))
        results["out"] = compress(ids)
    if "lse" in shapes:  # log-sum-exp of the scores: q, k and mask of every non-empty row
        results["lse"] = compress(_row_terms(ctx, allowed, allowed.any(1), qi, ki, mi))
    if "weights" in shapes:  # softmax weights: zero where not allowed, 1 in a one-position row
        L, S = allowed.shape
        w = allowed & multi.reshape(L, 1)
        row = _row_terms(ctx, allowed, multi, qi, ki, mi)
        results["weights"] = compress(torch.where(w, row, torch.zeros((), dtype=torch.int64)))
    return results


def _finish(ctx, ids: torch.Tensor, shape) -> LabelTensor:
    ids = _lift(ids, len(shape)) if ids.dim() < len(shape) else ids
    bad = [d for d in range(len(shape)) if ids.shape[d] not in (1, shape[d])]
    if bad:  # undo broadcasting that the output does not have (sound)
        ids = ctx.pool.reduce_ids(ids, bad)
    return LabelTensor(ids, shape)


@register(*ops("scaled_dot_product_attention.default"), family="attention")
def scaled_dot_product_attention(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                                 scale=None, enable_gqa=False):
    operands = _operands(q, k, v, attn_mask)
    if _param_only(ctx, operands):
        return LabelTensor.empty(ctx.out_shape(), refs=_refs(operands))
    r = attention(ctx, q, k, v, attn_mask, is_causal, enable_gqa)
    return _finish(ctx, r["out"], ctx.out_shape())


@register(*ops("_scaled_dot_product_flash_attention_for_cpu.default"), family="attention")
def sdpa_flash_cpu(ctx, q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    operands = _operands(q, k, v, attn_mask)
    if _param_only(ctx, operands):
        return tuple(LabelTensor.empty(s.shape, refs=_refs(operands)) for s in ctx.out)
    r = attention(ctx, q, k, v, attn_mask, is_causal, False, shapes=("out", "lse"))
    lse = ctx.out_shape(1)
    return _finish(ctx, r["out"], ctx.out_shape(0)), _finish(ctx, r["lse"].squeeze(-1), lse)


@register(*ops("_scaled_dot_product_attention_math.default"), family="attention")
def sdpa_math(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, dropout_mask=None, *,
              scale=None, enable_gqa=False):
    operands = _operands(q, k, v, attn_mask)
    if _param_only(ctx, operands):
        return tuple(LabelTensor.empty(s.shape, refs=_refs(operands)) for s in ctx.out)
    if _is_bool_mask(ctx, attn_mask):
        # This kernel adds a boolean mask to the scores as 0 / 1 (scaled_dot_product_attention
        # converts it to 0 / -inf before calling it; called directly, it does not): a constant
        # shift of some scores, which removes no position and has zero derivative.
        if attn_mask.is_param:
            ctx.meet(attn_mask, torch.full([1] * attn_mask.ndim, EMPTY, dtype=torch.int64))
        attn_mask = None
    r = attention(ctx, q, k, v, attn_mask, is_causal, enable_gqa, shapes=("out", "weights"))
    # The weights keep what q, k and a float mask carry, in both modes.
    weights = r["weights"]
    return _finish(ctx, r["out"], ctx.out_shape(0)), _finish(ctx, weights, ctx.out_shape(1))
