"""Embeddings and lookups by a category index, in their one-hot reading: an index position
holding category v is the one-hot vector e_v, so `embedding(i, E)[k] = sum_v onehot(i_k)_v E[v]`
and `one_hot(i)[k, v] = onehot(i_k)_v`. The category labels stand for the one-hot coordinates:
row v of the table meets category v (d/d onehot_v d<c, y>/dE[v, :] = c), and a looked-up
vector depends on every category its index may hold.
"""
from __future__ import annotations

import numpy as np
import pytest

from proof_harness import Case, Cat, D, Instance, P, check_case, main, proof_params

V = 4  # categories = table rows


def lookup(Hot, E):
    """y[k..., d] = sum_v Hot[k..., v] E[v, d]."""
    return np.tensordot(Hot, E, axes=([Hot.ndim - 1], [0]))


CASES: list[Case] = [
    Case("aten.embedding.default", [
        Instance("aten.embedding.default", [P("w", (V, 3)), Cat("idx", (2,), V)], lambda o, w, i: o(w, i),
                 lambda E, Hot: lookup(Hot, E), label="table parameter"),
        Instance("aten.embedding.default", [P("w", (V, 2)), Cat("idx", (2, 2), V)], lambda o, w, i: o(w, i),
                 lambda E, Hot: lookup(Hot, E), label="table parameter, 2-d index"),
        Instance("aten.embedding.default", [D("w", (V, 2)), Cat("idx", (2,), V)], lambda o, w, i: o(w, i),
                 lambda E, Hot: lookup(Hot, E), label="labelled table")]),
    Case("aten.one_hot.default", [
        Instance("aten.one_hot.default", [Cat("idx", (3,), V)], lambda o, i: o(i, V), lambda Hot: Hot)]),
    Case("aten.index_select.default", [
        Instance("aten.index_select.default", [P("w", (V, 3)), Cat("idx", (2,), V)], lambda o, w, i: o(w, 0, i),
                 lambda E, Hot: lookup(Hot, E), label="table parameter")]),
    Case("aten.index.Tensor", [
        Instance("aten.index.Tensor", [P("w", (V, 3)), Cat("idx", (2,), V)], lambda o, w, i: o(w, [i]),
                 lambda E, Hot: lookup(Hot, E), label="table parameter")]),
]


@pytest.mark.parametrize("case", proof_params(CASES))
def test_rule_matches_derivatives(case):
    check_case(case)


if __name__ == "__main__":
    raise SystemExit(bool(main(CASES, "embedding: ")))
