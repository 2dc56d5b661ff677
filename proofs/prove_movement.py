"""Data movement: each rule's pattern against the derivatives of the operator written as an
index formula over numpy object arrays of symbols (numpy's own reshape/transpose/pad, or an
explicit loop where numpy has no counterpart). Every output element of a movement operator is
one input element or a constant, so its derivative row is a unit vector or zero.

Gathers are also proved with a data-dependent index, labelled as categories: the one-hot
reading `y[i] = sum_v onehot(index[i])_v x[v]` makes an output depend on every position it
may be read from, and on the index's categories.
"""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
import torch

from proof_harness import C, Case, Cat, D, Instance, check_case, main, proof_params, variants

X3 = (2, 3, 4)
ZERO = sp.S.Zero


def inst(op, operands, call, math, **kw):
    return Instance(op, operands, call, math, **kw)


def unary(op, call, math, shape=X3, **kw):
    return Case(op, [inst(op, [D("x", shape)], call, math, **kw)])


def _zeros(shape):
    out = np.empty(shape, dtype=object)
    out[...] = ZERO
    return out


def tri(X, k, lower):
    Y = _zeros(X.shape)
    for idx in np.ndindex(*X.shape):
        i, j = idx[-2], idx[-1]
        if (j - i <= k) if lower else (j - i >= k):
            Y[idx] = X[idx]
    return Y


def unfold(X, dim, size, step):
    n = (X.shape[dim] - size) // step + 1
    Xm = np.moveaxis(X, dim, -1)
    Y = np.empty(Xm.shape[:-1] + (n, size), dtype=object)
    for idx in np.ndindex(*Xm.shape[:-1]):
        for i in range(n):
            for k in range(size):
                Y[idx + (i, k)] = Xm[idx + (i * step + k,)]
    return np.moveaxis(Y, -2, dim)


def pixel_shuffle(X, r):
    n, c, h, w = X.shape
    Y = np.empty((n, c // (r * r), h * r, w * r), dtype=object)
    for b, o, y, x in np.ndindex(*Y.shape):
        Y[b, o, y, x] = X[b, o * r * r + (y % r) * r + (x % r), y // r, x // r]
    return Y


def pixel_unshuffle(X, r):
    n, c, h, w = X.shape
    Y = np.empty((n, c * r * r, h // r, w // r), dtype=object)
    for b, o, y, x in np.ndindex(*Y.shape):
        ch, i, j = o // (r * r), (o % (r * r)) // r, o % r
        Y[b, o, y, x] = X[b, ch, y * r + i, x * r + j]
    return Y


def channel_shuffle(X, g):
    n, c = X.shape[:2]
    Y = np.empty_like(X)
    for o in range(c):  # output channel o = i * g + j reads input channel j * (c // g) + i
        i, j = divmod(o, g)
        Y[:, o] = X[:, j * (c // g) + i]
    return Y


def nearest(X, out_sizes, scales=None):
    """Nearest upsampling of the trailing axes: src = floor(dst * scale), scale = in/out or 1/factor."""
    nd = len(out_sizes)
    ins = X.shape[-nd:]
    Y = np.empty(X.shape[:-nd] + tuple(out_sizes), dtype=object)
    for idx in np.ndindex(*Y.shape):
        src = []
        for d in range(nd):
            s = (ins[d] / out_sizes[d]) if scales is None or scales[d] is None else 1.0 / scales[d]
            src.append(min(int(np.floor(idx[-nd + d] * s)), ins[d] - 1))
        Y[idx] = X[idx[:-nd] + tuple(src)]
    return Y


def diag_embed(X, offset=0):
    n = X.shape[-1] + abs(offset)
    Y = _zeros(X.shape[:-1] + (n, n))
    for idx in np.ndindex(*X.shape):
        i = idx[-1]
        r, c = (i, i + offset) if offset >= 0 else (i - offset, i)
        Y[idx[:-1] + (r, c)] = X[idx]
    return Y


def torch_pad(X, pads, mode="constant"):
    """torch's pad list (last axis first, (left, right) per axis); negative pads crop."""
    widths = [(0, 0)] * X.ndim
    for k in range(len(pads) // 2):
        widths[X.ndim - 1 - k] = (pads[2 * k], pads[2 * k + 1])
    grow = [(max(a, 0), max(b, 0)) for a, b in widths]
    if mode == "constant":
        Y = np.pad(X, grow, mode="constant", constant_values=ZERO)
    else:
        Y = np.pad(X, grow, mode={"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode])
    crop = tuple(slice(-min(a, 0), Y.shape[d] - (-min(b, 0))) for d, (a, b) in enumerate(widths))
    return Y[crop]


def scatter(X, where, src):
    Y = X.copy()
    Y[where] = src
    return Y


def diagonal_scatter(X, src):
    Y = X.copy()
    for i in range(src.shape[0]):
        Y[i, i] = src[i]
    return Y


def index_copy(X, idx, src):
    Y = X.copy()
    for k, i in enumerate(idx):
        Y[i] = src[k]
    return Y


def onehot_gather(X, Hot, dim):
    """y[..., i, ...] = sum_v Hot[..., i, ..., v] * x[..., v, ...] (torch.gather's one-hot form)."""
    Y = np.empty(Hot.shape[:-1], dtype=object)
    for idx in np.ndindex(*Y.shape):
        terms = []
        for v in range(X.shape[dim]):
            src = list(idx)
            src[dim] = v
            terms.append(Hot[idx + (v,)] * X[tuple(src)])
        Y[idx] = sp.Add(*terms)
    return Y


IDX = torch.tensor([2, 0, 2])
IDX2 = torch.tensor([[1, 0], [2, 2]])

CASES: list[Case] = []
add = CASES.append

# views and reshapes
for name in ("view.default", "_unsafe_view.default", "reshape.default", "view_copy.default"):
    add(unary(f"aten.{name}", lambda o, x: o(x, [6, 4]), lambda X: X.reshape(6, 4)))
for name in ("reshape_as.default", "view_as.default"):
    add(Case(f"aten.{name}", [inst(f"aten.{name}", [D("x", X3), D("other", (6, 4))], lambda o, x, y: o(x, y),
                                   lambda X, Y: X.reshape(6, 4))]))
add(unary("aten.flatten.using_ints", lambda o, x: o(x, 1, 2), lambda X: X.reshape(2, 12)))
add(unary("aten.unflatten.int", lambda o, x: o(x, 2, [2, 2]), lambda X: X.reshape(2, 3, 2, 2)))
add(unary("aten.alias_copy.default", lambda o, x: o(x), lambda X: X))
# permutations
for name in ("permute.default", "permute_copy.default"):
    add(unary(f"aten.{name}", lambda o, x: o(x, [2, 0, 1]), lambda X: np.transpose(X, (2, 0, 1))))
for name in ("transpose.int", "transpose_copy.int", "swapaxes.default"):
    add(unary(f"aten.{name}", lambda o, x: o(x, 0, 2), lambda X: np.swapaxes(X, 0, 2)))
add(unary("aten.transpose_.default", lambda o, x: o(x.clone(), 0, 2), lambda X: np.swapaxes(X, 0, 2)))
for name in ("t.default", "t_copy.default"):
    add(unary(f"aten.{name}", lambda o, x: o(x), lambda X: X.T, shape=(3, 4)))
add(unary("aten.movedim.int", lambda o, x: o(x, 0, 2), lambda X: np.moveaxis(X, 0, 2)))
add(unary("aten.rot90.default", lambda o, x: o(x, 1, [1, 2]), lambda X: np.rot90(X, 1, (1, 2))))
add(Case("aten.flip.default", [inst("aten.flip.default", [D("x", X3)], lambda o, x: o(x, [0, 2]),
                                    lambda X: np.flip(X, (0, 2)))]))
add(Case("aten.roll.default", [
    inst("aten.roll.default", [D("x", X3)], lambda o, x: o(x, [1], [2]), lambda X: np.roll(X, 1, axis=2)),
    inst("aten.roll.default", [D("x", X3)], lambda o, x: o(x, [5]), lambda X: np.roll(X, 5), label="flattened")]))
# broadcasting and repetition
for name in ("expand.default", "expand_copy.default", "broadcast_to.default"):
    add(unary(f"aten.{name}", lambda o, x: o(x, [2, 3, 4]), lambda X: np.broadcast_to(X, (2, 3, 4)), shape=(3, 1)))
add(Case("aten.expand_as.default", [inst("aten.expand_as.default", [D("x", (3, 1)), D("other", X3)],
                                         lambda o, x, y: o(x, y), lambda X, Y: np.broadcast_to(X, X3))]))
add(unary("aten.repeat.default", lambda o, x: o(x, [2, 1, 2]), lambda X: np.tile(X, (2, 1, 2)), shape=(2, 3)))
add(unary("aten.tile.default", lambda o, x: o(x, [2, 1]), lambda X: np.tile(X, (2, 1)), shape=(2, 3)))
add(unary("aten.repeat_interleave.self_int", lambda o, x: o(x, 2, 1), lambda X: np.repeat(X, 2, axis=1)))
# adding and removing axes
for name in ("unsqueeze.default", "unsqueeze_copy.default"):
    add(unary(f"aten.{name}", lambda o, x: o(x, 1), lambda X: np.expand_dims(X, 1)))
add(unary("aten.squeeze.default", lambda o, x: o(x), lambda X: np.squeeze(X), shape=(2, 1, 3)))
for name, arg in (("squeeze.dim", 1), ("squeeze_copy.dim", 1), ("squeeze.dims", [1])):
    add(unary(f"aten.{name}", lambda o, x, _a=arg: o(x, _a), lambda X: np.squeeze(X, 1), shape=(2, 1, 3)))
add(unary("aten.atleast_1d.default", lambda o, x: o(x), lambda X: np.atleast_1d(X), shape=()))
add(unary("aten.atleast_2d.default", lambda o, x: o(x), lambda X: np.atleast_2d(X), shape=(3,)))
add(unary("aten.atleast_3d.default", lambda o, x: o(x), lambda X: np.atleast_3d(X), shape=(2, 3)))
# slicing
for name in ("slice.Tensor", "slice_copy.Tensor"):
    add(unary(f"aten.{name}", lambda o, x: o(x, 2, 1, 4, 2), lambda X: X[:, :, 1:4:2]))
for name in ("select.int", "select_copy.int"):
    add(unary(f"aten.{name}", lambda o, x: o(x, 1, 2), lambda X: X[:, 2]))
add(unary("aten.narrow.default", lambda o, x: o(x, 1, 1, 2), lambda X: X[:, 1:3]))
add(unary("aten.diagonal.default", lambda o, x: o(x, 1, 1, 2), lambda X: np.diagonal(X, 1, 1, 2)))
add(unary("aten.tril.default", lambda o, x: o(x, 1), lambda X: tri(X, 1, True)))
add(unary("aten.triu.default", lambda o, x: o(x, -1), lambda X: tri(X, -1, False)))
add(unary("aten.unfold.default", lambda o, x: o(x, 2, 2, 1), lambda X: unfold(X, 2, 2, 1)))
# splitting (every output is checked)
for name, call in (("split.Tensor", lambda o, x: o(x, 2, 1)), ("split_copy.Tensor", lambda o, x: o(x, 2, 1)),
                   ("split.sizes", lambda o, x: o(x, [2, 1], 1)), ("split_with_sizes.default", lambda o, x: o(x, [2, 1], 1)),
                   ("split_with_sizes_copy.default", lambda o, x: o(x, [2, 1], 1)), ("chunk.default", lambda o, x: o(x, 2, 1)),
                   ("tensor_split.indices", lambda o, x: o(x, [2], 1))):
    add(unary(f"aten.{name}", call, lambda X: [X[:, :2], X[:, 2:]]))
add(unary("aten.tensor_split.sections", lambda o, x: o(x, 3, 2), lambda X: np.array_split(X, 3, axis=2)))
for name in ("unbind.int", "unbind_copy.int"):
    add(unary(f"aten.{name}", lambda o, x: o(x, 1), lambda X: [X[:, i] for i in range(3)]))
# joining
TWO = [D("a", (2, 3)), D("b", (2, 2))]
for name in ("cat.default", "concat.default"):
    add(Case(f"aten.{name}", [inst(f"aten.{name}", TWO, lambda o, a, b: o([a, b], 1),
                                   lambda A, B: np.concatenate([A, B], 1))]))
SAME = [D("a", (2, 3)), D("b", (2, 3))]
add(Case("aten.stack.default", [inst("aten.stack.default", SAME, lambda o, a, b: o([a, b], 1),
                                     lambda A, B: np.stack([A, B], 1))]))
add(Case("aten.hstack.default", [inst("aten.hstack.default", TWO, lambda o, a, b: o([a, b]),
                                      lambda A, B: np.hstack([A, B]))]))
add(Case("aten.vstack.default", [inst("aten.vstack.default", [D("a", (2, 3)), D("b", (1, 3))],
                                      lambda o, a, b: o([a, b]), lambda A, B: np.vstack([A, B]))]))
# pixel and channel shuffles, nearest upsampling
add(unary("aten.pixel_shuffle.default", lambda o, x: o(x, 2), lambda X: pixel_shuffle(X, 2), shape=(1, 4, 2, 3)))
add(unary("aten.pixel_unshuffle.default", lambda o, x: o(x, 2), lambda X: pixel_unshuffle(X, 2), shape=(1, 2, 4, 2)))
for name in ("channel_shuffle.default", "native_channel_shuffle.default"):
    add(unary(f"aten.{name}", lambda o, x: o(x, 2), lambda X: channel_shuffle(X, 2), shape=(1, 6, 2)))
for nd, shape, size in ((1, (1, 2, 3), [5]), (2, (1, 1, 2, 3), [3, 5]), (3, (1, 1, 2, 2, 3), [3, 3, 4])):
    add(Case(f"aten.upsample_nearest{nd}d.vec", [
        inst(f"aten.upsample_nearest{nd}d.vec", [D("x", shape)], lambda o, x, _s=size: o(x, _s, None),
             lambda X, _s=size: nearest(X, _s), label=f"size {size}"),
        inst(f"aten.upsample_nearest{nd}d.vec", [D("x", shape)], lambda o, x, _n=nd: o(x, None, [2.0] * _n),
             lambda X, _n=nd: nearest(X, [s * 2 for s in X.shape[-_n:]], [2.0] * _n), label="scale 2")]))
    add(unary(f"aten.upsample_nearest{nd}d.default", lambda o, x, _s=size: o(x, _s), lambda X, _s=size: nearest(X, _s),
              shape=shape))
add(Case("aten.diag_embed.default", [
    inst("aten.diag_embed.default", [D("x", (2, 3))], lambda o, x: o(x), diag_embed, label="offset 0"),
    inst("aten.diag_embed.default", [D("x", (2, 3))], lambda o, x: o(x, 1), lambda X: diag_embed(X, 1),
         label="offset 1")]))
# padding
for nd, shape, pads in ((1, (1, 2, 4), [2, 1]), (2, (1, 1, 3, 4), [1, 2, 2, 1]), (3, (1, 1, 3, 3, 3), [1, 1, 2, 1, 1, 2])):
    for kind, mode in (("reflection", "reflect"), ("replication", "replicate")):
        add(unary(f"aten.{kind}_pad{nd}d.default", lambda o, x, _p=pads: o(x, _p),
                  lambda X, _p=pads, _m=mode: torch_pad(X, _p, _m), shape=shape))
add(unary("aten.constant_pad_nd.default", lambda o, x: o(x, [1, -1, 0, 2], 0.0),
          lambda X: torch_pad(X, [1, -1, 0, 2]), shape=(2, 3)))
add(Case("aten.pad.default", [
    inst("aten.pad.default", [D("x", (1, 2, 4))], lambda o, x, _m=m: o(x, [2, 1], _m),
         lambda X, _m=m: torch_pad(X, [2, 1], _m), label=m)
    for m in ("constant", "reflect", "replicate", "circular")]))
# scatters into a copy
add(Case("aten.slice_scatter.default", variants(
    "aten.slice_scatter.default", [D("x", (2, 4)), D("src", (2, 2))], lambda o, x, s: o(x, s, 1, 1, 3),
    lambda X, S: scatter(X, (slice(None), slice(1, 3)), S))))
add(Case("aten.select_scatter.default", variants(
    "aten.select_scatter.default", [D("x", (2, 3)), D("src", (2,))], lambda o, x, s: o(x, s, 1, 0),
    lambda X, S: scatter(X, (slice(None), 0), S))))
add(Case("aten.diagonal_scatter.default", variants(
    "aten.diagonal_scatter.default", [D("x", (3, 3)), D("src", (3,))], lambda o, x, s: o(x, s),
    diagonal_scatter)))
add(Case("aten.index_copy.default", [inst(
    "aten.index_copy.default", [D("x", (3, 2)), C("idx", torch.tensor([2, 0])), D("src", (2, 2))],
    lambda o, x, i, s: o(x, 0, i, s), lambda X, I, S: index_copy(X, I, S))]))
# gathers: constant indices (movement) and data-dependent indices (one-hot reading)
add(Case("aten.gather.default", [
    inst("aten.gather.default", [D("x", (2, 3)), C("idx", IDX2)], lambda o, x, i: o(x, 1, i),
         lambda X, I: np.take_along_axis(X, I, 1), label="constant index"),
    inst("aten.gather.default", [D("x", (2, 3)), Cat("idx", (2, 2), 3)], lambda o, x, i: o(x, 1, i),
         lambda X, Hot: onehot_gather(X, Hot, 1), label="category index")]))
add(Case("aten.index_select.default", [
    inst("aten.index_select.default", [D("x", (2, 3)), C("idx", IDX)], lambda o, x, i: o(x, 1, i),
         lambda X, I: X[:, I], label="constant index"),
    inst("aten.index_select.default", [D("x", (2, 3)), Cat("idx", (4,), 3)], lambda o, x, i: o(x, 1, i),
         lambda X, Hot: np.array([[sp.Add(*[Hot[j, v] * X[a, v] for v in range(3)]) for j in range(4)]
                                  for a in range(2)], dtype=object), label="category index")]))
add(Case("aten.index.Tensor", [
    inst("aten.index.Tensor", [D("x", (3, 4)), C("idx", IDX)], lambda o, x, i: o(x, [None, i]),
         lambda X, I: X[:, I], label="constant index on axis 1"),
    inst("aten.index.Tensor", [D("x", (3, 4)), C("i", IDX), C("j", torch.tensor([1, 3, 0]))],
         lambda o, x, i, j: o(x, [i, j]), lambda X, I, J: X[I, J], label="two constant indices"),
    inst("aten.index.Tensor",
         [D("x", (3, 2)), Cat("idx", (2,), 3)],
         lambda o, x, i: o(x, [i]),
         lambda X, Hot: np.array([[sp.Add(*[Hot[k, v] * X[v, j] for v in range(3)]) for j in range(2)]
                                  for k in range(2)], dtype=object), label="category index")]))
add(Case("aten._unsafe_index.Tensor", [
    inst("aten._unsafe_index.Tensor", [D("x", (3, 4)), C("idx", IDX)], lambda o, x, i: o(x, [None, i]),
         lambda X, I: X[:, I], label="constant index"),
    inst("aten._unsafe_index.Tensor", [D("x", (3, 4)), C("i", IDX), C("j", torch.tensor([1, 3, 0]))],
         lambda o, x, i, j: o(x, [i, j]), lambda X, I, J: X[I, J], label="two constant indices")]))


@pytest.mark.parametrize("case", proof_params(CASES))
def test_rule_matches_derivatives(case):
    check_case(case)


if __name__ == "__main__":
    raise SystemExit(bool(main(CASES, "movement: ")))
