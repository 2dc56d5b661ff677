"""Hidden axes (unit groups) across the two models: their sizes, the ones whose units stand for
categories, and the user's `units=` map (surviving positions, or an inserted layer's alias)
checked against both models."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..labels import Label
from ..setpool import KINDS
from .._sort import unique
from .errors import SurgeryError, _listing
from .renames import rename_prefix

__all__ = ["unit_sizes", "category_units", "check_units"]


def _axis_ids(terms, d: int, pool):
    """The set ids along axis d of the terms that vary along d only (None if there are none)."""
    out = None
    for t in terms.terms:
        vary = [a for a in range(t.dim()) if t.shape[a] > 1]
        if vary == [d]:
            v = t.reshape(-1)
            out = v if out is None else pool.union_ids(out, v)
    return out


def category_units(imap) -> dict[str, dict[int, Label]]:
    """Hidden-axis groups whose units are categories in disguise: an axis of a parameter along
    which each position meets exactly one category and is aligned with exactly one unit of one
    group (the rows of an embedding whose output projection is tied to it: logit r is category
    r). Their units are matched by category, not by position."""
    pool = imap.pool
    if not pool.class_sizes(("category",)):
        return {}
    category, unit = KINDS.index("category"), KINDS.index("unit")
    found: dict[str, dict[int, Label]] = {}
    for e in imap.entries.values():
        if e.key_meets is None:
            continue
        for d in range(len(e.shape)):
            m = _axis_ids(e.key_meets, d, pool)
            if m is None:
                continue
            cats = _only_member(pool, m, category)   # a vocabulary's rows: checked in tensor code
            if cats is None:
                continue
            a = _axis_ids(e.key_aligned, d, pool)
            units = _only_member(pool, a, unit) if a is not None else None
            if units is None:
                continue
            groups = {pool.label(i).group for i in unique(units)[0].tolist()}
            if len(groups) != 1:
                continue
            index = pool.indices(units)
            labels = pool.labels
            pairs = {u: labels[c] for u, c in zip(index.tolist(), cats.tolist())}
            if len({(c.group, c.name) for c in pairs.values()}) == len(pairs):
                found.setdefault(groups.pop(), {}).update(pairs)
    return found


def _only_member(pool, set_ids, kind: int):
    """The one label of `kind` in each set of `set_ids`, or None unless every set holds
    exactly one (a set of one category and some units counts: only `kind` is looked at)."""
    uniq, inverse = unique(set_ids)
    members, seg = pool.members(uniq)
    hit = pool.kinds(members) == kind
    if int(hit.sum()) != uniq.numel() or not bool((torch.bincount(seg[hit], minlength=uniq.numel()) == 1).all()):
        return None
    only = torch.empty(uniq.numel(), dtype=torch.int64)
    only[seg[hit]] = members[hit]
    return only[inverse.reshape(-1)]


def unit_sizes(pool) -> dict[str, int]:
    """Hidden-axis group -> its number of units, read off a map's labels."""
    return {g: n for (_, g), n in pool.class_sizes(("unit",)).items()}


def check_units(units, rename: dict, old_groups: dict, new_groups: dict) -> tuple[dict, dict]:
    """Checks `units=` against both models' hidden axes: (new group -> {old position: new
    position}, inserted new group -> the old model's group it stands for, chains followed)."""
    aliases: dict[str, str] = {}
    if not units:
        return {}, aliases
    if not isinstance(units, Mapping):
        raise SurgeryError(f"units must be a dict hidden-axis group -> list of old positions, "
                           f"got {type(units).__name__}")
    renamed = {rename_prefix(g, rename): g for g in old_groups}
    out = {}
    chained = {g for g, t in units.items() if isinstance(t, str)}
    for group, target in units.items():
        if isinstance(target, str):
            aliases[group] = _check_alias(group, target, renamed, chained, rename, old_groups, new_groups)
    _resolve_aliases(aliases)
    for group, positions in units.items():
        if isinstance(positions, str):
            continue
        if group in new_groups or group in renamed:
            new_group = group
        elif group in old_groups:
            new_group = rename_prefix(group, rename)
        else:
            raise SurgeryError(f"units[{group!r}]: no hidden axis named {group!r}; the new model's hidden "
                               f"axes are {_listing(new_groups)}")
        old_group = renamed.get(new_group)
        if old_group is None:
            raise SurgeryError(f"units[{group!r}]: the old model has no hidden axis {new_group!r}; its hidden "
                               f"axes are {_listing(old_groups)}")
        old_size = old_groups[old_group]
        new_size = new_groups.get(new_group)
        if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence) and \
                not hasattr(positions, "tolist"):
            raise SurgeryError(f"units[{group!r}] must be a list of old unit positions, got {positions!r}")
        positions = positions.tolist() if hasattr(positions, "tolist") else list(positions)
        seen: dict[int, int] = {}
        for k, p in enumerate(positions):
            if isinstance(p, bool) or not isinstance(p, int):
                raise SurgeryError(f"units[{group!r}][{k}] is {p!r}: unit positions must be integers")
            if not 0 <= p < old_size:
                raise SurgeryError(f"units[{group!r}][{k}] = {p} is out of range: the old model's hidden "
                                   f"axis {old_group!r} has {old_size} units (0..{old_size - 1})")
            if p in seen:
                raise SurgeryError(f"units[{group!r}]: old unit {p} is repeated (at positions {seen[p]} and "
                                   f"{k}); each old unit may survive once")
            seen[p] = k
        if new_size is not None and len(positions) > new_size:
            raise SurgeryError(f"units[{group!r}] lists {len(positions)} surviving units, but the new model's "
                               f"hidden axis {new_group!r} has only {new_size}")
        out[new_group] = seen
    return out, aliases


def _check_alias(group, target: str, renamed: dict, chained, rename: dict, old_groups: dict,
                 new_groups: dict) -> str:
    """`units[group] = target`: the new hidden axis `group` is an inserted layer whose unit j
    stands for unit j of `target` (a hidden axis of the old model, named as in either); returns
    the target, named as in the new model."""
    if not isinstance(group, str):
        raise SurgeryError(f"units: hidden-axis groups are named by strings, got {group!r}")
    if group not in new_groups:
        raise SurgeryError(f"units[{group!r}] = {target!r}: the new model has no hidden axis {group!r} to "
                           f"declare an inserted layer; its hidden axes are {_listing(new_groups)}")
    if group in renamed:
        raise SurgeryError(f"units[{group!r}] = {target!r}: {group!r} is a hidden axis of the old model too, "
                           f"not an inserted layer; an alias is for a hidden axis only the new model has")
    if target == group:
        raise SurgeryError(f"units[{group!r}] = {target!r}: a hidden axis cannot stand for itself")
    if target in renamed or target in chained:  # chained: an inserted layer standing for another
        new_target = target
    elif target in old_groups:
        new_target = rename_prefix(target, rename)
    else:
        raise SurgeryError(f"units[{group!r}] = {target!r}: the old model has no hidden axis {target!r} for the "
                           f"inserted layer {group!r} to stand for; its hidden axes are "
                           f"{_listing(old_groups)}")
    size = new_groups[group]
    target_size = new_groups[new_target] if new_target in new_groups else \
        old_groups[renamed[new_target]]
    if size != target_size:
        raise SurgeryError(f"units[{group!r}] = {target!r}: the inserted layer's hidden axis {group!r} has "
                           f"{size} units but {target!r} has {target_size}; an inserted layer stands for "
                           "its units one by one, so the sizes must be equal")
    return new_target


def _resolve_aliases(aliases: dict) -> None:
    """Follows chains of aliases (`mid2 -> mid -> fc1`) to the group of the old model."""
    for group in list(aliases):
        seen = [group]
        target = aliases[group]
        while target in aliases:
            if target in seen:
                raise SurgeryError(f"units: the aliases {' -> '.join(seen + [target])} form a cycle")
            seen.append(target)
            target = aliases[target]
        aliases[group] = target
