"""Contractions: linear, mm, bmm, mv, dot, outer, addmm, baddbmm, matmul and einsum, proved
against numpy's einsum / matmul over object arrays of symbols. Each instance is run with every
operand labelled and once per operand turned into a parameter, so that what a weight meets is
proved too (a bias is only added: it meets nothing).
"""
from __future__ import annotations

import numpy as np
import pytest

from proof_harness import Case, D, check_case, main, proof_params, variants


def es(eq):
    return lambda *arrs: np.einsum(eq, *arrs)


def mm(A, B):
    return np.matmul(A, B)


CASES: list[Case] = [
    Case("aten.linear.default",
         variants("aten.linear.default", [D("x", (2, 3)), D("w", (4, 3)), D("b", (4,))],
                  lambda o, x, w, b: o(x, w, b), lambda X, W, B: X @ W.T + B, tag="with bias")
         + variants("aten.linear.default", [D("x", (2, 2, 3)), D("w", (2, 3))],
                    lambda o, x, w: o(x, w), lambda X, W: X @ W.T, tag="3-d input, no bias")),
    Case("aten.mm.default", variants("aten.mm.default", [D("a", (2, 3)), D("b", (3, 2))], lambda o, a, b: o(a, b), mm)),
    Case("aten.bmm.default", variants("aten.bmm.default", [D("a", (2, 2, 3)), D("b", (2, 3, 2))],
                                      lambda o, a, b: o(a, b), mm)),
    Case("aten.mv.default", variants("aten.mv.default", [D("a", (2, 3)), D("v", (3,))], lambda o, a, v: o(a, v), mm)),
    Case("aten.dot.default", variants("aten.dot.default", [D("a", (3,)), D("b", (3,))], lambda o, a, b: o(a, b),
                                      lambda A, B: np.asarray(A @ B, dtype=object))),
    Case("aten.vdot.default", variants("aten.vdot.default", [D("a", (3,)), D("b", (3,))], lambda o, a, b: o(a, b),
                                       lambda A, B: np.asarray(A @ B, dtype=object))),
    Case("aten.inner.default",
         variants("aten.inner.default", [D("a", (3,)), D("b", (3,))], lambda o, a, b: o(a, b),
                  lambda A, B: np.asarray(A @ B, dtype=object), tag="vectors")
         + variants("aten.inner.default", [D("a", (2, 3)), D("b", (4, 3))], lambda o, a, b: o(a, b),
                    lambda A, B: A @ B.T, tag="matrices")),
    Case("aten.outer.default", variants("aten.outer.default", [D("a", (2,)), D("b", (3,))], lambda o, a, b: o(a, b),
                                        es("i,j->ij"))),
    Case("aten.ger.default", variants("aten.ger.default", [D("a", (2,)), D("b", (3,))], lambda o, a, b: o(a, b),
                                      es("i,j->ij"))),
    Case("aten.addmm.default", variants("aten.addmm.default", [D("c", (2,)), D("a", (3, 4)), D("b", (4, 2))],
                                        lambda o, c, a, b: o(c, a, b), lambda C_, A, B: C_ + A @ B)),
    Case("aten.addmv.default", variants("aten.addmv.default", [D("c", (2,)), D("a", (2, 3)), D("v", (3,))],
                                        lambda o, c, a, v: o(c, a, v), lambda C_, A, V: C_ + A @ V)),
    Case("aten.baddbmm.default", variants("aten.baddbmm.default",
                                          [D("c", (2, 2)), D("a", (2, 2, 3)), D("b", (2, 3, 2))],
                                          lambda o, c, a, b: o(c, a, b), lambda C_, A, B: C_ + A @ B)),
    Case("aten.matmul.default",
         variants("aten.matmul.default", [D("a", (3,)), D("b", (3,))], lambda o, a, b: o(a, b),
                  lambda A, B: np.asarray(A @ B, dtype=object), tag="1-d @ 1-d")
         + variants("aten.matmul.default", [D("a", (2, 3)), D("b", (3,))], lambda o, a, b: o(a, b), mm, tag="2-d @ 1-d")
         + variants("aten.matmul.default", [D("a", (3,)), D("b", (2, 3, 2))], lambda o, a, b: o(a, b), mm,
                    tag="1-d @ 3-d")
         + variants("aten.matmul.default", [D("a", (2, 1, 2, 3)), D("b", (2, 3, 2))], lambda o, a, b: o(a, b), mm,
                    tag="broadcast batch")),
    Case("aten.einsum.default",
         [i for eq, shapes in (("ij,jk->ik", [(2, 3), (3, 2)]), ("bij,bjk->bik", [(2, 2, 3), (2, 3, 2)]),
                               ("ij,ij->ij", [(2, 3), (2, 3)]), ("ij,kj", [(2, 3), (2, 3)]),
                               ("...ij,jk->...ik", [(2, 2, 3), (3, 2)]), ("i,i->", [(3,), (3,)]),
                               ("ij->", [(2, 3)]), ("ii->i", [(3, 3)]), ("ij,jk,kl->il", [(2, 2), (2, 2), (2, 2)]))
          for i in variants("aten.einsum.default", [D("abc"[k], s) for k, s in enumerate(shapes)],
                            lambda o, *t, _eq=eq: o(_eq, list(t)),
                            lambda *arrs, _eq=eq: np.asarray(np.einsum(_eq, *arrs), dtype=object), tag=eq)]),
]


@pytest.mark.parametrize("case", proof_params(CASES))
def test_rule_matches_derivatives(case):
    check_case(case)


if __name__ == "__main__":
    raise SystemExit(bool(main(CASES, "contractions: ")))
