"""The construction `fs.hf.resize` uses to widen a residual stream through its norms
(fxsurgery/hf/norms.py, LEMON's), checked symbolically: for a stream of d coordinates widened
to D, with

- every new coordinate holding the mean of the old ones (LayerNorm) or zero (RMSNorm),
- the norm's epsilon scaled by d/D, its old weights by sqrt(d/D), its new bias zero,

the widened norm's outputs at the old coordinates are the old norm's outputs, and at the new
coordinates zero: exactly, for every input, weight, bias and epsilon (symbols, not numbers).
That the stream's new coordinates do hold the mean follows from the writers: the stream is a
sum of writes, each writer writes the mean of its old outputs into every new coordinate (a
linear map's new rows and bias are the means of its old ones; an embedding's new columns the
means of its old ones), and a mean of sums is the sum of means. That is checked here too, for
two writers of symbolic weights.

    python -m pytest proofs/prove_widen_norms.py
"""
from __future__ import annotations

import pytest
import sympy as sp

SIZES = [(2, 3), (2, 4), (3, 5), (4, 6)]   # (d, D): 1.5x, 2x and other ratios


def _layer_norm(x, w, b, eps):
    n = len(x)
    mu = sp.Add(*x) / n
    var = sp.Add(*[(t - mu) ** 2 for t in x]) / n
    return [wi * (t - mu) / sp.sqrt(var + eps) + bi for t, wi, bi in zip(x, w, b)]


def _rms_norm(x, w, eps):
    n = len(x)
    ms = sp.Add(*[t ** 2 for t in x]) / n
    return [wi * t / sp.sqrt(ms + eps) for t, wi in zip(x, w)]


def _widened(d, D, fill):
    x = sp.symbols(f"x0:{d}", real=True)
    w = sp.symbols(f"w0:{d}", real=True)
    b = sp.symbols(f"b0:{d}", real=True)
    w_new = sp.symbols(f"v0:{D - d}", real=True)       # the new weights are free: they meet zero
    eps = sp.Symbol("eps", positive=True)
    new_coord = sp.Add(*x) / d if fill == "mean" else sp.Integer(0)
    X = list(x) + [new_coord] * (D - d)
    W = [wi * sp.sqrt(sp.Rational(d, D)) for wi in w] + list(w_new)
    return x, w, b, eps, X, W


def _equal(a, b) -> bool:
    return sp.simplify(sp.radsimp(a - b)) == 0


@pytest.mark.parametrize("d,D", SIZES)
def test_layer_norm_widened_with_means_is_exact(d, D):
    x, w, b, eps, X, W = _widened(d, D, "mean")
    old = _layer_norm(x, w, b, eps)
    new = _layer_norm(X, W, list(b) + [0] * (D - d), eps * sp.Rational(d, D))
    assert all(_equal(o, n) for o, n in zip(old, new[:d]))
    assert all(_equal(n, 0) for n in new[d:])


@pytest.mark.parametrize("d,D", SIZES)
def test_rms_norm_widened_with_zeros_is_exact(d, D):
    x, w, _, eps, X, W = _widened(d, D, "zero")
    old = _rms_norm(x, w, eps)
    new = _rms_norm(X, W, eps * sp.Rational(d, D))
    assert all(_equal(o, n) for o, n in zip(old, new[:d]))
    assert all(_equal(n, 0) for n in new[d:])


@pytest.mark.parametrize("d,D", SIZES[:2])
def test_the_construction_needs_each_part(d, D):
    """Planted bugs: without the epsilon's scaling, the weights' scaling, or with zeros where
    LayerNorm needs the mean, the widened norm computes something else."""
    x, w, b, eps, X, W = _widened(d, D, "mean")
    old = _layer_norm(x, w, b, eps)
    b_new = list(b) + [0] * (D - d)
    wrong = {
        "epsilon not scaled": _layer_norm(X, W, b_new, eps),
        "weights not scaled": _layer_norm(X, list(w) + W[d:], b_new, eps * sp.Rational(d, D)),
        "zeros, not means": _layer_norm(list(x) + [0] * (D - d), W, b_new, eps * sp.Rational(d, D)),
    }
    for what, new in wrong.items():
        assert not all(_equal(o, n) for o, n in zip(old, new[:d])), what


@pytest.mark.parametrize("d,D", SIZES[:2])
def test_writers_that_write_their_means_put_the_mean_in_the_stream(d, D):
    """Two linear writers h -> A h + a and g -> C g + c add into the stream; each new row (and
    bias) the mean of its old ones: the stream's new coordinates are the mean of its old ones."""
    h, g = sp.symbols("h0:2", real=True), sp.symbols("g0:2", real=True)
    A = sp.Matrix(d, 2, sp.symbols(f"A0:{2 * d}", real=True))
    C = sp.Matrix(d, 2, sp.symbols(f"C0:{2 * d}", real=True))
    a, c = sp.Matrix(sp.symbols(f"a0:{d}", real=True)), sp.Matrix(sp.symbols(f"c0:{d}", real=True))

    def widen(M):
        mean = sp.Matrix([[sp.Add(*M[:, j]) / d for j in range(M.cols)]])
        return M.col_join(sp.Matrix.vstack(*[mean] * (D - d)))
    stream = widen(A) * sp.Matrix(h) + widen(a) + widen(C) * sp.Matrix(g) + widen(c)
    old = stream[:d, 0]
    for k in range(d, D):
        assert _equal(stream[k, 0], sp.Add(*old) / d)
