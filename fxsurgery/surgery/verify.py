"""Checking a transplant: old and new model on the same random inputs.

Inputs are drawn for the new model; the old model gets the same values where the inputs mean
the same thing: shared features at their old positions (found by name along the labelled
axis), removed features zero, shared categories translated to their old values (new categories
are never drawn), unlabelled inputs the same values, and an input the new model lacks zero.
Outputs are compared on the positions the old and new output have in common (found through
the output nodes' keys): by label when the plan matched them (each old position against the
new position holding the same labels, wherever it moved), else by position. A non-finite value
is never a zero: NaN or an infinity on one side only is a NaN or infinite deviation; a NaN in
both outputs at the same position, or the same infinity, is the old value reproduced and counts
as equal (as torch.testing's equal_nan does), and is said in the notes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tabulate import tabulate
from torch.utils._pytree import tree_flatten

from ..labels import Categories, Features
from .apply import select_matched
from .errors import SurgeryError

__all__ = ["verify", "Verification", "OutputDeviation"]


@dataclass
class OutputDeviation:
    output: int
    old_shape: tuple | None
    new_shape: tuple
    compared: int = 0            # elements compared per trial
    max_abs: float = 0.0         # largest |new - old| where both are finite
    scale: float = 0.0           # largest finite |old|
    note: str = ""
    mismatched: int = 0          # elements non-finite on one side only, or unequal infinities
    nan: bool = False            # ... some of them NaN against a number: the deviation is NaN
    both_nonfinite: int = 0      # elements with the same NaN or infinity in both (counted equal)
    by: str = ""                 # "label" (positions matched through their labels) or "position"
    moved: int = 0               # compared elements found at another position in the new output
    by_position: float | None = None  # relative deviation compared by position, when positions moved

    @property
    def relative(self) -> float:
        if self.compared == 0:
            return float("nan")
        if self.mismatched:
            return float("nan") if self.nan else float("inf")
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs


@dataclass
class Verification:
    outputs: list = field(default_factory=list)
    trials: int = 0
    notes: list = field(default_factory=list)

    @property
    def max(self) -> float:
        """The largest relative deviation over the outputs compared (NaN if any is NaN: a NaN
        is never smaller than a number)."""
        vals = [o.relative for o in self.outputs if o.compared]
        if not vals or any(math.isnan(v) for v in vals):
            return float("nan")
        return max(vals)

    def __float__(self) -> float:
        return self.max

    def __getitem__(self, i) -> float:
        return self.outputs[i].relative

    def __len__(self) -> int:
        return len(self.outputs)

    def ok(self, tol: float = 1e-5) -> bool:
        return all(o.compared and o.relative <= tol for o in self.outputs)

    def __str__(self) -> str:
        rows = [[o.output, "x".join(map(str, o.old_shape)) if o.old_shape is not None else "-",
                 "x".join(map(str, o.new_shape)), o.compared, o.by or "-", _deviation(o), f"{o.scale:.3g}",
                 f"{o.relative:.3g}", _note(o)] for o in self.outputs]
        text = tabulate(rows, headers=["output", "old shape", "new shape", "compared", "compared by",
                                       "max |new-old|", "max |old|", "relative", "note"])
        text += f"\n\nlargest relative deviation over {self.trials} random inputs: {self.max:.3g}"
        if self._how():
            text += f" (compared {self._how()})"
        if self.notes:
            text += "\n" + "\n".join(f"- {n}" for n in self.notes)
        return text

    def _how(self) -> str:
        """Which outputs were compared by label (positions matched through their labels) and
        which by position."""
        by = {}
        for o in self.outputs:
            if o.compared:
                by.setdefault(o.by, []).append(str(o.output) + (f" ({o.moved:,} positions moved)" if o.moved else ""))
        return "; ".join(f"by {k}: output{'s' if len(v) > 1 else ''} {', '.join(v)}" for k, v in sorted(by.items()))

    def __repr__(self) -> str:
        how = self._how()
        return (f"Verification(max relative deviation {self.max:.3g} over {self.trials} trials, "
                f"{len(self.outputs)} outputs" + (f"; compared {how}" if how else "") + ")")


def _deviation(o: OutputDeviation) -> str:
    if o.mismatched:
        return "nan" if o.nan else "inf"
    return f"{o.max_abs:.3g}"


def _note(o: OutputDeviation) -> str:
    parts = [o.note] if o.note else []
    if o.mismatched:
        parts.append(f"{o.mismatched:,} elements NaN where the other model's are not (a NaN deviation)" if o.nan else
                     f"{o.mismatched:,} elements infinite where the other model's are finite or the opposite "
                     "infinity")
    if o.by_position is not None:
        parts.append(f"by position the relative deviation is {o.by_position:.3g}")
    return "; ".join(parts)


def _dim(desc: Features, ndim: int) -> int:
    return desc.dim % ndim


def _device(model) -> torch.device:
    """Where a model runs: the device of its first parameter or buffer (CPU if it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _int_range(example: torch.Tensor | None) -> tuple[int, int] | None:
    """The value range of an integer example input, or None when its values cannot be read
    (meta tensors have none)."""
    if example is None or example.device.type == "meta" or not example.numel():
        return None
    return int(example.min()), int(example.max())


def _draw(example: torch.Tensor, g: torch.Generator, n_categories: int | None = None,
          other: torch.Tensor | None = None) -> torch.Tensor:
    """Random values shaped like `example`, on the CPU. Only its shape and dtype are read, except
    for integer inputs: drawn among `n_categories` values when given, else within the range of
    the example's (or `other`'s) values when they can be read, else 0 (a safe index)."""
    shape, dtype = tuple(example.shape), example.dtype
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if n_categories is not None and n_categories > 0:
        lo, hi = 0, n_categories - 1
    else:
        lo, hi = _int_range(example) or _int_range(other) or (0, 0)
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=dtype)


def _inputs(plan, g: torch.Generator, notes: list):
    old_t, new_t = plan.old, plan.new
    new_vals, old_vals = {}, {}
    for name, ex in zip(new_t.input_names, new_t.inputs):
        desc = new_t.descriptions.get(name)
        old_desc = old_t.descriptions.get(name) if name in old_t.input_names else None
        old_ex = old_t.inputs[old_t.input_names.index(name)] if name in old_t.input_names else None
        if isinstance(desc, Categories):
            shared = [c for c in desc.names if isinstance(old_desc, Categories) and c in old_desc.names]
            if not shared:
                if old_ex is not None:
                    notes.append(f"input {name!r}: no category in common with the old model; drawn at random")
                new_vals[name] = _draw(ex, g, len(desc.names))
                continue
            pick = torch.randint(len(shared), tuple(ex.shape), generator=g)
            new_vals[name] = torch.tensor([desc.names.index(c) for c in shared], dtype=ex.dtype)[pick]
            old_vals[name] = torch.tensor([old_desc.names.index(c) for c in shared], dtype=old_ex.dtype)[pick]
            continue
        x = _draw(ex, g, other=old_ex)
        if not ex.dtype.is_floating_point and not ex.dtype.is_complex and ex.dtype != torch.bool and \
                _int_range(ex) is None and _int_range(old_ex) is None and ex.numel():
            notes.append(f"input {name!r}: integer values of a meta example cannot be read; fed 0")
        new_vals[name] = x
        if old_ex is None:
            continue
        if isinstance(desc, Features) and isinstance(old_desc, Features):
            d_new, d_old = _dim(desc, x.dim()), _dim(old_desc, old_ex.dim())
            if d_new != d_old or x.dim() != old_ex.dim():
                raise SurgeryError(f"input {name!r}: the old model labels axis {d_old} and the new one axis "
                                   f"{d_new}; verify needs the same labelled axis")
            where = {n: i for i, n in enumerate(desc.names)}
            idx = torch.tensor([where.get(n, -1) for n in old_desc.names], dtype=torch.int64)
            y = x.index_select(d_new, idx.clamp(min=0))
            gone = torch.nonzero(idx < 0).reshape(-1)
            if gone.numel():
                y.index_fill_(d_new, gone, 0)
            old_vals[name] = y.to(old_ex.dtype)
        elif tuple(old_ex.shape) == tuple(x.shape):
            old_vals[name] = x.to(old_ex.dtype)
        else:
            raise SurgeryError(f"input {name!r} changes shape {tuple(old_ex.shape)} -> {tuple(x.shape)} without "
                               "feature labels on both sides; verify cannot tell which values correspond")
    for name, ex in zip(old_t.input_names, old_t.inputs):
        if name not in old_vals:  # an input (or categories) the new model lacks: zero
            old_vals[name] = torch.zeros(tuple(ex.shape), dtype=ex.dtype)
            if isinstance(old_t.descriptions.get(name), Categories):
                notes.append(f"input {name!r}: no category in common with the new model; fed category 0")
    # On the models' devices, never the examples' (examples may be meta tensors).
    old_dev, new_dev = _device(old_t.model), _device(new_t.model)
    old_args = tuple(old_vals[n].to(old_dev) for n in old_t.input_names)
    new_args = tuple(new_vals[n].to(new_dev) for n in new_t.input_names)
    return old_args, new_args


def _tensors(out) -> list:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


class _Frozen:
    """Runs a model without letting it change its buffers (batch norm in training mode)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = [(b, b.detach().clone()) for b in self.model.buffers()]

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)


def _accumulate(d: OutputDeviation, a: torch.Tensor, b: torch.Tensor) -> None:
    """Adds one trial's comparison of old values `a` and new values `b` (same shape) to `d`.
    Python's max drops a NaN (max(0.0, nan) is 0.0), so non-finite values are counted apart
    from the finite deviation, and the scale is the largest finite |old|."""
    d.compared = int(b.numel())
    if not b.numel():
        return
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    both = fa & fb
    if not bool(both.all()):
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        same = (nan_a & nan_b) | (~fa & (a == b))          # NaN and NaN, or the same infinity
        odd = ~both & ~same
        d.both_nonfinite = max(d.both_nonfinite, int(same.sum()))
        n_odd = int(odd.sum())
        if n_odd:
            d.mismatched = max(d.mismatched, n_odd)
            d.nan = d.nan or bool((odd & (nan_a | nan_b)).any())
        if bool(both.any()):
            d.max_abs = max(d.max_abs, float((b - a)[both].abs().max()))
        if bool(fa.any()):
            d.scale = max(d.scale, float(a[fa].abs().max()))
        return
    d.max_abs = max(d.max_abs, float((b - a).abs().max()))
    d.scale = max(d.scale, float(a.abs().max()))


def verify(plan, n: int = 8, seed: int = 0) -> Verification:
    """Runs old and new model on `n` random inputs (shaped like the example inputs) and returns
    the largest relative deviation of each output: max |new - old| / max |old| over the
    positions both outputs have (NaN or inf where one side is not finite; see the module's
    docstring). Each output says whether it was compared by label or by position; when its
    positions moved, `by_position` is the deviation compared index by index."""
    result = Verification(trials=n)
    for what, model in (("old", plan.old.model), ("new", plan.new.model)):
        if any(t.device.type == "meta" for t in model.state_dict().values()):
            raise SurgeryError(f"the {what} model is on the meta device: it has no weights to run")
    if not plan.applied:
        result.notes.append("the plan has not been applied: the new model holds its own weights")
    old_model, new_model = plan.old.model, plan.new.model
    devs, positional = {}, {}
    with torch.no_grad(), _Frozen(old_model), _Frozen(new_model), torch.random.fork_rng(devices=[]):
        for trial in range(n):
            g = torch.Generator().manual_seed(seed + trial)
            old_args, new_args = _inputs(plan, g, result.notes)
            torch.manual_seed(seed + trial)
            old_out = _tensors(plan.old.call(old_model, old_args))
            torch.manual_seed(seed + trial)
            new_out = _tensors(plan.new.call(new_model, new_args))
            for i, y in enumerate(new_out):
                d = devs.get(i)
                m = plan.outputs[i] if i < len(plan.outputs) else None
                x = old_out[i] if i < len(old_out) else None
                if d is None:
                    d = devs[i] = OutputDeviation(i, tuple(x.shape) if x is not None else None, tuple(y.shape))
                if x is None:
                    d.note = "the old model has no such output"
                    continue
                if m is not None and m[1].copy and not m[1].unexplained:
                    a, b = select_matched(m[1], x, y)
                    d.by = "position" if m[1].identity else "label"
                    if not m[1].identity:
                        d.moved = m[1].n_moved()
                        d.note = "compared on the old positions" + (
                            f"; {d.moved:,} of them moved (see the plan's issues)" if d.moved else "")
                        if d.moved and x.shape == y.shape:
                            p = positional.get(i)
                            if p is None:
                                p = positional[i] = OutputDeviation(i, tuple(x.shape), tuple(y.shape))
                            _accumulate(p, x.double(), y.double())
                elif x.shape == y.shape:
                    a, b = x, y
                    d.by = "position"
                    if m is not None:
                        d.note = "positions compared by index (their labels differ)"
                else:
                    d.note = "shapes differ and no position could be matched: not compared"
                    continue
                _accumulate(d, a.double(), b.double())
    for i, p in positional.items():
        devs[i].by_position = p.relative
    for d in devs.values():
        if d.both_nonfinite:
            result.notes.append(f"output {d.output}: {d.both_nonfinite:,} elements non-finite in both models at "
                                "the same position with the same value (NaN and NaN, or the same infinity): "
                                "counted equal")
    result.outputs = [devs[i] for i in sorted(devs)]
    result.notes = list(dict.fromkeys(result.notes))
    return result
