"""Texts of a surgery plan: the per-parameter table and the summary."""
from __future__ import annotations

import math

from tabulate import tabulate

from .tokens import describe

__all__ = ["table", "text", "summary", "counts", "reason"]


def _shape(shape) -> str:
    if shape is None:
        return "-"
    return "x".join(map(str, shape)) or "scalar"


def _reordered(m) -> bool:
    for b in m.blocks:
        idx = b.index[b.index >= 0]
        if idx.numel() > 1 and bool((idx[1:] < idx[:-1]).any()):
            return True
    return False


def reason(plan, p) -> str:
    m, space = p.match, plan.space
    if not p.persistent:
        return "non-persistent buffer (not saved state): the new model's own values"
    if not p.in_graph:
        return "not read by the graph: copied by name" if p.old_name else "not read by the graph: kept"
    if m.unexplained:
        return f"re-initialised: {m.unexplained}"
    parts = []
    if p.inserted:
        via = ", ".join(f"{g} = {space.unit_aliases[g]}" for g in p.inserted)
        parts.append(f"inserted layer ({via}): keeps the values it was built with")
    elif p.old_name is None:
        parts.append("new parameter")
    elif p.old_name != p.name:
        parts.append(f"from {p.old_name}")
    if p.old_name is not None and not m.copy:
        parts.append("no element keeps its key: nothing copied")
    if m.new_met:
        cats = all(space.label(t).kind == "category" for t in m.new_met)
        how = {"zero": "zeroed", "mean": "mean of the old rows", "keep": "kept"}[plan.new_categories] \
            if cats else "zeroed"
        parts.append(f"meets new {describe(m.new_met, space)} ({how})")
    if m.new_aligned:
        parts.append(f"positions of new {describe(m.new_aligned, space)} (kept)")
    if m.removed_labels:
        parts.append(f"drops {describe(m.removed_labels, space)}")
    if p.old_name is not None and m.copy and _reordered(m):
        parts.append("reordered")
    if not parts:
        parts.append("unchanged" if m.identity else "copied")
    return "; ".join(parts)


def _row(plan, p):
    m = p.match
    total = math.prod(m.new_shape)
    copied = m.n_copied() if p.old_name is not None else 0
    init = total - copied
    zeroed = m.n_zeroed(plan.new_categories) if p.in_graph and p.persistent else 0
    zeroed = min(zeroed, init)
    dropped = (math.prod(m.old_shape) - copied if m.unexplained else m.n_dropped()) \
        if p.old_name is not None and m.old_shape is not None else 0
    name = p.name + (f" (= {', '.join(a for a in p.aliases if a != p.name)})" if len(p.aliases) > 1 else "")
    return [name, _shape(m.old_shape if p.old_name is not None else None), _shape(m.new_shape),
            copied, zeroed, init - zeroed, dropped, reason(plan, p)]


def counts(plan) -> dict:
    c = {"copied": 0, "zeroed": 0, "kept": 0, "dropped": 0}
    for p in plan.params.values():
        _, _, _, copied, zeroed, kept, dropped, _ = _row(plan, p)
        c["copied"] += copied
        c["zeroed"] += zeroed
        c["kept"] += kept
        c["dropped"] += dropped
    return c


def table(plan, tablefmt: str = "simple") -> str:
    rows = [_row(plan, p) for p in plan.params.values()]
    old_state = plan.old.model.state_dict(keep_vars=True) if plan.dropped else {}
    for name in plan.dropped:
        shape = old_state[name].shape if name in old_state else None
        n = math.prod(shape) if shape is not None else 0
        rows.append([name, _shape(tuple(shape) if shape is not None else None), "-", 0, 0, 0, n,
                     "not in the new model: dropped"])
    headers = ["parameter", "old shape", "new shape", "copied", "zeroed", "kept", "dropped", "reason"]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, intfmt=",")


def text(plan) -> str:
    return plan.table() + "\n\n" + summary(plan)


def summary(plan) -> str:
    """What the table adds up to, the labels gained and lost, and where function preservation
    is impossible."""
    c = counts(plan)
    lines = []
    lines.append(f"{c['copied']:,} elements copied, {c['zeroed']:,} zeroed, {c['kept']:,} kept with the new "
                 f"model's values, {c['dropped']:,} old elements dropped.")
    if plan.space.new_only:
        lines.append(f"new labels: {describe(plan.space.new_only, plan.space, limit=8)}")
    if plan.space.removed:
        lines.append(f"removed labels: {describe(plan.space.removed, plan.space, limit=8)}")
    blocking = [i for i in plan.issues if i.blocking]
    if blocking:
        lines.append("")
        lines.append("function preservation is impossible at:")
        lines += [f"- {i}" for i in blocking]
    others = [i for i in plan.issues if not i.blocking]
    if others:
        lines.append("")
        lines.append("reported (the old outputs are still computed exactly):")
        lines += [f"- {i}" for i in others]
    if not blocking:
        unexplained = [p.name for p in plan.params.values() if p.match.unexplained]
        if unexplained:
            lines.append(f"re-initialised (shape change not explained): {', '.join(unexplained)}")
        else:
            lines.append("the new model computes what the old one did (no obstacle found).")
    if plan.notes:
        lines.append("")
        lines.append("notes:")
        lines += [f"- {n}" for n in plan.notes]
    return "\n".join(lines)
