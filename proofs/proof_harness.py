"""The machinery shared by the proofs: symbolic instances, their derivative patterns, and the
patterns fxsurgery's rules produce on the same instances.

A proof *case* is one ATen overload with one or more small *instances*. An instance names its
operands (data inputs, parameters, buffers, constants, category inputs), a `call` that applies
the operator to torch tensors, and a `math` function: an independent sympy implementation of
the operator written over numpy object arrays of symbols. For every instance:

1. the math is checked against the operator itself at a random point (so that a wrong formula
   cannot make a proof pass);
2. the Jacobian pattern `d y_k / d x_i != 0` and the mixed pattern
   `d/dx_i d<c, y>/dw_j != 0` (c a symbolic cotangent) are computed symbolically, and each
   non-trivial derivative is evaluated at POINTS random points: an entry is non-zero when it
   is non-zero at some point, i.e. on a set of positive measure (a derivative that exists only
   as a Dirac delta, as for a comparison or a rounding, is zero there). Instances marked
   method="chain" (recurrences, attention) get the same values without building the derivative
   expressions: sympy's derivative of each function node, applied through the chain rule at the
   points (`_Jet`); prove_harness.py checks that the two agree;
3. the same instance is traced with `fs.trace` (every data element is given its own label by
   flattening the input and reshaping it inside `forward`), the boolean mapping is run, and the
   deps-mode label sets of the operator's node and the labels each parameter element meets are
   read back;
4. the two patterns must be equal: a label the derivative has and the rule lacks is a
   soundness bug ("missing"), a label the rule has and the derivative lacks is an exactness
   bug ("extra").
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import sympy as sp
import torch
from torch.utils._pytree import tree_flatten

import fxsurgery as fs
from fxsurgery.label_tensor import LabelTensor
from fxsurgery.rules import REGISTRY

aten = torch.ops.aten
HERE = Path(__file__).resolve().parent
POINTS = 64          # random points per instance at which derivatives are evaluated
TOL = 1e-9           # |derivative| above this counts as non-zero
VALUE_RTOL = 1e-6    # math vs operator at the example point

__all__ = ["Operand", "Instance", "Case", "op_of", "sym_array", "ew", "reduce_axes", "aux", "kth_smallest",
           "step_floor", "step_ceil", "step_round", "step_trunc", "H", "gt0", "run_instance", "check_case",
           "proof_params", "main", "covered_ops", "load_proof_modules", "D", "P", "C", "Cat", "variants"]


# --------------------------------------------------------------------------------------------
# symbolic helpers for writing the math

class _Step(sp.Function):
    """A piecewise-constant function: its derivative is zero except on a null set."""

    def fdiff(self, argindex=1):
        return sp.S.Zero


class step_floor(_Step):
    pass


class step_ceil(_Step):
    pass


class step_round(_Step):
    pass


class step_trunc(_Step):
    pass


_NUMERIC = {
    "step_floor": np.floor, "step_ceil": np.ceil, "step_round": np.round, "step_trunc": np.trunc,
    "DiracDelta": lambda *a: np.zeros_like(np.asarray(a[0], dtype=float)),
}
_MODULES = [_NUMERIC, "scipy", "numpy"]


def H(e):
    """Heaviside step (value 1/2 at 0, derivative a Dirac delta)."""
    return sp.Heaviside(e)


def gt0(s):
    """A boolean operand is modelled by a real relaxation s: True means s > 0."""
    return sp.Piecewise((sp.S.One, s > 0), (sp.S.Zero, True))


def sym_array(prefix: str, shape: Sequence[int]) -> np.ndarray:
    shape = tuple(shape)
    out = np.empty(shape, dtype=object)
    for idx in np.ndindex(*shape):
        # identifier-like names: lambdify would otherwise rebuild every expression
        out[idx] = sp.Symbol(f"{prefix}_{'_'.join(map(str, idx))}" if idx else prefix, real=True)
    return out


_AUX: dict[sp.Symbol, tuple] = {}


def aux(name: str, shape: Sequence[int], kind: str = "uniform", a: float = 0.0, b: float = 1.0) -> np.ndarray:
    """Auxiliary random variables (dropout masks, sampled uniforms, uninitialised memory):
    symbols that carry no label, drawn at every point from `kind` ("uniform" on [a, b],
    "bernoulli" with P(1) = a)."""
    arr = sym_array(f"_{name}", shape)
    for s in arr.reshape(-1):
        _AUX[s] = (kind, a, b)
    return arr


def ew(f: Callable, *arrays) -> np.ndarray:
    """Applies a scalar sympy function element-wise over broadcast object arrays."""
    arrs = [np.asarray(a, dtype=object) for a in arrays]
    shape = np.broadcast_shapes(*[a.shape for a in arrs])
    arrs = [np.broadcast_to(a, shape) for a in arrs]
    out = np.empty(shape, dtype=object)
    for idx in np.ndindex(*shape):
        out[idx] = f(*[a[idx] for a in arrs])
    return out


def _axes(axes, ndim: int) -> list[int]:
    if axes is None:
        return list(range(ndim))
    if isinstance(axes, int):
        axes = [axes]
    return sorted({a % ndim for a in axes}) if len(axes) else list(range(ndim))


def reduce_axes(X, axes, f: Callable[[list], Any], keepdim: bool = False) -> np.ndarray:
    """`f(list of the reduced elements)` over `axes` (None: all)."""
    X = np.asarray(X, dtype=object)
    ax = _axes(axes, X.ndim)
    moved = np.moveaxis(X, ax, list(range(X.ndim - len(ax), X.ndim)))
    lead = moved.shape[: X.ndim - len(ax)]
    flat = moved.reshape(lead + (-1,))
    out = np.empty(lead, dtype=object)
    for idx in np.ndindex(*lead):
        out[idx] = f(list(flat[idx]))
    if keepdim:
        out = out.reshape([1 if d in ax else s for d, s in enumerate(X.shape)])
    return out


def kth_smallest(values: list, k: int):
    """The k-th smallest (k from 1) of generic reals: min over k-subsets of their max."""
    return sp.Min(*[sp.Max(*c) for c in itertools.combinations(values, k)])


# --------------------------------------------------------------------------------------------
# instances and cases

@dataclass
class Operand:
    name: str
    shape: tuple
    role: str = "data"            # data | param | buffer | const | categories
    domain: tuple = (-2.0, 2.0)   # where values are drawn (data, parameters)
    dtype: torch.dtype = torch.float64
    value: Any = None             # const: the fixed tensor
    categories: int = 0           # categories: vocabulary size
    example: Optional[Callable] = None  # rng -> tensor, when random values will not do (sorted)
    label_axis: Optional[int] = None    # data: one label per position along this axis (Features(dim=axis))


@dataclass
class Instance:
    op: str
    operands: list
    call: Callable                # call(op, *tensors) -> output
    math: Callable                # math(*arrays) -> array or tuple (None: an integer output)
    label: str = ""
    check_values: bool = True     # False for random operators
    points: int = POINTS
    # torch.export rewrites a few operators into an equivalent one (lift_fresh -> lift_fresh_copy);
    # nodes of these targets are retargeted to the operator under test before propagation
    substitute: tuple = ()
    # "symbolic": sympy derivative expressions, evaluated; "chain": sympy's derivative rules
    # applied through the chain rule at the points (same values; for deep recurrences)
    method: str = "symbolic"


@dataclass
class Case:
    op: str
    instances: list
    note: str = ""

    @property
    def overload(self):
        return op_of(self.op)


def op_of(name: str):
    """'aten.relu.default' or 'relu.default' -> the overload, or None in this torch build."""
    name = name[5:] if name.startswith("aten.") else name
    packet, _, overload = name.partition(".")
    try:
        return getattr(getattr(aten, packet), overload or "default")
    except AttributeError:
        return None


def D(name, shape, **kw) -> Operand:
    return Operand(name, tuple(shape), "data", **kw)


def P(name, shape, **kw) -> Operand:
    return Operand(name, tuple(shape), "param", **kw)


def Cat(name, shape, n: int) -> Operand:
    """An integer index input labelled as categories 0..n-1 (modelled by its one-hot relaxation)."""
    return Operand(name, tuple(shape), "categories", categories=n)


def C(name, value) -> Operand:
    """A constant tensor operand (no labels; its value is known to the rules)."""
    return Operand(name, tuple(value.shape), "const", value=value)


def variants(op: str, operands: list, call: Callable, math: Callable, params: Optional[Sequence[int]] = None,
             check_values: bool = True, tag: str = "") -> list:
    """The instance where every operand is a labelled data input and, for each position in
    `params` (default: every floating-point data operand), the instance where that operand is
    a parameter instead."""
    from dataclasses import replace
    if params is None:
        params = [k for k, o in enumerate(operands) if o.role == "data" and o.dtype.is_floating_point]
    out = [Instance(op, list(operands), call, math, check_values=check_values,
                    label=(tag + " " if tag else "") + "data " + ", ".join(f"{o.name}{list(o.shape)}" for o in operands))]
    for k in params:
        ops_k = [replace(o, role="param") if j == k else o for j, o in enumerate(operands)]
        out.append(Instance(op, ops_k, call, math, check_values=check_values,
                            label=(tag + " " if tag else "") + f"param {operands[k].name}{list(operands[k].shape)}"))
    return out


# --------------------------------------------------------------------------------------------
# running one instance

@dataclass
class Outcome:
    case: str
    instance: str
    missing: list = field(default_factory=list)   # (where, labels) the derivative has, the rule lacks
    extra: list = field(default_factory=list)     # (where, labels) the rule has, the derivative lacks
    error: str = ""
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.error)

    def report(self, limit: int = 8) -> str:
        if self.ok:
            return f"{self.case} [{self.instance}]: proved"
        lines = [f"{self.case} [{self.instance}]:"]
        if self.error:
            lines.append(f"  error: {self.error}")
        for kind, rows in (("UNSOUND (derivative non-zero, rule lacks the label)", self.missing),
                           ("INEXACT (rule has a label, derivative zero)", self.extra)):
            if rows:
                lines.append(f"  {kind}: {len(rows)} element(s)")
                for where, exp, got in rows[:limit]:
                    lines.append(f"    {where}: derivative {_fmt(exp)}, rule {_fmt(got)}")
        return "\n".join(lines)


def _fmt(labels) -> str:
    return "{" + ", ".join(sorted(labels)) + "}"


def _example(operand: Operand, rng: np.random.Generator) -> torch.Tensor:
    shape = operand.shape
    if operand.example is not None:
        return operand.example(rng)
    if operand.role == "const":
        return operand.value
    if operand.role == "categories":
        return torch.from_numpy(rng.integers(0, operand.categories, size=shape)).long()
    if operand.dtype == torch.bool:
        return torch.from_numpy(rng.random(size=shape) < 0.5)
    lo, hi = operand.domain
    return torch.from_numpy(rng.uniform(lo, hi, size=shape)).to(operand.dtype)


class _Probe(torch.nn.Module):
    """A module that reshapes each flat labelled input and applies the operator."""

    def __init__(self, inst: Instance, values: dict):
        super().__init__()
        self._op = op_of(inst.op)
        self._call = inst.call
        self._operands = inst.operands
        for o in inst.operands:
            if o.role == "param":
                setattr(self, o.name, torch.nn.Parameter(values[o.name].clone()))
            elif o.role == "buffer":
                self.register_buffer(o.name, values[o.name].clone())
            elif o.role == "const":
                setattr(self, f"const_{o.name}", values[o.name])

    def forward(self, *flat):
        it = iter(flat)
        tensors = []
        for o in self._operands:
            if o.role in ("data", "categories"):
                tensors.append(next(it).reshape(o.shape))
            elif o.role == "const":
                tensors.append(getattr(self, f"const_{o.name}"))
            else:
                tensors.append(getattr(self, o.name))
        return self._call(self._op, *tensors)


def _flat_names(o: Operand) -> list[str]:
    if o.label_axis is not None:
        return [f"{o.name}:{i}" for i in range(o.shape[o.label_axis])]
    return [f"{o.name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*o.shape)] or [f"{o.name}[]"]


def _label_name(o: Operand, idx: tuple) -> str:
    if o.label_axis is not None:
        return f"{o.name}:{idx[o.label_axis]}"
    return f"{o.name}[{','.join(map(str, idx))}]"


def _symbols(inst: Instance):
    """Symbol arrays per operand (const operands: their numpy value), and for each labelled
    symbol the label it stands for."""
    arrays, label_of, params = [], {}, []
    for o in inst.operands:
        if o.role == "const":
            arrays.append(o.value.numpy() if isinstance(o.value, torch.Tensor) else np.asarray(o.value))
            continue
        if o.role == "categories":
            arr = sym_array(f"{o.name}_onehot", tuple(o.shape) + (o.categories,))
            for idx in np.ndindex(*arr.shape):
                label_of[arr[idx]] = f"{o.name}=cat{idx[-1]}"
        else:
            arr = sym_array(o.name, o.shape)
            if o.role == "data":
                for idx in np.ndindex(*o.shape):
                    label_of[arr[idx]] = _label_name(o, idx)
            else:
                params.append((o, arr))
        arrays.append(arr)
    return arrays, label_of, params


def _as_outputs(out) -> list:
    if isinstance(out, (tuple, list)):
        return list(out)
    return [out]


_REL = {">": np.greater, "<": np.less, ">=": np.greater_equal, "<=": np.less_equal, "==": np.equal,
        "!=": np.not_equal}
_FUNCS: dict = {}


def _function(func, nargs: int):
    """A numpy version of one sympy function class (compiled once per class and arity)."""
    key = (func, nargs)
    f = _FUNCS.get(key)
    if f is None:
        dummies = sp.symbols(f"_a0:{nargs}", real=True)
        f = _FUNCS[key] = sp.lambdify(dummies, func(*dummies), modules=_MODULES)
    return f


class _Evaluator:
    """Evaluates sympy expressions at many points at once, each distinct sub-expression once
    (derivative expressions share most of their sub-trees; printing them whole for lambdify
    would cost far more than the arithmetic)."""

    def __init__(self, values: dict, n: int, sample: Optional[Callable] = None):
        self.values = values
        self.n = n
        self.sample = sample
        self.memo: dict = {}

    def __call__(self, e):
        got = self.memo.get(e)
        if got is None:
            got = self.memo[e] = self._eval(e)
        return got

    def _eval(self, e):
        if e.is_Symbol:
            if e not in self.values:
                if self.sample is None:
                    raise RuntimeError(f"no values for symbol {e}")
                self.values[e] = self.sample(e)
            return self.values[e]
        if e.is_Number or e.is_NumberSymbol:
            return np.float64(float(e))
        if e is sp.true or e is sp.false:
            return np.bool_(bool(e))
        args = e.args
        if e.is_Add:
            out = self(args[0])
            for a in args[1:]:
                out = out + self(a)
            return out
        if e.is_Mul:
            out = self(args[0])
            for a in args[1:]:
                out = out * self(a)
            return out
        if e.is_Pow:
            base, ex = self(args[0]), self(args[1])
            return np.power(np.asarray(base, dtype=float), ex)
        if isinstance(e, sp.Piecewise):
            conds = [np.broadcast_to(self(c), (self.n,)) for _, c in args]
            vals = [np.broadcast_to(np.asarray(self(v), dtype=float), (self.n,)) for v, _ in args]
            return np.select(conds, vals, default=np.nan)
        if isinstance(e, sp.core.relational.Relational):
            return _REL[e.rel_op](self(e.lhs), self(e.rhs))
        if isinstance(e, sp.And):
            return functools.reduce(np.logical_and, [self(a) for a in args])
        if isinstance(e, sp.Or):
            return functools.reduce(np.logical_or, [self(a) for a in args])
        if isinstance(e, sp.Not):
            return np.logical_not(self(args[0]))
        if isinstance(e, sp.Heaviside):
            return np.heaviside(np.asarray(self(args[0]), dtype=float), 0.5)
        if isinstance(e, sp.DiracDelta):
            return np.zeros_like(np.asarray(self(args[0]), dtype=float))
        if isinstance(e, sp.Max):
            return functools.reduce(np.maximum, [np.asarray(self(a), dtype=float) for a in args])
        if isinstance(e, sp.Min):
            return functools.reduce(np.minimum, [np.asarray(self(a), dtype=float) for a in args])
        if isinstance(e, (sp.Derivative, sp.Subs)):
            raise RuntimeError(f"unevaluated derivative {e}: write the formula with step_* functions")
        if isinstance(e, sp.Function):
            return _function(e.func, len(args))(*[self(a) for a in args])
        raise RuntimeError(f"cannot evaluate {type(e).__name__}: {e}")


_PARTIALS: dict = {}


def _partials(func, m: int, first: tuple, second: tuple):
    """sympy's own derivatives of one function class: f, df/da for a in `first`, d2f/dadb for
    (a, b) in `second`, as expressions in dummy arguments."""
    key = (func, m, first, second)
    got = _PARTIALS.get(key)
    if got is None:
        d = sp.symbols(f"_d0:{m}", real=True)
        f = func(*d)
        got = _PARTIALS[key] = (d, [f] + [f.diff(d[a]) for a in first] + [f.diff(d[a], d[b]) for a, b in second])
    return got


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


class _Jet:
    """Second-order forward differentiation over the expression DAG, at n points at once.

    Each node gets (value, d/dx, d/dw, d2/dxdw) for the labelled symbols x and the parameter
    symbols w (None where identically zero). The derivative rules of every function are
    sympy's own (`f.diff`), applied through the chain rule numerically: this evaluates exactly
    the symbolic derivatives at the sample points, without building the expressions, whose
    size grows exponentially through a recurrence."""

    def __init__(self, xs: list, ws: list, values: dict, n: int, sample: Callable):
        self.xi = {s: i for i, s in enumerate(xs)}
        self.wi = {s: i for i, s in enumerate(ws)}
        self.nx, self.nw, self.n = len(xs), len(ws), n
        self.values = values
        self.ev = _Evaluator(values, n, sample)
        self.memo: dict = {}

    def __call__(self, e):
        got = self.memo.get(e)
        if got is None:
            got = self.memo[e] = self._jet(e)
        return got

    def _jet(self, e):
        n = self.n
        if e.is_Symbol:
            v = self.ev(e)
            gx = gw = None
            if e in self.xi:
                gx = np.zeros((self.nx, n))
                gx[self.xi[e]] = 1.0
            if e in self.wi:
                gw = np.zeros((self.nw, n))
                gw[self.wi[e]] = 1.0
            return (v, gx, gw, None)
        if e.is_Number or e.is_NumberSymbol or not e.args:
            return (self.ev(e), None, None, None)
        if e.is_Add:
            v, gx, gw, gxw = 0.0, None, None, None
            for a in e.args:
                av, ax, aw, axw = self(a)
                v, gx, gw, gxw = v + av, _add(gx, ax), _add(gw, aw), _add(gxw, axw)
            return (v, gx, gw, gxw)
        if e.is_Mul:
            acc = self(e.args[0])
            for a in e.args[1:]:
                acc = self._mul(acc, self(a))
            return acc
        if isinstance(e, sp.Piecewise):
            conds = [np.broadcast_to(self.ev(c), (n,)) for _, c in e.args]
            parts = [self(v) for v, _ in e.args]
            out = []
            for k, shape in enumerate(((n,), (self.nx, n), (self.nw, n), (self.nx, self.nw, n))):
                if k and all(p[k] is None for p in parts):
                    out.append(None)
                    continue
                vals = [np.broadcast_to(np.asarray(0.0 if p[k] is None else p[k], dtype=float), shape) for p in parts]
                out.append(np.select([np.broadcast_to(c, shape) for c in conds], vals, default=np.nan))
            return tuple(out)
        if isinstance(e, (sp.Derivative, sp.Subs)):
            raise RuntimeError(f"unevaluated derivative {e}: write the formula with step_* functions")
        # any other node: a function of its arguments, differentiated by sympy
        args = [self(a) for a in e.args]
        first = tuple(k for k, a in enumerate(args) if a[1] is not None or a[2] is not None)
        if not first:
            return (self.ev(e), None, None, None)
        second = tuple((a, b) for a in first for b in first if args[a][1] is not None and args[b][2] is not None)
        d, exprs = _partials(e.func, len(args), first, second)
        ev = _Evaluator({d[k]: a[0] for k, a in enumerate(args)}, n)
        vals = [ev(x) for x in exprs]
        v, df, d2 = vals[0], dict(zip(first, vals[1:1 + len(first)])), dict(zip(second, vals[1 + len(first):]))
        gx = gw = gxw = None
        for a in first:
            _, ax, aw, axw = args[a]
            if ax is not None:
                gx = _add(gx, df[a] * ax)
            if aw is not None:
                gw = _add(gw, df[a] * aw)
            if axw is not None:
                gxw = _add(gxw, df[a] * axw)
        for a, b in second:
            gxw = _add(gxw, d2[(a, b)] * args[a][1][:, None, :] * args[b][2][None, :, :])
        return (v, gx, gw, gxw)

    @staticmethod
    def _mul(p, q):
        pv, px, pw, pxw = p
        qv, qx, qw, qxw = q
        gx = _add(None if px is None else px * qv, None if qx is None else qx * pv)
        gw = _add(None if pw is None else pw * qv, None if qw is None else qw * pv)
        gxw = _add(None if pxw is None else pxw * qv, None if qxw is None else qxw * pv)
        if px is not None and qw is not None:
            gxw = _add(gxw, px[:, None, :] * qw[None, :, :])
        if qx is not None and pw is not None:
            gxw = _add(gxw, qx[:, None, :] * pw[None, :, :])
        return (pv * qv, gx, gw, gxw)


def _evaluate(exprs: list, values: dict, n: int) -> list[np.ndarray]:
    """Each expression evaluated at the n points of `values` (symbol -> array of n)."""
    ev = _Evaluator(values, n)
    out = []
    with np.errstate(all="ignore"):
        for e in exprs:
            r = ev(e)
            arr = np.broadcast_to(np.asarray(r, dtype=complex if np.iscomplexobj(r) else float), (n,))
            if np.iscomplexobj(arr) or not np.all(np.isfinite(arr)):
                raise RuntimeError(f"non-finite or complex value of {str(e)[:200]} at a sample point "
                                   "(instance domain?)")
            out.append(arr)
    return out


def _sampler(operands_by_sym: dict, n: int, rng: np.random.Generator) -> Callable:
    """symbol -> its n sample values: operands from their domain, booleans and one-hot
    coordinates on [-1, 1], auxiliary variables from their law, cotangents on [-1, 1]."""
    def sample(s):
        if s in _AUX:
            kind, a, b = _AUX[s]
            return (rng.random(n) < a).astype(float) if kind == "bernoulli" else rng.uniform(a, b, n)
        o = operands_by_sym.get(s)
        if o is not None and o.role != "categories" and o.dtype != torch.bool:
            return rng.uniform(*o.domain, n)
        return rng.uniform(-1.0, 1.0, n)
    return sample


def _nonzero(exprs_by_key: dict, values: dict, n: int) -> dict:
    """key -> bool: is the expression non-zero at some of the n points."""
    result, pending = {}, []
    for key, e in exprs_by_key.items():
        if e == 0:
            result[key] = False
        elif e.is_number:
            result[key] = bool(abs(complex(e)) > TOL)
        else:
            pending.append((key, e))
    for (key, _), v in zip(pending, _evaluate([e for _, e in pending], values, n)):
        result[key] = bool(np.any(np.abs(v) > TOL))
    return result


def _check_values(inst: Instance, outs: list, arrays, example: dict, label_of) -> Optional[str]:
    """The math at the example point must equal the operator's own result."""
    op = op_of(inst.op)
    tensors = [example[o.name] for o in inst.operands]
    with torch.no_grad():
        real = [t for t in tree_flatten(inst.call(op, *[t.clone() if isinstance(t, torch.Tensor) else t
                                                        for t in tensors]))[0]
                if isinstance(t, torch.Tensor)]
    if len(real) != len(outs):
        return f"math gives {len(outs)} outputs, the operator {len(real)}"
    point = {}
    for o, arr in zip(inst.operands, arrays):
        if o.role == "const":
            continue
        val = example[o.name]
        if o.role == "categories":
            val = torch.nn.functional.one_hot(val, o.categories).double()
        elif val.dtype == torch.bool:
            val = val.double() - 0.5
        for idx in np.ndindex(*arr.shape):
            point[arr[idx]] = np.array([float(val[idx])])
    for k, (m, r) in enumerate(zip(outs, real)):
        if m is None:
            continue
        if tuple(m.shape) != tuple(r.shape):
            return f"output {k}: math has shape {tuple(m.shape)}, the operator {tuple(r.shape)}"
        exprs = [sp.sympify(e) for e in m.reshape(-1)]
        got = np.array([v[0] for v in _evaluate(exprs, point, 1)]) if exprs else np.zeros(0)
        want = r.detach().double().reshape(-1).numpy()
        rtol = VALUE_RTOL if r.dtype == torch.float64 or not r.dtype.is_floating_point else 1e-4
        if not np.allclose(got, want, rtol=rtol, atol=rtol * 1e-2):
            bad = int(np.argmax(np.abs(got - want)))
            return (f"output {k}: math and operator disagree at element {bad}: {got[bad]} vs {want[bad]} "
                    f"(the proof's formula is wrong)")
    return None


def _rule_patterns(inst: Instance, example: dict, registry=REGISTRY):
    """(deps label sets per output element, labels met per parameter element) from fxsurgery."""
    probe = _Probe(inst, example)
    inputs, features = {}, {}
    for o in inst.operands:
        if o.role in ("data", "categories"):
            whole = o.role == "data" and o.label_axis is not None
            inputs[o.name] = example[o.name] if whole else example[o.name].reshape(-1)
            if o.role == "data":
                features[o.name] = fs.Features(_flat_names(o), dim=o.label_axis if whole else -1)
            else:
                features[o.name] = fs.Categories([f"cat{v}" for v in range(o.categories)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = fs.trace(probe, inputs, features)
        op = op_of(inst.op)
        for n in traced.graph.nodes:
            if n.op == "call_function" and str(n.target) in inst.substitute:
                n.target = op
        nodes = [n for n in traced.graph.nodes if n.op == "call_function" and n.target == op]
        if not nodes:
            got = sorted({str(n.target) for n in traced.graph.nodes if n.op == "call_function"})
            raise RuntimeError(f"torch.export did not keep {inst.op} (graph has {got})")
        imap = fs.interaction_map(traced, keys=False, registry=registry)
    node = nodes[-1]
    result = node.meta["fxsurgery"]["deps"]
    pool = imap.pool

    def name(label) -> str:
        if label.kind == "category":
            return f"{label.group}={label.name}"
        return label.name if label.kind == "feature" else str(label)

    deps = []
    for lt in [v for v in tree_flatten(result)[0] if isinstance(v, LabelTensor)]:
        dense = lt.dense()
        sets = np.empty(tuple(lt.shape), dtype=object)
        for idx in np.ndindex(*lt.shape):
            sets[idx] = {name(l) for l in pool.labels_in(int(dense[idx]))}
        deps.append(sets)
    meets = {}
    for o in inst.operands:
        if o.role in ("param", "buffer"):
            sets = np.empty(o.shape, dtype=object)
            for idx in np.ndindex(*o.shape):
                sets[idx] = {name(l) for l in imap.element_labels(o.name, idx)}
            meets[o.name] = sets
    return deps, meets


def _patterns_symbolic(outs, label_of, params, sample, n):
    """{(output, index, symbol): nonzero} and {(param, index, symbol): nonzero}, from sympy's
    derivative expressions evaluated at n points."""
    labelled = set(label_of)
    cots, jac_exprs, mixed_exprs = [], {}, {}
    for k, m in enumerate(outs):
        if m is None:
            continue
        c = sym_array(f"_c{k}", m.shape)
        for idx in np.ndindex(*m.shape):
            y = m[idx]
            for s in y.free_symbols & labelled:
                jac_exprs[(k, idx, s)] = sp.diff(y, s)
            cots.append((c[idx], y))
    for o, arr in params:
        for idx in np.ndindex(*o.shape):
            w = arr[idx]
            g = sp.Add(*[c * sp.diff(y, w) for c, y in cots if w in y.free_symbols])
            for s in g.free_symbols & labelled:
                mixed_exprs[(o.name, idx, s)] = sp.diff(g, s)
    exprs = list(jac_exprs.values()) + list(mixed_exprs.values())
    needed = set().union(*[e.free_symbols for e in exprs]) if exprs else set()
    values = {s: sample(s) for s in sorted(needed, key=str)}
    both = _nonzero({**{("jac",) + k: e for k, e in jac_exprs.items()},
                     **{("mixed",) + k: e for k, e in mixed_exprs.items()}}, values, n)
    return ({k[1:]: v for k, v in both.items() if k[0] == "jac"},
            {k[1:]: v for k, v in both.items() if k[0] == "mixed"})


def _patterns_chain(outs, label_of, params, sample, n):
    """The same two patterns by second-order forward differentiation over the expression DAG
    (for recurrences, whose derivative expressions are too large to build)."""
    xs = list(label_of)
    ws = [arr[idx] for o, arr in params for idx in np.ndindex(*o.shape)]
    jet = _Jet(xs, ws, {}, n, sample)
    jac, terms = {}, []
    with np.errstate(all="ignore"):
        for k, m in enumerate(outs):
            if m is None:
                continue
            c = sym_array(f"_c{k}", m.shape)
            for idx in np.ndindex(*m.shape):
                _, gx, _, _ = jet(m[idx])
                terms.append(c[idx] * m[idx])
                if gx is not None:
                    gx = np.broadcast_to(gx, (len(xs), n))
                    _finite(gx, m[idx])
                    for i in np.nonzero(np.any(np.abs(gx) > TOL, axis=1))[0]:
                        jac[(k, idx, xs[i])] = True
        mixed = {}
        if ws and terms:
            _, _, _, gxw = jet(sp.Add(*terms))
            if gxw is not None:
                gxw = np.broadcast_to(gxw, (len(xs), len(ws), n))
                _finite(gxw, "the mixed derivative")
                nz = np.any(np.abs(gxw) > TOL, axis=2)
                names = [(o.name, idx) for o, arr in params for idx in np.ndindex(*o.shape)]
                for i, j in zip(*np.nonzero(nz)):
                    mixed[names[j] + (xs[i],)] = True
    return jac, mixed


def _finite(arr, what) -> None:
    if not np.all(np.isfinite(arr)):
        raise RuntimeError(f"non-finite derivative of {str(what)[:200]} at a sample point (instance domain?)")


def run_instance(inst: Instance, registry=REGISTRY) -> Outcome:
    """Proves one instance against the rules of `registry`."""
    label = inst.label or ", ".join(f"{o.name}{list(o.shape)}" for o in inst.operands)
    outcome = Outcome(inst.op, label)
    seed = zlib.crc32(f"{inst.op}|{label}".encode())
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed % (1 << 31))
    try:
        arrays, label_of, params = _symbols(inst)
        outs = [None if m is None else np.asarray(m, dtype=object) for m in _as_outputs(inst.math(*arrays))]
        outs = [None if m is None else ew(sp.sympify, m) for m in outs]
        example = {o.name: _example(o, rng) for o in inst.operands}
        if inst.check_values:
            problem = _check_values(inst, outs, arrays, example, label_of)
            if problem:
                outcome.error = problem
                return outcome
        # symbolic patterns ---------------------------------------------------------------
        by_sym = {}
        for o, arr in zip(inst.operands, arrays):
            if o.role != "const":
                for s in np.asarray(arr).reshape(-1):
                    by_sym[s] = o
        labelled = set(label_of)
        pattern = _patterns_chain if inst.method == "chain" else _patterns_symbolic
        jac, mixed = pattern(outs, label_of, params, _sampler(by_sym, inst.points, rng), inst.points)
        # the rule's patterns ---------------------------------------------------------------
        deps, meets = _rule_patterns(inst, example, registry)
    except Exception as err:  # noqa: BLE001 - reported as this instance's error
        first = (str(err).strip().splitlines() or [""])[0]
        outcome.error = f"{type(err).__name__}: {first[:400]}"
        return outcome
    expected_deps = []
    for k, m in enumerate(outs):
        if k >= len(deps):
            break
        shape = deps[k].shape if m is None else m.shape
        exp = np.empty(shape, dtype=object)
        for idx in np.ndindex(*shape):
            exp[idx] = set()
        expected_deps.append(exp)
    for (k, idx, s), nz in jac.items():
        if nz:
            expected_deps[k][idx].add(label_of[s])
    if len(deps) != len(outs):
        outcome.error = f"the rule gives {len(deps)} outputs, the math {len(outs)}"
        return outcome
    for k, (exp, got) in enumerate(zip(expected_deps, deps)):
        if exp.shape != got.shape:
            outcome.error = f"output {k}: math shape {exp.shape}, rule shape {got.shape}"
            return outcome
        for idx in np.ndindex(*exp.shape):
            e, g = exp[idx], got[idx]
            where = f"out{k}[{','.join(map(str, idx))}]" if len(outs) > 1 else f"y[{','.join(map(str, idx))}]"
            if e - g:
                outcome.missing.append((where, e, g))
            elif g - e:
                outcome.extra.append((where, e, g))
    for o, arr in params:
        exp = np.empty(o.shape, dtype=object)
        for idx in np.ndindex(*o.shape):
            exp[idx] = set()
        for (name, idx, s), nz in mixed.items():
            if name == o.name and nz:
                exp[idx].add(label_of[s])
        got = meets[o.name]
        for idx in np.ndindex(*o.shape):
            e, g = exp[idx], got[idx]
            where = f"{o.name}[{','.join(map(str, idx))}] meets"
            if e - g:
                outcome.missing.append((where, e, g))
            elif g - e:
                outcome.extra.append((where, e, g))
    return outcome


# --------------------------------------------------------------------------------------------
# cases under pytest and as scripts

def case_status(case: Case) -> Optional[str]:
    """Why a case cannot run here (None: it can)."""
    op = case.overload
    if op is None:
        return f"{case.op} does not exist in torch {torch.__version__}"
    if op not in REGISTRY:
        return f"no rule is registered for {case.op} yet"
    return None


def check_case(case: Case) -> list[Outcome]:
    import pytest
    why = case_status(case)
    if why:
        pytest.skip(why)
    outcomes = [run_instance(i) for i in case.instances]
    bad = [o for o in outcomes if not o.ok]
    assert not bad, "\n".join(o.report() for o in bad)
    return outcomes


def proof_params(cases: list) -> list:
    import pytest
    return [pytest.param(c, id=c.op) for c in cases]


def main(cases: list, title: str = "") -> int:
    """Prints one line per operator and a summary; returns the number of failing operators."""
    from tabulate import tabulate
    rows, failing, details = [], 0, []
    for case in cases:
        why = case_status(case)
        rule = REGISTRY.get(case.overload) if case.overload is not None else None
        if why:
            rows.append([case.op, rule.family if rule else "missing", len(case.instances), "skipped", "", why])
            continue
        t0 = time.perf_counter()
        outcomes = [run_instance(i) for i in case.instances]
        dt = time.perf_counter() - t0
        bad = [o for o in outcomes if not o.ok]
        status = "proved" if not bad else ("ERROR" if any(o.error for o in bad) else "MISMATCH")
        failing += bool(bad)
        summary = "; ".join(o.error or f"{len(o.missing)} unsound, {len(o.extra)} inexact" for o in bad)
        rows.append([case.op, rule.family, len(case.instances), status, f"{dt:.2f}s", summary[:90]])
        details += [o.report() for o in bad]
    print(tabulate(rows, headers=["operator", "family", "instances", "result", "time", "detail"]))
    proved = sum(r[3] == "proved" for r in rows)
    print(f"\n{title}{proved} proved, {failing} failing, {sum(r[3] == 'skipped' for r in rows)} skipped "
          f"of {len(rows)} operators")
    if details:
        print("\n" + "\n".join(details))
    return failing


# --------------------------------------------------------------------------------------------
# what the proofs cover (read by fxsurgery.coverage and prove_registry_coverage)

def load_proof_modules() -> dict:
    """Every proofs/prove_*.py module that defines CASES, by file stem."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    mods = {}
    for path in sorted(HERE.glob("prove_*.py")):
        if "\nCASES" not in path.read_text():
            continue  # checks of the tables and of the harness, not proof cases
        name = path.stem
        mod = sys.modules.get(name)
        if mod is None or getattr(mod, "__file__", None) != str(path):
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        if hasattr(mod, "CASES"):
            mods[name] = mod
    return mods


def covered_ops() -> dict:
    """'aten.x.y' -> the proof modules with a case for it."""
    out: dict = {}
    for name, mod in load_proof_modules().items():
        for case in mod.CASES:
            key = case.op if case.op.startswith("aten.") else f"aten.{case.op}"
            out.setdefault(key, []).append(name)
    return out
