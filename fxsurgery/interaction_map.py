"""The interaction map: for every parameter and buffer element, the labels it meets.

`interaction_map(traced)` computes it with the boolean mapping (the rules). The same type is
returned by the gradient mapping, so that the two compare with `==` and `compare`. A boolean
map also holds *keys*: per element, the nearest labels it meets and the units it is aligned
with, which is what surgery matches old and new elements by.
"""
from __future__ import annotations

import difflib
import json
import operator
from dataclasses import dataclass, field
from typing import Iterable

import torch
from tabulate import tabulate

from ._gc import gc_paused
from ._sort import one_thread, unique
from .capture import Traced
from .labels import Label, SetPool
from .progress import steps
from .propagate import LabelPropagator
from .rules import REGISTRY
from .terms import Terms

__all__ = ["InteractionMap", "ParamEntry", "interaction_map", "compare", "Difference"]


@dataclass
class ParamEntry:
    name: str
    shape: tuple
    kind: str                            # "parameter" or "buffer"
    meets: Terms                         # the paper's map: input labels met, transitively
    key_meets: Terms | None = None       # keys: the nearest labels met (features, units)
    key_aligned: Terms | None = None     # keys: the units the element is aligned with
    aliases: tuple = ()


@dataclass
class Difference:
    """Where two maps disagree: per parameter, elements and labels only one side has."""
    rows: list = field(default_factory=list)  # (param, element index, only in a, only in b)
    missing: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows or self.missing)

    def __str__(self) -> str:
        if not self:
            return "the maps agree"
        lines = [f"parameter {m} is in one map only" for m in self.missing]
        for name, idx, only_a, only_b in self.rows[:20]:
            lines.append(f"{name}{list(idx)}: only in first {sorted(map(str, only_a))}, "
                         f"only in second {sorted(map(str, only_b))}")
        if len(self.rows) > 20:
            lines.append(f"... and {len(self.rows) - 20} more elements")
        return "\n".join(lines)


class InteractionMap:
    def __init__(self, pool: SetPool, entries: dict[str, ParamEntry], inputs: dict, source: str,
                 notes: Iterable[str] = ()):
        self.pool = pool
        self.entries = entries
        self.inputs = inputs
        self.source = source
        self.notes = list(notes)
        self._alias = {a: name for name, e in entries.items() for a in e.aliases}
        self.run = None   # set by interaction_map: the stamp of the graph run that made it

    # lookups ------------------------------------------------------------------------
    def _entry(self, name: str) -> ParamEntry:
        if not isinstance(name, str):
            raise TypeError(f"a parameter is named by its state_dict name (a string), got {name!r}")
        name = self._alias.get(name, name)
        if name not in self.entries:
            close = difflib.get_close_matches(name, sorted(set(self.entries) | set(self._alias)), n=4, cutoff=0.6)
            hint = f"; did you mean {close}?" if close else ""
            raise KeyError(f"no parameter or buffer named {name!r}{hint} The map has {sorted(self.entries)[:12]}"
                           + (" ..." if len(self.entries) > 12 else ""))
        return self.entries[name]

    def _index(self, e: ParamEntry, index) -> tuple:
        """`index` as a tuple of ints, checked against the parameter's shape: one integer per
        axis, each within its size (negative ones count from the end, as in torch)."""
        where = f"{e.name} (shape {tuple(e.shape)})"
        idx = (index,) if isinstance(index, int) and not isinstance(index, bool) else index
        try:
            idx = tuple(idx)
        except TypeError:
            raise TypeError(f"the index into {where} must be a tuple of integers, got {index!r}") from None
        try:   # ints, numpy and 0-d torch integers (anything with __index__), never a bool
            if any(isinstance(i, bool) for i in idx):
                raise TypeError
            idx = tuple(operator.index(i) for i in idx)
        except TypeError:
            raise TypeError(f"the index into {where} must be a tuple of integers, got {index!r}") from None
        if len(idx) != len(e.shape):
            raise IndexError(f"{where} has {len(e.shape)} axes; the index {index!r} gives {len(idx)}")
        for axis, (i, n) in enumerate(zip(idx, e.shape)):
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for axis {axis} of {where}: valid are "
                                 f"{-n}..{n - 1}")
        return idx

    def resolve(self, label) -> Label:
        """A Label from a Label, "group:name", a unit "group[i]" or a name unique across inputs."""
        if isinstance(label, Label):
            return label
        if not isinstance(label, str):
            raise TypeError(f"a label is a fxsurgery Label or a string, got {type(label).__name__}")
        known = self.pool.labels
        exact = [l for l in known if str(l) == label]
        if len(exact) == 1:
            return exact[0]
        named = [l for l in known if l.name == label and l.kind in ("feature", "category", "input")]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise KeyError(f"label {label!r} is ambiguous: {sorted(map(str, named))}; use 'input:name'")
        inputs = sorted({str(l) for l in known if l.kind != "unit"})
        raise KeyError(f"no label {label!r}; labels are {inputs[:12]}" + (" ..." if len(inputs) > 12 else ""))

    def params_for(self, label) -> dict[str, torch.Tensor]:
        """For each parameter and buffer that the label reaches, a boolean mask of its shape."""
        lab = self.resolve(label)
        lid = self.pool.find_label(lab)
        out = {}
        for name, e in self.entries.items():
            mask = e.meets.contains(lid, self.pool)
            if bool(mask.any()):
                out[name] = mask
        return out

    def labels_of(self, name: str) -> set[Label]:
        """Every label that some element of the parameter meets."""
        e = self._entry(name)
        return {self.pool.labels[i] for i in self.pool.sets[e.meets.total(self.pool)]}

    def element_labels(self, name: str, index: tuple) -> set[Label]:
        e = self._entry(name)
        index = self._index(e, index)
        dense = e.meets.dense(self.pool)
        return {self.pool.labels[i] for i in self.pool.sets[int(dense[index])]}

    def key_of(self, name: str, index: tuple) -> tuple[set[Label], set[Label]]:
        """(nearest labels met, units aligned with) of one element."""
        e = self._entry(name)
        if e.key_meets is None:
            raise ValueError(f"this {self.source} map holds no keys")
        index = self._index(e, index)
        m = int(e.key_meets.dense(self.pool)[index])
        a = int(e.key_aligned.dense(self.pool)[index])
        return ({self.pool.labels[i] for i in self.pool.sets[m]}, {self.pool.labels[i] for i in self.pool.sets[a]})

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    # comparison ---------------------------------------------------------------------
    def _element_sets(self, name: str):
        e = self.entries[name]
        return e.meets.dense(self.pool)

    def __eq__(self, other) -> bool:
        if not isinstance(other, InteractionMap):
            return NotImplemented
        return not compare(self, other)

    def issubset(self, other: "InteractionMap") -> bool:
        return not compare(self, other, subset=True)

    # reporting ----------------------------------------------------------------------
    def summary(self, name: str, limit: int = 6) -> str:
        labels = sorted(self.labels_of(name), key=lambda l: (l.kind, l.group, l.index, l.name))
        by_group: dict[str, list[str]] = {}
        for l in labels:
            by_group.setdefault(l.group, []).append(l.name)
        parts = []
        for g, names in by_group.items():
            shown = ", ".join(names[:limit]) + (f" (+{len(names) - limit})" if len(names) > limit else "")
            parts.append(f"{g}: {shown}" if names != [g] else g)
        return "; ".join(parts) if parts else "-"

    def table(self, tablefmt: str = "simple") -> str:
        rows = []
        for name, e in self.entries.items():
            rows.append([name + (f" (= {', '.join(a for a in e.aliases if a != name)})"
                                 if len(e.aliases) > 1 else ""),
                         "x".join(map(str, e.shape)) or "scalar", e.kind,
                         len(self.labels_of(name)), self.summary(name)])
        text = tabulate(rows, headers=["parameter", "shape", "kind", "labels", "labels met"], tablefmt=tablefmt)
        if self.notes:
            text += "\n\nnotes:\n" + "\n".join(f"- {n}" for n in self.notes)
        return text

    def to_json(self) -> dict:
        """Per parameter and label met: how many elements it reaches and, per axis, the
        positions it reaches (the full masks would be as large as the weights)."""
        out = {"source": self.source,
               "inputs": {k: (v.to_json() if v is not None else None) for k, v in self.inputs.items()},
               "parameters": {}, "notes": self.notes}
        for name, e in self.entries.items():
            labels = {}
            for lab in sorted(self.labels_of(name)):
                mask = e.meets.contains(self.pool.find_label(lab), self.pool)
                per_axis = [mask.any(dim=[d for d in range(mask.dim()) if d != a]) if mask.dim() > 1 else mask
                            for a in range(mask.dim())]
                labels[str(lab)] = {"elements": int(mask.sum()),
                                    "positions": [p.nonzero().reshape(-1).tolist() for p in per_axis]}
            out["parameters"][name] = {"shape": list(e.shape), "kind": e.kind, "aliases": list(e.aliases),
                                       "labels": labels}
        return out

    def save_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    def __repr__(self) -> str:
        return f"InteractionMap({self.source}, {len(self.entries)} parameters and buffers, {len(self.pool.labels)} labels)"


def compare(a: InteractionMap, b: InteractionMap, subset: bool = False) -> Difference:
    """Element-wise difference of two maps, by label (not by internal id). With `subset`,
    only labels that `a` has and `b` lacks count."""
    diff = Difference()
    for name in sorted(set(a.entries) | set(b.entries)):
        if name not in a.entries or name not in b.entries:
            if name in a.entries and subset and a.entries[name].meets.total(a.pool) == 0:
                continue
            diff.missing.append(name)
            continue
        da, db = a._element_sets(name), b._element_sets(name)
        if tuple(da.shape) != tuple(db.shape):
            diff.missing.append(name)
            continue
        n = max(len(b.pool.sets), 1)
        pair = da.reshape(-1) * n + db.reshape(-1)
        uniq, inverse = unique(pair)
        for k, p in enumerate(uniq.tolist()):
            ia, ib = divmod(p, n)
            la = {a.pool.labels[i] for i in a.pool.sets[ia]}
            lb = {b.pool.labels[i] for i in b.pool.sets[ib]}
            only_a, only_b = la - lb, lb - la
            if only_a or (only_b and not subset):
                where = torch.nonzero(inverse == k)[0].item()
                idx = torch.unravel_index(torch.tensor(where), da.shape) if da.dim() else ()
                diff.rows.append((name, tuple(int(i) for i in idx), only_a, set() if subset else only_b))
    return diff


def _entries(traced: Traced, deps: LabelPropagator, keys: LabelPropagator | None) -> dict[str, ParamEntry]:
    entries = {}
    for node in traced.graph.nodes:
        if node.op != "placeholder":
            continue
        kind, name = traced.placeholders.get(node.name, ("input", node.name))
        if kind not in ("parameter", "buffer") or traced.canonical(name) in entries:
            continue
        name = traced.canonical(name)
        shape = tuple(node.meta["val"].shape)
        entries[name] = ParamEntry(
            name=name, shape=shape, kind=kind,
            meets=deps.meets.get(name) or Terms(shape),
            key_meets=(keys.meets.get(name) or Terms(shape)) if keys else None,
            key_aligned=(keys.aligned.get(name) or Terms(shape)) if keys else None,
            aliases=tuple(traced.aliases.get(name, (name,))))
    return entries


def interaction_map(traced: Traced, keys: bool = True, registry=REGISTRY, *, progress=None) -> InteractionMap:
    """The boolean mapping: propagates label sets through the graph with the rules.

    progress: a tqdm bar on stderr over the graph's nodes, twice with keys (None, the default:
    only on a terminal, with tqdm installed, for graphs of fxsurgery.progress.LARGE_GRAPH nodes
    or more; True: always; False: never), or a callable("mapping <model class>", nodes done,
    total) called after each node.
    """
    pool = SetPool()
    traced.graph_module.meta.pop(RUN_KEY, None)   # the nodes' labels are about to change
    # One thread: the rules run thousands of tensor calls on a few thousand ids each, where
    # torch's intra-op pool only adds synchronisation; on a 2-core machine under load the
    # 2-layer Llama-shaped map took 6.5 s with it against 1.9 s without.
    n = len(traced.graph.nodes)
    with one_thread(), gc_paused(), steps(progress, f"mapping {type(traced.model).__name__}",
                                          n * (2 if keys else 1), nodes=n, unit="node") as step:
        deps = LabelPropagator(traced, pool, "deps", registry, step=step)
        deps.run(*_placeholder_args(traced))
        kp = None
        if keys:
            kp = LabelPropagator(traced, pool, "keys", registry, step=step)
            kp.run(*_placeholder_args(traced))
    notes = list(dict.fromkeys(deps.notes + (kp.notes if kp else [])))
    imap = InteractionMap(pool, _entries(traced, deps, kp), dict(traced.descriptions), "boolean", notes)
    # The graph's nodes now hold this run's label tensors: a stamp on both says so, so that a
    # caller holding the map (a pass) can hand it to `fs.plan` instead of mapping again.
    if keys and registry is REGISTRY:
        imap.run = traced.graph_module.meta[RUN_KEY] = (object(), pool.n_labels)
    return imap


RUN_KEY = "fxsurgery_map_run"


def current_map(traced: Traced, imap) -> bool:
    """Whether `imap` is the last map made of `traced`'s graph (its nodes hold its labels)."""
    run = getattr(imap, "run", None)
    # ... and no label was added to its pool since (sets may be: they change no existing id).
    return run is not None and traced.graph_module.meta.get(RUN_KEY) is run and imap.pool.n_labels == run[1]


def _placeholder_args(traced: Traced) -> list:
    # The propagator builds each placeholder's labels itself; the positional values are unused.
    return [None for n in traced.graph.nodes if n.op == "placeholder"]
