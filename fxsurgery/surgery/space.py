"""Comparable label identities across two interaction maps.

The old and new maps number their labels independently. A *token* is a label's identity for
surgery: features, categories and inputs compare by (kind, input, name), never by position, so
that a reordered feature is found at its new place; units compare by (hidden axis, position)
after the user's renames and unit maps. Label sets become frozensets of tokens, memoised per
set id.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..labels import Label
from .._sort import isin, unique
from .splits import digits

__all__ = ["SurgeryError", "SurgeryWarning", "LabelSpace", "rename_prefix", "describe"]


class SurgeryError(ValueError):
    """The plan cannot be made or applied as asked."""


class SurgeryWarning(UserWarning):
    """Something was re-initialised instead of copied."""


_SEPARATORS = ".:@["


def rename_prefix(name: str, rename: Mapping[str, str] | None) -> str:
    """Applies the longest matching `old prefix -> new prefix` of `rename` to a parameter name or
    a hidden-axis group (a prefix matches whole name components only)."""
    if not rename:
        return name
    best = None
    for old in rename:
        if name == old or (name.startswith(old) and name[len(old)] in _SEPARATORS):
            if best is None or len(old) > len(best):
                best = old
    return name if best is None else rename[best] + name[len(best):]


def _prefix_exists(prefix: str, names) -> bool:
    return any(n == prefix or (n.startswith(prefix) and n[len(prefix)] in _SEPARATORS) for n in names)


def check_rename(rename: Mapping[str, str] | None, old_names: Sequence[str], new_names: Sequence[str]) -> None:
    if not rename:
        return
    if not isinstance(rename, Mapping):
        raise SurgeryError(f"rename must be a dict old name prefix -> new name prefix, got {type(rename).__name__}")
    for old, new in rename.items():
        if not isinstance(old, str) or not isinstance(new, str):
            raise SurgeryError(f"rename {old!r} -> {new!r}: both must be strings")
        if not _prefix_exists(old, old_names):
            raise SurgeryError(f"rename {old!r} -> {new!r}: the old model has no parameter or module named "
                               f"{old!r}; its parameters are {_listing(old_names)}")
        if not _prefix_exists(new, new_names):
            raise SurgeryError(f"rename {old!r} -> {new!r}: the new model has no parameter or module named "
                               f"{new!r}; its parameters are {_listing(new_names)}")


def _listing(names, limit: int = 16) -> str:
    names = sorted(names)
    return str(names[:limit])[:-1] + (f", ... ({len(names) - limit} more)]" if len(names) > limit else "]")


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
    labels = pool.labels
    if not pool.class_sizes(("category",)):
        return {}
    found: dict[str, dict[int, Label]] = {}
    for e in imap.entries.values():
        if e.key_meets is None:
            continue
        for d in range(len(e.shape)):
            m = _axis_ids(e.key_meets, d, pool)
            if m is None:
                continue
            if not any(labels[i].kind == "category" for s in unique(m)[0].tolist() for i in pool.sets[s]):
                continue
            a = _axis_ids(e.key_aligned, d, pool)
            if a is None:
                continue
            pairs, group, ok = {}, None, True
            for ms, as_ in zip(m.tolist(), a.tolist()):
                cats = [labels[i] for i in pool.sets[ms] if labels[i].kind == "category"]
                units = [labels[i] for i in pool.sets[as_] if labels[i].kind == "unit"]
                if len(cats) != 1 or len(units) != 1 or (group is not None and units[0].group != group):
                    ok = False
                    break
                group = units[0].group
                pairs[units[0].index] = cats[0]
            if ok and group is not None and len({(c.group, c.name) for c in pairs.values()}) == len(pairs):
                found.setdefault(group, {}).update(pairs)
    return found


def _unit_groups(pool) -> dict[str, int]:
    return {g: n for (_, g), n in pool.class_sizes(("unit",)).items()}


class LabelSpace:
    """Tokens of the labels of an old and a new map.

    `units`: hidden-axis group -> the old positions that survive, in new order (new unit k is
    old unit units[group][k]); groups are named as in the new model (the old name is accepted).
    A string value declares an alias instead: `units={"mid": "fc1"}` says that the new hidden
    axis `mid` belongs to an inserted layer whose unit j stands for unit j of `fc1` (new-side
    labels of `mid` get the tokens of `fc1`'s units); see `unit_aliases`.
    """

    def __init__(self, old_map, new_map, rename=None, units=None, splits=None):
        old_pool, new_pool = old_map.pool, new_map.pool
        self.pools = {"old": old_pool, "new": new_pool}
        self.rename = dict(rename or {})
        self._ids: dict[tuple, int] = {}
        self.info: list[Label] = []          # token -> a label to show for it
        self.old_groups = _unit_groups(old_pool)
        self.new_groups = _unit_groups(new_pool)
        self.unit_aliases: dict[str, str] = {}             # inserted new group -> the group it stands for
        self.unit_maps = self._check_units(units)          # new group -> {old pos: new pos}
        self._new_units = {(lab.group, lab.index): lab for lab in new_pool.labels if lab.kind == "unit"}
        # Units that stand for categories (a tied output projection) match by category.
        old_cat = {rename_prefix(g, self.rename): v for g, v in category_units(old_map).items()}
        new_cat = category_units(new_map)
        self.category_units = {"old": {g: v for g, v in old_cat.items() if g in new_cat and g not in self.unit_maps},
                               "new": {g: v for g, v in new_cat.items() if g in old_cat and g not in self.unit_maps}}
        # Unit axes the graph cuts into parts (fused q/k/v, heads) match part by part.
        old_split, new_split = splits or ({}, {})
        old_split = {rename_prefix(g, self.rename): c for g, c in old_split.items()}
        both = {g for g in old_split if g in new_split and len(old_split[g]) == len(new_split[g])
                and g not in self.unit_maps}
        self.unit_splits = {"old": {g: old_split[g] for g in both}, "new": {g: new_split[g] for g in both}}
        self.label_tokens = {
            "old": [self._token(lab, "old") for lab in old_pool.labels],
            "new": [self._token(lab, "new") for lab in new_pool.labels],
        }
        old_set, new_set = set(self.label_tokens["old"]), set(self.label_tokens["new"])
        self.new_only = frozenset(new_set - old_set)
        self.removed = frozenset(old_set - new_set)
        self.categories = frozenset(t for t in old_set | new_set if self.info[t].kind == "category")
        self.removed_data = frozenset(self.removed - self.categories)
        self._sets: dict[str, dict[int, frozenset]] = {"old": {}, "new": {}}
        self._tset_of: dict[str, dict[int, int]] = {"old": {}, "new": {}}
        self._tset_ids: dict[frozenset, int] = {}
        self.tset_tokens: list[frozenset] = []
        self.tset_flags: list[tuple] = []
        self.intern_tset(frozenset())  # number 0: the empty set

    # tokens ---------------------------------------------------------------------------
    def _intern(self, key: tuple, label: Label) -> int:
        t = self._ids.get(key)
        if t is None:
            t = self._ids[key] = len(self.info)
            self.info.append(label)
        return t

    def _token(self, lab: Label, side: str) -> int:
        if lab.kind != "unit":
            return self._intern(("x", lab.kind, lab.group, lab.name), lab)
        if side == "new" and lab.group in self.unit_aliases:
            # An inserted layer's unit j is the unit j of the group it stands for.
            target = self.unit_aliases[lab.group]
            tlab = self._new_units.get((target, lab.index)) or Label("unit", target, str(lab.index), lab.index)
            return self._token(tlab, "new")
        group = lab.group if side == "new" else rename_prefix(lab.group, self.rename)
        cat = self.category_units[side].get(group, {}).get(lab.index)
        if cat is not None:
            return self._intern(("uc", group, cat.group, cat.name), Label("unit", group, cat.name, lab.index))
        chunks = self.unit_splits[side].get(group)
        if chunks is not None:
            parts = digits(lab.index, chunks)
            return self._intern(("us", group, parts), Label("unit", group, ".".join(map(str, parts)), lab.index))
        if side == "new":
            return self._intern(("u", lab.group, lab.index), lab)
        umap = self.unit_maps.get(group)
        if umap is None:
            index = lab.index
        else:
            index = umap.get(lab.index)
            if index is None:  # pruned: a label the new model lacks
                return self._intern(("pruned", group, lab.index), lab)
        return self._intern(("u", group, index), Label("unit", group, str(index), index))

    def tokens(self, side: str, set_id: int) -> frozenset:
        memo = self._sets[side]
        s = memo.get(set_id)
        if s is None:
            lt = self.label_tokens[side]
            s = memo[set_id] = frozenset(lt[i] for i in self.pools[side].sets[set_id])
        return s

    # token sets: label sets of either side, numbered once -------------------------------
    def tset(self, side: str, set_id: int) -> int:
        """The number of the token set of a set id (equal sets of both sides: equal numbers)."""
        memo = self._tset_of[side]
        t = memo.get(set_id)
        if t is None:
            t = memo[set_id] = self.intern_tset(self.tokens(side, set_id))
        return t

    def intern_tset(self, toks: frozenset) -> int:
        t = self._tset_ids.get(toks)
        if t is None:
            t = self._tset_ids[toks] = len(self.tset_tokens)
            self.tset_tokens.append(toks)
            new = toks & self.new_only
            gone = toks & self.removed
            self.tset_flags.append((bool(new), bool(new) and new <= self.categories, bool(gone),
                                    bool(gone & self.removed_data)))
        return t

    def translate(self, side: str, ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Token-set numbers of an id tensor (same shape), and the distinct numbers found."""
        uniq, inverse = unique(ids)
        memo = self._tset_of[side]
        keys = uniq.tolist()
        missing = [k for k in keys if k not in memo]
        if missing:
            lt, sets, intern = self.label_tokens[side], self.pools[side].sets, self.intern_tset
            for k in missing:
                memo[k] = intern(frozenset(map(lt.__getitem__, sets[k])))
        vals = list(map(memo.__getitem__, keys))
        out = torch.tensor(vals, dtype=torch.int64).index_select(0, inverse.reshape(-1)).reshape(inverse.shape)
        return out, vals

    def flags(self, tsets: torch.Tensor, uniq: list[int], which: int) -> torch.Tensor:
        """A flag of each token set of `tsets` (whose distinct values are `uniq`): 0 holds a new
        label, 1 ... and all of them categories, 2 holds a removed label, 3 holds a removed
        feature, input or unit."""
        f = self.tset_flags
        hits = [t for t in uniq if f[t][which]]
        if not hits:
            return torch.zeros(tsets.shape, dtype=torch.bool)
        if len(hits) == 1:
            return tsets == hits[0]
        return isin(tsets, hits)

    def label(self, token: int) -> Label:
        return self.info[token]

    # the unit map ---------------------------------------------------------------------
    def _check_units(self, units) -> dict[str, dict[int, int]]:
        if not units:
            return {}
        if not isinstance(units, Mapping):
            raise SurgeryError(f"units must be a dict hidden-axis group -> list of old positions, "
                               f"got {type(units).__name__}")
        renamed = {rename_prefix(g, self.rename): g for g in self.old_groups}
        out = {}
        chained = {g for g, t in units.items() if isinstance(t, str)}
        for group, target in units.items():
            if isinstance(target, str):
                self._check_alias(group, target, renamed, chained)
        self._resolve_aliases()
        for group, positions in units.items():
            if isinstance(positions, str):
                continue
            if group in self.new_groups or group in renamed:
                new_group = group
            elif group in self.old_groups:
                new_group = rename_prefix(group, self.rename)
            else:
                raise SurgeryError(f"units[{group!r}]: no hidden axis named {group!r}; the new model's hidden "
                                   f"axes are {_listing(self.new_groups)}")
            old_group = renamed.get(new_group)
            if old_group is None:
                raise SurgeryError(f"units[{group!r}]: the old model has no hidden axis {new_group!r}; its hidden "
                                   f"axes are {_listing(self.old_groups)}")
            old_size = self.old_groups[old_group]
            new_size = self.new_groups.get(new_group)
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
        return out

    def _check_alias(self, group, target: str, renamed: dict, chained=()) -> None:
        """`units[group] = target`: the new hidden axis `group` is an inserted layer whose unit j
        stands for unit j of `target` (a hidden axis of the old model, named as in either)."""
        if not isinstance(group, str):
            raise SurgeryError(f"units: hidden-axis groups are named by strings, got {group!r}")
        if group not in self.new_groups:
            raise SurgeryError(f"units[{group!r}] = {target!r}: the new model has no hidden axis {group!r} to "
                               f"declare an inserted layer; its hidden axes are {_listing(self.new_groups)}")
        if group in renamed:
            raise SurgeryError(f"units[{group!r}] = {target!r}: {group!r} is a hidden axis of the old model too, "
                               f"not an inserted layer; an alias is for a hidden axis only the new model has")
        if target == group:
            raise SurgeryError(f"units[{group!r}] = {target!r}: a hidden axis cannot stand for itself")
        if target in renamed or target in chained:  # chained: an inserted layer standing for another
            new_target = target
        elif target in self.old_groups:
            new_target = rename_prefix(target, self.rename)
        else:
            raise SurgeryError(f"units[{group!r}] = {target!r}: the old model has no hidden axis {target!r} for the "
                               f"inserted layer {group!r} to stand for; its hidden axes are "
                               f"{_listing(self.old_groups)}")
        size = self.new_groups[group]
        target_size = self.new_groups[new_target] if new_target in self.new_groups else \
            self.old_groups[renamed[new_target]]
        if size != target_size:
            raise SurgeryError(f"units[{group!r}] = {target!r}: the inserted layer's hidden axis {group!r} has "
                               f"{size} units but {target!r} has {target_size}; an inserted layer stands for "
                               "its units one by one, so the sizes must be equal")
        self.unit_aliases[group] = new_target

    def _resolve_aliases(self) -> None:
        """Follows chains of aliases (`mid2 -> mid -> fc1`) to the group of the old model."""
        for group in list(self.unit_aliases):
            seen = [group]
            target = self.unit_aliases[group]
            while target in self.unit_aliases:
                if target in seen:
                    raise SurgeryError(f"units: the aliases {' -> '.join(seen + [target])} form a cycle")
                seen.append(target)
                target = self.unit_aliases[target]
            self.unit_aliases[group] = target

    def inserted(self, group: str) -> str | None:
        """The group an inserted hidden axis stands for (None if `group` is not an alias)."""
        return self.unit_aliases.get(group)


def describe(tokens, space: LabelSpace, limit: int = 3) -> str:
    """A short text for a set of tokens: `obs: armor, speed; fc1 +16 units`."""
    by_group: dict[tuple[str, str], list[Label]] = {}
    for t in tokens:
        lab = space.label(t)
        by_group.setdefault((lab.kind, lab.group), []).append(lab)
    parts = []
    for (kind, group), labs in sorted(by_group.items()):
        labs.sort(key=lambda l: (l.index, l.name))
        if kind == "unit":
            idx = [l.index for l in labs]
            if len(idx) <= limit:
                parts.append(f"{group}[{', '.join(map(str, idx))}]")
            else:
                parts.append(f"{len(idx)} units of {group}")
        elif kind == "input":
            parts.append(f"input {group}")
        else:
            names = [l.name for l in labs]
            shown = ", ".join(names[:limit]) + (f" (+{len(names) - limit})" if len(names) > limit else "")
            parts.append(f"{group}: {shown}")
    return "; ".join(parts)
