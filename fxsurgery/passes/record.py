"""What a pass leaves in `gm.meta["fxsurgery"]`: one typed record (a `PassRecord`).

A chain of passes keeps every pass's plan, in order (`record.plans`: the first model -> the
first pass's module, ..., the previous module -> this one; `record.plan` is the last), and
`record.composite()` plans the first model against this module directly, so that
`fs.verify(record.composite())` checks the whole chain at once.

The record reads like the dict it replaces (`gm.meta["fxsurgery"]["plan"]`, `"inputs" in rec`,
`rec.get("batch")`), which code written against the dict relies on.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..capture import Traced
from ..surgery.planning import plan as make_plan

__all__ = ["PassRecord", "composite_units"]


@dataclass
class PassRecord:
    plan: Any                      # SurgeryPlan: the model before this pass -> this module
    inputs: dict                   # example inputs of this module, by input name
    features: dict                 # input name -> fs.Features / fs.Categories / None
    what: str                      # the change, e.g. "widen('fc1')"
    traced: Traced                 # this module, traced (reused by the next pass while unchanged)
    batch: str                     # whether the batch size is free ("free ...") or "fixed at N ..."
    fingerprint: tuple             # what the trace depends on (see core.fingerprint)
    reach: Any = None              # the reach of the change (None for an inserted layer)
    plans: list = field(default_factory=list)   # every plan of the chain, first to last
    changes: list = field(default_factory=list)  # every change of the chain (`what`), in order
    first: Traced | None = None    # the model the chain started from
    sizes: str = ""                # which sizes follow the inputs (see passes/free_sizes.py)

    # the dict this record replaces ----------------------------------------------------------
    def __getitem__(self, key: str):
        if not isinstance(key, str) or key not in self._names():
            raise KeyError(f"a pass record has no field {key!r}; its fields are {sorted(self._names())}")
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return key in self._names()

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self._names() else default

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    @classmethod
    def _names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    # the chain ------------------------------------------------------------------------------
    def composite(self):
        """A plan of the chain's first model against this module (with `new_categories="keep"`:
        this module already holds the rows each pass chose). Its table, issues and
        `fs.verify(...)` describe the whole chain. Raises PassError when the chain moved units in
        a way one plan cannot express (see `composite_units`). Do not `apply()` it to a module
        trained since: it would carry the first model's weights over again."""
        if self.first is None or not self.plans:
            raise _error("this record holds no chain of plans")
        if len(self.plans) == 1:
            return self.plan
        units = composite_units(self.plans, self.what)
        return make_plan(self.first, self.traced, units=units or None, new_categories="keep")


def _error(message: str):
    from .driver import PassError      # (driver imports this module)
    return PassError(message)


def composite_units(plans: list, what: str = "the chain") -> dict:
    """The `units=` argument that plans the first model of `plans` against the last.

    Each plan says where its new units come from: an explicit list of old positions
    (`units={g: [...]}`: new unit k is old unit list[k], later ones are new), an inserted layer
    (`units={g: "f"}`: unit k stands for unit k of f), or nothing (unit k is old unit k, when
    there is one). Following every unit back through the chain gives, for each hidden axis of
    the last model, the first model's (axis, position) of each unit, or None for a new one.
    That is written back in the planner's terms; a mix it cannot say (a new unit before a
    surviving one, an inserted layer whose units were then pruned) is an error naming the axis."""
    first = plans[0].space.old_groups
    origin = {g: [(g, k) for k in range(n)] for g, n in first.items()}
    for p in plans:
        nxt = {}
        for g, n in p.space.new_groups.items():
            u = p.units.get(g)
            prev = origin.get(g, [])
            if isinstance(u, str):
                src = origin.get(u, [])
                nxt[g] = [src[k] if k < len(src) else None for k in range(n)]
            elif u is not None:
                u = [int(k) for k in (u.tolist() if isinstance(u, torch.Tensor) else u)]
                nxt[g] = [prev[u[k]] if k < len(u) and u[k] < len(prev) else None for k in range(n)]
            else:
                nxt[g] = [prev[k] if k < len(prev) else None for k in range(n)]
        origin = nxt
    units = {}
    for g, where in origin.items():
        known = [w for w in where if w is not None]
        if not known:
            continue                             # a new axis: its units are new labels
        groups = {fg for fg, _ in known}
        if len(groups) > 1:
            raise _error(f"{what}: the units of hidden axis {g!r} come from several axes of the first "
                              f"model ({sorted(groups)}); one plan cannot say that: verify each pass's plan")
        (fg,) = groups
        positions = [None if w is None else w[1] for w in where]
        if fg != g:
            if positions != list(range(first[fg])):
                raise _error(f"{what}: hidden axis {g!r} is an inserted layer standing for {fg!r}, whose "
                                  "units a later pass moved or pruned; one plan cannot say that: verify each "
                                  "pass's plan")
            units[g] = fg
            continue
        n_first = first.get(g, 0)
        if all(p == k if k < n_first else p is None for k, p in enumerate(positions)):
            continue                             # by position: what the planner does without units
        last = max(k for k, p in enumerate(positions) if p is not None)
        if any(p is None for p in positions[:last + 1]):
            raise _error(f"{what}: hidden axis {g!r} holds new units before surviving ones "
                              f"({positions}); one plan cannot say that: verify each pass's plan")
        units[g] = positions[:last + 1]
    for g, fg in list(units.items()):
        # The planner reads an inserted layer's units against the axis it stands for as that axis
        # is in the last model: an axis whose units the chain changed cannot serve.
        if isinstance(fg, str) and (fg in units or plans[-1].space.new_groups.get(fg) != first[fg]):
            raise _error(f"{what}: hidden axis {g!r} is an inserted layer standing for {fg!r}, whose units a "
                         "later pass changed; one plan cannot say that: verify each pass's plan")
    return units
